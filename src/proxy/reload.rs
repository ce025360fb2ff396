//! SIGHUP: a new configuration applied to the running proxy without rebinding or dropping a
//! session. The caller has parsed and validated the whole file; here everything that can fail
//! (upstream passwords, token keys) is prepared before anything is swapped, so a reload either
//! applies or leaves the running configuration as it was. Settings that need a restart are
//! compared with the running ones and, when changed, named in an error log line and ignored.
//!
//! What a reload changes applies to what starts afterwards: new logins see the new services,
//! passwords, pool modes, console services and token settings, new statements the new policies
//! and audit settings. Sessions already open keep the service definition and upstream login
//! they started with. Running pools are the exception: they take a new `pool_size` and
//! `pool_timeout` at once ([`crate::pool::Pool::resize`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{Config, ConfigError, PoolDefaults, PoolMode, PoolSettings, ServiceConfig};

use super::Shared;

/// `[services]` and the upstream passwords they resolve to.
#[derive(Debug)]
pub struct Services {
    config: BTreeMap<String, ServiceConfig>,
    pub(super) passwords: HashMap<String, Option<String>>,
    /// `[pool]`: the defaults of services that do not set their own.
    pool: PoolDefaults,
    /// `[admin] console_services`.
    console: BTreeSet<String>,
}

impl Services {
    /// Reads every service's password (file or environment); one that cannot be read fails
    /// the whole set.
    pub fn resolve(config: &Config) -> Result<Self, ConfigError> {
        let mut passwords = HashMap::new();
        for (name, service) in &config.services {
            let password = service
                .upstream_password
                .as_ref()
                .map(|s| s.resolve())
                .transpose()?;
            passwords.insert(name.clone(), password);
        }
        Ok(Services {
            config: config.services.clone(),
            passwords,
            pool: config.pool.clone(),
            console: config.admin.console_services.iter().cloned().collect(),
        })
    }

    /// The pool settings of `role`'s pools: those of the transaction-mode services logging
    /// in as it; when they differ, the largest `pool_size` and the longest `pool_timeout`.
    fn pool_settings_for_role(&self, role: &str) -> Option<PoolSettings> {
        self.config
            .values()
            .filter(|s| s.upstream_user == role)
            .map(|s| s.pooling(&self.pool))
            .filter(|p| p.mode == PoolMode::Transaction)
            .reduce(|a, b| PoolSettings {
                mode: PoolMode::Transaction,
                size: a.size.max(b.size),
                timeout: a.timeout.max(b.timeout),
            })
    }

