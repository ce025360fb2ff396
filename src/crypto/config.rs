//! Configuration: `[vault]`, `[keys]` and `[[encrypt]]` (serde, unknown fields rejected).
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::codec::ClientType;

/// `[vault]`: how to reach and authenticate to Vault/OpenBao.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// e.g. `https://vault.internal:8200`.
    pub address: String,
    /// File holding a Vault token. Read at start, re-read at every key poll when it changed
    /// and on SIGHUP (the Vault Agent sink pattern). Takes precedence over `token_env`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Environment variable holding a Vault token.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// AppRole login instead of a fixed token.
    #[serde(default)]
    pub approle: Option<AppRoleConfig>,
    /// PEM CA bundle to verify Vault's TLS certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_transit_mount")]
    pub transit_mount: String,
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    /// Path prefix inside the KV v2 mount for the `kv2` provider.
    #[serde(default = "default_kv_prefix")]
    pub kv_prefix: String,
    #[serde(default = "default_request_timeout", with = "humantime_serde_str")]
    pub request_timeout: Duration,
    /// Allow `http://` to a non-loopback Vault (data keys and the token in clear). Off by default.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// `[vault.approle]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleConfig {
    #[serde(default = "default_approle_mount")]
    pub mount: String,
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
}

/// Which key provider supplies DEKs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Transit,
    Kv2,
    Local,
}

/// `[keys]`: provider choice and caching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    #[serde(default)]
    pub provider: ProviderKind,
    /// How often to poll KEK version maps (rotation detection) and maintain the Vault token.
    #[serde(default = "default_poll", with = "humantime_serde_str")]
    pub poll_interval: Duration,
    /// A cached plaintext DEK is re-fetched from Vault after this long.
    #[serde(default = "default_ttl", with = "humantime_serde_str")]
    pub dek_cache_ttl: Duration,
    /// While Vault is unreachable, an expired cached DEK keeps serving up to this age.
    #[serde(default = "default_max_stale", with = "humantime_serde_str")]
    pub dek_cache_max_stale: Duration,
    /// Master key file for `provider = "local"` (dev and tests only).
    #[serde(default)]
    pub local_master_key_file: Option<PathBuf>,
    /// Create missing transit keys (needs `create` on `transit/keys/*`).
    #[serde(default = "default_true")]
    pub auto_create_transit_keys: bool,
    /// Values at least this large are encrypted on the blocking pool, off the async workers.
    #[serde(default = "default_blocking_threshold")]
    pub blocking_threshold_bytes: usize,
    /// Replace a data key once this many values were encrypted under it (all instances
    /// together; checked at every poll). Random 96-bit nonces: NIST SP 800-38D §8.3 caps a key
    /// at 2^32 encryptions; the default (2^30) leaves room for the overshoot between polls.
    #[serde(default = "default_max_encryptions")]
    pub dek_max_encryptions: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            provider: ProviderKind::default(),
            poll_interval: default_poll(),
            dek_cache_ttl: default_ttl(),
            dek_cache_max_stale: default_max_stale(),
            local_master_key_file: None,
            auto_create_transit_keys: true,
            blocking_threshold_bytes: default_blocking_threshold(),
            dek_max_encryptions: default_max_encryptions(),
        }
    }
}

/// One `[[encrypt]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptColumn {
    /// `schema.table`, or `table` meaning `public.table`.
    pub table: String,
    pub column: String,
    /// Key name (transit key / KV secret name).
    pub key: String,
    /// Client-visible type.
    #[serde(rename = "type")]
    pub ty: ClientType,
    /// Maintain `<column>_bidx` for equality search.
    #[serde(default)]
    pub searchable: bool,
    /// Per-tenant keys: the token claim (e.g. `tenant_id`) whose value selects the data key,
    /// so each tenant's values are encrypted under that tenant's own key (see
    /// [`super::scope`]). A session without the claim can neither write nor read the column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_claim: Option<String>,
    /// Bind each value to its row's primary key (the key's canonical text joins the AAD), so
    /// a value copied into another row of the same table — same tenant included — fails its
    /// integrity check. Needs a single-column primary key of type smallint, integer, bigint,
    /// text, varchar or uuid; values written without the key (see the README) stay unbound.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bind_primary_key: bool,
}

