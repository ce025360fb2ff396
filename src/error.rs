//! What a client may read when pgward refuses or fails something.
//!
//! Every refusal that reaches a client is a [`ClientError`]: one SQLSTATE and one message written
//! for the person who sent the SQL or opened the connection. Internal error types are not
//! converted into it wholesale, so their details (paths, upstream addresses, key names) never leak;
//! they go to the logs instead.

use bytes::Bytes;

use crate::protocol::build::{self, Severity};

/// SQLSTATEs pgward itself emits.
pub mod sqlstate {
    /// invalid_authorization_specification
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_password
    pub const INVALID_PASSWORD: &str = "28P01";
    /// insufficient_privilege
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// protocol_violation
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// connection_failure
    pub const CONNECTION_FAILURE: &str = "08006";
    /// sqlclient_unable_to_establish_sqlconnection
    pub const CANNOT_CONNECT: &str = "08001";
    /// too_many_connections
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// idle_session_timeout
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// feature_not_supported
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// syntax_error
    pub const SYNTAX_ERROR: &str = "42601";
    /// invalid_sql_statement_name (no such prepared statement)
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    /// invalid_cursor_name (no such portal)
    pub const INVALID_CURSOR_NAME: &str = "34000";
    /// io_error (the audit log cannot be written)
    pub const IO_ERROR: &str = "58030";
    /// program_limit_exceeded
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// internal_error
    pub const INTERNAL_ERROR: &str = "XX000";
}

/// Which stage of pgward refused a statement. It travels with the refusal, as a value, to
/// the client's error and into the statement's audit record (never guessed back from a
/// SQLSTATE or a message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A row policy, an allowlist, or the rule that what cannot be analysed is refused.
    Policy,
    /// Field encryption cannot serve the statement (e.g. a computation on ciphertext).
    Encryption,
    /// The message itself is malformed.
    Protocol,
    /// The statement could not be recorded (the audit log cannot write).
    AuditUnavailable,
}

impl RefusalKind {
    /// A decision pgward made about the statement (`true`), rather than a failure that kept
    /// it from running (`false`): audited as `refused` or as `failed`.
    pub fn is_decision(self) -> bool {
        !matches!(self, RefusalKind::AuditUnavailable)
    }
}

/// A statement pgward will not run: what kind of refusal, the rule that refused it
/// (`file:line` of the policy, when one did) and the error the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub rule: Option<String>,
    pub error: ClientError,
}

impl Refusal {
    /// A refusal of `kind` without a rule, failing the statement with `sqlstate`.
    pub fn new(kind: RefusalKind, sqlstate: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            rule: None,
            error: ClientError::error(sqlstate, message),
        }
    }
}

/// An error the client is allowed to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub fatal: bool,
    pub sqlstate: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ClientError {
    /// An error that ends the connection.
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            fatal: true,
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// An error that fails one statement; the session goes on.
    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            fatal: false,
            ..Self::fatal(sqlstate, message)
        }
    }

    /// The same error, ending the connection.
    pub fn into_fatal(self) -> Self {
        Self {
            fatal: true,
            ..self
        }
    }

    /// Add a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The ErrorResponse message.
    pub fn to_message(&self) -> Bytes {
        build::error_response(
            if self.fatal {
                Severity::Fatal
            } else {
                Severity::Error
            },
            self.sqlstate,
            &self.message,
            self.detail.as_deref(),
            self.hint.as_deref(),
        )
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.sqlstate)
    }
}

/// Prefix of the statement pgward sends upstream in place of a refused one (the session
/// state's `refusal_marker`; the pool recognises the stand-ins by it).
pub const REFUSAL_MARKER_PREFIX: &str = "pgward_refused_";
