//! `pgward.toml`: the configuration file, every key documented in the README.
//!
//! Secrets never appear in the file itself: they are named by file path or environment variable
//! ([`SecretRef`]). Unknown keys are errors, so a typo never silently disables a protection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::auth::AuthConfig;

/// A configuration that could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("secret {what}: {detail}")]
    Secret { what: String, detail: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Upstream credentials (and options) per service, keyed by the token's service identity.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    /// Row and column policies; without this section only `unrestricted` services may connect.
    pub policy: Option<PolicyConfig>,
    /// The audit log; without this section nothing is audited (pgward warns at start).
    pub audit: Option<crate::audit::AuditConfig>,
    /// `[vault]`: how to reach Vault/OpenBao (field encryption, see `crypto::config`).
    #[serde(default)]
    pub vault: Option<crate::crypto::VaultConfig>,
    /// `[keys]`: key provider and caching.
    #[serde(default)]
    pub keys: crate::crypto::KeysConfig,
    /// `[[encrypt]]`: the encrypted columns.
    #[serde(default)]
    pub encrypt: Vec<crate::crypto::EncryptColumn>,
    /// `[cluster]`: this replica's node id and its peers, so cancels reach the right replica.
    pub cluster: Option<ClusterConfig>,
    /// `[pool]`: the pooling defaults of services that do not set their own.
    #[serde(default)]
    pub pool: PoolDefaults,
}

/// How a service's client sessions use upstream server connections (PgBouncer's `pool_mode`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// Each client session holds its own server connection from login to logout.
    #[default]
    Session,
    /// A server connection is lent for one transaction (or one statement outside a
    /// transaction) and returned to the pool of its (upstream role, database).
    Transaction,
}

/// `[pool]`: defaults for every service (each may override them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDefaults {
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// Server connections per (upstream role, database) in transaction mode.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long a client waits for a server connection before 53300.
    #[serde(default = "default_pool_timeout", with = "humantime_serde")]
    pub pool_timeout: Duration,
}

impl Default for PoolDefaults {
    fn default() -> Self {
        Self {
            pool_mode: PoolMode::Session,
            pool_size: default_pool_size(),
            pool_timeout: default_pool_timeout(),
        }
    }
}

fn default_pool_size() -> usize {
    20
}

fn default_pool_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A service's pooling, its own settings over `[pool]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub size: usize,
    pub timeout: Duration,
}

/// Largest `cluster.node_id`: the node id takes the top 6 bits of every secret key handed out.
pub const MAX_NODE_ID: u8 = 63;

/// One replica of a fleet of pgwards serving the same services behind a load balancer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's id (0–63), unique in the fleet; carried in the secret key of every
    /// BackendKeyData it hands out. Changing it needs a restart.
    pub node_id: u8,
    /// The secret every replica shares (at least 32 bytes): it authenticates forwarded cancels.
    pub secret: SecretRef,
    /// How long handing a cancel to a peer may take (connect, send, the peer's delivery).
    #[serde(default = "default_peer_timeout", with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// The other replicas.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

/// Another replica: where its client listener is reachable directly (not through the load
/// balancer).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub node_id: u8,
    /// `host:port` of the peer's `listen.address`.
    pub address: String,
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), String> {
        let in_range = |id: u8, what: &str| {
            if id > MAX_NODE_ID {
                Err(format!("{what} {id} is out of range (0–{MAX_NODE_ID})"))
            } else {
                Ok(())
            }
        };
        in_range(self.node_id, "cluster.node_id")?;
        if self.peer_timeout.is_zero() || self.peer_timeout > Duration::from_secs(60) {
            return Err("cluster.peer_timeout must be between 1ms and 60s".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            in_range(peer.node_id, "cluster.peers node_id")?;
            if peer.node_id == self.node_id {
                return Err(format!(
                    "cluster.peers: node_id {} is this replica's own cluster.node_id",
                    peer.node_id
                ));
            }
            if !seen.insert(peer.node_id) {
                return Err(format!(
                    "cluster.peers: node_id {} is listed twice",
                    peer.node_id
                ));
            }
            let valid_address = peer.address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !valid_address {
                return Err(format!(
                    "cluster.peers node_id {}: address {:?} is not host:port",
                    peer.node_id, peer.address
                ));
            }
        }
        Ok(())
    }
}

