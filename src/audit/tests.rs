//! End-to-end tests of the writer, verify, search and report on real files.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::Signer;

use super::record::{self, checkpoint_message};
use super::*;

fn session(id: u64, service: &str) -> Arc<SessionInfo> {
    let mut claims = serde_json::Map::new();
    claims.insert("tenant".into(), "t1".into());
    Arc::new(SessionInfo {
        session_id: id,
        client_addr: "127.0.0.1:40000".into(),
        tls: true,
        cert_identity: None,
        service: service.into(),
        token_id: Some(format!("jti-{id}")),
        database: "shop".into(),
        claims_used: claims,
        ..SessionInfo::default()
    })
}

fn stmt(s: &Arc<SessionInfo>, sql: &str) -> AuditEvent {
    let mut st = StatementRecord::new(s.clone(), Protocol::Simple, SqlText::new(sql, false));
    st.touched_mut().tables_read = vec!["orders".into()];
    st.touched_mut().columns_read = vec!["orders.id".into()];
    AuditEvent::Statement(Box::new(st))
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("audit.key");
        SigningKey::load_or_create(&key).unwrap();
        Fixture {
            dir: tmp.path().join("log"),
            key,
            _tmp: tmp,
        }
    }
    fn config(&self) -> AuditConfig {
        let mut c = AuditConfig::new(&self.dir);
        c.signing_key_file = Some(self.key.clone());
        c.node_id = Some("node-a".into());
        c
    }
    fn verify_in(&self, dir: &Path, live: bool) -> VerifyReport {
        verify::verify(&VerifyArgs {
            paths: vec![dir.to_path_buf()],
            public_key: Some(public_key_path(&self.key)),
            live,
            partial: false,
            slack: Duration::from_secs(30),
            anchor: Vec::new(),
        })
        .unwrap()
    }
    fn verify(&self) -> VerifyReport {
        self.verify_in(&self.dir, false)
    }
    fn files(&self) -> Vec<PathBuf> {
        record::list_segments(&self.dir).unwrap()
    }
}

/// Writes `n` statements into a log rotating every ~`rotate` bytes and shuts it down.
async fn write_log(fx: &Fixture, n: u64, rotate: u64) -> Vec<u64> {
    let mut c = fx.config();
    c.rotate_size = rotate;
    let (log, h) = AuditLog::open(c).await.unwrap();
    let s = session(1, "orders");
    let mut seqs = Vec::new();
    for i in 0..n {
        seqs.push(
            h.append(stmt(&s, &format!("select * from orders where id = {i}")))
                .await
                .unwrap(),
        );
    }
    log.shutdown().await.unwrap();
    seqs
}

#[tokio::test]
async fn chain_and_signature_round_trip_across_rotation_and_restart() {
    let fx = Fixture::new();
    let seqs = write_log(&fx, 40, 2048).await;
    assert_eq!(seqs.len(), 40);
    assert_eq!(
        seqs[0], 2,
        "audit_started and the start checkpoint come first"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "rotation checkpoints take seqs in between"
    );
    assert!(fx.files().len() >= 3, "rotation made several files");
    let r = fx.verify();
    assert!(r.is_intact(), "{:?}", r.breaks);
    assert_eq!(
        r.records,
        40 + 2 + r.checkpoints,
        "statements, started/stopped, checkpoints"
    );
    assert_eq!(r.signatures_valid, r.checkpoints);
    assert!(r.checkpoints >= 3);
    // A second run continues the chain.
    let more = write_log(&fx, 5, 1 << 20).await;
    assert_eq!(
        more[0],
        r.head.as_ref().unwrap().0 + 3,
        "after audit_started and the start checkpoint"
    );
    let r2 = fx.verify();
    assert!(r2.is_intact(), "{:?}", r2.breaks);
    assert_eq!(r2.recovered_truncations, 0);
}

/// Copies the log, lets `mutate` tamper with the copy, and verifies the copy.
async fn tampered(mutate: impl FnOnce(&[PathBuf])) -> VerifyReport {
    let fx = Fixture::new();
    write_log(&fx, 40, 2048).await;
    assert!(fx.verify().is_intact());
    mutate(&fx.files());
    fx.verify()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}
fn write_lines(p: &Path, l: &[String]) {
    std::fs::write(p, l.iter().map(|x| format!("{x}\n")).collect::<String>()).unwrap();
}

