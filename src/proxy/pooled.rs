//! A client session of a service in transaction pooling mode (`pool_mode = "transaction"`).
//!
//! The session keeps everything that belongs to its client — identity, policy memo, field
//! encryption halves, audit, prepared statements (`pool::prepared`), refusals, cancel key —
//! and borrows a server connection from its (upstream role, database) pool only while it has
//! something to run: from the client request that finds it holding none, to the
//! ReadyForQuery with status `I` that answers the last request sent (nothing unsynced, no
//! answer owed). `T` or `E` keep it: a transaction never changes server connection. Unlike a
//! session-mode session, this one runs both directions in one task, because the server half
//! changes while the client half stays.
//!
//! Rewritten statements carry their tenant's filter as literals, so sharing server
//! connections between tenants shares no tenant context; what could (session settings,
//! LISTEN, temporary tables, session-level advisory locks, WITH HOLD cursors, SQL PREPARE) is
//! refused (`pool::session_state`), and `[policy] claims_as_settings` is refused at
//! configuration load for transaction-mode services.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::audit::SessionAudit;
use super::encryption::{self, Incoming, UpstreamHalf};
use super::intercept::Interceptor;
use super::pipeline;
use super::policy::SessionPolicy;
use super::registry::ClientEntry;
use super::session::{
    account_client_batch, account_upstream_batch, await_durable_records, check_awaited,
    open_session_audit, End, SessionFacts,
};
use super::state::SessionState;
use super::statements::SessionStatements;
use super::Shared;
use crate::audit::AuditEvent;
use crate::auth::Identity;
use crate::config::{PoolSettings, ServiceConfig};
use crate::crypto::scope::KeyScope;
use crate::error::{sqlstate, ClientError};
use crate::metrics::{inc, ServiceSeries};
use crate::net::{Conn, ConnReader, ConnWriter};
use crate::pool::prepared::{self, ClientStatements, OnServer, Tracker};
use crate::pool::{Lease, Pool, PoolError};
use crate::protocol::startup::StartupMessage;
use crate::protocol::{backend, build, frontend, Batch, FrameReader, ProtocolError};

mod params;

/// What the session-mode entry hands over once the session is admitted.
pub(super) struct PooledSession {
    pub id: u64,
    pub conn: Conn,
    pub startup: StartupMessage,
    pub identity: Identity,
    pub database: String,
    pub client_addr: std::net::SocketAddr,
    pub service: ServiceConfig,
    pub password: Option<String>,
    pub policy: SessionPolicy,
    pub pooling: PoolSettings,
    /// Its row in the registry of live sessions.
    pub client: Arc<ClientEntry>,
}

/// The server connection a session holds, with what is owed on it.
struct Held {
    lease: Lease,
    tracker: Tracker,
    /// Status byte of the last ReadyForQuery.
    status: u8,
}

/// Where a session borrows from.
struct Source<'a> {
    shared: &'a Shared,
    pool: Arc<Pool>,
    password: Option<String>,
    service: &'a str,
    /// The session's registry row: shows it waiting while it waits.
    client: Arc<ClientEntry>,
    series: Arc<ServiceSeries>,
}

impl Source<'_> {
    async fn acquire(&self) -> Result<Lease, ClientError> {
        self.lease().await.map_err(|e| pool_error(&e, self.service))
    }

    /// Borrow a server connection, counted as a wait of this client and its service.
    async fn lease(&self) -> Result<Lease, PoolError> {
        self.client.begin_wait();
        let lease = self
            .pool
            .acquire(
                &self.shared.upstream,
                self.password.as_deref(),
                self.client.facts.id,
            )
            .await;
        self.series.waited(self.client.end_wait());
        lease
    }
}

/// The error a client gets when no server connection can be lent.
fn pool_error(error: &PoolError, service: &str) -> ClientError {
    match error {
        PoolError::Timeout { waited, size } => ClientError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "pgward: no server connection for service {service:?} became free within pool_timeout ({}s): all {size} are in use",
                waited.as_secs_f64()
            ),
        ),
        PoolError::Connect(e) => {
            tracing::warn!(service, error = %e, "could not open a pooled server connection");
            ClientError::fatal(
                sqlstate::CANNOT_CONNECT,
                "pgward: could not connect to the upstream server",
            )
        }
    }
}

async fn refuse(conn: &mut Conn, message: &[u8]) {
    let _ = conn.write_all(message).await;
    let _ = conn.shutdown().await;
}

