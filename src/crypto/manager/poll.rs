//! The key manager's background work: the poller (token file, token maintenance, access
//! check and rotation detection per key name, revalidation of aged keys) and data-key usage
//! accounting.
use std::sync::Arc;
use std::time::Duration;

use super::KeyManager;
use crate::crypto::error::KeyFailure;
use crate::crypto::providers::read_secret_file;
use crate::keys::KeyError;

/// The longest a poll waits for the Vault token file.
const TOKEN_FILE_TIMEOUT: Duration = Duration::from_secs(5);

impl KeyManager {
    /// Poll KEK versions and maintain the Vault token every `interval`, until the manager is dropped.
    pub fn spawn_poller(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(manager) = weak.upgrade() else {
                    return;
                };
                manager.poll_once().await;
            }
        })
    }

    /// SIGHUP: re-read the token file now and poll (picks up a KEK rotation or a new token
    /// at once instead of at the next poll).
    pub async fn reload(&self) {
        self.poll_once().await;
    }

    /// Re-read `token_file` and hand a changed token to the Vault client. Read on a blocking
    /// thread, one read at a time, within [`TOKEN_FILE_TIMEOUT`]: a stalled disk must hold neither a worker of
    /// the runtime nor the poll (token maintenance and rotation checks go on meanwhile).
    async fn reload_token_file(&self) {
        let (Some(path), Some(vault)) = (&self.token_file, &self.vault) else {
            return;
        };
        let read = self.token_file_reads.within(TOKEN_FILE_TIMEOUT, {
            let path = path.clone();
            move || read_secret_file(&path)
        });
        match read.await {
            Ok(Ok(token)) if !token.is_empty() => {
                if vault.replace_token(token) {
                    tracing::info!(file = %path.display(), "Vault token file changed; using the new token");
                }
            }
            Ok(Ok(_)) => {
                tracing::warn!(file = %path.display(), "Vault token file is empty; keeping the current token")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot re-read the Vault token file; keeping the current token")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the Vault token file did not answer; keeping the current token")
            }
        }
    }

    /// One poll: token file and token maintenance, then per key name the access check and
    /// rotation detection, then revalidation of cached keys past their TTL. Failures are
    /// logged; refusals block the key name (see [`KeyManager::refresh_key`]).
    pub async fn poll_once(&self) {
        let _one_at_a_time = self.poll_lock.lock().await;
        self.reload_token_file().await;
        if let Some(vault) = &self.vault {
            if let Err(e) = vault.maintain_token().await {
                tracing::warn!(error = %e, "Vault token maintenance failed");
            }
        }
        for name in self.polled_key_names() {
            let name = name.as_str();
            match self.refresh_key(name).await {
                Ok(o) if o.created => tracing::info!(
                    key = name,
                    kek_version = o.kek_version,
                    "KEK rotation picked up"
                ),
                Ok(_) => self.revalidate(name).await,
                Err(e) => {
                    tracing::warn!(key = name, error = %e, "key refresh failed; cached keys serve until dek_cache_max_stale unless Vault refused")
                }
            }
            // Also when Vault could not be asked: a rotation of the index root is read from the
            // store, and a root that cannot be obtained stops indexing under the old one.
            self.refresh_index_roots(name).await;
            self.account_usage(name).await;
        }
    }

    /// Add this process's encryptions since the last poll to each DEK's total (shared by
    /// every instance where the provider keeps one) and replace the write DEK of `key_name`
    /// once its total reaches the usage limit. Between two polls the total can overshoot by
    /// what all instances encrypt in one poll interval, hence a default limit of 2^30.
    pub async fn account_usage(&self, key_name: &str) {
        let current = self.cache.current_version(key_name);
        let mut exhausted = false;
        for (version, dek) in self.cache.deks_of(key_name) {
            let delta = dek.take_encryptions();
            if delta == 0 && Some(version) != current {
                continue;
            }
            let total = match self
                .provider
                .record_encryptions(key_name, version, delta)
                .await
            {
                Ok(Some(total)) => total,
                Ok(None) => {
                    let mut usage = self.local_usage.lock();
                    let total = usage.entry((key_name.to_string(), version)).or_insert(0);
                    *total = total.saturating_add(delta);
                    *total
                }
                Err(e) => {
                    dek.restore_encryptions(delta);
                    tracing::warn!(key = key_name, dek_version = version, error = %e, "cannot record data key usage; retrying at the next poll");
                    continue;
                }
            };
            exhausted |= Some(version) == current && total >= self.usage_limit;
        }
        if !exhausted {
            return;
        }
        match self.install_new_dek(key_name).await {
            Ok(info) if Some(info.dek_version) != current => {
                self.metrics
                    .usage_rotations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    key = key_name,
                    dek_version = info.dek_version,
                    limit = self.usage_limit,
                    "data key reached keys.dek_max_encryptions; new writes use a new data key"
                );
            }
            Ok(_) => tracing::error!(key = key_name, "data key reached keys.dek_max_encryptions but the provider cannot create another (local provider)"),
            Err(e) => tracing::error!(key = key_name, error = %e, "data key reached keys.dek_max_encryptions; creating a new one failed, retrying at the next poll"),
        }
    }

    /// Re-fetch the cached keys of `key_name` older than the TTL, in the background of
    /// the data path (which keeps serving them meanwhile).
    async fn revalidate(&self, key_name: &str) {
        for version in self.cache.aged_deks(key_name, self.policy.ttl) {
            if let Err(e) = self.fetch_into_cache(key_name, version).await {
                self.background_failure(key_name, version, &e);
            }
        }
    }

    pub(super) fn background_failure(&self, key_name: &str, version: u32, e: &KeyError) {
        if e.is_refusal() {
            self.cache.block(key_name, KeyFailure::of(e));
        } else if e.is_unavailable() {
            tracing::warn!(key = key_name, error = %e, "cannot revalidate a cached key; it serves until dek_cache_max_stale");
        } else {
            tracing::warn!(key = key_name, dek_version = version, error = %e, "a cached key can no longer be obtained; evicting it");
            self.cache.evict_dek(key_name, version);
        }
    }
}