#[tokio::test]
async fn edited_field_is_detected() {
    let r = tampered(|f| {
        let mut l = lines(&f[1]);
        l[1] = l[1].replace("\"service\":\"orders\"", "\"service\":\"billing\"");
        write_lines(&f[1], &l);
    })
    .await;
    assert!(!r.is_intact());
    assert!(r.breaks[0].problem.contains("prev hash"), "{:?}", r.breaks);
    assert_eq!(
        r.breaks[0].line, 3,
        "reported at the record after the edited one"
    );
}

#[tokio::test]
async fn deleted_line_is_detected() {
    let r = tampered(|f| {
        let mut l = lines(&f[0]);
        l.remove(2);
        write_lines(&f[0], &l);
    })
    .await;
    assert!(
        r.breaks
            .iter()
            .any(|b| b.problem.contains("sequence jumps")),
        "{:?}",
        r.breaks
    );
}

#[tokio::test]
async fn swapped_lines_are_detected() {
    let r = tampered(|f| {
        let mut l = lines(&f[0]);
        l.swap(1, 2);
        write_lines(&f[0], &l);
    })
    .await;
    assert!(!r.is_intact());
    assert_eq!(r.breaks[0].line, 2);
}

#[tokio::test]
async fn inserted_forged_line_is_detected() {
    let r = tampered(|f| {
        let mut l = lines(&f[0]);
        let forged = l[1].replace("where id = ?", "where id = ? or true");
        l.insert(2, forged);
        write_lines(&f[0], &l);
    })
    .await;
    assert!(!r.is_intact());
}

#[tokio::test]
async fn truncated_tail_is_detected() {
    let r = tampered(|f| {
        let last = f.last().unwrap();
        let mut l = lines(last);
        l.pop();
        write_lines(last, &l);
    })
    .await;
    assert!(
        r.breaks
            .iter()
            .any(|b| b.problem.contains("shutdown checkpoint")),
        "{:?}",
        r.breaks
    );
}

#[tokio::test]
async fn deleted_rotated_file_is_detected() {
    let r = tampered(|f| std::fs::remove_file(&f[1]).unwrap()).await;
    assert!(!r.is_intact());
    assert!(
        r.breaks[0].problem.contains("sequence jumps"),
        "{:?}",
        r.breaks
    );
    let r = tampered(|f| std::fs::remove_file(&f[0]).unwrap()).await;
    assert!(
        r.breaks[0].problem.contains("does not start at seq 0"),
        "{:?}",
        r.breaks
    );
}

#[tokio::test]
async fn edited_checkpoint_is_detected() {
    let r = tampered(|f| {
        let last = f.last().unwrap();
        let mut l = lines(last);
        let n = l.len() - 1;
        l[n] = l[n].replace("\"node\":\"node-a\"", "\"node\":\"node-b\"");
        write_lines(last, &l);
    })
    .await;
    assert!(
        r.breaks.iter().any(|b| b.problem.contains("signature")),
        "{:?}",
        r.breaks
    );
}

/// The strongest attack on the files alone: edit a record, recompute every later `prev`, and
/// re-sign the checkpoints with the attacker's own key. The chain is then consistent; only
/// the signature check against the real public key catches it.
#[tokio::test]
async fn rechained_log_with_forged_checkpoints_is_detected_by_signature() {
    let fx = Fixture::new();
    write_log(&fx, 30, 2048).await;
    let attacker = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let mut prev = record::GENESIS;
    for f in fx.files() {
        let mut out = Vec::new();
        for line in lines(&f) {
            let mut v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&line).unwrap();
            v.insert("prev".into(), hex::encode(prev).into());
            if v["seq"] == 3 {
                v.insert("sql".into(), "select 1".into());
            }
            if v["kind"] == "checkpoint" {
                let msg = checkpoint_message(
                    v["node"].as_str().unwrap(),
                    v["seq"].as_u64().unwrap(),
                    v["ts"].as_str().unwrap(),
                    &hex::encode(prev),
                    v["reason"].as_str().unwrap(),
                );
                let sig = base64::engine::general_purpose::STANDARD
                    .encode(attacker.sign(&msg).to_bytes());
                v.insert("sig".into(), sig.into());
            }
            let s = serde_json::to_string(&v).unwrap();
            prev = record::record_hash(s.as_bytes());
            out.push(s);
        }
        write_lines(&f, &out);
    }
    let chain_only = verify::verify(&VerifyArgs {
        paths: vec![fx.dir.clone()],
        public_key: None,
        live: false,
        partial: false,
        slack: Duration::from_secs(30),
        anchor: Vec::new(),
    })
    .unwrap();
    assert!(
        chain_only.is_intact(),
        "without the key a full rewrite is undetectable"
    );
    let r = fx.verify();
    assert!(!r.is_intact());
    assert!(r.breaks[0].problem.contains("checkpoint"), "{:?}", r.breaks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_many_concurrent_appends() {
    let fx = Fixture::new();
    let (log, h) = AuditLog::open(fx.config()).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let s = session(t, "svc");
            let mut got = Vec::new();
            for i in 0..100 {
                got.push(h.append(stmt(&s, &format!("select {i}"))).await.unwrap());
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "a session's records are in order"
        );
        all.extend(got);
    }
    let stats = h.stats();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 1600);
    // Every acknowledged record is already on disk, before shutdown.
    let on_disk: usize = fx.files().iter().map(|f| lines(f).len()).sum();
    assert!(on_disk >= 1600);
    assert!(stats.fsyncs < stats.records, "{stats:?}");
    assert!(
        stats.fsyncs < 1600 / 2,
        "batches should hold several records: {stats:?}"
    );
    log.shutdown().await.unwrap();
    assert!(fx.verify().is_intact());
}

