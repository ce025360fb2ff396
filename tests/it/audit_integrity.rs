//! Attacks on the audit log by someone with access to the pgward host, and operator
//! mistakes that used to look like tampering: each must now fail the way an auditor needs
//! (non-zero exit and a message naming file, line and sequence) or be refused up front.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, ProxyOptions};

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
    let proxy = harness::audited_proxy(log.path(), "").await;
    let client = proxy.connect("app", &database).await;
    client.simple_query("SELECT 1").await.unwrap();

    // Same directory, its own (free) listen address: only the lock can stop it.
    let text = harness::proxy_config_text(&ProxyOptions {
        extra_toml: harness::audit_toml(log.path(), ""),
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
    // The first pgward keeps appending (completions, checkpoints): every file may only have
    // grown, with none of the records a second writer would add at start.
    let after = snapshot(log.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (path, old) in &before {
        let new = &after[path];
        assert!(new.starts_with(old), "{} was rewritten", path.display());
        let added = String::from_utf8_lossy(&new[old.len()..]);
        assert!(
            !added.contains("\"recovery\"") && !added.contains("audit_started"),
            "the second pgward wrote into the log: {added}"
        );
    }

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

// ---- `verify --live` against an attacker with the files but not the key ----

use pgward::audit::record::{list_segments, record_hash};
use pgward::audit::{AuditConfig, AuditEvent, AuditLog, SigningKey};
use serde_json::{Map, Value};

/// A signed log of 30 records over several files with interval checkpoints, stopped cleanly.
struct SignedLog {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    public: PathBuf,
}

fn failed_login(i: u64) -> AuditEvent {
    AuditEvent::AuthFailed {
        client_addr: format!("127.0.0.1:{}", 40000 + i),
        tls: false,
        cert_identity: None,
        user: Some("billing".into()),
        database: Some("shop".into()),
        token_id: None,
        reason: "bad token".into(),
        sqlstate: "28P01".into(),
    }
}

fn signed_config(tmp: &Path) -> (AuditConfig, PathBuf) {
    let key = tmp.join("audit.key");
    SigningKey::load_or_create(&key).unwrap();
    let mut c = AuditConfig::new(tmp.join("log"));
    c.signing_key_file = Some(key.clone());
    c.checkpoint_interval = Duration::from_millis(200);
    c.rotate_size = 3000;
    c.node_id = Some("n1".into());
    (c, pgward::audit::public_key_path(&key))
}

async fn signed_log() -> SignedLog {
    let tmp = tempfile::tempdir().unwrap();
    let (config, public) = signed_config(tmp.path());
    let dir = config.dir.clone();
    let (log, handle) = AuditLog::open(config).await.unwrap();
    for i in 0..30 {
        handle.append(failed_login(i)).await.unwrap();
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    log.shutdown().await.unwrap();
    assert!(
        list_segments(&dir).unwrap().len() >= 3,
        "rotation made files"
    );
    SignedLog {
        _tmp: tmp,
        dir,
        public,
    }
}

impl SignedLog {
    /// `verify --live` as an auditor runs it; the log's genuine checkpoints are older than
    /// its 200ms interval by then.
    fn verify_live(&self) -> Output {
        std::thread::sleep(Duration::from_millis(400));
        verify(&[
            "--live".as_ref(),
            "--slack".as_ref(),
            "0s".as_ref(),
            "--public-key".as_ref(),
            self.public.as_os_str(),
            self.dir.as_os_str(),
        ])
    }
    fn files(&self) -> Vec<PathBuf> {
        list_segments(&self.dir).unwrap()
    }
}

fn parse_lines(path: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Renumbers and re-chains `files` (each a list of records) as a keyless attacker would and
/// writes them back under their names.
fn rewrite(files: Vec<(PathBuf, Vec<Map<String, Value>>)>) {
    let mut prev = [0u8; 32];
    let mut seq = 0u64;
    for (path, records) in files {
        let mut text = String::new();
        for mut r in records {
            r.insert("seq".into(), seq.into());
            r.insert("prev".into(), hex::encode(prev).into());
            if r.get("covers_seq").is_some() {
                r.insert("covers_seq".into(), seq.checked_sub(1).into());
            }
            let line = serde_json::to_string(&r).unwrap();
            prev = record_hash(line.as_bytes());
            text.push_str(&line);
            text.push('\n');
            seq += 1;
        }
        std::fs::write(&path, text).unwrap();
    }
}

/// Exit 1 and a first break naming `file:line (seq N)` that mentions `needle`.
fn assert_caught(out: &Output, needle: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "not caught: {stdout}");
    let first = stdout
        .lines()
        .find(|l| l.starts_with("FIRST BREAK:"))
        .unwrap_or_default();
    let located = first.contains("audit-") && first.contains(".jsonl:") && first.contains("(seq ");
    assert!(located, "break does not name file, line and seq: {stdout}");
    assert!(stdout.contains(needle), "expected {needle:?}: {stdout}");
}

fn is_checkpoint(r: &Map<String, Value>) -> bool {
    r["kind"] == "checkpoint"
}

#[tokio::test]
async fn live_rejects_a_keyless_rewrite_without_checkpoints() {
    let log = signed_log().await;
    let files = log
        .files()
        .into_iter()
        .map(|f| {
            let kept = parse_lines(&f)
                .into_iter()
                .filter(|r| !is_checkpoint(r))
                .collect();
            (f, kept)
        })
        .collect();
    rewrite(files);
    assert_caught(&log.verify_live(), "no checkpoint at all");
}

/// A record chained right after the raw line `after`, as a keyless attacker forges it.
fn forged_after(after: &str) -> String {
    let prior: Map<String, Value> = serde_json::from_str(after).unwrap();
    let mut forged = Map::new();
    forged.insert("v".into(), 1.into());
    forged.insert("seq".into(), (prior["seq"].as_u64().unwrap() + 1).into());
    forged.insert("ts".into(), prior["ts"].clone());
    forged.insert("node".into(), prior["node"].clone());
    forged.insert(
        "prev".into(),
        hex::encode(record_hash(after.as_bytes())).into(),
    );
    forged.insert("kind".into(), "auth_failed".into());
    forged.insert("reason".into(), "forged".into());
    format!("{}\n", serde_json::to_string(&forged).unwrap())
}

/// Keeps the bytes up to the last `interval` checkpoint (its signature stays valid), forges
/// what follows and removes the later files.
#[tokio::test]
async fn live_rejects_a_rewrite_after_the_last_genuine_checkpoint() {
    let log = signed_log().await;
    let files = log.files();
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let (fi, li) = texts
        .iter()
        .enumerate()
        .flat_map(|(fi, t)| t.lines().enumerate().map(move |(li, l)| (fi, li, l)))
        .filter(|(_, _, l)| l.contains("\"kind\":\"checkpoint\",\"reason\":\"interval\""))
        .map(|(fi, li, _)| (fi, li))
        .last()
        .expect("an interval checkpoint");
    let lines: Vec<&str> = texts[fi].lines().collect();
    let mut kept: String = lines[..=li].iter().map(|l| format!("{l}\n")).collect();
    kept.push_str(&forged_after(lines[li]));
    std::fs::write(&files[fi], kept).unwrap();
    for later in &files[fi + 1..] {
        std::fs::remove_file(later).unwrap();
    }
    assert_caught(&log.verify_live(), "newest checkpoint");
}

#[tokio::test]
async fn live_rejects_tail_truncation() {
    let log = signed_log().await;
    // The newest segment may hold only a line or two (it can have just been opened): cut the
    // tail in the newest one with enough lines, and remove any newer ones.
    let mut files = log.files();
    let (last, text) = loop {
        let last = files.pop().expect("a segment with at least four lines");
        let text = std::fs::read_to_string(&last).unwrap();
        if text.lines().count() >= 4 {
            break (last, text);
        }
        std::fs::remove_file(&last).unwrap();
    };
    let keep: Vec<&str> = text.lines().collect();
    let keep = &keep[..keep.len() - 3];
    std::fs::write(
        &last,
        keep.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    assert_caught(&log.verify_live(), "newest checkpoint");
}

#[tokio::test]
async fn live_rejects_deleting_the_last_file() {
    let log = signed_log().await;
    std::fs::remove_file(log.files().pop().unwrap()).unwrap();
    assert_caught(&log.verify_live(), "newest checkpoint");
}

#[tokio::test]
async fn live_rejects_an_appended_forged_record() {
    let log = signed_log().await;
    let last = log.files().pop().unwrap();
    let text = std::fs::read_to_string(&last).unwrap();
    let forged = forged_after(text.lines().last().unwrap());
    // In the same file, after the shutdown checkpoint …
    std::fs::write(&last, format!("{text}{forged}")).unwrap();
    assert_caught(&log.verify_live(), "after a shutdown checkpoint");
    // … and in a file of its own, as a new run would write it.
    std::fs::write(&last, &text).unwrap();
    let seq = serde_json::from_str::<Value>(&forged).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let name = format!("audit-{seq:020}-20991231T000000Z.jsonl");
    std::fs::write(log.dir.join(name), forged).unwrap();
    assert_caught(&log.verify_live(), "newest checkpoint");
}

#[tokio::test]
async fn an_edited_covers_seq_of_the_final_checkpoint_is_caught() {
    let log = signed_log().await;
    let last = log.files().pop().unwrap();
    let text = std::fs::read_to_string(&last).unwrap();
    let head = text.lines().last().unwrap();
    let seq: u64 = serde_json::from_str::<Value>(head).unwrap()["covers_seq"]
        .as_u64()
        .unwrap();
    let edited = text.replace(
        &format!("\"covers_seq\":{seq}"),
        &format!("\"covers_seq\":{}", seq + 100),
    );
    assert_ne!(edited, text);
    std::fs::write(&last, edited).unwrap();
    let out = verify(&[
        "--public-key".as_ref(),
        log.public.as_os_str(),
        log.dir.as_os_str(),
    ]);
    assert_caught(&out, "covers_seq");
}

/// An idle running writer still signs a checkpoint every interval, so an honest live log
/// passes however long it has been idle.
#[tokio::test]
async fn an_idle_running_log_passes_live_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, public) = signed_config(tmp.path());
    let dir = config.dir.clone();
    let (log, handle) = AuditLog::open(config).await.unwrap();
    handle.append(failed_login(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = verify(&[
        "--live".as_ref(),
        "--slack".as_ref(),
        "1s".as_ref(),
        "--public-key".as_ref(),
        public.as_os_str(),
        dir.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    log.shutdown().await.unwrap();
}

// ---- anchors outside the host ----

async fn anchored_config(tmp: &Path, database: &str) -> (AuditConfig, PathBuf, String) {
    let (mut config, public) = signed_config(tmp);
    let pg = harness::postgres();
    let url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/{database}",
        pg.password, pg.port
    );
    config.table_sink_url = Some(url.clone());
    (config, public, url)
}

/// Waits until the anchor table holds the node's checkpoint `seq` (the sink is asynchronous).
async fn wait_for_anchor(database: &str, seq: u64) {
    let (client, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..100 {
        let row = client
            .query_opt(
                "SELECT max(seq) FROM pgward_audit WHERE kind = 'checkpoint'",
                &[],
            )
            .await;
        if let Ok(Some(row)) = row {
            if row
                .get::<_, Option<i64>>(0)
                .is_some_and(|s| s as u64 >= seq)
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("checkpoint {seq} never reached the anchor table");
}

/// The newest checkpoint's seq in the log.
fn last_seq(dir: &Path) -> u64 {
    let last = list_segments(dir).unwrap().pop().unwrap();
    let text = std::fs::read_to_string(last).unwrap();
    serde_json::from_str::<Value>(text.lines().last().unwrap()).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Cuts the log right after its first `interval` checkpoint and removes every later file:
/// what remains is a consistent, correctly signed prefix.
fn truncate_after_first_interval_checkpoint(dir: &Path) {
    let files = list_segments(dir).unwrap();
    for (fi, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        if let Some(li) = lines
            .iter()
            .position(|l| l.contains("\"reason\":\"interval\""))
        {
            let kept: String = lines[..=li].iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(f, kept).unwrap();
            for later in &files[fi + 1..] {
                std::fs::remove_file(later).unwrap();
            }
            return;
        }
    }
    panic!("no interval checkpoint to cut after");
}

#[tokio::test]
async fn truncate_and_restart_is_caught_by_the_anchor() {
    let database = harness::fresh_database("auditanchor", false).await;
    let tmp = tempfile::tempdir().unwrap();
    let (config, public, url) = anchored_config(tmp.path(), &database).await;
    let dir = config.dir.clone();
    let (log, handle) = AuditLog::open(config.clone()).await.unwrap();
    assert!(!handle.truncation_detected());
    for i in 0..30 {
        handle.append(failed_login(i)).await.unwrap();
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    log.shutdown().await.unwrap();
    wait_for_anchor(&database, last_seq(&dir)).await;
    let anchored = |dir: &Path| {
        verify(&[
            "--public-key".as_ref(),
            public.as_os_str(),
            "--anchor".as_ref(),
            url.as_ref(),
            dir.as_os_str(),
        ])
    };
    let out = anchored(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("match their copy anchored outside the host"),
        "{stdout}"
    );

    // The attack: cut the log back and restart on it. Without the anchor this looked like
    // a crash ("unclean stop recovered") and verified INTACT.
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in list_segments(&dir).unwrap() {
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    truncate_after_first_interval_checkpoint(&dir);
    let (log, handle) = AuditLog::open(config.clone()).await.unwrap();
    assert!(handle.truncation_detected(), "the start did not notice");
    handle.append(failed_login(99)).await.unwrap();
    log.shutdown().await.unwrap();
    let records: Vec<Value> = list_segments(&dir)
        .unwrap()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let found = records
        .iter()
        .find(|r| r["kind"] == "truncation_detected")
        .expect("a truncation_detected record");
    assert_eq!(found["reason"], "behind_anchor");
    assert_caught(&anchored(&dir), "anchored outside the host");
    // Even without the anchor at hand, the log itself now says so.
    let out = verify(&["--public-key".as_ref(), public.as_os_str(), dir.as_os_str()]);
    assert_caught(&out, "did not reach its anchored checkpoint");

    // The same attack when the anchor was unreachable at restart: verify --anchor still
    // catches it (the restarted chain reuses anchored seqs with other records).
    let mut offline = config.clone();
    offline.table_sink_url = None;
    offline.dir = copy.clone();
    truncate_after_first_interval_checkpoint(&copy);
    let (log, handle) = AuditLog::open(offline).await.unwrap();
    assert!(!handle.truncation_detected());
    handle.append(failed_login(100)).await.unwrap();
    log.shutdown().await.unwrap();
    let plain = verify(&[
        "--public-key".as_ref(),
        public.as_os_str(),
        copy.as_os_str(),
    ]);
    assert!(
        plain.status.success(),
        "files alone cannot tell: {}",
        String::from_utf8_lossy(&plain.stdout)
    );
    assert_caught(&anchored(&copy), "anchored outside the host");
}

// ---- fleets ----

async fn node_log(tmp: &Path, node: &str) -> (PathBuf, PathBuf) {
    let (mut config, public) = signed_config(tmp);
    config.node_id = Some(node.into());
    config.dir = tmp.join(node);
    let dir = config.dir.clone();
    let (log, handle) = AuditLog::open(config).await.unwrap();
    for i in 0..5 {
        handle.append(failed_login(i)).await.unwrap();
    }
    log.shutdown().await.unwrap();
    (dir, public)
}

/// Two nodes' directories verify as one fleet (each chain on its own), and a break in one
/// names that node's directory.
#[tokio::test]
async fn a_fleet_of_two_nodes_verifies_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, public) = node_log(tmp.path(), "node-a").await;
    let (b, _) = node_log(tmp.path(), "node-b").await;
    let args = |a: &Path, b: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--public-key".into(),
            public.clone().into(),
            a.as_os_str().into(),
            b.as_os_str().into(),
        ]
    };
    let run = |v: Vec<std::ffi::OsString>| {
        Command::new(env!("CARGO_BIN_EXE_pgward"))
            .args(["audit", "verify"])
            .args(v)
            .output()
            .unwrap()
    };
    let out = run(args(&a, &b));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("node-a: head") && stdout.contains("node-b: head"),
        "{stdout}"
    );
    // Drop one record of node-b.
    let file = list_segments(&b).unwrap().pop().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(3);
    std::fs::write(
        &file,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let out = run(args(&a, &b));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("node-b/audit-"), "{stdout}");
}

/// `audit search` over two nodes' directories returns both nodes' records in time order.
#[tokio::test]
async fn a_fleet_searches_merged_by_time() {
    let tmp = tempfile::tempdir().unwrap();
    let mut logs = Vec::new();
    for node in ["node-a", "node-b"] {
        let (mut config, _) = signed_config(tmp.path());
        config.node_id = Some(node.into());
        config.dir = tmp.path().join(node);
        logs.push((config.dir.clone(), AuditLog::open(config).await.unwrap()));
    }
    // Interleaved: a, b, a, b, …
    for i in 0..6 {
        logs[i % 2]
            .1
             .1
            .append(failed_login(i as u64))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dirs: Vec<PathBuf> = logs.iter().map(|(d, _)| d.clone()).collect();
    for (_, (log, _)) in logs {
        log.shutdown().await.unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["audit", "search", "--json", "--kind", "auth_failed"])
        .arg(&dirs[1])
        .arg(&dirs[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let nodes: Vec<&str> = records
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        ["node-a", "node-b", "node-a", "node-b", "node-a", "node-b"],
        "merged by time"
    );
}

/// `audit export --format ocsf` gives one Authentication event per failed login.
#[tokio::test]
async fn export_gives_ocsf_events() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = node_log(tmp.path(), "node-a").await;
    let out = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["audit", "export", "--format", "ocsf"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 5);
    assert!(events
        .iter()
        .all(|e| e["class_uid"] == 3002 && e["status"] == "Failure"));
    assert_eq!(events[0]["actor"]["user"]["name"], "billing");
}
