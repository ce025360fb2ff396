//! `pgward audit verify`: checks hash chains, sequence continuity across files, recovery
//! records and checkpoint signatures.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ed25519_dalek::VerifyingKey;

use std::collections::HashMap;

use super::anchor::{self, Anchor};
use super::record::{self, Hash, Head, GENESIS};
use super::signing;
use super::AuditError;

/// Arguments of `pgward audit verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Segment files and/or directories holding them. Several directories are a fleet: each
    /// is one node's chain and is verified on its own.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Public key (SPKI PEM, the `.pub` written beside the signing key) to check checkpoint
    /// signatures. Without it only the hash chain is checked, which a full rewrite defeats.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// The log is still being written: records after the last checkpoint, and an incomplete
    /// last line, are warnings instead of breaks.
    #[arg(long)]
    pub live: bool,
    /// The files are a suffix of the chain (older files removed by retention): do not require
    /// the first record to be the genesis record.
    #[arg(long)]
    pub partial: bool,
    /// With `--live`: how much older than one checkpoint interval the newest checkpoint may
    /// be (clock skew, a busy writer, the time the copy took).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub slack: std::time::Duration,
    /// Checkpoints published outside the host to check the log against: the table sink's
    /// database (`postgres://…`) or a file of syslog lines. Catches truncation (an anchored
    /// checkpoint beyond the log's head) and rewrites (a local checkpoint that differs).
    #[arg(long)]
    pub anchor: Vec<String>,
}

/// Interval assumed for checkpoints of format 1, which do not carry theirs (the default).
const V1_INTERVAL_MS: u64 = 60_000;

/// Where a record is: file, 1-based line, seq.
#[derive(Debug, Clone)]
struct Loc {
    file: String,
    line: u64,
    seq: u64,
}

/// The newest checkpoint seen.
#[derive(Debug, Clone)]
struct LastCheckpoint {
    loc: Loc,
    ts: String,
    interval_ms: u64,
}

/// One place where the log is not what the writer wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub file: String,
    /// 1-based line number.
    pub line: u64,
    pub seq: Option<u64>,
    pub problem: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "{}:{} (seq {s}): {}", self.file, self.line, self.problem),
            None => write!(f, "{}:{}: {}", self.file, self.line, self.problem),
        }
    }
}

/// Result of a verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub files: usize,
    pub records: u64,
    pub checkpoints: u64,
    pub signatures_valid: u64,
    pub signatures_unchecked: u64,
    /// Recovered crash truncations (torn last line followed by a matching recovery record).
    pub recovered_truncations: u64,
    /// Local checkpoints identical to their anchored copy.
    pub anchors_matched: u64,
    pub breaks: Vec<Break>,
    pub warnings: Vec<String>,
    /// Last record: seq and hash — compare with an external anchor (the table sink, a
    /// published checkpoint) to detect removal of whole newest files.
    pub head: Option<(u64, String)>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Chain state carried from one record (and file) to the next.
struct State<'a> {
    key: Option<&'a VerifyingKey>,
    partial: bool,
    expected_seq: Option<u64>,
    prev: Option<Hash>,
    /// (file, bytes) of an incomplete line that must be answered by a recovery record.
    tear: Option<(String, u64)>,
    last_checkpoint: Option<LastCheckpoint>,
    last_is_shutdown: bool,
    /// The first record after the newest checkpoint (the start of the unsigned tail).
    first_unsigned: Option<Loc>,
    last_record: Option<Loc>,
    /// Anchored checkpoints by node and seq.
    anchors: HashMap<String, HashMap<u64, Anchor>>,
    /// Highest seq seen per node.
    heads: HashMap<String, u64>,
    report: VerifyReport,
}