#[tokio::test]
async fn open_fails_when_dir_is_unusable() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let r = AuditLog::open(AuditConfig::new(file.join("log"))).await;
    assert!(matches!(r, Err(AuditError::Io { .. })));
}

#[tokio::test]
async fn append_fails_and_refuses_when_dir_disappears() {
    let fx = Fixture::new();
    let mut c = fx.config();
    c.rotate_size = 512;
    let (log, h) = AuditLog::open(c).await.unwrap();
    assert_eq!(h.on_failure(), OnFailure::Refuse);
    let s = session(1, "orders");
    h.append(stmt(&s, "select 1")).await.unwrap();
    // Replace the directory by a regular file: the next rotation cannot create a segment.
    let moved = fx.dir.with_extension("moved");
    std::fs::rename(&fx.dir, &moved).unwrap();
    std::fs::write(&fx.dir, b"not a directory").unwrap();
    let mut failed = false;
    for i in 0..10 {
        if h.append(stmt(&s, &format!("select {i}"))).await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "append must error when the sink cannot write");
    assert!(h.stats().failures > 0);
    // Once the directory is back the log carries on, and the chain is intact.
    std::fs::remove_file(&fx.dir).unwrap();
    std::fs::rename(&moved, &fx.dir).unwrap();
    h.append(stmt(&s, "select 2")).await.unwrap();
    log.shutdown().await.unwrap();
    let r = fx.verify();
    assert!(r.is_intact(), "{:?}", r.breaks);
}

#[tokio::test]
async fn crash_with_torn_last_line_is_recovered_and_reported() {
    let fx = Fixture::new();
    write_log(&fx, 10, 1 << 20).await;
    // Simulate kill -9 during a write: the shutdown checkpoint never happened and the last
    // record is half written.
    let last = fx.files().last().unwrap().clone();
    let mut l = lines(&last);
    l.pop();
    write_lines(&last, &l);
    let torn = "{\"v\":1,\"seq\":10,\"ts\":\"2024";
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, torn.as_bytes()).unwrap();
    drop(f);
    let before = fx.verify();
    assert!(!before.is_intact(), "an unrecovered tear is reported");
    let live = fx.verify_in(&fx.dir, true);
    assert!(live.is_intact(), "{:?}", live.breaks);

    let (log, h) = AuditLog::open(fx.config()).await.unwrap();
    let s = session(2, "orders");
    let seq = h.append(stmt(&s, "select 42")).await.unwrap();
    assert_eq!(
        seq, 16,
        "after the last valid seq 12: recovery 13, audit_started 14, start checkpoint 15"
    );
    log.shutdown().await.unwrap();
    let r = fx.verify();
    assert!(r.is_intact(), "{:?}", r.breaks);
    assert_eq!(r.recovered_truncations, 1);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("recovered truncation")),
        "{:?}",
        r.warnings
    );
    // All ten acknowledged statements are still there.
    let n: usize = fx
        .files()
        .iter()
        .map(|f| {
            lines(f)
                .iter()
                .filter(|l| l.contains("\"kind\":\"statement\""))
                .count()
        })
        .sum();
    assert_eq!(n, 11);
}

#[tokio::test]
async fn sensitive_values_never_reach_the_file() {
    let fx = Fixture::new();
    let mut c = fx.config();
    c.record_values = true;
    let (log, h) = AuditLog::open(c).await.unwrap();
    let s = session(1, "hr");
    let mut st = StatementRecord::new(
        s.clone(),
        Protocol::Extended,
        SqlText::new(
            "insert into people (ssn, name) values ('111-22-3333', 'Ann')",
            true,
        ),
    );
    st.params = vec![
        BoundParam::sensitive(25),
        BoundParam::plain(25, Some(b"visible-value")),
    ];
    h.append(AuditEvent::Statement(Box::new(st))).await.unwrap();
    log.shutdown().await.unwrap();
    let all: String = fx
        .files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(!all.contains("111-22-3333"));
    assert!(!all.contains("Ann"));
    assert!(
        all.contains("visible-value"),
        "record_values keeps plain parameters"
    );
}

