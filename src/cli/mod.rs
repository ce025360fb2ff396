//! The `pgward` command line.

pub mod dev;
pub mod keys;

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
    /// Run a complete local demo: throwaway PostgreSQL, demo schema, keys, certificate, proxy.
    Dev(dev::DevArgs),
    /// Development tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Row-policy tools: check, explain, test, export-rls.
    #[command(subcommand)]
    Policy(PolicyCommand),
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

/// `pgward policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy set against a database.
    Check(crate::policy::cli::CheckArgs),
    /// Print the rewrite of a statement for a service, or the refusal and its rule.
    Explain(crate::policy::cli::ExplainArgs),
    /// Run the policy test files.
    Test(crate::policy::cli::TestArgs),
    /// Emit equivalent PostgreSQL CREATE POLICY statements.
    ExportRls(crate::policy::cli::ExportRlsArgs),
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
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(quiet_sql_parser());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
        Command::Dev(args) => dev::run(args).await.map(|()| 0),
        Command::Token(TokenCommand::Mint(args)) => {
            println!("{}", mint(&args)?);
            Ok(0)
        }
        Command::Policy(command) => policy(command).await,
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

async fn policy(command: PolicyCommand) -> anyhow::Result<i32> {
    use crate::policy::cli;
    let result = match &command {
        PolicyCommand::Check(args) => cli::run_check(args).await,
        PolicyCommand::Explain(args) => cli::run_explain(args).await,
        PolicyCommand::Test(args) => cli::run_test(args).await,
        PolicyCommand::ExportRls(args) => cli::run_export_rls(args).await,
    };
    match result {
        Ok(output) => {
            print!("{output}");
            Ok(0)
        }
        Err(e) => {
            eprintln!("pgward policy: {e}");
            Ok(1)
        }
    }
}

fn mint(args: &MintArgs) -> anyhow::Result<String> {
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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_file(&args.config)?;
    let proxy = Proxy::bind(config).await?;
    spawn_reload_on_sighup(&proxy)?;
    proxy.run(shutdown_signal()).await;
    Ok(())
}

/// SIGHUP re-reads token key material and the policy files.
pub fn spawn_reload_on_sighup(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let verifier = proxy.verifier();
    let policies = proxy.policies();
    let encryption = proxy.encryption();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Some(encryption) = &encryption {
                // Picks up a KEK rotation now instead of at the next poll.
                encryption.manager.poll_once().await;
                tracing::info!("SIGHUP: encryption keys refreshed");
            }
            if let Some(policies) = &policies {
                // The catalog too: DDL run around pgward (views, new tables) becomes known.
                policies.refresh_catalog().await;
                if policies.reload_files().is_ok() {
                    tracing::info!("SIGHUP: catalog and policies reloaded");
                }
            }
            match verifier.reload().await {
                Ok(()) => tracing::info!("SIGHUP: token keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: reload failed, keeping the previous keys")
                }
            }
        }
    });
    Ok(())
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
