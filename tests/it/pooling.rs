//! Transaction pooling (`pool_mode = "transaction"`): many clients on few server connections,
//! tenants sharing a connection without sharing rows, prepared statements that follow their
//! client across connections, session state refused, transactions that keep their connection,
//! the queue timeout and cancels.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, ProxyOptions, TestProxy};
use crate::policy_proxy::{connect_as, demo_policies, direct, policy_proxy};

/// A proxy with service `pooled` (transaction mode, `size` server connections, `timeout`).
async fn pooled_proxy(size: usize, timeout: &str) -> TestProxy {
    let extra_toml = format!(
        "{}pool_mode = \"transaction\"\npool_size = {size}\npool_timeout = \"{timeout}\"\n",
        harness::superuser_service("pooled").replace(
            "upstream_password",
            "unrestricted = true\nupstream_password"
        )
    );
    harness::start_proxy(ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .await
}

/// Client backends connected to `database` (seen from another database), not counting
/// pgward's own catalog connection (application_name `pgward`).
async fn server_backends(database: &str) -> i64 {
    let admin = direct("postgres").await;
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> 'pgward'",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

async fn pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_run_on_five_server_connections() {
    let database = harness::fresh_database("pool", false).await;
    let proxy = pooled_proxy(5, "20s").await;
    let setup = proxy.connect("pooled", &database).await;
    setup
        .batch_execute("CREATE TABLE hits (client int, n int)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..50i32 {
        let client = proxy.connect("pooled", &database).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..10i32 {
                // Extended protocol with named statements (tokio-postgres prepares each).
                client
                    .execute("INSERT INTO hits VALUES ($1, $2)", &[&c, &n])
                    .await
                    .unwrap();
                let row = client
                    .query_one(
                        "SELECT count(*)::int, pg_sleep(0.005)::text FROM hits WHERE client = $1",
                        &[&c],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), n + 1);
                // Simple protocol.
                let rows = client.simple_query("SELECT 1").await.unwrap();
                assert!(!rows.is_empty());
            }
        }));
    }
    let mut most = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        most = most.max(server_backends(&database).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(most > 0 && most <= 5, "{most} server connections");
    let total: i64 = setup
        .query_one("SELECT count(*) FROM hits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 500);
    assert!(server_backends(&database).await <= 5);
    // The pool's figures in /metrics.
    let metrics = harness::http_get(proxy.admin.unwrap(), "/metrics").await;
    let series = format!("pgward_pool_size{{role=\"postgres\",database=\"{database}\"}} 5");
    assert!(metrics.contains(&series), "{metrics}");
    let leases = format!("pgward_pool_leases_total{{role=\"postgres\",database=\"{database}\"}} ");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&leases))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(count >= 1500, "{count} leases for 1500 requests");
}

