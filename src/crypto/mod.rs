//! Field-level encryption for pgward.
//!
//! Each encrypted column is stored as `bytea` holding an AES-256-GCM envelope under a
//! data key (DEK); searchable columns also get `<col>_bidx bytea`, a blind index (see
//! [`blind`]). Values pass through [`codec`] first, so text- and binary-format clients
//! see the same data. Keys come from a [`crate::keys::KeyProvider`] through
//! [`manager::KeyManager`].
//!
//! # Ciphertext byte format (versions 1 and 2)
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 0x01 (unbound), 0x02 (row-bound: `bind_primary_key`)
//! 1       4     key name id, u32 big-endian = first 4 bytes of SHA-256("pgward/key-name/v1\0" || key name)
//! 5       4     DEK version, u32 big-endian (>= 1; 0 is reserved for the blind-index root key)
//! 9       12    nonce, 96 random bits from the OS-seeded CSPRNG, fresh for every value
//! 21      n     AES-256-GCM ciphertext of the canonical plaintext (same length as the plaintext)
//! 21+n    16    GCM tag (128 bits, untruncated)
//! ```
//!
//! Overhead: 37 bytes per value. Associated data (authenticated, not stored):
//!
//! ```text
//! "pgward/v1" || header (bytes 0..21) || u32be(len(table)) || table || u32be(len(column)) || column
//! ```
//!
//! and for a row-bound value (version 0x02) additionally
//!
//! ```text
//! ... || u32be(len(pk)) || pk
//! ```
//!
//! where `pk` is the canonical text of the row's primary key, as PostgreSQL prints it
//! (`crypto::sql::PkType`). The version byte is in the header, so stripping the binding
//! (0x02 → 0x01) or adding one fails authentication. Opening a row-bound value needs the
//! row's key (the relay gets it from a column the SQL transform adds, see
//! `crypto::sql::rowkey`); without it the value is not returned
//! ([`CryptoError::RowKeyMissing`]). Unbound values ignore the row they are read from.
//!
//! where `table` is schema-qualified (`public.users`). Consequences:
//! * a value copied into another column or table fails to decrypt ([`CryptoError::Integrity`]);
//!   a row-bound value also when copied into another row of its table;
//!   renaming an encrypted column or table therefore needs a re-encryption;
//! * editing the version, key id or DEK version bytes fails authentication;
//! * an integrity failure is always an error, never a plaintext fallback.
//!
//! Both versions share the layout, so bytes 1..9 (`substring(col from 2 for 8)` in SQL) identify the DEK, which lets
//! `keys status` count rows per DEK and `keys reencrypt` find rows under old DEKs
//! without decrypting anything.
//!
//! Nonce budget: random 96-bit nonces are safe for about 2^32 values per DEK; a new
//! DEK is created on every KEK rotation (and with `KeyManager::rotate_dek`), so rotate
//! the KEK well before a key name has encrypted a few billion values.
//!
//! Key material (`SecretKey`, expanded AES keys, HMAC keys) is zeroised on drop and
//! printed as `<redacted>` by `Debug`. Nothing here logs keys or plaintext.
pub mod blind;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod error;
mod keycache;
pub mod manager;
pub mod ops;
mod providers;
pub mod scope;
pub mod sql;

pub use blind::{IndexKey, BIDX_LEN};
pub use codec::{decode_to_wire, encode_for_encryption, ClientType, WireFormat};
pub use config::{CryptoConfig, EncryptColumn, KeysConfig, ProviderKind, VaultConfig};
pub use envelope::{key_name_id, peek_key_ref, KeyRef, OVERHEAD};
pub use error::{CodecError, CryptoError, KeyFailure};
pub use manager::KeyManager;
