//! The key manager's in-memory state: cached data keys and index keys with their age, the
//! current write key per key name, which key names are blocked (Vault refused pgward or is
//! sealed), recent failed fetches, and one fetch lock per key name.
//!
//! Why blocking is separate from eviction: a refusal must stop reads *and* writes under the
//! key at once, including the synchronous paths (SQL literals, small values) that never ask
//! Vault; a block is one map lookup there. Only a later successful Vault call lifts it.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::blind::IndexKey;
use super::envelope::Dek;
use super::error::{CryptoError, KeyFailure};
use crate::keys::metrics::KeyMetrics;

/// A failed fetch of an uncached key is not retried on the data path for this long: while
/// Vault hangs, one statement waits one request timeout, the ones after it fail at once.
pub const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(2);

/// What a fetch is for: one DEK version, or the key name's blind-index root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Slot {
    Dek(u32),
    IndexRoot,
    /// Finding the write DEK (KEK state, DEK list, unwrap).
    Current,
}

pub(crate) struct Cached<V> {
    pub value: V,
    pub fetched: Instant,
}

/// A column's index keys: the one new index values are computed with and, while a
/// rotation of the key name's index root is in progress, the one it replaces.
pub(crate) struct IndexKeys {
    /// Root version `write` was derived from.
    pub version: u32,
    pub write: IndexKey,
    pub previous: Option<IndexKey>,
}

/// A column's derived index keys and the key name they came from (for eviction by key name).
pub(crate) struct CachedIndex {
    pub key_name: String,
    pub keys: Arc<IndexKeys>,
}

/// Cached DEKs by (key name, DEK version).
/// DEKs by key name, then version: looked up for every value opened, by the borrowed name.
type DekMap = HashMap<String, HashMap<u32, Cached<Arc<Dek>>>>;

pub(crate) struct KeyCache {
    /// DEK version new writes use, per key name.
    current: RwLock<HashMap<String, u32>>,
    deks: RwLock<DekMap>,
    /// Per-column blind-index keys, by (table, column, key name): a per-context column has
    /// one per context.
    index_keys: RwLock<HashMap<(String, String, String), Cached<CachedIndex>>>,
    blocked: RwLock<HashMap<String, KeyFailure>>,
    /// `blocked.len()`, read without the lock: the hot path's check is one atomic load
    /// while nothing is blocked.
    blocked_count: std::sync::atomic::AtomicUsize,
    failures: Mutex<HashMap<(String, Slot), (Instant, KeyFailure)>>,
    /// Per key name; per-context names (see [`super::scope`]) are added on first use.
    fetch_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<KeyMetrics>,
}

