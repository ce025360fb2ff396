//! Protocol-level prepared statements in transaction mode.
//!
//! A client's named statements live in its session ([`ClientStatements`]), not on a server
//! connection: each is given a server-side name of pgward's own, `pgward_` and a hash of the
//! exact text sent upstream (after policy rewriting and encryption, so the tenant's filter and
//! ciphertexts are part of it) with its declared parameter types. Identical statements of
//! different clients share one server-side statement; statements that differ in anything —
//! including the tenant literal a policy put in — never do.
//!
//! [`translate`] rewrites what a session sends upstream on the server connection it holds:
//!
//! * Parse of a named statement: `Close` of the server name (answer swallowed) and a Parse
//!   under the server name, so the client's own Parse gets the server's ParseComplete or error.
//! * Bind / Describe of a named statement the lent connection has not prepared: its Parse
//!   (and a Close before it) inserted ahead, their answers swallowed.
//! * Bind / Describe of the unnamed statement on a connection this client has not parsed it
//!   on in this lease: the client's last unnamed Parse inserted ahead (or a Close of the
//!   unnamed statement when it has none), so it never runs another client's unnamed statement.
//! * Close of a named statement: forgotten by the session; upstream gets a Close of a name
//!   that does not exist (PostgreSQL answers CloseComplete), the shared statement stays.
//! * `DEALLOCATE name|ALL` (a Query of its own): forgotten by the session; upstream runs
//!   `DEALLOCATE ALL` on the lent connection, which then has no statements prepared.
//!
//! [`Tracker`] is the other direction: it queues every request sent on the lent connection
//! (matched to their answers by [`Replies`]), drops the answers to inserted ones and, when
//! the server fails or skips a Parse, forgets the statement it did not prepare.

use std::collections::{HashMap, HashSet};

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::session_state::{deallocation, refused_construct};
use crate::error::ClientError;
use crate::error::REFUSAL_MARKER_PREFIX;
use crate::protocol::replies::{Outcome, Replies, Request};
use crate::protocol::view::Frontend;
use crate::protocol::{build, frontend, Batch, ProtocolError};

/// Prefix of every server-side statement name pgward gives.
pub const SERVER_PREFIX: &str = "pgward_";
/// A statement name that is never prepared (a client name pgward must not pass on).
const NEVER_PREPARED: &str = "pgward_unknown_statement";
/// Most named statements one client session may hold.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;

use crate::protocol::backend::PARSE_COMPLETE;

/// SQLSTATE duplicate_prepared_statement.
const DUPLICATE_STATEMENT: &str = "42P05";
/// SQLSTATE invalid_sql_statement_name.
const UNKNOWN_STATEMENT: &str = "26000";

/// The server-side name of a statement: its text and declared types, hashed.
pub fn server_name(sql: &str, param_section: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(sql.as_bytes());
    hash.update([0]);
    hash.update(param_section);
    let digest = hash.finalize();
    format!("{SERVER_PREFIX}{}", hex::encode(&digest[..16]))
}

/// A client's named statement: its server-side name and the Parse that prepares it there.
#[derive(Debug, Clone)]
struct Prepared {
    server: String,
    parse: Bytes,
}

/// The prepared statements of one client session (they outlive its server connections).
#[derive(Debug, Default)]
pub struct ClientStatements {
    named: HashMap<String, Prepared>,
    /// The client's last Parse of the unnamed statement, as sent upstream.
    unnamed: Option<Bytes>,
}

impl ClientStatements {
    /// Number of named statements.
    pub fn len(&self) -> usize {
        self.named.len()
    }

    /// Whether the client has no named statement.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}

/// What pgward keeps of a request sent during the current lease, for its answer.
#[derive(Debug, Default)]
struct Owed {
    /// pgward inserted the request: its answer is not the client's and is not forwarded.
    swallow: bool,
    /// A Parse's server statement, dropped from the connection's set if the server fails or
    /// skips the Parse.
    forget: Option<String>,
    /// A Parse or Close of the unnamed statement: until it is done, the server's unnamed
    /// statement is not the client's (it may be another client's).
    unnamed: bool,
}

impl Owed {
    /// The client's own request.
    const CLIENT: Owed = Owed {
        swallow: false,
        forget: None,
        unnamed: false,
    };
}

/// The answers owed by the server connection a session holds (fresh for each lease).
#[derive(Debug, Default)]
pub struct Tracker {
    owed: Replies<Owed>,
    /// The client's unnamed statement is the server's unnamed statement in this lease.
    unnamed_ready: bool,
}

impl Tracker {
    /// Every request has been answered with its ReadyForQuery.
    pub fn is_settled(&self) -> bool {
        self.owed.is_empty()
    }

