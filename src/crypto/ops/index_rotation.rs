//! `keys rotate-index` and the blind-index half of `keys reencrypt`: a key name's index root
//! is replaced by a new one; while both live, proxies compute new index values with the new
//! root and searches match either; `keys reencrypt` then recomputes every index value (it
//! cannot tell which root made one: index values carry no version, see README) and, once
//! every searchable column of the key is done, completes the rotation. A per-tenant key
//! (`context_claim`) has one root per context: every context found in pgward's tables is
//! rotated, and each value's index is recomputed with its own context's new root.
use std::collections::HashSet;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_postgres::Row;

use super::context_keys::{context_key_names, require_discoverable, ColumnKeys};
use super::sweep::unreadable_value;
use super::sweep::{sweep, RowJob};
use super::{primary_key, quote_ident, quote_table, BatchArgs, Job, OpsError, Progress};
use crate::crypto::envelope::{key_name_id, peek_key_ref};
use crate::crypto::manager::{ColumnSpec, KeyManager};
use crate::crypto::sql::bidx_column;

/// `pgward keys rotate-index --key K --confirm`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysRotateIndexArgs {
    /// The configured key name whose blind-index root is replaced (every context's root,
    /// for a per-tenant key).
    #[arg(long)]
    pub key: String,
    /// Required: searches match two index values until `keys reencrypt` completes the rotation.
    #[arg(long)]
    pub confirm: bool,
}

/// What `keys rotate-index` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationStarted {
    pub key_name: String,
    /// The new root's version (the highest one, for per-context roots).
    pub root_version: u32,
    /// `false`: a rotation to this version was already in progress (for every root).
    pub created: bool,
    /// Per-context roots rotated (per-tenant columns of the key), 0 when none.
    pub contexts: usize,
}

/// The searchable columns of `key`, split into (without, with) a key context; refuses what
/// the batch tools could not finish.
fn searchable_specs<'a>(
    manager: &'a KeyManager,
    key: &str,
) -> Result<(Vec<&'a ColumnSpec>, Vec<&'a ColumnSpec>), OpsError> {
    let specs: Vec<&ColumnSpec> = manager.columns().filter(|s| s.column.key == key).collect();
    if specs.is_empty() {
        return Err(OpsError::Schema(format!(
            "key {key:?} is not used by any [[encrypt]] column"
        )));
    }
    for spec in &specs {
        require_discoverable(manager, spec)?;
    }
    let (plain, per_context): (Vec<&ColumnSpec>, Vec<&ColumnSpec>) = specs
        .into_iter()
        .filter(|s| s.column.searchable)
        .partition(|s| s.column.context_claim.is_none());
    if plain.is_empty() && per_context.is_empty() {
        return Err(OpsError::Schema(format!(
            "key {key:?} has no searchable column, so no blind index to rotate"
        )));
    }
    Ok((plain, per_context))
}

/// Start a rotation of `key`'s blind-index root (or report the one in progress); for a
/// per-tenant key, of the root of every context stored in `pgward.data_keys`.
pub async fn keys_rotate_index(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    args: &KeysRotateIndexArgs,
) -> Result<RotationStarted, OpsError> {
    let (plain, per_context) = searchable_specs(manager, &args.key)?;
    let mut names = Vec::new();
    if !plain.is_empty() {
        names.push(args.key.clone());
    }
    let mut contexts = 0;
    if !per_context.is_empty() {
        let (live, _) = context_key_names(db, &args.key).await?;
        contexts = live.len();
        names.extend(live);
    }
    if names.is_empty() {
        return Err(OpsError::Schema(format!(
            "key {:?} has per-tenant columns but no tenant has a key stored yet: nothing to rotate",
            args.key
        )));
    }
    let mut started = RotationStarted {
        key_name: args.key.clone(),
        root_version: 0,
        created: false,
        contexts,
    };
    for name in &names {
        let (version, created) = manager.provider().start_index_rotation(name).await?;
        started.root_version = started.root_version.max(version);
        started.created |= created;
    }
    Ok(started)
}

/// The blind-index part of one `keys reencrypt` run for one key name.
#[derive(Clone, Debug)]
pub struct IndexRotationReport {
    pub key_name: String,
    /// The new root's version (the highest one, for per-context roots).
    pub root_version: u32,
    /// Per-context roots being rotated (per-tenant columns), `None` for the key's own root.
    pub contexts: Option<usize>,
    /// The columns recomputed in this run.
    pub columns: Vec<Progress>,
    /// The rotation completed: the old root is gone, searches match one value again.
    pub completed: bool,
    /// Searchable columns of the key whose index values are not all recomputed yet.
    pub waiting_for: Vec<String>,
}

/// One rotation `keys reencrypt` finishes: the key names whose roots rotate (the key's own,
/// or its contexts'), the columns indexed with them and the job recomputing them.
struct Rotation {
    key: String,
    /// (key name, new root version).
    roots: Vec<(String, u32)>,
    specs: Vec<ColumnSpec>,
    job: String,
    /// How long ago the youngest of these rotations started.
    age: Duration,
    per_context: bool,
}