impl KeyCache {
    pub fn new<'a>(key_names: impl Iterator<Item = &'a String>, metrics: Arc<KeyMetrics>) -> Self {
        KeyCache {
            current: RwLock::new(HashMap::new()),
            deks: RwLock::new(HashMap::new()),
            index_keys: RwLock::new(HashMap::new()),
            blocked: RwLock::new(HashMap::new()),
            blocked_count: std::sync::atomic::AtomicUsize::new(0),
            failures: Mutex::new(HashMap::new()),
            fetch_locks: Mutex::new(
                key_names
                    .map(|k| (k.clone(), Arc::new(tokio::sync::Mutex::new(()))))
                    .collect(),
            ),
            metrics,
        }
    }

    /// Fails when Vault refused this key name (or is sealed) and has not granted it since.
    pub fn check(&self, key_name: &str) -> Result<(), CryptoError> {
        if self
            .blocked_count
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
        {
            return Ok(());
        }
        match self.blocked.read().get(key_name) {
            Some(reason) => Err(CryptoError::KeyUnavailable(*reason)),
            None => Ok(()),
        }
    }

    /// Stop serving `key_name` and forget its plaintext keys.
    pub fn block(&self, key_name: &str, reason: KeyFailure) {
        let newly = {
            let mut blocked = self.blocked.write();
            let newly = blocked.insert(key_name.to_string(), reason).is_none();
            self.blocked_count
                .store(blocked.len(), std::sync::atomic::Ordering::Release);
            newly
        };
        self.current.write().remove(key_name);
        self.deks.write().remove(key_name);
        self.index_keys
            .write()
            .retain(|_, c| c.value.key_name != key_name);
        if newly {
            self.metrics
                .blocked_keys
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(key = key_name, reason = %reason, "key service refused: reads and writes under this key stop until it grants access again");
        }
    }

    pub fn unblock(&self, key_name: &str) {
        let removed = {
            let mut blocked = self.blocked.write();
            let removed = blocked.remove(key_name).is_some();
            self.blocked_count
                .store(blocked.len(), std::sync::atomic::Ordering::Release);
            removed
        };
        if removed {
            self.metrics
                .blocked_keys
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(key = key_name, "key service grants access again");
        }
    }

    /// A cached DEK younger than `max_age`.
    pub fn dek(&self, key_name: &str, version: u32, max_age: Duration) -> Option<Arc<Dek>> {
        self.deks
            .read()
            .get(key_name)?
            .get(&version)
            .filter(|c| c.fetched.elapsed() < max_age)
            .map(|c| c.value.clone())
    }

    pub fn insert_dek(&self, key_name: &str, version: u32, dek: Arc<Dek>) {
        self.deks
            .write()
            .entry(key_name.to_owned())
            .or_default()
            .insert(
                version,
                Cached {
                    value: dek,
                    fetched: Instant::now(),
                },
            );
        self.failures
            .lock()
            .remove(&(key_name.to_string(), Slot::Dek(version)));
    }

    /// Every cached DEK of `key_name`, whatever its age.
    pub fn deks_of(&self, key_name: &str) -> Vec<(u32, Arc<Dek>)> {
        self.deks
            .read()
            .get(key_name)
            .map_or_else(Vec::new, |versions| {
                versions
                    .iter()
                    .map(|(v, c)| (*v, c.value.clone()))
                    .collect()
            })
    }

    /// The DEK version new writes of `key_name` use, if known.
    pub fn current_version(&self, key_name: &str) -> Option<u32> {
        self.current.read().get(key_name).copied()
    }

    pub fn evict_dek(&self, key_name: &str, version: u32) {
        let mut deks = self.deks.write();
        if let Some(versions) = deks.get_mut(key_name) {
            versions.remove(&version);
            if versions.is_empty() {
                deks.remove(key_name);
            }
        }
    }

    /// Cached DEK versions of `key_name` fetched at least `ttl` ago (to revalidate).
    pub fn aged_deks(&self, key_name: &str, ttl: Duration) -> Vec<u32> {
        self.deks
            .read()
            .get(key_name)
            .map_or_else(Vec::new, |versions| {
                versions
                    .iter()
                    .filter(|(_, c)| c.fetched.elapsed() >= ttl)
                    .map(|(v, _)| *v)
                    .collect()
            })
    }

    pub fn set_current(&self, key_name: &str, version: u32) {
        self.current.write().insert(key_name.to_string(), version);
    }

    /// The write DEK of `key_name`, if cached and younger than `max_age`.
    pub fn current(&self, key_name: &str, max_age: Duration) -> Option<Arc<Dek>> {
        let version = *self.current.read().get(key_name)?;
        self.dek(key_name, version, max_age)
    }

    /// The newest cached DEK version of `key_name` younger than `max_age`.
    pub fn newest(&self, key_name: &str, max_age: Duration) -> Option<(u32, Arc<Dek>)> {
        self.deks
            .read()
            .get(key_name)?
            .iter()
            .filter(|(_, c)| c.fetched.elapsed() < max_age)
            .max_by_key(|(v, _)| **v)
            .map(|(v, c)| (*v, c.value.clone()))
    }

    pub fn index_key(
        &self,
        key_name: &str,
        table: &str,
        column: &str,
        max_age: Duration,
    ) -> Option<Arc<IndexKeys>> {
        self.index_keys
            .read()
            .get(&(table.to_string(), column.to_string(), key_name.to_string()))
            .filter(|c| c.fetched.elapsed() < max_age)
            .map(|c| c.value.keys.clone())
    }

    /// The root version and rotation state (a previous root held) the cached index keys of
    /// `key_name` were derived with, if any are cached and some differ from `wanted`.
    pub fn index_roots_differ(&self, key_name: &str, wanted: (u32, bool)) -> bool {
        self.index_keys
            .read()
            .values()
            .filter(|c| c.value.key_name == key_name)
            .any(|c| (c.value.keys.version, c.value.keys.previous.is_some()) != wanted)
    }

    pub fn insert_index_key(&self, key_name: &str, table: &str, column: &str, key: Arc<IndexKeys>) {
        self.index_keys.write().insert(
            (table.to_string(), column.to_string(), key_name.to_string()),
            Cached {
                value: CachedIndex {
                    key_name: key_name.to_string(),
                    keys: key,
                },
                fetched: Instant::now(),
            },
        );
        self.failures
            .lock()
            .remove(&(key_name.to_string(), Slot::IndexRoot));
    }

    /// Forget the index keys of `key_name` (its roots changed and the new ones cannot be had).
    pub fn evict_index_keys(&self, key_name: &str) {
        self.index_keys
            .write()
            .retain(|_, c| c.value.key_name != key_name);
    }

    /// A fetch of this slot failed less than [`FAILED_FETCH_BACKOFF`] ago.
    pub fn recent_failure(&self, key_name: &str, slot: Slot) -> Option<KeyFailure> {
        self.failures
            .lock()
            .get(&(key_name.to_string(), slot))
            .filter(|(at, _)| at.elapsed() < FAILED_FETCH_BACKOFF)
            .map(|(_, f)| *f)
    }

    pub fn record_failure(&self, key_name: &str, slot: Slot, failure: KeyFailure) {
        self.failures
            .lock()
            .insert((key_name.to_string(), slot), (Instant::now(), failure));
    }

    /// The lock that keeps data-path fetches of `key_name` to one at a time.
    pub fn fetch_lock(&self, key_name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.fetch_locks
            .lock()
            .entry(key_name.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::envelope::KeyRef;
    use crate::keys::SecretKey;

    fn dek(version: u32) -> Arc<Dek> {
        Arc::new(Dek::new(
            &SecretKey::from_bytes([7; 32]),
            KeyRef {
                key_id: 1,
                dek_version: version,
            },
        ))
    }

    #[test]
    fn a_block_evicts_and_fails_until_lifted() {
        let names = ["k".to_string(), "other".to_string()];
        let cache = KeyCache::new(names.iter(), Arc::default());
        cache.insert_dek("k", 1, dek(1));
        cache.set_current("k", 1);
        cache.insert_dek("other", 1, dek(1));
        let hour = Duration::from_secs(3600);
        assert!(cache.current("k", hour).is_some());
        cache.block("k", KeyFailure::Refused);
        assert!(matches!(
            cache.check("k"),
            Err(CryptoError::KeyUnavailable(KeyFailure::Refused))
        ));
        assert!(cache.current("k", hour).is_none() && cache.dek("k", 1, hour).is_none());
        assert!(cache.check("other").is_ok() && cache.dek("other", 1, hour).is_some());
        cache.unblock("k");
        assert!(cache.check("k").is_ok());
    }

    #[test]
    fn failures_expire_and_a_success_clears_them() {
        let names = ["k".to_string()];
        let cache = KeyCache::new(names.iter(), Arc::default());
        cache.record_failure("k", Slot::Dek(2), KeyFailure::Unreachable);
        assert_eq!(
            cache.recent_failure("k", Slot::Dek(2)),
            Some(KeyFailure::Unreachable)
        );
        assert_eq!(cache.recent_failure("k", Slot::Dek(3)), None);
        cache.insert_dek("k", 2, dek(2));
        assert_eq!(cache.recent_failure("k", Slot::Dek(2)), None);
        assert!(
            cache.dek("k", 2, Duration::ZERO).is_none(),
            "max age applies"
        );
    }
}
