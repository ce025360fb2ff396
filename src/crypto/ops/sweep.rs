//! The resumable batch sweep shared by `keys reencrypt`'s two jobs (moving values to the
//! newest data key, recomputing blind indexes): keyset pages by primary key, progress saved
//! after each page, unreadable values skipped and named, then sweeps from the first row.
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{batch_size, BatchArgs, Job, OpsError, Progress};
use crate::crypto::error::CryptoError;
use crate::crypto::manager::ColumnSpec;

/// Sweeps from the first row after the main pass, at most: each catches rows written under
/// an old key behind the cursor (a proxy that has not yet picked up the rotation) and rows
/// before a resume point that an earlier run did under an older target.
const MAX_SWEEPS: usize = 3;

/// What a sweep does with each row it selects.
pub(super) trait RowJob {
    /// Handle the row with primary key `id` (as text); the number of rows changed. A
    /// [`OpsError::Crypto`] error that [`unreadable_value`] accepts skips the value.
    async fn row(&mut self, id: &str, row: &Row) -> Result<i64, OpsError>;
}

/// One column's sweep: `select` pages with `$1` (the last primary key as text, NULL for the
/// first page) and `$2` (the page size), then `params` as `$3`…; its first output column is
/// the primary key as text. Returns the progress after the last sweep, not yet saved as
/// finished (the caller decides whether the column is done).
#[allow(clippy::too_many_arguments)]
pub(super) async fn sweep(
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    job: &Job<'_>,
    select: &str,
    params: &[&(dyn ToSql + Sync)],
    batch: &BatchArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
    rows_job: &mut impl RowJob,
) -> Result<Progress, OpsError> {
    let (resume, done) = job.resume_point().await?;
    let mut state = Progress {
        rows_done: done,
        last_pk: resume,
        ..Progress::new(job.progress_name(), &spec.table, &spec.column.column)
    };
    let started_from_first_row = state.last_pk.is_none();
    let limit = batch_size(batch);
    let mut sweeps = 0;
    loop {
        let changed_before = state.rows_changed;
        loop {
            let mut args: Vec<&(dyn ToSql + Sync)> = vec![&state.last_pk, &limit];
            args.extend_from_slice(params);
            let rows = db.query(select, &args).await?;
            for row in &rows {
                let id: String = row.try_get(0)?;
                match rows_job.row(&id, row).await {
                    Ok(n) => state.rows_changed += n,
                    // One bad value must not block a rotation: leave it, name it, go on.
                    Err(OpsError::Crypto(e)) if unreadable_value(&e) => {
                        tracing::warn!(table = %spec.table, column = %spec.column.column, pk = %id, error = %e, "value cannot be read; left as it is");
                        state.skip(&id);
                    }
                    Err(e) => return Err(e.at_row(spec, &id)),
                }
                state.last_pk = Some(id);
            }
            state.rows_done += rows.len() as i64;
            job.save(&state.last_pk, state.rows_done, false).await?;
            progress(&state);
            if (rows.len() as i64) < limit {
                break;
            }
            tokio::time::sleep(batch.pause).await;
        }
        // A pass that changed nothing and covered every row proves the column is done.
        let swept_clean =
            state.rows_changed == changed_before && (sweeps > 0 || started_from_first_row);
        if swept_clean || sweeps == MAX_SWEEPS {
            return Ok(state);
        }
        sweeps += 1;
        state.last_pk = None;
    }
}

/// A failure of this one value (as opposed to the key service or the database).
pub(super) fn unreadable_value(e: &CryptoError) -> bool {
    matches!(
        e,
        CryptoError::Malformed(_)
            | CryptoError::Integrity { .. }
            | CryptoError::WrongKey { .. }
            | CryptoError::Codec(_)
            | CryptoError::KeyUnavailable(
                crate::crypto::error::KeyFailure::UnknownVersion
                    | crate::crypto::error::KeyFailure::Retired
                    | crate::crypto::error::KeyFailure::Destroyed
            )
    )
}
