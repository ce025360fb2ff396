//! The example production configurations and systemd unit in `examples/`: each configuration
//! loads; the minimal one, pointed at the test server, passes `pgward check` and is served
//! under the systemd readiness protocol; the unit passes `systemd-analyze verify` where that
//! tool exists.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn every_example_configuration_loads_and_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = pgward::config::Config::from_file(&path) {
                panic!("{}: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "example configurations found: {checked}");
}

/// `examples/minimal.toml` with its paths and addresses replaced by the test fixtures'.
fn minimal_for_tests(audit_dir: &Path) -> String {
    let fx = harness::fixtures();
    let pg = harness::postgres();
    let text = std::fs::read_to_string(examples().join("minimal.toml")).unwrap();
    let replaced = text
        .replace("0.0.0.0:6432", "127.0.0.1:0")
        .replace("127.0.0.1:9930", "127.0.0.1:0")
        .replace(
            "/etc/pgward/tls/server.crt",
            &fx.cert_file.display().to_string(),
        )
        .replace(
            "/etc/pgward/tls/server.key",
            &fx.key_file.display().to_string(),
        )
        .replace(
            "/etc/pgward/secrets/token.hs256",
            &fx.secret_file.display().to_string(),
        )
        .replace("\"/var/run/postgresql\"", "\"127.0.0.1\"")
        .replace("port = 5432", &format!("port = {}", pg.port))
        .replace(
            "upstream_user = \"reporting\"",
            &format!("upstream_user = \"{}\"", harness::TRUST_ROLE),
        )
        .replace("/var/lib/pgward/audit", &audit_dir.display().to_string());
    assert!(
        !replaced.contains("/etc/") && !replaced.contains("/var/"),
        "{replaced}"
    );
    replaced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimal_example_passes_check_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgward.toml");
    std::fs::write(&path, minimal_for_tests(&dir.path().join("audit"))).unwrap();
    let report = pgward::cli::check::check(&path, None).await;
    assert_eq!(report.failures(), 0, "{}", report.render());
}

#[test]
fn serve_speaks_the_systemd_readiness_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgward.toml");
    std::fs::write(&path, minimal_for_tests(&dir.path().join("audit"))).unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next();
    let ready_again = next();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = next();
    let status = child.wait().unwrap();
    assert_eq!(
        [ready.as_str(), &reloading, &ready_again, &stopping],
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    );
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_systemd_unit_verifies_where_systemd_analyze_exists() {
    let Ok(probe) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    if !probe.status.success() {
        eprintln!("systemd-analyze unusable here: unit not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(examples().join("pgward.service"))
        .unwrap()
        .replace("/usr/local/bin/pgward", env!("CARGO_BIN_EXE_pgward"));
    assert!(unit.contains("Type=notify"));
    let path = dir.path().join("pgward.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}
