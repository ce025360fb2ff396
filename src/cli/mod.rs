//! The `pgward` command line.

pub mod check;
mod demo_files;
pub mod dev;
pub mod keys;
pub mod notify;
pub mod policy;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::DevSigningKey;
use crate::config::Config;
use crate::proxy::Proxy;

/// pgward — a zero-trust data-protection proxy for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pgward", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,pgward=debug`.
    #[arg(long, global = true, env = "PGWARD_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Async worker threads (default: one per CPU core).
    #[arg(long, global = true, env = "PGWARD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy with a configuration file.
    Serve(ServeArgs),
    /// Preflight a configuration against the real servers: upstream logins, migrations,
    /// policies (compiled and type-checked), Vault. Non-zero exit on any failure.
    Check(check::CheckArgs),
    /// Run a complete local demo: throwaway PostgreSQL, demo schema, keys, certificate, proxy.
    Dev(dev::DevArgs),
    /// Development tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Row-policy tools: check, explain, test, export-rls.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Audit-log tools: verify, search, report.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Field-encryption keys: status, rewrap, reencrypt.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Encrypt an existing plaintext column in place (online, resumable, throttled).
    EncryptExisting(keys::EncryptExistingCommand),
}

/// `pgward audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check hash chains and signed checkpoints; non-zero exit on any break.
    Verify(crate::audit::verify::VerifyArgs),
    /// Filter records by service, time, table, column, decision, session, SQLSTATE, text.
    Search(crate::audit::search::SearchArgs),
    /// Render a self-contained HTML report.
    Report(crate::audit::report::ReportArgs),
    /// Export records as OCSF-style JSON or pgAudit-style CSV lines (same filters as search).
    Export(crate::audit::export::ExportArgs),
}

/// `pgward serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file.
    #[arg(long, short, default_value = "pgward.toml")]
    pub config: PathBuf,
}

/// `pgward token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token with the dev signing key (the one `pgward dev` uses in this directory).
    Mint(MintArgs),
}

/// `pgward token mint`.
#[derive(Debug, Args)]
pub struct MintArgs {
    /// The service the token identifies (its `sub`).
    #[arg(long)]
    pub service: String,
    /// Extra claims as key=value (numbers and true/false are typed; repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, serde_json::Value)>,
    /// Lifetime, e.g. 15m, 1h.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Directory holding the dev key.
    #[arg(long, default_value = dev::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Create the dev signing key (and its jwks.json) if the directory has none. Without it a
    /// missing key is an error: a new key silently minted tokens no running pgward accepts.
    #[arg(long)]
    pub create_key: bool,
    /// The pgward.toml the token is for: `--ttl` is checked against its
    /// `auth.max_token_lifetime` (default: the pgward.toml in DIR, else the default 1h).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `key=value` → a typed JSON claim: integers, floats and booleans keep their type.
pub fn parse_claim(text: &str) -> Result<(String, serde_json::Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected key=value, got {text:?}"))?;
    if key.is_empty() {
        return Err("claim name is empty".into());
    }
    let typed = match value {
        "true" => serde_json::Value::Bool(true),
        "false" => serde_json::Value::Bool(false),
        v => v
            .parse::<i64>()
            .map(serde_json::Value::from)
            .or_else(|_| v.parse::<f64>().map(serde_json::Value::from))
            .unwrap_or_else(|_| serde_json::Value::String(v.to_string())),
    };
    Ok((key.to_string(), typed))
}

/// Set up logging once.
pub fn init_tracing(filter: &str, json: bool) {
    // Directives naming the quieted targets are dropped: EnvFilter keeps the more verbose of
    // two directives for one target, so `sqlparser=debug` would otherwise win over ours.
    let filter: Vec<&str> = filter
        .split(',')
        .filter(|directive| {
            let target = directive.trim();
            !(target.starts_with("sqlparser") || target.starts_with("tokio_postgres"))
        })
        .collect();
    let filter = tracing_subscriber::EnvFilter::try_new(filter.join(","))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(quiet_sql_parser())
        .add_directive(quiet_postgres_client());
    // Colour codes only for a person at a terminal: in journald, files and pipes they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// pgward's own database connections (the catalog, the data key store, `pgward dev`'s role
/// setup) go through tokio-postgres, whose debug events print each statement with its
/// parameters — role passwords, wrapped keys: never above info, whatever `--log` asks for.
fn quiet_postgres_client() -> tracing_subscriber::filter::Directive {
    "tokio_postgres=info"
        .parse()
        .unwrap_or_else(|_| tracing_subscriber::filter::LevelFilter::INFO.into())
}

/// sqlparser logs every statement it parses (literals included) at debug level: those may be
/// values of encrypted columns, so its logging is always off, whatever `--log` says.
fn quiet_sql_parser() -> tracing_subscriber::filter::Directive {
    "sqlparser=off"
        .parse()
        .unwrap_or_else(|_| tracing_subscriber::filter::LevelFilter::INFO.into())
}

/// Run the command line; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    init_tracing(&cli.log, cli.log_json);
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| 0),
        Command::Check(args) => Ok(check::run(&args).await),
        Command::Dev(args) => dev::run(args).await.map(|()| 0),
        Command::Token(TokenCommand::Mint(args)) => {
            println!("{}", mint(&args)?);
            Ok(0)
        }
        Command::Policy(command) => policy::run(command).await,
        Command::Keys(command) => keys::run_keys(command).await,
        Command::EncryptExisting(command) => keys::run_encrypt_existing(command).await,
        Command::Audit(command) => {
            use crate::audit::{export, report, search, verify};
            let code = match &command {
                AuditCommand::Verify(args) => verify::run_verify(args),
                AuditCommand::Search(args) => search::run_search(args),
                AuditCommand::Report(args) => report::run_report(args),
                AuditCommand::Export(args) => export::run_export(args),
            };
            Ok(if code == std::process::ExitCode::SUCCESS {
                0
            } else {
                1
            })
        }
    }
}

