//! Tests of the token verifier: algorithms, claims, key sources and their refresh.
use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use std::os::unix::fs::OpenOptionsExt;

const SECRET: &[u8] = b"unit-test-secret-that-is-32-bytes-long";

async fn verifier(extra: impl FnOnce(&mut AuthConfig)) -> (TokenVerifier, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let mut config = AuthConfig {
        hs256_secret_file: Some(secret),
        audience: vec!["pgward".into()],
        issuer: Some("issuer".into()),
        ..AuthConfig::default()
    };
    extra(&mut config);
    (TokenVerifier::new(config).await.unwrap(), dir)
}

fn hs(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn good() -> Value {
    let now = now_secs();
    json!({"sub": "billing", "aud": "pgward", "iss": "issuer", "iat": now, "exp": now + 300, "jti": "j1", "tenant_id": 7})
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.into(), value);
    v
}

#[tokio::test]
async fn accepts_a_good_token_and_keeps_its_claims() {
    let (v, _dir) = verifier(|_| {}).await;
    let identity = v.verify(&hs(good()), "billing", None).await.unwrap();
    assert_eq!(identity.service, "billing");
    assert_eq!(identity.token_id.as_deref(), Some("j1"));
    assert_eq!(identity.claims["tenant_id"], json!(7));
}

#[tokio::test]
async fn each_failure_has_its_reason_and_never_echoes_the_token() {
    let (v, _dir) = verifier(|_| {}).await;
    let now = now_secs();
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &good(),
        &EncodingKey::from_secret(b"another-secret-that-is-32-bytes!!"),
    )
    .unwrap();
    let cases = [
        (
            hs(with(
                with(good(), "exp", json!(now - 120)),
                "iat",
                json!(now - 200),
            )),
            "billing",
            "expired",
        ),
        (
            hs(with(good(), "nbf", json!(now + 600))),
            "billing",
            "not_yet_valid",
        ),
        (
            hs(with(good(), "aud", json!("elsewhere"))),
            "billing",
            "wrong_audience",
        ),
        (
            hs(with(good(), "iss", json!("mallory"))),
            "billing",
            "wrong_issuer",
        ),
        (forged, "billing", "bad_signature"),
        (
            hs(with(good(), "exp", json!(now + 86_400))),
            "billing",
            "lifetime_too_long",
        ),
        // An `iat` in the future cannot shorten the lifetime: what counts is from now on.
        (
            hs(with(
                with(good(), "exp", json!(now + 100 * 365 * 86_400)),
                "iat",
                json!(now + 100 * 365 * 86_400 - 60),
            )),
            "billing",
            "lifetime_too_long",
        ),
        (
            hs(with(
                with(good(), "exp", json!(i64::MAX)),
                "iat",
                json!(i64::MIN),
            )),
            "billing",
            "lifetime_too_long",
        ),
        (hs(good()), "support", "identity_mismatch"),
        ("not.a.jwt".to_string(), "billing", "malformed"),
    ];
    for (token, user, reason) in cases {
        let err = v.verify(&token, user, None).await.unwrap_err();
        assert_eq!(err.reason(), reason, "{err:?}");
        assert!(!err.client_message().contains(&token));
        assert!(err.sqlstate().starts_with("28"));
    }
    let mut no_exp = good();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        v.verify(&hs(no_exp), "billing", None)
            .await
            .unwrap_err()
            .reason(),
        "missing_expiry"
    );
}

#[tokio::test]
async fn algorithm_comes_from_the_key_not_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let key = super::super::DevSigningKey::load_or_create(dir.path()).unwrap();
    let config = AuthConfig {
        jwks_file: Some(super::super::DevSigningKey::jwks_path(dir.path())),
        ..AuthConfig::default()
    };
    let v = TokenVerifier::new(config).await.unwrap();
    let token = key
        .mint("billing", &Map::new(), Duration::from_secs(60), None, None)
        .unwrap();
    assert!(v.verify(&token, "billing", None).await.is_ok());
    // HS256 with no HMAC key configured: refused, whatever secret was used.
    let hs_token = hs(good());
    assert_eq!(
        v.verify(&hs_token, "billing", None)
            .await
            .unwrap_err()
            .reason(),
        "unsupported_algorithm"
    );
}

#[tokio::test]
async fn unknown_kid_rereads_the_jwks_file() {
    let dir = tempfile::tempdir().unwrap();
    let old = super::super::DevSigningKey::load_or_create(&dir.path().join("old")).unwrap();
    let new = super::super::DevSigningKey::load_or_create(&dir.path().join("new")).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::copy(
        super::super::DevSigningKey::jwks_path(&dir.path().join("old")),
        &jwks,
    )
    .unwrap();
    let config = AuthConfig {
        jwks_file: Some(jwks.clone()),
        jwks_refresh_min_interval: Duration::ZERO,
        ..AuthConfig::default()
    };
    let v = TokenVerifier::new(config).await.unwrap();
    let token = new
        .mint("billing", &Map::new(), Duration::from_secs(60), None, None)
        .unwrap();
    assert_eq!(
        v.verify(&token, "billing", None)
            .await
            .unwrap_err()
            .reason(),
        "unknown_key"
    );
    std::fs::copy(
        super::super::DevSigningKey::jwks_path(&dir.path().join("new")),
        &jwks,
    )
    .unwrap();
    assert!(
        v.verify(&token, "billing", None).await.is_ok(),
        "rotated key picked up"
    );
    let old_token = old
        .mint("billing", &Map::new(), Duration::from_secs(60), None, None)
        .unwrap();
    assert!(v.verify(&old_token, "billing", None).await.is_err());
}

