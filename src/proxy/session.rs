//! One authenticated session: connect upstream, finish the client's startup, then relay both
//! directions concurrently until either side ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::audit::SessionAudit;
use super::encryption::{self, Incoming, Tracked, UpstreamHalf};
use super::intercept::Interceptor;
use super::pipeline;
use super::policy::SessionPolicy;
use super::registry::ClientEntry;
use super::state::SessionState;
use super::statements::SessionStatements;
use super::Shared;
use crate::audit::{AuditEvent, OnFailure, SessionInfo};
use crate::auth::Identity;
use crate::config::ServiceConfig;
use crate::crypto::scope::KeyScope;
use crate::error::{sqlstate, ClientError, REFUSAL_MARKER_PREFIX};
use crate::metrics::inc;
use crate::net::{Conn, ConnReader, ConnWriter};
use crate::protocol::fields::ErrorFields;
use crate::protocol::startup::StartupMessage;
use crate::protocol::{backend, build, frontend, Batch, FrameReader, Message, ProtocolError};
use crate::upstream::MAX_UPSTREAM_MESSAGE;

/// Most requests a session may have unanswered.
pub(super) const MAX_AWAITED: usize = 1 << 18;

type ClientWriter = Arc<tokio::sync::Mutex<ConnWriter>>;

/// Why a relay direction stopped.
#[derive(Debug)]
pub(super) enum End {
    ClientClosed,
    UpstreamClosed,
    /// Send this to the client, then close.
    Fatal(ClientError),
    Io,
}

impl End {
    /// The reason recorded in the connection-closed audit record.
    pub(super) fn describe(&self) -> String {
        match self {
            End::ClientClosed => "client closed".into(),
            End::UpstreamClosed => "upstream closed".into(),
            End::Fatal(error) => format!("{} ({})", error.message, error.sqlstate),
            End::Io => "client connection lost".into(),
        }
    }
}

/// What the connection-opened record says about a session besides its identity: enough to
/// find the same session in PostgreSQL's own log.
pub(super) struct SessionFacts<'a> {
    pub(super) id: u64,
    pub(super) client_addr: std::net::SocketAddr,
    pub(super) tls: bool,
    pub(super) database: &'a str,
    pub(super) upstream_role: &'a str,
    pub(super) backend_pid: u32,
    pub(super) application_name: Option<&'a str>,
}

/// Start the session's audit trail: its connection-opened record is durable before anything
/// runs. `None` when auditing is off; an error (FATAL for the client) when the log cannot
/// write and `on_failure = "refuse"`.
pub(super) async fn open_session_audit(
    shared: &Shared,
    interceptor: &Interceptor,
    session: SessionFacts<'_>,
) -> Result<Option<SessionAudit>, ClientError> {
    let Some(handle) = &shared.audit else {
        return Ok(None);
    };
    let identity = interceptor.identity();
    let session_id = session.id;
    let info = Arc::new(SessionInfo {
        session_id,
        client_addr: session.client_addr.to_string(),
        tls: session.tls,
        cert_identity: identity.cert_identity.clone(),
        service: identity.service.clone(),
        token_id: identity.token_id.clone(),
        database: session.database.to_string(),
        claims_used: interceptor.claims_used(),
        upstream_role: Some(session.upstream_role.to_string()),
        backend_pid: Some(session.backend_pid),
        application_name: session.application_name.map(str::to_string),
    });
    if let Err(e) = handle
        .append(AuditEvent::ConnectionOpened(info.clone()))
        .await
    {
        inc(&shared.metrics.audit_write_failures);
        tracing::error!(session = session_id, error = %e, "audit log cannot write");
        if handle.on_failure() == OnFailure::Refuse {
            return Err(pipeline::audit_unavailable(&e).into_fatal());
        }
    }
    // Until the relay tells literals bound for encrypted columns apart, any configured
    // encrypted column makes every literal and parameter sensitive.
    let sensitive = !shared.config.encrypt.is_empty();
    Ok(Some(SessionAudit::new(handle.clone(), info, sensitive)))
}

