//! `keys status` of per-tenant keys: one line per configured key, however many tenants —
//! how many contexts have a key of their own, how many were shredded, and where the values
//! stand (under their context's newest data key, older ones, or no known key).
use std::collections::HashMap;
use std::fmt;

use super::context_keys::{context_key_names, per_tenant_key_bases};
use super::{column_type, count_by_dek, OpsError};
use crate::crypto::envelope::{key_name_id, KeyRef};
use crate::crypto::manager::KeyManager;

/// The per-context keys of one configured key name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextKeysStatus {
    pub key_name: String,
    /// Contexts with a key stored in `pgward.data_keys` (live).
    pub contexts: usize,
    /// Contexts shredded (`keys shred`).
    pub destroyed: usize,
    /// Data keys of live contexts older than their context's newest one.
    pub older_deks: usize,
    /// Older data keys no value is left under (`keys retire`); `None` without counts.
    pub retirable_deks: Option<usize>,
    /// Values under their context's newest data key, under an older one, and under no live
    /// context's key (shredded, or unknown); `None` without counts.
    pub values: Option<(i64, i64, i64)>,
    /// Contexts whose blind-index root rotation is in progress.
    pub rotating: usize,
}

/// The status of every configured key used by per-tenant columns (transit only: other
/// providers keep no per-context keys in the database).
pub async fn context_keys_status(
    manager: &KeyManager,
    db: &tokio_postgres::Client,
    count: bool,
) -> Result<Vec<ContextKeysStatus>, OpsError> {
    if manager.provider().kind() != "transit" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for base in per_tenant_key_bases(manager) {
        let (live, destroyed) = context_key_names(db, &base).await?;
        let mut counts: Option<HashMap<KeyRef, i64>> = count.then(HashMap::new);
        for spec in manager
            .columns()
            .filter(|s| s.column.key == base && s.column.context_claim.is_some())
        {
            let Some(map) = counts.as_mut() else { break };
            // A column not encrypted yet is reported by `keys status`' own table.
            if column_type(db, &spec.table, &spec.column.column).await? != "bytea" {
                continue;
            }
            for (key_ref, n) in count_by_dek(db, spec).await? {
                *map.entry(key_ref).or_default() += n;
            }
        }
        let mut status = ContextKeysStatus {
            key_name: base.clone(),
            contexts: live.len(),
            destroyed: destroyed.len(),
            ..ContextKeysStatus::default()
        };
        let (mut current, mut older, mut retirable) = (0, 0, 0);
        for name in &live {
            let key_id = key_name_id(name);
            let deks = manager.provider().list_deks(name).await?;
            let newest = deks.iter().map(|d| d.dek_version).max();
            for d in &deks {
                let n = counts.as_ref().map_or(0, |c| {
                    c.get(&KeyRef {
                        key_id,
                        dek_version: d.dek_version,
                    })
                    .copied()
                    .unwrap_or(0)
                });
                if Some(d.dek_version) == newest {
                    current += n;
                } else {
                    status.older_deks += 1;
                    older += n;
                    retirable += usize::from(n == 0);
                }
            }
            if manager
                .provider()
                .index_root_state(name)
                .await?
                .pending
                .is_some()
            {
                status.rotating += 1;
            }
        }
        if let Some(map) = &counts {
            let total: i64 = map.values().sum();
            status.values = Some((current, older, total - current - older));
            status.retirable_deks = Some(retirable);
        }
        out.push(status);
    }
    Ok(out)
}

impl fmt::Display for ContextKeysStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} contexts with a key of their own",
            self.key_name, self.contexts
        )?;
        if self.destroyed > 0 {
            write!(f, ", {} shredded", self.destroyed)?;
        }
        if let Some((current, older, unknown)) = self.values {
            write!(
                f,
                "; {current} values under their context's newest data key"
            )?;
            if older > 0 {
                write!(f, ", {older} under older ones (`keys reencrypt`)")?;
            }
            if unknown > 0 {
                write!(
                    f,
                    ", {unknown} under no live context's key (shredded or unknown)"
                )?;
            }
        }
        if self.older_deks > 0 {
            write!(f, "; {} older data keys", self.older_deks)?;
            if let Some(n) = self.retirable_deks.filter(|n| *n > 0) {
                write!(f, ", {n} with no value left (`keys retire`)")?;
            }
        }
        if self.rotating > 0 {
            write!(
                f,
                "; blind-index root rotation in progress in {} contexts (`keys reencrypt`)",
                self.rotating
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_whatever_the_number_of_tenants() {
        let status = ContextKeysStatus {
            key_name: "pii".into(),
            contexts: 2000,
            destroyed: 1,
            older_deks: 3,
            retirable_deks: Some(2),
            values: Some((10, 4, 1)),
            rotating: 0,
        };
        assert_eq!(
            status.to_string(),
            "pii: 2000 contexts with a key of their own, 1 shredded; 10 values under their context's newest data key, \
             4 under older ones (`keys reencrypt`), 1 under no live context's key (shredded or unknown); \
             3 older data keys, 2 with no value left (`keys retire`)"
        );
    }
}
