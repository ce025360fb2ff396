//! Authentication failures: what the client reads, and a fixed label for metrics.

use thiserror::Error;

use crate::error::sqlstate;

/// The verifier could not be set up (or reloaded).
#[derive(Debug, Error)]
pub enum AuthSetupError {
    #[error("auth: no key source configured (set auth.hs256_secret_file, auth.jwks_file or auth.jwks_url)")]
    NoKeySource,
    #[error("auth: reading {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("auth: invalid key material in {path}: {detail}")]
    BadKey { path: String, detail: String },
    #[error("auth: signing a token: {0}")]
    Sign(String),
}

/// Why a token was refused. Messages never contain the token.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported algorithm {0}")]
    UnsupportedAlgorithm(String),
    #[error("unknown signing key {kid:?}")]
    UnknownKey { kid: Option<String> },
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has no expiry")]
    MissingExpiry,
    #[error("token lifetime {lifetime_secs}s exceeds the maximum {max_secs}s")]
    LifetimeTooLong { lifetime_secs: i64, max_secs: u64 },
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience { expected: Vec<String> },
    #[error("token has no service identity claim {claim:?}")]
    MissingIdentityClaim { claim: String },
    #[error("user does not match the token's service")]
    IdentityMismatch {
        startup_user: String,
        token_service: String,
    },
    #[error("client certificate required")]
    ClientCertRequired,
    #[error("client certificate identity does not match")]
    ClientCertMismatch {
        cert_identity: String,
        service: String,
    },
    /// A genuine, current token refused for how it was used (another service's name, a
    /// missing or mismatched client certificate): its `jti` goes into the audit record.
    #[error("{cause}")]
    ValidTokenRefused {
        token_id: Option<String>,
        cause: Box<AuthError>,
    },
}

impl AuthError {
    /// The `jti` of a genuine token that was refused (for the audit record), if it had one.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            AuthError::ValidTokenRefused { token_id, .. } => token_id.as_deref(),
            _ => None,
        }
    }

    /// 28P01 for a bad, forged or expired credential; 28000 for a valid token used by the wrong party.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::ValidTokenRefused { cause, .. } => cause.sqlstate(),
            AuthError::IdentityMismatch { .. }
            | AuthError::ClientCertRequired
            | AuthError::ClientCertMismatch { .. }
            | AuthError::MissingIdentityClaim { .. } => sqlstate::INVALID_AUTHORIZATION,
            _ => sqlstate::INVALID_PASSWORD,
        }
    }

    /// Fixed, low-cardinality label for `pgward_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::ValidTokenRefused { cause, .. } => cause.reason(),
            AuthError::Malformed => "malformed",
            AuthError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::MissingExpiry => "missing_expiry",
            AuthError::LifetimeTooLong { .. } => "lifetime_too_long",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::MissingIdentityClaim { .. } => "missing_identity",
            AuthError::IdentityMismatch { .. } => "identity_mismatch",
            AuthError::ClientCertRequired => "client_cert_required",
            AuthError::ClientCertMismatch { .. } => "client_cert_mismatch",
        }
    }

    /// What the person connecting reads: what is wrong, never the token itself.
    pub fn client_message(&self) -> String {
        match self {
            AuthError::ValidTokenRefused { cause, .. } => cause.client_message(),
            AuthError::Malformed => "pgward: the password is not a valid token (a JWT is expected)".into(),
            AuthError::UnsupportedAlgorithm(alg) => format!("pgward: token algorithm {alg} is not accepted"),
            AuthError::UnknownKey { kid: Some(kid) } => format!("pgward: token signed by unknown key \"{kid}\""),
            AuthError::UnknownKey { kid: None } => "pgward: token names no key id and no single key matches".into(),
            AuthError::BadSignature => "pgward: token signature is invalid".into(),
            AuthError::Expired => "pgward: token expired".into(),
            AuthError::NotYetValid => "pgward: token is not valid yet (nbf in the future)".into(),
            AuthError::MissingExpiry => "pgward: token has no exp claim; only short-lived tokens are accepted".into(),
            AuthError::LifetimeTooLong { lifetime_secs, max_secs } => format!(
                "pgward: token lifetime of {lifetime_secs}s exceeds the allowed maximum of {max_secs}s"
            ),
            AuthError::WrongIssuer => "pgward: token issuer is not accepted".into(),
            AuthError::WrongAudience { expected } => format!(
                "pgward: token audience does not match (expected one of: {})",
                expected.join(", ")
            ),
            AuthError::MissingIdentityClaim { claim } => format!("pgward: token has no \"{claim}\" claim naming the service"),
            AuthError::IdentityMismatch { startup_user, token_service } => format!(
                "pgward: user \"{startup_user}\" does not match the token's service \"{token_service}\""
            ),
            AuthError::ClientCertRequired => "pgward: a client certificate is required".into(),
            AuthError::ClientCertMismatch { cert_identity, service } => format!(
                "pgward: client certificate identity \"{cert_identity}\" does not match service \"{service}\""
            ),
        }
    }
}
