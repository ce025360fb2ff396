//! Operations: `/readyz` distinct from `/healthz`, and the per-service, build and process series
//! of `/metrics`.

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
async fn metrics_carry_per_service_decisions_latency_build_and_process_series() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let client = proxy.connect("app", "postgres").await;
    client.simple_query("select 1").await.unwrap();
    client.query("select $1::int", &[&1i32]).await.unwrap();
    let page = harness::http_get(proxy.admin.unwrap(), "/metrics").await;
    let value = |series: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} not in {page}"))
    };
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
