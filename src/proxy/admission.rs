//! An authenticated client becomes a session: its service's upstream login and its policy are
//! settled here, then it runs with a server connection of its own (`session`: session mode) or
//! with server connections lent per transaction (`pooled`: transaction mode). Both depend on
//! the session helpers; only this module knows of both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::handshake::Authenticated;
use super::policy::SessionPolicy;
use super::pooled::{self, PooledSession};
use super::registry::{ClientFacts, ClientMode};
use super::session::{self, Admitted};
use super::Shared;
use crate::auth::Identity;
use crate::config::PoolMode;
use crate::error::{sqlstate, ClientError};
use crate::metrics::inc;

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// A new session id (client sessions and console sessions share the sequence).
pub(super) fn next_session_id() -> u64 {
    NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed)
}

/// Run an authenticated client's session to its end, inside a span naming it.
pub async fn run(shared: Arc<Shared>, auth: Authenticated, shutdown: watch::Receiver<bool>) {
    let id = next_session_id();
    let span = tracing::info_span!("session", id, service = %auth.identity.service, client = %auth.client_addr);
    admit_and_run(shared, auth, shutdown, id)
        .instrument(span)
        .await;
}

async fn admit_and_run(
    shared: Arc<Shared>,
    auth: Authenticated,
    shutdown: watch::Receiver<bool>,
    id: u64,
) {
    let Authenticated {
        mut conn,
        startup,
        identity,
        database,
        client_addr,
    } = auth;
    let Some((service, password)) = shared.service_login(&identity.service) else {
        return;
    };
    let policy = match admit(&shared, &identity, &database, service.unrestricted) {
        Ok(policy) => policy,
        Err(error) => {
            inc(&shared.metrics.statements_refused);
            tracing::info!(session = id, service = %identity.service, reason = %error.message, "session refused by policy");
            let _ = conn.write_all(&error.to_message()).await;
            let _ = conn.shutdown().await;
            return;
        }
    };
    let pooling = shared.pooling(&service);
    let transaction = pooling.mode == PoolMode::Transaction;
    let registered = shared.registry.register(ClientFacts {
        id,
        service: identity.service.clone(),
        database: database.clone(),
        addr: client_addr,
        tls: conn.is_tls(),
        mode: if transaction {
            ClientMode::Transaction
        } else {
            ClientMode::Session
        },
        token_id: identity.token_id.clone(),
        application_name: startup.get("application_name").map(str::to_string),
        upstream_role: Some(service.upstream_user.clone()),
    });
    let client = registered.entry.clone();
    if transaction {
        let session = PooledSession {
            id,
            conn,
            startup,
            identity,
            database,
            client_addr,
            service,
            password,
            policy,
            pooling,
            client,
        };
        return pooled::run(shared.clone(), session, shutdown).await;
    }
    let session = Admitted {
        id,
        conn,
        startup,
        identity,
        database,
        client_addr,
        service,
        password,
        policy,
        client,
    };
    session::run(shared.clone(), session, shutdown).await;
}

/// What binds the session, or the FATAL error refusing it.
fn admit(
    shared: &Shared,
    identity: &Identity,
    database: &str,
    unrestricted: bool,
) -> Result<SessionPolicy, ClientError> {
    match &shared.policies {
        Some(policies) => policies.admit(identity, database, unrestricted),
        None if unrestricted => Ok(SessionPolicy::Unrestricted),
        None => Err(ClientError::fatal(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!(
                "pgward: service {:?} has no policy (no [policy] is configured and the service is not unrestricted)",
                identity.service
            ),
        )),
    }
}
