//! `keys reencrypt`: move every value to its key's newest data key, in resumable batches,
//! skipping (and naming) values that cannot be read.
use super::{
    batch_size, column_type, primary_key, quote_ident, quote_table, Job, KeysReencryptArgs,
    OpsError, Progress,
};
use crate::crypto::envelope::KeyRef;
use crate::crypto::error::CryptoError;
use crate::crypto::manager::{ColumnSpec, KeyManager};
use crate::crypto::ops::BatchArgs;
use crate::crypto::scope::KeyScope;

/// `keys reencrypt`: rewrite every value not under its key's newest DEK, in batches.
pub async fn keys_reencrypt(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    args: &KeysReencryptArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Vec<Progress>, OpsError> {
    manager.refresh().await?;
    let wanted = args
        .table
        .as_deref()
        .map(crate::crypto::config::qualify_table);
    let specs: Vec<ColumnSpec> = manager
        .columns()
        .filter(|s| wanted.as_ref().is_none_or(|t| *t == s.table))
        .cloned()
        .collect();
    if specs.is_empty() {
        return Err(OpsError::Schema(match &args.table {
            Some(t) => format!("no [[encrypt]] column is in table {t}"),
            None => "no [[encrypt]] columns configured".into(),
        }));
    }
    let mut reports = Vec::new();
    for spec in specs {
        reports.push(reencrypt_column(manager, db, &spec, &args.batch, progress).await?);
    }
    Ok(reports)
}

/// Sweeps from the first row after the main pass, at most: each catches rows written under
/// an old DEK behind the cursor (a proxy that has not yet picked up the rotation) and rows
/// before a resume point that an earlier run did under an older target.
const MAX_SWEEPS: usize = 3;

/// The batch tools run outside any session, so they have no claim to select a per-tenant
/// key: such columns are refused by name rather than skipped value by value.
pub(super) fn refuse_per_context(spec: &ColumnSpec) -> Result<(), OpsError> {
    match &spec.column.context_claim {
        None => Ok(()),
        Some(claim) => Err(OpsError::Schema(format!(
            "{}.{} has per-tenant keys (context_claim = {claim:?}); the batch tools do not handle it yet: rewrite its values through the proxy",
            spec.table, spec.column.column
        ))),
    }
}

async fn reencrypt_column(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    batch: &BatchArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Progress, OpsError> {
    refuse_per_context(spec)?;
    let stored_as = column_type(db, &spec.table, &spec.column.column).await?;
    if stored_as != "bytea" {
        return Err(OpsError::Schema(format!(
            "{}.{} is stored as {stored_as}, not encrypted yet: run `pgward encrypt-existing` first",
            spec.table, spec.column.column
        )));
    }
    let target = manager.current_key_ref(&spec.column.key).await?;
    let (pk, pk_type) = primary_key(db, &spec.table).await?;
    let (t, c, p) = (
        quote_table(&spec.table),
        quote_ident(&spec.column.column),
        quote_ident(&pk),
    );
    // Only rows whose header (bytes 1..9: key id, DEK version) is not the target are read,
    // so rows already done cost a scan but no transfer or decryption.
    // Aliases matter: an output column named like the key would make ORDER BY sort the text cast.
    let select = format!(
        "SELECT {p}::text AS pgward__pk, {c} FROM {t} WHERE ($1::text IS NULL OR {p} > $1::text::{pk_type}) AND {c} IS NOT NULL \
         AND substring({c} from 2 for 8) IS DISTINCT FROM $3 ORDER BY {p} LIMIT $2"
    );
    // Only overwrite the value we read: a concurrent write through the proxy already uses the new DEK.
    let update = format!("UPDATE {t} SET {c} = $1 WHERE {p} = $2::text::{pk_type} AND {c} = $3");
    let job = Job {
        name: "reencrypt",
        db,
        table: spec.table.clone(),
        column: spec.column.column.clone(),
    };
    let (resume, done) = job.resume_point().await?;
    let mut state = Progress {
        rows_done: done,
        last_pk: resume,
        ..Progress::new("reencrypt", &spec.table, &spec.column.column)
    };
    let header = key_ref_bytes(target);
    let started_from_first_row = state.last_pk.is_none();
    let mut sweeps = 0;
    loop {
        let changed_before = state.rows_changed;
        loop {
            let rows = db
                .query(&select, &[&state.last_pk, &batch_size(batch), &header])
                .await?;
            for row in &rows {
                let id: String = row.try_get(0)?;
                let stored: Vec<u8> = row.try_get(1)?;
                match reencrypt_value(manager, db, spec, &update, &id, &stored).await {
                    Ok(n) => state.rows_changed += n,
                    // One bad value must not block a rotation: leave it, name it, go on.
                    Err(OpsError::Crypto(e)) if unreadable_value(&e) => {
                        tracing::warn!(table = %spec.table, column = %spec.column.column, pk = %id, error = %e, "value cannot be read; skipped");
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
        // A pass that changed nothing and covered every row proves the column is done.
        let swept_clean =
            state.rows_changed == changed_before && (sweeps > 0 || started_from_first_row);
        if swept_clean || sweeps == MAX_SWEEPS {
            break;
        }
        sweeps += 1;
        state.last_pk = None;
    }
    job.save(&state.last_pk, state.rows_done, true).await?;
    state.finished = true;
    progress(&state);
    Ok(state)
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
            )
    )
}

/// Decrypt one stored value and write it back under the newest DEK; 1 if the row changed.
async fn reencrypt_value(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    update: &str,
    id: &str,
    stored: &[u8],
) -> Result<i64, OpsError> {
    // A row-bound value stays bound to its row (`id` is the key as PostgreSQL prints it).
    let row = crate::crypto::envelope::is_row_bound(stored).then_some(id);
    let plain = zeroize::Zeroizing::new(
        manager
            .decrypt_row(
                &spec.table,
                &spec.column.column,
                &KeyScope::default(),
                row,
                stored,
            )
            .await?,
    );
    let fresh = manager
        .encrypt_row(
            &spec.table,
            &spec.column.column,
            &KeyScope::default(),
            row,
            &plain,
        )
        .await?;
    Ok(db.execute(update, &[&fresh, &id, &stored]).await? as i64)
}

/// Header bytes 1..9 of values written under `key_ref` (as `substring(col from 2 for 8)`).
fn key_ref_bytes(key_ref: KeyRef) -> Vec<u8> {
    let mut out = key_ref.key_id.to_be_bytes().to_vec();
    out.extend_from_slice(&key_ref.dek_version.to_be_bytes());
    out
}
