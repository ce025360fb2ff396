//! How events are written: each kind's JSON object, in its on-disk field order. The two records
//! every statement makes — its own and its completion — are written by hand (constant keys,
//! values through serde_json's string escaping): serde's map serialisation escapes each key
//! and costs more than the values; a statement's redacted text and fingerprint, the same for
//! every record of its shape or prepared statement, are escaped once and kept (`TextJson`). The
//! derived forms they replace are kept in the tests as the reference they must equal byte for
//! byte.
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::{AuditEvent, BoundParam, Decision, SessionInfo, StatementRecord, Touched};

impl Touched {
    /// This part of the record, serialised (once).
    fn json(&self) -> Result<&str, serde_json::Error> {
        if let Some(json) = self.json.get() {
            return Ok(json);
        }
        let mut out = Vec::with_capacity(192);
        write_fields(
            &mut out,
            &TouchedWire {
                rewritten_redacted_sha256: self.rewritten_redacted_sha256.as_deref(),
                tables_read: &self.tables_read,
                tables_written: &self.tables_written,
                columns_read: &self.columns_read,
                columns_written: &self.columns_written,
                encrypted_columns: &self.encrypted_columns,
                command_class: &self.command_class,
            },
        )?;
        let json = String::from_utf8(out)
            .map_err(|e| serde::ser::Error::custom(e.to_string()))?
            .into_boxed_str();
        Ok(self.json.get_or_init(|| json))
    }
}

fn micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The serialised shape of an event. Field order here is the on-disk field order.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Built on the stack for one serialisation and dropped at once; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
enum Wire<'a> {
    ConnectionOpened {
        decision: Decision,
        session: &'a SessionInfo,
    },
    ConnectionClosed {
        session_id: u64,
        service: &'a str,
        #[serde(serialize_with = "micros")]
        duration_us: Duration,
        statements: u64,
        reason: Option<&'a str>,
    },
    AuthFailed {
        decision: Decision,
        client_addr: &'a str,
        tls: bool,
        cert_identity: Option<&'a str>,
        user: Option<&'a str>,
        database: Option<&'a str>,
        token_id: Option<&'a str>,
        reason: &'a str,
        sqlstate: &'a str,
    },
    AuditSettingsChanged {
        changed: &'a [&'static str],
        settings: &'a serde_json::Value,
    },
}

/// The session's part of a statement record: the same for each statement of a session.
#[derive(Serialize)]
struct StatementSession<'a> {
    session_id: u64,
    service: &'a str,
    database: &'a str,
    client_addr: &'a str,
    cert_identity: Option<&'a str>,
    token_id: Option<&'a str>,
    claims_used: &'a serde_json::Map<String, serde_json::Value>,
}

/// What the statement touches, as serialised in its record (once per [`Touched`]).
#[derive(Serialize)]
struct TouchedWire<'a> {
    rewritten_redacted_sha256: Option<&'a str>,
    tables_read: &'a [String],
    tables_written: &'a [String],
    columns_read: &'a [String],
    columns_written: &'a [String],
    encrypted_columns: &'a [String],
    command_class: &'a [&'static str],
}

/// `"session_id":…,"claims_used":{…}`: the session's fields of a statement record, which the
/// proxy serialises once per session instead of once per statement.
pub fn statement_session_json(session: &SessionInfo) -> Result<Arc<str>, serde_json::Error> {
    let mut out = Vec::with_capacity(256);
    write_fields(&mut out, &StatementSession::of(session))?;
    Ok(String::from_utf8(out)
        .map_err(|e| serde::ser::Error::custom(e.to_string()))?
        .into())
}

impl<'a> StatementSession<'a> {
    fn of(s: &'a SessionInfo) -> Self {
        StatementSession {
            session_id: s.session_id,
            service: &s.service,
            database: &s.database,
            client_addr: &s.client_addr,
            cert_identity: s.cert_identity.as_deref(),
            token_id: s.token_id.as_deref(),
            claims_used: &s.claims_used,
        }
    }
}

/// Serialises a struct's fields without its braces (`"a":1,"b":2`).
fn write_fields(out: &mut Vec<u8>, value: &impl Serialize) -> Result<(), serde_json::Error> {
    let start = out.len();
    serde_json::to_writer(&mut *out, value)?;
    if out.get(start) == Some(&b'{') && out.last() == Some(&b'}') {
        out.remove(start);
        out.pop();
    }
    Ok(())
}

