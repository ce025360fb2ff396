//! The admin console (database `pgward`): `SHOW POOLS`, `SHOW CLIENTS`, `SHOW SERVERS` and
//! `SHOW STATS` through real psql, cross-checked with `pg_stat_activity` and `/metrics`; who
//! may open it, errors that leave the session usable, and its audit records.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, ProxyOptions, TestProxy};
use crate::policy_proxy::direct;

/// A proxy with `pooled` (transaction mode, pool_size 3), the harness's `app` (session mode)
/// and `ops`, the one console service; audited into `audit` when given.
async fn console_proxy(audit: Option<&Path>) -> TestProxy {
    let unrestricted = |name: &str| {
        harness::superuser_service(name).replace(
            "upstream_password",
            "unrestricted = true\nupstream_password",
        )
    };
    let extra_toml = format!(
        "{}pool_mode = \"transaction\"\npool_size = 3\npool_timeout = \"20s\"\n{}\n{}",
        unrestricted("pooled"),
        unrestricted("ops"),
        audit
            .map(|dir| harness::audit_toml(dir, ""))
            .unwrap_or_default(),
    );
    let text = harness::proxy_config_text(&ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .replacen(
        "[admin]\naddress = \"127.0.0.1:0\"\n",
        "[admin]\naddress = \"127.0.0.1:0\"\nconsole_services = [\"ops\"]\n",
        1,
    );
    assert!(text.contains("console_services"));
    harness::start_proxy_text(&text).await
}

type Row = HashMap<String, String>;

/// One console command through psql (TLS, the service's token as password), as rows by
/// column name.
async fn psql(proxy: &TestProxy, service: &str, command: &str) -> Result<Vec<Row>, String> {
    let (port, token, command) = (
        proxy.addr.port(),
        harness::token(service, json!({})),
        command.to_string(),
    );
    let service = service.to_string();
    // A blocking child process, off the runtime the proxy runs on.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args(["-X", "-A", "-F", "|", "-P", "footer=off", "-c", &command])
            .arg(format!(
                "host=127.0.0.1 port={port} dbname=pgward user={service} sslmode=require"
            ))
            .env("PGPASSWORD", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let mut lines = stdout.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_string)
        .collect();
    Ok(lines
        .map(|line| {
            header
                .iter()
                .cloned()
                .zip(line.split('|').map(str::to_string))
                .collect()
        })
        .collect())
}

/// A console session over tokio-postgres (TLS off: loopback plaintext is allowed in tests).
async fn console_client(proxy: &TestProxy, service: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = proxy
        .client_config(service, "pgward")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

fn rows(messages: &[SimpleQueryMessage]) -> usize {
    messages
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
        .count()
}

/// Backend pids of client connections to `database`, not counting pgward's own catalog one.
async fn backend_pids(database: &str) -> BTreeSet<String> {
    direct("postgres")
        .await
        .query(
            "SELECT pid::text FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> 'pgward'",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn pool<'a>(pools: &'a [Row], database: &str, mode: &str) -> &'a Row {
    pools
        .iter()
        .find(|r| r["database"] == database && r["pool_mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} pool of {database} in {pools:#?}"))
}

fn number(row: &Row, column: &str) -> u64 {
    row[column]
        .parse()
        .unwrap_or_else(|_| panic!("{column} in {row:?}"))
}

fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_clients_servers_and_stats_match_the_server_and_metrics() {
    let database = harness::fresh_database("console", false).await;
    let proxy = console_proxy(None).await;
    let mut pooled = Vec::new();
    for _ in 0..4 {
        pooled.push(proxy.connect("pooled", &database).await);
    }
    let session_mode = [
        proxy.connect("app", &database).await,
        proxy.connect("app", &database).await,
    ];
    // Three transactions hold all three server connections of the pool; a fourth client waits.
    for client in &pooled[..3] {
        client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    let waiter = pooled.pop().unwrap();
    let waiting = tokio::spawn(async move {
        waiter.simple_query("SELECT 1").await.unwrap();
        waiter
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pools = psql(&proxy, "ops", "SHOW POOLS").await.unwrap();
    let tx = pool(&pools, &database, "transaction");
    assert_eq!(tx["user"], "postgres");
    assert_eq!(tx["services"], "pooled");
    assert_eq!(
        (number(tx, "cl_active"), number(tx, "cl_waiting")),
        (3, 1),
        "{tx:?}"
    );
    assert_eq!(
        (
            number(tx, "sv_active"),
            number(tx, "sv_idle"),
            number(tx, "sv_total")
        ),
        (3, 0, 3),
        "{tx:?}"
    );
    assert_eq!(tx["pool_size"], "3");
    let session = pool(&pools, &database, "session");
    assert_eq!(
        (number(session, "cl_active"), number(session, "sv_active")),
        (2, 2),
        "{session:?}"
    );
    assert_eq!(session["pool_size"], "", "no pool_size in session mode");

    let clients = psql(&proxy, "ops", "show clients;").await.unwrap();
    let waiting_rows: Vec<&Row> = clients.iter().filter(|r| r["state"] == "waiting").collect();
    assert_eq!(waiting_rows.len(), 1, "{clients:#?}");
    assert_eq!(waiting_rows[0]["user"], "pooled");
    let services: Vec<(&str, &str)> = clients
        .iter()
        .map(|r| (r["user"].as_str(), r["pool_mode"].as_str()))
        .collect();
    assert_eq!(
        services
            .iter()
            .filter(|s| **s == ("pooled", "transaction"))
            .count(),
        4
    );
    assert_eq!(
        services
            .iter()
            .filter(|s| **s == ("app", "session"))
            .count(),
        2
    );
    let me = clients.iter().find(|r| r["user"] == "ops").unwrap();
    assert_eq!((me["state"].as_str(), me["tls"].as_str()), ("active", "on"));
    assert_eq!(me["database"], "pgward");
    for row in &clients {
        assert!(row["token_id"].starts_with("jti"), "{row:?}");
        assert!(
            !row.values().any(|v| v.starts_with("eyJ")),
            "a token: {row:?}"
        );
    }

    // SHOW SERVERS: exactly the backends PostgreSQL sees for this database.
    let servers = psql(&proxy, "ops", "SHOW SERVERS").await.unwrap();
    let listed: BTreeSet<String> = servers
        .iter()
        .filter(|r| r["database"] == database)
        .map(|r| r["remote_pid"].clone())
        .collect();
    assert_eq!(listed.len(), 5, "{servers:#?}");
    assert_eq!(listed, backend_pids(&database).await);

    // The transactions end: the waiter gets a connection, then every one is idle in the pool.
    for client in &pooled {
        client.batch_execute("COMMIT").await.unwrap();
    }
    let waiter = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    let pools = psql(&proxy, "ops", "SHOW POOLS").await.unwrap();
    let tx = pool(&pools, &database, "transaction");
    assert_eq!(
        (
            number(tx, "cl_active"),
            number(tx, "cl_waiting"),
            number(tx, "sv_active"),
            number(tx, "sv_idle")
        ),
        (4, 0, 0, 3),
        "{tx:?}"
    );
    let servers = psql(&proxy, "ops", "SHOW SERVERS").await.unwrap();
    assert!(servers
        .iter()
        .filter(|r| r["pool_mode"] == "transaction" && r["database"] == database)
        .all(|r| r["state"] == "idle" && r["link"].is_empty()));

    // SHOW STATS and /metrics: the same counters.
    let stats = psql(&proxy, "ops", "SHOW STATS").await.unwrap();
    let row = stats.iter().find(|r| r["user"] == "pooled").unwrap();
    let metrics = harness::http_get(proxy.admin.unwrap(), "/metrics").await;
    for (column, series) in [
        (
            "total_query_count",
            "pgward_service_queries_total{service=\"pooled\"} ",
        ),
        (
            "total_xact_count",
            "pgward_service_transactions_total{service=\"pooled\"} ",
        ),
        (
            "total_received",
            "pgward_service_received_bytes_total{service=\"pooled\"} ",
        ),
        (
            "total_wait_count",
            "pgward_service_pool_waits_total{service=\"pooled\"} ",
        ),
    ] {
        assert_eq!(
            Some(number(row, column)),
            metric(&metrics, series),
            "{column}"
        );
    }
    // 3 BEGIN batches, 1 waiting SELECT, 3 COMMITs.
    assert!(number(row, "total_query_count") >= 7, "{row:?}");
    assert!(number(row, "total_xact_count") >= 4, "{row:?}");
    assert!(number(row, "total_wait_time") > 0, "{row:?}");
    let labels = format!("{{role=\"postgres\",database=\"{database}\"}} ");
    assert_eq!(
        metric(&metrics, &format!("pgward_pool_clients_active{labels}")),
        Some(4)
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("pgward_pool_server_connections_idle{labels}")
        ),
        Some(3)
    );
    assert_eq!(
        metric(
            &metrics,
            "pgward_clients{service=\"app\",pool_mode=\"session\",state=\"idle\"} "
        ),
        Some(2)
    );
    drop((waiter, pooled, session_mode));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_console_services_may_open_it_errors_keep_it_usable_and_it_is_audited() {
    let log = tempfile::tempdir().unwrap();
    let proxy = console_proxy(Some(log.path())).await;

    // Another service, with a genuine token: refused after authentication, like a role
    // without CONNECT on a database.
    let refused = console_client(&proxy, "app").await.unwrap_err();
    let db_error = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(db_error.message().contains("admin console"), "{db_error:?}");
    let psql_refused = psql(&proxy, "app", "SHOW POOLS").await.unwrap_err();
    assert!(psql_refused.contains("permission denied"), "{psql_refused}");

    let console = console_client(&proxy, "ops").await.unwrap();
    let help = console.simple_query("SHOW HELP").await.unwrap();
    assert_eq!(rows(&help), 5);
    for (text, code) in [
        ("SELECT 1", SqlState::FEATURE_NOT_SUPPORTED),
        ("show databases", SqlState::FEATURE_NOT_SUPPORTED),
        ("show pools please", SqlState::SYNTAX_ERROR),
        ("show", SqlState::SYNTAX_ERROR),
    ] {
        let error = console.simple_query(text).await.unwrap_err();
        assert_eq!(error.code(), Some(&code), "{text}: {error:?}");
        // The session goes on.
        let pools = console.simple_query("show pools;").await.unwrap();
        assert!(
            matches!(pools.last(), Some(SimpleQueryMessage::CommandComplete(_))),
            "{text}"
        );
    }
    // The extended protocol (tokio-postgres prepares, then binds with binary results).
    let listed = console.query("show clients;", &[]).await.unwrap();
    assert_eq!(listed.len(), 1, "only the console session itself");
    assert_eq!(listed[0].get::<_, String>("user"), "ops");
    assert_eq!(listed[0].get::<_, String>("state"), "active");
    assert!(listed[0].get::<_, i64>("port") > 0);
    assert_eq!(listed[0].get::<_, Option<i64>>("server_pid"), None);
    let error = console
        .prepare_typed("SHOW CLIENTS", &[tokio_postgres::types::Type::INT4])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let error = console.prepare("SELECT 1").await.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));
    let clients = console.simple_query("SHOW CLIENTS").await.unwrap();
    assert_eq!(rows(&clients), 1);
    drop(console);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.shutdown().await;

    let records = harness::audit_records(log.path());
    let console_statements: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "statement" && r["database"] == "pgward")
        .collect();
    let allowed: Vec<&str> = console_statements
        .iter()
        .filter(|r| r["decision"] == "allowed")
        .filter_map(|r| r["sql"].as_str())
        .collect();
    assert!(allowed.contains(&"SHOW HELP"), "{console_statements:#?}");
    assert!(allowed.contains(&"SHOW CLIENTS"), "{console_statements:#?}");
    assert!(
        console_statements
            .iter()
            .any(|r| r["protocol"] == "extended" && r["sql"] == "show clients"),
        "{console_statements:#?}"
    );
    assert!(console_statements
        .iter()
        .all(|r| r["service"] == "ops" && r["token_id"].is_string()));
    let refused_show = console_statements
        .iter()
        .find(|r| r["sql"] == "show databases")
        .expect("the refused command is recorded");
    assert_eq!(refused_show["decision"], "refused");
    assert_eq!(refused_show["sqlstate"], "0A000");
    let denied = records
        .iter()
        .find(|r| r["kind"] == "auth_failed" && r["database"] == "pgward")
        .expect("the refused console login is recorded");
    assert_eq!(denied["user"], "app");
    assert_eq!(denied["sqlstate"], "42501");
    assert!(denied["token_id"].is_string(), "{denied}");
    let opened = records
        .iter()
        .find(|r| r["kind"] == "connection_opened" && r["session"]["database"] == "pgward")
        .expect("the console session's connection_opened record");
    assert_eq!(opened["session"]["service"], "ops");
    assert!(opened["session"]["upstream_role"].is_null(), "{opened}");
}

/// asyncpg (named statements, binary results) and psycopg 3 (extended protocol for every
/// execute, server-prepared and binary cursors) read the console as they would a database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_and_psycopg_read_the_console_over_the_extended_protocol() {
    let database = harness::fresh_database("console_drivers", false).await;
    let proxy = console_proxy(None).await;
    // A transaction-mode client, so that its pool exists and SHOW POOLS lists it.
    let pooled = proxy.connect("pooled", &database).await;
    pooled.simple_query("SELECT 1").await.unwrap();
    let token = harness::token("ops", json!({}));
    let port = proxy.addr.port().to_string();
    let dsn = format!(
        "host=127.0.0.1 port={port} user=ops dbname=pgward password={token} sslmode=require"
    );
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/drivers/console_drivers.py");
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        crate::tools::run(
            std::process::Command::new("python3")
                .arg(&script)
                .env("PGWARD_PORT", port)
                .env("PGWARD_TOKEN", token)
                .env("PGWARD_DATABASE", "pgward")
                .env("PGWARD_DSN", dsn),
        )
    })
    .await
    .unwrap();
    assert!(ok, "console drivers failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"), "{out}");
    drop(pooled);
}