/// Run a transaction-mode session to its end.
pub(super) async fn run(
    shared: Arc<Shared>,
    session: PooledSession,
    shutdown: watch::Receiver<bool>,
) {
    let PooledSession {
        id,
        mut conn,
        startup,
        identity,
        database,
        client_addr,
        service,
        password,
        policy,
        pooling,
        client,
    } = session;
    let service_name = identity.service.clone();
    let settings = shared.pool_settings(&service.upstream_user, pooling);
    let pool = shared
        .pools
        .pool(&service.upstream_user, &database, settings);
    let series = shared.metrics.service_series(&service_name);
    let source = Source {
        shared: &shared,
        pool,
        password,
        service: &service_name,
        client: client.clone(),
        series: series.clone(),
    };
    // The first lease logs in (its errors are the client's login errors) and tells the client
    // the server's parameters.
    let mut lease = match source.lease().await {
        Ok(lease) => lease,
        Err(PoolError::Connect(e)) => {
            inc(&shared.metrics.upstream_connect_errors);
            let message = crate::upstream::login_failure_message(&e, id, &service.upstream_user);
            return refuse(&mut conn, &message).await;
        }
        Err(e) => return refuse(&mut conn, &pool_error(&e, &service_name).to_message()).await,
    };
    let application_name = match params::check(&startup.params, &lease.conn.startup_messages) {
        Ok(name) => name,
        Err(error) => {
            lease.release();
            inc(&shared.metrics.statements_refused);
            return refuse(&mut conn, &error.to_message()).await;
        }
    };
    let state = Arc::new(SessionState::pooled(id, lease.conn.process_id).with_series(series));
    client.attach(state.clone());
    let key = shared.cancels.register(state.clone());
    inc(&shared.metrics.sessions_established);
    tracing::info!(session = id, service = %service_name, database = %database, "session established (transaction pooling)");

    let interceptor = Interceptor::new(identity, policy)
        .with_encryption(shared.encryption.as_ref().map(|e| e.sql.clone()))
        .with_audit_analysis(shared.audit.is_some());
    let facts = SessionFacts {
        id,
        client_addr,
        tls: conn.is_tls(),
        database: &database,
        upstream_role: &service.upstream_user,
        backend_pid: lease.conn.process_id,
        application_name: application_name.as_deref(),
    };
    let audit = match open_session_audit(&shared, &interceptor, facts).await {
        Ok(audit) => audit,
        Err(error) => {
            lease.release();
            shared.cancels.unregister(key);
            return refuse(&mut conn, &error.to_message()).await;
        }
    };
    let opened_at = Instant::now();
    let mut hello = BytesMut::new();
    hello.extend_from_slice(&build::authentication_ok());
    for message in params::client_view(&lease.conn.startup_messages, application_name.as_deref()) {
        hello.extend_from_slice(&message);
    }
    hello.extend_from_slice(&build::backend_key_data(key.process_id, key.secret_key));
    hello.extend_from_slice(&build::ready_for_query(b'I'));
    if conn.write_all(&hello).await.is_err() || conn.flush().await.is_err() {
        lease.release();
        shared.cancels.unregister(key);
        return;
    }
    let (client_read, mut client_write) = conn.split();
    let (client_crypto, upstream_crypto) = match &shared.encryption {
        Some(encryption) => match encryption
            .open_session(
                &mut lease.conn.reader,
                &mut lease.conn.writer,
                KeyScope::from_claims(&interceptor.identity().claims),
            )
            .await
        {
            Ok((c, u)) => (Some(c), Some(u)),
            Err(error) => {
                lease.discard();
                shared.cancels.unregister(key);
                let _ = client_write.write_all(&error.to_message()).await;
                let _ = client_write.shutdown().await;
                return;
            }
        },
        None => (None, None),
    };
    lease.release();

    if let Some(audit) = &audit {
        state.replies.audit_with(audit.completions());
    }
    let mut audit = audit;
    let mut interceptor = interceptor;
    interceptor.set_crypto(client_crypto);
    let client = Client {
        statements: SessionStatements::default(),
        reader: FrameReader::new(client_read, shared.config.listen.max_message_bytes),
        writer: &mut client_write,
        interceptor,
        audit: audit.as_mut(),
        crypto: upstream_crypto,
    };
    let mut held = None;
    let end = match relay(&source, &state, client, &mut held, shutdown).await {
        Ok(never) => match never {},
        Err(end) => end,
    };
    if let Some(held) = held {
        // Mid-transaction or unanswered: the connection's state is the client's; close it.
        held.lease.discard();
    }
    if let Some(audit) = &audit {
        audit.handle().append_nowait(AuditEvent::ConnectionClosed {
            session: audit.session().clone(),
            duration: opened_at.elapsed(),
            statements: audit.statements_recorded,
            reason: Some(end.describe()),
        });
    }
    shared.cancels.unregister(key);
    if let End::Fatal(error) = &end {
        let _ = client_write.write_all(&error.to_message()).await;
    }
    let _ = client_write.flush().await;
    let _ = client_write.shutdown().await;
    tracing::info!(session = id, end = ?end, "session closed");
}

