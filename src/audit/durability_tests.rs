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

/// Holds the writer thread this long before each fsync: a slow or stalled disk.
fn slow_fsyncs(handle: &AuditHandle, by: std::time::Duration) {
    if let Some(log) = &handle.inner.inline {
        log.delay_syncs(by);
    }
}

/// Whoever next takes the log's lock keeps it this long: a write blocked on a stalled disk.
fn stall_next_lock_holder(handle: &AuditHandle, by: std::time::Duration) {
    if let Some(log) = &handle.inner.inline {
        log.stall_next_holder(by);
    }
}

/// Appends a statement record and waits until it is durable.
async fn append_durably(handle: &AuditHandle, sql: &str) {
    let (_, receipt) = handle
        .append_staged(vec![statement(sql)], false)
        .await
        .unwrap();
    receipt.wait().await.unwrap();
}

/// A log in `dir` whose receipts wait at most `timeout` for their fsync.
async fn log_with_timeout(
    dir: &std::path::Path,
    timeout: std::time::Duration,
) -> (AuditLog, AuditHandle) {
    let mut config = AuditConfig::new(dir);
    config.durability_timeout = timeout;
    AuditLog::open(config).await.unwrap()
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

fn completion(statement_seq: u64) -> AuditEvent {
    AuditEvent::StatementCompleted {
        session_id: 7,
        service: "billing".into(),
        statement_seq,
        rows: Some(1),
        command: Some("SELECT".into()),
        duration: std::time::Duration::from_micros(300),
        sqlstate: None,
        skipped: false,
        suspended: false,
    }
}

fn kinds(dir: &std::path::Path) -> Vec<(String, Option<u64>)> {
    log_text(dir)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or("").to_string(),
                r["statement_seq"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn without_fsync_a_session_appends_inline_with_its_deferred_completions_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = AuditConfig::new(tmp.path());
    config.fsync = false;
    let (log, handle) = AuditLog::open(config).await.unwrap();
    let (first, receipt) = handle
        .append_staged(vec![statement("select 1")], false)
        .await
        .unwrap();
    assert!(
        !receipt.is_pending(),
        "without fsync, written is all there is"
    );
    let statements = |dir| kinds(dir).iter().filter(|(k, _)| k == "statement").count();
    assert_eq!(statements(tmp.path()), 1, "in the file on return");
    handle.append_nowait(completion(first[0]));
    let (second, _) = handle
        .append_staged(vec![statement("select 2")], false)
        .await
        .unwrap();
    let records = kinds(tmp.path());
    let done = records
        .iter()
        .position(|(k, s)| k == "statement_completed" && *s == Some(first[0]))
        .expect("the deferred completion went out with the next record");
    let next = records.iter().rposition(|(k, _)| k == "statement").unwrap();
    assert!(
        done < next,
        "a completion precedes the session's next statement: {records:?}"
    );
    assert_eq!(second[0], first[0] + 2);
    log.shutdown().await.unwrap();
    // Nothing may follow the final checkpoint.
    assert!(handle
        .append_staged(vec![statement("select 3")], false)
        .await
        .is_err());
    assert_eq!(statements(tmp.path()), 2);
}

#[tokio::test]
async fn deferred_completions_are_written_within_the_tick_when_nothing_else_is() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = AuditLog::open(AuditConfig::new(tmp.path())).await.unwrap();
    let seq = handle.append(statement("select 1")).await.unwrap();
    handle.append_nowait(completion(seq));
    tokio::time::sleep(super::handle::DEFERRED_MAX_DELAY * 10).await;
    assert!(kinds(tmp.path())
        .iter()
        .any(|(k, s)| k == "statement_completed" && *s == Some(seq)));
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_statement_is_written_while_an_earlier_fsync_is_in_flight_and_waits_for_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = AuditLog::open(AuditConfig::new(tmp.path())).await.unwrap();
    let slow = std::time::Duration::from_millis(400);
    slow_fsyncs(&handle, slow);
    let fsyncs = handle.stats().fsyncs;
    let (first, first_receipt) = handle
        .append_staged(vec![statement("SELECT a FROM one")], false)
        .await
        .unwrap();
    assert!(first_receipt.is_pending());
    // The writer thread has noted how far to sync and is (slowly) syncing.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let first_durable = tokio::spawn(first_receipt.wait());
    let (second, second_receipt) = handle
        .append_staged(vec![statement("SELECT b FROM two")], false)
        .await
        .unwrap();
    // Written — so the statement may be forwarded — while the fsync before it still runs.
    assert!(
        !first_durable.is_finished(),
        "the second record waited for the first one's fsync before it was written"
    );
    assert_eq!(second, vec![first[0] + 1]);
    assert!(log_text(tmp.path()).contains("FROM two"));
    first_durable.await.unwrap().unwrap();
    // That fsync began before the second record was written: it takes one more.
    assert!(second_receipt.is_pending());
    second_receipt.wait().await.unwrap();
    assert!(handle.stats().fsyncs >= fsyncs + 2);
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_append_waiting_for_durability_gets_an_answer_when_the_log_shuts_down() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = AuditLog::open(AuditConfig::new(tmp.path())).await.unwrap();
    slow_fsyncs(&handle, std::time::Duration::from_millis(200));
    let (_, receipt) = handle
        .append_staged(vec![statement("SELECT c FROM three")], false)
        .await
        .unwrap();
    let durable = tokio::spawn(receipt.wait());
    log.shutdown().await.unwrap();
    // The shutdown's final fsync covers it (or the delayed one did): durable either way.
    durable.await.unwrap().unwrap();
    assert!(log_text(tmp.path()).contains("FROM three"));
}

/// Records, when the durability answer wakes its waiter, whether the log's lock was held.
struct LockSeenAtWake {
    log: Arc<dyn super::handle::InlineLog>,
    seen: std::sync::Mutex<Option<bool>>,
}

impl std::task::Wake for LockSeenAtWake {
    fn wake(self: Arc<Self>) {
        let locked = self.log.is_locked();
        if let Ok(mut seen) = self.seen.lock() {
            seen.get_or_insert(locked);
        }
    }
}

#[tokio::test]
async fn sessions_are_woken_by_the_fsync_that_covers_them_after_the_lock_is_released() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = AuditLog::open(AuditConfig::new(tmp.path())).await.unwrap();
    let inline = handle.inner.inline.clone().unwrap();
    slow_fsyncs(&handle, std::time::Duration::from_millis(100));
    let (_, receipt) = handle
        .append_staged(vec![statement("SELECT d FROM four")], false)
        .await
        .unwrap();
    assert!(receipt.is_pending());
    let waker = Arc::new(LockSeenAtWake {
        log: inline,
        seen: std::sync::Mutex::new(None),
    });
    let mut durable = Box::pin(receipt.wait());
    let wake_handle = std::task::Waker::from(waker.clone());
    let mut cx = std::task::Context::from_waker(&wake_handle);
    assert!(std::future::Future::poll(durable.as_mut(), &mut cx).is_pending());
    // The answer wakes this waker on the writer thread, as it would a session's worker.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while waker.seen.lock().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        *waker.seen.lock().unwrap(),
        Some(false),
        "the session was woken while the writer held the log's lock (or never)"
    );
    assert!(std::future::Future::poll(durable.as_mut(), &mut cx).is_ready());
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_fsync_fails_the_wait_after_the_durability_timeout_and_answers_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = log_with_timeout(tmp.path(), std::time::Duration::from_millis(150)).await;
    // The disk "stalls": each fsync takes far longer than the timeout.
    slow_fsyncs(&handle, std::time::Duration::from_millis(1500));
    let (_, receipt) = handle
        .append_staged(vec![statement("SELECT e FROM five")], false)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let waited = receipt.wait().await;
    assert!(
        matches!(waited, Err(AuditError::DurabilityTimeout(_))),
        "{waited:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(1000));
    // Written all the same: it becomes durable once the disk answers.
    assert!(log_text(tmp.path()).contains("FROM five"));
    // With the disk back, waits succeed again.
    slow_fsyncs(&handle, std::time::Duration::ZERO);
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    append_durably(&handle, "SELECT f FROM six").await;
    log.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_zero_durability_timeout_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = AuditConfig::new(tmp.path());
    config.durability_timeout = std::time::Duration::ZERO;
    assert!(matches!(
        AuditLog::open(config).await.err(),
        Some(AuditError::Config(_))
    ));
}

