//! Per-tenant keys in the key manager: which key name serves a column in a session, the
//! per-context names in use, and loading a session's keys before its first statement.
use std::borrow::Cow;
use std::sync::Arc;

use super::{ColumnSpec, KeyManager};
use crate::crypto::blind::BIDX_LEN;
use crate::crypto::envelope::{key_name_id, KeyRef};
use crate::crypto::error::CryptoError;
use crate::crypto::scope::{is_context_key_name, KeyScope};

/// A key named explicitly instead of selected by a session's claims: what the batch tools
/// use. They find per-context key names in pgward's own tables, never the claim values, and
/// hold one of these per name; a value is decrypted and re-encrypted under the same one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedKey {
    name: Arc<str>,
    key_id: u32,
}

impl NamedKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key id the headers of values under this key carry.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    fn resolved(&self) -> ResolvedKey<'_> {
        ResolvedKey {
            name: KeyNameRef::Context(Cow::Borrowed(&self.name)),
            key_id: self.key_id,
        }
    }
}

/// A key name: the configured one, or a per-context one derived for the session.
pub(crate) enum KeyNameRef<'a> {
    Configured(&'a str),
    Context(Cow<'a, str>),
}

impl std::ops::Deref for KeyNameRef<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            KeyNameRef::Configured(s) => s,
            KeyNameRef::Context(s) => s,
        }
    }
}

/// The key serving one column in one session, with the key id its ciphertexts carry.
pub(crate) struct ResolvedKey<'a> {
    pub name: KeyNameRef<'a>,
    pub key_id: u32,
}

impl ResolvedKey<'_> {
    /// A stored value must name this key: a value of another tenant (another per-context
    /// key) or another key name is refused before any key is fetched for it.
    pub fn expect(&self, spec: &ColumnSpec, found: KeyRef) -> Result<(), CryptoError> {
        if found.key_id == self.key_id {
            return Ok(());
        }
        Err(CryptoError::WrongKey {
            table: spec.table.clone(),
            column: spec.column.column.clone(),
            found: found.key_id,
            expected: self.key_id,
        })
    }
}

