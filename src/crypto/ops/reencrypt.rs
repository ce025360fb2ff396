//! `keys reencrypt`: move every value to its key's newest data key, in resumable batches,
//! skipping (and naming) values that cannot be read. A per-tenant column's values are each
//! moved to the newest data key of their own context.
use tokio_postgres::Row;

use super::context_keys::ColumnKeys;
use super::sweep::{sweep, RowJob};
use super::{
    column_type, primary_key, quote_ident, quote_table, Job, KeysReencryptArgs, OpsError, Progress,
};
use crate::crypto::manager::{ColumnSpec, KeyManager};
use crate::crypto::ops::BatchArgs;

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

async fn reencrypt_column(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    spec: &ColumnSpec,
    batch: &BatchArgs,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<Progress, OpsError> {
    let stored_as = column_type(db, &spec.table, &spec.column.column).await?;
    if stored_as != "bytea" {
        return Err(OpsError::Schema(format!(
            "{}.{} is stored as {stored_as}, not encrypted yet: run `pgward encrypt-existing` first",
            spec.table, spec.column.column
        )));
    }
    let mut keys = ColumnKeys::load(manager, db, spec).await?;
    let targets = keys.current_headers(manager).await?;
    let (pk, pk_type) = primary_key(db, &spec.table).await?;
    let (t, c, p) = (
        quote_table(&spec.table),
        quote_ident(&spec.column.column),
        quote_ident(&pk),
    );
    // Only rows whose header (bytes 1..9: key id, DEK version) is none of the targets (the
    // newest DEK of each key) are read, so rows already done cost a scan but no transfer or
    // decryption. Aliases matter: an output column named like the key would make ORDER BY
    // sort the text cast.
    let select = format!(
        "SELECT {p}::text AS pgward__pk, {c} FROM {t} WHERE ($1::text IS NULL OR {p} > $1::text::{pk_type}) AND {c} IS NOT NULL \
         AND substring({c} from 2 for 8) <> ALL($3::bytea[]) ORDER BY {p} LIMIT $2"
    );
    // Only overwrite the value we read: a concurrent write through the proxy already uses the new DEK.
    let update = format!("UPDATE {t} SET {c} = $1 WHERE {p} = $2::text::{pk_type} AND {c} = $3");
    let job = Job {
        name: "reencrypt",
        label: "reencrypt",
        db,
        table: spec.table.clone(),
        column: spec.column.column.clone(),
    };
    let mut rows = Reencrypt {
        manager,
        db,
        spec,
        keys: &keys,
        update: &update,
    };
    let mut state = sweep(
        db,
        spec,
        &job,
        &select,
        &[&targets],
        batch,
        progress,
        &mut rows,
    )
    .await?;
    job.save(&state.last_pk, state.rows_done, true).await?;
    state.finished = true;
    progress(&state);
    Ok(state)
}

/// Decrypt one stored value under its own key and write it back under that key's newest DEK.
struct Reencrypt<'a> {
    manager: &'a KeyManager,
    db: &'a tokio_postgres::Client,
    spec: &'a ColumnSpec,
    keys: &'a ColumnKeys,
    update: &'a str,
}

impl RowJob for Reencrypt<'_> {
    async fn row(&mut self, id: &str, row: &Row) -> Result<i64, OpsError> {
        let stored: Vec<u8> = row.try_get(1)?;
        // A row-bound value stays bound to its row (`id` is the key as PostgreSQL prints it).
        let bound = crate::crypto::envelope::is_row_bound(&stored).then_some(id);
        let (key, plain) = self
            .keys
            .open(self.manager, self.spec, bound, &stored)
            .await?;
        // The same key it was under: a per-context value never moves to another context.
        let fresh = self
            .manager
            .encrypt_named(self.spec, key, bound, &plain)
            .await?;
        Ok(self
            .db
            .execute(self.update, &[&fresh, &id, &stored])
            .await? as i64)
    }
}