fn tenants_seen(messages: &[SimpleQueryMessage]) -> HashSet<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_sharing_one_server_connection_each_see_only_their_rows() {
    let extra = "[pool]\npool_mode = \"transaction\"\npool_size = 1\n";
    let (proxy, database) = policy_proxy(&demo_policies(), extra).await;
    let one = connect_as(&proxy, "billing", &database, 1).await;
    let two = connect_as(&proxy, "billing", &database, 2).await;
    let by_one = one
        .prepare("SELECT tenant_id FROM customers")
        .await
        .unwrap();
    let by_two = two
        .prepare("SELECT tenant_id FROM customers")
        .await
        .unwrap();
    for _ in 0..5 {
        for (client, statement, tenant) in [(&one, &by_one, 1i64), (&two, &by_two, 2)] {
            let simple = client
                .simple_query("SELECT tenant_id FROM customers")
                .await
                .unwrap();
            assert_eq!(tenants_seen(&simple), HashSet::from([tenant.to_string()]));
            let rows = client.query(statement, &[]).await.unwrap();
            assert!(!rows.is_empty());
            assert!(rows.iter().all(|r| r.get::<_, i64>(0) == tenant));
        }
    }
    // Both tenants ran on the one server connection of the pool.
    assert_eq!(server_backends(&database).await, 1);
    let db = direct(&database).await;
    let tenants: i64 = db
        .query_one("SELECT count(DISTINCT tenant_id) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert!(tenants >= 2, "the demo has several tenants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_statement_follows_its_client_across_server_connections() {
    let database = harness::fresh_database("poolprep", false).await;
    let proxy = pooled_proxy(3, "20s").await;
    let owner = proxy.connect("pooled", &database).await;
    let statement = owner
        .prepare("SELECT pg_backend_pid(), $1::int + 1")
        .await
        .unwrap();
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(proxy.connect("pooled", &database).await);
    }
    let mut pids = HashSet::new();
    for i in 0..20i32 {
        // The owner's execute returns its connection to the top of the idle list; another
        // client then takes that one into a transaction, so the owner's next execute runs
        // on another server connection, which has never seen the statement.
        let row = owner.query_one(&statement, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i + 1);
        let first: i32 = row.get(0);
        let holder = &others[(i as usize) % others.len()];
        holder.batch_execute("BEGIN").await.unwrap();
        assert_eq!(pid(holder).await, first);
        let row = owner.query_one(&statement, &[&(i * 2)]).await.unwrap();
        assert_eq!(row.get::<_, i32>(1), i * 2 + 1);
        assert_ne!(row.get::<_, i32>(0), first);
        pids.insert(first);
        pids.insert(row.get::<_, i32>(0));
        holder.batch_execute("COMMIT").await.unwrap();
    }
    assert!(pids.len() >= 2, "ran on {pids:?}");
    // Closing the statement and preparing again works; DEALLOCATE is handled.
    drop(statement);
    let again = owner.prepare("SELECT $1::text").await.unwrap();
    let row = owner.query_one(&again, &[&"x"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "x");
    owner.batch_execute("DEALLOCATE ALL").await.unwrap();
    // DISCARD ALL (sent by pool clients such as Npgsql when a connection goes back to their
    // pool) forgets the client's statements too: the same statement prepares again.
    let before = owner.prepare("SELECT $1::int * 3").await.unwrap();
    owner.batch_execute("DISCARD ALL").await.unwrap();
    let error = owner.query_one(&before, &[&1i32]).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
        "{error}"
    );
    let after = owner.prepare("SELECT $1::int * 3").await.unwrap();
    let row = owner.query_one(&after, &[&5i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 15);
    // The other DISCARDs still leave state behind them: refused as before.
    let refused = owner.batch_execute("DISCARD TEMP").await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_refused_with_feature_not_supported() {
    let database = harness::fresh_database("poolrefuse", false).await;
    let proxy = pooled_proxy(2, "20s").await;
    let client = proxy.connect("pooled", &database).await;
    for (sql, construct) in [
        ("SET search_path = public", "SET"),
        ("LISTEN jobs", "LISTEN"),
        ("CREATE TEMP TABLE t (a int)", "temporary tables"),
        ("SELECT pg_advisory_lock(42)", "advisory locks"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
    ] {
        let error = client.batch_execute(sql).await.unwrap_err();
        let db = error.as_db_error().expect("server error");
        assert_eq!(db.code(), &SqlState::FEATURE_NOT_SUPPORTED, "{sql}");
        assert!(db.message().contains(construct), "{sql}: {}", db.message());
        assert!(
            db.message().contains("transaction pooling mode"),
            "{}",
            db.message()
        );
        // Extended protocol too.
        let error = client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(
            error.code(),
            Some(&SqlState::FEATURE_NOT_SUPPORTED),
            "{sql}"
        );
    }
    // Transaction-scoped state is fine, and the session still works.
    client
        .batch_execute("BEGIN; SET LOCAL work_mem = '2MB'; SELECT pg_advisory_xact_lock(1); COMMIT")
        .await
        .unwrap();
    // A startup parameter that would differ between clients is refused at login.
    let mut config = proxy.client_config("pooled", &database);
    config.options("-c work_mem=3MB");
    let error = config.connect(tokio_postgres::NoTls).await.err().unwrap();
    assert_eq!(
        error.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_keeps_its_server_connection() {
    let database = harness::fresh_database("pooltx", false).await;
    let proxy = pooled_proxy(3, "20s").await;
    let setup = proxy.connect("pooled", &database).await;
    setup
        .batch_execute("CREATE TABLE items (a int)")
        .await
        .unwrap();
    let writer = proxy.connect("pooled", &database).await;
    let noise = proxy.connect("pooled", &database).await;
    let noise_task = tokio::spawn(async move {
        for _ in 0..50 {
            noise.simple_query("SELECT 1").await.unwrap();
        }
    });
    writer.batch_execute("BEGIN").await.unwrap();
    let first = pid(&writer).await;
    for i in 0..5i32 {
        writer
            .execute("INSERT INTO items VALUES ($1)", &[&i])
            .await
            .unwrap();
        let seen: i64 = writer
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(seen, i64::from(i) + 1, "sees its own uncommitted writes");
        assert_eq!(pid(&writer).await, first);
    }
    let outside: i64 = setup
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outside, 0, "uncommitted rows are invisible to others");
    writer.batch_execute("COMMIT").await.unwrap();
    let after: i64 = setup
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 5);
    noise_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_longer_than_pool_timeout_is_53300() {
    let database = harness::fresh_database("pooltimeout", false).await;
    let proxy = pooled_proxy(1, "500ms").await;
    let holder = proxy.connect("pooled", &database).await;
    let waiter = proxy.connect("pooled", &database).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let started = std::time::Instant::now();
    let error = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{error}"
    );
    let message = error.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("pool_timeout")),
        "{message:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(450));
    // The holder's transaction is unaffected; once it ends, new clients get the connection.
    holder.batch_execute("COMMIT").await.unwrap();
    let next = proxy.connect("pooled", &database).await;
    next.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_query_of_its_own_client() {
    let database = harness::fresh_database("poolcancel", false).await;
    let proxy = pooled_proxy(3, "20s").await;
    let sleeper = proxy.connect("pooled", &database).await;
    let bystander = proxy.connect("pooled", &database).await;
    let token = sleeper.cancel_token();
    let other = tokio::spawn(async move {
        bystander
            .simple_query("SELECT pg_sleep(1.5)")
            .await
            .map(|_| ())
    });
    let started = std::time::Instant::now();
    let sleeping = tokio::spawn(async move {
        let result = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (result.map(|_| ()), sleeper)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, sleeper) = sleeping.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The other client's query was not cancelled, and the cancelled client goes on.
    other.await.unwrap().unwrap();
    sleeper.simple_query("SELECT 1").await.unwrap();
    // A cancel while holding no server connection is dropped (nothing to cancel).
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    sleeper.simple_query("SELECT 2").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_with_fifty_clients_in_every_mode_on_five_server_connections() {
    let database = harness::fresh_database("poolbench", false).await;
    let proxy = pooled_proxy(5, "30s").await;
    let pgbench = pgward::pgserver::find_bindir()
        .expect("PostgreSQL binaries")
        .join("pgbench");
    let port = proxy.addr.port().to_string();
    let command = |service: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(&pgbench);
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", service])
            .args(args)
            .arg(&database)
            .env("PGPASSWORD", harness::token(service, json!({})));
        cmd
    };
    // Initialised through a session-mode service (pgbench -i uses COPY and VACUUM).
    let (ok, _, err) = tokio::task::block_in_place(|| {
        crate::tools::run(&mut command("app", &["-i", "-s", "1", "-q"]))
    });
    assert!(ok, "pgbench -i: {err}");
    for mode in ["simple", "extended", "prepared"] {
        let mut cmd = command(
            "pooled",
            &["-c", "50", "-j", "2", "-t", "20", "-M", mode, "-n"],
        );
        let run = tokio::task::spawn_blocking(move || crate::tools::run(&mut cmd));
        let mut most = 0;
        while !run.is_finished() {
            most = most.max(server_backends(&database).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (ok, out, err) = run.await.unwrap();
        assert!(ok, "pgbench -M {mode}: {out}{err}");
        assert!(
            out.contains("number of transactions actually processed: 1000/1000"),
            "{mode}: {out}"
        );
        assert!(most <= 5, "-M {mode}: {most} server connections");
    }
}

/// A raw session as `billing` for `tenant`.
async fn raw_tenant(
    proxy: &TestProxy,
    database: &str,
    tenant: i64,
) -> harness::RawClient<tokio::net::TcpStream> {
    let mut client = harness::raw_tcp(proxy.addr).await;
    let token = harness::token("billing", json!({ "tenant_id": tenant }));
    let startup = client.startup_with("billing", database, &token).await;
    assert_eq!(startup.last().map(|m| m.0), Some(b'Z'), "{startup:?}");
    client
}

/// The values of the first column of every DataRow among `answers` (text format).
fn first_column(answers: &[harness::Received]) -> Vec<String> {
    answers
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .filter_map(|(_, body)| {
            let values = pgward::protocol::view::data_row(body).ok()?;
            let first = values.first().copied().flatten()?;
            Some(String::from_utf8_lossy(first).into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_unnamed_parse_never_lets_a_tenant_run_another_tenants_unnamed_statement() {
    use harness::msg;
    let extra = "[pool]\npool_mode = \"transaction\"\npool_size = 1\n";
    let (proxy, database) = policy_proxy(&demo_policies(), extra).await;
    // Tenant 2 leaves its unnamed statement (with its tenant filter) on the one server
    // connection.
    let mut victim = raw_tenant(&proxy, &database, 2).await;
    victim
        .send(&msg::batch(&[
            msg::parse("", "SELECT tenant_id FROM customers"),
            msg::bind("", "", &[], false),
            msg::execute("", 0),
            msg::sync(),
        ]))
        .await;
    let answers = victim.until_ready(1).await;
    assert_eq!(
        first_column(&answers).first().map(String::as_str),
        Some("2")
    );
    // Tenant 1 keeps the connection in a transaction, makes it fail so that the server
    // skips its own unnamed Parse, rolls back and binds the unnamed statement.
    let mut tenant = raw_tenant(&proxy, &database, 1).await;
    tenant
        .send(&msg::batch(&[
            msg::parse("b", "BEGIN"),
            msg::bind("", "b", &[], false),
            msg::execute("", 0),
            msg::parse("z", "SELECT 1 / 0"),
            msg::bind("", "z", &[], false),
            msg::execute("", 0),
            msg::parse("", "SELECT tenant_id FROM customers"),
            msg::sync(),
        ]))
        .await;
    let answers = tenant.until_ready(1).await;
    assert_eq!(harness::error_texts(&answers).len(), 1, "{answers:?}");
    tenant
        .send(&msg::batch(&[
            msg::parse("r", "ROLLBACK"),
            msg::bind("", "r", &[], false),
            msg::execute("", 0),
            msg::bind("", "", &[], false),
            msg::execute("", 0),
            msg::sync(),
        ]))
        .await;
    let answers = tenant.until_ready(1).await;
    let seen = first_column(&answers);
    assert!(
        seen.iter().all(|t| t == "1"),
        "tenant 1 saw rows of {seen:?}: {:?}",
        harness::error_texts(&answers)
    );
    assert!(!seen.is_empty(), "{answers:?}");
    assert_eq!(server_backends(&database).await, 1);
}
