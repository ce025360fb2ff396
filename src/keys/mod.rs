//! Key providers: where data keys (DEKs) come from and how they are protected at rest.
//!
//! * [`transit::TransitProvider`] (default): Vault/OpenBao transit is the key-encryption
//!   key (KEK). DEKs are created with `transit/datakey/plaintext`, only the wrapped form
//!   is kept at rest in a [`store::WrappedKeyStore`] (the `pgward.data_keys` table of the
//!   upstream database, see `migrations/0100_pgward_keys.sql`), unwrapped with
//!   `transit/decrypt` on first use and re-wrapped with `transit/rewrap`. The KEK never
//!   leaves Vault.
//! * [`kv2::Kv2Provider`]: each DEK is a version of a Vault KV v2 secret.
//! * [`local::LocalProvider`]: DEKs derived from a master key file; dev and tests only.
//!
//! Why the wrapped DEKs live in the upstream database (not KV v2) for `transit`: they
//! are backed up, restored and replicated together with the rows they protect, a
//! restore of an old backup brings back exactly the DEKs its rows need, and Vault only
//! holds the KEK. Wrapped DEKs are useless without transit access.
pub mod kv2;
pub mod local;
pub mod metrics;
pub mod store;
pub mod transit;
pub mod vault;

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use vault::{VaultClient, VaultError};

/// A 256-bit secret (DEK, index root key, master key). Zeroised on drop, redacted in Debug.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    /// From a slice that must be exactly 32 bytes (e.g. a decoded Vault response).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            KeyError::BadKeyMaterial(format!("expected 32 bytes, got {}", bytes.len()))
        })?;
        Ok(SecretKey(arr))
    }

    /// Fresh random key from the OS CSPRNG.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        SecretKey(k)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Why a key could not be obtained.
#[derive(Debug, Error)]
pub enum KeyError {
    /// Vault is unreachable, sealed or answering 5xx, and the key is not cached.
    #[error(
        "key {key} (DEK version {dek_version}) is not cached and Vault is unavailable: {source}"
    )]
    Unavailable {
        key: String,
        dek_version: u32,
        source: VaultError,
    },
    /// Vault refused (permission denied, revoked token, version below min_decryption_version, ...).
    #[error("Vault refused key {key}: {source}")]
    Vault { key: String, source: VaultError },
    /// The DEK version named by a ciphertext is unknown to the store.
    #[error("no DEK version {dek_version} for key {key}")]
    UnknownDek { key: String, dek_version: u32 },
    /// The wrapped-key store (upstream database) failed.
    #[error("wrapped-key store: {0}")]
    Store(String),
    /// Key material of the wrong size or encoding.
    #[error("bad key material: {0}")]
    BadKeyMaterial(String),
    /// The provider cannot do this (e.g. rewrap for `local`).
    #[error("{0} is not supported by the {1} provider")]
    Unsupported(&'static str, &'static str),
    /// The DEK version was retired (`pgward keys retire`) after every value under it had been
    /// re-encrypted: a value still naming it predates the retirement (restored from a backup).
    #[error("DEK version {dek_version} of key {key} was retired at {since}")]
    Retired {
        key: String,
        dek_version: u32,
        since: String,
    },
    /// The key name was destroyed on purpose (crypto-shredded): its values are gone.
    #[error("key {key} was destroyed (crypto-shredded)")]
    Destroyed { key: String },
    /// Local master key file problems.
    #[error("master key file {path}: {reason}")]
    MasterKey { path: String, reason: String },
}

impl KeyError {
    /// Map a Vault failure for `key` to the typed error the caller sees.
    pub fn from_vault(key: &str, dek_version: u32, e: VaultError) -> Self {
        if e.is_unavailable() {
            KeyError::Unavailable {
                key: key.to_string(),
                dek_version,
                source: e,
            }
        } else {
            KeyError::Vault {
                key: key.to_string(),
                source: e,
            }
        }
    }

    /// True when Vault refused (revoked token, permission denied, sealed): keys under this
    /// name must stop serving, cached or not.
    pub fn is_refusal(&self) -> bool {
        matches!(self, KeyError::Destroyed { .. })
            || matches!(self, KeyError::Vault { source, .. } if source.is_refusal())
    }