async fn mixed_log(fx: &Fixture) {
    let (log, h) = AuditLog::open(fx.config()).await.unwrap();
    let orders = session(1, "orders");
    let hr = session(2, "hr");
    h.append(AuditEvent::ConnectionOpened(orders.clone()))
        .await
        .unwrap();
    h.append(AuditEvent::ConnectionOpened(hr.clone()))
        .await
        .unwrap();
    for i in 0..5 {
        let seq = h
            .append(stmt(
                &orders,
                &format!("SELECT * FROM orders WHERE id = {i}"),
            ))
            .await
            .unwrap();
        h.append_nowait(AuditEvent::StatementCompleted {
            session_id: 1,
            service: "orders".into(),
            statement_seq: seq,
            rows: Some(1),
            command: Some("SELECT".into()),
            duration: Duration::from_micros(250),
            sqlstate: None,
            skipped: false,
            suspended: false,
        });
    }
    let mut st = StatementRecord::new(
        hr.clone(),
        Protocol::Extended,
        SqlText::new("select ssn from people where id = $1", false),
    );
    st.touched_mut().tables_read = vec!["people".into()];
    st.touched_mut().columns_read = vec!["people.ssn".into()];
    st.touched_mut().encrypted_columns = vec!["people.ssn".into()];
    h.append(AuditEvent::Statement(Box::new(st))).await.unwrap();
    let mut st = StatementRecord::new(
        hr.clone(),
        Protocol::Simple,
        SqlText::new("DELETE FROM people", false),
    );
    st.decision = Decision::Refused;
    st.rule = Some("no-bulk-delete".into());
    st.reason = Some("DELETE without WHERE".into());
    st.sqlstate = Some("42501".into());
    st.touched_mut().tables_written = vec!["people".into()];
    h.append(AuditEvent::Statement(Box::new(st))).await.unwrap();
    h.append_nowait(AuditEvent::StatementCompleted {
        session_id: 1,
        service: "orders".into(),
        statement_seq: 3,
        rows: None,
        command: None,
        duration: Duration::from_millis(3),
        sqlstate: Some("40001".into()),
        skipped: false,
        suspended: false,
    });
    h.append(AuditEvent::AuthFailed {
        client_addr: "10.1.1.1:1".into(),
        tls: false,
        cert_identity: None,
        user: Some("mallory".into()),
        database: Some("shop".into()),
        token_id: None,
        reason: "bad signature".into(),
        sqlstate: "28000".into(),
    })
    .await
    .unwrap();
    h.append(AuditEvent::ConnectionClosed {
        session: hr,
        duration: Duration::from_secs(2),
        statements: 2,
        reason: None,
    })
    .await
    .unwrap();
    log.shutdown().await.unwrap();
}

fn search_count(fx: &Fixture, f: impl FnOnce(&mut SearchArgs)) -> u64 {
    let mut a = SearchArgs {
        paths: vec![fx.dir.clone()],
        ..SearchArgs::default()
    };
    f(&mut a);
    let mut out = Vec::new();
    search::search(&a, &mut out).unwrap().1
}