/// The client half of a pooled session.
struct Client<'a> {
    reader: FrameReader<ConnReader>,
    writer: &'a mut ConnWriter,
    interceptor: Interceptor,
    /// The client's prepared statements and portals, as every stage reads them.
    statements: SessionStatements,
    audit: Option<&'a mut SessionAudit>,
    crypto: Option<UpstreamHalf>,
}

/// The next batch from the held server connection; never ready when none is held.
async fn next_server(held: &mut Option<Held>) -> Result<Option<Batch>, ProtocolError> {
    match held {
        Some(held) => held.lease.conn.reader.next_batch().await,
        None => std::future::pending().await,
    }
}

/// Give the held connection back if it is idle outside a transaction with nothing owed.
async fn release_if_done(state: &SessionState, held: &mut Option<Held>, unsynced: bool) {
    let done = held
        .as_ref()
        .is_some_and(|h| h.status == b'I' && h.tracker.is_settled() && !unsynced);
    if !done {
        return;
    }
    let _gate = state.cancel_gate.lock().await;
    state.hold_server(None);
    if let Some(held) = held.take() {
        held.lease.release();
    }
}

fn lost_upstream() -> End {
    End::Fatal(ClientError::fatal(
        sqlstate::CONNECTION_FAILURE,
        "pgward: lost the upstream connection",
    ))
}

/// Both directions of a pooled session, in one task. The connection still held when it ends
/// is left in `held`.
async fn relay(
    source: &Source<'_>,
    state: &SessionState,
    mut client: Client<'_>,
    held: &mut Option<Held>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<std::convert::Infallible, End> {
    let shared = source.shared;
    let mut statements = ClientStatements::default();
    let mut unsynced = false;
    let idle_timeout = shared.config.listen.idle_timeout;
    let mut shutting_down = *shutdown.borrow();
    let idle_timer = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle_timer);
    let idle_checks = !idle_timeout.is_zero();
    loop {
        let event = tokio::select! {
            biased;
            server = next_server(held) => Event::Server(server),
            batch = client.reader.next_batch() => Event::Client(batch),
            changed = shutdown.changed(), if !shutting_down => {
                shutting_down = changed.is_err() || *shutdown.borrow();
                if shutting_down {
                    idle_timer.as_mut().reset(tokio::time::Instant::now());
                }
                continue;
            }
            () = &mut idle_timer, if idle_checks || shutting_down => {
                let idle = held.is_none() && state.is_idle();
                if shutting_down && idle {
                    return Err(End::Fatal(ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, "terminating connection due to administrator command")));
                }
                if idle_checks && !shutting_down && idle {
                    return Err(End::Fatal(ClientError::fatal(sqlstate::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout")));
                }
                let again = if shutting_down { Duration::from_millis(20) } else { idle_timeout };
                idle_timer.as_mut().reset(tokio::time::Instant::now() + again);
                continue;
            }
        };
        let from_client = match event {
            Event::Client(batch) => batch,
            Event::Server(read) => {
                let answers = server_batch(state, held, read)?;
                // Back in the pool before the client sees the answer that ends its
                // transaction: its next transaction, or another client's, finds it idle.
                release_if_done(state, held, unsynced).await;
                if let Some(answers) = answers {
                    forward_to_client(shared, state, &mut client, answers).await?;
                }
                continue;
            }
        };
        if idle_checks && !shutting_down {
            idle_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + idle_timeout);
        }
        let batch = match from_client {
            Ok(Some(batch)) => batch,
            Ok(None) => return Err(End::ClientClosed),
            Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => {
                return Err(End::ClientClosed)
            }
            Err(e) => {
                inc(&shared.metrics.protocol_errors);
                tracing::info!(session = state.id, error = %e, "client protocol violation");
                return Err(End::Fatal(ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("pgward: {e}"),
                )));
            }
        };
        client_batch(
            source,
            state,
            &mut client,
            held,
            &mut statements,
            &mut unsynced,
            batch,
        )
        .await?;
        release_if_done(state, held, unsynced).await;
    }
}

/// What woke the relay.
enum Event {
    Client(Result<Option<Batch>, ProtocolError>),
    Server(Result<Option<Batch>, ProtocolError>),
}

