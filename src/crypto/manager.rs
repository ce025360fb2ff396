//! `KeyManager`: per-column encryption, decryption and blind indexes over a key provider,
//! with DEK caching, rotation detection and a Vault-outage grace period.
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use zeroize::Zeroizing;

use super::blind::{IndexKey, BIDX_LEN};
use super::config::{
    qualify_table, CryptoConfig, EncryptColumn, KeysConfig, ProviderKind, VaultConfig,
};
use super::envelope::{key_name_id, peek_key_ref, Dek, KeyRef};
use super::error::CryptoError;
use crate::keys::kv2::Kv2Provider;
use crate::keys::local::LocalProvider;
use crate::keys::store::WrappedKeyStore;
use crate::keys::transit::TransitProvider;
use crate::keys::vault::{VaultAuth, VaultClient, VaultClientConfig};
use crate::keys::{DekInfo, KeyError, KeyProvider};

/// One configured column with its derived key id.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub column: EncryptColumn,
    /// `schema.table` as used for the AAD binding.
    pub table: String,
    pub key_id: u32,
}

/// Cache of values by key, each with the time it was fetched.
type TtlMap<K, V> = RwLock<HashMap<K, Cached<V>>>;

/// A provider and the Vault client behind it (none for `local`).
pub type ProviderParts = (Arc<dyn KeyProvider>, Option<Arc<VaultClient>>);

