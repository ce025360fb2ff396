//! Policy-bound services used the way they would use PostgreSQL: drivers connect with the
//! spellings PostgreSQL accepts, and nothing a bound service can run reveals hidden rows or
//! columns (EXPLAIN, system columns, the order of policy and encryption checks, rule names).

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::harness;
use crate::policy_proxy::{demo_policies, policy_proxy};
use crate::tools::run;

/// asyncpg sends `client_encoding='utf-8'` (quoted, lower case) at startup, which PostgreSQL
/// reads as UTF8; a policy-bound service must be able to connect with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_connects_as_a_policy_bound_service() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/asyncpg_bound.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3")
            .arg(&script)
            .env("PGWARD_PORT", proxy.addr.port().to_string())
            .env(
                "PGWARD_TOKEN",
                harness::token("billing", json!({ "tenant_id": 1 })),
            )
            .env("PGWARD_DATABASE", &database))
    });
    assert!(ok, "asyncpg as billing failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"));
}
