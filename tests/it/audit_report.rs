//! `pgward audit report` as an auditor opens it: a log made by real traffic through the proxy
//! (allowed statements, policy refusals, a failed login), rendered to HTML by the binary and
//! loaded in a real headless browser (Debian's chromium). A second test measures what the
//! browser laid out (chart geometry, console, resources fetched) with a probe script.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

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
    harness::pgward_cli([
        OsStr::new("audit"),
        OsStr::new("report"),
        OsStr::new("--since"),
        OsStr::new("1h"),
        OsStr::new("--out"),
        page.as_os_str(),
        log.as_os_str(),
    ]);
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

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .filter_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .next()
}

/// Appended to a copy of the report: measures what the browser actually laid out, so the
/// assertions see rendered geometry rather than the HTML text we wrote.
const PROBE: &str = r#"<script>
(function () {
  const svgs = Array.from(document.querySelectorAll('svg')).map(s => {
    const r = s.getBoundingClientRect();
    return {
      section: (s.closest('section') || {}).id || '',
      width: r.width, height: r.height,
      polylines: Array.from(s.querySelectorAll('polyline')).map(p => p.points.numberOfItems),
      bars: Array.from(s.querySelectorAll('rect')).filter(b => b.getBBox().width > 0).length,
    };
  });
  const rows = sel => Array.from(document.querySelectorAll(sel + ' tbody tr'))
    .map(tr => Array.from(tr.cells).map(td => td.textContent));
  const external = Array.from(document.querySelectorAll('[src],[href]'))
    .map(e => e.getAttribute('src') || e.getAttribute('href'));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({
    svgs, external,
    refusalsByRule: rows('#refusals table:first-of-type'),
    recentRefusals: rows('#refusals table:last-of-type'),
    errors: rows('#errors'),
    summary: Array.from(document.querySelectorAll('#summary .card')).map(c => c.textContent),
    activityLegend: Array.from(document.querySelectorAll('#activity svg text')).map(t => t.textContent),
    resources: performance.getEntriesByType('resource').map(e => e.name),
  });
  document.body.appendChild(pre);
})();
</script>"#;

/// Loads `page` in headless chromium; returns (DOM after scripts ran, browser stderr).
fn render(browser: &Path, page: &Path) -> (String, String) {
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn probe_of(dom: &str) -> Value {
    let start = dom
        .find("<pre id=\"probe\">")
        .expect("probe script did not run")
        + 16;
    let end = start + dom[start..].find("</pre>").unwrap();
    let text = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn report_renders_in_headless_chromium_with_charts_and_refusals() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED report_renders_in_headless_chromium: no chromium on PATH (scripts/test.sh installs it with apt-get)");
        return;
    };
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditreport", true).await;
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "[audit]\ndir = {:?}\ncheckpoint_interval = \"1s\"\n\
             [policy]\ndir = {:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n\n\
             [services.support]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n",
            log.path().display().to_string(),
            policies.display().to_string()
        ),
        ..ProxyOptions::default()
    })
    .await;

    // Unrestricted service: a little activity of each kind.
    let app = proxy.connect("app", &database).await;
    for i in 0..5 {
        app.query("SELECT $1::int + 1", &[&i]).await.unwrap();
    }
    app.simple_query("SELECT 1/0").await.unwrap_err();
    // Policy-bound service: allowed reads and one refusal.
    let mut config = proxy.client_config("support", &database);
    config.password(harness::token("support", json!({"tenant_id": 1})));
    let (support, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        support
            .query("SELECT name FROM customers", &[])
            .await
            .unwrap();
    }
    support
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    drop((app, support));
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let out_dir = tempfile::tempdir().unwrap();
    let report = out_dir.path().join("report.html");
    let status = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["audit", "report", "--since", "1h", "--out"])
        .arg(&report)
        .arg(log.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let html = std::fs::read_to_string(&report).unwrap();
    let probed = out_dir.path().join("probed.html");
    std::fs::write(&probed, html.replace("</body>", &format!("{PROBE}</body>"))).unwrap();

    // The report itself, untouched: no console messages at all (no errors, no CSP or
    // blocked-resource complaints).
    let (_, stderr) = render(&browser, &report);
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(console.is_empty(), "browser console: {console:#?}");

    let (dom, stderr) = render(&browser, &probed);
    let console: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(console.is_empty(), "browser console: {console:#?}");
    let p = probe_of(&dom);

    // Self-contained: no references to anything and nothing fetched.
    assert_eq!(p["external"], json!([]), "{p:#}");
    assert_eq!(p["resources"], json!([]), "{p:#}");

    // Activity chart: laid out at a real size, one line per service, with both services in
    // its legend.
    let svgs = p["svgs"].as_array().unwrap();
    let activity: Vec<&Value> = svgs.iter().filter(|s| s["section"] == "activity").collect();
    assert_eq!(activity.len(), 1, "{p:#}");
    assert!(activity[0]["width"].as_f64().unwrap() > 300.0, "{p:#}");
    assert!(activity[0]["height"].as_f64().unwrap() > 100.0, "{p:#}");
    let lines = activity[0]["polylines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "one line per service: {p:#}");
    assert!(lines.iter().all(|n| n.as_u64().unwrap() >= 1), "{p:#}");
    let legend = p["activityLegend"].to_string();
    assert!(
        legend.contains("\"app\"") && legend.contains("\"support\""),
        "{legend}"
    );

    // Refusals: a bar for the refusing service, and the table names the statement and rule.
    let refusal_bars: Vec<&Value> = svgs.iter().filter(|s| s["section"] == "refusals").collect();
    assert_eq!(refusal_bars.len(), 1, "{p:#}");
    assert_eq!(refusal_bars[0]["bars"], 1, "{p:#}");
    let by_rule = p["refusalsByRule"].as_array().unwrap();
    assert_eq!(by_rule.len(), 1, "{p:#}");
    assert_eq!(by_rule[0][0], "support", "{p:#}");
    assert!(
        by_rule[0][1].as_str().unwrap().contains("support.toml"),
        "{p:#}"
    );
    assert_eq!(by_rule[0][3], "1", "{p:#}");
    let rows = p["recentRefusals"].as_array().unwrap();
    let recent = rows
        .iter()
        .find(|r| r[2].as_str().is_some_and(|s| s.contains("ssn")))
        .unwrap_or_else(|| panic!("refused statement not listed: {p:#}"));
    assert_eq!(recent[1], "support", "{recent}");
    assert!(
        recent[3].as_str().unwrap().contains("support.toml"),
        "rule: {recent}"
    );
    assert!(
        !rows.iter().any(|r| r.to_string().contains("SELECT name")),
        "allowed statements are not refusals: {p:#}"
    );

    // Summary cards count what happened: 10 statements, 1 refused, 2 sessions; the
    // division by zero is listed by SQLSTATE.
    assert_eq!(p["errors"], json!([["22012", "1"]]), "{p:#}");
    let summary = p["summary"].to_string();
    for card in ["10statements", "1refused", "2connections"] {
        assert!(summary.contains(card), "{card} missing from {summary}");
    }
}
