//! TEMPORARY compile stub; replaced by the feat/auth branch at merge.
use std::time::{Duration, SystemTime};
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct AuthConfig {
    #[serde(flatten)]
    pub rest: toml::Table,
}
#[derive(Debug, Clone)]
pub struct Identity {
    pub service: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub token_id: Option<String>,
    pub expires_at: SystemTime,
    pub cert_identity: Option<String>,
}
#[derive(Debug, thiserror::Error)]
#[error("setup")]
pub struct AuthSetupError;
#[derive(Debug, thiserror::Error)]
#[error("auth")]
pub enum AuthError {
    BadSignature,
}
impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        "28P01"
    }
    pub fn reason(&self) -> &'static str {
        "bad_signature"
    }
    pub fn client_message(&self) -> String {
        "pgward: bad token".into()
    }
}
pub struct TokenVerifier(AuthConfig);
impl TokenVerifier {
    pub async fn new(c: AuthConfig) -> Result<Self, AuthSetupError> {
        Ok(Self(c))
    }
    pub async fn verify(
        &self,
        token: &str,
        startup_user: &str,
        cert_identity: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if token == "bad" || token.is_empty() {
            return Err(AuthError::BadSignature);
        }
        let _ = &self.0;
        Ok(Identity {
            service: startup_user.into(),
            claims: Default::default(),
            token_id: None,
            expires_at: SystemTime::now() + Duration::from_secs(60),
            cert_identity: cert_identity.map(String::from),
        })
    }
    pub async fn reload(&self) -> Result<(), AuthSetupError> {
        Ok(())
    }
}
pub fn cert_identity_from_der(_d: &[u8]) -> Option<String> {
    None
}
pub struct DevSigningKey;
impl DevSigningKey {
    pub fn load_or_create(_dir: &std::path::Path) -> Result<Self, AuthSetupError> {
        Ok(Self)
    }
    pub fn jwks_path(dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("jwks.json")
    }
    pub fn mint(
        &self,
        _service: &str,
        _claims: &serde_json::Map<String, serde_json::Value>,
        _ttl: Duration,
        _audience: Option<&str>,
        _issuer: Option<&str>,
    ) -> Result<String, AuthSetupError> {
        Ok("ok".into())
    }
}