/// A client admitted to its service (login and policy settled by `admission`), to be run
/// with a server connection of its own.
pub(super) struct Admitted {
    pub id: u64,
    pub conn: Conn,
    pub startup: StartupMessage,
    pub identity: Identity,
    pub database: String,
    pub client_addr: std::net::SocketAddr,
    pub service: ServiceConfig,
    pub password: Option<String>,
    pub policy: SessionPolicy,
    /// Its row in the registry of live sessions.
    pub client: Arc<ClientEntry>,
}

/// Run a session-mode session to its end: one upstream connection for its whole life.
pub(super) async fn run(shared: Arc<Shared>, admitted: Admitted, shutdown: watch::Receiver<bool>) {
    let Admitted {
        id: session_id,
        mut conn,
        startup,
        identity,
        database,
        client_addr,
        service,
        password,
        policy,
        client,
    } = admitted;
    let mut params: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_."))
        .cloned()
        .collect();
    if let SessionPolicy::Bound(policies) = &policy {
        params.extend(policies.claim_settings(&identity));
    }
    let upstream = match shared
        .upstream
        .connect(
            &service.upstream_user,
            password.as_deref(),
            &database,
            &params,
        )
        .await
    {
        Ok(upstream) => upstream,
        Err(e) => {
            inc(&shared.metrics.upstream_connect_errors);
            let message =
                crate::upstream::login_failure_message(&e, session_id, &service.upstream_user);
            let _ = conn.write_all(&message).await;
            let _ = conn.shutdown().await;
            return;
        }
    };
    client.attach_server(upstream.process_id);
    let state = Arc::new(
        SessionState::new(session_id, upstream.process_id, upstream.secret_key)
            .with_series(shared.metrics.service_series(&identity.service)),
    );
    for message in &upstream.startup_messages {
        if message.first() == Some(&backend::PARAMETER_STATUS) {
            state.note_parameter_status(message.get(5..).unwrap_or_default());
        }
    }
    client.attach(state.clone());
    let key = shared.cancels.register(state.clone());
    inc(&shared.metrics.sessions_established);
    tracing::info!(session = session_id, service = %identity.service, database = %database, "session established");

    let interceptor = Interceptor::new(identity, policy)
        .with_encryption(shared.encryption.as_ref().map(|e| e.sql.clone()))
        .with_audit_analysis(shared.audit.is_some());
    let facts = SessionFacts {
        id: session_id,
        client_addr,
        tls: conn.is_tls(),
        database: &database,
        upstream_role: &service.upstream_user,
        backend_pid: upstream.process_id,
        application_name: startup
            .params
            .iter()
            .find(|(k, _)| k == "application_name")
            .map(|(_, v)| v.as_str()),
    };
    let audit = match open_session_audit(&shared, &interceptor, facts).await {
        Ok(audit) => audit,
        Err(error) => {
            shared.cancels.unregister(key);
            let _ = conn.write_all(&error.to_message()).await;
            let _ = conn.shutdown().await;
            return;
        }
    };
    let opened_at = Instant::now();

    let mut hello = BytesMut::new();
    hello.extend_from_slice(&build::authentication_ok());
    for message in &upstream.startup_messages {
        hello.extend_from_slice(message);
    }
    hello.extend_from_slice(&build::backend_key_data(key.process_id, key.secret_key));
    hello.extend_from_slice(&build::ready_for_query(upstream.ready_status));
    if conn.write_all(&hello).await.is_err() || conn.flush().await.is_err() {
        shared.cancels.unregister(key);
        return;
    }

    let (client_read, client_write) = conn.split();
    let (upstream_read, mut upstream_write) = upstream.conn.split();
    let client_writer: ClientWriter = Arc::new(tokio::sync::Mutex::new(client_write));
    let client_reader = FrameReader::new(client_read, shared.config.listen.max_message_bytes);
    let mut upstream_reader =
        FrameReader::with_buffered(upstream_read, MAX_UPSTREAM_MESSAGE, upstream.buffered);
    let (client_crypto, upstream_crypto) = match &shared.encryption {
        Some(encryption) => match encryption
            .open_session(
                &mut upstream_reader,
                &mut upstream_write,
                KeyScope::from_claims(&interceptor.identity().claims),
            )
            .await
        {
            Ok((c, u)) => (Some(c), Some(u)),
            Err(error) => {
                shared.cancels.unregister(key);
                let mut writer = client_writer.lock().await;
                let _ = writer.write_all(&error.to_message()).await;
                let _ = writer.flush().await;
                let _ = writer.shutdown().await;
                return;
            }
        },
        None => (None, None),
    };
    if let Some(audit) = &audit {
        state.replies.audit_with(audit.completions());
    }
    let mut audit = audit;
    let mut interceptor = interceptor;
    interceptor.set_crypto(client_crypto);
    let end = tokio::select! {
        end = client_to_upstream(&shared, &state, client_reader, upstream_write, interceptor, audit.as_mut(), shutdown) => end,
        end = upstream_to_client(&shared, &state, upstream_reader, client_writer.clone(), upstream_crypto) => end,
    };
    if let Some(audit) = &audit {
        audit.handle().append_nowait(AuditEvent::ConnectionClosed {
            session: audit.session().clone(),
            duration: opened_at.elapsed(),
            statements: audit.statements_recorded,
            reason: Some(end.describe()),
        });
    }
    shared.cancels.unregister(key);
    let mut writer = client_writer.lock().await;
    if let End::Fatal(error) = &end {
        let _ = writer.write_all(&error.to_message()).await;
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    tracing::info!(session = session_id, end = ?end, "session closed");
}

/// Client → upstream: frame, intercept, forward; idle timeout and graceful shutdown live here.
async fn client_to_upstream(
    shared: &Shared,
    state: &SessionState,
    mut reader: FrameReader<ConnReader>,
    mut upstream: ConnWriter,
    mut interceptor: Interceptor,
    mut audit: Option<&mut SessionAudit>,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let idle_timeout = shared.config.listen.idle_timeout;
    let mut shutting_down = *shutdown.borrow();
    // One timer for the session, re-armed per batch, instead of a new one per loop iteration.
    let idle_timer = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle_timer);
    let idle_checks = !idle_timeout.is_zero();
    // The client's prepared statements and portals, as every stage reads them.
    let mut statements = SessionStatements::default();
    loop {
        let batch = tokio::select! {
            biased;
            batch = reader.next_batch() => batch,
            changed = shutdown.changed(), if !shutting_down => {
                shutting_down = changed.is_err() || *shutdown.borrow();
                if shutting_down {
                    idle_timer.as_mut().reset(tokio::time::Instant::now());
                }
                continue;
            }
            () = &mut idle_timer, if idle_checks || shutting_down => {
                if shutting_down && state.is_idle() {
                    return End::Fatal(ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command"));
                }
                if idle_checks && !shutting_down && state.is_idle() {
                    return End::Fatal(ClientError::fatal(sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout"));
                }
                // Busy or in a transaction: look again later (soon when shutting down).
                let again = if shutting_down { Duration::from_millis(20) } else { idle_timeout };
                idle_timer.as_mut().reset(tokio::time::Instant::now() + again);
                continue;
            }
        };
        if idle_checks && !shutting_down {
            idle_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + idle_timeout);
        }
        let batch = match batch {
            Ok(Some(batch)) => batch,
            Ok(None) => return End::ClientClosed,
            Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => return End::ClientClosed,
            Err(e) => {
                inc(&shared.metrics.protocol_errors);
                tracing::info!(session = state.id, error = %e, "client protocol violation");
                return End::Fatal(ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("pgward: {e}"),
                ));
            }
        };
        if state.is_idle() {
            if let Some(policies) = interceptor.take_ddl_pending() {
                // The DDL has committed: later statements (of every session) must be checked
                // against the schema as it is now.
                policies.refresh_catalog().await;
            }
        }
        let outgoing = if interceptor.is_passthrough() && audit.is_none() {
            pipeline::forward_unchanged(state, &batch)
        } else {
            pipeline::run_batch(
                shared,
                state,
                (&mut interceptor, &mut statements),
                audit.as_deref_mut(),
                &batch,
            )
            .await
        };
        let (terminate, executes) = account_client_batch(shared, state, &batch);
        if executes {
            // Only the bump is serialized with cancel delivery, not the write: a cancel that
            // arrived before this batch started is delivered first or dropped (it sees the new
            // generation), so it never hits these statements; one that arrives while the
            // batch is being written (a busy server reading slowly) goes out at once and
            // cancels what the client sent before it, instead of waiting for the whole batch.
            let _gate = state.cancel_gate.lock().await;
            state.bump_generation();
        }
        state.mark_busy();
        for chunk in &outgoing {
            if upstream.write_all(chunk).await.is_err() {
                return End::UpstreamClosed;
            }
        }
        if upstream.flush().await.is_err() {
            return End::UpstreamClosed;
        }
        if terminate {
            return End::ClientClosed;
        }
        if let Err(end) = check_awaited(state, &mut interceptor) {
            return end;
        }
    }
}

/// Every request awaiting its answer costs an entry in the session's response tracker (and
/// field encryption's). Those the server skips after an error are settled as they are sent,
/// so only a client that keeps sending without reading its answers piles them up: past
/// [`MAX_AWAITED`] it is disconnected (54000).
pub(super) fn check_awaited(
    state: &SessionState,
    interceptor: &mut Interceptor,
) -> Result<(), End> {
    let encryption = interceptor
        .crypto_mut()
        .map_or(0, |crypto| crypto.awaited());
    if encryption.max(state.replies.len()) <= MAX_AWAITED {
        return Ok(());
    }
    Err(End::Fatal(ClientError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("pgward: more than {MAX_AWAITED} requests sent without reading their answers"),
    )))
}

