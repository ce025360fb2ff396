//! What callers hand to the audit log. Serialising an event yields the kind-specific part of
//! a record; the writer adds the envelope (`v`, `seq`, `ts`, `node`, `prev`).
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

/// The facts of one authenticated client connection, shared by all its records.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SessionInfo {
    pub session_id: u64,
    pub client_addr: String,
    pub tls: bool,
    /// Subject of the verified client certificate, if any.
    pub cert_identity: Option<String>,
    pub service: String,
    /// The token's `jti`.
    pub token_id: Option<String>,
    pub database: String,
    /// The claims the policy engine actually used (not the whole token).
    pub claims_used: serde_json::Map<String, serde_json::Value>,
    /// The PostgreSQL role pgward logged in as for this session (`%u` in the server's log).
    pub upstream_role: Option<String>,
    /// The upstream backend's process id (`%p` in the server's `log_line_prefix`).
    pub backend_pid: Option<u32>,
    /// The client's `application_name` startup parameter (`%a`).
    pub application_name: Option<String>,
}

/// Outcome of the policy decision for a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Forwarded to the server.
    Allowed,
    /// Refused by a policy rule.
    Refused,
    /// Could not be processed (parse/rewrite error, audit failure, upstream error).
    Failed,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Refused => "refused",
            Decision::Failed => "failed",
        }
    }
}

/// How the statement arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A statement inside a simple-protocol Query message.
    Simple,
    /// One Execute of the extended protocol.
    Extended,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
        }
    }
}

/// One bound parameter. The value of a sensitive parameter (bound to an encrypted column)
/// is dropped by its constructor, so no setting can ever serialise it.
#[derive(Debug, Clone, Serialize)]
pub struct BoundParam {
    /// PostgreSQL type OID (0 when unspecified by the client).
    pub type_oid: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// Present only when `record_values` is on and the parameter is not sensitive.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

impl BoundParam {
    /// A parameter bound to an encrypted column: only its type is ever recorded.
    pub fn sensitive(type_oid: u32) -> Self {
        BoundParam {
            type_oid,
            sensitive: true,
            value: None,
        }
    }

    /// A parameter of a non-encrypted column. Text-format values are kept as text, binary
    /// values as `\x` hex, NULL as `None`; whether they are written depends on
    /// `record_values`.
    pub fn plain(type_oid: u32, value: Option<&[u8]>) -> Self {
        let value = value.map(|v| match std::str::from_utf8(v) {
            Ok(s) => s.to_string(),
            Err(_) => format!("\\x{}", hex::encode(v)),
        });
        BoundParam {
            type_oid,
            sensitive: false,
            value,
        }
    }

    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }
}

/// The statement text. When it contains literals bound for encrypted columns the caller
/// says so and the original is dropped at construction; only the redacted form remains.
/// Shared strings: each execution of a prepared statement clones its text into the record.
#[derive(Debug, Clone)]
pub struct SqlText {
    redacted: Arc<str>,
    /// `None` when the text carried sensitive literals.
    original: Option<Arc<str>>,
}

impl SqlText {
    /// `has_sensitive_literals`: true if any literal in `sql` targets an encrypted column
    /// (or the caller cannot tell — then pass true).
    pub fn new(sql: &str, has_sensitive_literals: bool) -> Self {
        SqlText {
            redacted: crate::sql::fingerprint::redact(sql).into(),
            original: (!has_sensitive_literals).then(|| sql.into()),
        }
    }

