//! Blind index for equality search.
//!
//! `bidx = HMAC-SHA-256(column_index_key, normalise(type, canonical))[..16]`, where
//! `column_index_key = HMAC-SHA-256(index_root_key, "pgward/bidx/v1" || len||key || len||table || len||column)`.
//!
//! * The index root key is a per-key-name secret, separate from every DEK and stable
//!   across DEK/KEK rotation (otherwise equality search would break after a rotation).
//! * Deriving one key per column means equal values in two columns get unrelated
//!   indexes, so the index does not reveal cross-column equality.
//! * Truncated to [`BIDX_LEN`] = 16 bytes (128 bits): accidental collisions stay
//!   negligible (birthday bound ~2^64 values per column), so a match needs no
//!   re-check for correctness, and 16 bytes keep the index column small.
//!
//! What it leaks, by design: anyone who can read the `<col>_bidx` column learns which
//! rows hold equal values (equality) and therefore how often each value occurs
//! (frequency). For low-cardinality columns (booleans, status codes) frequency
//! analysis can recover values: mark such columns searchable only when equality
//! search is really needed. It does not reveal order, length, or the value itself
//! without the index key.
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::codec::{normalise_for_index, ClientType};
use super::error::CodecError;
use crate::keys::SecretKey;

type HmacSha256 = Hmac<Sha256>;

/// Length of a stored blind index in bytes.
pub const BIDX_LEN: usize = 16;

/// The per-column HMAC key.
pub struct IndexKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(<redacted>)")
    }
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` can only fail for fixed-key MACs.
    #[allow(clippy::expect_used)]
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

fn push_lp(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl IndexKey {
    /// Derive the index key of one column from the key name's index root key.
    pub fn derive(root: &SecretKey, key_name: &str, table: &str, column: &str) -> Self {
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(b"pgward/bidx/v1");
        push_lp(&mut info, key_name);
        push_lp(&mut info, table);
        push_lp(&mut info, column);
        let mut mac = new_mac(root.as_bytes());
        mac.update(&info);
        let derived = SecretKey::from_bytes(mac.finalize().into_bytes().into());
        IndexKey {
            mac: new_mac(derived.as_bytes()),
        }
    }

    /// The blind index of a canonical plaintext of type `ty`.
    pub fn compute(&self, ty: ClientType, canonical: &[u8]) -> Result<[u8; BIDX_LEN], CodecError> {
        let normalised = normalise_for_index(ty, canonical)?;
        let mut mac = self.mac.clone();
        mac.update(&normalised);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; BIDX_LEN];
        out.copy_from_slice(&full[..BIDX_LEN]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::codec::{encode_for_encryption, WireFormat};

    fn key(col: &str) -> IndexKey {
        IndexKey::derive(&SecretKey::from_bytes([1; 32]), "k", "public.t", col)
    }

    fn bidx(k: &IndexKey, ty: ClientType, f: WireFormat, wire: &[u8]) -> [u8; BIDX_LEN] {
        k.compute(ty, &encode_for_encryption(ty, f, wire).unwrap())
            .unwrap()
    }

    #[test]
    fn integers_match_across_formats_and_widths() {
        let k = key("c");
        let a = bidx(&k, ClientType::Int8, WireFormat::Text, b"42");
        let b = bidx(
            &k,
            ClientType::Int8,
            WireFormat::Binary,
            &42i64.to_be_bytes(),
        );
        let c = bidx(
            &k,
            ClientType::Int4,
            WireFormat::Binary,
            &42i32.to_be_bytes(),
        );
        let d = bidx(&k, ClientType::Int4, WireFormat::Text, b" 42 ");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_ne!(a, bidx(&k, ClientType::Int8, WireFormat::Text, b"43"));
    }

    #[test]
    fn text_is_exact_and_columns_differ() {
        let k = key("c");
        let a = bidx(&k, ClientType::Text, WireFormat::Text, b"Alice");
        assert_ne!(a, bidx(&k, ClientType::Text, WireFormat::Text, b"alice"));
        assert_ne!(a, bidx(&k, ClientType::Text, WireFormat::Text, b"Alice "));
        assert_eq!(
            a,
            bidx(&k, ClientType::Varchar, WireFormat::Binary, b"Alice")
        );
        assert_ne!(
            a,
            bidx(&key("d"), ClientType::Text, WireFormat::Text, b"Alice")
        );
    }

    #[test]
    fn numeric_equality_ignores_trailing_zeros() {
        let k = key("c");
        let a = bidx(&k, ClientType::Numeric, WireFormat::Text, b"1.50");
        assert_eq!(a, bidx(&k, ClientType::Numeric, WireFormat::Text, b"01.5"));
        assert_ne!(a, bidx(&k, ClientType::Numeric, WireFormat::Text, b"15"));
    }
}
