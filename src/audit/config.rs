//! `[audit]` configuration section.
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// What the proxy should do with a statement whose audit record could not be made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse the statement (fail closed). The default: an unaudited statement must not run.
    #[default]
    Refuse,
    /// Forward the statement anyway and log the audit failure (fail open).
    Continue,
}

/// When a statement's audit record must be durable (`[audit] durability`). In both modes the
/// record is written to the log file before the statement is forwarded, and no client sees
/// a result of a statement whose record is not durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Durable before any of the statement's responses reach the client: the server
    /// executes while the record is fsync'ed (group commit), and the responses wait for it.
    #[default]
    BeforeResponse,
    /// Durable before the statement is forwarded: execution waits for the fsync.
    BeforeForward,
}

/// The `[audit]` section of pgward's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of the JSON Lines files.
    pub dir: PathBuf,
    /// Rotate when the current file reaches this size. Integer bytes or "64MiB"/"10MB"/"512KiB".
    #[serde(default = "default_rotate_size", deserialize_with = "de_size")]
    pub rotate_size: u64,
    #[serde(default = "default_rotate_interval", deserialize_with = "de_duration")]
    pub rotate_interval: Duration,
    #[serde(
        default = "default_checkpoint_interval",
        deserialize_with = "de_duration"
    )]
    pub checkpoint_interval: Duration,
    /// Ed25519 PKCS#8 PEM key signing checkpoints. Without it checkpoints are unsigned and
    /// only the hash chain protects the log.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `true`: a statement runs only after its record is fsync'ed (survives power loss).
    /// `false`: only after it is written to the kernel (survives a pgward crash or `kill -9`,
    /// not a kernel crash or power loss), for disks where an fsync costs more than a query.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// Whether the fsync of a statement's record overlaps its execution.
    #[serde(default)]
    pub durability: Durability,
    /// Record literal values / bound parameters of non-encrypted columns.
    #[serde(default)]
    pub record_values: bool,
    /// Defaults to the host name.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Optional best-effort copy into a PostgreSQL table (`postgres://...`).
    #[serde(default)]
    pub table_sink_url: Option<String>,
    /// Optional best-effort copy to syslog through this datagram socket (e.g. `/dev/log`).
    #[serde(default)]
    pub syslog_socket: Option<PathBuf>,
    /// Optional live copy to a SIEM: syslog over TCP with TLS (RFC 5425).
    #[serde(default)]
    pub syslog_tls: Option<SyslogTlsConfig>,
    /// Extra time the writer waits to gather a batch. 0: write as soon as the writer is free;
    /// batching happens naturally while an fsync is in flight.
    #[serde(default, deserialize_with = "de_duration")]
    pub group_commit_max_delay: Duration,
    /// The longest a statement's results (or, `before_forward`, the statement itself) wait
    /// for its record's fsync before that counts as a failure of the log (`on_failure`).
    #[serde(
        default = "default_durability_timeout",
        deserialize_with = "de_duration"
    )]
    pub durability_timeout: Duration,
}

/// `[audit.syslog_tls]`: where and how to reach the collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogTlsConfig {
    /// `host:port` of the collector (6514 is syslog over TLS's registered port).
    pub address: String,
    /// CA certificate(s) the collector's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate and key, for collectors that require mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Name the collector's certificate must carry; defaults to the host of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Records waiting for the collector before further batches are dropped (counted).
    #[serde(default = "default_syslog_queue")]
    pub queue_records: usize,
}

fn default_syslog_queue() -> usize {
    100_000
}

fn default_true() -> bool {
    true
}
fn default_rotate_size() -> u64 {
    64 * 1024 * 1024
}
fn default_rotate_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_durability_timeout() -> Duration {
    Duration::from_secs(10)
}

impl AuditConfig {
    /// A configuration with every default and the given directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            enabled: true,
            dir: dir.into(),
            rotate_size: default_rotate_size(),
            rotate_interval: default_rotate_interval(),
            checkpoint_interval: default_checkpoint_interval(),
            signing_key_file: None,
            on_failure: OnFailure::Refuse,
            fsync: true,
            durability: Durability::BeforeResponse,
            record_values: false,
            node_id: None,
            table_sink_url: None,
            syslog_socket: None,
            syslog_tls: None,
            group_commit_max_delay: Duration::ZERO,
            durability_timeout: default_durability_timeout(),
        }
    }

    /// The node id to stamp on records: configured, else the host name.
    pub fn resolved_node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "pgward".to_string())
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeRepr::deserialize(d)? {
        SizeRepr::Bytes(n) => Ok(n),
        SizeRepr::Text(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("bad size {s:?}: use bytes or e.g. \"64MiB\""))
        }),
    }
}

/// Parses "123", "10KB", "64MiB", "1GiB" (KB/MB/GB are decimal, KiB/MiB/GiB binary).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_minimal_toml() {
        let c: AuditConfig = toml::from_str(r#"dir = "/var/log/pgward""#).unwrap();
        assert!(c.enabled);
        assert_eq!(c.rotate_size, 64 << 20);
        assert_eq!(c.rotate_interval, Duration::from_secs(3600));
        assert_eq!(c.checkpoint_interval, Duration::from_secs(60));
        assert_eq!(c.on_failure, OnFailure::Refuse);
        assert!(!c.record_values);
        assert_eq!(c.group_commit_max_delay, Duration::ZERO);
        assert_eq!(c.durability, Durability::BeforeResponse);
        assert_eq!(c.durability_timeout, Duration::from_secs(10));
        let c: AuditConfig =
            toml::from_str("dir = \"a\"\ndurability = \"before_forward\"").unwrap();
        assert_eq!(c.durability, Durability::BeforeForward);
        assert!(toml::from_str::<AuditConfig>("dir = \"a\"\ndurability = \"later\"").is_err());
    }

    #[test]
    fn full_toml_and_unknown_keys() {
        let c: AuditConfig = toml::from_str(
            r#"dir = "a"
rotate_size = "10MiB"
rotate_interval = "15m"
checkpoint_interval = "5s"
on_failure = "continue"
group_commit_max_delay = "200us"
node_id = "n1""#,
        )
        .unwrap();
        assert_eq!(c.rotate_size, 10 << 20);
        assert_eq!(c.rotate_interval, Duration::from_secs(900));
        assert_eq!(c.on_failure, OnFailure::Continue);
        assert_eq!(c.group_commit_max_delay, Duration::from_micros(200));
        assert_eq!(c.resolved_node_id(), "n1");
        assert!(toml::from_str::<AuditConfig>("dir = \"a\"\nbogus = 1").is_err());
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("2KB"), Some(2000));
        assert_eq!(parse_size("x"), None);
    }
}
