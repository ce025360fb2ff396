//! Blind-index root rotations in `pgward.index_roots` (see
//! `migrations/0120_pgward_index_roots.sql`).
use std::time::Duration;

use super::{store_err, to_i32, PgKeyStore};
use crate::keys::KeyError;

/// A new blind-index root while its rotation is in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRoot {
    pub key_name: String,
    /// The version the root gets (the current one's plus one).
    pub root_version: u32,
    /// KEK version that wraps it.
    pub kek_version: u32,
    /// Provider-specific wrapped form (transit: `vault:vN:...`).
    pub wrapped: String,
}

/// The blind-index root versions of one key name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexRootState {
    /// Version of the root stored as DEK version 0 (1 until a rotation completed).
    pub version: u32,
    /// The rotation in progress, if any.
    pub pending: Option<PendingRoot>,
    /// How long ago the rotation in progress started.
    pub pending_age: Option<Duration>,
}

impl Default for IndexRootState {
    fn default() -> Self {
        IndexRootState {
            version: 1,
            pending: None,
            pending_age: None,
        }
    }
}

impl IndexRootState {
    /// The root version new index values are computed with.
    pub fn write_version(&self) -> u32 {
        self.pending
            .as_ref()
            .map_or(self.version, |p| p.root_version)
    }
}

fn version(v: i32) -> Result<u32, KeyError> {
    u32::try_from(v).map_err(|_| KeyError::Store(format!("negative root version {v}")))
}

impl PgKeyStore {
    pub(super) async fn read_index_root_state(
        &self,
        key_name: &str,
    ) -> Result<IndexRootState, KeyError> {
        let row = self
            .client().await?
            .query_one(
                "SELECT coalesce(max(root_version) FILTER (WHERE completed_at IS NOT NULL), 1), \
                        max(root_version) FILTER (WHERE completed_at IS NULL), \
                        max(kek_version) FILTER (WHERE completed_at IS NULL), \
                        max(wrapped) FILTER (WHERE completed_at IS NULL), \
                        (max(extract(epoch FROM now() - started_at)) FILTER (WHERE completed_at IS NULL))::float8 \
                   FROM pgward.index_roots WHERE key_name = $1",
                &[&key_name],
            )
            .await;
        let row = match row {
            Ok(row) => row,
            // A database not migrated yet has had no rotation.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Ok(IndexRootState::default())
            }
            Err(e) => return Err(store_err(e)),
        };
        let current: i32 = row.try_get(0).map_err(store_err)?;
        let pending_version: Option<i32> = row.try_get(1).map_err(store_err)?;
        let kek: Option<i32> = row.try_get(2).map_err(store_err)?;
        let wrapped: Option<String> = row.try_get(3).map_err(store_err)?;
        let age: Option<f64> = row.try_get(4).map_err(store_err)?;
        let pending = match (pending_version, kek, wrapped) {
            (Some(v), Some(kek), Some(wrapped)) => Some(PendingRoot {
                key_name: key_name.to_string(),
                root_version: version(v)?,
                kek_version: version(kek)?,
                wrapped,
            }),
            _ => None,
        };
        Ok(IndexRootState {
            version: version(current)?,
            pending_age: pending
                .as_ref()
                .and(age)
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
            pending,
        })
    }

    pub(super) async fn insert_pending_root(
        &self,
        pending: &PendingRoot,
    ) -> Result<bool, KeyError> {
        let n = self
            .client().await?
            .execute(
                "INSERT INTO pgward.index_roots (key_name, root_version, kek_version, provider, wrapped) \
                 VALUES ($1, $2, $3, 'transit', $4) ON CONFLICT DO NOTHING",
                &[
                    &pending.key_name,
                    &to_i32(pending.root_version)?,
                    &to_i32(pending.kek_version)?,
                    &pending.wrapped,
                ],
            )
            .await
            .map_err(store_err)?;
        Ok(n == 1)
    }

    /// One statement, so one transaction: the new root replaces DEK version 0 and the
    /// rotation is marked completed together, or neither happens.
    pub(super) async fn move_pending_root(&self, key_name: &str) -> Result<bool, KeyError> {
        let n = self
            .client().await?
            .execute(
                "WITH pending AS ( \
                     SELECT key_name, kek_version, wrapped FROM pgward.index_roots \
                      WHERE key_name = $1 AND completed_at IS NULL \
                 ), moved AS ( \
                     UPDATE pgward.data_keys d SET wrapped = p.wrapped, kek_version = p.kek_version, \
                            first_kek_version = p.kek_version, created_at = now(), rewrapped_at = NULL, \
                            encryptions = 0 \
                       FROM pending p WHERE d.key_name = p.key_name AND d.dek_version = 0 \
                     RETURNING d.key_name \
                 ) \
                 UPDATE pgward.index_roots r SET completed_at = now(), wrapped = NULL \
                   FROM moved m WHERE r.key_name = m.key_name AND r.completed_at IS NULL",
                &[&key_name],
            )
            .await
            .map_err(store_err)?;
        Ok(n == 1)
    }
}
