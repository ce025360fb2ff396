//! `pgward keys shred`: crypto-shredding one tenant's data key, and the list of destroyed
//! keys `keys status` reports.
use super::OpsError;
use crate::crypto::manager::KeyManager;
use crate::crypto::scope::context_key_name;

/// What `keys shred` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShredReport {
    /// The per-context key name that was destroyed.
    pub key_name: String,
    /// Wrapped data keys deleted from `pgward.data_keys`.
    pub wrapped_deleted: u64,
}

/// A destroyed key name, for `keys status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestroyedKey {
    pub key_name: String,
    pub configured_key: String,
    pub reason: String,
    /// `destroyed_at` as PostgreSQL prints it.
    pub since: String,
}

/// Destroy the data key of one context of `key` so its values can never be decrypted again.
///
/// Order matters: the tombstone first (every pgward stops serving the name at its next poll,
/// and if a later step fails the name stays closed), then the KEK in Vault (what makes every
/// copy of the wrapped DEKs, in backups too, useless), then the wrapped DEKs themselves.
pub async fn keys_shred(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    key: &str,
    context: &str,
) -> Result<ShredReport, OpsError> {
    let per_context = manager
        .columns()
        .any(|s| s.column.key == key && s.column.context_claim.is_some());
    if !per_context {
        return Err(OpsError::Schema(format!(
            "key {key:?} has no per-tenant columns ([[encrypt]] with context_claim): nothing to shred per context"
        )));
    }
    // Only transit keeps the KEK outside the database, where destroying it reaches backups
    // (and only the transit store honours the tombstone); refuse before recording anything.
    let kind = manager.provider().kind();
    if kind != "transit" {
        return Err(OpsError::Schema(format!(
            "keys shred needs keys.provider = \"transit\" (this configuration uses {kind:?})"
        )));
    }
    let key_name = context_key_name(key, context);
    db.execute(
        "INSERT INTO pgward.destroyed_keys (key_name, configured_key, reason) VALUES ($1, $2, 'shredded') \
         ON CONFLICT (key_name) DO NOTHING",
        &[&key_name, &key],
    )
    .await?;
    manager.provider().destroy(&key_name).await?;
    let wrapped_deleted = db
        .execute(
            "DELETE FROM pgward.data_keys WHERE key_name = $1",
            &[&key_name],
        )
        .await?;
    Ok(ShredReport {
        key_name,
        wrapped_deleted,
    })
}

/// Every destroyed key name, oldest first.
pub async fn destroyed_keys(db: &tokio_postgres::Client) -> Result<Vec<DestroyedKey>, OpsError> {
    let rows = db
        .query(
            "SELECT key_name, configured_key, reason, destroyed_at::text FROM pgward.destroyed_keys ORDER BY destroyed_at, key_name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(DestroyedKey {
                key_name: r.try_get(0)?,
                configured_key: r.try_get(1)?,
                reason: r.try_get(2)?,
                since: r.try_get(3)?,
            })
        })
        .collect()
}
