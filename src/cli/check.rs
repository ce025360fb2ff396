//! `pgward check --config FILE`: a preflight of everything a start would need, against the
//! real servers, reported item by item.
//!
//! Each item prints `ok`, `warn` or `FAIL` with the reason; any `FAIL` makes the exit code 1.
//! Nothing is written upstream: policies are type-checked by *preparing* probe statements
//! (parse analysis only), and the audit directory check removes its probe file.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use crate::config::Config;
use crate::policy::check::type_check_plan;
use crate::policy::{config as policy_config, Catalog};
use crate::upstream::{UpstreamError, UpstreamTarget};

/// `pgward check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration file.
    #[arg(long, short, default_value = "pgward.toml")]
    pub config: PathBuf,
    /// Database to log in to as each service (default: `policy.database`, else `postgres`).
    #[arg(long)]
    pub database: Option<String>,
}

/// The outcome of each item, in order.
#[derive(Debug, Default)]
pub struct Report {
    lines: Vec<String>,
    failures: usize,
}

impl Report {
    fn ok(&mut self, item: &str, detail: impl std::fmt::Display) {
        self.lines.push(format!("ok    {item}: {detail}"));
    }

    fn warn(&mut self, item: &str, detail: impl std::fmt::Display) {
        self.lines.push(format!("warn  {item}: {detail}"));
    }

    fn fail(&mut self, item: &str, detail: impl std::fmt::Display) {
        self.failures += 1;
        self.lines.push(format!("FAIL  {item}: {detail}"));
    }

    /// Items that failed.
    pub fn failures(&self) -> usize {
        self.failures
    }

    /// The report as printed.
    pub fn render(&self) -> String {
        let mut out = self.lines.join("\n");
        let _ = write!(
            out,
            "\n{}\n",
            if self.failures == 0 {
                "check passed".to_string()
            } else {
                format!("check FAILED: {} problem(s)", self.failures)
            }
        );
        out
    }
}

/// Run the preflight and print its report; 1 when anything failed.
pub async fn run(args: &CheckArgs) -> i32 {
    let report = check(&args.config, args.database.as_deref()).await;
    print!("{}", report.render());
    i32::from(report.failures() > 0)
}

/// Check the configuration at `path` against the servers it names.
pub async fn check(path: &Path, database: Option<&str>) -> Report {
    let mut report = Report::default();
    let config = match Config::from_file(path) {
        Ok(config) => {
            report.ok("configuration", path.display());
            config
        }
        Err(e) => {
            report.fail("configuration", e);
            return report;
        }
    };
    check_local_material(&config, &mut report).await;
    let database = database
        .map(str::to_string)
        .or_else(|| config.policy.as_ref().map(|p| p.database.clone()))
        .unwrap_or_else(|| "postgres".to_string());
    let target = match UpstreamTarget::new(&config.upstream) {
        Ok(target) => target,
        Err(e) => {
            report.fail("upstream TLS", e);
            return report;
        }
    };
    let passwords = check_logins(&config, &target, &database, &mut report).await;
    check_database(&config, &target, &passwords, &database, &mut report).await;
    check_vault(&config, &mut report).await;
    report
}

/// TLS certificate and key, token keys, audit directory: what is read from local files.
async fn check_local_material(config: &Config, report: &mut Report) {
    let listen = &config.listen;
    if let (Some(cert), Some(key)) = (&listen.tls_cert_file, &listen.tls_key_file) {
        match crate::tls::server_config(cert, key, listen.client_ca_file.as_deref()) {
            Ok(_) => report.ok("listen TLS", cert.display()),
            Err(e) => report.fail("listen TLS", e),
        }
    } else {
        report.warn(
            "listen TLS",
            "no certificate: only loopback plaintext clients can connect",
        );
    }
    match crate::auth::TokenVerifier::new(config.auth.clone()).await {
        Ok(_) => report.ok("token keys", "loaded"),
        Err(e) => report.fail("token keys", e),
    }
    match &config.audit {
        Some(audit) if audit.enabled => match crate::audit::probe_writable(&audit.dir) {
            Ok(()) => report.ok("audit", format!("{} is writable", audit.dir.display())),
            Err(e) => report.fail("audit", format!("{}: {e}", audit.dir.display())),
        },
        _ => report.warn("audit", "no [audit]: statements would not be audited"),
    }
    if let Some(cluster) = &config.cluster {
        check_cluster(cluster, report).await;
    }
}

