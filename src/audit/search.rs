//! `pgward audit search`: streams the files, prefilters raw lines with substring checks and
//! only parses candidates, so millions of records are scanned at disk speed.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use serde::Deserialize;

use super::record;
use super::AuditError;

/// Arguments of `pgward audit search`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SearchArgs {
    /// Segment files and/or directories. Several directories are a fleet (one per node):
    /// their records are merged by time.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[arg(long)]
    pub service: Option<String>,
    /// RFC 3339 time or a duration back from now (`1h`, `30m`).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub until: Option<String>,
    /// Table read or written.
    #[arg(long)]
    pub table: Option<String>,
    /// Column (`table.column`, or just `column`) read or written.
    #[arg(long)]
    pub column: Option<String>,
    /// allowed | refused | failed
    #[arg(long, value_parser = ["allowed", "refused", "failed"])]
    pub decision: Option<String>,
    #[arg(long)]
    pub session: Option<u64>,
    /// SQLSTATE of a refusal, a failed login or a completion; a matching completion is shown
    /// together with the statement it completes.
    #[arg(long)]
    pub sqlstate: Option<String>,
    /// Substring of the statement text or (case-insensitively) its fingerprint.
    #[arg(long)]
    pub text: Option<String>,
    /// Record kind.
    #[arg(long, value_parser = KINDS)]
    pub kind: Option<String>,
    /// Stop after this many matches (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Print matching records as JSON Lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Every record kind the writer produces (`--kind` accepts only these).
pub const KINDS: [&str; 13] = [
    "statement",
    "statement_completed",
    "connection_opened",
    "connection_closed",
    "auth_failed",
    "checkpoint",
    "recovery",
    "audit_started",
    "audit_stopped",
    "audit_outage",
    "truncation_detected",
    "siem_dropped",
    "audit_settings_changed",
];

/// The fields search and report look at. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RecordView {
    pub seq: u64,
    pub ts: String,
    pub node: String,
    pub kind: String,
    pub service: Option<String>,
    pub session_id: Option<u64>,
    pub session: Option<SessionView>,
    pub decision: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub sqlstate: Option<String>,
    pub fingerprint: Option<String>,
    pub sql: Option<String>,
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    pub columns_read: Vec<String>,
    pub columns_written: Vec<String>,
    pub encrypted_columns: Vec<String>,
    pub rows: Option<u64>,
    pub duration_us: Option<u64>,
    pub client_addr: Option<String>,
    pub user: Option<String>,
    pub statement_seq: Option<u64>,
    /// `audit_outage`
    pub started: Option<String>,
    pub ended: Option<String>,
    pub failed_writes: Option<u64>,
    pub statements_refused_or_unaudited: Option<u64>,
    pub records_lost: Option<u64>,
    /// `truncation_detected`
    pub anchor_seq: Option<u64>,
    /// `audit_started` / `audit_stopped`
    pub settings: Option<serde_json::Value>,
}

/// Nested session of `connection_opened`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SessionView {
    pub session_id: u64,
    pub service: String,
    pub client_addr: String,
}

impl RecordView {
    /// The record's service; for a failed login, the service the client claimed.
    pub fn service(&self) -> Option<&str> {
        self.service
            .as_deref()
            .or(self.session.as_ref().map(|s| s.service.as_str()))
            .or(if self.kind == "auth_failed" {
                self.user.as_deref()
            } else {
                None
            })
    }
    pub fn session_id(&self) -> Option<u64> {
        self.session_id
            .or(self.session.as_ref().map(|s| s.session_id))
    }
    fn touches_table(&self, t: &str) -> bool {
        // `customers` finds `public.customers`, and `public.customers` finds `customers`
        // (what an unrestricted service's records hold when pgward has no catalog).
        fn last(name: &str) -> &str {
            name.rsplit('.').next().unwrap_or(name)
        }
        self.tables_read
            .iter()
            .chain(&self.tables_written)
            .any(|x| x == t || ((!x.contains('.') || !t.contains('.')) && last(x) == last(t)))
    }
    fn touches_column(&self, c: &str) -> bool {
        self.columns_read
            .iter()
            .chain(&self.columns_written)
            .chain(&self.encrypted_columns)
            .any(|x| x == c || (!c.contains('.') && x.rsplit('.').next() == Some(c)))
    }
}

