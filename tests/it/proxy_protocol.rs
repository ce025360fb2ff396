//! pgward behind a load balancer that speaks the PROXY protocol (haproxy's `send-proxy` and
//! `send-proxy-v2`): sessions and audit records carry the client's own address, and nobody
//! but a listed balancer can choose the address they are audited under.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::haproxy::Haproxy;
use crate::harness::{self, msg, ProxyOptions, RawClient, Received};

/// A proxy auditing into `audit` that expects PROXY headers from 127.0.0.1 (where haproxy
/// runs) and from nobody else.
async fn behind_balancer(audit: &Path) -> harness::TestProxy {
    harness::start_proxy(ProxyOptions {
        extra_listen: "proxy_protocol_from = [\"127.0.0.1/32\"]".into(),
        extra_toml: harness::audit_toml(audit, ""),
        ..ProxyOptions::default()
    })
    .await
}

/// `replies` end in one error, and its text names each of `words`.
fn refused_with(replies: &[Received], words: &[&str]) {
    let errors = harness::error_texts(replies);
    assert!(
        errors.len() == 1 && words.iter().all(|w| errors[0].contains(w)),
        "expected one error naming {words:?}: {replies:?}"
    );
}

/// A TCP connection from `source` (another loopback address than the balancer's).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

async fn start_as_app(stream: TcpStream, header: &[u8]) -> (RawClient<TcpStream>, Vec<Received>) {
    let mut stream = stream;
    stream.write_all(header).await.unwrap();
    let mut client = RawClient::new(stream);
    let token = harness::token("app", serde_json::json!({}));
    let replies = client.startup_with("app", "postgres", &token).await;
    (client, replies)
}

/// The `client_addr` of the statement records of the statement naming `alias` (the text is
/// recorded with its literals redacted; the alias stays).
fn audited_addresses(audit: &Path, alias: &str) -> Vec<String> {
    harness::audit_records(audit)
        .iter()
        .filter(|r| {
            r["kind"] == "statement" && r["sql"].as_str().is_some_and(|s| s.contains(alias))
        })
        .map(|r| r["client_addr"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Connects from `source` straight to `proxy` (after `header`), runs a statement naming
/// `alias`, and returns the connection's own address and the addresses its records carry.
async fn run_from(
    source: &str,
    proxy: &harness::TestProxy,
    header: &[u8],
    audit: &Path,
    alias: &str,
) -> (String, Vec<String>) {
    let stream = connect_from(source, proxy.addr).await;
    let own = stream.local_addr().unwrap().to_string();
    let (mut client, replies) = start_as_app(stream, header).await;
    assert_eq!(replies.last().map(|r| r.0), Some(b'Z'), "{replies:?}");
    client
        .send(&msg::query(&format!("SELECT 1 AS {alias}")))
        .await;
    client.until_ready(1).await;
    (own, audited_addresses(audit, alias))
}

#[tokio::test]
async fn a_client_behind_haproxy_is_audited_under_its_own_address() {
    for (version, option) in [("v1", "send-proxy"), ("v2", "send-proxy-v2")] {
        let audit = tempfile::tempdir().unwrap();
        let proxy = behind_balancer(audit.path()).await;
        let lb = Haproxy::start_with(&[proxy.addr], option).await;
        let stream = connect_from("127.0.0.2", lb.addr).await;
        let client_addr = stream.local_addr().unwrap();
        let (mut client, replies) = start_as_app(stream, b"").await;
        assert_eq!(
            replies.last().map(|r| r.0),
            Some(b'Z'),
            "{version}: {replies:?}"
        );
        let alias = format!("through_haproxy_{version}");
        client
            .send(&msg::query(&format!("SELECT 1 AS {alias}")))
            .await;
        let replies = client.until_ready(1).await;
        assert!(harness::error_texts(&replies).is_empty(), "{replies:?}");
        // The record is durable before the result reached the client.
        assert_eq!(
            audited_addresses(audit.path(), &alias),
            vec![client_addr.to_string()],
            "{version}: the client's address and port, not haproxy's"
        );
    }
}

#[tokio::test]
async fn only_a_listed_balancer_names_the_client_and_it_must() {
    let audit = tempfile::tempdir().unwrap();
    let proxy = behind_balancer(audit.path()).await;

    // The balancer's address without a header: refused, not served as the balancer.
    let (_, replies) = start_as_app(connect_from("127.0.0.1", proxy.addr).await, b"").await;
    refused_with(&replies, &["08P01", "PROXY protocol"]);

    // Anyone else claiming an address with a header: it is not read as one.
    let forged = b"PROXY TCP4 203.0.113.66 127.0.0.1 4242 6432\r\n";
    let (_, replies) = start_as_app(connect_from("127.0.0.3", proxy.addr).await, forged).await;
    refused_with(&replies, &["invalid startup packet"]);

    // … and served under its own address when it sends none.
    let (own, audited) = run_from("127.0.0.3", &proxy, b"", audit.path(), "not_behind").await;
    assert_eq!(audited, vec![own]);

    // A health check's header (UNKNOWN) names nobody: the balancer's own address stands.
    let header = b"PROXY UNKNOWN\r\n";
    let (own, audited) =
        run_from("127.0.0.1", &proxy, header, audit.path(), "unknown_source").await;
    assert_eq!(audited, vec![own]);

    // A client relayed from afar gets no plaintext, even though the balancer is local.
    let remote = b"PROXY TCP4 198.51.100.20 127.0.0.1 5000 6432\r\n";
    let (_, replies) = start_as_app(connect_from("127.0.0.1", proxy.addr).await, remote).await;
    refused_with(&replies, &["TLS is required"]);
    // Refusals are recorded without holding anyone up: wait for the writer's next round.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let refused = loop {
        let refused: Vec<String> = harness::audit_records(audit.path())
            .into_iter()
            .filter(|r| r["kind"] == "auth_failed")
            .map(|r| r["client_addr"].as_str().unwrap_or_default().to_owned())
            .collect();
        if refused.len() >= 3 || std::time::Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        refused.iter().any(|a| a == "198.51.100.20:5000"),
        "the refusal is audited under the relayed client: {refused:?}"
    );
}