/// The crypto sections of the pgward configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoConfig {
    #[serde(default)]
    pub vault: Option<VaultConfig>,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub encrypt: Vec<EncryptColumn>,
}

impl CryptoConfig {
    /// Checks serde cannot make: settings that only make sense together, names that reach
    /// Vault URLs or SQL, duplicate columns and key-id collisions. Returns the first problem.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(vault) = &self.vault {
            vault.validate()?;
        }
        self.keys.validate()?;
        if self.encrypt.is_empty() {
            return Ok(());
        }
        match self.keys.provider {
            ProviderKind::Transit | ProviderKind::Kv2 if self.vault.is_none() => {
                return Err(format!(
                    "[[encrypt]] with keys.provider = \"{}\" needs a [vault] section",
                    self.keys.provider.name()
                ))
            }
            ProviderKind::Local if self.keys.local_master_key_file.is_none() => {
                return Err("keys.provider = \"local\" needs keys.local_master_key_file".to_string())
            }
            _ => {}
        }
        let mut columns = std::collections::BTreeSet::new();
        let mut key_ids = std::collections::BTreeMap::new();
        for entry in &self.encrypt {
            entry.validate()?;
            let table = qualify_table(&entry.table);
            if !columns.insert((table.clone(), entry.column.clone())) {
                return Err(format!(
                    "[[encrypt]] column {table}.{} is configured twice",
                    entry.column
                ));
            }
            let id = super::envelope::key_name_id(&entry.key);
            if let Some(other) = key_ids.insert(id, entry.key.clone()) {
                if other != entry.key {
                    return Err(format!(
                        "[[encrypt]] key names {other:?} and {:?} collide on key id {id:#010x}; rename one",
                        entry.key
                    ));
                }
            }
        }
        Ok(())
    }
}

impl VaultConfig {
    fn validate(&self) -> Result<(), String> {
        crate::keys::vault::check_address(&self.address, self.allow_insecure_http)?;
        if self.approle.is_some() && self.token_file.is_some() {
            return Err("set either vault.token_file or [vault.approle], not both".into());
        }
        if self.request_timeout.is_zero() {
            return Err("vault.request_timeout must be above zero".into());
        }
        for (what, mount) in [
            ("vault.transit_mount", &self.transit_mount),
            ("vault.kv_mount", &self.kv_mount),
            ("vault.kv_prefix", &self.kv_prefix),
        ] {
            check_vault_path(what, mount)?;
        }
        if let Some(approle) = &self.approle {
            check_vault_path("vault.approle.mount", &approle.mount)?;
        }
        Ok(())
    }
}

impl KeysConfig {
    fn validate(&self) -> Result<(), String> {
        if self.poll_interval < Duration::from_secs(1) {
            return Err("keys.poll_interval must be at least 1s".into());
        }
        if self.dek_cache_ttl.is_zero() {
            return Err("keys.dek_cache_ttl must be above zero".into());
        }
        if self.dek_max_encryptions == 0 || self.dek_max_encryptions > 1 << 32 {
            return Err("keys.dek_max_encryptions must be between 1 and 2^32 (4294967296)".into());
        }
        if self.dek_cache_max_stale < self.dek_cache_ttl {
            return Err("keys.dek_cache_max_stale must not be below keys.dek_cache_ttl".into());
        }
        Ok(())
    }
}

impl ProviderKind {
    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Transit => "transit",
            ProviderKind::Kv2 => "kv2",
            ProviderKind::Local => "local",
        }
    }
}

