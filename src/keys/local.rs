//! Local master key file: DEKs derived with HMAC-SHA-256. For `pgward dev` and tests only.
use std::path::Path;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{DekInfo, KekStatus, KeyError, KeyFuture, KeyProvider, SecretKey};

/// The single DEK version of the local provider (it does not rotate).
const LOCAL_DEK_VERSION: u32 = 1;

pub struct LocalProvider {
    master: SecretKey,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalProvider(<redacted>)")
    }
}

fn derive(master: &SecretKey, label: &[u8], key_name: &str, version: u32) -> SecretKey {
    #[allow(clippy::expect_used)]
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(label);
    mac.update(&(key_name.len() as u32).to_be_bytes());
    mac.update(key_name.as_bytes());
    mac.update(&version.to_be_bytes());
    SecretKey::from_bytes(mac.finalize().into_bytes().into())
}

impl LocalProvider {
    /// Load a master key file: 32 raw bytes, 64 hex characters, or base64 of 32 bytes.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let err = |reason: String| KeyError::MasterKey {
            path: path.display().to_string(),
            reason,
        };
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        let master = parse_master(&raw).ok_or_else(|| {
            err("expected 32 raw bytes, 64 hex characters or base64 of 32 bytes".into())
        })?;
        Ok(Self::from_key(master))
    }

    pub fn from_key(master: SecretKey) -> Self {
        tracing::warn!(
            "USING THE LOCAL MASTER-KEY PROVIDER: keys are derived from a file on this host. \
             This is for `pgward dev` and tests only; use the transit provider in production."
        );
        LocalProvider { master }
    }

    /// Write a fresh random master key (hex) readable only by the owner.
    pub fn generate_file(path: &Path) -> Result<(), KeyError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let err = |e: std::io::Error| KeyError::MasterKey {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let hex = Zeroizing::new(hex::encode(SecretKey::random().as_bytes()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        f.write_all(hex.as_bytes()).map_err(err)
    }
}

fn parse_master(raw: &[u8]) -> Option<SecretKey> {
    if raw.len() == 32 {
        return SecretKey::from_slice(raw).ok();
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if let Ok(bytes) = hex::decode(text) {
        return SecretKey::from_slice(&Zeroizing::new(bytes)).ok();
    }
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
    );
    SecretKey::from_slice(&bytes).ok()
}

impl KeyProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn kek_status<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, KekStatus> {
        Box::pin(async move {
            Ok(KekStatus {
                latest_version: 0,
                min_decryption_version: 0,
                versions: Vec::new(),
            })
        })
    }

    fn list_deks<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<DekInfo>> {
        Box::pin(async move {
            Ok(vec![DekInfo {
                key_name: key_name.to_string(),
                dek_version: LOCAL_DEK_VERSION,
                kek_version: 0,
            }])
        })
    }

    fn create_dek<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, (DekInfo, SecretKey)> {
        Box::pin(async move {
            let info = DekInfo {
                key_name: key_name.to_string(),
                dek_version: LOCAL_DEK_VERSION,
                kek_version: 0,
            };
            Ok((
                info,
                derive(
                    &self.master,
                    b"pgward/local/dek/v1",
                    key_name,
                    LOCAL_DEK_VERSION,
                ),
            ))
        })
    }

    fn fetch_dek<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move {
            if dek_version != LOCAL_DEK_VERSION {
                return Err(KeyError::UnknownDek {
                    key: key_name.to_string(),
                    dek_version,
                });
            }
            Ok(derive(
                &self.master,
                b"pgward/local/dek/v1",
                key_name,
                dek_version,
            ))
        })
    }

    fn index_root<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move { Ok(derive(&self.master, b"pgward/local/index/v1", key_name, 0)) })
    }

    fn rewrap<'a>(&'a self, _key_name: &'a str) -> KeyFuture<'a, usize> {
        Box::pin(async move { Err(KeyError::Unsupported("rewrap", "local")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_key_file_formats() {
        let key = [7u8; 32];
        let hex = hex::encode(key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        for raw in [
            key.to_vec(),
            format!("{hex}\n").into_bytes(),
            b64.into_bytes(),
        ] {
            assert_eq!(parse_master(&raw).unwrap().as_bytes(), &key);
        }
        assert!(parse_master(b"too short").is_none());
    }

    #[tokio::test]
    async fn generated_file_loads_and_derives_stable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        LocalProvider::generate_file(&path).unwrap();
        assert!(
            LocalProvider::generate_file(&path).is_err(),
            "never overwrites"
        );
        let a = LocalProvider::from_file(&path).unwrap();
        let b = LocalProvider::from_file(&path).unwrap();
        let ka = a.fetch_dek("k", 1).await.unwrap();
        assert_eq!(ka.as_bytes(), b.fetch_dek("k", 1).await.unwrap().as_bytes());
        assert_ne!(ka.as_bytes(), a.index_root("k").await.unwrap().as_bytes());
        assert!(matches!(
            a.fetch_dek("k", 2).await,
            Err(KeyError::UnknownDek { .. })
        ));
    }
}