/// Where the row policies live and which database they describe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (one TOML file per service).
    pub dir: PathBuf,
    /// The database the policies are written for: policy-bound services may only connect to it.
    pub database: String,
    /// Service whose upstream login reads the catalog (the first configured service by default).
    pub catalog_service: Option<String>,
    /// How often the policy files are checked for changes (besides SIGHUP); 0 disables.
    #[serde(default = "default_policy_watch", with = "humantime_serde")]
    pub watch_interval: Duration,
    /// How often the catalog is re-read, to notice DDL made around pgward; 0 disables.
    #[serde(default = "default_catalog_refresh", with = "humantime_serde")]
    pub catalog_refresh_interval: Duration,
    /// Log a policy-bound session in upstream with each claim its policy uses as the setting
    /// `app.<claim>`, so row-level security installed by `policy export-rls` applies too.
    #[serde(default)]
    pub claims_as_settings: bool,
}

/// Where and how clients connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address to accept PostgreSQL clients on.
    #[serde(default = "default_listen_address")]
    pub address: SocketAddr,
    /// PEM certificate chain; TLS is offered when this and `tls_key_file` are set.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the certificate.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to (enables mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// Accept clients without TLS, but only from loopback addresses (development only).
    #[serde(default)]
    pub allow_plaintext_loopback: bool,
    /// Load balancers that open each connection with a PROXY protocol header (v1 or v2)
    /// naming the client: required from them, never read from anyone else.
    #[serde(default)]
    pub proxy_protocol_from: crate::protocol::proxy_header::TrustedPeers,
    /// Most client connections at once; more get SQLSTATE 53300.
    #[serde(default = "default_max_connections")]
    pub max_client_connections: usize,
    /// Largest message accepted from a client, in bytes; larger ones end that connection (08P01).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Time a client has from connecting to being authenticated.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Close sessions idle (outside a transaction) for this long; 0 disables.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long running statements may take before sessions are closed.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// The PostgreSQL server pgward protects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host name or IP address; a value starting with `/` is a unix-socket directory.
    #[serde(default = "default_upstream_host")]
    pub host: String,
    #[serde(default = "default_upstream_port")]
    pub port: u16,
    /// `disable`, `require` (encrypt, no verification) or `verify-full`.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA bundle for `verify-full` (the system's web roots otherwise).
    pub tls_ca_file: Option<PathBuf>,
    /// Name the server certificate must carry (defaults to `host`).
    pub tls_server_name: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// TLS towards the upstream server.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTls {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

/// What pgward does for one service once its token is verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The PostgreSQL role pgward logs in as for this service.
    pub upstream_user: String,
    /// The role's password (absent for trust authentication).
    pub upstream_password: Option<SecretRef>,
    /// Not bound by a row policy (still authenticated and audited).
    #[serde(default)]
    pub unrestricted: bool,
    /// `session` or `transaction` (default: `[pool] pool_mode`).
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Server connections per (upstream role, database) in transaction mode.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// How long a client waits for a server connection before 53300.
    #[serde(default, with = "humantime_serde")]
    pub pool_timeout: Option<Duration>,
}

impl ServiceConfig {
    /// This service's pooling: its own settings, else the `[pool]` defaults.
    pub fn pooling(&self, defaults: &PoolDefaults) -> PoolSettings {
        PoolSettings {
            mode: self.pool_mode.unwrap_or(defaults.pool_mode),
            size: self.pool_size.unwrap_or(defaults.pool_size),
            timeout: self.pool_timeout.unwrap_or(defaults.pool_timeout),
        }
    }
}

/// A secret, by file or environment variable — never inline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretRef {
    /// Read from this file (a trailing newline is ignored).
    File(PathBuf),
    /// Read from this environment variable.
    Env(String),
}

impl SecretRef {
    /// Resolve the secret's value.
    pub fn resolve(&self) -> Result<String, ConfigError> {
        match self {
            SecretRef::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| ConfigError::Secret {
                    what: path.display().to_string(),
                    detail: e.to_string(),
                }),
            SecretRef::Env(name) => std::env::var(name).map_err(|_| ConfigError::Secret {
                what: format!("${name}"),
                detail: "environment variable not set".into(),
            }),
        }
    }
}

