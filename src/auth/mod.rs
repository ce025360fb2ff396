//! Authentication: every service proves itself with a short-lived JWT sent as the password.
//!
//! - [`TokenVerifier`] checks signature (HS256 secret file, or RS256/ES256/EdDSA keys from a JWKS
//!   file, refreshed on an unknown `kid`), `exp`/`nbf`/`iss`/`aud`, a maximum lifetime, and binds
//!   the token's service identity to the startup `user` and, optionally, the client certificate;
//! - [`DevSigningKey`] is the Ed25519 key `pgward dev` and `pgward token mint` share.
//!
//! The algorithm is taken from the configured key, never trusted from the token header, so an
//! HS256 token can never be checked against a public key used as an HMAC secret.

mod dev;
mod error;
mod verifier;

pub use dev::DevSigningKey;
pub use error::{AuthError, AuthSetupError};
pub use verifier::{cert_identity_from_der, AuthConfig, Identity, TokenVerifier};
