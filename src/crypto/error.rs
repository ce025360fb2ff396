//! Typed errors of the field-encryption layer.
use thiserror::Error;

use crate::keys::KeyError;

/// Why a value could not be encrypted, decrypted, indexed or converted.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// The stored bytes are too short or carry an unknown format version.
    #[error("malformed ciphertext: {0}")]
    Malformed(&'static str),
    /// Authentication failed: wrong key, wrong table/column binding, or tampered bytes.
    /// Never falls back to returning the stored bytes.
    #[error(
        "ciphertext integrity check failed for {table}.{column} (tampered, moved, or wrong key)"
    )]
    Integrity { table: String, column: String },
    /// The ciphertext names a key that is not the one configured for this column.
    #[error("ciphertext for {table}.{column} was written under key id {found:#010x}, column uses {expected:#010x}")]
    WrongKey {
        table: String,
        column: String,
        found: u32,
        expected: u32,
    },
    /// A row-bound value (`bind_primary_key`) was read where its row's primary key is not
    /// known (through a view, or a result pgward could not add the key to): it cannot be
    /// verified, so it is not returned.
    #[error("a value of {table}.{column} is bound to its row's primary key, which this result does not carry")]
    RowKeyMissing { table: String, column: String },
    /// No `[[encrypt]]` entry for this table and column.
    #[error("column {table}.{column} is not configured for encryption")]
    UnknownColumn { table: String, column: String },
    /// A blind index was requested for a column not marked `searchable`.
    #[error("column {table}.{column} is not searchable")]
    NotSearchable { table: String, column: String },
    /// The key provider could not supply a key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A value could not be converted between wire and canonical form.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// AES-GCM refused to encrypt (only possible for absurdly large inputs).
    #[error("encryption failed")]
    Encrypt,
    /// The blocking worker running a large encryption panicked or was cancelled.
    #[error("crypto worker failed: {0}")]
    Worker(String),
    /// A synchronous path (SQL literal encryption, small-value decryption) found no cached key;
    /// the key is fetched in the background and the statement fails closed meanwhile.
    /// The key name is kept for logs only: client messages never name keys.
    #[error("the data key is not available yet (is the key service reachable?)")]
    KeyNotCached { key: String },
    /// A key could not be used on the data path. Client-safe: Vault's address, paths, key
    /// names and HTTP statuses were logged where it happened and are not in this value.
    #[error("{0}")]
    KeyUnavailable(KeyFailure),
    /// A per-tenant column (`context_claim`) used by a session without that claim: there is
    /// no key to use, so nothing is written or read (fail closed).
    #[error(
        "the session's token has no {claim:?} claim, which selects the key of {table}.{column}"
    )]
    NoKeyContext {
        table: String,
        column: String,
        claim: String,
    },
    /// Invalid configuration (duplicate column, key-id collision, ...).
    #[error("invalid encryption configuration: {0}")]
    Config(String),
}

/// Why a key could not be used, in words a client may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFailure {
    /// Not cached (or cached past `dek_cache_max_stale`) and the key service cannot be reached.
    Unreachable,
    /// The key service refused pgward (revoked or expired token, permission denied).
    Refused,
    /// The key service is sealed.
    Sealed,
    /// The value names a data key version that does not exist.
    UnknownVersion,
    /// The data key was destroyed on purpose (`pgward keys shred`): the value is gone.
    Destroyed,
    /// The data key was retired (`pgward keys retire`) after every value had been moved off
    /// it: the value predates the retirement (restored from an old backup?).
    Retired,
    /// Anything else (the wrapped-key store failed, malformed key material).
    Other,
}

impl std::fmt::Display for KeyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyFailure::Unreachable => {
                "the key service is unreachable and the data key is not cached"
            }
            KeyFailure::Refused => "the key service refused access to the data key",
            KeyFailure::Sealed => "the key service is sealed",
            KeyFailure::UnknownVersion => "the value names a data key that does not exist",
            KeyFailure::Destroyed => {
                "the data key of this value was destroyed (crypto-shredded); it can never be decrypted again"
            }
            KeyFailure::Retired => {
                "the value is under a data key that was retired after every value was re-encrypted (restored from an older backup?); re-encrypting it needs that backup's data key"
            }
            KeyFailure::Other => "the data key could not be obtained",
        })
    }
}

impl KeyFailure {
    /// Classify a provider failure (whose details stay in logs).
    pub fn of(e: &KeyError) -> Self {
        use crate::keys::VaultError;
        match e {
            KeyError::Unavailable { .. } => KeyFailure::Unreachable,
            KeyError::Vault {
                source: VaultError::Sealed { .. },
                ..
            } => KeyFailure::Sealed,
            KeyError::Vault {
                source: VaultError::PermissionDenied { .. },
                ..
            } => KeyFailure::Refused,
            KeyError::UnknownDek { .. } => KeyFailure::UnknownVersion,
            KeyError::Destroyed { .. } => KeyFailure::Destroyed,
            KeyError::Retired { .. } => KeyFailure::Retired,
            _ => KeyFailure::Other,
        }
    }
}

/// Why a value could not be converted between its wire format and canonical plaintext.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid {ty} value in {format} format: {reason}")]
    Invalid {
        ty: &'static str,
        format: &'static str,
        reason: String,
    },
    #[error("unsupported client type {0:?}")]
    UnsupportedType(String),
}

impl CodecError {
    pub(crate) fn invalid(
        ty: &'static str,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        CodecError::Invalid {
            ty,
            format,
            reason: reason.into(),
        }
    }
}