    fn unrestricted(&self) -> Vec<String> {
        self.config
            .iter()
            .filter(|(_, s)| s.unrestricted)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl Shared {
    /// The service's configuration as of now (`None`: not configured).
    pub fn service(&self, name: &str) -> Option<ServiceConfig> {
        self.services.read().config.get(name).cloned()
    }

    /// The service's pooling as of now: its own settings, else `[pool]`'s.
    pub fn pooling(&self, service: &ServiceConfig) -> PoolSettings {
        service.pooling(&self.services.read().pool)
    }

    /// The settings a new pool of `role` gets (see [`Services`]); `fallback` when no
    /// transaction-mode service logs in as it any more.
    pub fn pool_settings(&self, role: &str, fallback: PoolSettings) -> PoolSettings {
        self.services
            .read()
            .pool_settings_for_role(role)
            .unwrap_or(fallback)
    }

    /// Whether `service` may open the admin console (`[admin] console_services`).
    pub fn may_use_console(&self, service: &str) -> bool {
        self.services.read().console.contains(service)
    }

    /// The service's configuration and its upstream password, read together so a session
    /// never pairs a role from one reload with a password from another.
    pub fn service_login(&self, name: &str) -> Option<(ServiceConfig, Option<String>)> {
        let services = self.services.read();
        let service = services.config.get(name)?.clone();
        let password = services.passwords.get(name).cloned().flatten();
        Some((service, password))
    }
}

/// Why a reload was rejected (the running configuration stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("token keys: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("reading the upstream passwords stopped: {0}")]
    Stopped(#[from] tokio::task::JoinError),
}

/// Applies new configurations to one running proxy.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Applies what can change without a restart from `new` (parsed and validated): the
    /// services and their upstream passwords, `[auth]` (settings and keys), the live
    /// `[audit]` settings and `[cluster]`'s peers, secret and timeout. Returns the sections
    /// that changed but need a restart (already logged). On error nothing was changed.
    pub async fn apply(&self, new: &Config) -> Result<Vec<&'static str>, ReloadError> {
        let shared = &self.shared;
        // Password files are read on a blocking thread: a stalled disk holds the reload, not
        // a worker of the runtime.
        let resolving = new.clone();
        let services = tokio::task::spawn_blocking(move || Services::resolve(&resolving)).await??;
        // Peers reload only while the node id stays (a new id, or joining or leaving a fleet,
        // needs a restart: keys already handed out name the running one).
        let peers = match (&shared.cluster, &new.cluster) {
            (Some(running), Some(cluster)) if running.node_id() == cluster.node_id => {
                Some(super::cluster::PeerSet::prepare(cluster)?)
            }
            _ => None,
        };
        // The last step that can fail; it swaps nothing unless the new keys load.
        shared.verifier.reconfigure(new.auth.clone()).await?;
        let added: Vec<&String> = services
            .config
            .keys()
            .filter(|n| shared.service(n).is_none())
            .collect();
        let removed: Vec<String> = {
            let running = shared.services.read();
            running
                .config
                .keys()
                .filter(|n| !services.config.contains_key(*n))
                .cloned()
                .collect()
        };
        tracing::info!(
            ?added,
            ?removed,
            "SIGHUP: services and upstream passwords reloaded"
        );
        if let Some(policies) = &shared.policies {
            let catalog_password = new
                .catalog_service()
                .and_then(|(name, _)| services.passwords.get(name).cloned().flatten());
            policies.reconfigure(catalog_password, services.unrestricted());
        }
        *shared.services.write() = Arc::new(services);
        self.resize_pools();
        if let (Some(cluster), Some(peers)) = (&shared.cluster, peers) {
            cluster.install(peers);
        }
        let restart = restart_only_changes(&shared.config, new);
        if let (Some(handle), Some(audit)) = (&shared.audit, &new.audit) {
            match handle.apply_live(audit).await {
                Ok(changed) if !changed.is_empty() => {
                    tracing::info!(?changed, "SIGHUP: audit settings applied");
                }
                Ok(_) => {}
                Err(e) => {
                    // Not applied: the log could not record the change.
                    tracing::error!(error = %e, "SIGHUP: audit settings not applied (the change could not be recorded)");
                }
            }
        }
        for section in &restart {
            tracing::error!(
                section,
                "SIGHUP: changed, but needs a restart; the running value stays"
            );
        }
        Ok(restart)
    }
}

impl Reloader {
    /// Existing pools take their role's `pool_size` and `pool_timeout` as now configured
    /// (a role no transaction-mode service logs in as any more keeps its pools as they are).
    fn resize_pools(&self) {
        let services = self.shared.services.read().clone();
        for pool in self.shared.pools.all() {
            let Some(settings) = services.pool_settings_for_role(&pool.role) else {
                continue;
            };
            if settings.size != pool.size() || settings.timeout != pool.timeout() {
                pool.resize(settings);
            }
        }
    }
}

/// The settings that changed between the running configuration and `new` but cannot change
/// without a restart (listen addresses and limits, upstream, admin, the policy directory and
/// database, field encryption, and the audit log's own file settings).
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut changed = Vec::new();
    let mut check = |name: &'static str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        if !same(a, b) {
            changed.push(name);
        }
    };
    check("[listen]", &running.listen, &new.listen);
    check("[upstream]", &running.upstream, &new.upstream);
    // `console_services` is reloaded with the services.
    check(
        "[admin] address",
        &running.admin.address,
        &new.admin.address,
    );
    check("[policy]", &running.policy, &new.policy);
    check("[vault]", &running.vault, &new.vault);
    check("[keys]", &running.keys, &new.keys);
    check("[[encrypt]]", &running.encrypt, &new.encrypt);
    let node = |c: &Config| c.cluster.as_ref().map(|c| c.node_id);
    check("[cluster] node_id", &node(running), &node(new));
    let fixed = |c: &Option<crate::audit::AuditConfig>| {
        c.as_ref().map(|a| {
            let mut a = a.clone();
            // The live ones are compared by `apply_live`.
            a.on_failure = Default::default();
            a.durability = Default::default();
            a.record_values = false;
            a
        })
    };
    check("[audit]", &fixed(&running.audit), &fixed(&new.audit));
    let catalog = |c: &Config| {
        c.catalog_service()
            .map(|(name, s)| (name.to_string(), s.upstream_user.clone()))
    };
    check("[policy] catalog_service", &catalog(running), &catalog(new));
    changed
}
