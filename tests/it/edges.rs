//! TLS, hostile input, limits, shutdown and the admin endpoint.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, msg, ProxyOptions};

fn root_store() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pgward::tls::load_certs(&harness::fixtures().cert_file).unwrap() {
        roots.add(cert).unwrap();
    }
    roots
}

fn client_tls(alpn: bool) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(root_store())
    .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    Arc::new(config)
}

fn db_code(err: &tokio_postgres::Error) -> Option<String> {
    err.as_db_error().map(|e| e.code().code().to_string())
}

/// A session that must keep working while another connection misbehaves.
async fn assert_alive(client: &tokio_postgres::Client) {
    let row = client
        .query_one("select 40 + 2", &[])
        .await
        .expect("bystander session still works");
    assert_eq!(row.get::<_, i32>(0), 42);
}

#[tokio::test]
async fn tls_is_required_unless_plaintext_loopback_is_allowed() {
    let proxy = harness::start_proxy(ProxyOptions {
        allow_plaintext: false,
        ..ProxyOptions::default()
    })
    .await;
    let err = proxy
        .client_config("app", "postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("plaintext refused");
    assert_eq!(db_code(&err).as_deref(), Some("28000"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("TLS is required"));

    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*client_tls(false)).clone());
    let (client, conn) = proxy
        .client_config("app", "postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(tls)
        .await
        .expect("TLS connection");
    tokio::spawn(conn);
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    // TLS is between client and pgward; the upstream hop here is a plain loopback socket.
    assert!(!row.get::<_, bool>(0));
    assert_alive(&client).await;
}

async fn direct_tls_startup(proxy: &harness::TestProxy, alpn: bool) -> Vec<u8> {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_tls(alpn));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("direct TLS handshake");
    let mut startup = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "app"), ("database", "postgres")],
        &mut startup,
    )
    .unwrap();
    tls.write_all(&startup).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut reply))
        .await
        .unwrap()
        .unwrap_or(0);
    reply.truncate(n);
    reply
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let with_alpn = direct_tls_startup(&proxy, true).await;
    assert_eq!(
        &with_alpn[..9],
        &[b'R', 0, 0, 0, 8, 0, 0, 0, 3],
        "asks for the token"
    );
    let without = direct_tls_startup(&proxy, false).await;
    assert_eq!(without.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&without).contains("ALPN"));
}

#[tokio::test]
async fn bytes_after_ssl_request_are_rejected_not_parsed() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut packet = vec![0, 0, 0, 8, 4, 210, 22, 47];
    packet.extend_from_slice(&harness::msg::query("select 'smuggled'"));
    tcp.write_all(&packet).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    assert_eq!(reply.first(), Some(&b'E'), "an error, not 'S': {reply:?}");
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));
}

