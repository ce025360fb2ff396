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
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// How many per-context key names a session memoises (one per configured key name and
/// claim it uses; more are derived on every use, correctly but slower).
const MEMO_SLOTS: usize = 4;

/// The claim values of one session that select per-context keys. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct KeyScope {
    claims: Arc<HashMap<String, String>>,
    /// Per-context key names already derived in this session, each written once and then
    /// only read: the per-value path is an atomic load and two short string comparisons,
    /// no lock, no hashing, no allocation.
    names: Arc<[OnceLock<ContextName>; MEMO_SLOTS]>,
}

/// A derived per-context key name and its header key id, with what it was derived from.
#[derive(Debug)]
pub(crate) struct ContextName {
    base: Box<str>,
    claim: Box<str>,
    pub name: Box<str>,
    pub key_id: u32,
}

impl ContextName {
    fn derive(base: &str, claim: &str, value: &str) -> Self {
        let name = context_key_name(base, value);
        ContextName {
            base: base.into(),
            claim: claim.into(),
            key_id: super::envelope::key_name_id(&name),
            name: name.into(),
        }
    }

    fn is(&self, base: &str, claim: &str) -> bool {
        *self.base == *base && *self.claim == *claim
    }
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
    /// lacks the claim. The hit path borrows the memoised name.
    pub(crate) fn context_key(&self, base: &str, claim: &str) -> Option<(Cow<'_, str>, u32, bool)> {
        for slot in self.names.iter() {
            match slot.get() {
                Some(c) if c.is(base, claim) => {
                    return Some((Cow::Borrowed(&c.name), c.key_id, false))
                }
                Some(_) => continue,
                None => break,
            }
        }
        let mut derived = ContextName::derive(base, claim, self.claim(claim)?);
        for slot in self.names.iter() {
            // A concurrent first use may fill the slot first (with this name or another).
            match slot.set(derived) {
                Ok(()) => {
                    let c = slot.get()?;
                    return Some((Cow::Borrowed(&c.name), c.key_id, true));
                }
                Err(back) => derived = back,
            }
            match slot.get() {
                Some(c) if c.is(base, claim) => {
                    return Some((Cow::Borrowed(&c.name), c.key_id, false))
                }
                _ => continue,
            }
        }
        // Every slot holds another key: derive on each use rather than grow a shared map.
        Some((Cow::Owned(derived.name.into()), derived.key_id, true))
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

/// Whether `name` has the form [`context_key_name`] gives for `base` (`<base>-t` and 16
/// lowercase hex digits): how the batch tools recognise per-context key names in pgward's
/// tables without knowing the contexts.
pub fn is_context_key_name(base: &str, name: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix("-t"))
        .is_some_and(|hex| {
            hex.len() == 16
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
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
        assert!(is_context_key_name("pii", &a) && !is_context_key_name("pi", &a));
        assert!(
            !is_context_key_name("pii", "pii") && !is_context_key_name("pii", &a[..a.len() - 1])
        );
        assert!(!is_context_key_name("pii", "pii-t0123456789ABCDEF"));
        // The separator keeps (base, context) pairs apart.
        assert_ne!(context_key_name("pi", "i1"), context_key_name("pii", "1"));
    }

    #[test]
    fn memoised_names_are_the_derived_ones_also_beyond_the_memo() {
        let scope = KeyScope::with([("t".to_string(), "7".to_string())]);
        for round in 0..2 {
            for i in 0..MEMO_SLOTS + 2 {
                let base = format!("k{i}");
                let (name, id, first) = scope.context_key(&base, "t").unwrap();
                assert_eq!(name, context_key_name(&base, "7"));
                assert_eq!(id, crate::crypto::envelope::key_name_id(&name));
                // Memoised names are new once; the ones beyond the memo every time.
                assert_eq!(first, round == 0 || i >= MEMO_SLOTS, "{base} round {round}");
            }
        }
        assert!(scope.context_key("k0", "missing").is_none());
        // Clones share the memo (a session's scope is cloned into its halves).
        assert!(!scope.clone().context_key("k0", "t").unwrap().2);
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
