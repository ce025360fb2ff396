//! Vault transit as the KEK; wrapped DEKs in a [`WrappedKeyStore`].
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::store::{IndexRootState, PendingRoot, WrappedDek, WrappedKeyStore};
use super::vault::{data_str, response_err, VaultClient, VaultError};
use super::{DekInfo, IndexRoots, KekStatus, KeyError, KeyFuture, KeyProvider, SecretKey};

/// Index root keys are stored as DEK version 0.
const INDEX_ROOT_VERSION: u32 = 0;

#[derive(Debug)]
pub struct TransitProvider {
    vault: Arc<VaultClient>,
    mount: String,
    store: Arc<dyn WrappedKeyStore>,
    /// Create a missing transit key (type aes256-gcm96) instead of failing.
    auto_create: bool,
}

/// KEK version from a transit ciphertext `vault:v<N>:<base64>`.
pub fn kek_version_of(ciphertext: &str) -> Option<u32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    rest.split(':').next()?.parse().ok()
}

/// The stored DEK with its KEK version taken from the wrapped form itself (`vault:vN:`, which
/// is what Vault reads when it unwraps), not from the `kek_version` column: that column is a
/// copy anyone with write access to the table can change. 0 when the prefix is unreadable
/// (such a DEK is always offered to `rewrap`, and Vault has the last word).
fn trusted(mut dek: WrappedDek) -> WrappedDek {
    let actual = kek_version_of(&dek.wrapped).unwrap_or(0);
    if actual != dek.info.kek_version {
        tracing::warn!(
            key = %dek.info.key_name,
            dek_version = dek.info.dek_version,
            stored = dek.info.kek_version,
            actual,
            "pgward.data_keys.kek_version disagrees with the wrapped key; using the wrapped key's version"
        );
        dek.info.kek_version = actual;
    }
    dek
}

fn decode_key(path: &str, b64: &str) -> Result<SecretKey, VaultError> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| response_err(path, "plaintext is not base64"))?,
    );
    SecretKey::from_slice(&bytes).map_err(|_| response_err(path, "data key is not 32 bytes"))
}

impl TransitProvider {
    pub fn new(
        vault: Arc<VaultClient>,
        mount: impl Into<String>,
        store: Arc<dyn WrappedKeyStore>,
        auto_create: bool,
    ) -> Self {
        TransitProvider {
            vault,
            mount: mount.into(),
            store,
            auto_create,
        }
    }

    async fn read_kek(&self, key_name: &str) -> Result<KekStatus, VaultError> {
        let path = format!("{}/keys/{key_name}", self.mount);
        let resp = match self.vault.get(&path).await {
            Err(VaultError::NotFound { .. }) if self.auto_create => {
                tracing::info!(key = key_name, "creating transit key (aes256-gcm96)");
                self.vault
                    .post(&path, json!({ "type": "aes256-gcm96" }))
                    .await?;
                self.vault.get(&path).await?
            }
            other => other?,
        };
        parse_kek_status(&path, &resp)
    }

    /// Generate a DEK under the newest KEK version: (wrapped, plaintext).
    async fn generate(&self, key_name: &str) -> Result<(String, SecretKey), VaultError> {
        let path = format!("{}/datakey/plaintext/{key_name}", self.mount);
        let resp = self.vault.post(&path, json!({ "bits": 256 })).await?;
        let key = decode_key(&path, data_str(&resp, &path, "plaintext")?)?;
        Ok((data_str(&resp, &path, "ciphertext")?.to_string(), key))
    }

    async fn unwrap_dek(&self, key_name: &str, wrapped: &str) -> Result<SecretKey, VaultError> {
        let path = format!("{}/decrypt/{key_name}", self.mount);
        let resp = self
            .vault
            .post(&path, json!({ "ciphertext": wrapped }))
            .await?;
        decode_key(&path, data_str(&resp, &path, "plaintext")?)
    }

    /// Create and store version `dek_version`; if another instance stored it first, use theirs.
    async fn create_version(
        &self,
        key_name: &str,
        dek_version: u32,
    ) -> Result<(DekInfo, SecretKey), KeyError> {
        let (wrapped, key) = self
            .generate(key_name)
            .await
            .map_err(|e| KeyError::from_vault(key_name, dek_version, e))?;
        let kek_version = kek_version_of(&wrapped).ok_or_else(|| {
            KeyError::BadKeyMaterial("unexpected transit ciphertext prefix".into())
        })?;
        let info = DekInfo {
            key_name: key_name.to_string(),
            dek_version,
            kek_version,
        };
        if self
            .store
            .insert(
                &WrappedDek {
                    info: info.clone(),
                    wrapped,
                },
                "transit",
            )
            .await?
        {
            tracing::info!(key = key_name, dek_version, kek_version, "created data key");
            return Ok((info, key));
        }
        let theirs = self
            .store
            .get(key_name, dek_version)
            .await?
            .map(trusted)
            .ok_or(KeyError::UnknownDek {
                key: key_name.to_string(),
                dek_version,
            })?;
        let key = self
            .unwrap_dek(key_name, &theirs.wrapped)
            .await
            .map_err(|e| KeyError::from_vault(key_name, dek_version, e))?;
        Ok((theirs.info, key))
    }
}