    /// The text whose redaction the caller already has (every statement of a shape redacts
    /// alike: see [`crate::sql::fingerprint::RedactedText`]).
    pub fn with_redacted(sql: &str, redacted: Arc<str>, has_sensitive_literals: bool) -> Self {
        SqlText {
            redacted,
            original: (!has_sensitive_literals).then(|| sql.into()),
        }
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The text to record under the given `record_values` setting.
    fn recorded(&self, record_values: bool) -> &str {
        match (&self.original, record_values) {
            (Some(orig), true) => orig,
            _ => &self.redacted,
        }
    }
}

/// Everything known about one statement when the policy decided on it.
#[derive(Debug, Clone)]
pub struct StatementRecord {
    pub session: Arc<SessionInfo>,
    pub protocol: Protocol,
    /// Prepared-statement / portal name for extended protocol, if named.
    pub statement_name: Option<String>,
    pub sql: SqlText,
    /// Computed once per text (per prepared statement for all its executions).
    pub fingerprint: Arc<str>,
    pub decision: Decision,
    pub rule: Option<String>,
    pub reason: Option<String>,
    /// What the statement touches: shared by every record of the same analysis (see
    /// [`StatementRecord::touched_mut`] to fill it in).
    pub touched: Arc<Touched>,
    pub params: Vec<BoundParam>,
    /// SQLSTATE sent to the client when refused/failed here.
    pub sqlstate: Option<String>,
    /// One statement of a simple Query that carried several: (its position from 1, how many).
    pub part: Option<(u32, u32)>,
    /// The session's fields as serialised once per session ([`statement_session_json`]);
    /// serialised from `session` when absent.
    pub session_json: Option<Arc<str>>,
}

/// What a statement touches, as its record names it. Built once per analysis and shared by
/// every record made from it (each execution of a prepared statement), with its part of the
/// record serialised once.
#[derive(Debug, Default)]
pub struct Touched {
    /// Hex SHA-256 of the statement actually forwarded after rewriting, with its literals
    /// redacted ([`crate::sql::fingerprint::redacted_sha256`]): a hash of the text with its
    /// values would let whoever reads the log test guesses at them.
    pub rewritten_redacted_sha256: Option<Arc<str>>,
    pub tables_read: Vec<String>,
    pub tables_written: Vec<String>,
    /// `table.column`.
    pub columns_read: Vec<String>,
    pub columns_written: Vec<String>,
    /// Encrypted columns (`table.column`) this statement touches, read or written.
    pub encrypted_columns: Vec<String>,
    /// pgAudit's class of each statement of the text (`READ`, `WRITE`, `DDL`, `ROLE`,
    /// `FUNCTION`, `MISC`), distinct, in order; empty when the text did not parse.
    pub command_class: Vec<&'static str>,
    /// `"rewritten_redacted_sha256":…,"tables_read":[…],…,"command_class":[…]`, once serialised.
    json: OnceLock<Box<str>>,
}

impl Clone for Touched {
    /// A copy to change: its serialised form is made again.
    fn clone(&self) -> Self {
        Touched {
            rewritten_redacted_sha256: self.rewritten_redacted_sha256.clone(),
            tables_read: self.tables_read.clone(),
            tables_written: self.tables_written.clone(),
            columns_read: self.columns_read.clone(),
            columns_written: self.columns_written.clone(),
            encrypted_columns: self.encrypted_columns.clone(),
            command_class: self.command_class.clone(),
            json: OnceLock::new(),
        }
    }
}

impl Touched {
    /// Stores the hash of the rewritten statement, redacted (never its text: it may hold
    /// ciphertext and values), made here from `rewritten_sql` unless the caller has it.
    pub fn set_rewritten(&mut self, rewritten_sql: &str, hash: Option<&Arc<str>>) {
        self.rewritten_redacted_sha256 = Some(match hash {
            Some(hash) => hash.clone(),
            None => crate::sql::fingerprint::redacted_sha256(rewritten_sql),
        });
    }
}

impl StatementRecord {
    /// A record with the fingerprint computed; other fields start empty/allowed.
    pub fn new(session: Arc<SessionInfo>, protocol: Protocol, sql: SqlText) -> Self {
        let fingerprint = crate::sql::fingerprint::fingerprint(sql.redacted()).into();
        Self::with_fingerprint(session, protocol, sql, fingerprint)
    }

    /// A record whose fingerprint the caller computed earlier (e.g. once per prepared
    /// statement rather than once per execution).
    pub fn with_fingerprint(
        session: Arc<SessionInfo>,
        protocol: Protocol,
        sql: SqlText,
        fingerprint: Arc<str>,
    ) -> Self {
        StatementRecord {
            session,
            protocol,
            statement_name: None,
            sql,
            fingerprint,
            decision: Decision::Allowed,
            rule: None,
            reason: None,
            touched: Arc::default(),
            params: Vec::new(),
            sqlstate: None,
            part: None,
            session_json: None,
        }
    }