/// Bookkeeping for one client batch, in one pass over its tags: returns whether it ends the
/// session (Terminate) and whether it starts execution (Query, Execute, FunctionCall).
pub(super) fn account_client_batch(
    shared: &Shared,
    state: &SessionState,
    batch: &Batch,
) -> (bool, bool) {
    let mut terminate = false;
    let mut statements = 0;
    for message in batch.messages() {
        state.series.seen(message.tag());
        match message.tag() {
            frontend::QUERY | frontend::EXECUTE | frontend::FUNCTION_CALL => statements += 1,
            frontend::TERMINATE => terminate = true,
            _ => {}
        }
    }
    if statements > 0 {
        shared
            .metrics
            .statements
            .fetch_add(statements, Ordering::Relaxed);
    }
    state.series.client_batch(batch.bytes().len(), statements);
    (terminate, statements > 0)
}

/// Upstream → client: bookkeeping on ReadyForQuery/ErrorResponse, refusal substitution, forward.
async fn upstream_to_client(
    shared: &Shared,
    state: &SessionState,
    mut reader: FrameReader<ConnReader>,
    client: ClientWriter,
    mut crypto: Option<UpstreamHalf>,
) -> End {
    loop {
        let batch = match reader.next_batch().await {
            Ok(Some(batch)) => batch,
            Ok(None) => return End::UpstreamClosed,
            Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => {
                return End::UpstreamClosed
            }
            Err(e) => {
                tracing::warn!(session = state.id, error = %e, "upstream protocol violation");
                return End::Fatal(ClientError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "pgward: lost the upstream connection",
                ));
            }
        };
        let Incoming {
            client: batch,
            tracked,
        } = encryption::relay(crypto.as_mut(), batch).await;
        let outgoing = account_upstream_batch(shared, state, &batch, tracked.as_ref());
        // Only an audited session leaves durability receipts.
        if state.replies.is_audited() {
            if let Err(end) = await_durable_records(shared, state).await {
                return end;
            }
        }
        let mut writer = client.lock().await;
        for chunk in &outgoing {
            if writer.write_all(chunk).await.is_err() {
                return End::Io;
            }
        }
        if writer.flush().await.is_err() {
            return End::Io;
        }
    }
}