/// Verifies the given files (in chain order after sorting by name).
pub fn verify(args: &VerifyArgs) -> Result<VerifyReport, AuditError> {
    let key = args
        .public_key
        .as_deref()
        .map(signing::load_public_key)
        .transpose()?;
    let mut anchors: HashMap<String, HashMap<u64, Anchor>> = HashMap::new();
    for source in &args.anchor {
        for ((node, seq), a) in anchor::load(source)? {
            anchors.entry(node).or_default().insert(seq, a);
        }
    }
    let dirs: Vec<&PathBuf> = args.paths.iter().filter(|p| p.is_dir()).collect();
    if dirs.len() < 2 || dirs.len() != args.paths.len() {
        let files = record::expand_paths(&args.paths)?;
        return verify_chain(&files, key.as_ref(), anchors, args);
    }
    // A fleet: each directory is one node's chain, verified on its own.
    let mut total = VerifyReport::default();
    for dir in dirs {
        let files = record::list_segments(dir)?;
        let r = verify_chain(&files, key.as_ref(), anchors.clone(), args)?;
        merge(&mut total, r, &dir.display().to_string());
    }
    Ok(total)
}

fn verify_chain(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
    anchors: HashMap<String, HashMap<u64, Anchor>>,
    args: &VerifyArgs,
) -> Result<VerifyReport, AuditError> {
    let mut st = State {
        key,
        partial: args.partial,
        expected_seq: None,
        prev: None,
        tear: None,
        last_checkpoint: None,
        last_is_shutdown: false,
        first_unsigned: None,
        last_record: None,
        anchors,
        heads: HashMap::new(),
        report: VerifyReport::default(),
    };
    for f in files {
        verify_file(&mut st, f)?;
    }
    finish(&mut st, args);
    Ok(st.report)
}

/// Adds one node's report to the fleet's; its breaks and warnings name the directory.
fn merge(total: &mut VerifyReport, r: VerifyReport, dir: &str) {
    total.files += r.files;
    total.records += r.records;
    total.checkpoints += r.checkpoints;
    total.signatures_valid += r.signatures_valid;
    total.signatures_unchecked += r.signatures_unchecked;
    total.recovered_truncations += r.recovered_truncations;
    total.anchors_matched += r.anchors_matched;
    total.breaks.extend(r.breaks.into_iter().map(|mut b| {
        b.file = format!("{dir}/{}", b.file);
        b
    }));
    total
        .warnings
        .extend(r.warnings.into_iter().map(|w| format!("{dir}: {w}")));
    if let Some((seq, hash)) = r.head {
        total
            .warnings
            .push(format!("{dir}: head seq {seq} sha256 {hash}"));
        total.head = Some((seq, hash));
    }
}

fn verify_file(st: &mut State<'_>, path: &Path) -> Result<(), AuditError> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let file = std::fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    st.report.files += 1;
    // A shutdown checkpoint ends its file: the next run starts a new one.
    st.last_is_shutdown = false;
    let mut buf = Vec::new();
    let mut lineno = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| AuditError::io(path, e))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        if buf.last() != Some(&b'\n') {
            // Only the last read can lack a newline: an incomplete (torn) record.
            st.tear = Some((name.clone(), n as u64));
            break;
        }
        let line = &buf[..n - 1];
        check_record(st, &name, lineno, line);
    }
    Ok(())
}

fn push_break(st: &mut State<'_>, file: &str, line: u64, seq: Option<u64>, problem: String) {
    st.report.breaks.push(Break {
        file: file.to_string(),
        line,
        seq,
        problem,
    });
}

fn check_record(st: &mut State<'_>, file: &str, lineno: u64, line: &[u8]) {
    st.report.records += 1;
    let hash = record::record_hash(line);
    let Some(h) = record::parse_head(line) else {
        push_break(
            st,
            file,
            lineno,
            None,
            "not a valid record (edited or corrupted)".into(),
        );
        st.expected_seq = None;
        st.prev = Some(hash);
        return;
    };
    if st.last_is_shutdown {
        push_break(
            st,
            file,
            lineno,
            Some(h.seq),
            "record after a shutdown checkpoint in the same file: appended after pgward stopped"
                .into(),
        );
    }
    check_tear(st, file, lineno, &h);
    check_position(st, file, lineno, &h);
    let loc = Loc {
        file: file.to_string(),
        line: lineno,
        seq: h.seq,
    };
    if h.kind == "checkpoint" {
        check_checkpoint(st, &loc, &h, line);
        st.first_unsigned = None;
    } else if st.first_unsigned.is_none() {
        st.first_unsigned = Some(loc.clone());
    }
    check_anchor(st, &loc, &h, line);
    st.last_record = Some(loc);
    st.last_is_shutdown = h.kind == "checkpoint" && h.reason.as_deref() == Some("shutdown");
    st.expected_seq = Some(h.seq + 1);
    st.prev = Some(hash);
    st.report.head = Some((h.seq, hex::encode(hash)));
}