/// A statement record: kind, the session's fields (pre-serialised when the proxy gave them),
/// then the statement's own.
fn write_statement(
    st: &StatementRecord,
    record_values: bool,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(br#"{"kind":"statement","#);
    match &st.session_json {
        Some(json) => out.extend_from_slice(json.as_bytes()),
        None => write_fields(out, &StatementSession::of(&st.session))?,
    }
    out.push(b',');
    write_statement_body(st, record_values, out)?;
    out.push(b',');
    out.extend_from_slice(st.touched.json()?.as_bytes());
    out.push(b',');
    write_statement_tail(st, record_values, out)?;
    out.push(b'}');
    Ok(())
}

impl AuditEvent {
    /// Serialises the kind-specific JSON object (`{"kind":...}`) into `out`.
    pub(crate) fn write_json(
        &self,
        record_values: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), serde_json::Error> {
        let wire = match self {
            AuditEvent::ConnectionOpened(s) => Wire::ConnectionOpened {
                decision: Decision::Allowed,
                session: s,
            },
            AuditEvent::ConnectionClosed {
                session,
                duration,
                statements,
                reason,
            } => Wire::ConnectionClosed {
                session_id: session.session_id,
                service: &session.service,
                duration_us: *duration,
                statements: *statements,
                reason: reason.as_deref(),
            },
            AuditEvent::AuthFailed {
                client_addr,
                tls,
                cert_identity,
                user,
                database,
                token_id,
                reason,
                sqlstate,
            } => Wire::AuthFailed {
                decision: Decision::Failed,
                client_addr,
                tls: *tls,
                cert_identity: cert_identity.as_deref(),
                user: user.as_deref(),
                database: database.as_deref(),
                token_id: token_id.as_deref(),
                reason,
                sqlstate,
            },
            AuditEvent::Statement(st) => return write_statement(st, record_values, out),
            AuditEvent::SettingsChanged { changed, settings } => {
                Wire::AuditSettingsChanged { changed, settings }
            }
            AuditEvent::StatementCompleted {
                session_id,
                service,
                statement_seq,
                rows,
                command,
                duration,
                sqlstate,
                skipped,
                suspended,
            } => {
                return write_completion(
                    &Completion {
                        session_id: *session_id,
                        service,
                        statement_seq: *statement_seq,
                        rows: *rows,
                        command: command.as_deref(),
                        duration: *duration,
                        sqlstate: sqlstate.as_deref(),
                        skipped: *skipped,
                        suspended: *suspended,
                    },
                    out,
                )
            }
        };
        serde_json::to_writer(out, &wire)
    }
}

/// A statement's own fields, after the session's: `"protocol":…,"sql":…`.
fn write_statement_body(
    st: &StatementRecord,
    record_values: bool,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(br#""protocol":""#);
    out.extend_from_slice(st.protocol.as_str().as_bytes());
    out.extend_from_slice(br#"","statement_name":"#);
    put_opt_str(out, st.statement_name.as_deref())?;
    out.extend_from_slice(br#","decision":""#);
    out.extend_from_slice(st.decision.as_str().as_bytes());
    out.extend_from_slice(br#"","rule":"#);
    put_opt_str(out, st.rule.as_deref())?;
    out.extend_from_slice(br#","reason":"#);
    put_opt_str(out, st.reason.as_deref())?;
    out.extend_from_slice(br#","sqlstate":"#);
    put_opt_str(out, st.sqlstate.as_deref())?;
    out.push(b',');
    let sql = st.sql.recorded(record_values);
    if std::ptr::eq(sql, &*st.sql.redacted) && sql.len() + st.fingerprint.len() <= LONGEST_KEPT {
        // The redacted text: the same for every statement of a shape and every execution of
        // a prepared statement, so its escaped form is kept (see `TextJson`).
        TEXT_JSON.with(|cache| match cache.try_borrow_mut() {
            Ok(mut cache) => {
                out.extend_from_slice(cache.of(&st.fingerprint, &st.sql.redacted)?.as_bytes());
                Ok(())
            }
            Err(_) => write_text_fields(out, &st.fingerprint, sql),
        })
    } else {
        write_text_fields(out, &st.fingerprint, sql)
    }
}

/// `"fingerprint":…,"sql":…`.
fn write_text_fields(
    out: &mut Vec<u8>,
    fingerprint: &str,
    sql: &str,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(br#""fingerprint":"#);
    put_str(out, fingerprint)?;
    out.extend_from_slice(br#","sql":"#);
    put_str(out, sql)
}

/// Texts escaped recently, by the identity of their fingerprint and redacted text: the
/// records of one statement shape or one prepared statement share both (the policy engine's
/// template, the session's registry), so their JSON is escaped once per writing thread rather
/// than once per record. The cache holds the texts it is keyed by, so no other text can take
/// their addresses while they are in it.
#[derive(Default)]
struct TextJson {
    entries: Vec<(Arc<str>, Arc<str>, Box<str>)>,
    /// Where the next entry goes once all are taken.
    next: usize,
}

/// Texts kept per thread.
const TEXTS_KEPT: usize = 16;

/// Longest text (redacted text and fingerprint together, in bytes) whose escaped form is kept:
/// a client may send statements up to `max_message_bytes`, and sixteen of those kept per thread
/// would hold memory no session asked for; a long statement is escaped each time.
const LONGEST_KEPT: usize = 8 * 1024;

thread_local! {
    static TEXT_JSON: std::cell::RefCell<TextJson> = std::cell::RefCell::default();
}

impl TextJson {
    fn of(
        &mut self,
        fingerprint: &Arc<str>,
        redacted: &Arc<str>,
    ) -> Result<&str, serde_json::Error> {
        let found = self
            .entries
            .iter()
            .position(|(f, r, _)| Arc::ptr_eq(f, fingerprint) && Arc::ptr_eq(r, redacted));
        let at = match found {
            Some(at) => at,
            None => {
                let mut json = Vec::with_capacity(fingerprint.len() + redacted.len() + 24);
                write_text_fields(&mut json, fingerprint, redacted)?;
                let json = String::from_utf8(json)
                    .map_err(|e| serde::ser::Error::custom(e.to_string()))?
                    .into_boxed_str();
                let entry = (fingerprint.clone(), redacted.clone(), json);
                if self.entries.len() < TEXTS_KEPT {
                    self.entries.push(entry);
                    self.entries.len() - 1
                } else {
                    let at = self.next;
                    self.entries[at] = entry;
                    self.next = (at + 1) % TEXTS_KEPT;
                    at
                }
            }
        };
        Ok(&self.entries[at].2)
    }
}

/// The end of a statement record: its parameters (values only when allowed, never for
/// sensitive ones) and its place in a multi-statement Query.
fn write_statement_tail(
    st: &StatementRecord,
    record_values: bool,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(br#""param_count":"#);
    put_u64(out, st.params.len() as u64);
    out.extend_from_slice(br#","params":["#);
    for (i, param) in st.params.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"type_oid":"#);
        put_u64(out, param.type_oid.into());
        if param.sensitive {
            out.extend_from_slice(br#","sensitive":true"#);
        }
        if let Some(value) = recorded_value(param, record_values) {
            out.extend_from_slice(br#","value":"#);
            put_str(out, value)?;
        }
        out.push(b'}');
    }
    out.push(b']');
    if let Some((part, parts)) = st.part {
        out.extend_from_slice(br#","part":"#);
        put_u64(out, part.into());
        out.extend_from_slice(br#","parts":"#);
        put_u64(out, parts.into());
    }
    Ok(())
}

/// A parameter's value as recorded: only with `record_values`, never a sensitive one's.
fn recorded_value(param: &BoundParam, record_values: bool) -> Option<&str> {
    if record_values && !param.sensitive {
        param.value()
    } else {
        None
    }
}

/// The fields of a `statement_completed` record.
struct Completion<'a> {
    session_id: u64,
    service: &'a str,
    statement_seq: u64,
    rows: Option<u64>,
    command: Option<&'a str>,
    duration: Duration,
    sqlstate: Option<&'a str>,
    skipped: bool,
    suspended: bool,
}

fn write_completion(c: &Completion<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    out.extend_from_slice(br#"{"kind":"statement_completed","session_id":"#);
    put_u64(out, c.session_id);
    out.extend_from_slice(br#","service":"#);
    put_str(out, c.service)?;
    out.extend_from_slice(br#","statement_seq":"#);
    put_u64(out, c.statement_seq);
    out.extend_from_slice(br#","rows":"#);
    match c.rows {
        Some(rows) => put_u64(out, rows),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","command":"#);
    put_opt_str(out, c.command)?;
    out.extend_from_slice(br#","duration_us":"#);
    put_u64(
        out,
        u64::try_from(c.duration.as_micros()).unwrap_or(u64::MAX),
    );
    out.extend_from_slice(br#","sqlstate":"#);
    put_opt_str(out, c.sqlstate)?;
    if c.skipped {
        out.extend_from_slice(br#","skipped":true"#);
    }
    if c.suspended {
        out.extend_from_slice(br#","suspended":true"#);
    }
    out.push(b'}');
    Ok(())
}

/// A string value, quoted and escaped exactly as serde_json writes it.
fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    serde_json::to_writer(&mut *out, s)
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) -> Result<(), serde_json::Error> {
    match s {
        Some(s) => put_str(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests;