impl KeyManager {
    /// The key serving `spec` for a session with `scope`. Fails closed (no key at all) when
    /// the column has a `context_claim` the session's token does not carry.
    pub(crate) fn resolve<'a>(
        &self,
        spec: &'a ColumnSpec,
        scope: &'a KeyScope,
    ) -> Result<ResolvedKey<'a>, CryptoError> {
        let Some(claim) = &spec.column.context_claim else {
            return Ok(ResolvedKey {
                name: KeyNameRef::Configured(&spec.column.key),
                key_id: spec.key_id,
            });
        };
        let (name, key_id, first_use) =
            scope.context_key(&spec.column.key, claim).ok_or_else(|| {
                CryptoError::NoKeyContext {
                    table: spec.table.clone(),
                    column: spec.column.column.clone(),
                    claim: claim.clone(),
                }
            })?;
        if first_use && !self.contexts.read().contains_key(&*name) {
            self.contexts
                .write()
                .insert(name.to_string(), spec.column.key.clone());
        }
        Ok(ResolvedKey {
            name: KeyNameRef::Context(name),
            key_id,
        })
    }

    /// The key `name` of column `spec`: its configured key name, or, for a per-context column,
    /// a name of the form [`crate::crypto::scope::context_key_name`] gives for its key (the
    /// context itself stays unknown). A per-context name is then served like one a session
    /// selected: its index keys are derived for the column and it is polled.
    pub fn named_key(&self, spec: &ColumnSpec, name: &str) -> Result<NamedKey, CryptoError> {
        let valid = match spec.column.context_claim {
            None => name == spec.column.key,
            Some(_) => is_context_key_name(&spec.column.key, name),
        };
        if !valid {
            return Err(CryptoError::Config(format!(
                "{name:?} is not a key of {}.{} (key {:?})",
                spec.table, spec.column.column, spec.column.key
            )));
        }
        if spec.column.context_claim.is_some() && !self.contexts.read().contains_key(name) {
            self.contexts
                .write()
                .insert(name.to_string(), spec.column.key.clone());
        }
        Ok(NamedKey {
            name: Arc::from(name),
            key_id: key_name_id(name),
        })
    }

    /// Encrypt a canonical plaintext of `spec` under the newest DEK of `key`, bound to the
    /// row whose primary key has the canonical text `row` when given.
    pub async fn encrypt_named(
        &self,
        spec: &ColumnSpec,
        key: &NamedKey,
        row: Option<&str>,
        canonical: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal_with(spec, &key.resolved(), row, canonical).await
    }

    /// Decrypt a stored value of `spec` that must be under `key` (`WrongKey` otherwise),
    /// read from the row `row` (needed for a row-bound value).
    pub async fn decrypt_named(
        &self,
        spec: &ColumnSpec,
        key: &NamedKey,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let result = self.open_with(spec, &key.resolved(), row, ciphertext).await;
        self.count_integrity(result)
    }

    /// The blind index a value of searchable `spec` written now under `key` gets.
    pub async fn blind_index_named(
        &self,
        spec: &ColumnSpec,
        key: &NamedKey,
        canonical: &[u8],
    ) -> Result<[u8; BIDX_LEN], CryptoError> {
        let spec = self.searchable_column(&spec.table, &spec.column.column)?;
        let keys = self.index_key(spec, key.name()).await?;
        Ok(keys.write.compute(spec.column.ty, canonical)?)
    }

    /// Every key name the poller maintains: the configured names of columns without a
    /// context, then the per-context names used so far.
    pub(crate) fn polled_key_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.key_names.iter().cloned().collect();
        names.extend(self.contexts.read().keys().cloned());
        names
    }

    /// The columns whose keys `key_name` serves.
    pub(crate) fn specs_of_key<'a>(
        &'a self,
        key_name: &str,
    ) -> impl Iterator<Item = &'a ColumnSpec> + 'a {
        let (base, per_context) = match self.contexts.read().get(key_name) {
            Some(base) => (base.clone(), true),
            None => (key_name.to_string(), false),
        };
        self.columns().filter(move |s| {
            s.column.key == base && s.column.context_claim.is_some() == per_context
        })
    }

    /// Load the per-context keys of a new session (write DEK, index keys) so its first
    /// statement does not wait for Vault and SQL literals, which are encrypted without
    /// waiting, find them cached. Errors are returned per key, not fatal: statements
    /// needing a missing key fail closed.
    pub async fn prefetch_scope(&self, scope: &KeyScope) -> Vec<CryptoError> {
        let mut errors = Vec::new();
        for spec in self.columns().filter(|s| s.column.context_claim.is_some()) {
            let name = match self.resolve(spec, scope) {
                Ok(key) => key.name,
                // A session without the claim cannot use the column; it is refused there.
                Err(_) => continue,
            };
            if self.cache.current(&name, self.policy.ttl).is_none() {
                if let Err(e) = self.current_key_ref(&name).await {
                    errors.push(e);
                    continue;
                }
            }
            if spec.column.searchable {
                if let Err(e) = self.index_key(spec, &name).await {
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// Count a refusal of a value that names the wrong key (`pgward_integrity_failures_total`).
    pub(crate) fn count_integrity_err(&self, e: CryptoError) -> CryptoError {
        match self.count_integrity(Err(e)) {
            Err(e) => e,
            Ok(_) => CryptoError::Encrypt,
        }
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

    fn manager() -> KeyManager {
        let col = |column: &str, claim: Option<&str>| EncryptColumn {
            table: "customers".into(),
            column: column.into(),
            key: "pii".into(),
            ty: ClientType::Text,
            searchable: true,
            context_claim: claim.map(String::from),
            bind_primary_key: false,
        };
        let provider = Arc::new(LocalProvider::from_key(SecretKey::from_bytes([9; 32])));
        KeyManager::new(
            provider,
            None,
            &[col("email", Some("tenant_id")), col("note", None)],
            CachePolicy {
                ttl: Duration::from_secs(60),
                max_stale: Duration::from_secs(60),
                blocking_threshold: 64 * 1024,
            },
        )
        .unwrap()
    }

    fn tenant(t: &str) -> KeyScope {
        KeyScope::with([("tenant_id".to_string(), t.to_string())])
    }

    #[tokio::test]
    async fn a_value_of_another_tenant_fails_integrity() {
        let m = manager();
        let (one, two) = (tenant("1"), tenant("2"));
        let ct = m
            .encrypt("customers", "email", &two, b"b@two")
            .await
            .unwrap();
        assert_eq!(
            m.decrypt("customers", "email", &two, &ct).await.unwrap(),
            b"b@two"
        );
        assert!(matches!(
            m.decrypt("customers", "email", &one, &ct).await,
            Err(CryptoError::WrongKey { .. })
        ));
        assert!(matches!(
            m.try_decrypt_now("customers", "email", &one, &ct),
            Some(Err(CryptoError::WrongKey { .. }))
        ));
        // The per-tenant key is not the column's configured key either.
        assert!(m.decrypt("customers", "note", &two, &ct).await.is_err());
    }

    #[tokio::test]
    async fn blind_indexes_differ_per_tenant_and_need_the_claim() {
        let m = manager();
        let a = m
            .blind_index("customers", "email", &tenant("1"), b"x")
            .await
            .unwrap();
        let b = m
            .blind_index("customers", "email", &tenant("2"), b"x")
            .await
            .unwrap();
        assert_ne!(a, b, "equal values must not link across tenants");
        assert_eq!(
            a,
            m.blind_index("customers", "email", &tenant("1"), b"x")
                .await
                .unwrap()
        );
        let none = KeyScope::default();
        assert!(matches!(
            m.encrypt("customers", "email", &none, b"x").await,
            Err(CryptoError::NoKeyContext { .. })
        ));
        assert!(matches!(
            m.blind_index_now("customers", "email", &none, b"x"),
            Err(CryptoError::NoKeyContext { .. })
        ));
        // Columns without a context do not need the claim.
        assert!(m.encrypt("customers", "note", &none, b"x").await.is_ok());
    }

    #[tokio::test]
    async fn a_sessions_keys_are_loaded_for_literals_and_polled() {
        let m = manager();
        let one = tenant("1");
        assert!(m.prefetch_scope(&one).await.is_empty());
        let ct = m.encrypt_now("customers", "email", &one, b"lit").unwrap();
        assert!(m
            .blind_index_now("customers", "email", &one, b"lit")
            .is_ok());
        assert_eq!(
            m.decrypt("customers", "email", &one, &ct).await.unwrap(),
            b"lit"
        );
        let polled = m.polled_key_names();
        assert!(polled.contains(&"pii".to_string()));
        assert!(polled.iter().any(|n| n.starts_with("pii-t")), "{polled:?}");
    }
}
