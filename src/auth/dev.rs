//! The development signing key: Ed25519, shared by `pgward dev` and `pgward token mint`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::AuthSetupError;

const KEY_FILE: &str = "dev-signing-key.pem";
const JWKS_FILE: &str = "jwks.json";

/// An Ed25519 key with a key id; its public half is published as `jwks.json` beside it.
pub struct DevSigningKey {
    kid: String,
    encoding: EncodingKey,
}

impl DevSigningKey {
    /// Load `dir/dev-signing-key.pem`, or create it (mode 0600) with `dir/jwks.json`.
    pub fn load_or_create(dir: &Path) -> Result<Self, AuthSetupError> {
        let io = |path: &Path, e: std::io::Error| AuthSetupError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let key_path = dir.join(KEY_FILE);
        let bad = |detail: String| AuthSetupError::BadKey {
            path: key_path.display().to_string(),
            detail,
        };
        let pem = if key_path.exists() {
            std::fs::read_to_string(&key_path).map_err(|e| io(&key_path, e))?
        } else {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = signing
                .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
                .map_err(|e| bad(e.to_string()))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)
                .map_err(|e| io(&key_path, e))?;
            file.write_all(pem.as_bytes())
                .map_err(|e| io(&key_path, e))?;
            pem.to_string()
        };
        let signing =
            ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| bad(e.to_string()))?;
        let public = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(signing.verifying_key().as_bytes());
        let kid = format!(
            "pgward-dev-{}",
            &hex::encode(signing.verifying_key().as_bytes())[..12]
        );
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": public, "kid": kid, "alg": "EdDSA", "use": "sig"}]});
        let jwks_path = Self::jwks_path(dir);
        std::fs::write(&jwks_path, jwks.to_string()).map_err(|e| io(&jwks_path, e))?;
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        Ok(Self { kid, encoding })
    }

    /// Where the private key of `dir` is (it may not exist yet).
    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join(KEY_FILE)
    }

    /// Where the public JWKS of the key in `dir` is.
    pub fn jwks_path(dir: &Path) -> PathBuf {
        dir.join(JWKS_FILE)
    }

    /// Mint a token for `service` (`sub`), with `iat`, `nbf`, `exp`, a random `jti` and extra claims.
    pub fn mint(
        &self,
        service: &str,
        claims: &Map<String, Value>,
        ttl: Duration,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<String, AuthSetupError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut body = claims.clone();
        body.insert("sub".into(), service.into());
        body.insert("iat".into(), now.into());
        body.insert("nbf".into(), now.into());
        body.insert("exp".into(), (now + ttl.as_secs()).into());
        body.insert("jti".into(), hex::encode(rand::random::<[u8; 12]>()).into());
        if let Some(aud) = audience {
            body.insert("aud".into(), aud.into());
        }
        if let Some(iss) = issuer {
            body.insert("iss".into(), iss.into());
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &body, &self.encoding)
            .map_err(|e| AuthSetupError::Sign(e.to_string()))
    }
}