struct Cached<V> {
    value: V,
    fetched: Instant,
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

pub struct KeyManager {
    provider: Arc<dyn KeyProvider>,
    vault: Option<Arc<VaultClient>>,
    columns: HashMap<(String, String), ColumnSpec>,
    key_names: BTreeSet<String>,
    policy: CachePolicy,
    /// Newest DEK per key name: what new writes use.
    current: RwLock<HashMap<String, Arc<Dek>>>,
    /// Every DEK seen, by (key name, DEK version).
    deks: TtlMap<(String, u32), Arc<Dek>>,
    /// Per-column blind-index keys, by (table, column).
    index_keys: TtlMap<(String, String), Arc<IndexKey>>,
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
            if by_column
                .insert((table.clone(), c.column.clone()), spec)
                .is_some()
            {
                return Err(CryptoError::Config(format!(
                    "column {table}.{} configured twice",
                    c.column
                )));
            }
        }
        Ok(KeyManager {
            provider,
            vault,
            key_names: columns.iter().map(|c| c.key.clone()).collect(),
            columns: by_column,
            policy,
            current: RwLock::new(HashMap::new()),
            deks: RwLock::new(HashMap::new()),
            index_keys: RwLock::new(HashMap::new()),
        })
    }

    /// Build provider and manager from the configuration. `store` holds the wrapped DEKs
    /// (a [`crate::keys::store::PgKeyStore`] on the upstream database; required for transit).
    pub fn from_config(
        config: &CryptoConfig,
        store: Option<Arc<dyn WrappedKeyStore>>,
    ) -> Result<Self, CryptoError> {
        let (provider, vault) = build_provider(&config.keys, config.vault.as_ref(), store)?;
        Self::new(
            provider,
            vault,
            &config.encrypt,
            CachePolicy::from(&config.keys),
        )
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
        self.columns.values()
    }

    /// The configuration of `table.column`, if it is encrypted.
    pub fn column(&self, table: &str, column: &str) -> Result<&ColumnSpec, CryptoError> {
        let table = qualify_table(table);
        self.columns
            .get(&(table.clone(), column.to_string()))
            .ok_or_else(|| CryptoError::UnknownColumn {
                table,
                column: column.to_string(),
            })
    }

    /// Encrypt a canonical plaintext for `table.column` under the newest DEK of its key.
    pub async fn encrypt(
        &self,
        table: &str,
        column: &str,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let dek = self.current_dek(&spec.column.key).await?;
        if canonical.len() < self.policy.blocking_threshold {
            return dek.seal(&spec.table, column, canonical);
        }
        let (table, column, data) = (
            spec.table.clone(),
            column.to_string(),
            Zeroizing::new(canonical.to_vec()),
        );
        tokio::task::spawn_blocking(move || dek.seal(&table, &column, &data))
            .await
            .map_err(|e| CryptoError::Worker(e.to_string()))?
    }

    /// Decrypt a stored value of `table.column` into its canonical plaintext.
    pub async fn decrypt(
        &self,
        table: &str,
        column: &str,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let key_ref = peek_key_ref(ciphertext)?;
        if key_ref.key_id != spec.key_id {
            return Err(CryptoError::WrongKey {
                table: spec.table.clone(),
                column: column.to_string(),
                found: key_ref.key_id,
                expected: spec.key_id,
            });
        }
        let dek = self.dek(&spec.column.key, key_ref.dek_version).await?;
        if ciphertext.len() < self.policy.blocking_threshold {
            return dek.open(&spec.table, column, ciphertext);
        }
        let (table, column, data) = (spec.table.clone(), column.to_string(), ciphertext.to_vec());
        tokio::task::spawn_blocking(move || dek.open(&table, &column, &data))
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
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let spec = self.column(table, column)?;
        let dek = self
            .current
            .read()
            .get(&spec.column.key)
            .cloned()
            .ok_or_else(|| CryptoError::KeyNotCached {
                key: spec.column.key.clone(),
            })?;
        dek.seal(&spec.table, column, canonical)
    }

    /// Decrypt on the calling thread if the DEK is cached and fresh and the value is small;
    /// `None` means "use [`KeyManager::decrypt`]" (which may fetch or offload).
    pub fn try_decrypt_now(
        &self,
        table: &str,
        column: &str,
        ciphertext: &[u8],
    ) -> Option<Result<Vec<u8>, CryptoError>> {
        if ciphertext.len() >= self.policy.blocking_threshold {
            return None;
        }
        let spec = match self.column(table, column) {
            Ok(spec) => spec,
            Err(e) => return Some(Err(e)),
        };
        let key_ref = match peek_key_ref(ciphertext) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if key_ref.key_id != spec.key_id {
            return Some(Err(CryptoError::WrongKey {
                table: spec.table.clone(),
                column: column.to_string(),
                found: key_ref.key_id,
                expected: spec.key_id,
            }));
        }
        let dek = {
            let deks = self.deks.read();
            let cached = deks.get(&(spec.column.key.clone(), key_ref.dek_version))?;
            if cached.fetched.elapsed() >= self.policy.ttl {
                return None;
            }
            cached.value.clone()
        };
        Some(dek.open(&spec.table, column, ciphertext))
    }

    /// The spec of a column that has a blind index (else `NotSearchable`).
    fn searchable_column(&self, table: &str, column: &str) -> Result<&ColumnSpec, CryptoError> {
        let spec = self.column(table, column)?;
        if !spec.column.searchable {
            return Err(CryptoError::NotSearchable {
                table: spec.table.clone(),
                column: column.to_string(),
            });
        }
        Ok(spec)
    }

    /// Blind index without waiting, from the cached index key (served up to `max_stale`
    /// old; the poller refreshes it). Fails closed with [`CryptoError::KeyNotCached`].
    pub fn blind_index_now(
        &self,
        table: &str,
        column: &str,
        canonical: &[u8],
    ) -> Result<[u8; BIDX_LEN], CryptoError> {
        let spec = self.searchable_column(table, column)?;
        let key = self
            .index_keys
            .read()
            .get(&(spec.table.clone(), spec.column.column.clone()))
            .filter(|c| c.fetched.elapsed() < self.policy.max_stale)
            .map(|c| c.value.clone())
            .ok_or_else(|| CryptoError::KeyNotCached {
                key: spec.column.key.clone(),
            })?;
        Ok(key.compute(spec.column.ty, canonical)?)
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
        errors.extend(self.refresh_index_keys().await);
        errors
    }

    /// Re-fetch index keys older than the TTL (a no-op for fresh ones).
    async fn refresh_index_keys(&self) -> Vec<CryptoError> {
        let mut errors = Vec::new();
        for spec in self.columns.values().filter(|s| s.column.searchable) {
            if let Err(e) = self.index_key(spec).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Blind index (16 bytes) of a canonical plaintext for a searchable column.
    pub async fn blind_index(
        &self,
        table: &str,
        column: &str,
        canonical: &[u8],
    ) -> Result<[u8; BIDX_LEN], CryptoError> {
        let spec = self.searchable_column(table, column)?;
        let key = self.index_key(spec).await?;
        Ok(key.compute(spec.column.ty, canonical)?)
    }

    /// The key identity new writes of this column would carry (for SQL row counting).
    pub async fn current_key_ref(&self, key_name: &str) -> Result<KeyRef, CryptoError> {
        Ok(self.current_dek(key_name).await?.key_ref())
    }

    /// Re-read every key's KEK state; create a new DEK where the KEK was rotated (SIGHUP).
    pub async fn refresh(&self) -> Result<Vec<RefreshOutcome>, CryptoError> {
        let mut out = Vec::new();
        for name in &self.key_names {
            out.push(self.refresh_key(name).await?);
        }
        Ok(out)
    }

    /// Bring one key name's write DEK up to date with the newest KEK version.
    pub async fn refresh_key(&self, key_name: &str) -> Result<RefreshOutcome, CryptoError> {
        let kek = self.provider.kek_status(key_name).await?;
        let deks = self.provider.list_deks(key_name).await?;
        let (info, created) = match deks.last() {
            Some(latest) if latest.kek_version >= kek.latest_version => {
                let info = latest.clone();
                let dek = self.dek(key_name, info.dek_version).await?;
                self.current.write().insert(key_name.to_string(), dek);
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
        self.deks.write().insert(
            (key_name.to_string(), info.dek_version),
            Cached {
                value: dek.clone(),
                fetched: Instant::now(),
            },
        );
        self.current.write().insert(key_name.to_string(), dek);
        tracing::info!(
            key = key_name,
            dek_version = info.dek_version,
            kek_version = info.kek_version,
            "new writes use a new data key"
        );
        Ok(info)
    }

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

    /// One poll: token maintenance, then rotation detection. Failures are logged, not fatal.
    pub async fn poll_once(&self) {
        if let Some(vault) = &self.vault {
            if let Err(e) = vault.maintain_token().await {
                tracing::warn!(error = %e, "Vault token maintenance failed");
            }
        }
        for name in &self.key_names {
            match self.refresh_key(name).await {
                Ok(o) if o.created => tracing::info!(
                    key = name,
                    kek_version = o.kek_version,
                    "KEK rotation picked up"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(key = name, error = %e, "key refresh failed; cached keys keep serving")
                }
            }
        }
        for e in self.refresh_index_keys().await {
            tracing::warn!(error = %e, "index key refresh failed; cached keys keep serving");
        }
    }

    async fn current_dek(&self, key_name: &str) -> Result<Arc<Dek>, CryptoError> {
        if let Some(dek) = self.current.read().get(key_name) {
            return Ok(dek.clone());
        }
        match self.refresh_key(key_name).await {
            Ok(_) => {}
            // Vault down before this instance ever wrote: keep writing under the newest DEK
            // it has cached (a valid key; rotation is picked up once Vault is back).
            Err(CryptoError::Key(e)) if e.is_unavailable() => {
                let newest = self.newest_cached(key_name).ok_or(CryptoError::Key(e))?;
                tracing::warn!(
                    key = key_name,
                    dek_version = newest.key_ref().dek_version,
                    "Vault unavailable; writing under the newest cached DEK"
                );
                self.current.write().insert(key_name.to_string(), newest);
            }
            Err(e) => return Err(e),
        }
        self.current
            .read()
            .get(key_name)
            .cloned()
            .ok_or_else(|| CryptoError::Config(format!("no data key for {key_name}")))
    }

    fn newest_cached(&self, key_name: &str) -> Option<Arc<Dek>> {
        let deks = self.deks.read();
        deks.iter()
            .filter(|((k, _), _)| k == key_name)
            .max_by_key(|((_, v), _)| *v)
            .map(|(_, c)| c.value.clone())
    }

    /// A DEK by version: fresh from cache, else fetched; a stale one serves while Vault is down.
    async fn dek(&self, key_name: &str, dek_version: u32) -> Result<Arc<Dek>, CryptoError> {
        let cache_key = (key_name.to_string(), dek_version);
        let cached = self
            .deks
            .read()
            .get(&cache_key)
            .map(|c| (c.value.clone(), c.fetched.elapsed()));
        if let Some((dek, age)) = &cached {
            if *age < self.policy.ttl {
                return Ok(dek.clone());
            }
        }
        match self.provider.fetch_dek(key_name, dek_version).await {
            Ok(key) => {
                let dek = Arc::new(Dek::new(
                    &key,
                    KeyRef {
                        key_id: key_name_id(key_name),
                        dek_version,
                    },
                ));
                self.deks.write().insert(
                    cache_key,
                    Cached {
                        value: dek.clone(),
                        fetched: Instant::now(),
                    },
                );
                Ok(dek)
            }
            Err(e) => self.stale_or_evict(cached, e, || {
                self.deks
                    .write()
                    .remove(&(key_name.to_string(), dek_version));
            }),
        }
    }

    /// Serve a stale cached value if the failure is "Vault unreachable" and it is young
    /// enough; otherwise evict it (so revoking access takes effect after the TTL).
    fn stale_or_evict<V>(
        &self,
        cached: Option<(V, Duration)>,
        e: KeyError,
        evict: impl FnOnce(),
    ) -> Result<V, CryptoError> {
        match cached {
            Some((v, age)) if e.is_unavailable() && age < self.policy.max_stale => {
                tracing::warn!(error = %e, age_secs = age.as_secs(), "Vault unavailable; serving cached key past its TTL");
                Ok(v)
            }
            Some(_) => {
                evict();
                Err(e.into())
            }
            None => Err(e.into()),
        }
    }

    async fn index_key(&self, spec: &ColumnSpec) -> Result<Arc<IndexKey>, CryptoError> {
        let cache_key = (spec.table.clone(), spec.column.column.clone());
        let cached = self
            .index_keys
            .read()
            .get(&cache_key)
            .map(|c| (c.value.clone(), c.fetched.elapsed()));
        if let Some((k, age)) = &cached {
            if *age < self.policy.ttl {
                return Ok(k.clone());
            }
        }
        match self.provider.index_root(&spec.column.key).await {
            Ok(root) => {
                let key = Arc::new(IndexKey::derive(
                    &root,
                    &spec.column.key,
                    &spec.table,
                    &spec.column.column,
                ));
                self.index_keys.write().insert(
                    cache_key,
                    Cached {
                        value: key.clone(),
                        fetched: Instant::now(),
                    },
                );
                Ok(key)
            }
            Err(e) => self.stale_or_evict(cached, e, || {
                self.index_keys.write().remove(&cache_key);
            }),
        }
    }
}

/// Construct the configured provider (and the Vault client it uses).
pub fn build_provider(
    keys: &KeysConfig,
    vault: Option<&VaultConfig>,
    store: Option<Arc<dyn WrappedKeyStore>>,
) -> Result<ProviderParts, CryptoError> {
    let vault_section = || {
        vault.ok_or_else(|| {
            CryptoError::Config("the transit and kv2 providers need a [vault] section".into())
        })
    };
    match keys.provider {
        ProviderKind::Local => {
            let path = keys.local_master_key_file.as_deref().ok_or_else(|| {
                CryptoError::Config("provider = \"local\" needs local_master_key_file".into())
            })?;
            Ok((Arc::new(LocalProvider::from_file(path)?), None))
        }
        ProviderKind::Transit => {
            let cfg = vault_section()?;
            let store = store.ok_or_else(|| {
                CryptoError::Config(
                    "the transit provider needs the wrapped-key store (upstream database)".into(),
                )
            })?;
            let client = Arc::new(vault_client(cfg)?);
            let provider = TransitProvider::new(
                client.clone(),
                cfg.transit_mount.clone(),
                store,
                keys.auto_create_transit_keys,
            );
            Ok((Arc::new(provider), Some(client)))
        }
        ProviderKind::Kv2 => {
            let cfg = vault_section()?;
            let client = Arc::new(vault_client(cfg)?);
            let provider =
                Kv2Provider::new(client.clone(), cfg.kv_mount.clone(), cfg.kv_prefix.clone());
            Ok((Arc::new(provider), Some(client)))
        }
    }
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, CryptoError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CryptoError::Config(format!("reading {}: {e}", path.display())))?,
    );
    Ok(Zeroizing::new(text.trim().to_string()))
}

/// Build the Vault client from `[vault]` (reads token / AppRole files now).
pub fn vault_client(cfg: &VaultConfig) -> Result<VaultClient, CryptoError> {
    let auth = match (&cfg.approle, &cfg.token_file) {
        (Some(ar), _) => VaultAuth::AppRole {
            mount: ar.mount.clone(),
            role_id: read_secret_file(&ar.role_id_file)?.to_string(),
            secret_id: read_secret_file(&ar.secret_id_file)?,
        },
        (None, Some(file)) => VaultAuth::Token(read_secret_file(file)?),
        (None, None) => VaultAuth::Token(Zeroizing::new(std::env::var(&cfg.token_env).map_err(
            |_| {
                CryptoError::Config(format!(
                    "no Vault token: set {} or vault.token_file",
                    cfg.token_env
                ))
            },
        )?)),
    };
    VaultClient::new(VaultClientConfig {
        address: cfg.address.clone(),
        auth,
        ca_file: cfg.ca_file.clone(),
        request_timeout: cfg.request_timeout,
    })
    .map_err(|e| CryptoError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::codec::ClientType;
    use crate::keys::SecretKey;

    fn manager() -> KeyManager {
        let cols = vec![
            EncryptColumn {
                table: "users".into(),
                column: "email".into(),
                key: "pii".into(),
                ty: ClientType::Text,
                searchable: true,
            },
            EncryptColumn {
                table: "public.users".into(),
                column: "ssn".into(),
                key: "pii".into(),
                ty: ClientType::Text,
                searchable: false,
            },
            EncryptColumn {
                table: "orders".into(),
                column: "card".into(),
                key: "pci".into(),
                ty: ClientType::Text,
                searchable: false,
            },
        ];
        let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([9; 32])));
        KeyManager::new(
            provider,
            None,
            &cols,
            CachePolicy {
                ttl: Duration::from_secs(60),
                max_stale: Duration::from_secs(60),
                blocking_threshold: 64 * 1024,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn round_trip_binding_and_index() {
        let m = manager();
        let ct = m.encrypt("users", "email", b"a@b.c").await.unwrap();
        assert_eq!(
            m.decrypt("public.users", "email", &ct).await.unwrap(),
            b"a@b.c"
        );
        assert!(matches!(
            m.decrypt("users", "ssn", &ct).await,
            Err(CryptoError::Integrity { .. })
        ));
        assert!(matches!(
            m.decrypt("orders", "card", &ct).await,
            Err(CryptoError::WrongKey { .. })
        ));
        assert!(matches!(
            m.decrypt("orders", "nope", &ct).await,
            Err(CryptoError::UnknownColumn { .. })
        ));
        let a = m.blind_index("users", "email", b"a@b.c").await.unwrap();
        assert_eq!(a, m.blind_index("users", "email", b"a@b.c").await.unwrap());
        assert!(matches!(
            m.blind_index("users", "ssn", b"x").await,
            Err(CryptoError::NotSearchable { .. })
        ));
    }

    #[tokio::test]
    async fn large_values_go_through_the_blocking_pool() {
        let m = manager();
        let big = vec![0x5a; 200 * 1024];
        let ct = m.encrypt("users", "email", &big).await.unwrap();
        assert_eq!(m.decrypt("users", "email", &ct).await.unwrap(), big);
    }

    #[test]
    fn rejects_duplicate_columns() {
        let c = EncryptColumn {
            table: "t".into(),
            column: "c".into(),
            key: "k".into(),
            ty: ClientType::Int4,
            searchable: false,
        };
        let p = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([1; 32])));
        let policy = CachePolicy {
            ttl: Duration::from_secs(1),
            max_stale: Duration::from_secs(1),
            blocking_threshold: 1,
        };
        assert!(KeyManager::new(
            p,
            None,
            &[
                c.clone(),
                EncryptColumn {
                    table: "public.t".into(),
                    ..c
                }
            ],
            policy
        )
        .is_err());
    }
}
