//! The AES-256-GCM envelope: header layout, associated data, seal and open.
//!
//! See the module docs of [`crate::crypto`] for the byte format.
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::error::CryptoError;
use crate::keys::SecretKey;

/// Format version byte of an envelope bound to its table and column.
pub const FORMAT_V1: u8 = 0x01;
/// Format version byte of a row-bound envelope: bound to table, column *and* the row's
/// primary key (its canonical text), which the associated data then carries too.
pub const FORMAT_ROW_BOUND: u8 = 0x02;
/// Header length: version (1) + key name id (4) + DEK version (4) + nonce (12).
pub const HEADER_LEN: usize = 1 + 4 + 4 + NONCE_LEN;
/// AES-GCM nonce length (96 bits, the size GCM is specified for).
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length (full 128 bits; no truncation).
pub const TAG_LEN: usize = 16;
/// Bytes added to every plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// The 32-bit identifier of a key name carried in every header.
///
/// Derived (first four bytes of SHA-256 over a label and the name) rather than
/// allocated, so every proxy instance agrees without coordination; collisions
/// between configured names are rejected when the configuration is loaded.
pub fn key_name_id(key_name: &str) -> u32 {
    let digest = Sha256::new()
        .chain_update(b"pgward/key-name/v1\0")
        .chain_update(key_name.as_bytes())
        .finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The key identity stored in a ciphertext header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub key_id: u32,
    pub dek_version: u32,
}

impl KeyRef {
    /// The 8 bytes (`key_id || dek_version`, big-endian) at offset 1 of the header:
    /// what SQL `substring(col from 2 for 8)` returns, used to count rows per DEK.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.key_id.to_be_bytes());
        out[4..].copy_from_slice(&self.dek_version.to_be_bytes());
        out
    }
}

/// Read the key identity from a stored value without decrypting it.
pub fn peek_key_ref(ciphertext: &[u8]) -> Result<KeyRef, CryptoError> {
    if ciphertext.len() < OVERHEAD {
        return Err(CryptoError::Malformed("shorter than header and tag"));
    }
    if ciphertext[0] != FORMAT_V1 && ciphertext[0] != FORMAT_ROW_BOUND {
        return Err(CryptoError::Malformed("unknown format version"));
    }
    let key_id = u32::from_be_bytes([ciphertext[1], ciphertext[2], ciphertext[3], ciphertext[4]]);
    let dek_version =
        u32::from_be_bytes([ciphertext[5], ciphertext[6], ciphertext[7], ciphertext[8]]);
    Ok(KeyRef {
        key_id,
        dek_version,
    })
}

/// Whether a stored value is row-bound (format [`FORMAT_ROW_BOUND`]): opening it needs the
/// primary key of the row it was written for.
pub fn is_row_bound(ciphertext: &[u8]) -> bool {
    ciphertext.first() == Some(&FORMAT_ROW_BOUND)
}