impl EncryptColumn {
    fn validate(&self) -> Result<(), String> {
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "[[encrypt]] table {:?} must be `table` or `schema.table`",
                self.table
            ));
        }
        if self.column.is_empty() {
            return Err(format!(
                "[[encrypt]] for {} has an empty column",
                self.table
            ));
        }
        // Key names become Vault paths (`transit/keys/<key>`): no slashes, dots-only or spaces.
        let key_ok = !self.key.is_empty()
            && self.key != "."
            && self.key != ".."
            && self
                .key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !key_ok {
            return Err(format!(
                "[[encrypt]] {}.{}: key {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.table, self.column, self.key
            ));
        }
        if let Some(claim) = &self.context_claim {
            if claim.is_empty() || claim.chars().any(char::is_control) {
                return Err(format!(
                    "[[encrypt]] {}.{}: context_claim must be a non-empty claim name",
                    self.table, self.column
                ));
            }
        }
        Ok(())
    }
}

/// A mount or prefix that is spliced into Vault URLs: path segments without `..`.
fn check_vault_path(what: &str, path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {path:?} is not a valid Vault path"))
    }
}

/// `users` -> `public.users`; qualified names are kept as written (Postgres' stored case).
pub fn qualify_table(table: &str) -> String {
    qualified_table(table).into_owned()
}

/// [`qualify_table`] without a copy when the name is qualified already (lookups on the data
/// path, whose names the SQL side qualified).
pub fn qualified_table(table: &str) -> std::borrow::Cow<'_, str> {
    if table.contains('.') {
        table.into()
    } else {
        format!("public.{table}").into()
    }
}

fn default_token_env() -> String {
    "VAULT_TOKEN".into()
}
fn default_transit_mount() -> String {
    "transit".into()
}
fn default_kv_mount() -> String {
    "secret".into()
}
fn default_kv_prefix() -> String {
    "pgward".into()
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_poll() -> Duration {
    Duration::from_secs(60)
}
fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_stale() -> Duration {
    Duration::from_secs(24 * 3600)
}
/// 2^30: a quarter of the 2^32 bound for random nonces.
pub const DEFAULT_MAX_ENCRYPTIONS: u64 = 1 << 30;

fn default_max_encryptions() -> u64 {
    DEFAULT_MAX_ENCRYPTIONS
}
fn default_true() -> bool {
    true
}
fn default_blocking_threshold() -> usize {
    64 * 1024
}

/// Durations as humantime strings (`"30s"`, `"1h 30m"`).
mod humantime_serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_config() {
        let cfg: CryptoConfig = toml::from_str(
            r#"
            [vault]
            address = "https://127.0.0.1:8200"
            ca_file = "/etc/pgward/vault-ca.pem"
            [vault.approle]
            role_id_file = "/run/secrets/role_id"
            secret_id_file = "/run/secrets/secret_id"
            [keys]
            provider = "transit"
            poll_interval = "30s"
            dek_cache_ttl = "15m"
            [[encrypt]]
            table = "users"
            column = "email"
            key = "pii"
            type = "text"
            searchable = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.keys.poll_interval, Duration::from_secs(30));
        assert_eq!(cfg.keys.dek_cache_max_stale, Duration::from_secs(86400));
        assert_eq!(cfg.encrypt[0].ty, ClientType::Text);
        assert_eq!(cfg.vault.unwrap().approle.unwrap().mount, "approle");
        assert!(toml::from_str::<CryptoConfig>("[keys]\nprovidr = \"kv2\"").is_err());
        let remote_http: CryptoConfig =
            toml::from_str("[vault]\naddress = \"http://vault.example:8200\"").unwrap();
        assert!(
            remote_http.validate().is_err(),
            "plain http to a remote Vault"
        );
        let allowed: CryptoConfig = toml::from_str(
            "[vault]\naddress = \"http://vault.example:8200\"\nallow_insecure_http = true",
        )
        .unwrap();
        assert!(allowed.validate().is_ok());
        assert!(toml::from_str::<CryptoConfig>(
            "[[encrypt]]\ntable=\"t\"\ncolumn=\"c\"\nkey=\"k\"\ntype=\"float8\""
        )
        .is_err());
    }
}