#[tokio::test]
async fn a_jwks_file_that_does_not_answer_costs_the_unknown_kid_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    super::super::DevSigningKey::load_or_create(&dir.path().join("old")).unwrap();
    let new = super::super::DevSigningKey::load_or_create(&dir.path().join("new")).unwrap();
    let jwks = dir.path().join("jwks.json");
    let old_jwks = super::super::DevSigningKey::jwks_path(&dir.path().join("old"));
    std::fs::copy(old_jwks, &jwks).unwrap();
    let config = AuthConfig {
        jwks_file: Some(jwks.clone()),
        jwks_refresh_min_interval: Duration::ZERO,
        ..AuthConfig::default()
    };
    let v = TokenVerifier::new(config).await.unwrap();
    // The file becomes a FIFO nobody writes: reading it blocks, as on a stalled disk.
    std::fs::remove_file(&jwks).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&jwks).status();
    assert!(made.unwrap().success());
    let token = new
        .mint("billing", &Map::new(), Duration::from_secs(60), None, None)
        .unwrap();
    // The blocked read ends when a writer opens the FIFO and closes it: once the login
    // is answered, or after 10 s if it never is (the test then fails instead of hanging).
    let (answered, wait) = std::sync::mpsc::channel::<()>();
    let fifo = jwks.clone();
    let unblock = std::thread::spawn(move || {
        let _ = wait.recv_timeout(Duration::from_secs(10));
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        drop(writer);
    });
    let started = std::time::Instant::now();
    let verified = v.verify(&token, "billing", None).await;
    let waited = started.elapsed();
    // The first read still waits on its thread: the next refresh is refused at once rather
    // than leaving a second thread behind it.
    let again = std::time::Instant::now();
    let verified_again = v.verify(&token, "billing", None).await;
    let waited_again = again.elapsed();
    drop(answered);
    unblock.join().unwrap();
    assert_eq!(verified.unwrap_err().reason(), "unknown_key");
    assert!(
        waited < KEY_FILES_TIMEOUT + Duration::from_secs(1),
        "the login waited {waited:?} for the stalled key file"
    );
    assert_eq!(verified_again.unwrap_err().reason(), "unknown_key");
    assert!(
        waited_again < Duration::from_millis(500),
        "the second login waited {waited_again:?} behind the read still blocked"
    );
}

/// Serves `body()` over HTTP on loopback and counts requests.
async fn jwks_server(
    body: std::sync::Arc<parking_lot::Mutex<String>>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 2048];
            let _ = stream.read(&mut buf).await;
            let text = body.lock().clone();
            let reply = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    });
    (url, hits)
}

#[tokio::test]
async fn jwks_url_is_fetched_and_refreshes_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let old = super::super::DevSigningKey::load_or_create(&dir.path().join("old")).unwrap();
    let new = super::super::DevSigningKey::load_or_create(&dir.path().join("new")).unwrap();
    let jwks_of = |name: &str| {
        std::fs::read_to_string(super::super::DevSigningKey::jwks_path(
            &dir.path().join(name),
        ))
        .unwrap()
    };
    let body = std::sync::Arc::new(parking_lot::Mutex::new(jwks_of("old")));
    let (url, hits) = jwks_server(body.clone()).await;
    let config = AuthConfig {
        jwks_url: Some(url),
        jwks_refresh_min_interval: Duration::from_secs(3600),
        ..AuthConfig::default()
    };
    let v = TokenVerifier::new(config).await.unwrap();
    let claims = Map::new();
    let good = old
        .mint("billing", &claims, Duration::from_secs(60), None, None)
        .unwrap();
    assert!(v.verify(&good, "billing", None).await.is_ok());
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A storm of tokens with an unknown kid: no refetch inside the interval.
    *body.lock() = jwks_of("new");
    let unknown = new
        .mint("billing", &claims, Duration::from_secs(60), None, None)
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            v.verify(&unknown, "billing", None)
                .await
                .unwrap_err()
                .reason(),
            "unknown_key"
        );
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "rate limited"
    );
    // SIGHUP reload fetches again and picks up the rotated key.
    v.reload().await.unwrap();
    assert!(v.verify(&unknown, "billing", None).await.is_ok());
    // Plain http to a non-loopback host is refused at setup.
    let remote = AuthConfig {
        jwks_url: Some("http://keys.example.com/jwks.json".into()),
        ..AuthConfig::default()
    };
    assert!(TokenVerifier::new(remote).await.is_err());
}

#[tokio::test]
async fn client_certificate_rules() {
    let (v, _dir) = verifier(|c| c.cert_identity_must_match = true).await;
    assert_eq!(
        v.verify(&hs(good()), "billing", None)
            .await
            .unwrap_err()
            .reason(),
        "client_cert_required"
    );
    assert!(v
        .verify(&hs(good()), "billing", Some("spiffe://corp/ns/billing"))
        .await
        .is_ok());
    assert_eq!(
        v.verify(&hs(good()), "billing", Some("support"))
            .await
            .unwrap_err()
            .reason(),
        "client_cert_mismatch"
    );
    let cert = rcgen::generate_simple_self_signed(vec!["billing.example".into()]).unwrap();
    assert!(cert_identity_from_der(cert.cert.der()).is_some());
    assert!(cert_identity_from_der(b"garbage").is_none());
}