/// A data key ready for use: the expanded AES key schedule plus its identity.
///
/// Building the cipher once per DEK (not per value) keeps the key schedule off the
/// per-value path. The `aes` crate zeroises its round keys on drop.
pub struct Dek {
    cipher: Aes256Gcm,
    key_ref: KeyRef,
    /// Values sealed since the key manager last collected the count (see
    /// [`Dek::take_encryptions`]): random 96-bit nonces allow a bounded number per key.
    encryptions: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dek")
            .field("key_ref", &self.key_ref)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Dek {
    pub fn new(key: &SecretKey, key_ref: KeyRef) -> Self {
        let cipher = Aes256Gcm::new(key.as_bytes().into());
        Dek {
            cipher,
            key_ref,
            encryptions: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Values sealed since the last call (the counter restarts at zero).
    pub fn take_encryptions(&self) -> u64 {
        self.encryptions
            .swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Give back a count that could not be recorded, to be collected again later.
    pub fn restore_encryptions(&self, n: u64) {
        self.encryptions
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn key_ref(&self) -> KeyRef {
        self.key_ref
    }

    /// Encrypt `plaintext` bound to `table` and `column`.
    pub fn seal(
        &self,
        table: &str,
        column: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.seal_row(table, column, None, plaintext)
    }

    /// Encrypt `plaintext` bound to `table`, `column` and, with `row` (the canonical text of
    /// the row's primary key), to that row: the value is then row-bound
    /// ([`FORMAT_ROW_BOUND`]) and opens only with the same key text.
    pub fn seal_row(
        &self,
        table: &str,
        column: &str,
        row: Option<&str>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        out.push(if row.is_some() {
            FORMAT_ROW_BOUND
        } else {
            FORMAT_V1
        });
        out.extend_from_slice(&self.key_ref.to_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        // A fresh random nonce per value: the OS CSPRNG via rand's thread RNG (reseeded ChaCha).
        rand::thread_rng().fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        let aad = associated_data(&out[..HEADER_LEN], table, column, row);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[HEADER_LEN..])
            .map_err(|_| CryptoError::Encrypt)?;
        out.extend_from_slice(&tag);
        self.encryptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// Decrypt a value produced by [`Dek::seal`] for the same table and column.
    pub fn open(
        &self,
        table: &str,
        column: &str,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.open_row(table, column, None, ciphertext)
    }

    /// Decrypt a value of `table.column` read from the row whose primary key has the
    /// canonical text `row` (`None`: not known). A row-bound value needs `row` and opens only
    /// with the key text it was sealed with; a value sealed without a row ignores `row`.
    pub fn open_row(
        &self,
        table: &str,
        column: &str,
        row: Option<&str>,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let found = peek_key_ref(ciphertext)?;
        let integrity = || CryptoError::Integrity {
            table: table.to_string(),
            column: column.to_string(),
        };
        if found != self.key_ref {
            return Err(integrity());
        }
        let row = if is_row_bound(ciphertext) {
            Some(row.ok_or_else(|| CryptoError::RowKeyMissing {
                table: table.to_string(),
                column: column.to_string(),
            })?)
        } else {
            None
        };
        let (header, rest) = ciphertext.split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let aad = associated_data(header, table, column, row);
        let mut buf = body.to_vec();
        let nonce = Nonce::from_slice(&header[9..HEADER_LEN]);
        match self
            .cipher
            .decrypt_in_place_detached(nonce, &aad, &mut buf, Tag::from_slice(tag))
        {
            Ok(()) => Ok(buf),
            Err(_) => Err(integrity()),
        }
    }
}

/// Associated data: the whole header, then the length-prefixed table and column names, then
/// (row-bound values only) the length-prefixed canonical text of the row's primary key.
///
/// Length prefixes keep (`ab`, `c`) and (`a`, `bc`) distinct; including the header
/// authenticates the version (and so the row binding: a row-bound value relabelled as
/// unbound fails) and key identity on top of GCM's own nonce binding.
pub fn associated_data(header: &[u8], table: &str, column: &str, row: Option<&str>) -> Vec<u8> {
    let row_len = row.map_or(0, |r| r.len() + 4);
    let mut aad = Vec::with_capacity(header.len() + 8 + table.len() + column.len() + 16 + row_len);
    aad.extend_from_slice(b"pgward/v1");
    aad.extend_from_slice(header);
    aad.extend_from_slice(&(table.len() as u32).to_be_bytes());
    aad.extend_from_slice(table.as_bytes());
    aad.extend_from_slice(&(column.len() as u32).to_be_bytes());
    aad.extend_from_slice(column.as_bytes());
    if let Some(row) = row {
        aad.extend_from_slice(&(row.len() as u32).to_be_bytes());
        aad.extend_from_slice(row.as_bytes());
    }
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dek(version: u32) -> Dek {
        Dek::new(
            &SecretKey::from_bytes([7u8; 32]),
            KeyRef {
                key_id: key_name_id("k"),
                dek_version: version,
            },
        )
    }

    #[test]
    fn layout_is_as_documented() {
        let ct = dek(3).seal("public.t", "c", b"hello").unwrap();
        assert_eq!(ct.len(), 5 + OVERHEAD);
        assert_eq!(ct[0], FORMAT_V1);
        assert_eq!(&ct[1..5], &key_name_id("k").to_be_bytes());
        assert_eq!(&ct[5..9], &3u32.to_be_bytes());
    }

    #[test]
    fn debug_hides_key() {
        let s = format!("{:?} {:?}", dek(1), SecretKey::from_bytes([0xAB; 32]));
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("abab"),
            "{s}"
        );
    }

    #[test]
    fn nonces_differ() {
        let d = dek(1);
        assert_ne!(
            d.seal("t", "c", b"x").unwrap(),
            d.seal("t", "c", b"x").unwrap()
        );
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let d = dek(1);
            let ct = d.seal("public.t", "c", &data).unwrap();
            prop_assert_eq!(d.open("public.t", "c", &ct).unwrap(), data);
        }

        #[test]
        fn any_flipped_byte_fails(data in proptest::collection::vec(any::<u8>(), 0..256), idx in any::<prop::sample::Index>(), bit in 0u8..8) {
            let d = dek(1);
            let mut ct = d.seal("public.t", "c", &data).unwrap();
            let i = idx.index(ct.len());
            ct[i] ^= 1 << bit;
            prop_assert!(d.open("public.t", "c", &ct).is_err());
        }

        #[test]
        fn binding_is_enforced(data in proptest::collection::vec(any::<u8>(), 0..64), other in "[a-z]{1,8}") {
            let d = dek(1);
            let ct = d.seal("public.t", "c", &data).unwrap();
            prop_assume!(other != "c" && other != "t");
            let moved_column = d.open("public.t", &other, &ct);
            let moved_table = d.open(&format!("public.{other}"), "c", &ct);
            prop_assert!(matches!(moved_column, Err(CryptoError::Integrity { .. })), "moved column decrypted");
            prop_assert!(matches!(moved_table, Err(CryptoError::Integrity { .. })), "moved table decrypted");
            // Splitting the names differently must not collide either.
            prop_assert!(d.open("public.tc", "", &ct).is_err());
        }

        #[test]
        fn row_bound_round_trip(data in proptest::collection::vec(any::<u8>(), 0..512), pk in "[0-9a-z-]{0,40}") {
            let d = dek(1);
            let ct = d.seal_row("public.t", "c", Some(&pk), &data).unwrap();
            prop_assert_eq!(ct[0], FORMAT_ROW_BOUND);
            prop_assert!(is_row_bound(&ct));
            prop_assert_eq!(peek_key_ref(&ct).unwrap(), d.key_ref());
            prop_assert_eq!(d.open_row("public.t", "c", Some(&pk), &ct).unwrap(), data.clone());
            // An unbound value ignores the row it is read from (the documented gap).
            let unbound = d.seal_row("public.t", "c", None, &data).unwrap();
            prop_assert_eq!(unbound[0], FORMAT_V1);
            prop_assert_eq!(d.open_row("public.t", "c", Some(&pk), &unbound).unwrap(), data.clone());
            prop_assert_eq!(d.open_row("public.t", "c", None, &unbound).unwrap(), data);
        }

        #[test]
        fn row_binding_is_enforced(
            data in proptest::collection::vec(any::<u8>(), 0..64),
            pk in "[0-9]{1,12}",
            other_pk in "[0-9]{1,12}",
            other in "[a-z]{1,8}",
        ) {
            prop_assume!(pk != other_pk && other != "c" && other != "t");
            let d = dek(1);
            let ct = d.seal_row("public.t", "c", Some(&pk), &data).unwrap();
            let integrity = |r: Result<Vec<u8>, CryptoError>| matches!(r, Err(CryptoError::Integrity { .. }));
            // Another row, column, table or key context (another tenant's key id) fails.
            prop_assert!(integrity(d.open_row("public.t", "c", Some(&other_pk), &ct)), "moved row decrypted");
            prop_assert!(integrity(d.open_row("public.t", &other, Some(&pk), &ct)), "moved column decrypted");
            prop_assert!(integrity(d.open_row(&format!("public.{other}"), "c", Some(&pk), &ct)), "moved table decrypted");
            let tenant = Dek::new(&SecretKey::from_bytes([7u8; 32]), KeyRef { key_id: key_name_id("k-t1"), dek_version: 1 });
            prop_assert!(tenant.open_row("public.t", "c", Some(&pk), &ct).is_err(), "another key context decrypted");
            // The pk text is length-prefixed: it cannot borrow bytes from the column name.
            let borrowed = format!("c{}", pk);
            prop_assert!(d.open_row("public.t", "", Some(&borrowed), &ct).is_err());
            // Without the row it cannot be verified, so it is not opened.
            let missing = d.open_row("public.t", "c", None, &ct);
            let is_missing = matches!(missing, Err(CryptoError::RowKeyMissing { .. }));
            prop_assert!(is_missing, "opened without its row");
            // Stripping the flag (relabelling as unbound) fails, with or without a row...
            let mut stripped = ct.clone();
            stripped[0] = FORMAT_V1;
            prop_assert!(integrity(d.open_row("public.t", "c", None, &stripped)));
            prop_assert!(integrity(d.open_row("public.t", "c", Some(&pk), &stripped)));
            // ...and so does setting it on an unbound value.
            let mut flagged = d.seal_row("public.t", "c", None, &data).unwrap();
            flagged[0] = FORMAT_ROW_BOUND;
            prop_assert!(integrity(d.open_row("public.t", "c", Some(&pk), &flagged)));
            prop_assert!(integrity(d.open_row("public.t", "c", Some(""), &flagged)));
        }

        #[test]
        fn changed_key_identity_fails(data in proptest::collection::vec(any::<u8>(), 0..64), v in 2u32..1000) {
            let d1 = dek(1);
            let mut ct = d1.seal("t", "c", &data).unwrap();
            // Relabel the header to another DEK version: the same key must reject it (AAD covers the header)...
            ct[5..9].copy_from_slice(&v.to_be_bytes());
            prop_assert!(d1.open("t", "c", &ct).is_err());
            // ...and so must the key of that version, even though the header now names it.
            prop_assert!(dek(v).open("t", "c", &ct).is_err());
        }
    }
}
