//! Blind indexes: the per-column index keys derived from a key name's index root, and the
//! rotation of that root (`keys rotate-index`). While a rotation is in progress a column
//! has two index keys: new index values are computed with the new root, equality searches
//! match the value under either root.
use std::sync::Arc;

use super::{ColumnSpec, KeyManager};
use crate::crypto::blind::{IndexKey, BIDX_LEN};
use crate::crypto::error::CryptoError;
use crate::crypto::keycache::{IndexKeys, Slot};
use crate::crypto::scope::KeyScope;
use crate::keys::{IndexRoots, KeyError};

/// The index values an equality search matches: under the root writes use and, while a
/// rotation is in progress, under the root it replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchIndexes {
    pub write: [u8; BIDX_LEN],
    pub previous: Option<[u8; BIDX_LEN]>,
}

impl SearchIndexes {
    /// Every distinct value a search must match (one, or two during a rotation).
    pub fn values(&self) -> Vec<[u8; BIDX_LEN]> {
        let mut out = vec![self.write];
        out.extend(self.previous.filter(|p| *p != self.write));
        out
    }

    /// The value under the replaced root, or under the only root when none is replaced.
    pub fn previous_or_write(&self) -> [u8; BIDX_LEN] {
        self.previous.unwrap_or(self.write)
    }
}

impl KeyManager {
    /// The spec of a column that has a blind index (else `NotSearchable`).
    pub(super) fn searchable_column(
        &self,
        table: &str,
        column: &str,
    ) -> Result<&ColumnSpec, CryptoError> {
        let spec = self.column(table, column)?;
        if !spec.column.searchable {
            return Err(CryptoError::NotSearchable {
                table: spec.table.clone(),
                column: column.to_string(),
            });
        }
        Ok(spec)
    }

    /// The cached index keys of a searchable column without waiting (served up to
    /// `max_stale` old; the poller refreshes them). Fails closed with
    /// [`CryptoError::KeyNotCached`].
    fn cached_index_keys(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
    ) -> Result<(&ColumnSpec, Arc<IndexKeys>), CryptoError> {
        let spec = self.searchable_column(table, column)?;
        let name = self.resolve(spec, scope)?.name;
        self.cache.check(&name)?;
        let keys = self
            .cache
            .index_key(
                &name,
                &spec.table,
                &spec.column.column,
                self.policy.max_stale,
            )
            .ok_or_else(|| CryptoError::KeyNotCached {
                key: spec.column.key.clone(),
            })?;
        Ok((spec, keys))
    }