/// Which job in `pgward.job_progress` recomputes the index values for root `version`.
fn job_name(version: u32) -> String {
    format!("reindex_v{version}")
}

/// The job of a set of per-context rotations: another set (a context started or finished
/// rotating since) is another job, which starts again from the first row.
fn context_job_name(roots: &[(String, u32)]) -> String {
    let mut digest = Sha256::new();
    for (name, version) in roots {
        digest.update(format!("{name}:{version}\n").as_bytes());
    }
    let hex: String = digest.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("reindex_ctx_{hex}")
}

/// The rotations in progress among the searchable columns of every configured key.
async fn rotations_in_progress(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
) -> Result<Vec<Rotation>, OpsError> {
    let mut keys: Vec<String> = manager
        .columns()
        .filter(|s| s.column.searchable)
        .map(|s| s.column.key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    let transit = manager.provider().kind() == "transit";
    let mut out = Vec::new();
    for key in keys {
        for per_context in [false, true] {
            let specs: Vec<ColumnSpec> = manager
                .columns()
                .filter(|s| s.column.key == key && s.column.searchable)
                .filter(|s| s.column.context_claim.is_some() == per_context)
                .cloned()
                .collect();
            if specs.is_empty() || (per_context && !transit) {
                continue;
            }
            let names = if per_context {
                context_key_names(db, &key).await?.0
            } else {
                vec![key.clone()]
            };
            let mut roots = Vec::new();
            let mut age = Duration::MAX;
            for name in names {
                let state = manager.provider().index_root_state(&name).await?;
                if let Some(pending) = state.pending {
                    age = age.min(state.pending_age.unwrap_or_default());
                    roots.push((name, pending.root_version));
                }
            }
            let job = match roots.as_slice() {
                [] => continue,
                [(_, version)] if !per_context => job_name(*version),
                _ => context_job_name(&roots),
            };
            out.push(Rotation {
                key: key.clone(),
                roots,
                specs,
                job,
                age,
                per_context,
            });
        }
    }
    Ok(out)
}

/// For every key name with a rotation in progress: wait until every proxy computes new index
/// values with the new root (`settle`: two key polls), recompute the index of every value of
/// its searchable columns (of `table` only, if given), and complete the rotation when every
/// searchable column of the key is done and no value under a rotating root was unreadable.
pub async fn reindex_rotating_keys(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    table: Option<&str>,
    batch: &BatchArgs,
    settle: Duration,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Vec<IndexRotationReport>, OpsError> {
    let wanted = table.map(crate::crypto::config::qualify_table);
    let mut reports = Vec::new();
    for rotation in rotations_in_progress(manager, db).await? {
        let wait = settle.saturating_sub(rotation.age);
        if !wait.is_zero() {
            tracing::info!(key = %rotation.key, wait_ms = wait.as_millis() as u64, "waiting for every proxy to index with the new root");
            tokio::time::sleep(wait).await;
        }
        let rotating: HashSet<u32> = rotation
            .roots
            .iter()
            .map(|(name, _)| key_name_id(name))
            .collect();
        let mut columns = Vec::new();
        for spec in rotation
            .specs
            .iter()
            .filter(|s| wanted.as_ref().is_none_or(|t| *t == s.table))
        {
            columns.push(
                reindex_column(manager, db, spec, &rotating, &rotation.job, batch, progress)
                    .await?,
            );
        }
        let mut waiting_for = Vec::new();
        for spec in &rotation.specs {
            let done = db
                .query_opt(
                    "SELECT 1 FROM pgward.job_progress WHERE job = $1 AND table_name = $2 AND column_name = $3 AND finished_at IS NOT NULL",
                    &[&rotation.job, &spec.table, &spec.column.column],
                )
                .await?
                .is_some();
            if !done {
                waiting_for.push(format!("{}.{}", spec.table, spec.column.column));
            }
        }
        let clean = columns.iter().all(|c| c.finished);
        let mut completed = waiting_for.is_empty() && clean;
        if completed {
            for (name, _) in &rotation.roots {
                completed &= manager.provider().complete_index_rotation(name).await?;
            }
        }
        let root_version = rotation.roots.iter().map(|(_, v)| *v).max().unwrap_or(0);
        if completed {
            tracing::info!(key = %rotation.key, root_version, roots = rotation.roots.len(), "blind-index root rotation completed; the old root is gone");
        }
        reports.push(IndexRotationReport {
            key_name: rotation.key,
            root_version,
            contexts: rotation.per_context.then_some(rotation.roots.len()),
            columns,
            completed,
            waiting_for,
        });
    }
    Ok(reports)
}

/// Recompute the blind index of every value of one column with its key's write root.
async fn reindex_column(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    rotating: &HashSet<u32>,
    job_name: &str,
    batch: &BatchArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Progress, OpsError> {
    let keys = ColumnKeys::load(manager, db, spec).await?;
    let (pk, pk_type) = primary_key(db, &spec.table).await?;
    let (t, c, b, p) = (
        quote_table(&spec.table),
        quote_ident(&spec.column.column),
        quote_ident(&bidx_column(&spec.column.column)),
        quote_ident(&pk),
    );
    let select = format!(
        "SELECT {p}::text AS pgward__pk, {c}, {b} FROM {t} WHERE ($1::text IS NULL OR {p} > $1::text::{pk_type}) AND {c} IS NOT NULL \
         ORDER BY {p} LIMIT $2"
    );
    // Only where the value is still the one read: a concurrent write indexed it already.
    let update = format!("UPDATE {t} SET {b} = $1 WHERE {p} = $2::text::{pk_type} AND {c} = $3");
    let job = Job {
        name: job_name,
        label: "reindex",
        db,
        table: spec.table.clone(),
        column: spec.column.column.clone(),
    };
    let mut rows = Reindex {
        manager,
        db,
        spec,
        keys: &keys,
        update: &update,
        rotating,
        blocking: 0,
    };
    let mut state = sweep(db, spec, &job, &select, &[], batch, progress, &mut rows).await?;
    // A column with unreadable values under a rotating root is not done: their rows would
    // not be found afterwards. Values under no known key (a shredded context) do not hold it.
    let finished = rows.blocking == 0;
    job.save(&state.last_pk, state.rows_done, finished).await?;
    state.finished = finished;
    progress(&state);
    Ok(state)
}

/// Recompute one value's index under its own key; 1 if the row changed.
struct Reindex<'a> {
    manager: &'a KeyManager,
    db: &'a tokio_postgres::Client,
    spec: &'a ColumnSpec,
    keys: &'a ColumnKeys,
    update: &'a str,
    rotating: &'a HashSet<u32>,
    /// Unreadable values under a rotating root.
    blocking: i64,
}

impl RowJob for Reindex<'_> {
    async fn row(&mut self, id: &str, row: &Row) -> Result<i64, OpsError> {
        let stored: Vec<u8> = row.try_get(1)?;
        let index: Option<Vec<u8>> = row.try_get(2)?;
        let bound = crate::crypto::envelope::is_row_bound(&stored).then_some(id);
        let (key, plain) = match self
            .keys
            .open(self.manager, self.spec, bound, &stored)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                let under_rotating =
                    peek_key_ref(&stored).is_ok_and(|k| self.rotating.contains(&k.key_id));
                if under_rotating && unreadable_value(&e) {
                    self.blocking += 1;
                }
                return Err(e.into());
            }
        };
        let fresh = self
            .manager
            .blind_index_named(self.spec, key, &plain)
            .await?;
        if index.as_deref() == Some(&fresh[..]) {
            return Ok(0);
        }
        Ok(self
            .db
            .execute(self.update, &[&&fresh[..], &id, &stored])
            .await? as i64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::crypto::codec::ClientType;
    use crate::crypto::config::EncryptColumn;
    use crate::crypto::manager::CachePolicy;
    use crate::keys::local::LocalProvider;
    use crate::keys::SecretKey;

    #[test]
    fn each_root_version_has_its_own_job() {
        assert_eq!(job_name(2), "reindex_v2");
        assert_ne!(job_name(2), job_name(3));
    }

    fn manager(context_claim: Option<&str>, searchable: bool) -> KeyManager {
        let column = EncryptColumn {
            table: "people".into(),
            column: "email".into(),
            key: "pii".into(),
            ty: ClientType::Text,
            searchable,
            context_claim: context_claim.map(str::to_string),
            bind_primary_key: false,
        };
        let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([3; 32])));
        let policy = CachePolicy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(60),
            blocking_threshold: 64 * 1024,
        };
        KeyManager::new(provider, None, &[column], policy).unwrap()
    }

    #[test]
    fn rotate_index_refuses_what_the_batch_tools_cannot_finish() {
        let refused = |m: &KeyManager, key: &str| match searchable_specs(m, key) {
            Err(OpsError::Schema(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Per-tenant keys are found in pgward.data_keys: transit only.
        let m = refused(&manager(Some("tenant_id"), true), "pii");
        assert!(m.contains("per-tenant") && m.contains("transit"), "{m}");
        let m = refused(&manager(None, false), "pii");
        assert!(m.contains("no searchable column"), "{m}");
        let m = refused(&manager(None, true), "other");
        assert!(m.contains("not used by any"), "{m}");
        let plain = manager(None, true);
        let (without, with) = searchable_specs(&plain, "pii").unwrap();
        assert_eq!((without.len(), with.len()), (1, 0));
    }

    #[test]
    fn a_changed_set_of_context_rotations_is_another_job() {
        let a = context_job_name(&[("pii-t00".into(), 2), ("pii-t01".into(), 2)]);
        assert_eq!(
            a,
            context_job_name(&[("pii-t00".into(), 2), ("pii-t01".into(), 2)])
        );
        assert_ne!(a, context_job_name(&[("pii-t00".into(), 2)]));
        assert_ne!(
            a,
            context_job_name(&[("pii-t00".into(), 3), ("pii-t01".into(), 2)])
        );
        assert!(a.starts_with("reindex_ctx_"));
    }
}
