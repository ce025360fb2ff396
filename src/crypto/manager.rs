//! `KeyManager`: per-column encryption, decryption and blind indexes over a key provider,
//! with DEK caching, rotation detection and a Vault-outage grace period.
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::config::DEFAULT_MAX_ENCRYPTIONS;
use super::config::{qualified_table, qualify_table, CryptoConfig, EncryptColumn, KeysConfig};
use super::envelope::{key_name_id, peek_key_ref, Dek, KeyRef};
use super::error::{CryptoError, KeyFailure};
use super::keycache::{KeyCache, Slot};
pub use super::providers::{build_provider, vault_client, ProviderParts};

mod context;
mod index;
mod poll;
use super::scope::KeyScope;
use crate::keys::metrics::KeyMetrics;
use crate::keys::store::WrappedKeyStore;
use crate::keys::vault::VaultClient;
use crate::keys::{DekInfo, KeyError, KeyProvider};
pub use context::NamedKey;
use context::ResolvedKey;
pub use index::SearchIndexes;

/// One configured column with its derived key id.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub column: EncryptColumn,
    /// `schema.table` as used for the AAD binding.
    pub table: String,
    pub key_id: u32,
}

/// Result of refreshing one key name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshOutcome {
    pub key_name: String,
    pub kek_version: u32,
    pub dek: DekInfo,
    /// A new DEK was created (first use or KEK rotation).
    pub created: bool,
}

/// Caching and timing knobs (from `[keys]`).
#[derive(Clone, Copy, Debug)]
pub struct CachePolicy {
    pub ttl: Duration,
    pub max_stale: Duration,
    pub blocking_threshold: usize,
}

impl From<&KeysConfig> for CachePolicy {
    fn from(k: &KeysConfig) -> Self {
        CachePolicy {
            ttl: k.dek_cache_ttl,
            max_stale: k.dek_cache_max_stale,
            blocking_threshold: k.blocking_threshold_bytes,
        }
    }
}

/// Per-column keys over a provider. Vault is asked in the background (the poller) and, on
/// the data path, only for a key that is not cached; a cached key serves without waiting
/// for Vault until `max_stale`, and a refusal (revoked token, permission denied, sealed)
/// blocks its key name at once (see [`KeyCache`]).
pub struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    vault: Option<Arc<VaultClient>>,
    /// Encrypted columns by qualified table, then column: looked up for every value sealed or
    /// opened, by borrowed names (no key built per lookup).
    columns: HashMap<String, HashMap<String, ColumnSpec>>,
    /// The configured key names of columns without a key context (polled, prefetched).
    key_names: BTreeSet<String>,
    /// Per-context key names in use (see [`super::scope`]), with their configured key name:
    /// polled like `key_names` from their first use on.
    contexts: parking_lot::RwLock<std::collections::BTreeMap<String, String>>,
    policy: CachePolicy,
    cache: KeyCache,
    /// `[vault] token_file`, re-read at every poll and on SIGHUP.
    token_file: Option<PathBuf>,
    /// The token file's reads, one at a time: while one waits on a stalled disk, the next
    /// poll skips the read rather than leaving another thread behind it.
    token_file_reads: crate::blocking::OneAtATime,
    /// One poll at a time (the timer and SIGHUP).
    poll_lock: tokio::sync::Mutex<()>,
    metrics: Arc<KeyMetrics>,
    /// Replace a DEK once this many values were encrypted under it (`keys.dek_max_encryptions`).
    usage_limit: u64,
    /// Encryptions per DEK counted by this process, for providers that keep no shared count.
    local_usage: parking_lot::Mutex<HashMap<(String, u32), u64>>,
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("provider", &self.provider.kind())
            .field("keys", &self.key_names)
            .finish()
    }
}

