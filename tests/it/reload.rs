//! SIGHUP on a running `pgward serve`: the listen certificate and key are re-read, and a
//! configuration file that does not load is rejected as a whole (nothing reloaded).

use std::process::Command;
use std::time::Duration;

use crate::harness::{self, ProxyOptions};

fn self_signed(common_name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The subject of the certificate pgward presents now.
fn presented_subject(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
        .to_string()
}

fn sighup(child: &std::process::Child) {
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(700));
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `pgward [global_args] serve` on a free port of 127.0.0.1 with `text` as its
/// configuration file (in `dir`); returns the process, its port and the file.
fn serve(
    dir: &std::path::Path,
    text: &str,
    global_args: &[&str],
) -> (Child, u16, std::path::PathBuf) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let text = text.replacen(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{port}\""),
        1,
    );
    let config = dir.join("pgward.toml");
    std::fs::write(&config, text).unwrap();
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_pgward"))
            .args(global_args)
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    (child, port, config)
}

#[test]
fn sighup_reloads_the_certificate_and_rejects_a_bad_file_as_a_whole() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.crt");
    let key = dir.path().join("server.key");
    let (first_cert, first_key) = self_signed("first.example");
    std::fs::write(&cert, first_cert).unwrap();
    std::fs::write(&key, first_key).unwrap();
    let fx = harness::fixtures();
    let text = harness::proxy_config_text(&ProxyOptions::default())
        .replace(&format!("{:?}", fx.cert_file), &format!("{cert:?}"))
        .replace(&format!("{:?}", fx.key_file), &format!("{key:?}"));
    let (child, port, config) = serve(dir.path(), &text, &[]);
    // As written, with its port: the steps below rewrite it.
    let text = std::fs::read_to_string(&config).unwrap();
    let mut subject = String::new();
    for _ in 0..100 {
        subject = presented_subject(port);
        if !subject.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(subject.contains("first.example"), "{subject:?}");

    // A renewed certificate in the same files: served after SIGHUP, without a restart.
    let (second_cert, second_key) = self_signed("second.example");
    std::fs::write(&cert, second_cert).unwrap();
    std::fs::write(&key, second_key).unwrap();
    sighup(&child.0);
    assert!(presented_subject(port).contains("second.example"));

    // A broken configuration file: nothing is reloaded, not even the valid new certificate.
    let (third_cert, third_key) = self_signed("third.example");
    std::fs::write(&cert, &third_cert).unwrap();
    std::fs::write(&key, &third_key).unwrap();
    std::fs::write(&config, format!("{text}\n[listen]\nbroken = true\n")).unwrap();
    sighup(&child.0);
    assert!(presented_subject(port).contains("second.example"));

    // A key that does not match its certificate: the previous pair stays.
    std::fs::write(&config, &text).unwrap();
    let (_, unrelated_key) = self_signed("unrelated.example");
    std::fs::write(&key, unrelated_key).unwrap();
    sighup(&child.0);
    assert!(presented_subject(port).contains("second.example"));

    // Fixed again: picked up.
    std::fs::write(&key, third_key).unwrap();
    sighup(&child.0);
    assert!(presented_subject(port).contains("third.example"));
}

/// Connect through pgward on `port` as `app` with a token signed by `secret`.
fn connects_with(port: u16, secret: &[u8]) -> bool {
    let now = harness::now_secs();
    let claims = serde_json::json!({
        "sub": "app", "aud": "pgward-tests", "iat": now, "exp": now + 300,
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("app")
            .password(token)
            .dbname("postgres");
        // A proxy that accepts and never answers would hang the test.
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            config.connect(tokio_postgres::NoTls),
        );
        matches!(connected.await, Ok(Ok(_)))
    })
}

#[test]
fn sighup_reloads_the_token_keys() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.secret");
    let first = harness::fixtures().secret.clone();
    std::fs::write(&secret_file, &first).unwrap();
    let text = harness::proxy_config_text(&ProxyOptions::default()).replace(
        &format!("{:?}", harness::fixtures().secret_file),
        &format!("{secret_file:?}"),
    );
    let (child, port, _) = serve(dir.path(), &text, &[]);
    let mut up = false;
    for _ in 0..100 {
        if connects_with(port, &first) {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up, "pgward accepts the first key");
    let second = b"a-rotated-secret-of-at-least-32-bytes!".to_vec();
    std::fs::write(&secret_file, &second).unwrap();
    sighup(&child.0);
    assert!(connects_with(port, &second), "the new key is accepted");
    assert!(!connects_with(port, &first), "the old key is not");
}

#[test]
fn a_configuration_file_that_does_not_answer_holds_the_reload_not_the_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let text = harness::proxy_config_text(&ProxyOptions::default());
    // One worker thread: a reload blocking it would hold every session.
    let (child, port, config) = serve(dir.path(), &text, &["--worker-threads", "1"]);
    let secret = harness::fixtures().secret.clone();
    let up = (0..100).any(|_| {
        connects_with(port, &secret) || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(up, "pgward serves");
    // The file becomes one whose read never answers, as on a stalled disk; SIGHUP reads it.
    std::fs::remove_file(&config).unwrap();
    let stalled = harness::StalledFile::at(&config);
    let started = std::time::Instant::now();
    sighup(&child.0);
    assert!(connects_with(port, &secret), "a login after the SIGHUP");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "sessions waited {:?} behind a reload stuck on its file",
        started.elapsed()
    );
    drop(stalled);
}