fn parse_kek_status(path: &str, resp: &Value) -> Result<KekStatus, VaultError> {
    let data = resp
        .get("data")
        .ok_or_else(|| response_err(path, "no data"))?;
    // The `keys` map (version -> creation time) is authoritative; `latest_version` is optional.
    let mut versions: Vec<u32> = data
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| response_err(path, "no keys map"))?
        .keys()
        .filter_map(|k| k.parse().ok())
        .collect();
    versions.sort_unstable();
    let latest = versions
        .last()
        .copied()
        .ok_or_else(|| response_err(path, "empty keys map"))?;
    let latest_version = data
        .get("latest_version")
        .and_then(Value::as_u64)
        .map(|v| v as u32)
        .unwrap_or(latest)
        .max(latest);
    let min_decryption_version = data
        .get("min_decryption_version")
        .and_then(Value::as_u64)
        .unwrap_or(1) as u32;
    Ok(KekStatus {
        latest_version,
        min_decryption_version,
        versions,
    })
}

impl KeyProvider for TransitProvider {
    fn kind(&self) -> &'static str {
        "transit"
    }

    fn kek_status<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, KekStatus> {
        Box::pin(async move {
            self.read_kek(key_name)
                .await
                .map_err(|e| KeyError::from_vault(key_name, 0, e))
        })
    }

    fn list_deks<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, Vec<DekInfo>> {
        Box::pin(async move {
            let all = self.store.list(key_name).await?;
            Ok(all
                .into_iter()
                .filter(|d| d.info.dek_version != INDEX_ROOT_VERSION)
                .map(|d| trusted(d).info)
                .collect())
        })
    }

    fn create_dek<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, (DekInfo, SecretKey)> {
        Box::pin(async move {
            let next = self
                .store
                .list(key_name)
                .await?
                .iter()
                .map(|d| d.info.dek_version)
                .max()
                .unwrap_or(0)
                + 1;
            self.create_version(key_name, next).await
        })
    }

    fn fetch_dek<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move {
            let Some(stored) = self.store.get(key_name, dek_version).await? else {
                return Err(match self.store.retired(key_name, dek_version).await? {
                    Some(since) => KeyError::Retired {
                        key: key_name.to_string(),
                        dek_version,
                        since,
                    },
                    None => KeyError::UnknownDek {
                        key: key_name.to_string(),
                        dek_version,
                    },
                });
            };
            self.unwrap_dek(key_name, &stored.wrapped)
                .await
                .map_err(|e| KeyError::from_vault(key_name, dek_version, e))
        })
    }

    fn index_root<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move {
            match self.store.get(key_name, INDEX_ROOT_VERSION).await? {
                Some(stored) => self
                    .unwrap_dek(key_name, &stored.wrapped)
                    .await
                    .map_err(|e| KeyError::from_vault(key_name, INDEX_ROOT_VERSION, e)),
                None => Ok(self.create_version(key_name, INDEX_ROOT_VERSION).await?.1),
            }
        })
    }

    fn index_root_state<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, IndexRootState> {
        self.store.index_root_state(key_name)
    }

    fn index_roots<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, IndexRoots> {
        Box::pin(async move {
            let state = self.store.index_root_state(key_name).await?;
            let current = self.index_root(key_name).await?;
            Ok(match state.pending {
                Some(p) => IndexRoots {
                    version: p.root_version,
                    write: self
                        .unwrap_dek(key_name, &p.wrapped)
                        .await
                        .map_err(|e| KeyError::from_vault(key_name, INDEX_ROOT_VERSION, e))?,
                    previous: Some(current),
                },
                None => IndexRoots {
                    version: state.version,
                    write: current,
                    previous: None,
                },
            })
        })
    }

    fn start_index_rotation<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, (u32, bool)> {
        Box::pin(async move {
            // The root being replaced must exist first (created here if nothing was indexed).
            self.index_root(key_name).await?;
            let state = self.store.index_root_state(key_name).await?;
            if let Some(p) = state.pending {
                return Ok((p.root_version, false));
            }
            let (wrapped, _key) = self
                .generate(key_name)
                .await
                .map_err(|e| KeyError::from_vault(key_name, INDEX_ROOT_VERSION, e))?;
            let kek_version = kek_version_of(&wrapped).ok_or_else(|| {
                KeyError::BadKeyMaterial("unexpected transit ciphertext prefix".into())
            })?;
            let pending = PendingRoot {
                key_name: key_name.to_string(),
                root_version: state.version + 1,
                kek_version,
                wrapped,
            };
            if self.store.start_index_rotation(&pending).await? {
                tracing::info!(
                    key = key_name,
                    root_version = pending.root_version,
                    kek_version,
                    "blind-index root rotation started"
                );
                return Ok((pending.root_version, true));
            }
            // Another caller started one first: that one is the rotation.
            let theirs = self.store.index_root_state(key_name).await?.pending;
            theirs.map(|p| (p.root_version, false)).ok_or_else(|| {
                KeyError::Store("index root rotation vanished while starting".into())
            })
        })
    }

    fn complete_index_rotation<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, bool> {
        self.store.complete_index_rotation(key_name)
    }

    fn record_encryptions<'a>(
        &'a self,
        key_name: &'a str,
        dek_version: u32,
        delta: u64,
    ) -> KeyFuture<'a, Option<u64>> {
        Box::pin(async move {
            Ok(Some(
                self.store
                    .add_encryptions(key_name, dek_version, delta)
                    .await?,
            ))
        })
    }

    fn destroyed<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, bool> {
        self.store.destroyed(key_name)
    }

    /// Delete the transit key: allow deletion in its config, then delete it. A key that was
    /// never created (no value was ever written under the name) is already gone.
    fn destroy<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("{}/keys/{key_name}", self.mount);
            let vault = |e| KeyError::from_vault(key_name, 0, e);
            match self.vault.get(&path).await {
                Err(VaultError::NotFound { .. }) => return Ok(()),
                other => other.map_err(vault)?,
            };
            self.vault
                .post(
                    &format!("{path}/config"),
                    json!({ "deletion_allowed": true }),
                )
                .await
                .map_err(vault)?;
            self.vault.delete(&path).await.map_err(vault)?;
            tracing::warn!(
                key = key_name,
                "transit key deleted: values under it can never be decrypted again"
            );
            Ok(())
        })
    }

    fn rewrap<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, usize> {
        Box::pin(async move {
            let latest = self
                .read_kek(key_name)
                .await
                .map_err(|e| KeyError::from_vault(key_name, 0, e))?
                .latest_version;
            let path = format!("{}/rewrap/{key_name}", self.mount);
            let mut changed = 0;
            for dek in self.store.list(key_name).await? {
                let mut dek = trusted(dek);
                if dek.info.kek_version >= latest {
                    continue;
                }
                let resp = self
                    .vault
                    .post(&path, json!({ "ciphertext": dek.wrapped }))
                    .await;
                let resp =
                    resp.map_err(|e| KeyError::from_vault(key_name, dek.info.dek_version, e))?;
                let wrapped = data_str(&resp, &path, "ciphertext")
                    .map_err(|e| KeyError::from_vault(key_name, dek.info.dek_version, e))?;
                dek.info.kek_version = kek_version_of(wrapped).ok_or_else(|| {
                    KeyError::BadKeyMaterial("unexpected transit ciphertext prefix".into())
                })?;
                dek.wrapped = wrapped.to_string();
                self.store.update_wrapped(&dek).await?;
                tracing::info!(
                    key = key_name,
                    dek_version = dek.info.dek_version,
                    kek_version = dek.info.kek_version,
                    "rewrapped data key"
                );
                changed += 1;
            }
            Ok(changed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapped_form_decides_the_kek_version() {
        let dek = |kek_version, wrapped: &str| WrappedDek {
            info: DekInfo {
                key_name: "k".into(),
                dek_version: 1,
                kek_version,
            },
            wrapped: wrapped.into(),
        };
        assert_eq!(trusted(dek(999, "vault:v3:abc")).info.kek_version, 3);
        assert_eq!(trusted(dek(3, "vault:v3:abc")).info.kek_version, 3);
        assert_eq!(trusted(dek(5, "garbage")).info.kek_version, 0);
    }

    #[test]
    fn parses_version_map_without_latest_version() {
        let v = json!({"data": {"keys": {"1": 1700000000, "3": 1700000300, "2": 1700000200}, "min_decryption_version": 2}});
        let s = parse_kek_status("p", &v).unwrap();
        assert_eq!(
            s,
            KekStatus {
                latest_version: 3,
                min_decryption_version: 2,
                versions: vec![1, 2, 3]
            }
        );
        assert_eq!(kek_version_of("vault:v12:abc"), Some(12));
        assert_eq!(kek_version_of("nope"), None);
    }
}
