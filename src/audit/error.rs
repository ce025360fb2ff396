//! Typed errors of the audit module.
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong while writing or reading the audit log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The sink could not write or fsync (disk full, permission, directory gone).
    /// `Arc` because one failed batch fails many waiters with the same cause.
    #[error("audit sink {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Another pgward (or another writer in this process) holds the directory's lock.
    #[error("audit directory {dir} is in use by another pgward (its lock file pgward-audit.lock is held): one writer per directory; give each instance its own `[audit] dir`")]
    Locked { dir: PathBuf },
    /// The external anchor (checkpoint table or syslog copy) could not be read.
    #[error("audit anchor: {0}")]
    Anchor(String),
    /// An fsync did not answer within `durability_timeout`: the disk is stalled (or far
    /// slower than any statement may wait); the records may still become durable later.
    #[error("audit log: the records were not made durable within {0:?} (durability_timeout): the disk's fsync is stalled")]
    DurabilityTimeout(std::time::Duration),
    /// The writer has stopped (shutdown or panic); nothing more can be made durable.
    #[error("audit log is closed")]
    Closed,
    /// A configuration value is unusable.
    #[error("audit configuration: {0}")]
    Config(String),
    /// The checkpoint signing key (or a public key) could not be loaded or created.
    #[error("audit key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// A record could not be serialised (should not happen for the types in this module).
    #[error("serialising audit record: {0}")]
    Serialize(String),
    /// A time argument (`--since`, `--until`) could not be parsed.
    #[error("bad time {input:?}: expected RFC3339 (2024-05-01T10:00:00Z), a date (2024-05-01, UTC) or a relative duration (1h, 30m)")]
    BadTime { input: String },
}

impl AuditError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AuditError::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}

impl From<serde_json::Error> for AuditError {
    fn from(e: serde_json::Error) -> Self {
        AuditError::Serialize(e.to_string())
    }
}