fn mint(args: &MintArgs) -> anyhow::Result<String> {
    if !args.create_key && !DevSigningKey::key_path(&args.dir).exists() {
        anyhow::bail!(
            "no dev signing key in {}: run `pgward dev` (which creates it) or pass --create-key",
            args.dir.display()
        );
    }
    let max = max_token_lifetime(&args.dir, args.config.as_deref())?;
    if args.ttl > max {
        eprintln!(
            "pgward token mint: warning: --ttl {} exceeds auth.max_token_lifetime ({}): pgward will refuse this token",
            humantime::format_duration(args.ttl),
            humantime::format_duration(max)
        );
    }
    let key = DevSigningKey::load_or_create(&args.dir)?;
    let claims: serde_json::Map<String, serde_json::Value> = args.claims.iter().cloned().collect();
    Ok(key.mint(
        &args.service,
        &claims,
        args.ttl,
        Some(dev::DEV_AUDIENCE),
        Some(dev::DEV_ISSUER),
    )?)
}

/// The token lifetime the configuration accepts: `config`'s (which must load), else the dev
/// configuration's in `dir`, else the default.
fn max_token_lifetime(
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
) -> anyhow::Result<Duration> {
    if let Some(path) = config {
        return Ok(Config::from_file(path)?.auth.max_token_lifetime);
    }
    Ok(Config::from_file(&dir.join("pgward.toml"))
        .map(|config| config.auth.max_token_lifetime)
        .unwrap_or_else(|_| crate::auth::AuthConfig::default().max_token_lifetime))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_file(&args.config)?;
    let target = crate::upstream::UpstreamTarget::new(&config.upstream)?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        () = wait_for_upstream(&target) => {}
        () = &mut shutdown => return Ok(()),
    }
    let proxy = Proxy::bind(config).await?;
    spawn_reload_on_sighup(&proxy, args.config.clone())?;
    notify::notify("READY=1");
    proxy
        .run(async move {
            shutdown.await;
            notify::notify("STOPPING=1");
        })
        .await;
    Ok(())
}

/// Longest pause between two attempts to reach upstream at start.
const MAX_UPSTREAM_BACKOFF: Duration = Duration::from_secs(30);

/// Upstream down when pgward starts (both restarted together, the server still recovering) is
/// not a configuration error: wait for it with exponential backoff instead of exiting, so the
/// service manager does not have to.
async fn wait_for_upstream(target: &crate::upstream::UpstreamTarget) {
    let mut pause = Duration::from_millis(250);
    let mut attempt = 1u32;
    loop {
        match target.probe().await {
            Ok(()) => {
                if attempt > 1 {
                    tracing::info!(attempt, "upstream reachable");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, retry_in = ?pause, "upstream not reachable at start; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_UPSTREAM_BACKOFF);
        attempt += 1;
    }
}

/// SIGHUP re-reads the configuration file and, only if it is valid as a whole (it parses,
/// validates, every upstream password and the token keys load), applies it: services and
/// upstream passwords, `[auth]`, the live `[audit]` settings (`proxy::reload`), then the
/// listen certificate and key, the encryption keys and the policy files. A file that does not
/// load changes nothing; settings that need a restart are named in the log and ignored.
pub fn spawn_reload_on_sighup(proxy: &Proxy, config_path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let reloader = proxy.reloader();
    let policies = proxy.policies();
    let encryption = proxy.encryption();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            notify::notify("RELOADING=1");
            let config = match read_config_off_runtime(&config_path).await {
                Ok(config) => config,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the configuration file is invalid; nothing reloaded, the running configuration stays");
                    notify::notify("READY=1");
                    continue;
                }
            };
            if let Err(e) = reloader.apply(&config).await {
                tracing::error!(error = %e, "SIGHUP: the configuration cannot be applied; nothing reloaded, the running configuration stays");
                notify::notify("READY=1");
                continue;
            }
            tracing::info!(
                "SIGHUP: services, upstream passwords, token settings and keys reloaded"
            );
            // Files again: read on a blocking thread.
            match tokio::task::spawn_blocking(crate::tls::reload_server_certificates).await {
                Ok(Ok(0)) => {}
                Ok(Ok(_)) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed, keeping the previous certificate")
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS reload stopped, keeping the previous certificate")
                }
            }
            if let Some(encryption) = &encryption {
                // Picks up a KEK rotation now instead of at the next poll.
                encryption.manager.reload().await;
                tracing::info!("SIGHUP: encryption keys refreshed");
            }
            if let Some(policies) = &policies {
                // The catalog too: DDL run around pgward (views, new tables) becomes known.
                policies.refresh_catalog().await;
                if policies.reload_files().await.is_ok() {
                    tracing::info!("SIGHUP: catalog and policies reloaded");
                }
            }
            notify::notify("READY=1");
        }
    });
    Ok(())
}

/// Reads and validates the configuration file on a blocking thread: a stalled disk holds the
/// reload, not a worker of the runtime that the sessions run on.
async fn read_config_off_runtime(path: &std::path::Path) -> anyhow::Result<Config> {
    let path = path.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || Config::from_file(&path)).await??)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_keep_their_types() {
        assert_eq!(parse_claim("tenant_id=1").unwrap().1, serde_json::json!(1));
        assert_eq!(
            parse_claim("admin=true").unwrap().1,
            serde_json::json!(true)
        );
        assert_eq!(parse_claim("name=a=b").unwrap().1, serde_json::json!("a=b"));
        assert!(parse_claim("novalue").is_err());
        assert!(parse_claim("=1").is_err());
    }
}
