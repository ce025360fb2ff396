//! The proxy: accept loop, connection limits, cancel routing and graceful shutdown.
//!
//! - [`handshake`]: encryption negotiation, startup packet, token authentication;
//! - [`session`]: upstream login and the two relay directions;
//! - [`intercept`]: the hook point each client message passes through;
//! - [`audit`]: statement records made durable before forwarding, and their completions;
//! - [`policy`]: row policies at connect time and per statement, kept current;
//! - [`state`]: what the two directions and the cancel path share;
//! - [`cancel`]: the map from the keys pgward hands out to sessions;
//! - [`cluster`]: cancels sent on to the fleet replica whose key they carry;
//! - [`console`]: the admin console (database `pgward`: `SHOW POOLS`, …) and [`registry`],
//!   the live client sessions it lists.

mod admin;
mod admission;
pub mod audit;
pub mod cancel;
pub mod cluster;
mod console;
pub mod copy_in;
pub mod encryption;
pub mod handshake;
pub mod intercept;
mod pipeline;
pub mod policy;
mod pooled;
pub mod registry;
pub mod reload;
pub mod replies;
pub mod session;
pub mod state;
pub mod statements;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::auth::TokenVerifier;
use crate::config::{Config, ConfigError};
use crate::error::{sqlstate, ClientError};
use crate::metrics::{inc, Metrics};
use crate::upstream::UpstreamTarget;
use cancel::CancelRegistry;
use handshake::HandshakeOutcome;

/// How many over-limit connections may be in the middle of being told "too many" at once.
const MAX_REJECTING: usize = 64;

/// Why the proxy could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("authentication setup: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("policies: {0}")]
    Policy(#[from] policy::PolicyLoadError),
    #[error("field encryption: {0}")]
    Encryption(#[from] crate::crypto::CryptoError),
    #[error("binding {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every session of one proxy shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub verifier: Arc<TokenVerifier>,
    pub upstream: UpstreamTarget,
    /// `[services]` with their resolved upstream passwords (resolved at start and on SIGHUP,
    /// not per connection); swapped whole by [`reload`].
    services: parking_lot::RwLock<Arc<reload::Services>>,
    pub metrics: Arc<Metrics>,
    pub cancels: CancelRegistry,
    /// This replica's place in a fleet, when `[cluster]` is configured.
    pub cluster: Option<cluster::Cluster>,
    /// Row policies, when `[policy]` is configured.
    pub policies: Option<Arc<policy::Policies>>,
    /// The audit log, when `[audit]` is configured and enabled.
    pub audit: Option<crate::audit::AuditHandle>,
    /// Field encryption, when `[[encrypt]]` columns are configured.
    pub encryption: Option<Arc<encryption::Encryption>>,
    /// Server-connection pools of services in transaction pooling mode.
    pub pools: crate::pool::Pools,
    /// The live client sessions (admin console, client gauges).
    pub registry: registry::Registry,
    /// The `/readyz` write probe of the audit directory, one at a time, its answer shared
    /// (see [`admin::AuditProbe`]).
    audit_probe: admin::AuditProbe,
}

/// A bound, ready-to-run proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    /// Owns the audit writer; shut down (final signed checkpoint) when the proxy stops.
    audit_log: Option<crate::audit::AuditLog>,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl Proxy {
    /// Load key material, resolve secrets and bind the listen (and admin) addresses.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let tls = match (&config.listen.tls_cert_file, &config.listen.tls_key_file) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(cert, key, config.listen.client_ca_file.as_deref())?,
            )),
            _ => None,
        };
        let verifier = Arc::new(TokenVerifier::new(config.auth.clone()).await?);
        let upstream = UpstreamTarget::new(&config.upstream)?;
        let services = reload::Services::resolve(&config)?;
        let cluster = config
            .cluster
            .as_ref()
            .map(cluster::Cluster::start)
            .transpose()?;
        let upstream_passwords = &services.passwords;
        let metrics = Arc::new(Metrics::default());
        let policies =
            policy::Policies::load(&config, &upstream, upstream_passwords, metrics.clone()).await?;
        // Bind before opening the audit log: a second instance on a taken address must fail
        // without touching the log, and one on a free address fails on the log's lock.
        let address = config.listen.address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind { address, source })?;
        let admin = match config.admin.address {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|source| StartError::Bind { address, source })?,
            ),
            None => None,
        };
        let (audit_log, audit) = match &config.audit {
            Some(audit) if audit.enabled => {
                let (log, handle) = crate::audit::AuditLog::open(audit.clone()).await?;
                if handle.truncation_detected() {
                    inc(&metrics.audit_truncations_detected);
                }
                metrics.add_set(Arc::new(handle.clone()));
                tracing::info!(dir = %audit.dir.display(), "audit log open");
                (Some(log), Some(handle))
            }
            _ => {
                tracing::warn!("no [audit] configured: statements are not audited");
                (None, None)
            }
        };
        let encryption =
            encryption::Encryption::start(&config, &upstream, upstream_passwords).await?;
        if let Some(encryption) = &encryption {
            metrics.add_set(encryption.manager.metrics());
        }
        if let (Some(policies), Some(encryption)) = (&policies, &encryption) {
            policies.engine().set_encryption(encryption.sql.clone());
        }
        Ok(Self {
            shared: Arc::new(Shared {
                config: Arc::new(config),
                tls,
                verifier,
                upstream,
                services: parking_lot::RwLock::new(Arc::new(services)),
                metrics,
                cancels: CancelRegistry::for_node(cluster.as_ref().map(cluster::Cluster::node_id)),
                cluster,
                policies,
                audit,
                encryption,
                pools: crate::pool::Pools::default(),
                registry: registry::Registry::default(),
                audit_probe: admin::AuditProbe::default(),
            }),
            audit_log,
            listener,
            admin,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin endpoint's address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Field encryption, if configured (for SIGHUP key refreshes).
    pub fn encryption(&self) -> Option<Arc<encryption::Encryption>> {
        self.shared.encryption.clone()
    }

    /// The token verifier (for SIGHUP reloads).
    pub fn verifier(&self) -> Arc<TokenVerifier> {
        self.shared.verifier.clone()
    }

    /// The loaded policies, if `[policy]` is configured.
    pub fn policies(&self) -> Option<Arc<policy::Policies>> {
        self.shared.policies.clone()
    }

    /// What SIGHUP uses to apply a new configuration to the running proxy.
    pub fn reloader(&self) -> reload::Reloader {
        reload::Reloader::new(self.shared.clone())
    }

    /// Serve until `shutdown` resolves, then stop accepting, let running statements finish
    /// (up to `listen.shutdown_grace`) and close every session.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            shared,
            listener,
            admin,
            audit_log,
        } = self;
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, shared.clone())));
        let policy_watcher = shared.policies.as_ref().and_then(|p| p.spawn_watcher());
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(shared.config.listen.max_client_connections));
        let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgward listening");
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => accepted,
            };
            while sessions.try_join_next().is_some() {}
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            inc(&shared.metrics.connections_accepted);
            let shared = shared.clone();
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    let stop_rx = stop_rx.clone();
                    sessions.spawn(async move {
                        serve_connection(shared, tcp, peer, stop_rx).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    inc(&shared.metrics.connections_rejected_limit);
                    if let Ok(slot) = rejecting.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            refuse_over_limit(&shared, tcp).await;
                            drop(slot);
                        });
                    }
                }
            }
        }
        drop(listener);
        tracing::info!(
            sessions = sessions.len(),
            "shutting down: waiting for running statements"
        );
        let _ = stop_tx.send(true);
        let grace = shared.config.listen.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "shutdown grace period over: closing remaining sessions"
            );
            sessions.shutdown().await;
        }
        for task in admin_task.into_iter().chain(policy_watcher) {
            task.abort();
        }
        if let Some(log) = audit_log {
            if let Err(e) = log.shutdown().await {
                tracing::error!(error = %e, "audit log: final checkpoint failed");
            }
        }
        tracing::info!("pgward stopped");
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    shared
        .metrics
        .connections_active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match handshake::handshake(&shared, tcp, peer).await {
        HandshakeOutcome::Session(auth) => admission::run(shared.clone(), *auth, stop).await,
        HandshakeOutcome::Console(auth) => console::run(shared.clone(), *auth, stop).await,
        HandshakeOutcome::Cancel {
            process_id,
            secret_key,
        } => cluster::route_cancel(&shared, process_id, secret_key).await,
        HandshakeOutcome::PeerCancel { request, conn } => {
            cluster::accept_peer_cancel(&shared, request, conn).await;
        }
        HandshakeOutcome::Closed => {}
    }
    shared
        .metrics
        .connections_active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Forward a CancelRequest for this replica to its own session's upstream backend — and only
