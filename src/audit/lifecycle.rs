//! Bodies of the writer's own records: `audit_started` / `audit_stopped` (the effective
//! settings, so switching auditing off or weakening it leaves a trace an auditor can see)
//! and `checkpoint`.
use std::time::Duration;

use serde_json::{json, Value};

use super::config::AuditConfig;
use super::AuditError;

/// The settings an auditor needs to judge what the log promises. Paths and URLs are
/// reduced to whether they are set: the log must not carry connection strings.
pub(crate) fn settings(config: &AuditConfig) -> Value {
    json!({
        "enabled": config.enabled,
        "on_failure": config.on_failure,
        "durability": config.durability,
        "fsync": config.fsync,
        "record_values": config.record_values,
        "checkpoint_interval_ms": millis(config.checkpoint_interval),
        "rotate_size": config.rotate_size,
        "rotate_interval_ms": millis(config.rotate_interval),
        "signed": config.signing_key_file.is_some(),
        "table_sink": config.table_sink_url.is_some(),
        "syslog": config.syslog_socket.is_some(),
        "syslog_tls": config.syslog_tls.is_some(),
        "pgward_version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn started_body(settings: &Value) -> Result<Vec<u8>, AuditError> {
    Ok(serde_json::to_vec(
        &json!({"kind": "audit_started", "settings": settings}),
    )?)
}

pub(crate) fn stopped_body(settings: &Value) -> Result<Vec<u8>, AuditError> {
    Ok(serde_json::to_vec(
        &json!({"kind": "audit_stopped", "settings": settings}),
    )?)
}

/// A period during which the log could not be written.
#[derive(Debug, Clone)]
pub(crate) struct Outage {
    started: String,
    error: String,
    pub failed_writes: u64,
    /// Appends whose caller waited for durability (statements refused under
    /// `on_failure = "refuse"`, run unaudited under `"continue"`).
    pub appends_failed: u64,
    /// Records not waited for (completions, connection records) that were lost.
    pub records_lost: u64,
}

impl Outage {
    pub(crate) fn new(started: String, error: &AuditError) -> Self {
        Outage {
            started,
            error: error.to_string(),
            failed_writes: 0,
            appends_failed: 0,
            records_lost: 0,
        }
    }

    /// `{"kind":"audit_outage","started":…,"ended":…,"failed_writes":…,
    /// "statements_refused_or_unaudited":…,"records_lost":…,"error":…}`
    pub(crate) fn body(&self, ended: &str) -> Result<Vec<u8>, AuditError> {
        Ok(serde_json::to_vec(&json!({
            "kind": "audit_outage",
            "started": self.started,
            "ended": ended,
            "failed_writes": self.failed_writes,
            "statements_refused_or_unaudited": self.appends_failed,
            "records_lost": self.records_lost,
            "error": self.error,
        }))?)
    }
}

/// Written at start when the log's head is behind (or differs from) its newest checkpoint
/// anchored outside the host: the chain goes on from the local head, and this record says
/// which anchored checkpoint it no longer reaches.
pub(crate) fn truncation_body(
    anchor: &super::anchor::Anchor,
    why: &str,
    next_seq: u64,
) -> Result<Vec<u8>, AuditError> {
    Ok(serde_json::to_vec(&json!({
        "kind": "truncation_detected",
        "reason": why,
        "anchor_seq": anchor.seq,
        "anchor_ts": anchor.ts,
        "anchor_prev": anchor.prev,
        "local_next_seq": next_seq,
    }))?)
}

/// `{"kind":"checkpoint","reason":…,"covers_seq":…,"interval_ms":…[,"key_id":…]}`: the
/// writer appends `"sig"` as the last field after signing the line up to here.
/// `interval_ms` is the longest a running writer goes without a checkpoint; `verify --live`
/// bounds the unsigned tail with it.
pub(crate) fn checkpoint_body(
    reason: &str,
    seq: u64,
    interval: Duration,
    key_id: Option<String>,
) -> Result<Vec<u8>, AuditError> {
    let mut body = serde_json::Map::new();
    body.insert("kind".into(), "checkpoint".into());
    body.insert("reason".into(), reason.into());
    body.insert("covers_seq".into(), seq.checked_sub(1).into());
    body.insert("interval_ms".into(), millis(interval).into());
    if let Some(id) = key_id {
        body.insert("key_id".into(), id.into());
    }
    let bytes = serde_json::to_vec(&Value::Object(body))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_what_matters_and_no_secrets() {
        let mut c = AuditConfig::new("/x");
        c.table_sink_url = Some("postgres://u:secret@h/db".into());
        let s = settings(&c);
        assert_eq!(s["on_failure"], "refuse");
        assert_eq!(s["table_sink"], true);
        assert!(!s.to_string().contains("secret"));
        let body = checkpoint_body("interval", 0, Duration::from_secs(1), None).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["covers_seq"], Value::Null);
        assert_eq!(v["interval_ms"], 1000);
        assert_eq!(*body.last().unwrap(), b'}');
    }
}
