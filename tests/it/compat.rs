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

/// psycopg (libpq) as billing over TLS, with the encoding spelled `utf-8` by the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_connects_as_a_policy_bound_service() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=billing dbname={database} password={} sslmode=require",
        proxy.addr.port(),
        harness::token("billing", json!({ "tenant_id": 1 }))
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/psycopg_bound.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3")
            .arg(&script)
            .env("PGWARD_DSN", &dsn)
            .env("PGCLIENTENCODING", "utf-8"))
    });
    assert!(ok, "psycopg as billing failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"));
}

/// Text of every row a simple query returned, one line per row.
async fn simple_text(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A refusal with SQLSTATE 42501 whose message contains each of `needles` and names its rule
/// relative to the policy directory, never the server's path.
fn assert_refusal(error: &tokio_postgres::Error, needles: &[&str]) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"));
    assert_eq!(db.code().code(), "42501", "{}", db.message());
    for needle in needles {
        assert!(
            db.message().contains(needle),
            "{:?} lacks {needle:?}",
            db.message()
        );
    }
    let dir = demo_policies().display().to_string();
    assert!(
        !db.message().contains(&dir),
        "absolute path in {:?}",
        db.message()
    );
}

/// EXPLAIN ANALYZE counts the rows a filter removes (other tenants' rows) and plain EXPLAIN's
/// costs follow the whole table: a bound service gets neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reveals_nothing_about_other_tenants_rows() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = crate::policy_proxy::connect_as(&proxy, "billing", &database, 1).await;
    for sql in [
        "EXPLAIN ANALYZE SELECT * FROM customers",
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM customers WHERE id = 7",
        "explain (analyse off, buffers) SELECT * FROM customers",
        "EXPLAIN (COSTS) SELECT * FROM invoices",
    ] {
        let err = billing.simple_query(sql).await.unwrap_err();
        assert_refusal(&err, &["EXPLAIN", "(billing.toml:"]);
    }
    // Customer 7 belongs to tenant 2: plain EXPLAIN must look the same whether or not the
    // table holds more of other tenants' rows.
    let queries = [
        "EXPLAIN SELECT * FROM customers WHERE id = 7",
        "EXPLAIN SELECT count(*) FROM invoices",
        "EXPLAIN (VERBOSE, FORMAT JSON) SELECT name FROM customers",
    ];
    let mut before = Vec::new();
    for sql in queries {
        let plan = simple_text(&billing, sql).await;
        for leak in [
            "cost",
            "rows",
            "Rows Removed",
            "width",
            "actual",
            "Plan Rows",
        ] {
            assert!(!plan.contains(leak), "{sql}: {plan}");
        }
        before.push(plan);
    }
    let direct = crate::policy_proxy::direct(&database).await;
    direct
        .batch_execute(
            "INSERT INTO customers (tenant_id, name) SELECT 2, 'more' FROM generate_series(1, 300);
             INSERT INTO invoices (tenant_id, amount_cents) SELECT 3, 1 FROM generate_series(1, 300);",
        )
        .await
        .unwrap();
    let direct_plan = simple_text(&direct, queries[1]).await;
    assert!(direct_plan.contains("rows="), "{direct_plan}");
    for (sql, earlier) in queries.iter().zip(&before) {
        assert_eq!(&simple_text(&billing, sql).await, earlier, "{sql}");
    }
}

/// System columns (`ctid`, `xmin`, …) reveal other tenants' inserts and deletes: refused on the
/// in-place point-lookup path, through the barrier and in RETURNING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_columns_are_never_readable() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = crate::policy_proxy::connect_as(&proxy, "billing", &database, 1).await;
    for col in ["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"] {
        for sql in [
            // In place (a point lookup on one filtered table).
            format!("SELECT {col} FROM customers WHERE id = 1"),
            format!("SELECT name FROM customers WHERE id = 1 AND {col} IS NOT NULL"),
            format!("SELECT name FROM customers WHERE id = 1 ORDER BY {col}"),
            // Through the barrier.
            format!("SELECT c.{col}, c.name FROM customers c"),
            format!("SELECT name FROM customers WHERE name <> '' AND {col} IS NOT NULL"),
            format!("SELECT i.id FROM invoices i JOIN customers c ON c.id = i.customer_id ORDER BY c.{col}"),
            format!("UPDATE invoices SET status = status WHERE id = 1 RETURNING {col}"),
        ] {
            let err = billing.simple_query(&sql).await.unwrap_err();
            assert_refusal(&err, &["system column", "(billing.toml:"]);
            // The extended protocol goes through the same rewriter.
            let err = billing.query(&sql, &[]).await.unwrap_err();
            assert_refusal(&err, &["system column"]);
        }
    }
}

/// Sessions are one to one with server connections: the client is given its backend's PID
/// (with pgward's own secret key), so NOTIFY's PID is recognisable and cancel still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_carry_the_pid_the_client_was_given_and_cancel_works() {
    let proxy = harness::start_proxy(harness::ProxyOptions::default()).await;
    let database = harness::fresh_database("notifypid", false).await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=app dbname={database} password={} sslmode=disable",
        proxy.addr.port(),
        harness::token("app", json!({}))
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/psycopg_notify_cancel.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3").arg(&script).env("PGWARD_DSN", &dsn))
    });
    assert!(ok, "psycopg NOTIFY/cancel checks failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"));
}

/// A cancel must reach the server while pgward is still writing a large pipeline to it (the
/// server executes slowly and stops reading): asyncpg's executemany with a timeout rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_delivered_while_a_large_pipeline_is_written() {
    let proxy = harness::start_proxy(harness::ProxyOptions::default()).await;
    let database = harness::fresh_database("cancelpipe", false).await;
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/asyncpg_cancel_pipeline.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3")
            .arg(&script)
            .env("PGWARD_PORT", proxy.addr.port().to_string())
            .env("PGWARD_TOKEN", harness::token("app", json!({})))
            .env("PGWARD_DATABASE", &database))
    });
    assert!(ok, "asyncpg cancel checks failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"), "{out}");
}
