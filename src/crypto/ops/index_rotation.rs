//! `keys rotate-index` and the blind-index half of `keys reencrypt`: a key name's index root
//! is replaced by a new one; while both live, proxies compute new index values with the new
//! root and searches match either; `keys reencrypt` then recomputes every index value (it
//! cannot tell which root made one: index values carry no version, see README) and, once
//! every searchable column of the key is done, completes the rotation.
use std::time::Duration;

use super::reencrypt::{refuse_per_context, unreadable_value};
use super::{
    batch_size, primary_key, quote_ident, quote_table, BatchArgs, Job, OpsError, Progress,
};
use crate::crypto::manager::{ColumnSpec, KeyManager};
use crate::crypto::scope::KeyScope;
use crate::crypto::sql::bidx_column;

/// `pgward keys rotate-index --key K --confirm`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KeysRotateIndexArgs {
    /// The configured key name whose blind-index root is replaced.
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
    /// The new root's version.
    pub root_version: u32,
    /// `false`: a rotation to this version was already in progress.
    pub created: bool,
}

/// Start a rotation of `key`'s blind-index root (or report the one in progress).
pub async fn keys_rotate_index(
    manager: &KeyManager,
    args: &KeysRotateIndexArgs,
) -> Result<RotationStarted, OpsError> {
    let specs: Vec<&ColumnSpec> = manager
        .columns()
        .filter(|s| s.column.key == args.key)
        .collect();
    if specs.is_empty() {
        return Err(OpsError::Schema(format!(
            "key {:?} is not used by any [[encrypt]] column",
            args.key
        )));
    }
    for spec in &specs {
        refuse_per_context(spec)?;
    }
    if !specs.iter().any(|s| s.column.searchable) {
        return Err(OpsError::Schema(format!(
            "key {:?} has no searchable column, so no blind index to rotate",
            args.key
        )));
    }
    let (root_version, created) = manager.provider().start_index_rotation(&args.key).await?;
    Ok(RotationStarted {
        key_name: args.key.clone(),
        root_version,
        created,
    })
}

/// The blind-index part of one `keys reencrypt` run for one key name.
#[derive(Clone, Debug)]
pub struct IndexRotationReport {
    pub key_name: String,
    pub root_version: u32,
    /// The columns recomputed in this run.
    pub columns: Vec<Progress>,
    /// The rotation completed: the old root is gone, searches match one value again.
    pub completed: bool,
    /// Searchable columns of the key whose index values are not all recomputed yet.
    pub waiting_for: Vec<String>,
}

/// Which job in `pgward.job_progress` recomputes the index values for root `version`.
fn job_name(version: u32) -> String {
    format!("reindex_v{version}")
}

