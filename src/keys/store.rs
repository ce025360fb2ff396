//! Where wrapped DEKs live at rest for the transit provider.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::{DekInfo, KeyError, KeyFuture};

mod index_roots;
pub use index_roots::{IndexRootState, PendingRoot};

/// The schema (`pgward.data_keys`, `pgward.job_progress`, `pgward.destroyed_keys`,
/// `pgward.retired_keys`, `pgward.index_roots`), applied idempotently, in order.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0100_pgward_keys.sql",
        include_str!("../../migrations/0100_pgward_keys.sql"),
    ),
    (
        "0110_pgward_retired_keys.sql",
        include_str!("../../migrations/0110_pgward_retired_keys.sql"),
    ),
    (
        "0120_pgward_index_roots.sql",
        include_str!("../../migrations/0120_pgward_index_roots.sql"),
    ),
];

/// A DEK in its wrapped (KEK-encrypted) form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedDek {
    pub info: DekInfo,
    /// Provider-specific wrapped form (transit: `vault:vN:...`).
    pub wrapped: String,
}

/// Persistence of wrapped DEKs.
pub trait WrappedKeyStore: Send + Sync + std::fmt::Debug {
    /// Every stored DEK of a key name (including version 0, the index root), by version.
    fn list<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<WrappedDek>>;
    fn get<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, Option<WrappedDek>>;
    /// Insert unless that version exists; `false` means another instance created it first.
    fn insert<'a>(&'a self, dek: &'a WrappedDek, provider: &'a str) -> KeyFuture<'a, bool>;
    /// Replace the wrapped form after a rewrap.
    fn update_wrapped<'a>(&'a self, dek: &'a WrappedDek) -> KeyFuture<'a, ()>;
    /// Add `delta` to the values encrypted under a DEK; returns the new total.
    fn add_encryptions<'a>(
        &'a self,
        key_name: &'a str,
        dek_version: u32,
        delta: u64,
    ) -> KeyFuture<'a, u64>;
    /// The key name was destroyed on purpose (`pgward.destroyed_keys`): serve nothing under it.
    fn destroyed<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move { Ok(false) })
    }
    /// When this DEK version was retired (`pgward.retired_keys`), if it was: a value under it
    /// comes from before its retirement (e.g. a restored row).
    fn retired<'a>(
        &'a self,
        _key_name: &'a str,
        _dek_version: u32,
    ) -> KeyFuture<'a, Option<String>> {
        Box::pin(async move { Ok(None) })
    }
    /// The blind-index root versions of a key name (`pgward.index_roots`): the version of
    /// the root in DEK version 0 and the rotation in progress, if any.
    fn index_root_state<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, IndexRootState> {
        Box::pin(async move { Ok(IndexRootState::default()) })
    }
    /// Record a new root as the rotation in progress; `false` when one already is.
    fn start_index_rotation<'a>(&'a self, _pending: &'a PendingRoot) -> KeyFuture<'a, bool> {
        Box::pin(async move { Err(KeyError::Unsupported("rotating the index root", "memory")) })
    }
    /// Move the rotation's root into DEK version 0 (overwriting the old root) and mark the
    /// rotation completed, in one transaction; `false` when none was in progress.
    fn complete_index_rotation<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move { Err(KeyError::Unsupported("rotating the index root", "memory")) })
    }
}

/// In-memory store: tests and throwaway setups only (keys vanish on restart).
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    map: parking_lot::Mutex<BTreeMap<(String, u32), WrappedDek>>,
    encryptions: parking_lot::Mutex<BTreeMap<(String, u32), u64>>,
}

impl WrappedKeyStore for MemoryKeyStore {
    fn list<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<WrappedDek>> {
        let out = self
            .map
            .lock()
            .values()
            .filter(|d| d.info.key_name == key_name)
            .cloned()
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn get<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, Option<WrappedDek>> {
        let out = self
            .map
            .lock()
            .get(&(key_name.to_string(), dek_version))
            .cloned();
        Box::pin(async move { Ok(out) })
    }

    fn insert<'a>(&'a self, dek: &'a WrappedDek, _provider: &'a str) -> KeyFuture<'a, bool> {
        let mut map = self.map.lock();
        let k = (dek.info.key_name.clone(), dek.info.dek_version);
        let inserted = match map.entry(k) {
            std::collections::btree_map::Entry::Occupied(_) => false,
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(dek.clone());
                true
            }
        };
        Box::pin(async move { Ok(inserted) })
    }

    fn update_wrapped<'a>(&'a self, dek: &'a WrappedDek) -> KeyFuture<'a, ()> {
        self.map.lock().insert(
            (dek.info.key_name.clone(), dek.info.dek_version),
            dek.clone(),
        );
        Box::pin(async move { Ok(()) })
    }

    fn add_encryptions<'a>(
        &'a self,
        key_name: &'a str,
        dek_version: u32,
        delta: u64,
    ) -> KeyFuture<'a, u64> {
        let mut counts = self.encryptions.lock();
        let total = counts
            .entry((key_name.to_string(), dek_version))
            .or_insert(0);
        *total = total.saturating_add(delta);
        let total = *total;
        Box::pin(async move { Ok(total) })
    }
}