#[tokio::test]
async fn hostile_input_gets_an_error_for_that_connection_only() {
    let proxy = harness::start_proxy(ProxyOptions {
        extra_listen: "max_message_bytes = 65536".into(),
        ..ProxyOptions::default()
    })
    .await;
    let bystander = proxy.connect("app", "postgres").await;

    // Startup packet with an absurd length: refused before allocating.
    let mut raw = harness::raw_tcp(proxy.addr).await;
    raw.send(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    let reply = raw.recv().await.expect("error response");
    assert_eq!(reply.tag(), b'E');
    assert_alive(&bystander).await;

    // Random bytes instead of a startup packet.
    let mut raw = harness::raw_tcp(proxy.addr).await;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    raw.send(&noise).await;
    let _ = raw.recv().await;
    assert_alive(&bystander).await;

    // After authentication: an oversized message, a negative length, garbage, a truncated message.
    for bad in [
        msg::query(&"x".repeat(100_000)).to_vec(),
        vec![b'Q', 0xff, 0xff, 0xff, 0xf0],
        b"\x00\x00\x00\x00\x02garbage".to_vec(),
    ] {
        let mut session = harness::raw_proxied(&proxy, "postgres").await;
        session.send(&bad).await;
        let reply = session.recv().await.expect("an error before the close");
        assert_eq!(
            reply.tag(),
            b'E',
            "{:?}",
            String::from_utf8_lossy(reply.body())
        );
        assert!(String::from_utf8_lossy(reply.body()).contains("08P01"));
        assert!(
            session.recv().await.is_none(),
            "connection closed after the error"
        );
        assert_alive(&bystander).await;
    }
    let mut session = harness::raw_proxied(&proxy, "postgres").await;
    session.send(&msg::query("select 1")[..6]).await;
    drop(session);
    assert_alive(&bystander).await;
    assert!(
        proxy
            .metrics
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
}

#[tokio::test]
async fn too_many_connections_get_53300() {
    let proxy = harness::start_proxy(ProxyOptions {
        extra_listen: "max_client_connections = 2".into(),
        ..ProxyOptions::default()
    })
    .await;
    let a = proxy.connect("app", "postgres").await;
    let _b = proxy.connect("app", "postgres").await;
    let err = proxy
        .client_config("app", "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("third connection refused");
    assert_eq!(db_code(&err).as_deref(), Some("53300"));
    assert_alive(&a).await;
}

/// A flood of cancels carrying a session's own key: one is delivered at a time and the rest
/// are dropped at once, so they never pile up behind each other holding connection slots (they
/// once queued on the session's cancel gate until no one else could connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cancels_with_a_sessions_own_key_is_not_queued() {
    let proxy = harness::start_proxy(ProxyOptions {
        extra_listen: "max_client_connections = 200".into(),
        ..ProxyOptions::default()
    })
    .await;
    let victim = proxy.connect("app", "postgres").await;
    let token = victim.cancel_token();
    let flood = (0..150).map(|_| {
        let token = token.clone();
        tokio::spawn(async move {
            let _ = token.cancel_query(tokio_postgres::NoTls).await;
        })
    });
    futures_util::future::join_all(flood).await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let settled =
        || count(&proxy.metrics.cancels_forwarded) + count(&proxy.metrics.cancels_dropped);
    for _ in 0..100 {
        if settled() >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forwarded = count(&proxy.metrics.cancels_forwarded);
    let dropped = count(&proxy.metrics.cancels_dropped);
    // All at once, most find one in flight; queued, every one was forwarded in turn.
    assert!(
        dropped > 0 && forwarded < 150,
        "{forwarded} cancels forwarded one after another, {dropped} dropped"
    );
    assert_alive(&victim).await;
}

#[tokio::test]
async fn idle_sessions_are_closed_but_open_transactions_are_not() {
    let proxy = harness::start_proxy(ProxyOptions {
        extra_listen: "idle_timeout = \"300ms\"".into(),
        ..ProxyOptions::default()
    })
    .await;
    let mut idle = harness::raw_proxied(&proxy, "postgres").await;
    let mut in_tx = harness::raw_proxied(&proxy, "postgres").await;
    in_tx.send(&msg::query("begin")).await;
    in_tx.until_ready(1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let reply = idle.recv().await.expect("FATAL for the idle session");
    assert!(String::from_utf8_lossy(reply.body()).contains("57P05"));
    in_tx.send(&msg::query("commit")).await;
    let answer = in_tx.until_ready(1).await;
    assert_eq!(answer.last().map(|m| m.1.clone()), Some(b"I".to_vec()));
}

#[tokio::test]
async fn startup_must_finish_within_the_timeout() {
    let proxy = harness::start_proxy(ProxyOptions {
        extra_listen: "".into(),
        ..ProxyOptions::default()
    })
    .await;
    // The test config's startup_timeout is 5s; a silent client is dropped after it.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_eq!(proxy.metrics.auth_failures_for("startup_timeout"), 1);
}

#[tokio::test]
async fn graceful_shutdown_lets_running_statements_finish() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let addr = proxy.addr;
    let busy = proxy.connect("app", "postgres").await;
    let mut idle = harness::raw_proxied(&proxy, "postgres").await;
    let running = tokio::spawn(async move {
        busy.simple_query("select pg_sleep(1), 'finished'")
            .await
            .map(|_| busy)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shutdown = tokio::spawn(proxy.shutdown());
    let reply = idle.recv().await.expect("idle session told why it closes");
    assert!(String::from_utf8_lossy(reply.body()).contains("57P01"));
    let busy = running.await.unwrap().expect("running statement completed");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(
        busy.simple_query("select 1").await.is_err(),
        "session closed after its statement"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn admin_endpoint_serves_metrics_and_health() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let client = proxy.connect("app", "postgres").await;
    client.simple_query("select 1").await.unwrap();
    let bad = proxy
        .client_config("app", "postgres")
        .password("bad")
        .connect(tokio_postgres::NoTls)
        .await;
    assert!(bad.is_err());
    let admin = proxy.admin.expect("admin address");
    let health = harness::http_get(admin, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"));
    let metrics = harness::http_get(admin, "/metrics").await;
    assert!(metrics.contains("pgward_statements_total 1"), "{metrics}");
    assert!(metrics.contains("pgward_sessions_established_total 1"));
    assert!(metrics.contains("pgward_auth_failures_total{reason="));
    assert!(metrics.contains("pgward_request_duration_seconds_count 1"));
    assert!(harness::http_get(admin, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
}

async fn upstream_ssl_in_use(proxy: &harness::TestProxy) -> bool {
    let client = proxy.connect("app", "postgres").await;
    let row = client
        .query_one(
            "select coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn upstream_over_verified_tls_and_over_a_unix_socket() {
    let pg = harness::postgres();
    let verified = harness::start_proxy(ProxyOptions {
        upstream: Some(format!(
            "[upstream]\nhost = \"localhost\"\nport = {}\ntls = \"verify-full\"\ntls_ca_file = {:?}\n",
            pg.port, pg.tls_cert_file
        )),
        ..ProxyOptions::default()
    })
    .await;
    assert!(
        upstream_ssl_in_use(&verified).await,
        "upstream hop encrypted"
    );

    // A certificate that does not chain to the configured CA is refused.
    let wrong_ca = harness::start_proxy(ProxyOptions {
        upstream: Some(format!(
            "[upstream]\nhost = \"localhost\"\nport = {}\ntls = \"verify-full\"\ntls_ca_file = {:?}\n",
            pg.port,
            harness::fixtures().cert_file
        )),
        ..ProxyOptions::default()
    })
    .await;
    let err = wrong_ca
        .client_config("app", "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(db_code(&err).as_deref(), Some("08001"));

    let unix = harness::start_proxy(ProxyOptions {
        upstream: Some(format!(
            "[upstream]\nhost = {:?}\nport = {}\n",
            pg.socket_dir, pg.port
        )),
        ..ProxyOptions::default()
    })
    .await;
    let client = unix.connect("trustsvc", "postgres").await;
    let row = client
        .query_one("select inet_client_addr() is null", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "connected over the unix socket");
}

#[tokio::test]
async fn token_failures_are_refused_with_clear_messages_and_counted() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let now = harness::now_secs();
    let base =
        || serde_json::json!({"sub": "app", "aud": "pgward-tests", "iat": now, "exp": now + 300});
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &base(),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-configured-secret-at-all!!"),
    )
    .unwrap();
    let mut expired = base();
    expired["iat"] = (now - 600).into();
    expired["exp"] = (now - 120).into();
    let mut wrong_aud = base();
    wrong_aud["aud"] = "someone-else".into();
    let mut too_long = base();
    too_long["exp"] = (now + 86_400).into();
    let cases = [
        (
            "app",
            harness::sign(&expired),
            "28P01",
            "expired",
            "token expired",
        ),
        (
            "app",
            harness::sign(&wrong_aud),
            "28P01",
            "wrong_audience",
            "audience does not match",
        ),
        (
            "app",
            forged.clone(),
            "28P01",
            "bad_signature",
            "signature is invalid",
        ),
        (
            "app",
            harness::sign(&too_long),
            "28P01",
            "lifetime_too_long",
            "exceeds the allowed maximum",
        ),
        (
            "other",
            harness::sign(&base()),
            "28000",
            "identity_mismatch",
            "does not match the token's service",
        ),
        (
            "app",
            "garbage".to_string(),
            "28P01",
            "malformed",
            "not a valid token",
        ),
    ];
    for (user, token, code, reason, text) in cases {
        let err = proxy
            .client_config(user, "postgres")
            .password(token.as_str())
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        let db = err.as_db_error().expect("server error");
        assert_eq!(db.code().code(), code, "{reason}");
        assert!(db.message().contains(text), "{reason}: {}", db.message());
        assert!(!db.message().contains(&token), "token never echoed");
        assert_eq!(
            proxy.metrics.auth_failures_for(reason),
            1,
            "{reason} counted"
        );
    }
    let unknown = proxy
        .client_config("nobody", "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(db_code(&unknown).as_deref(), Some("28000"));
}

/// A CA and a client certificate for `spiffe://pgward.test/svc/<service>`, as PEM files.
fn client_pki(
    dir: &std::path::Path,
    service: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pgward test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::Ia5String::try_from(format!("spiffe://pgward.test/svc/{service}")).unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&client_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, client_key.serialize_pem()).unwrap();
    paths
}

async fn connect_with_cert(
    proxy: &harness::TestProxy,
    service: &str,
    cert: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(root_store());
    let config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                pgward::tls::load_certs(cert).unwrap(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let (client, conn) = proxy
        .client_config(service, "postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect(tls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test]
async fn mutual_tls_binds_the_certificate_identity_to_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = client_pki(dir.path(), "app");
    let proxy = harness::start_proxy(ProxyOptions {
        allow_plaintext: false,
        extra_listen: format!("client_ca_file = {ca:?}"),
        extra_auth: "cert_identity_must_match = true".into(),
        ..ProxyOptions::default()
    })
    .await;
    let client = connect_with_cert(&proxy, "app", Some((&cert, &key)))
        .await
        .expect("certificate matches service");
    assert_alive(&client).await;
    let Err(err) = connect_with_cert(&proxy, "app", None).await else {
        panic!("no certificate: expected a refusal");
    };
    assert_eq!(db_code(&err).as_deref(), Some("28000"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("client certificate is required"));
    let Err(err) = connect_with_cert(&proxy, "other", Some((&cert, &key))).await else {
        panic!("wrong service: expected a refusal");
    };
    assert_eq!(db_code(&err).as_deref(), Some("28000"));
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("spiffe://pgward.test/svc/app"));
}

/// A session's prepared statements and portals are held by pgward too (each with its
/// analysis): past the cap a new name is refused with 54000, and the session stays usable.
#[tokio::test]
async fn a_session_cannot_grow_its_prepared_statements_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = harness::audited_proxy(dir.path(), "").await;
    let mut session = harness::raw_proxied(&proxy, "postgres").await;
    let limit = pgward::proxy::statements::MAX_STATEMENTS;
    let mut parts: Vec<_> = (0..limit)
        .map(|i| msg::parse(&format!("s{i}"), "SELECT 1"))
        .collect();
    parts.push(msg::sync());
    session.send(&msg::batch(&parts)).await;
    let replies = session.until_ready(1).await;
    assert_eq!(replies.iter().filter(|(t, _)| *t == b'1').count(), limit);
    session
        .send(&msg::batch(&[
            msg::parse("one_more", "SELECT 1"),
            msg::sync(),
        ]))
        .await;
    let replies = session.until_ready(1).await;
    let (_, error) = replies
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("the statement past the cap is refused");
    let text = String::from_utf8_lossy(error);
    assert!(
        text.contains("54000") && text.contains(&limit.to_string()),
        "{text}"
    );
    // The unnamed statement is always free; closing a named one makes room for another.
    session
        .send(&msg::batch(&[
            msg::parse("", "SELECT 7"),
            msg::close_statement("s1"),
            msg::parse("one_more", "SELECT 2"),
            msg::bind("", "one_more", &[], false),
            msg::execute("", 0),
            msg::sync(),
        ]))
        .await;
    let replies = session.until_ready(1).await;
    assert!(!replies.iter().any(|(t, _)| *t == b'E'), "{replies:?}");
    assert!(replies.iter().any(|(t, _)| *t == b'C'), "{replies:?}");
}

/// `DISCARD ALL` (what connection pools send when a connection is returned) and `DEALLOCATE
/// ALL` drop the server's prepared statements: pgward forgets them too, so the next Parse of
/// the same name is not refused as a duplicate the server no longer holds.
#[tokio::test]
async fn discard_all_and_deallocate_all_free_the_names_of_prepared_statements() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = harness::audited_proxy(dir.path(), "").await;
    let mut session = harness::raw_proxied(&proxy, "postgres").await;
    for reset in ["DISCARD ALL", "DEALLOCATE ALL", "discard all;"] {
        session
            .send(&msg::batch(&[msg::parse("kept", "SELECT 1"), msg::sync()]))
            .await;
        let replies = session.until_ready(1).await;
        assert!(!replies.iter().any(|(t, _)| *t == b'E'), "{replies:?}");
        session.send(&msg::query(reset)).await;
        let replies = session.until_ready(1).await;
        assert!(
            !replies.iter().any(|(t, _)| *t == b'E'),
            "{reset}: {replies:?}"
        );
    }
    // The name is free again, and what it now names is what runs.
    session
        .send(&msg::batch(&[
            msg::parse("kept", "SELECT 42"),
            msg::bind("", "kept", &[], false),
            msg::execute("", 0),
            msg::sync(),
        ]))
        .await;
    let replies = session.until_ready(1).await;
    assert!(!replies.iter().any(|(t, _)| *t == b'E'), "{replies:?}");
    let row = replies
        .iter()
        .find(|(t, _)| *t == b'D')
        .expect("a row of the statement prepared again");
    assert!(row.1.ends_with(b"42"), "{row:?}");
    // DISCARD PLANS keeps them: preparing the name again is still a duplicate.
    session.send(&msg::query("DISCARD PLANS")).await;
    session.until_ready(1).await;
    session
        .send(&msg::batch(&[msg::parse("kept", "SELECT 1"), msg::sync()]))
        .await;
    let replies = session.until_ready(1).await;
    let errors: Vec<_> = replies.iter().filter(|(t, _)| *t == b'E').collect();
    assert_eq!(errors.len(), 1, "{replies:?}");
    assert!(String::from_utf8_lossy(&errors[0].1).contains("42P05"));
}
