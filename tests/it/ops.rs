//! Operations: `/readyz` distinct from `/healthz`, and the per-service, build, process and
//! audit series of `/metrics`.

use crate::harness::{self, ProxyOptions};

fn status_line(page: &str) -> &str {
    page.lines().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_each_item_and_fails_when_upstream_is_unreachable() {
    let audit_dir = tempfile::tempdir().unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!("[audit]\ndir = {:?}\n", audit_dir.path()),
        ..ProxyOptions::default()
    })
    .await;
    let admin = proxy.admin.unwrap();
    let page = harness::http_get(admin, "/readyz").await;
    assert!(status_line(&page).contains("200"), "{page}");
    for line in [
        "ready\n",
        "ok upstream: reachable",
        "ok audit: writable",
        "ok token keys: 1 loaded",
    ] {
        assert!(page.contains(line), "{line:?} not in {page}");
    }
    proxy.shutdown().await;

    // Nothing listens on this port: the process is alive (healthz) but not ready.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let proxy = harness::start_proxy(ProxyOptions {
        upstream: Some(format!(
            "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nconnect_timeout = \"1s\"\n"
        )),
        ..ProxyOptions::default()
    })
    .await;
    let admin = proxy.admin.unwrap();
    let page = harness::http_get(admin, "/readyz").await;
    assert!(status_line(&page).contains("503"), "{page}");
    assert!(
        page.contains("not ready\n") && page.contains("fail upstream:"),
        "{page}"
    );
    let health = harness::http_get(admin, "/healthz").await;
    assert!(status_line(&health).contains("200"), "{health}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_in_bounded_time_while_the_audit_directory_blocks_its_write_probe() {
    use std::time::Duration;
    let audit_dir = tempfile::tempdir().unwrap();
    let proxy = harness::audited_proxy(audit_dir.path(), "").await;
    let admin = proxy.admin.unwrap();
    // The probe's file is a FIFO nobody reads: creating it for writing blocks, as a file
    // operation on a stalled disk does.
    let probe = audit_dir
        .path()
        .join(format!(".pgward-check-{}", std::process::id()));
    let stalled = harness::StalledFile::at(&probe);
    let readyz =
        || tokio::time::timeout(Duration::from_secs(8), harness::http_get(admin, "/readyz"));
    let page = readyz()
        .await
        .expect("/readyz hung behind the blocked probe");
    assert!(status_line(&page).contains("503"), "{page}");
    assert!(
        page.contains("fail audit: a write probe got no answer in time"),
        "{page}"
    );
    // While that probe still waits, the next page past the first's answer (which serves
    // the pages of the next second) says so at once, and sessions are served.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = std::time::Instant::now();
    let page = readyz()
        .await
        .expect("/readyz hung behind the blocked probe");
    assert!(
        page.contains("fail audit: an earlier write probe is still waiting for the disk"),
        "{page}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let client = proxy.connect("app", "postgres").await;
    client.simple_query("select 1").await.unwrap();
    // The "disk" answers: the probe's write goes through, and the directory is ready again.
    drop(stalled);
    let mut page = String::new();
    for _ in 0..50 {
        page = readyz().await.expect("/readyz hung");
        if status_line(&page).contains("200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(page.contains("ok audit: writable"), "{page}");
    drop(client);
    proxy.shutdown().await;
}

/// Health checkers asking at once share the probe in flight: none of them sees the other's
/// probe as a failure (the one-at-a-time probe once answered the second "still waiting").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_asked_by_many_at_once_answers_ready_to_all() {
    let audit_dir = tempfile::tempdir().unwrap();
    let proxy = harness::audited_proxy(audit_dir.path(), "").await;
    let admin = proxy.admin.unwrap();
    for _ in 0..5 {
        let pages =
            futures_util::future::join_all((0..16).map(|_| harness::http_get(admin, "/readyz")))
                .await;
        for page in pages {
            assert!(status_line(&page).contains("200"), "{page}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_per_service_decisions_latency_build_and_process_series() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let client = proxy.connect("app", "postgres").await;
    client.simple_query("select 1").await.unwrap();
    client.query("select $1::int", &[&1i32]).await.unwrap();
    let page = harness::http_get(proxy.admin.unwrap(), "/metrics").await;
    let value = |series: &str| series_value(&page, series);
    // The simple query and the driver's Parse.
    assert!(
        value("pgward_service_statements_total{service=\"app\",decision=\"forwarded\"}") >= 2.0
    );
    assert_eq!(
        value("pgward_service_statements_total{service=\"app\",decision=\"refused\"}"),
        0.0
    );
    assert!(value("pgward_service_request_duration_seconds_count{service=\"app\"}") >= 2.0);
    assert!(value("pgward_statements_total") >= 2.0);
    assert_eq!(
        value(&format!(
            "pgward_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") > 3.0);
    assert!(value("process_cpu_seconds_total") > 0.0);
    let start = value("process_start_time_seconds");
    let now = harness::now_secs() as f64;
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "{start} vs {now}"
    );
    // Only services that connected have series: the label set is the configuration's.
    assert!(!page.contains("service=\"md5svc\""));
    proxy.shutdown().await;
}

/// The value of the first line of `page` that starts with `series`.
fn series_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} not in {page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_audit_fsyncs_the_records_they_cover_and_the_results_held_for_them() {
    let synced_dir = tempfile::tempdir().unwrap();
    let synced = harness::audited_proxy(synced_dir.path(), "").await;
    let client = synced.connect("app", "postgres").await;
    for i in 0..20 {
        client.simple_query(&format!("select {i}")).await.unwrap();
    }
    let page = harness::http_get(synced.admin.unwrap(), "/metrics").await;
    let value = |series: &str| series_value(&page, series);
    let fsyncs = value("pgward_audit_fsync_duration_seconds_count");
    // Every statement's results waited for an fsync covering its record.
    assert!(fsyncs >= 1.0, "{page}");
    assert!(value("pgward_audit_records_total") >= 20.0, "{page}");
    assert_eq!(
        value("pgward_audit_fsync_duration_seconds_bucket{le=\"+Inf\"}"),
        fsyncs
    );
    assert!(
        value("pgward_audit_fsync_duration_seconds_sum") > 0.0,
        "{page}"
    );
    // Results held for their records' fsync (durability = "before_response"), each time
    // something was still to be made durable.
    let held = value("pgward_audit_durability_wait_seconds_count");
    assert!(held >= 1.0, "{page}");
    // A healthy disk never holds the log's lock long enough to count as stalled.
    assert_eq!(value("pgward_audit_stalled_appends_total"), 0.0, "{page}");
    drop(client);
    synced.shutdown().await;

    // Without fsync the records are counted and no fsync is.
    let unsynced_dir = tempfile::tempdir().unwrap();
    let unsynced = harness::audited_proxy(unsynced_dir.path(), "fsync = false").await;
    let client = unsynced.connect("app", "postgres").await;
    client.simple_query("select 1").await.unwrap();
    let page = harness::http_get(unsynced.admin.unwrap(), "/metrics").await;
    assert_eq!(
        series_value(&page, "pgward_audit_fsync_duration_seconds_count"),
        0.0
    );
    assert!(
        series_value(&page, "pgward_audit_records_total") >= 1.0,
        "{page}"
    );
    // Written is as durable as that log gets: no result is held for it.
    assert_eq!(
        series_value(&page, "pgward_audit_durability_wait_seconds_count"),
        0.0
    );
    drop(client);
    unsynced.shutdown().await;
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Forward every connection on `listener` to the shared PostgreSQL.
async fn forward_to_postgres(listener: tokio::net::TcpListener) {
    let pg_port = harness::postgres().port;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// Kills the child when the test ends, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_upstream_and_keeps_the_role_out_of_login_refusals() {
    use std::io::Read as _;
    let upstream_port = free_port();
    let listen_port = free_port();
    let wrong_password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong_password.path(), "not-the-password").unwrap();
    let text = harness::proxy_config_text(&ProxyOptions {
        upstream: Some(format!(
            "[upstream]\nhost = \"127.0.0.1\"\nport = {upstream_port}\nconnect_timeout = \"1s\"\n"
        )),
        extra_toml: format!(
            "[services.broken]\nupstream_user = \"{}\"\nupstream_password = {{ file = {:?} }}\nunrestricted = true\n",
            harness::MD5_ROLE,
            wrong_password.path()
        ),
        ..ProxyOptions::default()
    })
    .replacen(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{listen_port}\""),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgward.toml");
    std::fs::write(&config, text).unwrap();
    let stderr_file = dir.path().join("stderr.log");
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .spawn()
            .unwrap(),
    );
    // Upstream is down: pgward waits, it does not exit.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(child.0.try_wait().unwrap().is_none(), "pgward exited");
    let log = std::fs::read_to_string(&stderr_file).unwrap();
    assert!(
        log.contains("upstream not reachable at start; retrying"),
        "{log}"
    );
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", listen_port))
        .await
        .is_err());

    // Upstream comes up: pgward binds and serves.
    let upstream = tokio::net::TcpListener::bind(("127.0.0.1", upstream_port))
        .await
        .unwrap();
    tokio::spawn(forward_to_postgres(upstream));
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(listen_port)
        .user("app")
        .password(harness::token("app", serde_json::json!({})))
        .dbname("postgres");
    let mut connected = None;
    for _ in 0..100 {
        if let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            connected = Some(client);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let client = connected.expect("pgward serves once upstream is up");
    client.simple_query("select 1").await.unwrap();

    // A refused upstream login: the client learns it was refused, not as which role.
    let error = config
        .user("broken")
        .password(harness::token("broken", serde_json::json!({})))
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("login refused");
    let db_error = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "28000");
    assert!(
        !db_error.message().contains(harness::MD5_ROLE),
        "{db_error:?}"
    );
    assert!(
        db_error.message().contains("refused the login"),
        "{db_error:?}"
    );
    // pgward's log has the server's reason and the role.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut log = String::new();
    std::fs::File::open(&stderr_file)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("upstream server refused pgward's login")
            && log.contains("password authentication failed for user")
            && log.contains(harness::MD5_ROLE)
            && log.contains("28P01"),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "ANSI colours in a log file: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decisions_are_counted_per_service() {
    let database = harness::fresh_plaintext_demo("ops_decisions").await;
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n{}",
            harness::superuser_service("billing")
        ),
        ..ProxyOptions::default()
    })
    .await;
    let mut config = proxy.client_config("billing", &database);
    config.password(harness::token(
        "billing",
        serde_json::json!({"tenant_id": 1}),
    ));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .simple_query("select name from customers")
        .await
        .unwrap();
    assert!(client.simple_query("select * from tenants").await.is_err());
    let page = harness::http_get(proxy.admin.unwrap(), "/metrics").await;
    let value = |decision: &str| -> u64 {
        let series = format!(
            "pgward_service_statements_total{{service=\"billing\",decision=\"{decision}\"}} "
        );
        page.lines()
            .find_map(|l| l.strip_prefix(series.as_str()).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("{series} not in {page}"))
    };
    assert_eq!(value("rewritten"), 1, "{page}");
    assert_eq!(value("refused"), 1, "{page}");
    proxy.shutdown().await;
}