/// A record at an anchored position must be that checkpoint, byte for byte in what counts;
/// a `truncation_detected` record is pgward's own report that it found the log cut back.
fn check_anchor(st: &mut State<'_>, loc: &Loc, h: &Head, line: &[u8]) {
    match st.heads.get_mut(&h.node) {
        Some(head) => *head = (*head).max(h.seq),
        None => {
            st.heads.insert(h.node.clone(), h.seq);
        }
    }
    if h.kind == "truncation_detected" {
        push_break(st, &loc.file, loc.line, Some(h.seq), format!(
            "pgward found at start that the log did not reach its anchored checkpoint ({}): records were deleted or rewritten before this restart",
            h.reason.as_deref().unwrap_or("?")
        ));
    }
    let Some(a) = st.anchors.get(&h.node).and_then(|m| m.get(&h.seq)) else {
        return;
    };
    if a.matches(line) {
        st.report.anchors_matched += 1;
    } else {
        let msg = format!(
            "record differs from the checkpoint anchored outside the host for seq {} ({}): the log was rewritten here, or truncated and continued by a restart",
            a.seq, a.ts
        );
        push_break(st, &loc.file, loc.line, Some(h.seq), msg);
    }
}

/// An anchored checkpoint beyond the log's head: the records up to it were deleted.
fn check_anchors_beyond_head(st: &mut State<'_>, last: &Loc) {
    let mut beyond: Vec<(String, u64, String, u64)> = Vec::new();
    for (node, head) in &st.heads {
        if let Some(a) = st
            .anchors
            .get(node)
            .and_then(|m| m.values().filter(|a| a.seq > *head).max_by_key(|a| a.seq))
        {
            beyond.push((node.clone(), a.seq, a.ts.clone(), *head));
        }
    }
    for (node, seq, ts, head) in beyond {
        push_break(st, &last.file, last.line, Some(last.seq), format!(
            "node {node}: a checkpoint at seq {seq} ({ts}) is anchored outside the host but the log ends at seq {head}: the records after it were deleted (truncation)"
        ));
    }
}

/// A torn line is acceptable only when the writer itself reported it on restart.
fn check_tear(st: &mut State<'_>, file: &str, lineno: u64, h: &Head) {
    let is_recovery = h.kind == "recovery";
    match st.tear.take() {
        Some((tf, tb)) => {
            if is_recovery && h.file.as_deref() == Some(tf.as_str()) && h.torn_bytes == Some(tb) {
                st.report.recovered_truncations += 1;
                st.report.warnings.push(format!(
                    "recovered truncation: {tb} bytes of an incomplete record at the end of {tf} (crash); chain resumed at seq {}",
                    h.seq
                ));
            } else {
                push_break(st, file, lineno, Some(h.seq), format!(
                    "{tf} ends with {tb} bytes of an incomplete record that no recovery record accounts for (truncated or edited)"
                ));
            }
        }
        None if is_recovery && h.torn_bytes.unwrap_or(0) > 0 => {
            push_break(st, file, lineno, Some(h.seq), format!(
                "recovery record reports {} torn bytes in {} but the file has none (file modified after the crash)",
                h.torn_bytes.unwrap_or(0),
                h.file.as_deref().unwrap_or("?")
            ));
        }
        None if is_recovery => {
            st.report.warnings.push(format!(
                "unclean stop recovered at seq {} ({})",
                h.seq,
                h.reason.as_deref().unwrap_or("unknown")
            ));
        }
        None => {}
    }
}