    /// Blind index of a value written now, from the cached index key (see
    /// [`KeyManager::search_indexes_now`] for searches).
    pub fn blind_index_now(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<[u8; BIDX_LEN], CryptoError> {
        let (spec, keys) = self.cached_index_keys(table, column, scope)?;
        Ok(keys.write.compute(spec.column.ty, canonical)?)
    }

    /// The index values an equality search for a value matches, from the cached index keys.
    pub fn search_indexes_now(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<SearchIndexes, CryptoError> {
        let (spec, keys) = self.cached_index_keys(table, column, scope)?;
        search_indexes(&keys, spec, canonical)
    }

    /// Blind index (16 bytes) of a canonical plaintext written now to a searchable column.
    pub async fn blind_index(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<[u8; BIDX_LEN], CryptoError> {
        let spec = self.searchable_column(table, column)?;
        let name = self.resolve(spec, scope)?.name;
        let keys = self.index_key(spec, &name).await?;
        Ok(keys.write.compute(spec.column.ty, canonical)?)
    }

    /// The index values an equality search for a value matches (fetching the keys if needed).
    pub async fn search_indexes(
        &self,
        table: &str,
        column: &str,
        scope: &KeyScope,
        canonical: &[u8],
    ) -> Result<SearchIndexes, CryptoError> {
        let spec = self.searchable_column(table, column)?;
        let name = self.resolve(spec, scope)?.name;
        let keys = self.index_key(spec, &name).await?;
        search_indexes(&keys, spec, canonical)
    }

    /// Derive and cache the index keys of every searchable column under `key_name` (for a
    /// per-context name: the context's own index keys, derived from its own roots).
    pub(super) fn install_index_keys(&self, key_name: &str, roots: &IndexRoots) {
        for spec in self.specs_of_key(key_name).filter(|s| s.column.searchable) {
            let derive = |root| IndexKey::derive(root, key_name, &spec.table, &spec.column.column);
            let keys = Arc::new(IndexKeys {
                version: roots.version,
                write: derive(&roots.write),
                previous: roots.previous.as_ref().map(derive),
            });
            self.cache
                .insert_index_key(key_name, &spec.table, &spec.column.column, keys);
        }
    }

    /// Poller: re-derive the index keys of `key_name` when its root versions changed (a
    /// rotation started or completed) or they aged past the TTL. Reads the store only;
    /// Vault is asked only when something changed.
    pub(super) async fn refresh_index_roots(&self, key_name: &str) {
        let searchable: Vec<&ColumnSpec> = self
            .specs_of_key(key_name)
            .filter(|s| s.column.searchable)
            .collect();
        if searchable.is_empty() {
            return;
        }
        let aged = searchable.iter().any(|s| {
            self.cache
                .index_key(key_name, &s.table, &s.column.column, self.policy.ttl)
                .is_none()
        });
        let changed = match self.provider.index_root_state(key_name).await {
            Ok(state) => self
                .cache
                .index_roots_differ(key_name, (state.write_version(), state.pending.is_some())),
            Err(e) => {
                tracing::warn!(key = key_name, error = %e, "cannot read the index root versions; cached index keys serve until dek_cache_max_stale");
                false
            }
        };
        if !aged && !changed {
            return;
        }
        match self.provider.index_roots(key_name).await {
            Ok(roots) => {
                if changed {
                    tracing::info!(
                        key = key_name,
                        root_version = roots.version,
                        rotating = roots.previous.is_some(),
                        "blind-index root change picked up"
                    );
                }
                self.install_index_keys(key_name, &roots)
            }
            Err(e) if changed => {
                // Indexes computed with a root that is no longer the write root would not be
                // found after the rotation: stop serving the old keys.
                tracing::warn!(key = key_name, error = %e, "cannot obtain the new index root; blind indexes of this key fail until it is");
                self.cache.evict_index_keys(key_name);
                self.background_failure(key_name, 0, &e);
            }
            Err(e) => self.background_failure(key_name, 0, &e),
        }
    }

    pub(super) async fn index_key(
        &self,
        spec: &ColumnSpec,
        key_name: &str,
    ) -> Result<Arc<IndexKeys>, CryptoError> {
        self.cache.check(key_name)?;
        let max_stale = self.policy.max_stale;
        let cached = || {
            self.cache
                .index_key(key_name, &spec.table, &spec.column.column, max_stale)
        };
        if let Some(key) = cached() {
            self.count_hit(true);
            return Ok(key);
        }
        self.count_hit(false);
        self.single_flight(key_name, Slot::IndexRoot, cached, || async {
            let roots = self.provider.index_roots(key_name).await?;
            self.install_index_keys(key_name, &roots);
            self.cache
                .index_key(key_name, &spec.table, &spec.column.column, max_stale)
                .ok_or_else(|| KeyError::Store("index key vanished".into()))
        })
        .await
    }
}

fn search_indexes(
    keys: &IndexKeys,
    spec: &ColumnSpec,
    canonical: &[u8],
) -> Result<SearchIndexes, CryptoError> {
    Ok(SearchIndexes {
        write: keys.write.compute(spec.column.ty, canonical)?,
        previous: keys
            .previous
            .as_ref()
            .map(|k| k.compute(spec.column.ty, canonical))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_matches_both_values_only_during_a_rotation() {
        let one = SearchIndexes {
            write: [1; BIDX_LEN],
            previous: None,
        };
        assert_eq!(one.values(), vec![[1; BIDX_LEN]]);
        assert_eq!(one.previous_or_write(), [1; BIDX_LEN]);
        let two = SearchIndexes {
            write: [1; BIDX_LEN],
            previous: Some([2; BIDX_LEN]),
        };
        assert_eq!(two.values(), vec![[1; BIDX_LEN], [2; BIDX_LEN]]);
        assert_eq!(two.previous_or_write(), [2; BIDX_LEN]);
    }
}
