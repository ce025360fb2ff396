//! Building the configured key provider and its Vault client from `[keys]` and `[vault]`.
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::config::{KeysConfig, ProviderKind, VaultConfig};
use super::error::CryptoError;
use crate::keys::kv2::Kv2Provider;
use crate::keys::local::LocalProvider;
use crate::keys::store::WrappedKeyStore;
use crate::keys::transit::TransitProvider;
use crate::keys::vault::{VaultAuth, VaultClient, VaultClientConfig};
use crate::keys::KeyProvider;

/// A provider and the Vault client behind it (none for `local`).
pub type ProviderParts = (Arc<dyn KeyProvider>, Option<Arc<VaultClient>>);

/// Construct the configured provider (and the Vault client it uses).
pub fn build_provider(
    keys: &KeysConfig,
    vault: Option<&VaultConfig>,
    store: Option<Arc<dyn WrappedKeyStore>>,
) -> Result<ProviderParts, CryptoError> {
    let vault_section = || {
        vault.ok_or_else(|| {
            CryptoError::Config("the transit and kv2 providers need a [vault] section".into())
        })
    };
    match keys.provider {
        ProviderKind::Local => {
            let path = keys.local_master_key_file.as_deref().ok_or_else(|| {
                CryptoError::Config("provider = \"local\" needs local_master_key_file".into())
            })?;
            Ok((Arc::new(LocalProvider::from_file(path)?), None))
        }
        ProviderKind::Transit => {
            let cfg = vault_section()?;
            let store = store.ok_or_else(|| {
                CryptoError::Config(
                    "the transit provider needs the wrapped-key store (upstream database)".into(),
                )
            })?;
            let client = Arc::new(vault_client(cfg)?);
            let provider = TransitProvider::new(
                client.clone(),
                cfg.transit_mount.clone(),
                store,
                keys.auto_create_transit_keys,
            );
            Ok((Arc::new(provider), Some(client)))
        }
        ProviderKind::Kv2 => {
            let cfg = vault_section()?;
            let client = Arc::new(vault_client(cfg)?);
            let provider =
                Kv2Provider::new(client.clone(), cfg.kv_mount.clone(), cfg.kv_prefix.clone());
            Ok((Arc::new(provider), Some(client)))
        }
    }
}

pub(crate) fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, CryptoError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CryptoError::Config(format!("reading {}: {e}", path.display())))?,
    );
    Ok(Zeroizing::new(text.trim().to_string()))
}

/// Build the Vault client from `[vault]` (reads token / AppRole files now).
pub fn vault_client(cfg: &VaultConfig) -> Result<VaultClient, CryptoError> {
    let auth = match (&cfg.approle, &cfg.token_file) {
        (Some(ar), _) => VaultAuth::AppRole {
            mount: ar.mount.clone(),
            role_id: read_secret_file(&ar.role_id_file)?.to_string(),
            secret_id: read_secret_file(&ar.secret_id_file)?,
        },
        (None, Some(file)) => VaultAuth::Token(read_secret_file(file)?),
        (None, None) => VaultAuth::Token(Zeroizing::new(std::env::var(&cfg.token_env).map_err(
            |_| {
                CryptoError::Config(format!(
                    "no Vault token: set {} or vault.token_file",
                    cfg.token_env
                ))
            },
        )?)),
    };
    crate::keys::vault::check_address(&cfg.address, cfg.allow_insecure_http)
        .map_err(CryptoError::Config)?;
    VaultClient::new(VaultClientConfig {
        address: cfg.address.clone(),
        auth,
        ca_file: cfg.ca_file.clone(),
        request_timeout: cfg.request_timeout,
    })
    .map_err(|e| CryptoError::Config(e.to_string()))
}