/// Opens a new connection to the key store, for when the held one has closed.
pub type Reconnect = Arc<dyn Fn() -> KeyFuture<'static, tokio_postgres::Client> + Send + Sync>;

/// How long a reconnection may take before the operation that needed it fails.
const RECONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `pgward.data_keys` in the upstream database.
#[derive(Clone)]
pub struct PgKeyStore {
    held: Arc<parking_lot::Mutex<Arc<tokio_postgres::Client>>>,
    /// `None`: the connection is not replaced (one-shot commands).
    reconnect: Option<Reconnect>,
    /// One reconnection at a time: callers arriving meanwhile use its connection.
    reconnecting: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for PgKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgKeyStore")
    }
}

pub(super) fn store_err(e: tokio_postgres::Error) -> KeyError {
    KeyError::Store(e.to_string())
}

pub(super) fn to_i32(v: u32) -> Result<i32, KeyError> {
    i32::try_from(v).map_err(|_| KeyError::Store(format!("version {v} out of range")))
}

fn row_to_dek(row: &tokio_postgres::Row) -> Result<WrappedDek, KeyError> {
    let key_name: String = row.try_get(0).map_err(store_err)?;
    let dek: i32 = row.try_get(1).map_err(store_err)?;
    let kek: i32 = row.try_get(2).map_err(store_err)?;
    let wrapped: String = row.try_get(3).map_err(store_err)?;
    let version =
        |v: i32| u32::try_from(v).map_err(|_| KeyError::Store(format!("negative version {v}")));
    Ok(WrappedDek {
        info: DekInfo {
            key_name,
            dek_version: version(dek)?,
            kek_version: version(kek)?,
        },
        wrapped,
    })
}

impl PgKeyStore {
    pub fn new(client: Arc<tokio_postgres::Client>) -> Self {
        PgKeyStore {
            held: Arc::new(parking_lot::Mutex::new(client)),
            reconnect: None,
            reconnecting: Arc::default(),
        }
    }

    /// A store that outlives its connection: once the server closed it (a restart, a
    /// terminated backend), the next operation opens another with `reconnect` instead of
    /// failing until pgward restarts.
    pub fn reconnecting(client: tokio_postgres::Client, reconnect: Reconnect) -> Self {
        PgKeyStore {
            reconnect: Some(reconnect),
            ..Self::new(Arc::new(client))
        }
    }

    /// The connection to use: the held one while it is open, else a new one.
    pub(super) async fn client(&self) -> Result<Arc<tokio_postgres::Client>, KeyError> {
        let held = self.held.lock().clone();
        let Some(reconnect) = self.reconnect.as_ref().filter(|_| held.is_closed()) else {
            return Ok(held);
        };
        let _only_one = self.reconnecting.lock().await;
        let held = self.held.lock().clone();
        if !held.is_closed() {
            return Ok(held);
        }
        let fresh = tokio::time::timeout(RECONNECT_TIMEOUT, reconnect())
            .await
            .map_err(|_| KeyError::Store("reconnecting to the key store timed out".into()))??;
        tracing::info!("reconnected to the wrapped-key store");
        let fresh = Arc::new(fresh);
        *self.held.lock() = fresh.clone();
        Ok(fresh)
    }

    /// Create the schema if missing (same SQL as the migration files).
    pub async fn migrate(&self) -> Result<(), KeyError> {
        for (file, sql) in MIGRATIONS {
            self.client()
                .await?
                .batch_execute(sql)
                .await
                .map_err(|e| KeyError::Store(format!("{file}: {e}")))?;
        }
        Ok(())
    }
}