#[tokio::test]
async fn search_filters() {
    let fx = Fixture::new();
    mixed_log(&fx).await;
    assert!(fx.verify().is_intact());
    assert_eq!(search_count(&fx, |a| a.service = Some("hr".into())), 4);
    assert_eq!(search_count(&fx, |a| a.kind = Some("statement".into())), 7);
    assert_eq!(search_count(&fx, |a| a.table = Some("people".into())), 2);
    assert_eq!(
        search_count(&fx, |a| a.table = Some("public.people".into())),
        2,
        "a qualified name finds records that name the table unqualified"
    );
    assert_eq!(search_count(&fx, |a| a.table = Some("hr.people".into())), 2);
    assert_eq!(search_count(&fx, |a| a.table = Some("peoples".into())), 0);
    assert_eq!(search_count(&fx, |a| a.column = Some("ssn".into())), 1);
    assert_eq!(
        search_count(&fx, |a| a.column = Some("people.ssn".into())),
        1
    );
    assert_eq!(
        search_count(&fx, |a| a.decision = Some("refused".into())),
        1
    );
    assert_eq!(
        search_count(&fx, |a| a.decision = Some("failed".into())),
        1,
        "auth failure"
    );
    assert_eq!(search_count(&fx, |a| a.session = Some(2)), 4);
    assert_eq!(
        search_count(&fx, |a| a.sqlstate = Some("40001".into())),
        2,
        "the completion and the statement it completes"
    );
    assert_eq!(
        search_count(&fx, |a| a.service = Some("mallory".into())),
        1,
        "a failed login that claimed the service"
    );
    assert_eq!(
        search_count(&fx, |a| a.since = Some("2000-01-01".into())),
        21,
        "a bare date is midnight UTC"
    );
    assert_eq!(
        search_count(&fx, |a| a.until = Some("2000-01-01".into())),
        0
    );
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SearchArgs,
    }
    use clap::Parser;
    assert!(Cli::try_parse_from(["s", "d", "--decision", "refussed"]).is_err());
    assert!(Cli::try_parse_from(["s", "d", "--kind", "statment"]).is_err());
    assert!(
        Cli::try_parse_from(["s", "d", "--decision", "refused", "--kind", "audit_outage"]).is_ok()
    );
    assert_eq!(
        search_count(&fx, |a| a.text = Some("DELETE FROM".into())),
        1
    );
    assert_eq!(
        search_count(&fx, |a| a.text = Some("delete from people".into())),
        1,
        "fingerprint match"
    );
    assert_eq!(search_count(&fx, |a| a.since = Some("1h".into())), 21);
    assert_eq!(search_count(&fx, |a| a.until = Some("1h".into())), 0);
    assert_eq!(
        search_count(&fx, |a| a.since = Some("2000-01-01T00:00:00Z".into())),
        21
    );
    assert_eq!(
        search_count(&fx, |a| {
            a.service = Some("orders".into());
            a.kind = Some("statement".into());
            a.limit = 2;
        }),
        2
    );
    // --json prints the raw records
    let mut out = Vec::new();
    let a = SearchArgs {
        paths: vec![fx.dir.clone()],
        decision: Some("refused".into()),
        json: true,
        ..SearchArgs::default()
    };
    search::search(&a, &mut out).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(out.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(v["rule"], "no-bulk-delete");
    assert!(search::parse_time_arg("yesterday", std::time::SystemTime::now()).is_err());
}

#[tokio::test]
async fn report_has_every_section_and_no_external_assets() {
    let fx = Fixture::new();
    mixed_log(&fx).await;
    let out = fx.dir.join("..").join("report.html");
    let n = report::report(&ReportArgs {
        paths: vec![fx.dir.clone()],
        since: Some("1h".into()),
        until: None,
        service: None,
        out: out.clone(),
        public_key: Some(public_key_path(&fx.key)),
        anchor: Vec::new(),
        live: false,
    })
    .unwrap();
    assert_eq!(n, 21);
    let html = std::fs::read_to_string(&out).unwrap();
    for id in [
        "summary",
        "activity",
        "refusals",
        "encrypted",
        "top-statements",
        "auth-failures",
        "integrity",
        "audit-log",
        "tables",
    ] {
        assert!(
            html.contains(&format!("<section id=\"{id}\"")),
            "missing {id}"
        );
    }
    assert!(html.contains("<svg"));
    assert!(html.contains("people.ssn"));
    assert!(html.contains("no-bulk-delete"));
    assert!(html.contains("INTACT"), "integrity status");
    assert!(
        html.contains("10.1.1.1<"),
        "failed logins by address, without port"
    );
    assert!(html.contains("audit_started"));
    assert!(
        html.contains("<circle"),
        "points are drawn even when all fall in one bucket"
    );
    assert!(html.contains("select * from orders where id = ?"));
    assert!(!html.contains("<script") && !html.contains(" src=") && !html.contains("href="));
}

#[tokio::test]
async fn without_fsync_records_are_written_before_the_ack_but_never_synced() {
    let fx = Fixture::new();
    let mut config = fx.config();
    config.fsync = false;
    let (log, h) = AuditLog::open(config).await.unwrap();
    let s = session(1, "svc");
    for i in 0..20 {
        h.append(stmt(&s, &format!("select {i}"))).await.unwrap();
        // Acknowledged means in the file (the kernel's copy survives a pgward crash).
        let on_disk: usize = fx.files().iter().map(|f| lines(f).len()).sum();
        assert!(on_disk > i, "record {i} acknowledged before it was written");
    }
    assert_eq!(h.stats().fsyncs, 0);
    log.shutdown().await.unwrap();
    assert!(fx.verify().is_intact());
}