/// Sequence continuity and the hash link to the previous record.
fn check_position(st: &mut State<'_>, file: &str, lineno: u64, h: &Head) {
    let first = st.prev.is_none() && st.expected_seq.is_none() && st.report.records == 1;
    match st.expected_seq {
        Some(e) if h.seq != e => push_break(st, file, lineno, Some(h.seq), format!(
            "sequence jumps from {} to {}: records removed, inserted or reordered",
            e.wrapping_sub(1),
            h.seq
        )),
        None if first && h.seq != 0 && !st.partial => push_break(st, file, lineno, Some(h.seq),
            "chain does not start at seq 0: earlier records or files are missing (use --partial if removed by retention)".into()),
        _ => {}
    }
    let expected_prev = match (st.prev, first) {
        (Some(p), _) => Some(p),
        (None, true) if !st.partial || h.seq == 0 => Some(GENESIS),
        _ => None,
    };
    if let Some(p) = expected_prev {
        if !h.prev.eq_ignore_ascii_case(&hex::encode(p)) {
            push_break(st, file, lineno, Some(h.seq),
                "prev hash does not match the preceding record: that record was modified, or records were removed or inserted here".into());
        }
    }
    if h.v != record::FORMAT_VERSION {
        push_break(
            st,
            file,
            lineno,
            Some(h.seq),
            format!("unknown format version {}", h.v),
        );
    }
}

fn check_checkpoint(st: &mut State<'_>, loc: &Loc, h: &Head, line: &[u8]) {
    let (file, lineno) = (loc.file.as_str(), loc.line);
    st.report.checkpoints += 1;
    st.last_checkpoint = Some(LastCheckpoint {
        loc: loc.clone(),
        ts: h.ts.clone(),
        interval_ms: h.interval_ms.unwrap_or(V1_INTERVAL_MS),
    });
    if h.covers_seq.is_some() && h.covers_seq != h.seq.checked_sub(1) {
        push_break(
            st,
            file,
            lineno,
            Some(h.seq),
            format!(
                "checkpoint's covers_seq {} does not match its position (seq {}): edited",
                h.covers_seq.unwrap_or_default(),
                h.seq
            ),
        );
    }
    let Some(vk) = st.key else {
        st.report.signatures_unchecked += 1;
        return;
    };
    let problem = match (&h.sig, &h.key_id) {
        (None, _) => Some("checkpoint is not signed but a public key was given".to_string()),
        (Some(sig), _) if signature_valid(vk, h, line, sig) => None,
        (Some(_), Some(kid)) if *kid != signing::key_id(vk) => Some(format!(
            "checkpoint signed by another key ({kid}): forged or wrong --public-key"
        )),
        (Some(_), _) => Some(
            "checkpoint signature is invalid: checkpoint edited or forged, or records before it rewritten"
                .to_string(),
        ),
    };
    match problem {
        None => st.report.signatures_valid += 1,
        Some(p) => push_break(st, file, lineno, Some(h.seq), p),
    }
}

/// Format 2 signs every byte of the line before `"sig"`; format 1 (older logs) signed
/// node, seq, ts, prev and reason only. A v2 signature never verifies as v1 (different
/// domain), so accepting both does not let an edited v2 checkpoint pass.
fn signature_valid(vk: &VerifyingKey, h: &Head, line: &[u8], sig: &str) -> bool {
    if let Some((signed, sig2)) = record::split_signature(line) {
        if signing::verify_sig(vk, &record::checkpoint_message_v2(signed), sig2) {
            return true;
        }
    }
    let reason = h.reason.as_deref().unwrap_or_default();
    let msg = record::checkpoint_message(&h.node, h.seq, &h.ts, &h.prev, reason);
    signing::verify_sig(vk, &msg, sig)
}