/// The admin HTTP endpoint (`/metrics`, `/healthz`) and who may use the admin console.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to serve on; no admin endpoint when absent.
    pub address: Option<SocketAddr>,
    /// Services (from `[services]`) whose clients may open the admin console, database
    /// `pgward` on the client listener (`SHOW POOLS` …). Reloaded on SIGHUP.
    #[serde(default)]
    pub console_services: Vec<String>,
}

fn default_listen_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_message_bytes() -> usize {
    128 * 1024 * 1024
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_policy_watch() -> Duration {
    Duration::from_secs(2)
}
fn default_catalog_refresh() -> Duration {
    Duration::from_secs(60)
}
fn default_peer_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_upstream_host() -> String {
    "127.0.0.1".into()
}
fn default_upstream_port() -> u16 {
    5432
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Config {
    /// Load and validate a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let config: Config = toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error: Box::new(error),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that span several keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.listen;
        if l.tls_cert_file.is_some() != l.tls_key_file.is_some() {
            return Err(ConfigError::Invalid(
                "listen.tls_cert_file and listen.tls_key_file must be set together".into(),
            ));
        }
        if l.client_ca_file.is_some() && l.tls_cert_file.is_none() {
            return Err(ConfigError::Invalid(
                "listen.client_ca_file needs TLS (listen.tls_cert_file)".into(),
            ));
        }
        if l.tls_cert_file.is_none() && !l.allow_plaintext_loopback {
            return Err(ConfigError::Invalid(
                "no TLS certificate configured: tokens must travel over TLS; set listen.tls_cert_file/tls_key_file (or allow_plaintext_loopback = true for development)".into(),
            ));
        }
        if l.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "listen.max_message_bytes must be at least 1024".into(),
            ));
        }
        if let Some(policy) = &self.policy {
            if self.catalog_service().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "policy.catalog_service {:?} is not a configured service",
                    policy
                        .catalog_service
                        .as_deref()
                        .unwrap_or("(none configured)")
                )));
            }
        }
        if self.upstream.tls == UpstreamTls::Disable && self.upstream.tls_ca_file.is_some() {
            return Err(ConfigError::Invalid(
                "upstream.tls_ca_file is set but upstream.tls is \"disable\"".into(),
            ));
        }
        self.validate_pooling()?;
        if let Some(name) = self
            .admin
            .console_services
            .iter()
            .find(|name| !self.services.contains_key(*name))
        {
            return Err(ConfigError::Invalid(format!(
                "admin.console_services: {name:?} is not a configured service"
            )));
        }
        self.crypto().validate().map_err(ConfigError::Invalid)?;
        if let Some(bound) = self.encrypt.iter().find(|e| e.bind_primary_key) {
            if self.policy.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "[[encrypt]] {}.{} has bind_primary_key, which needs the table's primary key from the catalog: configure [policy]",
                    bound.table, bound.column
                )));
            }
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// The crypto sections (`[vault]`, `[keys]`, `[[encrypt]]`) as the crypto layer takes them.
    pub fn crypto(&self) -> crate::crypto::CryptoConfig {
        crate::crypto::CryptoConfig {
            vault: self.vault.clone(),
            keys: self.keys.clone(),
            encrypt: self.encrypt.clone(),
        }
    }

    /// The upstream settings of a service, if it is configured.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.get(name)
    }

    /// Pool sizes are usable, and no transaction-mode service relies on session settings.
    fn validate_pooling(&self) -> Result<(), ConfigError> {
        let claims_as_settings = self.policy.as_ref().is_some_and(|p| p.claims_as_settings);
        for (name, service) in &self.services {
            let pool = service.pooling(&self.pool);
            if pool.size == 0 || pool.size > 10_000 {
                return Err(ConfigError::Invalid(format!(
                    "services.{name}: pool_size must be between 1 and 10000"
                )));
            }
            if pool.timeout.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "services.{name}: pool_timeout must be more than 0"
                )));
            }
            if pool.mode == PoolMode::Transaction && claims_as_settings && !service.unrestricted {
                return Err(ConfigError::Invalid(format!(
                    "services.{name}: pool_mode = \"transaction\" cannot be combined with [policy] claims_as_settings: the claims would be session settings of a server connection other clients share; use pool_mode = \"session\" for this service or turn claims_as_settings off"
                )));
            }
        }
        if self.pool.pool_size == 0 {
            return Err(ConfigError::Invalid(
                "pool.pool_size must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The service whose upstream login loads the policy catalog.
    pub fn catalog_service(&self) -> Option<(&str, &ServiceConfig)> {
        let policy = self.policy.as_ref()?;
        match &policy.catalog_service {
            Some(name) => self.services.get_key_value(name),
            None => self.services.iter().next(),
        }
        .map(|(name, service)| (name.as_str(), service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [listen]
        allow_plaintext_loopback = true
        [upstream]
        port = 5433
        [services.billing]
        upstream_user = "app"
        upstream_password = { env = "APP_PW" }
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config: Config = toml::from_str(MINIMAL).unwrap();
        config.validate().unwrap();
        assert_eq!(config.listen.address.port(), 6432);
        assert_eq!(config.upstream.port, 5433);
        assert_eq!(config.listen.startup_timeout, Duration::from_secs(15));
        assert!(matches!(
            config.service("billing").unwrap().upstream_password,
            Some(SecretRef::Env(_))
        ));
    }

    #[test]
    fn pooling_defaults_overrides_and_the_claims_as_settings_conflict() {
        let config: Config = toml::from_str(MINIMAL).unwrap();
        let pool = config.service("billing").unwrap().pooling(&config.pool);
        assert_eq!(pool.mode, PoolMode::Session);
        let text = format!(
            "{MINIMAL}\npool_mode = \"transaction\"\npool_size = 5\npool_timeout = \"2s\"\n"
        );
        let config: Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        let pool = config.service("billing").unwrap().pooling(&config.pool);
        assert_eq!(
            (pool.mode, pool.size, pool.timeout),
            (PoolMode::Transaction, 5, Duration::from_secs(2))
        );
        let zero = text.replace("pool_size = 5", "pool_size = 0");
        assert!(toml::from_str::<Config>(&zero).unwrap().validate().is_err());
        let rls =
            format!("{text}[policy]\ndir = \"p\"\ndatabase = \"d\"\nclaims_as_settings = true\n");
        let error = toml::from_str::<Config>(&rls)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(error.to_string().contains("claims_as_settings"), "{error}");
    }

    #[test]
    fn console_services_must_be_configured_services() {
        let text = format!("{MINIMAL}\n[admin]\nconsole_services = [\"billing\"]\n");
        assert_eq!(load(&text).unwrap().admin.console_services, ["billing"]);
        let error = load(&text.replace("[\"billing\"]", "[\"ops\"]")).unwrap_err();
        assert!(
            error.contains("\"ops\" is not a configured service"),
            "{error}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = MINIMAL.replace("port = 5433", "port = 5433\nprot = 1");
        assert!(toml::from_str::<Config>(&text).is_err());
    }

    #[test]
    fn plaintext_without_the_explicit_switch_is_refused() {
        let text = MINIMAL.replace("allow_plaintext_loopback = true", "");
        let config: Config = toml::from_str(&text).unwrap();
        assert!(config.validate().is_err());
    }

    const ENCRYPTION: &str = r#"
        [vault]
        address = "https://vault.internal:8200"
        token_file = "/run/secrets/vault-token"
        [keys]
        poll_interval = "30s"
        [[encrypt]]
        table = "users"
        column = "email"
        key = "pii"
        type = "text"
        searchable = true
        [[encrypt]]
        table = "billing.cards"
        column = "number"
        key = "pci"
        type = "text"
    "#;

    fn load(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn encryption_sections_load_with_defaults() {
        let config = load(&format!("{MINIMAL}{ENCRYPTION}")).unwrap();
        let crypto = config.crypto();
        assert_eq!(crypto.keys.provider, crate::crypto::ProviderKind::Transit);
        assert_eq!(crypto.keys.poll_interval, Duration::from_secs(30));
        assert_eq!(crypto.vault.as_ref().unwrap().transit_mount, "transit");
        assert_eq!(crypto.encrypt.len(), 2);
        // No encryption configured at all is fine too.
        assert!(load(MINIMAL).unwrap().encrypt.is_empty());
    }

    #[test]
    fn encryption_mistakes_are_refused_at_load() {
        let full = format!("{MINIMAL}{ENCRYPTION}");
        let refused = |text: String, needle: &str| {
            let err = load(&text).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        };
        refused(
            full.replace("poll_interval", "provider = \"vaultish\"\npoll_interval"),
            "unknown variant",
        );
        // Secrets only by reference: an inline token is an unknown key.
        refused(
            full.replace("token_file = ", "token = \"s.abc\"\ntoken_file = "),
            "unknown field `token`",
        );
        refused(full.replace("key = \"pci\"\n", ""), "missing field `key`");
        refused(
            full.replace("billing.cards", "public.users")
                .replace("\"number\"", "\"email\""),
            "public.users.email is configured twice",
        );
        refused(full.replace("\"pci\"", "\"../sys\""), "key \"../sys\"");
        let no_vault = format!(
            "{MINIMAL}{}",
            &ENCRYPTION[ENCRYPTION.find("[keys]").unwrap()..]
        );
        refused(no_vault, "needs a [vault] section");
        refused(
            full.replace(
                "token_file = \"/run/secrets/vault-token\"",
                "token_file = \"/t\"\n[vault.approle]\nrole_id_file = \"/r\"\nsecret_id_file = \"/s\"",
            ),
            "not both",
        );
        refused(full.replace("\"30s\"", "\"0s\""), "poll_interval");
        refused(
            full.replace(
                "key = \"pci\"\n",
                "key = \"pci\"\nbind_primary_key = true\n",
            ),
            "bind_primary_key, which needs the table's primary key from the catalog",
        );
    }

    const CLUSTER: &str = r#"
        [cluster]
        node_id = 1
        secret = { file = "/etc/pgward/cluster.key" }
        [[cluster.peers]]
        node_id = 2
        address = "10.0.0.12:6432"
        [[cluster.peers]]
        node_id = 3
        address = "pgward-3.internal:6432"
    "#;

    #[test]
    fn cluster_section_loads_and_its_mistakes_are_refused() {
        let full = format!("{MINIMAL}{CLUSTER}");
        let config = load(&full).unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!((cluster.node_id, cluster.peers.len()), (1, 2));
        assert_eq!(cluster.peer_timeout, Duration::from_secs(5));
        let refused = |text: String, needle: &str| {
            let err = load(&text).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        };
        refused(full.replace("node_id = 3", "node_id = 2"), "listed twice");
        refused(
            full.replace("node_id = 3", "node_id = 1"),
            "own cluster.node_id",
        );
        refused(full.replace("node_id = 1", "node_id = 64"), "out of range");
        refused(full.replace("node_id = 3", "node_id = 99"), "out of range");
        refused(full.replace("node_id = 1", "node_id = 300"), "node_id");
        refused(
            full.replace(":6432\"\n        [[", "\"\n        [["),
            "not host:port",
        );
        refused(full.replace("10.0.0.12:6432", ":6432"), "not host:port");
        refused(
            full.replace("secret = { file = \"/etc/pgward/cluster.key\" }", ""),
            "missing field `secret`",
        );
        refused(
            full.replace("node_id = 1\n", "node_id = 1\npeer_timeout = \"0s\"\n"),
            "peer_timeout",
        );
        refused(full.replace("address =", "addr ="), "unknown field");
        // A cluster of one (no peers yet) is valid.
        let alone = &CLUSTER[..CLUSTER.find("[[cluster.peers]]").unwrap()];
        assert!(load(&format!("{MINIMAL}{alone}")).is_ok());
    }

    #[test]
    fn durations_are_human_readable() {
        let text = MINIMAL.replace("[upstream]", "idle_timeout = \"5m\"\n[upstream]");
        let config: Config = toml::from_str(&text).unwrap();
        assert_eq!(config.listen.idle_timeout, Duration::from_secs(300));
    }
}