    /// Drop the answers to messages pgward inserted; keep the connection's statement set
    /// right when the server fails or skips a Parse. `None`: the batch is unchanged.
    pub fn incoming(&mut self, batch: &Batch, prepared: &mut HashSet<String>) -> Option<Batch> {
        let mut kept: Option<BytesMut> = None;
        let mut offset = 0;
        let all = batch.bytes();
        for message in batch.messages() {
            let len = message.raw().len();
            let mut swallow = false;
            self.owed.answer(message.tag(), |_, outcome, owed| {
                if outcome == Outcome::Done {
                    swallow |= owed.swallow;
                    return;
                }
                if let Some(name) = owed.forget {
                    prepared.remove(&name);
                }
                if owed.unnamed {
                    // Failed: the server has no unnamed statement; skipped: it still has the
                    // one before, maybe another client's. Either way the next Bind of it
                    // prepares the client's own first.
                    self.unnamed_ready = false;
                }
            });
            match (&mut kept, swallow) {
                (None, true) => {
                    let mut buf = BytesMut::with_capacity(all.len());
                    buf.extend_from_slice(&all[..offset]);
                    kept = Some(buf);
                }
                (Some(buf), false) => buf.extend_from_slice(message.raw()),
                _ => {}
            }
            offset += len;
        }
        kept.map(|buf| Batch::from_whole_messages(buf.freeze()))
    }

    /// The client's own request goes upstream (nothing to undo if the server skips it).
    fn client(&mut self, request: Request) {
        let _skipped = self.owed.sent_unless_skipped(request, Owed::CLIENT);
    }

    /// pgward sends a Close of a server statement of its own, whose answer the client must
    /// not get.
    fn inserted_close(&mut self) {
        let owed = Owed {
            swallow: true,
            ..Owed::CLIENT
        };
        let _skipped = self.owed.sent_unless_skipped(Request::Close, owed);
    }

    /// A Parse or Close of the unnamed statement goes upstream (pgward's own when `swallow`):
    /// once done, the server's unnamed statement is the client's.
    fn unnamed(&mut self, request: Request, swallow: bool) {
        let owed = Owed {
            swallow,
            forget: None,
            unnamed: true,
        };
        self.unnamed_ready = self.owed.sent_unless_skipped(request, owed).is_none();
    }

    /// A Parse of server statement `server` goes upstream (pgward's own when `swallow`): the
    /// connection has it from now on, unless the server fails or skips the Parse.
    fn parse(&mut self, server: String, swallow: bool, prepared: &mut HashSet<String>) {
        prepared.insert(server.clone());
        let owed = Owed {
            swallow,
            forget: Some(server),
            unnamed: false,
        };
        if let Some(skipped) = self.owed.sent_unless_skipped(Request::Parse, owed) {
            if let Some(server) = skipped.forget {
                prepared.remove(&server);
            }
        }
    }
}

/// What [`translate`] made of a batch.
#[derive(Debug, Default)]
pub struct Translation {
    /// The bytes to write to the server connection.
    pub bytes: Bytes,
    /// The client sent Terminate (not passed on: the server connection is the pool's).
    pub terminate: bool,
    /// Messages after the last Sync/Query (the server holds unfinished extended-protocol
    /// state: the connection must stay with this client); `None` when the batch was empty.
    pub unsynced: Option<bool>,
}

/// The connection-side state `translate` reads and updates.
pub struct OnServer<'a> {
    pub tracker: &'a mut Tracker,
    pub prepared: &'a mut HashSet<String>,
}

