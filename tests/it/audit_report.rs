//! `pgward audit report` as an auditor opens it: a log made by real traffic through the proxy
//! (allowed statements, policy refusals, a failed login), rendered to HTML by the binary and
//! loaded in a real headless browser (Debian's chromium).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{self, ProxyOptions};

/// Chromium's rendering of `page`: the DOM after load, and a screenshot's size in bytes.
fn render_in_chromium(page: &Path, shot: &Path) -> (String, u64) {
    let url = format!("file://{}", page.display());
    let common = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1280,2400",
    ];
    let dom = Command::new("chromium")
        .args(common)
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium must be installed (scripts/test.sh installs it)");
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let screenshot = Command::new("chromium")
        .args(common)
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(screenshot.status.success());
    let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
    (String::from_utf8_lossy(&dom.stdout).into_owned(), size)
}

#[tokio::test]
async fn the_html_report_renders_in_a_real_browser_with_what_auditors_need() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("audit");
    let database = harness::fresh_database("report", true).await;
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "[audit]\ndir = {:?}\n\n[policy]\ndir = {:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n{}{}",
            log.display().to_string(),
            policies.display().to_string(),
            harness::superuser_service("support"),
            harness::superuser_service("billing"),
        ),
        ..ProxyOptions::default()
    })
    .await;
    for service in ["support", "billing"] {
        let mut config = proxy.client_config(service, &database);
        config.password(harness::token(service, json!({"tenant_id": 1})));
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..5 {
            client
                .query("SELECT name FROM customers", &[])
                .await
                .unwrap();
        }
        client
            .query("SELECT count(*) FROM invoices", &[])
            .await
            .unwrap();
        if service == "support" {
            client
                .query("SELECT ssn FROM customers", &[])
                .await
                .unwrap_err();
        }
    }
    let mut bad = proxy.client_config("billing", &database);
    bad.password("not-a-token");
    bad.connect(tokio_postgres::NoTls).await.err().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.shutdown().await;

    let page = work.path().join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["audit", "report", "--since", "1h", "--out"])
        .arg(&page)
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: nothing fetched from elsewhere (an auditor may open it offline).
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(external), "report loads {external}…");
    }

    let (dom, screenshot_bytes) = render_in_chromium(&page, &work.path().join("report.png"));
    // The browser built every section, with the data in it.
    for section in [
        "id=\"summary\"",
        "id=\"activity\"",
        "id=\"refusals\"",
        "id=\"top-statements\"",
        "id=\"auth-failures\"",
    ] {
        assert!(
            dom.contains(section),
            "{section} missing from the rendered page"
        );
    }
    let section = |id: &str| -> &str {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap_or(0);
        let end = dom[start..]
            .find("</section>")
            .map_or(dom.len(), |e| start + e);
        &dom[start..end]
    };
    assert!(
        section("refusals").contains("support.toml"),
        "the refusal's rule is shown"
    );
    assert!(
        section("refusals").contains("ssn"),
        "the refused statement is shown"
    );
    let activity = section("activity");
    assert!(
        activity.contains("support") && activity.contains("billing"),
        "activity per service"
    );
    assert!(
        section("auth-failures").contains("billing"),
        "the failed login is listed"
    );
    // Charts are real SVG with marks for the data, not empty frames.
    let svgs = dom.matches("<svg").count();
    assert!(svgs >= 2, "{svgs} charts");
    let marks = dom.matches("<rect").count()
        + dom.matches("<path").count()
        + dom.matches("<polyline").count();
    assert!(marks >= 4, "charts carry {marks} marks");
    // And it painted: a blank page compresses to a few KB.
    assert!(
        screenshot_bytes > 20_000,
        "screenshot is {screenshot_bytes} bytes"
    );
}