/// One batch from the client: pipeline, borrow a server connection if none is held,
/// translate prepared statements, write.
async fn client_batch(
    source: &Source<'_>,
    state: &SessionState,
    client: &mut Client<'_>,
    held: &mut Option<Held>,
    statements: &mut ClientStatements,
    unsynced: &mut bool,
    batch: Batch,
) -> Result<(), End> {
    let shared = source.shared;
    if held.is_none() && state.is_idle() {
        if let Some(policies) = client.interceptor.take_ddl_pending() {
            policies.refresh_catalog().await;
        }
    }
    let outgoing = if client.interceptor.is_passthrough() && client.audit.is_none() {
        pipeline::forward_unchanged(state, &batch)
    } else {
        pipeline::run_batch(
            shared,
            state,
            (&mut client.interceptor, &mut client.statements),
            client.audit.as_deref_mut(),
            &batch,
        )
        .await
    };
    let (terminate, executes) = account_client_batch(shared, state, &batch);
    let only_terminate = batch.messages().all(|m| m.tag() == frontend::TERMINATE);
    if held.is_none() {
        if only_terminate {
            return Err(End::ClientClosed);
        }
        if state.is_idle() {
            if let Some(answer) = prepared::answer_locally(&outgoing, statements) {
                state.mark_busy();
                let answer = Batch::from_whole_messages(answer);
                return forward_to_client(shared, state, client, answer).await;
            }
        }
        let lease = source.acquire().await.map_err(End::Fatal)?;
        let _gate = state.cancel_gate.lock().await;
        state.hold_server(Some((lease.conn.process_id, lease.conn.secret_key)));
        *held = Some(Held {
            lease,
            tracker: Tracker::default(),
            status: b'I',
        });
    }
    let Some(h) = held.as_mut() else {
        return Err(End::ClientClosed);
    };
    let mut refuse = |error: ClientError| state.register_refusal(error);
    let translation = prepared::translate(
        &outgoing,
        statements,
        OnServer {
            tracker: &mut h.tracker,
            prepared: &mut h.lease.conn.prepared,
        },
        &mut refuse,
    )
    .map_err(|e| {
        End::Fatal(ClientError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("pgward: {e}"),
        ))
    })?;
    if let Some(now) = translation.unsynced {
        *unsynced = now;
    }
    if executes {
        let _gate = state.cancel_gate.lock().await;
        state.bump_generation();
    }
    state.mark_busy();
    if !translation.bytes.is_empty() {
        let writer = &mut h.lease.conn.writer;
        if writer.write_all(&translation.bytes).await.is_err() || writer.flush().await.is_err() {
            return Err(lost_upstream());
        }
    }
    if terminate || translation.terminate {
        return Err(End::ClientClosed);
    }
    check_awaited(state, &mut client.interceptor)
}

/// One batch from the held server connection, with the answers to inserted messages dropped
/// and the connection's transaction status noted: what the client is to get.
fn server_batch(
    state: &SessionState,
    held: &mut Option<Held>,
    read: Result<Option<Batch>, ProtocolError>,
) -> Result<Option<Batch>, End> {
    let Some(h) = held.as_mut() else {
        return Ok(None);
    };
    let batch = match read {
        Ok(Some(batch)) => batch,
        Ok(None) | Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => {
            return Err(lost_upstream());
        }
        Err(e) => {
            tracing::warn!(session = state.id, error = %e, "upstream protocol violation");
            return Err(lost_upstream());
        }
    };
    let batch = h
        .tracker
        .incoming(&batch, &mut h.lease.conn.prepared)
        .unwrap_or(batch);
    for message in batch.messages() {
        if message.tag() == backend::READY_FOR_QUERY {
            h.status = message.body().first().copied().unwrap_or(b'E');
        }
    }
    Ok(Some(batch))
}

/// Decrypt, account, wait for audit durability and write a batch of answers to the client.
async fn forward_to_client(
    shared: &Shared,
    state: &SessionState,
    client: &mut Client<'_>,
    batch: Batch,
) -> Result<(), End> {
    let Incoming {
        client: batch,
        tracked,
    } = encryption::relay(client.crypto.as_mut(), batch).await;
    let outgoing = account_upstream_batch(shared, state, &batch, tracked.as_ref());
    if state.replies.is_audited() {
        await_durable_records(shared, state).await?;
    }
    for chunk in &outgoing {
        if client.writer.write_all(chunk).await.is_err() {
            return Err(End::Io);
        }
    }
    if client.writer.flush().await.is_err() {
        return Err(End::Io);
    }
    Ok(())
}