/// The fleet's shared secret loads; each peer's port answers (a warning otherwise: peers may
/// simply not be up yet).
async fn check_cluster(cluster: &crate::config::ClusterConfig, report: &mut Report) {
    if let Err(e) = crate::proxy::cluster::PeerSet::prepare(cluster) {
        report.fail("cluster", e);
        return;
    }
    report.ok(
        "cluster",
        format!(
            "node {}, {} peer(s), secret loaded",
            cluster.node_id,
            cluster.peers.len()
        ),
    );
    for peer in &cluster.peers {
        let item = format!("cluster peer {}", peer.node_id);
        let connect = tokio::net::TcpStream::connect(peer.address.as_str());
        match tokio::time::timeout(cluster.peer_timeout, connect).await {
            Ok(Ok(_)) => report.ok(&item, format!("{} answers", peer.address)),
            Ok(Err(e)) => report.warn(&item, format!("{}: {e}", peer.address)),
            Err(_) => report.warn(&item, format!("{}: no answer", peer.address)),
        }
    }
}

/// Logs in upstream as each service's role; returns the resolved passwords.
async fn check_logins(
    config: &Config,
    target: &UpstreamTarget,
    database: &str,
    report: &mut Report,
) -> HashMap<String, Option<String>> {
    let mut passwords = HashMap::new();
    if config.services.is_empty() {
        report.warn("services", "none configured: no token can connect");
    }
    for (name, service) in &config.services {
        let item = format!("service {name}");
        let password = match service.upstream_password.as_ref().map(|s| s.resolve()) {
            Some(Err(e)) => {
                report.fail(&item, e);
                continue;
            }
            Some(Ok(p)) => Some(p),
            None => None,
        };
        match target
            .connect(&service.upstream_user, password.as_deref(), database, &[])
            .await
        {
            Ok(_) => report.ok(
                &item,
                format!(
                    "logged in upstream as role {:?} to database {database:?}",
                    service.upstream_user
                ),
            ),
            Err(e) => report.fail(
                &item,
                format!(
                    "upstream login as role {:?} failed: {}",
                    service.upstream_user,
                    login_failure(&e)
                ),
            ),
        }
        passwords.insert(name.clone(), password);
    }
    passwords
}

/// The server's own reason when it gave one, else the transport error.
pub fn login_failure(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Server { fields, .. } => format!(
            "{} (SQLSTATE {})",
            fields.message.as_deref().unwrap_or("(no message)"),
            fields.code.as_deref().unwrap_or("?????")
        ),
        other => other.to_string(),
    }
}

/// Migrations and policies, over one login as the catalog service.
async fn check_database(
    config: &Config,
    target: &UpstreamTarget,
    passwords: &HashMap<String, Option<String>>,
    database: &str,
    report: &mut Report,
) {
    let needs_keys_schema =
        !config.encrypt.is_empty() && config.keys.provider == crate::crypto::ProviderKind::Transit;
    if config.policy.is_none() && !needs_keys_schema {
        report.ok(
            "migrations",
            "none needed (no [policy], no transit encryption)",
        );
        return;
    }
    let service = config
        .catalog_service()
        .map(|(name, _)| name.to_string())
        .or_else(|| config.services.keys().next().cloned());
    let Some((name, service)) = service.and_then(|n| config.services.get_key_value(&n)) else {
        report.fail("migrations", "no service to log in with");
        return;
    };
    let password = passwords.get(name).cloned().flatten();
    let client = match target
        .admin_client(&service.upstream_user, password.as_deref(), database)
        .await
    {
        Ok(client) => client,
        Err(e) => {
            report.fail(
                "migrations",
                format!("cannot log in as service {name}: {e}"),
            );
            return;
        }
    };
    let mut required = Vec::new();
    if config.policy.is_some() {
        required.push((
            "function pgward.assert_row",
            "SELECT to_regprocedure('pgward.assert_row(boolean,text)') IS NOT NULL",
        ));
    }
    if needs_keys_schema {
        required.push((
            "table pgward.data_keys",
            "SELECT to_regclass('pgward.data_keys') IS NOT NULL",
        ));
        required.push((
            "table pgward.retired_keys",
            "SELECT to_regclass('pgward.retired_keys') IS NOT NULL",
        ));
        required.push((
            "table pgward.index_roots",
            "SELECT to_regclass('pgward.index_roots') IS NOT NULL",
        ));
    }
    for (what, sql) in required {
        match client
            .query_one(sql, &[])
            .await
            .map(|row| row.get::<_, bool>(0))
        {
            Ok(true) => report.ok("migrations", format!("{what} installed")),
            Ok(false) => report.fail(
                "migrations",
                format!("{what} is missing in database {database:?}: apply pgward's migrations"),
            ),
            Err(e) => report.fail("migrations", db_reason(&e)),
        }
    }
    if let Some(policy) = &config.policy {
        check_policies(config, &policy.dir, &client, report).await;
    }
}