fn finish(st: &mut State<'_>, args: &VerifyArgs) {
    let live = args.live;
    if let Some((tf, tb)) = st.tear.take() {
        let msg = format!("{tf} ends with {tb} bytes of an incomplete record (crash not yet recovered, or truncation)");
        if live {
            st.report.warnings.push(msg);
        } else {
            push_break(st, &tf, 0, None, msg);
        }
    }
    let Some(last) = st.last_record.clone() else {
        push_break(st, "-", 0, None, "no records found".into());
        return;
    };
    check_anchors_beyond_head(st, &last);
    let Some(cp) = st.last_checkpoint.clone() else {
        // Every run starts with a checkpoint: a log without one lost all of them.
        push_break(st, &last.file, last.line, Some(last.seq),
            "the log has no checkpoint at all: every checkpoint was removed (rewrite) or the start of the log is missing".into());
        return;
    };
    if st.last_is_shutdown {
        return;
    }
    let after = format!("{}:{} (seq {})", cp.loc.file, cp.loc.line, cp.loc.seq);
    if !live {
        let msg = format!("log does not end with a shutdown checkpoint: records after the checkpoint at {after} are not covered by a signature and may have been truncated (use --live for a log still being written)");
        push_break(st, &last.file, last.line, Some(last.seq), msg);
        return;
    }
    check_live_tail(st, &cp, &last, args.slack);
}

/// A running writer signs a checkpoint at least every `interval_ms`: a newest checkpoint
/// older than that (plus slack) means the records after it, or the checkpoints that should
/// follow it, were removed or rewritten — or pgward is no longer running.
fn check_live_tail(
    st: &mut State<'_>,
    cp: &LastCheckpoint,
    last: &Loc,
    slack: std::time::Duration,
) {
    let window = std::time::Duration::from_millis(cp.interval_ms) + slack;
    let age = humantime::parse_rfc3339(&cp.ts)
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    let tail = st.first_unsigned.clone();
    if age <= window {
        if let Some(first) = tail {
            st.report.warnings.push(format!(
                "live: records from {}:{} (seq {}) to seq {} are not yet covered by a checkpoint (newest checkpoint {}s old, within one interval + slack)",
                first.file, first.line, first.seq, last.seq, age.as_secs()
            ));
        }
        return;
    }
    let at = tail.unwrap_or_else(|| cp.loc.clone());
    push_break(st, &at.file, at.line, Some(at.seq), format!(
        "the newest checkpoint (seq {} at {}:{}) is {}s old, more than one checkpoint interval ({}ms) + slack ({}s): records or checkpoints after it were removed or rewritten, or pgward is not running (verify a stopped log without --live)",
        cp.loc.seq, cp.loc.file, cp.loc.line, age.as_secs(), cp.interval_ms, slack.as_secs()
    ));
}

/// Prints the report; the first break first.
pub fn print_report(r: &VerifyReport, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(first) = r.breaks.first() {
        writeln!(out, "FIRST BREAK: {first}")?;
    }
    for b in r.breaks.iter().skip(1).take(19) {
        writeln!(out, "break: {b}")?;
    }
    if r.breaks.len() > 20 {
        writeln!(out, "... {} more breaks", r.breaks.len() - 20)?;
    }
    for w in &r.warnings {
        writeln!(out, "warning: {w}")?;
    }
    writeln!(
        out,
        "{} files, {} records, {} checkpoints ({} signatures valid, {} unchecked), {} recovered truncations",
        r.files, r.records, r.checkpoints, r.signatures_valid, r.signatures_unchecked, r.recovered_truncations
    )?;
    if r.anchors_matched > 0 {
        writeln!(
            out,
            "{} checkpoints match their copy anchored outside the host",
            r.anchors_matched
        )?;
    }
    if let Some((seq, hash)) = &r.head {
        writeln!(out, "head: seq {seq} sha256 {hash}")?;
    }
    if r.is_intact() {
        writeln!(out, "result: INTACT")
    } else {
        writeln!(out, "result: BROKEN ({} breaks)", r.breaks.len())
    }
}

/// Entry point for the CLI: exit status 0 intact, 1 broken, 2 could not verify.
pub fn run_verify(args: &VerifyArgs) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match verify(args) {
        Ok(report) => {
            let _ = print_report(&report, &mut stdout);
            if report.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("audit verify: {e}");
            ExitCode::from(2)
        }
    }
}