#[tokio::test]
async fn a_stalled_fsync_cannot_hold_the_shutdown_longer_than_the_durability_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = log_with_timeout(tmp.path(), std::time::Duration::from_millis(150)).await;
    slow_fsyncs(&handle, std::time::Duration::from_secs(3));
    let (_, receipt) = handle
        .append_staged(vec![statement("SELECT g FROM seven")], false)
        .await
        .unwrap();
    assert!(receipt.is_pending());
    // The writer thread is now in a (slow) fsync.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let stopped = log.shutdown().await;
    assert!(
        matches!(stopped, Err(AuditError::DurabilityTimeout(_))),
        "{stopped:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stalled_under_the_log_lock_costs_other_statements_bounded_time_not_their_worker() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let (log, handle) = log_with_timeout(tmp.path(), Duration::from_millis(300)).await;
    let stall = Duration::from_secs(3);
    let stalled_at = Instant::now();
    stall_next_lock_holder(&handle, stall);
    // Takes the lock (unless the writer thread's loop took it first) and keeps it: the
    // holder is stuck in a write, its worker with it.
    let stuck = handle.clone();
    let stuck = tokio::spawn(async move {
        let _ = stuck
            .append_staged(vec![statement("SELECT a FROM stuck")], false)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A completion queued during the stall: whoever takes it must not lose it.
    handle.append_nowait(statement("SELECT q FROM queued"));
    let started = Instant::now();
    let behind: Vec<_> = (0..8)
        .map(|i| {
            let behind = handle.clone();
            tokio::spawn(async move {
                let sql = format!("SELECT b FROM behind_{i}");
                behind.append_staged(vec![statement(&sql)], false).await
            })
        })
        .collect();
    for statement in behind {
        let appended = tokio::time::timeout(Duration::from_secs(2), statement)
            .await
            .expect("a statement waited behind the stalled write past its durability_timeout")
            .unwrap();
        assert!(
            matches!(appended, Err(AuditError::DurabilityTimeout(_))),
            "{appended:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let stalled = &handle.inner.counters.stalled_appends;
    assert!(stalled.load(std::sync::atomic::Ordering::Relaxed) >= 8);
    // One blocking thread waited for the lock; the others waited their turn on the runtime.
    let log_lock = handle.inner.inline.as_ref().unwrap();
    assert_eq!(log_lock.most_claim_waiters(), 1);
    // The disk answers again: appends go on as before.
    tokio::time::sleep_until((stalled_at + stall + Duration::from_millis(100)).into()).await;
    stuck.await.unwrap();
    append_durably(&handle, "SELECT c FROM after").await;
    log.shutdown().await.unwrap();
    let text = log_text(tmp.path());
    assert!(
        !text.contains("FROM behind"),
        "the record of a statement refused for the stall was written after all"
    );
    assert!(text.contains("FROM queued"), "a queued record was lost");
    assert!(text.contains("FROM after"));
}

#[test]
fn a_claim_is_either_abandoned_by_its_session_or_taken_by_the_writer_never_both() {
    let abandoned = handle::Claim::default();
    assert!(abandoned.abandon());
    assert!(!abandoned.take(), "an abandoned record was written");
    let taken = handle::Claim::default();
    assert!(taken.take());
    assert!(
        !taken.abandon(),
        "a record being written was reported abandoned"
    );
}