impl KeyManager {
    /// Build from already-constructed parts. Rejects duplicate columns and key-id collisions.
    pub fn new(
        provider: Arc<dyn KeyProvider>,
        vault: Option<Arc<VaultClient>>,
        columns: &[EncryptColumn],
        policy: CachePolicy,
    ) -> Result<Self, CryptoError> {
        let mut by_column = HashMap::new();
        let mut ids: HashMap<u32, String> = HashMap::new();
        for c in columns {
            let key_id = key_name_id(&c.key);
            if let Some(other) = ids.insert(key_id, c.key.clone()) {
                if other != c.key {
                    return Err(CryptoError::Config(format!(
                        "key names {other:?} and {:?} collide on key id {key_id:#010x}; rename one",
                        c.key
                    )));
                }
            }
            let table = qualify_table(&c.table);
            let spec = ColumnSpec {
                column: c.clone(),
                table: table.clone(),
                key_id,
            };
            let of_table: &mut HashMap<String, ColumnSpec> =
                by_column.entry(table.clone()).or_default();
            if of_table.insert(c.column.clone(), spec).is_some() {
                return Err(CryptoError::Config(format!(
                    "column {table}.{} configured twice",
                    c.column
                )));
            }
        }
        let key_names: BTreeSet<String> = columns
            .iter()
            .filter(|c| c.context_claim.is_none())
            .map(|c| c.key.clone())
            .collect();
        let metrics = vault.as_ref().map(|v| v.metrics()).unwrap_or_default();
        Ok(KeyManager {
            provider,
            vault,
            cache: KeyCache::new(key_names.iter(), metrics.clone()),
            metrics,
            usage_limit: DEFAULT_MAX_ENCRYPTIONS,
            local_usage: parking_lot::Mutex::new(HashMap::new()),
            key_names,
            contexts: parking_lot::RwLock::default(),
            columns: by_column,
            policy,
            token_file: None,
            token_file_reads: crate::blocking::OneAtATime::default(),
            poll_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Replace a DEK once `limit` values were encrypted under it (checked at every poll).
    pub fn with_usage_limit(mut self, limit: u64) -> Self {
        self.usage_limit = limit.max(1);
        self
    }

    /// Key and Vault metrics (rendered into `/metrics`).
    pub fn metrics(&self) -> Arc<KeyMetrics> {
        self.metrics.clone()
    }

    /// Re-read the Vault token from `path` at every poll and on [`KeyManager::reload`].
    pub fn with_token_file(mut self, path: PathBuf) -> Self {
        self.token_file = Some(path);
        self
    }

    /// Build provider and manager from the configuration. `store` holds the wrapped DEKs
    /// (a [`crate::keys::store::PgKeyStore`] on the upstream database; required for transit).
    pub fn from_config(
        config: &CryptoConfig,
        store: Option<Arc<dyn WrappedKeyStore>>,
    ) -> Result<Self, CryptoError> {
        let (provider, vault) = build_provider(&config.keys, config.vault.as_ref(), store)?;
        let manager = Self::new(
            provider,
            vault.clone(),
            &config.encrypt,
            CachePolicy::from(&config.keys),
        )?
        .with_usage_limit(config.keys.dek_max_encryptions);
        let token_file = config
            .vault
            .as_ref()
            .filter(|v| v.approle.is_none() && vault.is_some())
            .and_then(|v| v.token_file.clone());
        Ok(match token_file {
            Some(path) => manager.with_token_file(path),
            None => manager,
        })
    }

    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    pub fn vault(&self) -> Option<&Arc<VaultClient>> {
        self.vault.as_ref()
    }

    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.key_names.iter().map(String::as_str)
    }

    pub fn columns(&self) -> impl Iterator<Item = &ColumnSpec> {
        self.columns.values().flat_map(HashMap::values)
    }

    /// The configuration of `table.column`, if it is encrypted.
    pub fn column(&self, table: &str, column: &str) -> Result<&ColumnSpec, CryptoError> {
        let table = qualified_table(table);
        self.columns
            .get(&*table)
            .and_then(|of_table| of_table.get(column))
            .ok_or_else(|| CryptoError::UnknownColumn {
                table: table.into_owned(),
                column: column.to_owned(),
            })
    }

    /// Encrypt a canonical plaintext for `table.column` under the newest DEK of its key.
    pub async fn encrypt(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.encrypt_row(table, column, scope, None, canonical)
            .await
    }

    /// [`KeyManager::encrypt`], bound to the row whose primary key has the canonical text
    /// `row` when it is given (a row-bound envelope, see [`super::envelope`]).
    pub async fn encrypt_row(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        row: Option<&str>,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let key = self.resolve(spec, scope)?;
        self.seal_with(spec, &key, row, canonical).await
    }

    /// Encrypt under the newest DEK of the resolved key (bound to `row` when given).
    async fn seal_with(
        &self,
        spec: &ColumnSpec,
        key: &ResolvedKey<'_>,
        row: Option<&str>,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let dek = self.current_dek(&key.name).await?;
        let column = spec.column.column.as_str();
        if canonical.len() < self.policy.blocking_threshold {
            return dek.seal_row(&spec.table, column, row, canonical);
        }
        let (table, column, data, row) = (
            spec.table.clone(),
            column.to_string(),
            Zeroizing::new(canonical.to_vec()),
            row.map(str::to_string),
        );
        tokio::task::spawn_blocking(move || dek.seal_row(&table, &column, row.as_deref(), &data))
            .await
            .map_err(|e| CryptoError::Worker(e.to_string()))?
    }

    /// Decrypt a stored value of `table.column` into its canonical plaintext.
    pub async fn decrypt(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.decrypt_row(table, column, scope, None, ciphertext)
            .await
    }

    /// [`KeyManager::decrypt`] of a value read from the row whose primary key has the
    /// canonical text `row` (`None`: not known; a row-bound value then fails
    /// [`CryptoError::RowKeyMissing`]).
    pub async fn decrypt_row(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let result = self
            .decrypt_inner(table, column, scope, row, ciphertext)
            .await;
        self.count_integrity(result)
    }

    /// Count values that failed authentication (`pgward_integrity_failures_total`).
    fn count_integrity(
        &self,
        result: Result<Vec<u8>, CryptoError>,
    ) -> Result<Vec<u8>, CryptoError> {
        if let Err(CryptoError::Integrity { .. } | CryptoError::WrongKey { .. }) = &result {
            self.metrics
                .integrity_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    async fn decrypt_inner(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let key = self.resolve(spec, scope)?;
        self.open_with(spec, &key, row, ciphertext).await
    }

    /// Decrypt a value that must name the resolved key (read from the row `row`, when known).
    async fn open_with(
        &self,
        spec: &ColumnSpec,
        key: &ResolvedKey<'_>,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key_ref = peek_key_ref(ciphertext)?;
        key.expect(spec, key_ref)?;
        let dek = self.dek(&key.name, key_ref.dek_version).await?;
        let column = spec.column.column.as_str();
        if ciphertext.len() < self.policy.blocking_threshold {
            return dek.open_row(&spec.table, column, row, ciphertext);
        }
        let (table, column, data, row) = (
            spec.table.clone(),
            column.to_string(),
            ciphertext.to_vec(),
            row.map(str::to_string),
        );
        tokio::task::spawn_blocking(move || dek.open_row(&table, &column, row.as_deref(), &data))
            .await
            .map_err(|e| CryptoError::Worker(e.to_string()))?
    }

    /// Encrypt without waiting: under the cached current DEK of the column's key, on the
    /// calling thread. Fails closed with [`CryptoError::KeyNotCached`] when no DEK is cached
    /// (the poller and [`KeyManager::prefetch`] keep it current). For SQL literals, which the
    /// rewriter encrypts synchronously.
    pub fn encrypt_now(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.encrypt_now_row(table, column, scope, None, canonical)
    }

    /// [`KeyManager::encrypt_now`], bound to the row whose primary key has the canonical
    /// text `row` when it is given.
    pub fn encrypt_now_row(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        row: Option<&str>,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let key = self.resolve(spec, scope)?;
        self.cache.check(&key.name)?;
        let dek = self
            .cache
            .current(&key.name, self.policy.max_stale)
            .ok_or_else(|| CryptoError::KeyNotCached {
                key: spec.column.key.clone(),
            })?;
        self.count_hit(true);
        dek.seal_row(&spec.table, column, row, canonical)
    }

    /// Decrypt on the calling thread if the DEK is cached (up to `max_stale`) and the value is small;
    /// `None` means "use [`KeyManager::decrypt`]" (which may fetch or offload).
    pub fn try_decrypt_now(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        ciphertext: &[u8],
    ) -> Option<Result<Vec<u8>, CryptoError>> {
        self.try_decrypt_now_row(table, column, scope, None, ciphertext)
    }

    /// [`KeyManager::try_decrypt_now`] of a value read from the row whose primary key has
    /// the canonical text `row`.
    pub fn try_decrypt_now_row(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Option<Result<Vec<u8>, CryptoError>> {
        if ciphertext.len() >= self.policy.blocking_threshold {
            return None;
        }
        let checked = self.column(table, column).and_then(|spec| {
            let key = self.resolve(spec, scope)?;
            let key_ref = peek_key_ref(ciphertext)?;
            key.expect(spec, key_ref)?;
            self.cache.check(&key.name)?;
            Ok((spec, key, key_ref))
        });
        let (spec, key, key_ref) = match checked {
            Ok(found) => found,
            Err(e) => return Some(Err(self.count_integrity_err(e))),
        };
        let dek = self
            .cache
            .dek(&key.name, key_ref.dek_version, self.policy.max_stale)?;
        self.count_hit(true);
        Some(self.count_integrity(dek.open_row(&spec.table, column, row, ciphertext)))
    }

    /// Load every key's current DEK and every searchable column's index key into the
    /// caches, so the synchronous paths work. Errors are returned per key, not fatal.
    pub async fn prefetch(&self) -> Vec<CryptoError> {
        let mut errors = Vec::new();
        for name in &self.key_names {
            if let Err(e) = self.refresh_key(name).await {
                errors.push(e);
            }
        }
        for spec in self
            .columns()
            .filter(|s| s.column.searchable && s.column.context_claim.is_none())
        {
            if let Err(e) = self.index_key(spec, &spec.column.key).await {
                errors.push(e);
            }
        }
        errors
    }

    /// The key identity new writes of this column would carry (for SQL row counting).
    pub async fn current_key_ref(&self, key_name: &str) -> Result<KeyRef, CryptoError> {
        Ok(self.current_dek(key_name).await?.key_ref())
    }

    /// Re-read every key's KEK state; create a new DEK where the KEK was rotated (SIGHUP).
    pub async fn refresh(&self) -> Result<Vec<RefreshOutcome>, CryptoError> {
        let mut out = Vec::new();
        for name in self.polled_key_names() {
            out.push(self.refresh_key(&name).await?);
        }
        Ok(out)
    }

    /// Bring one key name's write DEK up to date with the newest KEK version. Asks Vault
    /// (so it is also the access check of the poller): a refusal blocks the key name, a
    /// success lifts a block. Errors keep their details (for logs and the `keys` commands).
    pub async fn refresh_key(&self, key_name: &str) -> Result<RefreshOutcome, CryptoError> {
        let result = self.refresh_key_from_vault(key_name).await;
        self.metrics.refresh(key_name, result.is_ok());
        match &result {
            Ok(_) => self.cache.unblock(key_name),
            Err(CryptoError::Key(e)) if e.is_refusal() => {
                self.cache.block(key_name, KeyFailure::of(e))
            }
            Err(_) => {}
        }
        result
    }

    async fn refresh_key_from_vault(&self, key_name: &str) -> Result<RefreshOutcome, CryptoError> {
        // Before asking Vault, which would create a shredded transit key afresh.
        if self.provider.destroyed(key_name).await? {
            return Err(KeyError::Destroyed {
                key: key_name.to_string(),
            }
            .into());
        }
        let kek = self.provider.kek_status(key_name).await?;
        let deks = self.provider.list_deks(key_name).await?;
        let (info, created) = match deks.last() {
            Some(latest) if latest.kek_version >= kek.latest_version => {
                let info = latest.clone();
                if self
                    .cache
                    .dek(key_name, info.dek_version, self.policy.ttl)
                    .is_none()
                {
                    self.fetch_into_cache(key_name, info.dek_version).await?;
                }
                self.cache.set_current(key_name, info.dek_version);
                (info, false)
            }
            _ => (self.install_new_dek(key_name).await?, true),
        };
        Ok(RefreshOutcome {
            key_name: key_name.to_string(),
            kek_version: kek.latest_version,
            dek: info,
            created,
        })
    }

    /// Force a new DEK for `key_name` (kv2 rotation, or after a suspected DEK exposure).
    pub async fn rotate_dek(&self, key_name: &str) -> Result<DekInfo, CryptoError> {
        self.install_new_dek(key_name).await
    }

    async fn install_new_dek(&self, key_name: &str) -> Result<DekInfo, CryptoError> {
        let (info, key) = self.provider.create_dek(key_name).await?;
        let dek = Arc::new(Dek::new(
            &key,
            KeyRef {
                key_id: key_name_id(key_name),
                dek_version: info.dek_version,
            },
        ));
        self.cache.insert_dek(key_name, info.dek_version, dek);
        self.cache.set_current(key_name, info.dek_version);
        tracing::info!(
            key = key_name,
            dek_version = info.dek_version,
            kek_version = info.kek_version,
            "new writes use a new data key"
        );
        Ok(info)
    }

    /// Unwrap one DEK version from the provider into the cache (no block check, no backoff).
    async fn fetch_into_cache(&self, key_name: &str, version: u32) -> Result<Arc<Dek>, KeyError> {
        let key = match self.provider.fetch_dek(key_name, version).await {
            Ok(key) => key,
            // Its wrapped form is gone: say so when that was a shred, not a lost row.
            Err(KeyError::UnknownDek { .. }) if self.provider.destroyed(key_name).await? => {
                return Err(KeyError::Destroyed {
                    key: key_name.to_string(),
                })
            }
            Err(e) => return Err(e),
        };
        let dek = Arc::new(Dek::new(
            &key,
            KeyRef {
                key_id: key_name_id(key_name),
                dek_version: version,
            },
        ));
        self.cache.insert_dek(key_name, version, dek.clone());
        Ok(dek)
    }

    fn count_hit(&self, hit: bool) {
        let counter = if hit {
            &self.metrics.cache_hits
        } else {
            &self.metrics.cache_misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Log a data-path key failure with its details, block on a refusal, remember an outage
    /// (so the next callers do not wait again), and return the client-safe error.
    fn key_failed(&self, key_name: &str, slot: Slot, e: KeyError) -> CryptoError {
        let failure = KeyFailure::of(&e);
        tracing::warn!(key = key_name, error = %e, "a data key could not be obtained");
        if e.is_refusal() {
            self.cache.block(key_name, failure);
        } else {
            self.cache.record_failure(key_name, slot, failure);
        }
        CryptoError::KeyUnavailable(failure)
    }

    /// Run `fetch` for an uncached key at most once at a time per key name, and not at all
    /// while a recent fetch of the same slot failed. `cached` is re-checked under the lock.
    async fn single_flight<T, C, F, Fut>(
        &self,
        key_name: &str,
        slot: Slot,
        cached: C,
        fetch: F,
    ) -> Result<T, CryptoError>
    where
        C: Fn() -> Option<T>,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, KeyError>>,
    {
        if let Some(failure) = self.cache.recent_failure(key_name, slot) {
            return Err(CryptoError::KeyUnavailable(failure));
        }
        let lock = self.cache.fetch_lock(key_name);
        let _in_flight = lock.lock().await;
        self.cache.check(key_name)?;
        if let Some(v) = cached() {
            return Ok(v);
        }
        if let Some(failure) = self.cache.recent_failure(key_name, slot) {
            return Err(CryptoError::KeyUnavailable(failure));
        }
        fetch()
            .await
            .map_err(|e| self.key_failed(key_name, slot, e))
    }

    async fn current_dek(&self, key_name: &str) -> Result<Arc<Dek>, CryptoError> {
        self.cache.check(key_name)?;
        let max_stale = self.policy.max_stale;
        if let Some(dek) = self.cache.current(key_name, max_stale) {
            self.count_hit(true);
            return Ok(dek);
        }
        self.count_hit(false);
        let cached = || self.cache.current(key_name, max_stale);
        self.single_flight(key_name, Slot::Current, cached, || async {
            match self.refresh_key_from_vault(key_name).await {
                Ok(_) => self
                    .cache
                    .current(key_name, max_stale)
                    .ok_or_else(|| KeyError::Store(format!("no data key for {key_name}"))),
                // Vault down before this instance ever wrote: keep writing under the newest
                // DEK it has cached (a valid key; rotation is picked up once Vault is back).
                Err(CryptoError::Key(e)) if e.is_unavailable() => {
                    let (version, newest) = self.cache.newest(key_name, max_stale).ok_or(e)?;
                    tracing::warn!(
                        key = key_name,
                        dek_version = version,
                        "Vault unavailable; writing under the newest cached DEK"
                    );
                    self.cache.set_current(key_name, version);
                    Ok(newest)
                }
                Err(CryptoError::Key(e)) => Err(e),
                Err(other) => Err(KeyError::Store(other.to_string())),
            }
        })
        .await
    }

    /// A DEK by version: cached (up to `max_stale`, without asking Vault), else fetched once.
    async fn dek(&self, key_name: &str, dek_version: u32) -> Result<Arc<Dek>, CryptoError> {
        self.cache.check(key_name)?;
        let max_stale = self.policy.max_stale;
        if let Some(dek) = self.cache.dek(key_name, dek_version, max_stale) {
            self.count_hit(true);
            return Ok(dek);
        }
        self.count_hit(false);
        let cached = || self.cache.dek(key_name, dek_version, max_stale);
        self.single_flight(key_name, Slot::Dek(dek_version), cached, || {
            self.fetch_into_cache(key_name, dek_version)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
