//! `pgward audit export`: the records in formats other tools already read — OCSF-style JSON
//! (Datastore / Authentication activity) for a SIEM, or pgAudit-like CSV lines for tools that
//! parse pgAudit. Selection uses the same filters as `search`.
use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::search::{scan, Filter, RecordView, SearchArgs};
use super::AuditError;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One OCSF-style JSON event per line.
    Ocsf,
    /// pgAudit-style `AUDIT: SESSION,…` CSV lines, one per statement.
    PgauditCsv,
}

/// Arguments of `pgward audit export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    #[command(flatten)]
    pub filter: SearchArgs,
}

fn epoch_ms(ts: &str) -> u64 {
    humantime::parse_rfc3339(ts)
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// OCSF-style event: Datastore Activity (class 6005) for statements, Authentication (3002)
/// for logins; pgward's own fields that have no OCSF slot go to `unmapped`.
pub fn to_ocsf(r: &RecordView) -> Option<Value> {
    let (class_uid, class_name, category_uid) = match r.kind.as_str() {
        "statement" => (6005, "Datastore Activity", 6),
        "auth_failed" | "connection_opened" => (3002, "Authentication", 3),
        _ => return None,
    };
    let success = match r.kind.as_str() {
        "auth_failed" => false,
        _ => r.decision.as_deref().is_none_or(|d| d == "allowed"),
    };
    let src = r
        .client_addr
        .as_deref()
        .or(r.session.as_ref().map(|s| s.client_addr.as_str()))
        .unwrap_or_default();
    Some(json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "time": epoch_ms(&r.ts),
        "status": if success { "Success" } else { "Failure" },
        "status_id": if success { 1 } else { 2 },
        "status_code": r.sqlstate,
        "status_detail": r.reason,
        "actor": {"user": {"name": r.service()}},
        "src_endpoint": {"ip": src.rsplit_once(':').map_or(src, |(h, _)| h)},
        "query_info": {"query_string": r.sql, "uid": r.fingerprint},
        "metadata": {
            "product": {"name": "pgward", "vendor_name": "pgward"},
            "version": "1.1.0",
            "uid": format!("{}:{}", r.node, r.seq),
            "log_name": "pgward-audit",
        },
        "unmapped": {
            "kind": r.kind,
            "rule": r.rule,
            "tables_read": r.tables_read,
            "tables_written": r.tables_written,
            "columns_read": r.columns_read,
            "columns_written": r.columns_written,
            "encrypted_columns": r.encrypted_columns,
            "session_id": r.session_id(),
        },
    }))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `AUDIT: SESSION,<statement id>,1,<class>,<command>,<object type>,<object name>,<statement>,<parameter>`
/// for a statement record (pgAudit's session log line). The statement id is the record's seq;
/// the class is WRITE when a table is written, READ when one is read, else MISC; parameters
/// are never exported.
pub fn to_pgaudit_csv(r: &RecordView) -> Option<String> {
    if r.kind != "statement" {
        return None;
    }
    let sql = r.sql.as_deref().or(r.fingerprint.as_deref()).unwrap_or("");
    let command: String = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    let (class, object) = match (r.tables_written.first(), r.tables_read.first()) {
        (Some(t), _) => ("WRITE", t.as_str()),
        (None, Some(t)) => ("READ", t.as_str()),
        (None, None) => ("MISC", ""),
    };
    let object_type = if object.is_empty() { "" } else { "TABLE" };
    Some(format!(
        "AUDIT: SESSION,{},1,{class},{},{object_type},{},{},<not logged>",
        r.seq,
        csv_field(&command),
        csv_field(object),
        csv_field(sql)
    ))
}

/// Writes the selected records in `args.format`; returns how many were exported.
pub fn export(args: &ExportArgs, out: &mut dyn Write) -> Result<u64, AuditError> {
    let filter = Filter::from_args(&args.filter, SystemTime::now())?;
    let mut n = 0u64;
    let mut io_err = None;
    scan(&args.filter.paths, &filter, |_, r| {
        let line = match args.format {
            ExportFormat::Ocsf => to_ocsf(&r).map(|v| v.to_string()),
            ExportFormat::PgauditCsv => to_pgaudit_csv(&r),
        };
        if let Some(line) = line {
            if let Err(e) = writeln!(out, "{line}") {
                io_err = Some(e);
                return false;
            }
            n += 1;
        }
        args.filter.limit == 0 || (n as usize) < args.filter.limit
    })?;
    match io_err {
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(AuditError::io("<stdout>", e)),
        _ => Ok(n),
    }
}

/// CLI entry point: 0 on success, 2 on error.
pub fn run_export(args: &ExportArgs) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match export(args, &mut stdout) {
        Ok(n) => {
            eprintln!("{n} records exported");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("audit export: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> RecordView {
        serde_json::from_value(json!({
            "seq": 7, "ts": "2026-12-03T10:00:00.000000Z", "node": "n1", "kind": "statement",
            "service": "billing", "decision": "refused", "rule": "r1", "sqlstate": "42501",
            "sql": "DELETE FROM people, x", "tables_written": ["public.people"],
            "client_addr": "10.0.0.1:5000"
        }))
        .unwrap()
    }

    #[test]
    fn ocsf_event_has_class_status_actor_and_source() {
        let v = to_ocsf(&statement()).unwrap();
        assert_eq!(v["class_uid"], 6005);
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["actor"]["user"]["name"], "billing");
        assert_eq!(v["src_endpoint"]["ip"], "10.0.0.1");
        assert_eq!(v["metadata"]["uid"], "n1:7");
        assert_eq!(v["time"], 1_796_292_000_000u64);
    }

    #[test]
    fn pgaudit_line_quotes_csv_fields() {
        let line = to_pgaudit_csv(&statement()).unwrap();
        assert_eq!(
            line,
            "AUDIT: SESSION,7,1,WRITE,DELETE,TABLE,public.people,\"DELETE FROM people, x\",<not logged>"
        );
    }
}