/// Rewrite a batch (as the pipeline assembled it) for the lent server connection. `refuse`
/// registers a refusal and returns its marker statement.
pub fn translate(
    outgoing: &[Bytes],
    client: &mut ClientStatements,
    server: OnServer<'_>,
    refuse: &mut dyn FnMut(ClientError) -> String,
) -> Result<Translation, ProtocolError> {
    let bytes = match outgoing {
        [one] => one.clone(),
        many => {
            let mut all = BytesMut::new();
            for chunk in many {
                all.extend_from_slice(chunk);
            }
            all.freeze()
        }
    };
    let OnServer { tracker, prepared } = server;
    let batch = Batch::from_whole_messages(bytes);
    let mut out = BytesMut::with_capacity(batch.bytes().len() + 64);
    let mut result = Translation::default();
    for message in batch.messages() {
        let raw = message.raw();
        match message.tag() {
            frontend::SYNC | frontend::FUNCTION_CALL => {
                if let Some(request) = Request::of(&message) {
                    tracker.client(request);
                }
                result.unsynced = Some(false);
                out.extend_from_slice(raw);
                continue;
            }
            frontend::TERMINATE => {
                result.terminate = true;
                continue;
            }
            frontend::FLUSH => {
                out.extend_from_slice(raw);
                continue;
            }
            frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                // Syncs sent into COPY FROM STDIN are ignored there: none of them is owed.
                tracker.owed.copy_sent();
                out.extend_from_slice(raw);
                continue;
            }
            frontend::QUERY => result.unsynced = Some(false),
            _ => result.unsynced = Some(true),
        }
        match Frontend::decode(&message)? {
            Frontend::Query { sql } => {
                tracker.client(Request::Query);
                // `DISCARD ALL` too (Npgsql's reset when a connection goes back to its pool):
                // every other state it would reset is refused in this mode, so it is served
                // as `DEALLOCATE ALL`.
                if let Some(target) = deallocation(sql) {
                    match target {
                        None => client.named.clear(),
                        Some(name) => {
                            if client.named.remove(&name).is_none() {
                                let error = ClientError::error(
                                    UNKNOWN_STATEMENT,
                                    format!("prepared statement \"{name}\" does not exist"),
                                );
                                out.extend_from_slice(&build::query(&refuse(error)));
                                continue;
                            }
                        }
                    }
                    prepared.clear();
                    out.extend_from_slice(&build::query("DEALLOCATE ALL"));
                } else if let Some(construct) = refused_construct(sql) {
                    out.extend_from_slice(&build::query(&refuse(not_supported(construct))));
                } else {
                    out.extend_from_slice(raw);
                }
            }
            Frontend::Parse(parse) => {
                let refusal = if parse.sql.starts_with(REFUSAL_MARKER_PREFIX) {
                    // Already refused by the pipeline: keep its marker, never prepare it.
                    Some(parse.sql.to_string())
                } else if let Some(construct) = refused_construct(parse.sql) {
                    Some(refuse(not_supported(construct)))
                } else if !parse.name.is_empty() && client.named.contains_key(parse.name) {
                    Some(refuse(ClientError::error(
                        DUPLICATE_STATEMENT,
                        format!("prepared statement \"{}\" already exists", parse.name),
                    )))
                } else if !parse.name.is_empty() && client.named.len() >= MAX_CLIENT_STATEMENTS {
                    Some(refuse(ClientError::error(
                        crate::error::sqlstate::PROGRAM_LIMIT_EXCEEDED,
                        format!("pgward: more than {MAX_CLIENT_STATEMENTS} prepared statements in one session"),
                    )))
                } else {
                    None
                };
                if let Some(marker) = refusal {
                    // A failed Parse of the unnamed statement also drops the server's one.
                    if parse.name.is_empty() {
                        client.unnamed = None;
                    }
                    tracker.unnamed_ready = false;
                    out.extend_from_slice(&build::parse("", &marker));
                    tracker.client(Request::Parse);
                } else if parse.name.is_empty() {
                    client.unnamed = Some(raw.clone());
                    out.extend_from_slice(raw);
                    tracker.unnamed(Request::Parse, false);
                } else {
                    let server = server_name(parse.sql, parse.param_section());
                    let rebuilt =
                        build::parse_with_param_types(&server, parse.sql, parse.param_section());
                    out.extend_from_slice(&build::close(b'S', &server));
                    tracker.inserted_close();
                    out.extend_from_slice(&rebuilt);
                    tracker.parse(server.clone(), false, prepared);
                    client.named.insert(
                        parse.name.to_string(),
                        Prepared {
                            server,
                            parse: rebuilt,
                        },
                    );
                }
            }
            Frontend::Bind(bind) => {
                let name = resolve(bind.statement, client, tracker, prepared, &mut out);
                tracker.client(Request::Bind);
                if name == bind.statement {
                    out.extend_from_slice(raw);
                } else {
                    out.extend_from_slice(&rename_bind(
                        message.body(),
                        bind.portal,
                        bind.statement,
                        &name,
                    ));
                }
            }
            Frontend::Describe(target) if target.is_statement() => {
                let name = resolve(target.name, client, tracker, prepared, &mut out);
                tracker.client(Request::DescribeStatement);
                out.extend_from_slice(&build::describe(b'S', &name));
            }
            Frontend::Close(target) => {
                tracker.client(Request::Close);
                if !target.is_statement() {
                    out.extend_from_slice(raw);
                } else if target.name.is_empty() {
                    client.unnamed = None;
                    out.extend_from_slice(raw);
                } else {
                    client.named.remove(target.name);
                    // The shared server statement stays; the client still gets CloseComplete.
                    out.extend_from_slice(&build::close(b'S', NEVER_PREPARED));
                }
            }
            _ => {
                if let Some(request) = Request::of(&message) {
                    tracker.client(request);
                }
                out.extend_from_slice(raw);
            }
        }
    }
    result.bytes = out.freeze();
    Ok(result)
}

