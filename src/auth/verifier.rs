//! Token verification.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{AuthError, AuthSetupError};
use crate::blocking::OneAtATime;

/// `[auth]` in `pgward.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Claim naming the service; must equal the startup `user`.
    pub identity_claim: String,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values (the token must carry one), when non-empty.
    pub audience: Vec<String>,
    /// Longest accepted lifetime (exp − iat, or exp − nbf, or exp − now).
    #[serde(with = "humantime_serde")]
    pub max_token_lifetime: Duration,
    /// Clock skew tolerated on exp/nbf.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// HS256 shared secret (raw file bytes, trailing newline ignored).
    pub hs256_secret_file: Option<PathBuf>,
    /// JWKS with RS256/ES256/EdDSA public keys.
    pub jwks_file: Option<PathBuf>,
    /// JWKS fetched over HTTPS (plain http only to loopback hosts, for development and tests).
    pub jwks_url: Option<String>,
    /// Least time between two re-reads of the JWKS on an unknown `kid`.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_min_interval: Duration,
    /// Refuse clients that present no (CA-verified) certificate.
    pub require_client_cert: bool,
    /// The certificate identity (SPIFFE URI SAN or CN) must equal the service (or end in `/<service>`).
    pub cert_identity_must_match: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            identity_claim: "sub".into(),
            issuer: None,
            audience: Vec::new(),
            max_token_lifetime: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            hs256_secret_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_min_interval: Duration::from_secs(30),
            require_client_cert: false,
            cert_identity_must_match: false,
        }
    }
}

/// A verified service identity, attached to the session for policy, encryption and audit.
#[derive(Debug, Clone)]
pub struct Identity {
    pub service: String,
    pub claims: Map<String, Value>,
    pub token_id: Option<String>,
    pub expires_at: SystemTime,
    pub cert_identity: Option<String>,
}

struct AsymmetricKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Default)]
struct Keys {
    hs256: Option<DecodingKey>,
    asymmetric: Vec<AsymmetricKey>,
}

/// Verifies tokens; shared by all sessions.
pub struct TokenVerifier {
    /// Swapped whole on SIGHUP ([`TokenVerifier::reconfigure`]).
    config: RwLock<Arc<AuthConfig>>,
    keys: RwLock<Keys>,
    last_refresh: parking_lot::Mutex<Instant>,
    /// The key files' reads, one at a time ([`load_all`]).
    key_files: OneAtATime,
}

fn read(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|e| AuthSetupError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Fetch the configured JWKS URL (https, or http to a loopback host).
async fn fetch_jwks(url: &str) -> Result<Vec<u8>, AuthSetupError> {
    let err = |detail: String| AuthSetupError::Read {
        path: url.to_string(),
        detail,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| err(e.to_string()))?;
    let loopback = matches!(
        parsed.host_str(),
        Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
    );
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
        return Err(err(
            "a JWKS URL must use https (http is allowed only to loopback)".into(),
        ));
    }
    let response = reqwest::Client::new()
        .get(parsed)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| err(e.to_string()))?;
    let body = response.bytes().await.map_err(|e| err(e.to_string()))?;
    Ok(body.to_vec())
}

/// The longest the key files may take to read.
const KEY_FILES_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the key files off the runtime, within [`KEY_FILES_TIMEOUT`], one read at a time: a
/// refresh is set off by a client's token (an unknown `kid`), and a stalled disk must cost that
/// login bounded time, not a worker thread of the proxy — nor, refresh after refresh, one more
/// blocked thread each time.
async fn load_all(config: &AuthConfig, lane: &OneAtATime) -> Result<Keys, AuthSetupError> {
    let fetched = match &config.jwks_url {
        Some(url) => Some(fetch_jwks(url).await?),
        None => None,
    };
    let config = config.clone();
    lane.within(KEY_FILES_TIMEOUT, move || {
        load_keys(&config, fetched.as_deref())
    })
    .await
    .map_err(|e| AuthSetupError::Read {
        path: "the key files".into(),
        detail: e.to_string(),
    })?
}

