//! Attacks on the audit log by someone with access to the pgward host, and operator
//! mistakes that used to look like tampering: each must now fail the way an auditor needs
//! (non-zero exit and a message naming file, line and sequence) or be refused up front.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, ProxyOptions, TestProxy};

fn audit_toml(dir: &Path, extra: &str) -> String {
    format!(
        "[audit]\ndir = {:?}\ncheckpoint_interval = \"1s\"\n{extra}\n",
        dir.display().to_string()
    )
}

async fn audited_proxy(dir: &Path, extra: &str) -> TestProxy {
    harness::start_proxy(ProxyOptions {
        extra_toml: audit_toml(dir, extra),
        ..ProxyOptions::default()
    })
    .await
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| (e.path(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Runs `pgward serve` on a config and waits (bounded) for it to exit by itself.
fn serve_until_exit(config_file: &Path, within: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["serve", "--config"])
        .arg(config_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > within {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "second pgward kept running on a locked audit directory: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn verify(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_second_pgward_on_the_same_directory_fails_fast_without_writing() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditlock", false).await;
    let proxy = audited_proxy(log.path(), "").await;
    let client = proxy.connect("app", &database).await;
    client.simple_query("SELECT 1").await.unwrap();

    // Same directory, its own (free) listen address: only the lock can stop it.
    let text = harness::proxy_config_text(&ProxyOptions {
        extra_toml: audit_toml(log.path(), ""),
        ..ProxyOptions::default()
    });
    let config_file = log.path().with_extension("second.toml");
    std::fs::write(&config_file, text).unwrap();
    let before = snapshot(log.path());
    let out = serve_until_exit(&config_file, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second pgward exited 0: {stderr}");
    assert!(
        stderr.contains("in use by another pgward"),
        "no clear message: {stderr}"
    );
    assert_eq!(
        snapshot(log.path()),
        before,
        "the second pgward wrote into the log"
    );

    client.simple_query("SELECT 2").await.unwrap();
    drop(client);
    proxy.shutdown().await;
    let out = verify(&[log.path().as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    #[cfg(unix)]
    for path in snapshot(log.path()).keys() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
    }
}
