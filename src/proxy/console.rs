//! The admin console: database `pgward` on the client listener, PgBouncer-style.
//!
//! A client of a service named in `[admin] console_services` that asks for database `pgward`
//! is handed here by the handshake (anyone else is refused there, 42501). It is answered by
//! pgward itself and never reaches upstream: there is no upstream connection at all. Commands
//! come as simple Queries (`SHOW POOLS`, `SHOW CLIENTS`, `SHOW SERVERS`, `SHOW STATS`,
//! `SHOW HELP`, see [`command`]), or through the extended protocol without parameters
//! ([`extended`]); each is recorded in the audit log, durably, before it is answered.
//! Anything else gets an ErrorResponse and the session goes on.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::admission::next_session_id;
use super::handshake::Authenticated;
use super::registry::{ClientEntry, ClientFacts, ClientMode};
use super::Shared;
use crate::audit::{
    AuditEvent, AuditHandle, Decision, OnFailure, Protocol, SessionInfo, SqlText, StatementRecord,
};
use crate::error::{sqlstate, ClientError};
use crate::net::{ConnReader, ConnWriter};
use crate::protocol::view::Frontend;
use crate::protocol::{build, FrameReader, Message, ProtocolError};

mod command;
mod extended;
mod views;

pub use views::render_metrics;

/// Largest message a console client may send.
const MAX_CONSOLE_MESSAGE: usize = 64 * 1024;

/// Why a console session ends early.
#[derive(Debug, Error)]
enum ConsoleEnd {
    #[error("client closed")]
    Closed,
    #[error("{}", .0.message)]
    Fatal(ClientError),
    #[error("client connection lost")]
    Io,
}

/// One console session's connection to the audit log.
struct Audit {
    handle: AuditHandle,
    session: Arc<SessionInfo>,
    recorded: u64,
}

impl Audit {
    /// Record one command (allowed, or refused with its SQLSTATE) before it is answered.
    async fn record(
        &mut self,
        text: &str,
        refused: Option<&ClientError>,
        protocol: Protocol,
    ) -> Result<(), ClientError> {
        let mut record =
            StatementRecord::new(self.session.clone(), protocol, SqlText::new(text, false));
        record.touched_mut().command_class = vec!["MISC"];
        if let Some(error) = refused {
            record.decision = Decision::Refused;
            record.reason = Some(error.message.clone());
            record.sqlstate = Some(error.sqlstate.to_string());
        }
        self.recorded += 1;
        durable(&self.handle, AuditEvent::Statement(Box::new(record))).await
    }
}

/// Append and wait until durable; a failure refuses when `on_failure = "refuse"`.
async fn durable(handle: &AuditHandle, event: AuditEvent) -> Result<(), ClientError> {
    match handle.append(event).await {
        Ok(_) => Ok(()),
        Err(e) if handle.on_failure() == OnFailure::Refuse => {
            tracing::error!(error = %e, "audit log cannot write: console command refused");
            Err(ClientError::error(
                sqlstate::IO_ERROR,
                "pgward: the audit log cannot record this command, so it is not run",
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "audit log cannot write (on_failure = continue)");
            Ok(())
        }
    }
}

/// Run a console session to its end.
pub async fn run(shared: Arc<Shared>, auth: Authenticated, mut shutdown: watch::Receiver<bool>) {
    let id = next_session_id();
    let Authenticated {
        conn,
        startup,
        identity,
        database,
        client_addr,
    } = auth;
    let registered = shared.registry.register(ClientFacts {
        id,
        service: identity.service.clone(),
        database: database.clone(),
        addr: client_addr,
        tls: conn.is_tls(),
        mode: ClientMode::Console,
        token_id: identity.token_id.clone(),
        application_name: startup.get("application_name").map(str::to_string),
        upstream_role: None,
    });
    let (reader, mut writer) = conn.split();
    let mut audit = match open_audit(&shared, &registered.entry, &identity).await {
        Ok(audit) => audit,
        Err(error) => {
            let _ = writer.write_all(&error.into_fatal().to_message()).await;
            let _ = writer.shutdown().await;
            return;
        }
    };
    tracing::info!(session = id, service = %identity.service, "admin console session opened");
    let opened = Instant::now();
    let mut reader = FrameReader::new(reader, MAX_CONSOLE_MESSAGE);
    let end = match send(&mut writer, &hello()).await {
        Ok(()) => {
            serve(
                &shared,
                id,
                &mut reader,
                &mut writer,
                audit.as_mut(),
                &mut shutdown,
            )
            .await
        }
        Err(end) => end,
    };
    if let ConsoleEnd::Fatal(error) = &end {
        let _ = writer.write_all(&error.to_message()).await;
    }
    let _ = writer.shutdown().await;
    if let Some(audit) = &audit {
        audit.handle.append_nowait(AuditEvent::ConnectionClosed {
            session: audit.session.clone(),
            duration: opened.elapsed(),
            statements: audit.recorded,
            reason: Some(end.to_string()),
        });
    }
    tracing::info!(session = id, end = %end, "admin console session closed");
    drop(registered);
}

/// The connection-opened record, durable before anything is answered.
async fn open_audit(
    shared: &Shared,
    client: &ClientEntry,
    identity: &crate::auth::Identity,
) -> Result<Option<Audit>, ClientError> {
    let Some(handle) = &shared.audit else {
        return Ok(None);
    };
    let facts = &client.facts;
    let session = Arc::new(SessionInfo {
        session_id: facts.id,
        client_addr: facts.addr.to_string(),
        tls: facts.tls,
        cert_identity: identity.cert_identity.clone(),
        service: facts.service.clone(),
        token_id: facts.token_id.clone(),
        database: facts.database.clone(),
        claims_used: serde_json::Map::new(),
        upstream_role: None,
        backend_pid: None,
        application_name: facts.application_name.clone(),
    });
    durable(handle, AuditEvent::ConnectionOpened(session.clone())).await?;
    Ok(Some(Audit {
        handle: handle.clone(),
        session,
        recorded: 0,
    }))
}

/// AuthenticationOk, the parameters a client expects, ReadyForQuery.
fn hello() -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&build::authentication_ok());
    for (name, value) in [
        ("server_version", "15.0 (pgward admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        out.extend_from_slice(&build::parameter_status(name, value));
    }
    out.extend_from_slice(&build::ready_for_query(b'I'));
    out.freeze()
}

