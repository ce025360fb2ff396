//! The keys of one encrypted column as the batch tools see them: for a column without a key
//! context its configured key; for a per-tenant column (`context_claim`) every per-context
//! key name found in pgward's own tables (`pgward.data_keys`, `pgward.index_roots`), never
//! the tenant values themselves. A stored value names its key by the key id in its header,
//! so each value is mapped to its own context's key and handled under that key only.
use std::collections::{BTreeSet, HashMap, HashSet};

use super::OpsError;
use crate::crypto::envelope::{key_name_id, peek_key_ref, KeyRef};
use crate::crypto::error::{CryptoError, KeyFailure};
use crate::crypto::manager::{ColumnSpec, KeyManager, NamedKey};
use crate::crypto::scope::is_context_key_name;

/// The configured keys (`[[encrypt]] key`) of per-tenant columns, sorted, each once: the bases
/// of the per-context key names [`context_key_names`] finds.
pub(super) fn per_tenant_key_bases(manager: &KeyManager) -> Vec<String> {
    let mut bases: Vec<String> = manager
        .columns()
        .filter(|s| s.column.context_claim.is_some())
        .map(|s| s.column.key.clone())
        .collect();
    bases.sort();
    bases.dedup();
    bases
}

/// The per-context key names of configured key `base` in pgward's tables: (live, destroyed).
/// Live names are those with a stored data key or index root that were not shredded.
pub(super) async fn context_key_names(
    db: &tokio_postgres::Client,
    base: &str,
) -> Result<(Vec<String>, Vec<String>), OpsError> {
    let prefix = format!("{base}-t");
    let rows = db
        .query(
            "SELECT key_name FROM pgward.data_keys WHERE starts_with(key_name, $1) \
             UNION SELECT key_name FROM pgward.index_roots WHERE starts_with(key_name, $1)",
            &[&prefix],
        )
        .await?;
    let mut live = BTreeSet::new();
    for row in &rows {
        let name: String = row.try_get(0)?;
        if is_context_key_name(base, &name) {
            live.insert(name);
        }
    }
    let rows = db
        .query(
            "SELECT key_name FROM pgward.destroyed_keys WHERE configured_key = $1",
            &[&base],
        )
        .await?;
    let mut destroyed = Vec::new();
    for row in &rows {
        let name: String = row.try_get(0)?;
        // A shred that stopped half-way may have left wrapped keys: shredded all the same.
        live.remove(&name);
        destroyed.push(name);
    }
    destroyed.sort();
    Ok((live.into_iter().collect(), destroyed))
}

/// The batch tools handle per-tenant columns only where the per-context key names are in
/// pgward's tables, i.e. with the transit provider.
pub(super) fn require_discoverable(
    manager: &KeyManager,
    spec: &ColumnSpec,
) -> Result<(), OpsError> {
    let kind = manager.provider().kind();
    if spec.column.context_claim.is_some() && kind != "transit" {
        return Err(OpsError::Schema(format!(
            "{}.{} has per-tenant keys (context_claim); the batch tools find them in pgward.data_keys, which only keys.provider = \"transit\" uses (this configuration uses {kind:?})",
            spec.table, spec.column.column
        )));
    }
    Ok(())
}

/// The keys of one column by header key id.
#[derive(Debug)]
pub(super) struct ColumnKeys {
    /// Usually one key per id; two per-context names whose 32-bit ids collide are both
    /// kept, and the one whose data key authenticates the value is its key.
    by_id: HashMap<u32, Vec<NamedKey>>,
    /// Key ids of shredded contexts: values under them are gone for good.
    destroyed: HashSet<u32>,
}

impl ColumnKeys {
    /// The column's keys: its configured key, or every live per-context key of its key.
    pub async fn load(
        manager: &KeyManager,
        db: &tokio_postgres::Client,
        spec: &ColumnSpec,
    ) -> Result<Self, OpsError> {
        require_discoverable(manager, spec)?;
        let mut keys = ColumnKeys {
            by_id: HashMap::new(),
            destroyed: HashSet::new(),
        };
        if spec.column.context_claim.is_none() {
            keys.add(manager.named_key(spec, &spec.column.key)?);
            return Ok(keys);
        }
        let (live, destroyed) = context_key_names(db, &spec.column.key).await?;
        for name in &live {
            keys.add(manager.named_key(spec, name)?);
        }
        keys.destroyed = destroyed.iter().map(|n| key_name_id(n)).collect();
        Ok(keys)
    }

    fn add(&mut self, key: NamedKey) {
        self.by_id.entry(key.key_id()).or_default().push(key);
    }

    /// Every key (for their current data keys and index roots).
    pub fn keys(&self) -> impl Iterator<Item = &NamedKey> {
        self.by_id.values().flatten()
    }

    /// Forget a key that turned out to be shredded while the job ran.
    pub fn mark_destroyed(&mut self, key: &NamedKey) {
        if let Some(keys) = self.by_id.get_mut(&key.key_id()) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_id.remove(&key.key_id());
            }
        }
        self.destroyed.insert(key.key_id());
    }

    /// Header bytes 1..9 (`substring(col from 2 for 8)`) of values under each key's newest
    /// data key, creating it where the KEK was rotated. A context shredded meanwhile is
    /// forgotten (its values are skipped); any other failure stops the job.
    pub async fn current_headers(
        &mut self,
        manager: &KeyManager,
    ) -> Result<Vec<Vec<u8>>, OpsError> {
        let mut headers = Vec::new();
        let keys: Vec<NamedKey> = self.keys().cloned().collect();
        for key in keys {
            match manager.current_key_ref(key.name()).await {
                Ok(key_ref) => headers.push(key_ref.to_bytes().to_vec()),
                Err(e) if destroyed(&e) => self.mark_destroyed(&key),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(headers)
    }

    /// Decrypt `stored` under its own key: (that key, canonical plaintext). A value under no
    /// known key (a shredded context, another key, not a ciphertext) is unreadable.
    pub async fn open<'a>(
        &'a self,
        manager: &KeyManager,
        spec: &ColumnSpec,
        row: Option<&str>,
        stored: &[u8],
    ) -> Result<(&'a NamedKey, zeroize::Zeroizing<Vec<u8>>), CryptoError> {
        let key_ref = peek_key_ref(stored)?;
        let candidates = self.candidates(key_ref)?;
        let mut last = None;
        for key in candidates {
            match manager.decrypt_named(spec, key, row, stored).await {
                Ok(plain) => return Ok((key, zeroize::Zeroizing::new(plain))),
                Err(e @ CryptoError::Integrity { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(CryptoError::KeyUnavailable(KeyFailure::UnknownVersion)))
    }

    fn candidates(&self, key_ref: KeyRef) -> Result<&[NamedKey], CryptoError> {
        if let Some(keys) = self.by_id.get(&key_ref.key_id) {
            return Ok(keys);
        }
        Err(CryptoError::KeyUnavailable(
            if self.destroyed.contains(&key_ref.key_id) {
                KeyFailure::Destroyed
            } else {
                KeyFailure::UnknownVersion
            },
        ))
    }
}

/// The key was shredded (`pgward.destroyed_keys`), as the key manager reports it.
fn destroyed(e: &CryptoError) -> bool {
    matches!(
        e,
        CryptoError::KeyUnavailable(KeyFailure::Destroyed)
            | CryptoError::Key(crate::keys::KeyError::Destroyed { .. })
    )
}
