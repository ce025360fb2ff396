//! The policy engine's per-statement cost for the pgbench workload, on the three paths a
//! statement can take through the rewrite cache:
//! * `exact_hit`: the same text again (a prepared statement's Parse, a repeated query);
//! * `shape_hit`: the same statement with other literals (the simple protocol: every
//!   `... WHERE aid = N` differs), served by filling the shape's template;
//! * `miss`: a rewrite from scratch (parse, rewrite, print, round-trip check);
//! * `session_exact_hit`, `session_shape_hit`: the same two answered from the session's own
//!   memo (what the proxy uses), without the engine's shared caches.
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use pgward::policy::{
    Catalog, ColumnInfo, PolicyEngine, PolicyIdentity, RelKind, SessionMemo, TableInfo,
};

const POLICY: &str = r#"
service = "tenant"
claim_types = { bid = "int" }

[tables.pgbench_accounts]
actions = ["select", "update"]
filter = "bid = claim('bid')"
"#;

fn catalog() -> Catalog {
    let column = |name: &str, ty: &str| ColumnInfo {
        name: name.into(),
        type_name: ty.into(),
        type_oid: 0,
        not_null: true,
    };
    Catalog::from_tables(vec![TableInfo {
        schema: "public".into(),
        name: "pgbench_accounts".into(),
        oid: 16384,
        kind: RelKind::Table,
        columns: vec![
            column("aid", "integer"),
            column("bid", "integer"),
            column("abalance", "integer"),
            column("filler", "character(84)"),
        ],
        primary_key: vec!["aid".into()],
    }])
}

#[allow(clippy::expect_used)]
fn engine(dir: &Path) -> PolicyEngine {
    std::fs::write(dir.join("tenant.toml"), POLICY).expect("write the policy");
    PolicyEngine::load(dir, Arc::new(catalog()), &[]).expect("the policy compiles")
}

fn select(aid: u64) -> String {
    format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
}

#[allow(clippy::expect_used)]
fn bench_rewrite(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = engine(dir.path());
    let mut claims = serde_json::Map::new();
    claims.insert("bid".into(), serde_json::json!(1));
    let who = PolicyIdentity {
        service: "tenant",
        claims: &claims,
    };
    let mut group = c.benchmark_group("policy_rewrite");
    let same = select(4711);
    engine.rewrite(&who, &same).expect("allowed");
    group.bench_function("exact_hit", |b| {
        b.iter(|| engine.rewrite(&who, &same).expect("allowed"))
    });
    let mut aid = 0u64;
    group.bench_function("shape_hit", |b| {
        b.iter(|| {
            aid += 1;
            engine.rewrite(&who, &select(aid)).expect("allowed")
        })
    });
    let mut memo = SessionMemo::default();
    engine
        .rewrite_in_session(&mut memo, &who, &same)
        .expect("allowed");
    group.bench_function("session_exact_hit", |b| {
        b.iter(|| {
            engine
                .rewrite_in_session(&mut memo, &who, &same)
                .expect("allowed")
        })
    });
    group.bench_function("session_shape_hit", |b| {
        b.iter(|| {
            aid += 1;
            engine
                .rewrite_in_session(&mut memo, &who, &select(aid))
                .expect("allowed")
        })
    });
    let mut n = 0u64;
    group.bench_function("miss", |b| {
        b.iter(|| {
            // A new shape each time: a different column alias.
            n += 1;
            let sql = format!("SELECT abalance AS a{n} FROM pgbench_accounts WHERE aid = 1");
            engine.rewrite(&who, &sql).expect("allowed")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_rewrite);
criterion_main!(benches);