/// For every key name with a rotation in progress: wait until every proxy computes new index
/// values with the new root (`settle`: two key polls), recompute the index of every value of
/// its searchable columns (of `table` only, if given), and complete the rotation when every
/// searchable column of the key is done and no value was left unreadable.
pub async fn reindex_rotating_keys(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    table: Option<&str>,
    batch: &BatchArgs,
    settle: Duration,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Vec<IndexRotationReport>, OpsError> {
    let wanted = table.map(crate::crypto::config::qualify_table);
    let mut keys: Vec<String> = manager
        .columns()
        .filter(|s| s.column.searchable && s.column.context_claim.is_none())
        .map(|s| s.column.key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    let mut reports = Vec::new();
    for key in keys {
        let state = manager.provider().index_root_state(&key).await?;
        let Some(pending) = state.pending else {
            continue;
        };
        let wait = settle.saturating_sub(state.pending_age.unwrap_or_default());
        if !wait.is_zero() {
            tracing::info!(key = %key, wait_ms = wait.as_millis() as u64, "waiting for every proxy to index with the new root");
            tokio::time::sleep(wait).await;
        }
        let job = job_name(pending.root_version);
        let specs: Vec<ColumnSpec> = manager
            .columns()
            .filter(|s| s.column.key == key && s.column.searchable)
            .cloned()
            .collect();
        let mut columns = Vec::new();
        for spec in specs
            .iter()
            .filter(|s| wanted.as_ref().is_none_or(|t| *t == s.table))
        {
            columns.push(reindex_column(manager, db, spec, &job, batch, progress).await?);
        }
        let mut waiting_for = Vec::new();
        for spec in &specs {
            let done = db
                .query_opt(
                    "SELECT 1 FROM pgward.job_progress WHERE job = $1 AND table_name = $2 AND column_name = $3 AND finished_at IS NOT NULL",
                    &[&job, &spec.table, &spec.column.column],
                )
                .await?
                .is_some();
            if !done {
                waiting_for.push(format!("{}.{}", spec.table, spec.column.column));
            }
        }
        let clean = columns.iter().all(|c| c.rows_skipped() == 0);
        let completed = waiting_for.is_empty()
            && clean
            && manager.provider().complete_index_rotation(&key).await?;
        if completed {
            tracing::info!(key = %key, root_version = pending.root_version, "blind-index root rotation completed; the old root is gone");
        }
        reports.push(IndexRotationReport {
            key_name: key,
            root_version: pending.root_version,
            columns,
            completed,
            waiting_for,
        });
    }
    Ok(reports)
}

/// Sweeps from the first row after the main pass, at most (see `reencrypt::MAX_SWEEPS`).
const MAX_SWEEPS: usize = 3;

/// Recompute the blind index of every value of one column with the write root.
async fn reindex_column(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    job_name: &str,
    batch: &BatchArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Progress, OpsError> {
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
        db,
        table: spec.table.clone(),
        column: spec.column.column.clone(),
    };
    let (resume, done) = job.resume_point().await?;
    let mut state = Progress {
        rows_done: done,
        last_pk: resume,
        ..Progress::new("reindex", &spec.table, &spec.column.column)
    };
    let started_from_first_row = state.last_pk.is_none();
    let mut sweeps = 0;
    loop {
        let changed_before = state.rows_changed;
        loop {
            let rows = db
                .query(&select, &[&state.last_pk, &batch_size(batch)])
                .await?;
            for row in &rows {
                let id: String = row.try_get(0)?;
                let stored: Vec<u8> = row.try_get(1)?;
                let index: Option<Vec<u8>> = row.try_get(2)?;
                match reindex_value(manager, db, spec, &update, &id, &stored, index).await {
                    Ok(n) => state.rows_changed += n,
                    Err(OpsError::Crypto(e)) if unreadable_value(&e) => {
                        tracing::warn!(table = %spec.table, column = %spec.column.column, pk = %id, error = %e, "value cannot be read; its index is left as it is");
                        state.skip(&id);
                    }
                    Err(e) => return Err(e.at_row(spec, &id)),
                }
                state.last_pk = Some(id);
            }
            state.rows_done += rows.len() as i64;
            job.save(&state.last_pk, state.rows_done, false).await?;
            progress(&state);
            if (rows.len() as i64) < batch_size(batch) {
                break;
            }
            tokio::time::sleep(batch.pause).await;
        }
        let swept_clean =
            state.rows_changed == changed_before && (sweeps > 0 || started_from_first_row);
        if swept_clean || sweeps == MAX_SWEEPS {
            break;
        }
        sweeps += 1;
        state.last_pk = None;
    }
    // A column with unreadable values is not done: their rows would not be found afterwards.
    let finished = state.rows_skipped() == 0;
    job.save(&state.last_pk, state.rows_done, finished).await?;
    state.finished = finished;
    progress(&state);
    Ok(state)
}

/// Recompute one value's index; 1 if the row changed.
async fn reindex_value(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    update: &str,
    id: &str,
    stored: &[u8],
    index: Option<Vec<u8>>,
) -> Result<i64, OpsError> {
    let (table, column, scope) = (&spec.table, &spec.column.column, KeyScope::default());
    let plain = zeroize::Zeroizing::new(manager.decrypt(table, column, &scope, stored).await?);
    let fresh = manager.blind_index(table, column, &scope, &plain).await?;
    if index.as_deref() == Some(&fresh[..]) {
        return Ok(0);
    }
    Ok(db.execute(update, &[&&fresh[..], &id, &stored]).await? as i64)
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

    fn args(key: &str) -> KeysRotateIndexArgs {
        KeysRotateIndexArgs {
            key: key.into(),
            confirm: true,
        }
    }

    #[tokio::test]
    async fn rotate_index_refuses_what_the_batch_tools_cannot_finish() {
        let refused = |r: Result<RotationStarted, OpsError>| match r {
            Err(OpsError::Schema(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let m = refused(keys_rotate_index(&manager(Some("tenant_id"), true), &args("pii")).await);
        assert!(m.contains("per-tenant"), "{m}");
        let m = refused(keys_rotate_index(&manager(None, false), &args("pii")).await);
        assert!(m.contains("no searchable column"), "{m}");
        let m = refused(keys_rotate_index(&manager(None, true), &args("other")).await);
        assert!(m.contains("not used by any"), "{m}");
        // The local provider cannot rotate the root: a typed refusal, not a panic.
        assert!(matches!(
            keys_rotate_index(&manager(None, true), &args("pii")).await,
            Err(OpsError::Key(crate::keys::KeyError::Unsupported(..)))
        ));
    }
}