impl WrappedKeyStore for PgKeyStore {
    fn index_root_state<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, IndexRootState> {
        Box::pin(self.read_index_root_state(key_name))
    }

    fn start_index_rotation<'a>(&'a self, pending: &'a PendingRoot) -> KeyFuture<'a, bool> {
        Box::pin(self.insert_pending_root(pending))
    }

    fn complete_index_rotation<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(self.move_pending_root(key_name))
    }

    fn retired<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, Option<String>> {
        Box::pin(async move {
            let row = self
                .client().await?
                .query_opt(
                    "SELECT retired_at::text FROM pgward.retired_keys WHERE key_name = $1 AND dek_version = $2",
                    &[&key_name, &to_i32(dek_version)?],
                )
                .await;
            match row {
                Ok(Some(row)) => Ok(Some(row.try_get(0).map_err(store_err)?)),
                Ok(None) => Ok(None),
                // A database not migrated yet has no retired keys.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    Ok(None)
                }
                Err(e) => Err(store_err(e)),
            }
        })
    }

    fn destroyed<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move {
            let row = self
                .client()
                .await?
                .query_opt(
                    "SELECT 1 FROM pgward.destroyed_keys WHERE key_name = $1",
                    &[&key_name],
                )
                .await;
            match row {
                Ok(found) => Ok(found.is_some()),
                // A database not migrated yet has no destroyed keys.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                    Ok(false)
                }
                Err(e) => Err(store_err(e)),
            }
        })
    }

    fn list<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<WrappedDek>> {
        Box::pin(async move {
            let rows = self
                .client().await?
                .query(
                    "SELECT key_name, dek_version, kek_version, wrapped FROM pgward.data_keys WHERE key_name = $1 ORDER BY dek_version",
                    &[&key_name],
                )
                .await
                .map_err(store_err)?;
            rows.iter().map(row_to_dek).collect()
        })
    }

    fn get<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, Option<WrappedDek>> {
        Box::pin(async move {
            let row = self
                .client().await?
                .query_opt(
                    "SELECT key_name, dek_version, kek_version, wrapped FROM pgward.data_keys WHERE key_name = $1 AND dek_version = $2",
                    &[&key_name, &to_i32(dek_version)?],
                )
                .await
                .map_err(store_err)?;
            row.as_ref().map(row_to_dek).transpose()
        })
    }

    fn insert<'a>(&'a self, dek: &'a WrappedDek, provider: &'a str) -> KeyFuture<'a, bool> {
        Box::pin(async move {
            let n = self
                .client().await?
                .execute(
                    "INSERT INTO pgward.data_keys (key_name, dek_version, kek_version, provider, wrapped) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (key_name, dek_version) DO NOTHING",
                    &[&dek.info.key_name, &to_i32(dek.info.dek_version)?, &to_i32(dek.info.kek_version)?, &provider, &dek.wrapped],
                )
                .await
                .map_err(store_err)?;
            Ok(n == 1)
        })
    }

    fn update_wrapped<'a>(&'a self, dek: &'a WrappedDek) -> KeyFuture<'a, ()> {
        Box::pin(async move {
            self.client().await?
                .execute(
                    "UPDATE pgward.data_keys SET wrapped = $3, kek_version = $4, rewrapped_at = now() WHERE key_name = $1 AND dek_version = $2",
                    &[&dek.info.key_name, &to_i32(dek.info.dek_version)?, &dek.wrapped, &to_i32(dek.info.kek_version)?],
                )
                .await
                .map_err(store_err)?;
            Ok(())
        })
    }

    fn add_encryptions<'a>(
        &'a self,
        key_name: &'a str,
        dek_version: u32,
        delta: u64,
    ) -> KeyFuture<'a, u64> {
        Box::pin(async move {
            let delta = i64::try_from(delta)
                .map_err(|_| KeyError::Store(format!("encryption count {delta} out of range")))?;
            let row = self
                .client().await?
                .query_opt(
                    "UPDATE pgward.data_keys SET encryptions = encryptions + $3 WHERE key_name = $1 AND dek_version = $2 RETURNING encryptions",
                    &[&key_name, &to_i32(dek_version)?, &delta],
                )
                .await
                .map_err(store_err)?
                .ok_or(KeyError::UnknownDek {
                    key: key_name.to_string(),
                    dek_version,
                })?;
            let total: i64 = row.try_get(0).map_err(store_err)?;
            Ok(u64::try_from(total).unwrap_or(0))
        })
    }
}