async fn send(writer: &mut ConnWriter, bytes: &[u8]) -> Result<(), ConsoleEnd> {
    writer.write_all(bytes).await.map_err(|_| ConsoleEnd::Io)?;
    writer.flush().await.map_err(|_| ConsoleEnd::Io)
}

/// Answer the client's messages until it leaves (or pgward shuts down).
async fn serve(
    shared: &Shared,
    id: u64,
    reader: &mut FrameReader<ConnReader>,
    writer: &mut ConnWriter,
    mut audit: Option<&mut Audit>,
    shutdown: &mut watch::Receiver<bool>,
) -> ConsoleEnd {
    let mut extended = extended::Extended::default();
    loop {
        if *shutdown.borrow() {
            return ConsoleEnd::Fatal(ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ));
        }
        let batch = tokio::select! {
            batch = reader.next_batch() => batch,
            changed = shutdown.changed() => {
                if changed.is_err() {
                    // The proxy is gone: nothing will tell this session to stop any more.
                    return ConsoleEnd::Closed;
                }
                continue;
            }
        };
        let batch = match batch {
            Ok(Some(batch)) => batch,
            Ok(None) | Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => {
                return ConsoleEnd::Closed
            }
            Err(e) => {
                return ConsoleEnd::Fatal(ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("pgward: {e}"),
                ))
            }
        };
        let mut out = BytesMut::new();
        for message in batch.messages() {
            match answer(shared, id, &message, audit.as_deref_mut(), &mut extended).await {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(end) => {
                    let _ = send(writer, &out).await;
                    return end;
                }
            }
        }
        if let Err(end) = send(writer, &out).await {
            return end;
        }
    }
}

/// The answer to one client message.
async fn answer(
    shared: &Shared,
    id: u64,
    message: &Message,
    audit: Option<&mut Audit>,
    extended: &mut extended::Extended,
) -> Result<BytesMut, ConsoleEnd> {
    let mut out = BytesMut::new();
    let decoded = Frontend::decode(message).map_err(|e| {
        ConsoleEnd::Fatal(ClientError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("pgward: {e}"),
        ))
    })?;
    match decoded {
        Frontend::Terminate => return Err(ConsoleEnd::Closed),
        Frontend::Sync => {
            extended.skipping = false;
            out.extend_from_slice(&build::ready_for_query(b'I'));
        }
        Frontend::Flush => {}
        _ if extended.skipping => {}
        Frontend::Query { sql } => {
            run_query(shared, id, sql, audit, &mut out).await;
            out.extend_from_slice(&build::ready_for_query(b'I'));
        }
        Frontend::Parse(_)
        | Frontend::Bind(_)
        | Frontend::Describe(_)
        | Frontend::Execute { .. }
        | Frontend::Close(_) => extended.answer(shared, id, &decoded, audit, &mut out).await,
        _ => {
            let error = ClientError::error(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "the pgward admin console answers only SHOW commands",
            );
            out.extend_from_slice(&error.to_message());
            out.extend_from_slice(&build::ready_for_query(b'I'));
        }
    }
    Ok(out)
}

/// Run every statement of one simple Query, stopping at the first error (as PostgreSQL does).
async fn run_query(
    shared: &Shared,
    id: u64,
    text: &str,
    mut audit: Option<&mut Audit>,
    out: &mut BytesMut,
) {
    let statements = command::statements(text);
    if statements.is_empty() {
        out.extend_from_slice(&build::empty_query_response());
        return;
    }
    for statement in statements {
        let parsed = command::parse(statement).map_err(|e| e.to_client());
        if let Some(audit) = audit.as_deref_mut() {
            let refused = parsed.as_ref().err();
            if let Err(error) = audit.record(statement, refused, Protocol::Simple).await {
                out.extend_from_slice(&error.to_message());
                return;
            }
        }
        match parsed {
            Ok(command) => {
                tracing::info!(session = id, command = ?command, "admin console command");
                write_table(&views::show(shared, command, id), out);
            }
            Err(error) => {
                out.extend_from_slice(&error.to_message());
                return;
            }
        }
    }
}

fn write_table(table: &views::Table, out: &mut BytesMut) {
    let text = vec![false; table.columns.len()];
    out.extend_from_slice(&table.row_description(&text));
    table.write_rows(&text, out);
}