/// Parses `--since/--until`: RFC 3339, or a duration back from `now`. Returns the fixed-width
/// timestamp string the records use, so comparisons are plain string comparisons.
pub fn parse_time_arg(s: &str, now: SystemTime) -> Result<String, AuditError> {
    if is_bare_date(s) {
        let t = humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
            .map_err(|_| AuditError::BadTime { input: s.into() })?;
        return Ok(record::format_ts(t));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(record::format_ts(t));
    }
    let d = humantime::parse_duration(s.trim_start_matches('-'))
        .map_err(|_| AuditError::BadTime { input: s.into() })?;
    let t = now
        .checked_sub(d)
        .ok_or_else(|| AuditError::BadTime { input: s.into() })?;
    Ok(record::format_ts(t))
}

/// `YYYY-MM-DD`: a whole day, UTC.
fn is_bare_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// `--until` with a bare date includes that whole day.
fn parse_until_arg(s: &str, now: SystemTime) -> Result<String, AuditError> {
    if !is_bare_date(s) {
        return parse_time_arg(s, now);
    }
    let start = humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
        .map_err(|_| AuditError::BadTime { input: s.into() })?;
    let end = start + std::time::Duration::from_secs(86_400) - std::time::Duration::from_micros(1);
    Ok(record::format_ts(end))
}

/// A compiled filter: raw-line needles (all must occur) then exact checks on the parsed record.
#[derive(Debug, Default)]
pub struct Filter {
    needles: Vec<String>,
    text: Option<(String, String)>,
    pub since: Option<String>,
    pub until: Option<String>,
    service: Option<String>,
    table: Option<String>,
    column: Option<String>,
    decision: Option<String>,
    session: Option<u64>,
    sqlstate: Option<String>,
    kind: Option<String>,
    service_needles: Option<[String; 2]>,
    /// Records shown whatever the other criteria (statements of matching completions).
    also_seqs: std::collections::HashSet<u64>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl Filter {
    pub fn from_args(a: &SearchArgs, now: SystemTime) -> Result<Self, AuditError> {
        let mut f = Filter {
            since: a
                .since
                .as_deref()
                .map(|s| parse_time_arg(s, now))
                .transpose()?,
            until: a
                .until
                .as_deref()
                .map(|s| parse_until_arg(s, now))
                .transpose()?,
            service: a.service.clone(),
            table: a.table.clone(),
            column: a.column.clone(),
            decision: a.decision.clone(),
            session: a.session,
            sqlstate: a.sqlstate.clone(),
            kind: a.kind.clone(),
            ..Filter::default()
        };
        if let Some(s) = &a.service {
            // A failed login names the service it claimed as `user`.
            f.service_needles = Some([
                format!("\"service\":{}", json_str(s)),
                format!("\"user\":{}", json_str(s)),
            ]);
        }
        if let Some(t) = &a.table {
            // `…people"` is in the line whether the record names `people` or `x.people`.
            let name = t.rsplit('.').next().unwrap_or(t);
            f.needles
                .push(json_str(name).trim_start_matches('"').to_string());
        }
        if let Some(c) = &a.column {
            f.needles.push(json_str(c).trim_matches('"').to_string());
        }
        if let Some(d) = &a.decision {
            f.needles.push(format!("\"decision\":{}", json_str(d)));
        }
        if let Some(s) = a.session {
            f.needles.push(format!("\"session_id\":{s}"));
        }
        if let Some(s) = &a.sqlstate {
            f.needles.push(format!("\"sqlstate\":{}", json_str(s)));
        }
        if let Some(k) = &a.kind {
            f.needles.push(format!("\"kind\":{}", json_str(k)));
        }
        if let Some(t) = &a.text {
            f.text = Some((t.clone(), t.to_lowercase()));
        }
        Ok(f)
    }

    /// Cheap check on the raw line; false means the record cannot match.
    pub fn prefilter(&self, line: &str) -> bool {
        if !self.also_seqs.is_empty() && raw_seq(line).is_some_and(|s| self.also_seqs.contains(&s))
        {
            return true;
        }
        if let Some([a, b]) = &self.service_needles {
            if !line.contains(a.as_str()) && !line.contains(b.as_str()) {
                return false;
            }
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(ts) = raw_ts(line) else {
                return false;
            };
            if self.since.as_deref().is_some_and(|s| ts < s)
                || self.until.as_deref().is_some_and(|u| ts > u)
            {
                return false;
            }
        }
        if let Some((t, lower)) = &self.text {
            // JSON escapes only quotes, backslashes and control characters; for needles
            // with those, skip the raw check and rely on the parsed one.
            let plain = !t.contains(|c: char| c == '"' || c == '\\' || c.is_control());
            if plain && !line.contains(t.as_str()) && !line.contains(lower.as_str()) {
                return false;
            }
        }
        self.needles.iter().all(|n| line.contains(n.as_str()))
    }

    /// Exact check on the parsed record.
    pub fn matches(&self, r: &RecordView) -> bool {
        let eq = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        if self.also_seqs.contains(&r.seq) {
            return true;
        }
        eq(&self.service, r.service())
            && eq(&self.decision, r.decision.as_deref())
            && eq(&self.sqlstate, r.sqlstate.as_deref())
            && eq(&self.kind, Some(r.kind.as_str()))
            && self.session.is_none_or(|s| r.session_id() == Some(s))
            && self.table.as_deref().is_none_or(|t| r.touches_table(t))
            && self.column.as_deref().is_none_or(|c| r.touches_column(c))
            && self.text.as_ref().is_none_or(|(t, lower)| {
                r.sql.as_deref().is_some_and(|s| s.contains(t.as_str()))
                    || r.fingerprint
                        .as_deref()
                        .is_some_and(|f| f.contains(lower.as_str()))
            })
    }

    /// Whether a whole segment can be skipped from the start times in file names: records of
    /// a file are older than the start of the next file. (Assumes the clock did not step back.)
    fn skip_file(&self, this: &Path, next: Option<&PathBuf>) -> bool {
        let start = |p: &Path| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(record::segment_start_ts)
        };
        if let (Some(since), Some(next_start)) = (&self.since, next.and_then(|n| start(n))) {
            if since.get(..19).is_some_and(|s| next_start.as_str() < s) {
                return true;
            }
        }
        if let (Some(until), Some(this_start)) = (&self.until, start(this)) {
            if until.get(..19).is_some_and(|u| this_start.as_str() > u) {
                return true;
            }
        }
        false
    }
}

