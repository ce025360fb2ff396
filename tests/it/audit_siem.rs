//! The audit log's live copy to a SIEM: syslog over TCP with TLS (RFC 5425 octet counting of
//! RFC 5424 messages), received by a real TLS listener started here (mutual TLS), usable as
//! an anchor by `audit verify --anchor`; a dead collector never stalls a statement and its
//! dropped copies are counted and recorded.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;

use crate::harness;

/// What the collector received: messages, and whether each connection had a client certificate.
#[derive(Default)]
struct Received {
    messages: Vec<String>,
    client_certs: Vec<bool>,
}

/// A syslog-over-TLS collector on a free loopback port, requesting a client certificate
/// signed by `ca`.
async fn collector(cert: &Path, key: &Path, ca: &Path) -> (String, Arc<Mutex<Received>>) {
    let config = pgward::tls::server_config(cert, key, Some(ca)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let sink = sink.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let has_cert = tls.get_ref().1.peer_certificates().is_some();
                sink.lock().client_certs.push(has_cert);
                let mut reader = BufReader::new(tls);
                loop {
                    // RFC 5425: MSG-LEN SP SYSLOG-MSG
                    let mut len = Vec::new();
                    if reader.read_until(b' ', &mut len).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let len: usize = std::str::from_utf8(&len[..len.len() - 1])
                        .unwrap()
                        .parse()
                        .expect("octet count");
                    let mut message = vec![0; len];
                    reader.read_exact(&mut message).await.unwrap();
                    sink.lock()
                        .messages
                        .push(String::from_utf8(message).unwrap());
                }
            });
        }
    });
    (address, received)
}

fn records(dir: &Path) -> Vec<Value> {
    harness::audit_records(dir)
}

#[tokio::test]
async fn every_record_reaches_the_collector_over_mutual_tls_and_anchors_the_log() {
    let work = tempfile::tempdir().unwrap();
    let (cert, key) = (work.path().join("siem.pem"), work.path().join("siem.key"));
    pgward::tls::write_self_signed(&cert, &key, &["siem.test"]).unwrap();
    let (client_cert, client_key) = (work.path().join("pgw.pem"), work.path().join("pgw.key"));
    pgward::tls::write_self_signed(&client_cert, &client_key, &["pgward"]).unwrap();
    let (address, received) = collector(&cert, &key, &client_cert).await;
    let log = work.path().join("audit");
    let signing = work.path().join("signing.pem");
    pgward::audit::SigningKey::load_or_create(&signing).unwrap();
    let database = harness::fresh_database("siem", false).await;
    let proxy = harness::audited_proxy(
        &log,
        &format!(
            "signing_key_file = {signing:?}\n[audit.syslog_tls]\naddress = \"{address}\"\n\
             ca_file = {cert:?}\nserver_name = \"siem.test\"\n\
             client_cert_file = {client_cert:?}\nclient_key_file = {client_key:?}\n"
        ),
    )
    .await;
    let client = proxy.connect("app", &database).await;
    client
        .simple_query("SELECT 1; SELECT 'secret-literal'")
        .await
        .unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = proxy.metrics.render();
    proxy.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let local = records(&log);
    let got = received.lock();
    assert_eq!(
        got.client_certs,
        [true],
        "one connection, with the client certificate"
    );
    let seqs: Vec<u64> = got
        .messages
        .iter()
        .map(|m| {
            assert!(m.starts_with("<86>1 "), "{m}");
            let json: Value = serde_json::from_str(&m[m.find('{').unwrap()..]).unwrap();
            let fields: Vec<&str> = m.splitn(8, ' ').collect();
            assert_eq!(fields[1], json["ts"], "TIMESTAMP is the record's time");
            assert_eq!(fields[3], "pgward", "APP-NAME");
            assert_eq!(fields[5], json["kind"], "MSGID is the record kind");
            assert_eq!(fields[6], "-", "no structured data");
            json["seq"].as_u64().unwrap()
        })
        .collect();
    let local_seqs: Vec<u64> = local.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, local_seqs, "every record, in order, exactly once");
    assert!(!got.messages.concat().contains("secret-literal"));
    assert!(
        metrics.contains("pgward_audit_siem_dropped_total 0"),
        "{metrics}"
    );
    // The collector's copy is an anchor outside the host.
    let copy = work.path().join("siem.log");
    std::fs::write(&copy, got.messages.join("\n")).unwrap();
    let public = pgward::audit::public_key_path(&signing);
    let out = harness::pgward_cli([
        OsStr::new("audit"),
        OsStr::new("verify"),
        OsStr::new("--public-key"),
        public.as_os_str(),
        OsStr::new("--anchor"),
        copy.as_os_str(),
        log.as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("match their copy anchored outside the host"),
        "{text}"
    );
}

#[tokio::test]
async fn a_dead_collector_never_stalls_statements_and_drops_are_recorded() {
    let work = tempfile::tempdir().unwrap();
    let (cert, key) = (work.path().join("siem.pem"), work.path().join("siem.key"));
    pgward::tls::write_self_signed(&cert, &key, &["localhost"]).unwrap();
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let log = work.path().join("audit");
    let database = harness::fresh_database("siemdead", false).await;
    let proxy = harness::audited_proxy(
        &log,
        &format!("[audit.syslog_tls]\naddress = \"{dead}\"\nca_file = {cert:?}\nserver_name = \"localhost\"\n"),
    )
    .await;
    let client = proxy.connect("app", &database).await;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "statements waited for the collector: {:?}",
        started.elapsed()
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let metrics = proxy.metrics.render();
    proxy.shutdown().await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgward_audit_siem_dropped_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 100, "{metrics}");
    let all = records(&log);
    let noted: Vec<&Value> = all.iter().filter(|r| r["kind"] == "siem_dropped").collect();
    assert!(
        !noted.is_empty(),
        "the drops leave a trace in the log itself"
    );
    assert!(noted[0]["records_dropped"].as_u64().unwrap() > 0);
    harness::pgward_cli([OsStr::new("audit"), OsStr::new("verify"), log.as_os_str()]);
}