/// Prepare named statements without a server connection: a batch of nothing but Parses of
/// named statements and a final Sync (libpq's `PQprepare`), sent while the client holds no
/// server connection, is recorded in the session and answered by pgward (ParseComplete per
/// Parse, then ReadyForQuery idle); each statement is prepared on a server connection when a
/// Bind or Describe first needs it there, and errors in its text are reported then. Returns
/// the answer, or `None` when the batch needs the server. Without this, a client that
/// prepares synchronously while its other connections hold server connections (pgbench
/// threads) could wait for a slot its own transactions hold.
pub fn answer_locally(outgoing: &[Bytes], client: &mut ClientStatements) -> Option<Bytes> {
    let mut all = BytesMut::new();
    for chunk in outgoing {
        all.extend_from_slice(chunk);
    }
    let batch = Batch::from_whole_messages(all.freeze());
    let messages: Vec<_> = batch.messages().collect();
    let (last, parses) = messages.split_last()?;
    if last.tag() != frontend::SYNC || parses.is_empty() {
        return None;
    }
    let mut new = Vec::with_capacity(parses.len());
    for message in parses {
        let Ok(Frontend::Parse(parse)) = Frontend::decode(message) else {
            return None;
        };
        let acceptable = !parse.name.is_empty()
            && !parse.sql.starts_with(REFUSAL_MARKER_PREFIX)
            && refused_construct(parse.sql).is_none()
            && !client.named.contains_key(parse.name)
            && !new
                .iter()
                .any(|(name, _): &(String, Prepared)| name == parse.name);
        if !acceptable {
            return None;
        }
        let server = server_name(parse.sql, parse.param_section());
        let rebuilt = build::parse_with_param_types(&server, parse.sql, parse.param_section());
        new.push((
            parse.name.to_string(),
            Prepared {
                server,
                parse: rebuilt,
            },
        ));
    }
    if client.named.len() + new.len() > MAX_CLIENT_STATEMENTS {
        return None;
    }
    let mut answer = BytesMut::new();
    for (name, prepared) in new {
        client.named.insert(name, prepared);
        answer.put_u8(PARSE_COMPLETE);
        answer.put_u32(4);
    }
    answer.extend_from_slice(&build::ready_for_query(b'I'));
    Some(answer.freeze())
}

/// The server-side name for a statement a client names in Bind or Describe, inserting what
/// makes it exist on the lent connection.
fn resolve(
    name: &str,
    client: &ClientStatements,
    tracker: &mut Tracker,
    prepared: &mut HashSet<String>,
    out: &mut BytesMut,
) -> String {
    if name.is_empty() {
        if !tracker.unnamed_ready {
            match &client.unnamed {
                Some(parse) => {
                    out.extend_from_slice(parse);
                    tracker.unnamed(Request::Parse, true);
                }
                None => {
                    out.extend_from_slice(&build::close(b'S', ""));
                    tracker.unnamed(Request::Close, true);
                }
            }
        }
        return String::new();
    }
    match client.named.get(name) {
        Some(statement) => {
            if !prepared.contains(&statement.server) {
                out.extend_from_slice(&build::close(b'S', &statement.server));
                tracker.inserted_close();
                out.extend_from_slice(&statement.parse);
                tracker.parse(statement.server.clone(), true, prepared);
            }
            statement.server.clone()
        }
        // Server-side names are pgward's own: a client can never name one directly.
        None if name.starts_with(SERVER_PREFIX) => NEVER_PREPARED.to_string(),
        None => name.to_string(),
    }
}

/// A Bind naming another statement (body: portal, statement, then the rest unchanged).
fn rename_bind(body: &[u8], portal: &str, statement: &str, new: &str) -> Bytes {
    let rest_at = portal.len() + 1 + statement.len() + 1;
    let rest = body.get(rest_at..).unwrap_or_default();
    let len = 4 + portal.len() + 1 + new.len() + 1 + rest.len();
    let mut buf = BytesMut::with_capacity(len + 1);
    buf.put_u8(frontend::BIND);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    buf.put_slice(portal.as_bytes());
    buf.put_u8(0);
    buf.put_slice(new.as_bytes());
    buf.put_u8(0);
    buf.put_slice(rest);
    buf.freeze()
}

/// The refusal of a construct that cannot survive transaction pooling.
pub fn not_supported(construct: &str) -> ClientError {
    ClientError::error(
        crate::error::sqlstate::FEATURE_NOT_SUPPORTED,
        format!("pgward: {construct} is not supported: this service is in transaction pooling mode (server connections are shared between transactions)"),
    )
}

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;