/// Hold responses until the audit records of every statement forwarded so far are durable
/// (`[audit] durability = "before_response"`: the fsync overlapped the execution). A record
/// that cannot be made durable withholds the results: the session ends with 58030 unless
/// `on_failure = "continue"`.
pub(super) async fn await_durable_records(
    shared: &Shared,
    state: &SessionState,
) -> Result<(), End> {
    let receipts = state.take_undurable();
    if receipts.is_empty() {
        return Ok(());
    }
    let held = Instant::now();
    for receipt in receipts {
        let Err(e) = receipt.wait().await else {
            continue;
        };
        inc(&shared.metrics.audit_write_failures);
        tracing::error!(session = state.id, error = %e, "audit record could not be made durable after its statement was forwarded");
        let refuse = shared
            .audit
            .as_ref()
            .is_none_or(|audit| audit.on_failure() == OnFailure::Refuse);
        if refuse {
            return Err(End::Fatal(
                ClientError::fatal(
                    sqlstate::IO_ERROR,
                    "pgward: the audit log could not be made durable, so the results of the last statement are withheld",
                )
                .with_hint(format!("ops: check the audit directory ({e})")),
            ));
        }
    }
    shared.metrics.observe_durability_wait(held.elapsed());
    Ok(())
}

/// Track ReadyForQuery and errors; swap refusal markers' errors. Returns what to send.
/// `tracked`: what the session's tracker reads instead of `batch` (field encryption kept
/// answers from the client after a value failed to decrypt).
pub(super) fn account_upstream_batch(
    shared: &Shared,
    state: &SessionState,
    batch: &Batch,
    tracked: Option<&Tracked>,
) -> Vec<Bytes> {
    if let Some(tracked) = tracked {
        track_server_answers(shared, state, tracked);
    }
    let all = batch.bytes();
    let mut out = Vec::new();
    let mut run_start = 0;
    let mut offset = 0;
    let total = all.len();
    for message in batch.messages() {
        let len = message.raw().len();
        if tracked.is_none() {
            track_answer(shared, state, &message);
        }
        match message.tag() {
            backend::READY_FOR_QUERY => {
                let status = message.body().first().copied().unwrap_or(b'I');
                if status == b'I' {
                    state.series.transaction_ended();
                }
                state.ready_for_query(status, offset + len == total);
            }
            backend::PARAMETER_STATUS => state.note_parameter_status(message.body()),
            backend::ERROR_RESPONSE => {
                inc(&shared.metrics.upstream_error_responses);
                if state.has_pending_refusals() || names_a_refusal_marker(message.body()) {
                    let fields = ErrorFields::parse(message.body()).unwrap_or_default();
                    if let Some(refusal) = fields.message.as_deref().and_then(|m| {
                        state
                            .take_refusal(m)
                            .or_else(|| m.contains(REFUSAL_MARKER_PREFIX).then(forgotten_refusal))
                    }) {
                        if offset > run_start {
                            out.push(all.slice(run_start..offset));
                        }
                        out.push(refusal.to_message());
                        run_start = offset + len;
                    }
                }
            }
            _ => {}
        }
        offset += len;
    }
    if offset > run_start {
        out.push(all.slice(run_start..offset));
    }
    state.series.sent(out.iter().map(Bytes::len).sum());
    out
}

