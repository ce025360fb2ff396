//! The proxy's side of row policies: load the engine at start against the live catalog, decide
//! at connect time what a service's session is bound by, rewrite its statements, and keep the
//! engine current (policy files changed, SIGHUP, DDL run through pgward).
//!
//! The engine itself (parsing, rewriting, the rewrite cache) lives in [`crate::policy`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use thiserror::Error;

use crate::auth::Identity;
use crate::config::{Config, PolicyConfig};
use crate::error::{sqlstate, ClientError};
use crate::metrics::{inc, Metrics};
use crate::policy::{
    Catalog, CatalogError, PolicyDenied, PolicyEngine, PolicyError, Rewritten, SessionMemo,
};
use crate::upstream::{UpstreamError, UpstreamTarget};

/// Why the policies could not be loaded at start.
#[derive(Debug, Error)]
pub enum PolicyLoadError {
    #[error("loading the policy catalog from database {database:?}: {source}")]
    Connect {
        database: String,
        #[source]
        source: UpstreamError,
    },
    #[error("loading the policy catalog: {0}")]
    Catalog(#[from] CatalogError),
    #[error("invalid policies in {dir}:\n{}", .errors.join("\n"))]
    Invalid { dir: String, errors: Vec<String> },
}

fn describe(errors: Vec<PolicyError>) -> Vec<String> {
    errors.into_iter().map(|e| format!("  {e}")).collect()
}

/// The loaded policies of one proxy, shared by all sessions.
pub struct Policies {
    engine: PolicyEngine,
    config: PolicyConfig,
    catalog_user: String,
    /// Replaced by a SIGHUP reload; used from the next catalog connection on.
    catalog_password: Mutex<Option<String>>,
    upstream: UpstreamTarget,
    metrics: Arc<Metrics>,
    /// pgward's own connection for catalog reads, opened on first use and reused.
    catalog_client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// What the policy directory looked like at the last (re)load.
    files_seen: Mutex<Vec<(PathBuf, SystemTime, u64)>>,
}

/// What binds one session.
#[derive(Clone)]
pub enum SessionPolicy {
    /// The service's policy rewrites every statement.
    Bound(Arc<Policies>),
    /// An unrestricted service on the policy database: statements pass unchanged, but DDL is
    /// noticed so the catalog policies are checked against stays current.
    WatchDdl(Arc<Policies>),
    /// Unrestricted elsewhere: plain relay.
    Unrestricted,
}

impl Policies {
    /// Load the catalog of the policy database and compile every policy against it; refuse to
    /// start on any invalid policy (a typo must never silently disable a protection).
    pub async fn load(
        config: &Config,
        upstream: &UpstreamTarget,
        passwords: &std::collections::HashMap<String, Option<String>>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Self>>, PolicyLoadError> {
        let (Some(policy), Some((catalog_service, service))) =
            (config.policy.clone(), config.catalog_service())
        else {
            return Ok(None);
        };
        let unrestricted: Vec<String> = config
            .services
            .iter()
            .filter(|(_, s)| s.unrestricted)
            .map(|(name, _)| name.clone())
            .collect();
        let catalog_password = passwords.get(catalog_service).cloned().flatten();
        let client = upstream
            .admin_client(
                &service.upstream_user,
                catalog_password.as_deref(),
                &policy.database,
            )
            .await
            .map_err(|source| PolicyLoadError::Connect {
                database: policy.database.clone(),
                source,
            })?;
        let catalog = Arc::new(Catalog::load(&client).await?);
        let engine = PolicyEngine::load(&policy.dir, catalog, &unrestricted).map_err(|errors| {
            PolicyLoadError::Invalid {
                dir: policy.dir.display().to_string(),
                errors: describe(errors),
            }
        })?;
        engine.set_counters(metrics.rewrites.clone());
        tracing::info!(dir = %policy.dir.display(), database = %policy.database, services = ?engine.services(), "policies loaded");
        Ok(Some(Arc::new(Self {
            engine,
            files_seen: Mutex::new(policy_files(&policy.dir)),
            config: policy,
            catalog_user: service.upstream_user.clone(),
            catalog_password: Mutex::new(catalog_password),
            upstream: upstream.clone(),
            metrics,
            catalog_client: tokio::sync::Mutex::new(Some(client)),
        })))
    }

    /// A SIGHUP reload: the catalog service's login (from its next connection) and the
    /// services configured unrestricted. Returns the catalog service's role, which only a
    /// restart changes.
    pub fn reconfigure(&self, catalog_password: Option<String>, unrestricted: Vec<String>) -> &str {
        *self.catalog_password.lock() = catalog_password;
        self.engine.set_unrestricted(unrestricted);
        &self.catalog_user
    }

    /// The engine (for tools and tests).
    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// Decide what binds a new session of `identity` on `database`, or refuse it (FATAL).
    pub fn admit(
        self: &Arc<Self>,
        identity: &Identity,
        database: &str,
        unrestricted: bool,
    ) -> Result<SessionPolicy, ClientError> {
        if unrestricted {
            return Ok(if database == self.config.database {
                SessionPolicy::WatchDdl(self.clone())
            } else {
                SessionPolicy::Unrestricted
            });
        }
        let service = identity.service.as_str();
        let required = self
            .engine
            .required_claims(service)
            .map_err(|denied| ClientError::fatal(denied.sqlstate, denied.message))?;
        if database != self.config.database {
            return Err(ClientError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!(
                    "pgward: service {service:?} is bound by policies written for database {:?}, not {database:?}",
                    self.config.database
                ),
            ));
        }
        if let Some(missing) = required.iter().find(|c| !identity.claims.contains_key(*c)) {
            return Err(ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("pgward: the token of service {service:?} lacks the claim {missing:?} its policy uses"),
            ));
        }
        Ok(SessionPolicy::Bound(self.clone()))
    }