/// Every `bind_primary_key` column's table has a single-column primary key of a type whose
/// canonical text pgward computes (else its statements would be refused).
fn check_row_binding(config: &Config, catalog: &Catalog, report: &mut Report) {
    for entry in config.encrypt.iter().filter(|e| e.bind_primary_key) {
        let table = crate::crypto::config::qualify_table(&entry.table);
        match crate::crypto::sql::primary_key_of(Some(catalog), &table) {
            Ok((pk, _)) => report.ok(
                "row binding",
                format!("{table}.{} is bound to primary key {pk}", entry.column),
            ),
            Err(e) => report.fail("row binding", e),
        }
    }
}

fn db_reason(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} (SQLSTATE {})", d.message(), d.code().code()))
        .unwrap_or_else(|| e.to_string())
}

/// Compiles every policy against the live catalog, then type-checks it on the server.
async fn check_policies(
    config: &Config,
    dir: &Path,
    client: &tokio_postgres::Client,
    report: &mut Report,
) {
    let catalog = match Catalog::load(client).await {
        Ok(catalog) => Arc::new(catalog),
        Err(e) => {
            report.fail("policies", e);
            return;
        }
    };
    check_row_binding(config, &catalog, report);
    let policies = match policy_config::load_dir(dir, &catalog) {
        Ok(policies) => policies,
        Err(errors) => {
            for e in errors {
                report.fail("policy", e);
            }
            return;
        }
    };
    let mut names: Vec<&String> = policies.keys().collect();
    names.sort();
    for name in names {
        let Some(policy) = policies.get(name) else {
            continue;
        };
        let item = format!("policy {name}");
        let failures_before = report.failures;
        let stem = Path::new(&policy.file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if stem != policy.service {
            report.fail(
                &item,
                format!(
                    "{} declares service {:?}: the file must be named {}.toml",
                    policy.file, policy.service, policy.service
                ),
            );
        }
        match config.service(name) {
            None => report.warn(
                &item,
                format!("no [services.{name}] in the configuration: no token can use it"),
            ),
            Some(s) if s.unrestricted => report.warn(
                &item,
                format!("[services.{name}] is unrestricted: the policy is not applied"),
            ),
            Some(_) => {}
        }
        let plan = type_check_plan(policy);
        for undeclared in &plan.undeclared {
            report.fail(&item, undeclared);
        }
        for probe in &plan.probes {
            if let Err(e) = client.prepare(&probe.sql).await {
                report.fail(
                    &item,
                    format!("{}: {}: {}", probe.rule, probe.what, db_reason(&e)),
                );
            }
        }
        if report.failures == failures_before {
            report.ok(&item, format!("{} compiled and type-checked", policy.file));
        }
    }
    for (name, service) in &config.services {
        if !service.unrestricted && !policies.contains_key(name) {
            report.warn(
                &format!("service {name}"),
                "neither unrestricted nor bound by a policy: its tokens will be refused",
            );
        }
    }
}

/// Reaches Vault with the configured credentials (a token lookup, or the AppRole login).
async fn check_vault(config: &Config, report: &mut Report) {
    let Some(vault) = &config.vault else {
        return;
    };
    let client = match crate::crypto::manager::vault_client(vault) {
        Ok(client) => client,
        Err(e) => {
            report.fail("vault", e);
            return;
        }
    };
    match client.get("auth/token/lookup-self").await {
        Ok(_) => report.ok("vault", format!("{}: token accepted", vault.address)),
        Err(e) => report.fail("vault", format!("{}: {e}", vault.address)),
    }
}
