//! Field-encryption throughput: AES-256-GCM envelope seal+open of 1 KiB values, and the cost
//! of the SQL transform per statement.
//!
//! `cargo bench --bench crypto`
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgward::crypto::blind::IndexKey;
use pgward::crypto::envelope::{key_name_id, Dek, KeyRef};
use pgward::crypto::manager::{CachePolicy, KeyManager};
use pgward::crypto::scope::KeyScope;
use pgward::crypto::{ClientType, EncryptColumn};
use pgward::keys::local::LocalProvider;
use pgward::keys::SecretKey;

fn envelope(c: &mut Criterion) {
    let dek = Dek::new(
        &SecretKey::from_bytes([3; 32]),
        KeyRef {
            key_id: key_name_id("bench"),
            dek_version: 1,
        },
    );
    let value = vec![0xa5u8; 1024];
    let ct = dek.seal("public.t", "c", &value).unwrap();
    let mut g = c.benchmark_group("envelope_1KiB");
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("encrypt", |b| {
        b.iter(|| {
            dek.seal("public.t", "c", std::hint::black_box(&value))
                .unwrap()
        })
    });
    g.bench_function("decrypt", |b| {
        b.iter(|| {
            dek.open("public.t", "c", std::hint::black_box(&ct))
                .unwrap()
        })
    });
    g.bench_function("encrypt+decrypt", |b| {
        b.iter(|| {
            let ct = dek
                .seal("public.t", "c", std::hint::black_box(&value))
                .unwrap();
            dek.open("public.t", "c", &ct).unwrap()
        })
    });
    g.finish();

    let idx = IndexKey::derive(&SecretKey::from_bytes([4; 32]), "bench", "public.t", "c");
    c.bench_function("blind_index_64B", |b| {
        b.iter(|| {
            idx.compute(ClientType::Text, std::hint::black_box(&value[..64]))
                .unwrap()
        })
    });
}

fn manager(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // `c`: one key for every row; `p`: per-tenant keys (the session's `tenant_id` claim).
    let cols = [
        EncryptColumn {
            table: "t".into(),
            column: "c".into(),
            key: "bench".into(),
            ty: ClientType::Bytea,
            searchable: false,
            context_claim: None,
            bind_primary_key: false,
        },
        EncryptColumn {
            table: "t".into(),
            column: "p".into(),
            key: "bench".into(),
            ty: ClientType::Bytea,
            searchable: false,
            context_claim: Some("tenant_id".into()),
            bind_primary_key: false,
        },
    ];
    let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([5; 32])));
    let policy = CachePolicy {
        ttl: Duration::from_secs(3600),
        max_stale: Duration::from_secs(3600),
        blocking_threshold: 64 * 1024,
    };
    let m = KeyManager::new(provider, None, &cols, policy).unwrap();
    let value = vec![0x5au8; 1024];
    let mut g = c.benchmark_group("key_manager_1KiB");
    g.throughput(Throughput::Bytes(1024));
    // One session's scope, as the relay keeps it: per-tenant names are derived once.
    let session = KeyScope::with([("tenant_id".to_string(), "1".to_string())]);
    for (name, column) in [
        ("encrypt+decrypt", "c"),
        ("encrypt+decrypt_per_tenant", "p"),
    ] {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || value.clone(),
                |v| {
                    let (m, session) = (&m, &session);
                    async move {
                        let ct = m.encrypt("t", column, session, &v).await.unwrap();
                        m.decrypt("t", column, session, &ct).await.unwrap()
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// What field encryption adds to a statement's analysis: parse + transform + print, for a
/// statement on an encrypted table (literal encrypted / equality on the blind index) and one
/// on a plain table (parse only, left untouched).
fn sql_transform(c: &mut Criterion) {
    use pgward::crypto::sql::SqlEncryption;
    use pgward::policy::sql::{parse_statements, sanitize};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cols = [EncryptColumn {
        table: "customers".into(),
        column: "email".into(),
        key: "bench".into(),
        ty: ClientType::Text,
        searchable: true,
        context_claim: None,
        bind_primary_key: false,
    }];
    let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([5; 32])));
    let policy = CachePolicy {
        ttl: Duration::from_secs(3600),
        max_stale: Duration::from_secs(3600),
        blocking_threshold: 64 * 1024,
    };
    let m = Arc::new(KeyManager::new(provider, None, &cols, policy).unwrap());
    assert!(rt.block_on(m.prefetch()).is_empty());
    let enc = SqlEncryption::new(m);
    let mut g = c.benchmark_group("sql_transform");
    for (name, sql) in [
        (
            "insert_literal",
            "INSERT INTO customers (name, email) VALUES ('Ann', 'ann@example.com')",
        ),
        (
            "select_eq",
            "SELECT id, email FROM customers WHERE email = 'ann@example.com'",
        ),
        ("plain_table", "SELECT id, total FROM orders WHERE id = 42"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut st = parse_statements(std::hint::black_box(sql)).unwrap();
                sanitize(&mut st[0]).unwrap();
                let out = enc.transform(&mut st, None, &KeyScope::default()).unwrap();
                (out.touched, st[0].to_string())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = envelope, manager, sql_transform
}
criterion_main!(benches);