    /// With `claims_as_settings`: the startup parameters `app.<claim>` = value for each claim
    /// the service's policy uses, which `policy export-rls`'s row-level security reads. The
    /// service itself can never set them (startup parameters and SET are allowlisted).
    pub fn claim_settings(&self, identity: &Identity) -> Vec<(String, String)> {
        if !self.config.claims_as_settings {
            return Vec::new();
        }
        let required = self
            .engine
            .required_claims(&identity.service)
            .unwrap_or_default();
        required
            .into_iter()
            .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .filter_map(|c| {
                let value = match identity.claims.get(&c)? {
                    serde_json::Value::String(s) => s.clone(),
                    v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                        v.to_string()
                    }
                    _ => return None,
                };
                Some((format!("app.{c}"), value))
            })
            .collect()
    }

    /// Rewrite one SQL string of a session of `identity` (cached by the engine and in the
    /// session's memo).
    pub fn rewrite(
        &self,
        memo: &mut SessionMemo,
        identity: &Identity,
        sql: &str,
    ) -> Result<Arc<Rewritten>, PolicyDenied> {
        let who = crate::policy::PolicyIdentity {
            service: &identity.service,
            claims: &identity.claims,
        };
        self.engine.rewrite_in_session(memo, &who, sql)
    }

    /// Re-read the policy files; an invalid set keeps the old one and says why. The files are
    /// read and the set compiled on a blocking thread: a stalled disk holds this reload, not a
    /// worker of the runtime.
    pub async fn reload_files(self: &Arc<Self>) -> Result<(), String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            *this.files_seen.lock() = policy_files(&this.config.dir);
            this.swap_in(this.engine.reload_files())
        })
        .await
        .map_err(|e| format!("the policy reload stopped: {e}"))?
    }

    fn swap_in(&self, result: Result<(), Vec<PolicyError>>) -> Result<(), String> {
        match result {
            Ok(()) => {
                inc(&self.metrics.policy_reloads);
                Ok(())
            }
            Err(errors) => {
                inc(&self.metrics.policy_reload_failures);
                let text = describe(errors).join("\n");
                tracing::error!(dir = %self.config.dir.display(), "policy reload rejected, the previous policies stay in force:\n{text}");
                Err(text)
            }
        }
    }

    /// Reload the catalog (after DDL) and recompile the policies against it.
    pub async fn refresh_catalog(&self) {
        let mut slot = self.catalog_client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let password = self.catalog_password.lock().clone();
            match self
                .upstream
                .admin_client(
                    &self.catalog_user,
                    password.as_deref(),
                    &self.config.database,
                )
                .await
            {
                Ok(client) => *slot = Some(client),
                Err(e) => {
                    tracing::error!(error = %e, "catalog refresh: cannot connect; keeping the previous catalog");
                    return;
                }
            }
        }
        let Some(client) = slot.as_ref() else {
            return;
        };
        match self.engine.catalog().refresh(client).await {
            // Unchanged: keep the compiled policies and their rewrite cache.
            Ok(catalog) if catalog == *self.engine.catalog() => {}
            Ok(catalog) => {
                tracing::info!("upstream catalog changed: policies recompiled");
                let _ = self.swap_in(self.engine.set_catalog(Arc::new(catalog)));
            }
            Err(e) => {
                tracing::error!(error = %e, "catalog refresh failed; keeping the previous catalog");
                *slot = None;
            }
        }
    }

    /// Watch the policy directory for changes (polling: works on every filesystem, including
    /// the bind mounts and ConfigMap symlink swaps of container deployments), and re-read the
    /// catalog now and then so DDL made around pgward is noticed.
    pub fn spawn_watcher(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let files_every = self.config.watch_interval;
        let catalog_every = self.config.catalog_refresh_interval;
        if files_every.is_zero() && catalog_every.is_zero() {
            return None;
        }
        let policies = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            let mut files = ticker(files_every);
            let mut catalog = ticker(catalog_every);
            catalog.reset(); // the catalog was just loaded
            loop {
                let files_due = tokio::select! {
                    _ = files.tick(), if !files_every.is_zero() => true,
                    _ = catalog.tick(), if !catalog_every.is_zero() => false,
                };
                let Some(policies) = policies.upgrade() else {
                    return;
                };
                if files_due {
                    policies.reload_if_files_changed().await;
                } else {
                    policies.refresh_catalog().await;
                }
            }
        }))
    }

    async fn reload_if_files_changed(self: &Arc<Self>) {
        let now = tokio::task::spawn_blocking({
            let dir = self.config.dir.clone();
            move || policy_files(&dir)
        })
        .await
        .unwrap_or_default();
        if *self.files_seen.lock() != now && self.reload_files().await.is_ok() {
            tracing::info!(dir = %self.config.dir.display(), "policy files changed: reloaded");
        }
    }
}

