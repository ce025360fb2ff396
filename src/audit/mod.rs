//! Durable, tamper-evident audit log of every statement that reaches pgward, and the
//! auditor tools (`verify`, `search`, `report`).
//!
//! # Use
//! [`AuditLog::open`] recovers the chain and starts one writer thread; sessions clone the
//! [`AuditHandle`]. [`AuditHandle::append`] resolves once the record is durable (written and
//! fsync'ed, group-committed with every other queued record).
//! [`AuditHandle::append_staged`] resolves once the records are written to the file, with a
//! [`DurableReceipt`] for the fsync: the proxy forwards a statement once its record is
//! written and holds the statement's responses until the receipt resolves (`durability =
//! "before_response"`), or forwards only once it is durable (`"before_forward"`).
//! Completion records go through [`AuditHandle::append_nowait`]. When an append fails the
//! caller applies [`AuditHandle::on_failure`].
//!
//! # Files
//! JSON Lines segments `audit-<first seq, 20 digits>-<UTC start YYYYMMDDTHHMMSSZ>.jsonl` in
//! the configured directory. A new segment starts at every `open`, after `rotate_size` bytes
//! or `rotate_interval`, and after a write error. Files are only ever appended to.
//!
//! # Record format (one JSON object per line)
//! Envelope, always first and in this order: `v` (format, 1), `seq` (0, 1, 2, … with no gaps
//! across files), `ts` (RFC 3339 UTC, microseconds, fixed width), `node`, `prev` (hex SHA-256
//! of the previous record; 64 zeros for seq 0), `kind`. Then the fields of the kind:
//! `statement`, `statement_completed`, `connection_opened`, `connection_closed`,
//! `auth_failed` (see [`event`]), and the writer's own `checkpoint`, `recovery`,
//! `audit_started` / `audit_stopped` (effective settings), `audit_outage` (one per write
//! outage, with counts) and `truncation_detected` (the log did not reach its anchor at start).
//! Segment files are created with mode 0600.
//!
//! # Hash chain — canonical serialisation
//! The hash of a record is SHA-256 over **the exact bytes of its line, without the trailing
//! newline**. Those bytes are the canonical form: the verifier never re-serialises, so no
//! JSON canonicalisation rules are involved and any change of any byte (including
//! whitespace or field order) breaks the link held in the next record's `prev`.
//!
//! # Checkpoints
//! `{"kind":"checkpoint","reason":"start"|"interval"|"rotation"|"shutdown","covers_seq":N-1,
//! "interval_ms":…,"key_id":…,"sig":…}` is written after `audit_started` at every open, every
//! `checkpoint_interval` (idle or not), as the last record of a rotated file and after
//! `audit_stopped` at shutdown. `sig` is always the last field: base64 Ed25519 over
//! `"pgward-audit-checkpoint-v2\n"` followed by the exact bytes of the line before
//! `,"sig":"`, so it commits to every field and, through `prev`, to the whole chain before
//! it. (Format 1 signed `"pgward-audit-checkpoint-v1\n{node}\n{seq}\n{ts}\n{prev}\n{reason}"`;
//! `verify` still accepts it.) `key_id` is the first 8 bytes (hex) of SHA-256 of the public
//! key. Without a signing key `key_id`/`sig` are absent.
//!
//! # One writer per directory
//! The writer holds an exclusive `flock` on `pgward-audit.lock` in the directory, taken
//! before the tail is read; a second instance fails with [`AuditError::Locked`].
//!
//! # Recovery
//! On open, the newest segment is scanned; bytes after the last complete valid line are a
//! tear. If the log did not end with a `shutdown` checkpoint, the new segment starts with
//! `{"kind":"recovery","reason":"unclean_shutdown"|"write_error","file":…,"torn_bytes":n,
//! "resumed_after_seq":…}` chained to the last valid record. `verify` accepts a torn line
//! only when such a record names its file and byte count, and reports it as a recovered
//! truncation.
//!
//! # What verify detects
//! Edited, deleted, inserted, reordered records (prev/seq mismatch); deleted whole files
//! (gap at the file boundary); tail truncation (the log must end with a `shutdown`
//! checkpoint; with `--live`, the newest checkpoint must be at most one interval plus slack
//! old); forged or re-signed checkpoints and full rewrites (signature check with
//! `--public-key`). Not detectable from the files alone: removing the newest whole files
//! back to an earlier clean shutdown, or truncating and restarting — `verify --anchor`
//! compares the log with the checkpoints published outside the host (see [`anchor`]).
pub mod anchor;
mod config;
mod error;
pub mod event;
pub mod export;
mod handle;
mod lifecycle;
mod lock;
pub mod record;
pub mod report;
mod report_sections;
pub mod search;
mod signing;
mod syslog_sink;
mod syslog_tls;
mod table_sink;
pub mod verify;
mod writer;

#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod tests;

pub use config::{AuditConfig, Durability, OnFailure, SyslogTlsConfig};
pub use error::AuditError;
pub use event::{
    statement_session_json, AuditEvent, BoundParam, Decision, Protocol, SessionInfo, SqlText,
    StatementRecord, Touched,
};
pub use handle::{AuditHandle, AuditStats, DurableReceipt};
pub use report::{run_report, ReportArgs};
pub use search::{run_search, SearchArgs};
pub use signing::{load_public_key, public_key_path, SigningKey};
pub use verify::{run_verify, VerifyArgs, VerifyReport};
pub use writer::AuditLog;

/// Creates (if needed) `dir` and writes and removes a probe file in it: whether an audit log
/// could be written there (`pgward check`, `/readyz`).
pub fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".pgward-check-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(&probe)
}
