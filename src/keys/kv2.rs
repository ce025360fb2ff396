//! DEKs as versions of Vault KV v2 secrets: `<mount>/data/<prefix>/deks/<key>` (the
//! KV version is the DEK version) and `<mount>/data/<prefix>/index/<key>` (index root).
//!
//! Simpler than transit (no KEK, no rewrap) but the plaintext DEKs sit in Vault's KV
//! store, so anyone with read access to that path can decrypt the column.
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::vault::{response_err, VaultClient, VaultError};
use super::{DekInfo, KekStatus, KeyError, KeyFuture, KeyProvider, SecretKey};

#[derive(Debug)]
pub struct Kv2Provider {
    vault: Arc<VaultClient>,
    mount: String,
    prefix: String,
}

fn key_from_secret(path: &str, resp: &Value) -> Result<SecretKey, VaultError> {
    let b64 = resp
        .get("data")
        .and_then(|d| d.get("data"))
        .and_then(|d| d.get("key"))
        .and_then(Value::as_str)
        .ok_or_else(|| response_err(path, "missing data.data.key"))?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| response_err(path, "key is not base64"))?,
    );
    SecretKey::from_slice(&bytes).map_err(|_| response_err(path, "key is not 32 bytes"))
}

impl Kv2Provider {
    pub fn new(
        vault: Arc<VaultClient>,
        mount: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        Kv2Provider {
            vault,
            mount: mount.into(),
            prefix: prefix.into(),
        }
    }

    fn path(&self, kind: &str, what: &str, key_name: &str) -> String {
        format!("{}/{what}/{}/{kind}/{key_name}", self.mount, self.prefix)
    }

    /// Live (not deleted or destroyed) versions, ascending; empty if the secret does not exist.
    async fn versions(&self, kind: &str, key_name: &str) -> Result<Vec<u32>, VaultError> {
        let path = self.path(kind, "metadata", key_name);
        let resp = match self.vault.get(&path).await {
            Err(VaultError::NotFound { .. }) => return Ok(Vec::new()),
            other => other?,
        };
        let map = resp
            .get("data")
            .and_then(|d| d.get("versions"))
            .and_then(Value::as_object)
            .ok_or_else(|| response_err(&path, "no versions"))?;
        let mut live: Vec<u32> = map
            .iter()
            .filter(|(_, meta)| {
                let destroyed = meta
                    .get("destroyed")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let deleted = meta
                    .get("deletion_time")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty());
                !destroyed && !deleted
            })
            .filter_map(|(v, _)| v.parse().ok())
            .collect();
        live.sort_unstable();
        Ok(live)
    }

    async fn read(
        &self,
        kind: &str,
        key_name: &str,
        version: Option<u32>,
    ) -> Result<SecretKey, VaultError> {
        let mut path = self.path(kind, "data", key_name);
        if let Some(v) = version {
            path.push_str(&format!("?version={v}"));
        }
        let resp = self.vault.get(&path).await?;
        key_from_secret(&path, &resp)
    }

    /// Write a new random key as the next version, failing if someone else wrote `cas` first.
    async fn write_new(
        &self,
        kind: &str,
        key_name: &str,
        cas: u32,
    ) -> Result<(u32, SecretKey), VaultError> {
        let key = SecretKey::random();
        let path = self.path(kind, "data", key_name);
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_bytes()));
        let resp = self
            .vault
            .post(
                &path,
                json!({ "options": { "cas": cas }, "data": { "key": b64.as_str() } }),
            )
            .await?;
        let version = resp
            .get("data")
            .and_then(|d| d.get("version"))
            .and_then(Value::as_u64)
            .ok_or_else(|| response_err(&path, "no version"))?;
        Ok((version as u32, key))
    }
}

impl KeyProvider for Kv2Provider {
    fn kind(&self) -> &'static str {
        "kv2"
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
            let versions = self
                .versions("deks", key_name)
                .await
                .map_err(|e| KeyError::from_vault(key_name, 0, e))?;
            Ok(versions
                .into_iter()
                .map(|v| DekInfo {
                    key_name: key_name.to_string(),
                    dek_version: v,
                    kek_version: 0,
                })
                .collect())
        })
    }

    fn create_dek<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, (DekInfo, SecretKey)> {
        Box::pin(async move {
            let vault_err = |e| KeyError::from_vault(key_name, 0, e);
            let current = self
                .versions("deks", key_name)
                .await
                .map_err(vault_err)?
                .last()
                .copied()
                .unwrap_or(0);
            let (version, key) = match self.write_new("deks", key_name, current).await {
                Ok(written) => written,
                // Lost a check-and-set race: another instance just wrote a new version; use it.
                Err(VaultError::Api { status: 400, .. }) => {
                    let latest = self
                        .versions("deks", key_name)
                        .await
                        .map_err(vault_err)?
                        .last()
                        .copied()
                        .unwrap_or(0);
                    (
                        latest,
                        self.read("deks", key_name, Some(latest))
                            .await
                            .map_err(vault_err)?,
                    )
                }
                Err(e) => return Err(vault_err(e)),
            };
            tracing::info!(
                key = key_name,
                dek_version = version,
                "created data key in KV v2"
            );
            Ok((
                DekInfo {
                    key_name: key_name.to_string(),
                    dek_version: version,
                    kek_version: 0,
                },
                key,
            ))
        })
    }

    fn fetch_dek<'a>(&'a self, key_name: &'a str, dek_version: u32) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move {
            match self.read("deks", key_name, Some(dek_version)).await {
                Err(VaultError::NotFound { .. }) => Err(KeyError::UnknownDek {
                    key: key_name.to_string(),
                    dek_version,
                }),
                other => other.map_err(|e| KeyError::from_vault(key_name, dek_version, e)),
            }
        })
    }

    fn index_root<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, SecretKey> {
        Box::pin(async move {
            let vault_err = |e| KeyError::from_vault(key_name, 0, e);
            match self.read("index", key_name, None).await {
                Err(VaultError::NotFound { .. }) => {
                    match self.write_new("index", key_name, 0).await {
                        Ok((_, key)) => Ok(key),
                        Err(VaultError::Api { status: 400, .. }) => {
                            self.read("index", key_name, None).await.map_err(vault_err)
                        }
                        Err(e) => Err(vault_err(e)),
                    }
                }
                other => other.map_err(vault_err),
            }
        })
    }

    fn rewrap<'a>(&'a self, key_name: &'a str) -> KeyFuture<'a, usize> {
        Box::pin(async move {
            tracing::debug!(key = key_name, "kv2 provider has no KEK; nothing to rewrap");
            Ok(0)
        })
    }
}
