//! `pgward policy ...`: the policy tools of `policy::cli`, fed either by explicit flags or by a
//! pgward configuration (`--config`): its `policy.dir`, its `policy.database` and the catalog
//! service's upstream login — the same view of the database the proxy has.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::config::{Config, UpstreamTls};
use crate::policy::cli as tools;

/// Where the policies and the database come from.
#[derive(Debug, Clone, Args)]
pub struct PolicySource {
    /// pgward configuration file: provides the policy directory, the database and the login
    /// (the catalog service's upstream role). Explicit flags win over it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Database URL or key=value string (required without --config).
    #[arg(long, env = "PGWARD_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `pgward policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy set against a database.
    Check {
        /// Directory of policy files (default: `policy.dir` of --config, else `policies`).
        dir: Option<PathBuf>,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Print the rewrite of a statement for a service, or the refusal and its rule.
    Explain {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        source: PolicySource,
        #[arg(long)]
        service: String,
        /// Claims as k=v; v is read as JSON when it parses (numbers, booleans), else as a string.
        #[arg(long = "claim")]
        claims: Vec<String>,
        sql: String,
    },
    /// Run the policy test files.
    Test {
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Directory of test files (default: `<dir>/tests`).
        #[arg(long)]
        tests: Option<PathBuf>,
        #[command(flatten)]
        source: PolicySource,
    },
    /// Emit equivalent PostgreSQL CREATE POLICY statements.
    ExportRls {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        source: PolicySource,
    },
}

/// Run a policy tool; prints its output, returns the exit code.
pub async fn run(command: PolicyCommand) -> anyhow::Result<i32> {
    let result = match command {
        PolicyCommand::Check { dir, source } => {
            let (dir, database_url) = resolve(&source, dir)?;
            tools::run_check(&tools::CheckArgs { dir, database_url }).await
        }
        PolicyCommand::Explain {
            dir,
            source,
            service,
            claims,
            sql,
        } => {
            let (dir, database_url) = resolve(&source, dir)?;
            tools::run_explain(&tools::ExplainArgs {
                dir,
                database_url,
                service,
                claims,
                sql,
            })
            .await
        }
        PolicyCommand::Test { dir, tests, source } => {
            let (dir, database_url) = resolve(&source, dir)?;
            let tests = tests.unwrap_or_else(|| dir.join("tests"));
            tools::run_test(&tools::TestArgs {
                dir,
                tests,
                database_url,
            })
            .await
        }
        PolicyCommand::ExportRls { dir, source } => {
            let (dir, database_url) = resolve(&source, dir)?;
            tools::run_export_rls(&tools::ExportRlsArgs { dir, database_url }).await
        }
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

/// The policy directory and the connection string, from flags first, then the configuration.
fn resolve(source: &PolicySource, dir: Option<PathBuf>) -> anyhow::Result<(PathBuf, String)> {
    let config = source
        .config
        .as_deref()
        .map(Config::from_file)
        .transpose()?;
    let policy = config.as_ref().and_then(|c| c.policy.as_ref());
    let dir = dir
        .or_else(|| policy.map(|p| p.dir.clone()))
        .unwrap_or_else(|| PathBuf::from("policies"));
    let url = match (&source.database_url, &config) {
        (Some(url), _) => url.clone(),
        (None, Some(config)) => connection_string(config)?,
        (None, None) => anyhow::bail!("give --config FILE or --database-url (PGWARD_DATABASE_URL)"),
    };
    Ok((dir, url))
}

/// A libpq key=value string logging in as the catalog service to the policy database.
fn connection_string(config: &Config) -> anyhow::Result<String> {
    let policy = config
        .policy
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the configuration has no [policy] section"))?;
    let (_, service) = config
        .catalog_service()
        .ok_or_else(|| anyhow::anyhow!("the configuration names no catalog service"))?;
    if config.upstream.tls != UpstreamTls::Disable {
        // The policy tools connect without TLS; say so rather than fail obscurely.
        tracing::warn!("the policy tools connect upstream without TLS; upstream.tls is ignored");
    }
    let mut parts = vec![
        ("host", config.upstream.host.clone()),
        ("port", config.upstream.port.to_string()),
        ("user", service.upstream_user.clone()),
        ("dbname", policy.database.clone()),
        ("application_name", "pgward-policy".to_string()),
    ];
    if let Some(password) = &service.upstream_password {
        parts.push(("password", password.resolve()?));
    }
    Ok(parts
        .into_iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_string_quotes_every_value() {
        std::env::set_var("PGWARD_POLICY_CLI_TEST_PW", "it's a \\ secret");
        let config: Config = toml::from_str(
            r#"
            [listen]
            allow_plaintext_loopback = true
            [upstream]
            host = "/run/postgresql"
            port = 5433
            [services.app]
            upstream_user = "app"
            upstream_password = { env = "PGWARD_POLICY_CLI_TEST_PW" }
            [policy]
            dir = "p"
            database = "shop"
            "#,
        )
        .unwrap();
        let text = connection_string(&config).unwrap();
        assert!(text.contains("host='/run/postgresql' port='5433' user='app' dbname='shop'"));
        assert!(text.contains("password='it\\'s a \\\\ secret'"));
        let parsed: tokio_postgres::Config = text.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's a \\ secret"[..]));
    }
}