/// Whether an upstream error names one of pgward's stand-ins for a refused statement.
fn names_a_refusal_marker(body: &[u8]) -> bool {
    body.windows(REFUSAL_MARKER_PREFIX.len())
        .any(|w| w == REFUSAL_MARKER_PREFIX.as_bytes())
}

/// A refused statement's error when its reason is no longer kept (a client had more
/// refusals in flight than the session remembers): the marker never reaches the client.
fn forgotten_refusal() -> ClientError {
    ClientError::error(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        "pgward: statement refused; more refused statements were awaiting their answers than pgward remembers, so its reason was not kept",
    )
}

/// The server's answers, to the session's tracker: the client got an error in place of a row
/// (and nothing more up to ReadyForQuery), but the server ran that statement and the requests
/// after it, and the audit and the registry of prepared statements must say what it did.
fn track_server_answers(shared: &Shared, state: &SessionState, tracked: &Tracked) {
    let mut failures = tracked.failures.iter().peekable();
    let mut offset = 0;
    for message in tracked.batch.messages() {
        while let Some((_, sqlstate)) = failures.next_if(|(at, _)| *at == offset) {
            state.replies.failed_for_client(sqlstate);
        }
        track_answer(shared, state, &message);
        offset += message.raw().len();
    }
}

/// One answer to the session's tracker; a ReadyForQuery times the request it answers.
fn track_answer(shared: &Shared, state: &SessionState, message: &Message) {
    if let Some(started) = state.replies.answered(message) {
        shared
            .metrics
            .observe_statement(&state.series, started.elapsed());
    }
}
