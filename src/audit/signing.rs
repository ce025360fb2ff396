//! Ed25519 keys for checkpoint signatures, stored as PKCS#8 / SPKI PEM files.
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use super::AuditError;

/// The checkpoint signing key.
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "SigningKey({})", self.key_id())
    }
}

fn key_err(path: &Path, reason: impl std::fmt::Display) -> AuditError {
    AuditError::Key {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Where the public key of `key_path` is written: `<key_path>.pub`.
pub fn public_key_path(key_path: &Path) -> PathBuf {
    let mut s = key_path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl SigningKey {
    /// Loads the PKCS#8 PEM key at `path`.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let pem = std::fs::read_to_string(path).map_err(|e| key_err(path, e))?;
        let inner =
            ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| key_err(path, e))?;
        Ok(SigningKey { inner })
    }

    /// Loads the key, or creates one (mode 0600) with its public key beside it
    /// (`<path>.pub`, SPKI PEM) for auditors. Used by `pgward dev`.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditError> {
        if path.exists() {
            return Self::load(path);
        }
        let inner = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let key = SigningKey { inner };
        let pem = key
            .inner
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| key_err(path, e))?;
        write_new_private(path, pem.as_bytes())?;
        let pub_path = public_key_path(path);
        std::fs::write(&pub_path, key.public_key_pem()?).map_err(|e| key_err(&pub_path, e))?;
        tracing::info!(key = %path.display(), public = %pub_path.display(), "created audit signing key");
        Ok(key)
    }

    pub fn public_key_pem(&self) -> Result<String, AuditError> {
        self.inner
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| key_err(Path::new("<public key>"), e))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.inner.verifying_key()
    }

    /// Short identifier of the public key recorded in checkpoints.
    pub fn key_id(&self) -> String {
        key_id(&self.inner.verifying_key())
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Signature {
        self.inner.sign(msg)
    }
}

fn write_new_private(path: &Path, data: &[u8]) -> Result<(), AuditError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| key_err(path, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| key_err(path, e))
}

/// First 16 hex digits of SHA-256 of the raw public key.
pub fn key_id(vk: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(vk.as_bytes())[..8])
}

/// Loads an SPKI PEM public key (the `.pub` file) — or, for convenience, derives it from a
/// PKCS#8 private key file.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let pem = std::fs::read_to_string(path).map_err(|e| key_err(path, e))?;
    if let Ok(vk) = VerifyingKey::from_public_key_pem(&pem) {
        return Ok(vk);
    }
    ed25519_dalek::SigningKey::from_pkcs8_pem(&pem)
        .map(|k| k.verifying_key())
        .map_err(|e| {
            key_err(
                path,
                format!("neither an SPKI public key nor a PKCS#8 key: {e}"),
            )
        })
}

/// Verifies a base64 signature over `msg`.
pub(crate) fn verify_sig(vk: &VerifyingKey, msg: &[u8], sig_b64: &str) -> bool {
    use base64::Engine;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(sig_b64) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    vk.verify(msg, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_same_key_and_public_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.key");
        let k1 = SigningKey::load_or_create(&p).unwrap();
        let k2 = SigningKey::load_or_create(&p).unwrap();
        assert_eq!(k1.key_id(), k2.key_id());
        let vk = load_public_key(&public_key_path(&p)).unwrap();
        assert_eq!(vk, k1.verifying_key());
        assert_eq!(load_public_key(&p).unwrap(), vk);
        use base64::Engine;
        let sig = base64::engine::general_purpose::STANDARD.encode(k1.sign(b"m").to_bytes());
        assert!(verify_sig(&vk, b"m", &sig));
        assert!(!verify_sig(&vk, b"n", &sig));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(format!("{k1:?}").starts_with("SigningKey("));
    }
}
