//! One analysis for every stage: what field encryption refuses is refused however the
//! statement names the column — through derived tables and CTEs too — while selecting through
//! them still returns plaintext.

use serde_json::json;
use tokio_postgres::error::SqlState;

use crate::harness::{self, ProxyOptions};

#[tokio::test]
async fn computations_on_encrypted_columns_are_refused_through_derived_tables() {
    let dir = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("derivedenc", true).await;
    let key_file = dir.path().join("master.key");
    pgward::keys::local::LocalProvider::generate_file(&key_file).unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        // Without [policy] there is no catalog to find customers' primary key in.
        extra_toml: pgward::cli::dev::demo_encryption_toml(&key_file)
            .replace("bind_primary_key = true\n", ""),
        ..ProxyOptions::default()
    })
    .await;
    let mut config = proxy.client_config("app", &database);
    // The demo encrypts personal columns under per-tenant keys: the token names the tenant.
    config.password(harness::token("app", json!({"tenant_id": 1})));
    let (app, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    app.execute(
        "INSERT INTO customers (tenant_id, name, email) VALUES (1, 'derived', 'derived@example.com')",
        &[],
    )
    .await
    .unwrap();

    for sql in [
        "SELECT length(x.e) FROM (SELECT email AS e FROM customers) x",
        "WITH x AS (SELECT email AS e FROM customers) SELECT length(e) FROM x",
    ] {
        let err = app.simple_query(sql).await.unwrap_err();
        assert_eq!(
            err.code().map(SqlState::code),
            Some("0A000"),
            "{sql}: {err}"
        );
        let err = app.query(sql, &[]).await.unwrap_err();
        assert_eq!(
            err.code().map(SqlState::code),
            Some("0A000"),
            "{sql}: {err}"
        );
    }
    // Selected through a derived table, the column is decrypted like the column itself.
    let rows = app
        .query(
            "SELECT x.e FROM (SELECT email AS e, name FROM customers) x WHERE x.name = 'derived'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "derived@example.com");
    proxy.shutdown().await;
}
