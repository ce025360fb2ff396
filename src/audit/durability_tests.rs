//! The two stages of an append: written to the file (the statement may be forwarded), then
//! durable (its responses may reach the client).
use std::sync::Arc;

use super::*;

fn statement(sql: &str) -> AuditEvent {
    let session = Arc::new(SessionInfo {
        session_id: 7,
        client_addr: "127.0.0.1:40000".into(),
        tls: true,
        cert_identity: None,
        service: "billing".into(),
        token_id: None,
        database: "shop".into(),
        claims_used: serde_json::Map::new(),
        ..SessionInfo::default()
    });
    AuditEvent::Statement(Box::new(StatementRecord::new(
        session,
        Protocol::Simple,
        SqlText::new(sql, false),
    )))
}

fn log_text(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for file in record::list_segments(dir).unwrap() {
        text.push_str(&std::fs::read_to_string(file).unwrap());
    }
    text
}

#[tokio::test]
async fn staged_records_are_in_the_file_when_written_and_durable_with_the_receipt() {
    let tmp = tempfile::tempdir().unwrap();
    let config = AuditConfig::new(tmp.path());
    assert_eq!(config.durability, Durability::BeforeResponse);
    let (log, handle) = AuditLog::open(config).await.unwrap();
    let events = vec![
        statement("SELECT a FROM one"),
        statement("SELECT b FROM two"),
    ];
    let (seqs, receipt) = handle.append_staged(events, false).await.unwrap();
    assert_eq!(seqs.len(), 2);
    assert_eq!(seqs[1], seqs[0] + 1);
    // Written means in the file already: a crash of pgward from here on cannot lose it.
    let text = log_text(tmp.path());
    assert!(
        text.contains("FROM one") && text.contains("FROM two"),
        "{text}"
    );
    receipt.wait().await.unwrap();
    assert!(handle.stats().fsyncs >= 1);
    // The next append is numbered after both.
    let (next, receipt) = handle
        .append_staged(vec![statement("SELECT 3")], false)
        .await
        .unwrap();
    assert_eq!(next, vec![seqs[1] + 1]);
    receipt.wait().await.unwrap();
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn before_forward_resolves_only_once_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = AuditConfig::new(tmp.path());
    config.durability = Durability::BeforeForward;
    let (log, handle) = AuditLog::open(config).await.unwrap();
    let fsyncs = handle.stats().fsyncs;
    let (_, receipt) = handle
        .append_staged(vec![statement("SELECT 1")], false)
        .await
        .unwrap();
    // Nothing is left to wait for: the fsync happened before the append resolved.
    assert!(!receipt.is_pending());
    assert!(handle.stats().fsyncs > fsyncs);
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_write_fails_both_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let mut config = AuditConfig::new(&dir);
    config.rotate_size = 1;
    let (_log, handle) = AuditLog::open(config).await.unwrap();
    handle
        .append_staged(vec![statement("SELECT 1")], false)
        .await
        .unwrap()
        .1
        .wait()
        .await
        .unwrap();
    // The next rotation cannot create its segment.
    std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let result = handle
        .append_staged(vec![statement("SELECT 2")], false)
        .await;
    assert!(result.is_err(), "the write must fail");
}