    /// What the statement touches, to fill in (copied first when it is shared).
    pub fn touched_mut(&mut self) -> &mut Touched {
        let touched = Arc::make_mut(&mut self.touched);
        touched.json.take();
        touched
    }
}

/// One auditable event.
#[derive(Debug, Clone)]
pub enum AuditEvent {
    ConnectionOpened(Arc<SessionInfo>),
    ConnectionClosed {
        session: Arc<SessionInfo>,
        duration: Duration,
        statements: u64,
        /// e.g. "client terminated", "idle timeout", "token expired".
        reason: Option<String>,
    },
    AuthFailed {
        client_addr: String,
        tls: bool,
        cert_identity: Option<String>,
        /// The user / service name the client claimed, if any.
        user: Option<String>,
        database: Option<String>,
        token_id: Option<String>,
        reason: String,
        sqlstate: String,
    },
    Statement(Box<StatementRecord>),
    /// A SIGHUP changed settings of the running log.
    SettingsChanged {
        changed: Vec<&'static str>,
        settings: serde_json::Value,
    },
    StatementCompleted {
        session_id: u64,
        /// Shared by every completion of a session (no copy of the name per statement).
        service: Arc<str>,
        /// The `seq` returned by `append` for the statement.
        statement_seq: u64,
        rows: Option<u64>,
        /// e.g. "SELECT", "INSERT" (the tag without counts).
        command: Option<String>,
        duration: Duration,
        /// Set when the server returned an error. The message is not kept: it can quote values.
        sqlstate: Option<String>,
        /// Never run: an earlier statement of the same Query or pipeline failed.
        skipped: bool,
        /// An Execute with a row limit that stopped at PortalSuspended: `rows` are the rows
        /// this Execute returned; the portal's further rows are on the records of the later
        /// Executes of the same portal.
        suspended: bool,
    },
}

mod wire;
pub use wire::statement_session_json;

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn session() -> Arc<SessionInfo> {
        Arc::new(SessionInfo {
            session_id: 7,
            client_addr: "10.0.0.1:5555".into(),
            tls: true,
            cert_identity: Some("CN=orders".into()),
            service: "orders".into(),
            token_id: Some("jti-1".into()),
            database: "shop".into(),
            claims_used: serde_json::Map::new(),
            ..SessionInfo::default()
        })
    }