/// The `seq` of a raw record line without parsing it.
fn raw_seq(line: &str) -> Option<u64> {
    let i = line.find("\"seq\":")? + 6;
    let end = line[i..].find(|c: char| !c.is_ascii_digit())? + i;
    line[i..end].parse().ok()
}

/// The `ts` of a raw record line without parsing it (fixed position after `"ts":"`).
fn raw_ts(line: &str) -> Option<&str> {
    let i = line.find("\"ts\":\"")? + 6;
    let end = line[i..].find('"')? + i;
    Some(&line[i..end])
}

/// Streams every record of `paths` that passes `filter`, calling `f(raw_line, record)`;
/// `f` returns false to stop. Returns the number of lines scanned.
pub fn scan(
    paths: &[PathBuf],
    filter: &Filter,
    mut f: impl FnMut(&str, RecordView) -> bool,
) -> Result<u64, AuditError> {
    let dirs: Vec<&PathBuf> = paths.iter().filter(|p| p.is_dir()).collect();
    if dirs.len() >= 2 && dirs.len() == paths.len() {
        return scan_fleet(&dirs, filter, f);
    }
    let files = record::expand_paths(paths)?;
    let mut scanned = 0u64;
    let mut buf = String::new();
    for (i, path) in files.iter().enumerate() {
        if filter.skip_file(path, files.get(i + 1)) {
            continue;
        }
        let file = std::fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        loop {
            buf.clear();
            match reader.read_line(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                // Invalid UTF-8 can only be tampering or corruption; verify reports it.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                Err(e) => return Err(AuditError::io(path, e)),
            }
            scanned += 1;
            let line = buf.trim_end_matches('\n');
            if !filter.prefilter(line) {
                continue;
            }
            let Ok(rec) = serde_json::from_str::<RecordView>(line) else {
                continue;
            };
            if filter.matches(&rec) && !f(line, rec) {
                return Ok(scanned);
            }
        }
    }
    Ok(scanned)
}

/// The lines of one node's directory, file after file.
struct DirLines {
    files: std::vec::IntoIter<PathBuf>,
    reader: Option<(PathBuf, BufReader<std::fs::File>)>,
}

impl DirLines {
    fn new(dir: &Path) -> Result<Self, AuditError> {
        Ok(DirLines {
            files: record::list_segments(dir)?.into_iter(),
            reader: None,
        })
    }