    /// True when the failure is Vault being unreachable (cached keys may keep serving).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KeyError::Unavailable { .. })
    }
}

/// What is known about one DEK without unwrapping it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DekInfo {
    pub key_name: String,
    pub dek_version: u32,
    /// KEK version that wraps it (transit), 0 where there is no KEK.
    pub kek_version: u32,
}

/// State of one KEK as seen by the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekStatus {
    pub latest_version: u32,
    pub min_decryption_version: u32,
    pub versions: Vec<u32>,
}

/// The blind-index roots of a key name as the data path uses them.
#[derive(Debug)]
pub struct IndexRoots {
    /// Version of `write` (1 for a key name's first root).
    pub version: u32,
    /// The root new index values are computed with.
    pub write: SecretKey,
    /// While a rotation is in progress: the root it replaces (searches match either).
    pub previous: Option<SecretKey>,
}

/// A boxed, sendable future: keeps the trait object-safe without `async-trait`.
pub type KeyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send + 'a>>;

/// Where DEKs and index root keys come from.
///
/// DEK version 0 is reserved for the key name's blind-index root key, which DEK rotation
/// leaves alone (so equality search survives it); `keys rotate-index` replaces it (see
/// [`KeyProvider::start_index_rotation`]).
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// Short provider name for logs and `keys status`.
    fn kind(&self) -> &'static str;

    /// The KEK state for a key name (transit: the key's version map; others: version 0).
    fn kek_status<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, KekStatus>;

    /// All stored DEKs of a key name, oldest first (excluding the index root).
    fn list_deks<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<DekInfo>>;

    /// Create the next DEK version under the newest KEK version.
    fn create_dek<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, (DekInfo, SecretKey)>;

    /// Obtain (unwrap) one DEK version.
    fn fetch_dek<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, SecretKey>;

    /// The blind-index root key of a key name, created on first use.
    fn index_root<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, SecretKey>;

    /// The root versions of a key name, without unwrapping anything (polled by every proxy).
    fn index_root_state<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, store::IndexRootState> {
        Box::pin(async move { Ok(store::IndexRootState::default()) })
    }

    /// The roots index values are computed and searched with.
    fn index_roots<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, IndexRoots> {
        Box::pin(async move {
            Ok(IndexRoots {
                version: 1,
                write: self.index_root(key_name).await?,
                previous: None,
            })
        })
    }

    /// Create the next blind-index root of `key_name` and make it the rotation in progress;
    /// returns its version and whether this call created it (`false`: one was in progress).
    fn start_index_rotation<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, (u32, bool)> {
        Box::pin(async move {
            Err(KeyError::Unsupported(
                "rotating the index root",
                self.kind(),
            ))
        })
    }

    /// Make the rotation's root the only one (the old root is overwritten); `false` when no
    /// rotation was in progress.
    fn complete_index_rotation<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move {
            Err(KeyError::Unsupported(
                "rotating the index root",
                self.kind(),
            ))
        })
    }

    /// Re-wrap every stored DEK of `key_name` under the newest KEK version; returns how many changed.
    fn rewrap<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, usize>;

    /// Add `delta` values encrypted by this instance under a DEK to the total kept with the
    /// DEK (shared by every instance); returns the total, or `None` when the provider keeps
    /// no shared count (the caller then counts per process).
    fn record_encryptions<'a>(
        &'a self,
        _key_name: &'a str,
        _dek_version: u32,
        _delta: u64,
    ) -> KeyFuture<'a, Option<u64>> {
        Box::pin(async move { Ok(None) })
    }

    /// The key name was destroyed on purpose (see [`KeyProvider::destroy`]).
    fn destroyed<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move { Ok(false) })
    }

    /// Destroy the KEK of `key_name` where backups cannot bring it back (transit: delete the
    /// transit key), so every wrapped DEK of the name, in any copy of the database, is useless.
    fn destroy<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, ()> {
        Box::pin(async move { Err(KeyError::Unsupported("destroying a key", self.kind())) })
    }
}