    fn json(ev: &AuditEvent, record_values: bool) -> String {
        let mut v = Vec::new();
        ev.write_json(record_values, &mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    fn stmt(sensitive_literals: bool) -> AuditEvent {
        let mut st = StatementRecord::new(
            session(),
            Protocol::Extended,
            SqlText::new(
                "UPDATE people SET ssn = '123-45-6789', note = 'hello' WHERE id = $1",
                sensitive_literals,
            ),
        );
        st.params = vec![
            BoundParam::sensitive(25),
            BoundParam::plain(23, Some(b"4711")),
        ];
        st.touched_mut().encrypted_columns = vec!["people.ssn".into()];
        AuditEvent::Statement(Box::new(st))
    }

    #[test]
    fn values_are_not_recorded_by_default() {
        let s = json(&stmt(false), false);
        assert!(!s.contains("123-45-6789"), "{s}");
        assert!(!s.contains("hello"), "{s}");
        assert!(!s.contains("4711"), "{s}");
        assert!(s.contains(r#""param_count":2"#), "{s}");
        assert!(s.contains(r#"{"type_oid":25,"sensitive":true}"#), "{s}");
        assert!(
            s.starts_with(r#"{"kind":"statement","session_id":7"#),
            "{s}"
        );
    }

    #[test]
    fn sensitive_values_never_recorded_even_with_record_values() {
        // caller says the text contains a literal for an encrypted column
        let s = json(&stmt(true), true);
        assert!(!s.contains("123-45-6789"), "{s}");
        // the plain parameter may be recorded, the sensitive one never
        assert!(s.contains(r#"{"type_oid":23,"value":"4711"}"#), "{s}");
        assert!(s.contains(r#"{"type_oid":25,"sensitive":true}"#), "{s}");
        // and there is no way to even hold the value of a sensitive parameter
        assert_eq!(BoundParam::sensitive(25).value(), None);
    }

    #[test]
    fn record_values_keeps_plain_text() {
        let s = json(&stmt(false), true);
        assert!(s.contains("hello"), "{s}");
    }

    #[test]
    fn the_rewritten_statement_is_hashed_redacted() {
        let mut st =
            StatementRecord::new(session(), Protocol::Simple, SqlText::new("select 1", false));
        let rewritten = "select enc_secret from t where ssn = '123-45-6789' and tenant_id = 7";
        st.touched_mut().set_rewritten(rewritten, None);
        let s = json(&AuditEvent::Statement(Box::new(st)), true);
        assert!(!s.contains("enc_secret"));
        // Not the hash of the text itself: that one would confirm a guess at the SSN.
        assert!(!s.contains(&hex::encode(Sha256::digest(rewritten))), "{s}");
        let redacted = "select enc_secret from t where ssn = ? and tenant_id = ?";
        assert!(s.contains(&hex::encode(Sha256::digest(redacted))), "{s}");
    }

    /// The statement record as serialised before the session's fields were pre-serialised
    /// once per session: byte for byte, with and without the pre-serialised form.
    #[test]
    fn statement_records_keep_their_bytes() {
        let golden = [
            (
                false,
                false,
                r#"{"kind":"statement","session_id":7,"service":"orders","database":"shop","client_addr":"10.0.0.1:5555","cert_identity":"CN=orders","token_id":"jti-1","claims_used":{},"protocol":"extended","statement_name":null,"decision":"allowed","rule":null,"reason":null,"sqlstate":null,"fingerprint":"update people set ssn = ?, note = ? where id = $1","sql":"UPDATE people SET ssn = ?, note = ? WHERE id = $1","rewritten_redacted_sha256":null,"tables_read":[],"tables_written":[],"columns_read":[],"columns_written":[],"encrypted_columns":["people.ssn"],"command_class":["READ"],"param_count":2,"params":[{"type_oid":25,"sensitive":true},{"type_oid":23}],"part":2,"parts":3}"#,
            ),
            (
                false,
                true,
                r#"{"kind":"statement","session_id":7,"service":"orders","database":"shop","client_addr":"10.0.0.1:5555","cert_identity":"CN=orders","token_id":"jti-1","claims_used":{},"protocol":"extended","statement_name":null,"decision":"allowed","rule":null,"reason":null,"sqlstate":null,"fingerprint":"update people set ssn = ?, note = ? where id = $1","sql":"UPDATE people SET ssn = '123-45-6789', note = 'hello' WHERE id = $1","rewritten_redacted_sha256":null,"tables_read":[],"tables_written":[],"columns_read":[],"columns_written":[],"encrypted_columns":["people.ssn"],"command_class":["READ"],"param_count":2,"params":[{"type_oid":25,"sensitive":true},{"type_oid":23,"value":"4711"}],"part":2,"parts":3}"#,
            ),
            (
                true,
                true,
                r#"{"kind":"statement","session_id":7,"service":"orders","database":"shop","client_addr":"10.0.0.1:5555","cert_identity":"CN=orders","token_id":"jti-1","claims_used":{},"protocol":"extended","statement_name":null,"decision":"allowed","rule":null,"reason":null,"sqlstate":null,"fingerprint":"update people set ssn = ?, note = ? where id = $1","sql":"UPDATE people SET ssn = ?, note = ? WHERE id = $1","rewritten_redacted_sha256":null,"tables_read":[],"tables_written":[],"columns_read":[],"columns_written":[],"encrypted_columns":["people.ssn"],"command_class":[],"param_count":2,"params":[{"type_oid":25,"sensitive":true},{"type_oid":23,"value":"4711"}]}"#,
            ),
        ];
        for (sensitive, record_values, expected) in golden {
            let AuditEvent::Statement(mut st) = stmt(sensitive) else {
                unreachable!()
            };
            if !sensitive {
                st.part = Some((2, 3));
                st.touched_mut().command_class = vec!["READ"];
            }
            let plain = AuditEvent::Statement(st.clone());
            assert_eq!(json(&plain, record_values), expected);
            st.session_json = Some(statement_session_json(&st.session).unwrap());
            let pre = AuditEvent::Statement(st);
            assert_eq!(json(&pre, record_values), expected);
        }
    }
}