/// if no request was forwarded after the cancel arrived, so a cancel never hits a later query.
async fn deliver_cancel(shared: &Shared, process_id: u32, secret_key: u32) {
    let Some(state) = shared.cancels.lookup(process_id, secret_key) else {
        inc(&shared.metrics.cancels_dropped);
        return;
    };
    // The gate is held by a cancel being delivered (which already stops what runs now), or
    // for a moment while a new request is forwarded (which a cancel that waited for it would
    // have to be dropped for anyway): either way this one is dropped at once. Waiting its
    // turn instead let a flood of cancels with a session's own key queue up behind the gate,
    // each holding a client connection slot, until no one else could connect.
    let Ok(_gate) = state.cancel_gate.try_lock() else {
        inc(&shared.metrics.cancels_dropped);
        return;
    };
    let Some((process_id, secret_key)) = state.cancel_target() else {
        // Transaction pooling, and the session holds no server connection: nothing runs.
        inc(&shared.metrics.cancels_dropped);
        return;
    };
    let delivery = shared.upstream.cancel(process_id, secret_key);
    match tokio::time::timeout(Duration::from_secs(5), delivery).await {
        Ok(Ok(())) => inc(&shared.metrics.cancels_forwarded),
        Ok(Err(e)) => tracing::warn!(session = state.id, error = %e, "cancel delivery failed"),
        Err(_) => tracing::warn!(session = state.id, "cancel delivery timed out"),
    }
}

/// Finish the startup phase of an over-limit connection only to tell it why it is refused.
async fn refuse_over_limit(shared: &Shared, tcp: TcpStream) {
    let error = ClientError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        handshake::refuse_after_startup(shared, tcp, error),
    )
    .await;
}