    fn next_line(&mut self) -> Result<Option<String>, AuditError> {
        loop {
            if self.reader.is_none() {
                let Some(path) = self.files.next() else {
                    return Ok(None);
                };
                let file = std::fs::File::open(&path).map_err(|e| AuditError::io(&path, e))?;
                self.reader = Some((path, BufReader::with_capacity(1 << 20, file)));
            }
            let Some((path, reader)) = self.reader.as_mut() else {
                continue;
            };
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => self.reader = None,
                Ok(_) => return Ok(Some(line.trim_end_matches('\n').to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {}
                Err(e) => return Err(AuditError::io(path.as_path(), e)),
            }
        }
    }
}

/// Several nodes' directories (a fleet): their records merged by time (each node's records
/// are in time order already, so this is a k-way merge on `ts`).
fn scan_fleet(
    dirs: &[&PathBuf],
    filter: &Filter,
    mut f: impl FnMut(&str, RecordView) -> bool,
) -> Result<u64, AuditError> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut nodes = dirs
        .iter()
        .map(|d| DirLines::new(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut heap = BinaryHeap::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        if let Some(line) = n.next_line()? {
            heap.push(Reverse((
                raw_ts(&line).unwrap_or_default().to_string(),
                i,
                line,
            )));
        }
    }
    let mut scanned = 0u64;
    while let Some(Reverse((_, i, line))) = heap.pop() {
        if let Some(next) = nodes[i].next_line()? {
            heap.push(Reverse((
                raw_ts(&next).unwrap_or_default().to_string(),
                i,
                next,
            )));
        }
        scanned += 1;
        if !filter.prefilter(&line) {
            continue;
        }
        let Ok(rec) = serde_json::from_str::<RecordView>(&line) else {
            continue;
        };
        if filter.matches(&rec) && !f(&line, rec) {
            break;
        }
    }
    Ok(scanned)
}

fn truncate(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut t: String = one_line.chars().take(max - 1).collect();
    t.push('…');
    t
}

fn table_row(r: &RecordView) -> String {
    let what = r
        .sql
        .as_deref()
        .or(r.fingerprint.as_deref())
        .map(str::to_string)
        .or_else(|| r.reason.clone())
        .or_else(|| r.statement_seq.map(|s| format!("completes seq {s}")))
        .unwrap_or_default();
    format!(
        "{:>8} {:<27} {:<19} {:<14} {:>7} {:<8} {:<5} {:>6} {}",
        r.seq,
        r.ts,
        truncate(&r.kind, 19),
        truncate(r.service().unwrap_or("-"), 14),
        r.session_id().map_or("-".into(), |s| s.to_string()),
        r.decision.as_deref().unwrap_or("-"),
        r.sqlstate.as_deref().unwrap_or("-"),
        r.rows.map_or("-".into(), |n| n.to_string()),
        truncate(&what, 80)
    )
}

/// Runs a search, writing a table or JSON Lines to `out`. Returns (scanned, matched).
pub fn search(args: &SearchArgs, out: &mut dyn Write) -> Result<(u64, u64), AuditError> {
    let mut filter = Filter::from_args(args, SystemTime::now())?;
    if args.sqlstate.is_some() {
        // A completion's SQLSTATE is only useful with the statement it completes, which comes
        // earlier in the log: a first pass finds those statements.
        let mut statements = std::collections::HashSet::new();
        scan(&args.paths, &filter, |_, rec| {
            statements.extend(rec.statement_seq);
            true
        })?;
        filter.also_seqs = statements;
    }
    let mut matched = 0u64;
    let mut io_err = None;
    if !args.json {
        let header = format!(
            "{:>8} {:<27} {:<19} {:<14} {:>7} {:<8} {:<5} {:>6} {}",
            "SEQ", "TIME", "KIND", "SERVICE", "SESSION", "DECISION", "STATE", "ROWS", "STATEMENT"
        );
        writeln!(out, "{header}").map_err(|e| AuditError::io("<stdout>", e))?;
    }
    let scanned = scan(&args.paths, &filter, |line, rec| {
        matched += 1;
        let r = if args.json {
            writeln!(out, "{line}")
        } else {
            writeln!(out, "{}", table_row(&rec))
        };
        if let Err(e) = r {
            io_err = Some(e);
            return false;
        }
        args.limit == 0 || (matched as usize) < args.limit
    })?;
    if let Some(e) = io_err {
        // A closed pipe (`| head`) is a normal way to stop.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(AuditError::io("<stdout>", e));
        }
    }
    Ok((scanned, matched))
}

/// CLI entry point: 0 with matches, 1 without, 2 on error (like grep).
pub fn run_search(args: &SearchArgs) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match search(args, &mut stdout) {
        Ok((scanned, matched)) => {
            if !args.json {
                eprintln!("{matched} of {scanned} records matched");
            }
            if matched > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("audit search: {e}");
            ExitCode::from(2)
        }
    }
}