fn load_keys(config: &AuthConfig, fetched_jwks: Option<&[u8]>) -> Result<Keys, AuthSetupError> {
    let mut keys = Keys::default();
    if let Some(path) = &config.hs256_secret_file {
        let mut secret = read(path)?;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        if secret.len() < 32 {
            return Err(AuthSetupError::BadKey {
                path: path.display().to_string(),
                detail: "an HS256 secret must be at least 32 bytes".into(),
            });
        }
        keys.hs256 = Some(DecodingKey::from_secret(&secret));
    }
    let mut sources: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(path) = &config.jwks_file {
        sources.push((path.display().to_string(), read(path)?));
    }
    if let (Some(url), Some(bytes)) = (&config.jwks_url, fetched_jwks) {
        sources.push((url.clone(), bytes.to_vec()));
    }
    for (origin, bytes) in sources {
        let bad = |detail: String| AuthSetupError::BadKey {
            path: origin.clone(),
            detail,
        };
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        for jwk in &set.keys {
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(alg), _) => alg
                    .to_string()
                    .parse::<Algorithm>()
                    .map_err(|e| bad(e.to_string()))?,
                (None, jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                (None, jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)) => {
                    Algorithm::ES256
                }
                (None, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, _) => return Err(bad("symmetric keys do not belong in a JWKS here".into())),
            };
            if algorithm == Algorithm::HS256
                || algorithm == Algorithm::HS384
                || algorithm == Algorithm::HS512
            {
                return Err(bad(
                    "HMAC keys are configured with hs256_secret_file, not the JWKS".into(),
                ));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
            keys.asymmetric.push(AsymmetricKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
    }
    if keys.hs256.is_none() && keys.asymmetric.is_empty() {
        return Err(AuthSetupError::NoKeySource);
    }
    Ok(keys)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl TokenVerifier {
    /// Load the configured key material.
    pub async fn new(config: AuthConfig) -> Result<Self, AuthSetupError> {
        let key_files = OneAtATime::default();
        let keys = load_all(&config, &key_files).await?;
        Ok(Self {
            config: RwLock::new(Arc::new(config)),
            keys: RwLock::new(keys),
            last_refresh: parking_lot::Mutex::new(Instant::now()),
            key_files,
        })
    }

    /// How many verification keys are loaded (HS256 secret and JWKS keys), for `/readyz`.
    pub fn key_count(&self) -> usize {
        let keys = self.keys.read();
        usize::from(keys.hs256.is_some()) + keys.asymmetric.len()
    }

    /// The settings in force.
    fn config(&self) -> Arc<AuthConfig> {
        self.config.read().clone()
    }

    /// SIGHUP with a changed `[auth]`: the new settings and their keys, or (keys that do not
    /// load) nothing changes. Tokens verified from then on use the new settings.
    pub async fn reconfigure(&self, config: AuthConfig) -> Result<(), AuthSetupError> {
        let keys = load_all(&config, &self.key_files).await?;
        *self.config.write() = Arc::new(config);
        *self.keys.write() = keys;
        Ok(())
    }

    /// Re-read key files (SIGHUP); keeps the old keys if the new ones are invalid.
    pub async fn reload(&self) -> Result<(), AuthSetupError> {
        let keys = load_all(&self.config(), &self.key_files).await?;
        *self.keys.write() = keys;
        Ok(())
    }

    /// Re-read the JWKS for an unknown `kid`, at most once per configured interval.
    /// Concurrent callers within the interval get `false` at once: a storm of forged `kid`s
    /// causes at most one fetch per interval.
    async fn refresh_for_unknown_kid(&self) -> bool {
        {
            let mut last = self.last_refresh.lock();
            if last.elapsed() < self.config().jwks_refresh_min_interval {
                return false;
            }
            *last = Instant::now();
        }
        match load_all(&self.config(), &self.key_files).await {
            Ok(keys) => {
                *self.keys.write() = keys;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed, keeping the previous keys");
                false
            }
        }
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config().leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if self.config().audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.config().audience);
        }
        if let Some(issuer) = &self.config().issuer {
            validation.set_issuer(&[issuer]);
        }
        validation
    }

    fn map_error(&self, e: &jsonwebtoken::errors::Error) -> AuthError {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => AuthError::WrongAudience {
                expected: self.config().audience.clone(),
            },
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingExpiry,
            ErrorKind::InvalidAlgorithm => AuthError::BadSignature,
            _ => AuthError::Malformed,
        }
    }

    fn decode(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<Map<String, Value>, AuthError> {
        let keys = self.keys.read();
        let (algorithm, key) = match header.alg {
            Algorithm::HS256 => (
                Algorithm::HS256,
                keys.hs256
                    .as_ref()
                    .ok_or(AuthError::UnsupportedAlgorithm("HS256".into()))?,
            ),
            alg => {
                let candidates: Vec<&AsymmetricKey> = keys
                    .asymmetric
                    .iter()
                    .filter(|k| match &header.kid {
                        Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
                        None => k.algorithm == alg,
                    })
                    .collect();
                let [found] = candidates.as_slice() else {
                    return Err(AuthError::UnknownKey {
                        kid: header.kid.clone(),
                    });
                };
                // The key decides the algorithm; a header claiming another one is refused.
                if found.algorithm != alg {
                    return Err(AuthError::UnsupportedAlgorithm(format!("{alg:?}")));
                }
                (found.algorithm, &found.key)
            }
        };
        jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation(algorithm))
            .map(|data| data.claims)
            .map_err(|e| self.map_error(&e))
    }

    /// Verify a token presented by a client that sent `startup_user`.
    pub async fn verify(
        &self,
        token: &str,
        startup_user: &str,
        cert_identity: Option<&str>,
    ) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if matches!(header.alg, Algorithm::HS384 | Algorithm::HS512) {
            return Err(AuthError::UnsupportedAlgorithm(format!("{:?}", header.alg)));
        }
        let claims = match self.decode(token, &header) {
            Err(AuthError::UnknownKey { .. }) if header.kid.is_some() => {
                if self.refresh_for_unknown_kid().await {
                    self.decode(token, &header)?
                } else {
                    return Err(AuthError::UnknownKey {
                        kid: header.kid.clone(),
                    });
                }
            }
            other => other?,
        };
        self.check_lifetime(&claims)?;
        let service = claims
            .get(&self.config().identity_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::MissingIdentityClaim {
                claim: self.config().identity_claim.clone(),
            })?
            .to_string();
        // From here on the token is genuine and current: a refusal names it in the audit log.
        let refused = |cause: AuthError| AuthError::ValidTokenRefused {
            token_id: claims
                .get("jti")
                .and_then(Value::as_str)
                .map(str::to_string),
            cause: Box::new(cause),
        };
        if service != startup_user {
            return Err(refused(AuthError::IdentityMismatch {
                startup_user: startup_user.to_string(),
                token_service: service,
            }));
        }
        self.check_certificate(&service, cert_identity)
            .map_err(refused)?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0) as u64;
        Ok(Identity {
            token_id: claims
                .get("jti")
                .and_then(Value::as_str)
                .map(str::to_string),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
            cert_identity: cert_identity.map(str::to_string),
            service,
            claims,
        })
    }

    fn check_lifetime(&self, claims: &Map<String, Value>) -> Result<(), AuthError> {
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(AuthError::MissingExpiry)?;
        let now = now_secs();
        // Counted from the issue time, or from now if that is earlier: an `iat` set in the
        // future (a token minted for a century with `iat` a minute before `exp`) must not
        // shorten what is left of it.
        let start = claims
            .get("iat")
            .or_else(|| claims.get("nbf"))
            .and_then(Value::as_i64)
            .map_or(now, |issued| issued.min(now));
        let lifetime = exp.saturating_sub(start);
        let max = self.config().max_token_lifetime.as_secs();
        if lifetime > max as i64 {
            return Err(AuthError::LifetimeTooLong {
                lifetime_secs: lifetime,
                max_secs: max,
            });
        }
        Ok(())
    }

    fn check_certificate(
        &self,
        service: &str,
        cert_identity: Option<&str>,
    ) -> Result<(), AuthError> {
        match cert_identity {
            None if self.config().require_client_cert || self.config().cert_identity_must_match => {
                Err(AuthError::ClientCertRequired)
            }
            Some(identity) if self.config().cert_identity_must_match => {
                let matches = identity == service
                    || (identity.starts_with("spiffe://")
                        && identity.rsplit('/').next() == Some(service));
                if matches {
                    Ok(())
                } else {
                    Err(AuthError::ClientCertMismatch {
                        cert_identity: identity.to_string(),
                        service: service.to_string(),
                    })
                }
            }
            _ => Ok(()),
        }
    }
}

/// The identity of a client certificate: its SPIFFE URI SAN, else its subject CN.
pub fn cert_identity_from_der(cert_der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    return Some(uri.to_string());
                }
            }
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    common_name
}

#[cfg(test)]
#[path = "verifier_tests.rs"]
mod tests;