/// An interval that never bursts to catch up (a slow reload must not queue more of them).
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Name, modification time and size of every policy file, sorted: a cheap change detector.
fn policy_files(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| {
            // metadata() follows symlinks, so a swapped ConfigMap link is seen as a change.
            let meta = std::fs::metadata(e.path()).ok()?;
            Some((e.path(), meta.modified().ok()?, meta.len()))
        })
        .collect();
    files.sort();
    files
}

/// Cheap test for DDL in an unrestricted service's SQL: a whole-word `create`, `alter`, `drop`
/// or `rename` anywhere. False positives only cost a catalog refresh.
pub fn may_be_ddl(sql: &str) -> bool {
    const WORDS: [&str; 4] = ["create", "alter", "drop", "rename"];
    sql.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|word| WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_words_are_found_anywhere() {
        assert!(may_be_ddl("select 1; CREATE TABLE t (x int)"));
        assert!(may_be_ddl("alter table t add y int"));
        assert!(!may_be_ddl("select created_at, dropped from t"));
        assert!(!may_be_ddl("insert into t values (1)"));
    }

    #[test]
    fn policy_file_listing_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(policy_files(dir.path()).is_empty());
        std::fs::write(dir.path().join("a.toml"), "x").unwrap();
        std::fs::write(dir.path().join("notes.md"), "x").unwrap();
        let first = policy_files(dir.path());
        assert_eq!(first.len(), 1);
        std::fs::write(dir.path().join("a.toml"), "xy").unwrap();
        assert_ne!(first, policy_files(dir.path()));
    }
}
