//! Per-tenant data keys: the key context of a session and the key name it selects.
//!
//! An `[[encrypt]]` column with `context_claim = "tenant_id"` is encrypted under a key of its
//! own per value of that claim. The per-context key name is the configured name plus a hash
//! of the context (`pii-t3f2a…`), never the context itself, so tenant identifiers do not
//! appear in Vault paths, in `pgward.data_keys` or in logs. Everything keyed by key name —
//! the transit KEK, the wrapped DEKs, the blind-index root, the DEK cache, blocking on a
//! refusal — is then per context without a second code path, and the ciphertext header
//! (whose key id is derived from the per-context name and is part of the AAD) binds each
//! value to its context: a value copied into another tenant's row names a key that is not
//! that tenant's and fails integrity.
use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The claim values of one session that select per-context keys. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct KeyScope {
    claims: Arc<HashMap<String, String>>,
    /// Per-context key names already derived in this session, by configured key name:
    /// (claim, key name, key id). Keeps the two hashes off the per-value path.
    names: Arc<parking_lot::Mutex<HashMap<String, Vec<ContextName>>>>,
}

/// A derived per-context key name and its header key id.
#[derive(Clone, Debug)]
pub(crate) struct ContextName {
    claim: String,
    pub name: Arc<str>,
    pub key_id: u32,
}

impl KeyScope {
    /// From a token's claims: strings as they are, numbers in their JSON form (so `7` and
    /// `"7"` select the same key); other claim types select nothing (the column fails closed).
    pub fn from_claims(claims: &serde_json::Map<String, serde_json::Value>) -> Self {
        let claims = claims
            .iter()
            .filter_map(|(k, v)| {
                let value = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((k.clone(), value))
            })
            .collect();
        KeyScope {
            claims: Arc::new(claims),
            names: Arc::default(),
        }
    }

    /// A scope with given claim values (tools and tests).
    pub fn with(claims: impl IntoIterator<Item = (String, String)>) -> Self {
        KeyScope {
            claims: Arc::new(claims.into_iter().collect()),
            names: Arc::default(),
        }
    }

    /// The per-context key of `base` selected by this session's `claim` (name, key id), and
    /// whether it was derived just now (first use in this session). `None`: the session
    /// lacks the claim. The hit path clones one `Arc`, nothing else.
    pub(crate) fn context_key(&self, base: &str, claim: &str) -> Option<(Arc<str>, u32, bool)> {
        let mut names = self.names.lock();
        if let Some(found) = names
            .get(base)
            .and_then(|v| v.iter().find(|c| c.claim == claim))
        {
            return Some((found.name.clone(), found.key_id, false));
        }
        let value = self.claim(claim)?;
        let name = context_key_name(base, value);
        let derived = ContextName {
            claim: claim.to_string(),
            key_id: super::envelope::key_name_id(&name),
            name: Arc::from(name),
        };
        let found = (derived.name.clone(), derived.key_id, true);
        names.entry(base.to_string()).or_default().push(derived);
        Some(found)
    }

    /// The value of `claim`, if the session has one.
    pub fn claim(&self, claim: &str) -> Option<&str> {
        self.claims.get(claim).map(String::as_str)
    }
}

/// The key name serving `context` of the configured key `base`: `<base>-t<16 hex digits>`,
/// the first 64 bits of SHA-256 over a label, the base name and the context. Deterministic,
/// so every instance and every tool finds the same key.
pub fn context_key_name(base: &str, context: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"pgward/key-context/v1\0")
        .chain_update(base.as_bytes())
        .chain_update([0u8])
        .chain_update(context.as_bytes())
        .finalize();
    let mut name = String::with_capacity(base.len() + 18);
    name.push_str(base);
    name.push_str("-t");
    for b in &digest[..8] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_per_context_and_hide_it() {
        let a = context_key_name("pii", "1");
        let b = context_key_name("pii", "2");
        assert_ne!(a, b);
        assert!(
            a.starts_with("pii-t") && a.len() == "pii-t".len() + 16,
            "{a}"
        );
        assert_eq!(a, context_key_name("pii", "1"));
        // The separator keeps (base, context) pairs apart.
        assert_ne!(context_key_name("pi", "i1"), context_key_name("pii", "1"));
    }

    #[test]
    fn numbers_and_strings_select_the_same_context() {
        let claims = serde_json::json!({"tenant_id": 7, "t2": "7", "roles": ["a"]});
        let scope = KeyScope::from_claims(claims.as_object().unwrap());
        assert_eq!(scope.claim("tenant_id"), Some("7"));
        assert_eq!(scope.claim("t2"), Some("7"));
        assert_eq!(scope.claim("roles"), None);
    }
}
