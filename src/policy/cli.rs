//! `pgward policy ...` subcommands, as clap `Args` structs and async functions the binary
//! mounts: `export-rls`, `check`, `explain`, `test`.
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::Deserialize;
use sqlparser::ast::{Expr, VisitMut, VisitorMut};

use super::config::{claim_call, ServicePolicy, TablePolicy};
use super::sql::{parse_expr, quote_ident, quote_literal};
use super::{Catalog, PolicyEngine, PolicyError, PolicyIdentity};

/// Errors of the CLI tools.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("connecting to the database: {0}")]
    Connect(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Catalog(#[from] super::CatalogError),
    #[error("invalid policies:\n{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<PolicyError>),
    #[error("{0}")]
    Usage(String),
    #[error("{failed} of {total} policy tests failed")]
    TestsFailed { failed: usize, total: usize },
}

#[derive(Debug, Clone, Args)]
pub struct ExportRlsArgs {
    /// Directory of policy files.
    #[arg(long, default_value = "policies")]
    pub dir: PathBuf,
    /// Upstream database (to validate tables and columns).
    #[arg(long, env = "PGWARD_DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Directory of policy files.
    #[arg(default_value = "policies")]
    pub dir: PathBuf,
    #[arg(long, env = "PGWARD_DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[arg(long, default_value = "policies")]
    pub dir: PathBuf,
    #[arg(long, env = "PGWARD_DATABASE_URL")]
    pub database_url: String,
    #[arg(long)]
    pub service: String,
    /// Claims as k=v; v is read as JSON when it parses (numbers, booleans), else as a string.
    #[arg(long = "claim")]
    pub claims: Vec<String>,
    pub sql: String,
}

#[derive(Debug, Clone, Args)]
pub struct TestArgs {
    #[arg(long, default_value = "policies")]
    pub dir: PathBuf,
    /// Directory of test files (`*.toml`, see `policies/tests/`).
    #[arg(long, default_value = "policies/tests")]
    pub tests: PathBuf,
    #[arg(long, env = "PGWARD_DATABASE_URL")]
    pub database_url: String,
}

async fn connect_catalog(url: &str) -> Result<Arc<Catalog>, CliError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    let catalog = Catalog::load(&client).await?;
    drop(client);
    let _ = driver.await;
    Ok(Arc::new(catalog))
}

async fn engine(dir: &Path, url: &str) -> Result<PolicyEngine, CliError> {
    let catalog = connect_catalog(url).await?;
    PolicyEngine::load(dir, catalog, &[]).map_err(CliError::Policies)
}

/// `policy check [DIR]`: validates every file against the live catalog.
pub async fn run_check(args: &CheckArgs) -> Result<String, CliError> {
    let e = engine(&args.dir, &args.database_url).await?;
    Ok(format!(
        "ok: {} service(s): {}",
        e.services().len(),
        e.services().join(", ")
    ))
}

/// `policy export-rls`: equivalent PostgreSQL row-level security (roles named as services,
/// claims read from `app.<claim>` settings).
pub async fn run_export_rls(args: &ExportRlsArgs) -> Result<String, CliError> {
    let e = engine(&args.dir, &args.database_url).await?;
    Ok(export_rls(&e))
}

pub fn parse_claims(
    items: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, CliError> {
    let mut m = serde_json::Map::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("claim {item:?} is not k=v")))?;
        let value =
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        m.insert(k.to_string(), value);
    }
    Ok(m)
}

/// `policy explain`: prints the rewrite, or the refusal and its rule.
pub async fn run_explain(args: &ExplainArgs) -> Result<String, CliError> {
    let e = engine(&args.dir, &args.database_url).await?;
    let claims = parse_claims(&args.claims)?;
    Ok(
        match e.rewrite(
            &PolicyIdentity {
                service: &args.service,
                claims: &claims,
            },
            &args.sql,
        ) {
            Ok(r) => r.sql.clone(),
            Err(d) => format!(
                "REFUSED ({}): {}\nrule: {}",
                d.sqlstate,
                d.message,
                d.rule.as_deref().unwrap_or("-")
            ),
        },
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(rename = "case")]
    cases: Vec<TestCase>,
}

/// One policy test: a statement, an identity, and the expected rewrite substrings or refusal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub service: String,
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub sql: String,
    #[serde(default)]
    pub expect_contains: Vec<String>,
    /// Substring of the refusal message; the case passes only if refused.
    pub expect_refused: Option<String>,
}

/// Runs test cases against an engine; returns (report, failures).
pub fn run_cases(e: &PolicyEngine, file: &str, text: &str) -> (String, usize, usize) {
    let mut out = String::new();
    let parsed: TestFile = match toml::from_str(text) {
        Ok(p) => p,
        Err(err) => return (format!("{file}: {err}\n"), 1, 1),
    };
    let mut failed = 0;
    for case in &parsed.cases {
        let result = e.rewrite(
            &PolicyIdentity {
                service: &case.service,
                claims: &case.claims,
            },
            &case.sql,
        );
        let problem = match (&result, &case.expect_refused) {
            (Ok(r), None) => case
                .expect_contains
                .iter()
                .find(|s| !r.sql.contains(s.as_str()))
                .map(|s| format!("rewrite lacks {s:?}: {}", r.sql)),
            (Ok(r), Some(_)) => Some(format!("expected refusal, got {}", r.sql)),
            (Err(d), Some(want)) => (!d.message.contains(want.as_str()))
                .then(|| format!("refusal {:?} lacks {want:?}", d.message)),
            (Err(d), None) => Some(format!("unexpected refusal: {}", d.message)),
        };
        match problem {
            None => {
                let _ = writeln!(out, "ok   {file}: {}", case.name);
            }
            Some(p) => {
                failed += 1;
                let _ = writeln!(out, "FAIL {file}: {}: {p}", case.name);
            }
        }
    }
    (out, failed, parsed.cases.len())
}

/// `policy test`: runs every `*.toml` in the tests directory.
pub async fn run_test(args: &TestArgs) -> Result<String, CliError> {
    let e = engine(&args.dir, &args.database_url).await?;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&args.tests)
        .map_err(|err| CliError::Usage(format!("{}: {err}", args.tests.display())))?
        .filter_map(|d| d.ok().map(|d| d.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let (mut report, mut failed, mut total) = (String::new(), 0, 0);
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|err| CliError::Usage(format!("{}: {err}", p.display())))?;
        let (r, f, t) = run_cases(&e, &p.display().to_string(), &text);
        report.push_str(&r);
        failed += f;
        total += t;
    }
    if failed > 0 {
        tracing::warn!("{report}");
        return Err(CliError::TestsFailed { failed, total });
    }
    Ok(report)
}

/// RLS statements equivalent to the loaded policies.
pub fn export_rls(e: &PolicyEngine) -> String {
    let out = String::from("-- generated by `pgward policy export-rls`; roles are named after services,\n-- claims come from `SET app.<claim> = ...`.\n");
    export(e, out, true)
}

/// Only the GRANTs of [`export_rls`]: the table and column privileges each service's role
/// needs for what its policy allows (`pgward dev` gives them to its per-service roles).
pub fn export_grants(e: &PolicyEngine) -> String {
    export(e, String::new(), false)
}

/// [`export_grants`] for the policies of `dir` over the catalog at `url`.
pub async fn grants_for(dir: &Path, url: &str) -> Result<String, CliError> {
    Ok(export_grants(&engine(dir, url).await?))
}

fn export(e: &PolicyEngine, mut out: String, with_policies: bool) -> String {
    let mut enabled = std::collections::BTreeSet::new();
    for service in e.services() {
        let Some(p) = e.policy(&service) else {
            continue;
        };
        let mut tables: Vec<&TablePolicy> = p.tables.values().collect();
        tables.sort_by_key(|t| t.info.qualified());
        for t in tables {
            let rel = format!(
                "{}.{}",
                quote_ident(&t.info.schema),
                quote_ident(&t.info.name)
            );
            if with_policies && enabled.insert(rel.clone()) {
                let _ = writeln!(out, "ALTER TABLE {rel} ENABLE ROW LEVEL SECURITY;");
            }
            export_table(&mut out, &p, t, &rel, with_policies);
        }
    }
    out
}

fn export_table(
    out: &mut String,
    p: &ServicePolicy,
    t: &TablePolicy,
    rel: &str,
    with_policies: bool,
) {
    let role = quote_ident(&p.service);
    let cols = t
        .visible
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let writable = t
        .visible
        .iter()
        .filter(|c| !t.is_preset(c))
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let using = t
        .filter
        .as_ref()
        .map(|f| rls_expr(f, p))
        .unwrap_or_else(|| "true".into());
    let check = t
        .check
        .as_ref()
        .map(|f| rls_expr(f, p))
        .unwrap_or_else(|| "true".into());
    let name =
        |action: &str| quote_ident(&format!("pgward_{}_{}_{action}", p.service, t.info.name));
    if t.select {
        let _ = writeln!(out, "GRANT SELECT ({cols}) ON {rel} TO {role};");
        if with_policies {
            let _ = writeln!(
                out,
                "CREATE POLICY {} ON {rel} FOR SELECT TO {role} USING ({using});",
                name("select")
            );
        }
    }
    // pgward itself writes the presets, so a role behind pgward needs them; under RLS alone
    // the role must not write them (a column DEFAULT does).
    let insertable = if with_policies { &writable } else { &cols };
    if t.insert {
        let _ = writeln!(out, "GRANT INSERT ({insertable}) ON {rel} TO {role};");
        if with_policies {
            let _ = writeln!(
                out,
                "CREATE POLICY {} ON {rel} FOR INSERT TO {role} WITH CHECK ({check});",
                name("insert")
            );
        }
        for (c, v) in t.presets.iter().filter(|_| with_policies) {
            let _ = writeln!(
                out,
                "-- preset {}.{c} = {} has no RLS equivalent (use a column DEFAULT)",
                t.info.name,
                rls_expr(v, p)
            );
        }
    }
    if t.update {
        let _ = writeln!(out, "GRANT UPDATE ({writable}) ON {rel} TO {role};");
        if with_policies {
            let _ = writeln!(
                out,
                "CREATE POLICY {} ON {rel} FOR UPDATE TO {role} USING ({using}) WITH CHECK ({check});",
                name("update")
            );
        }
    }
    if t.delete {
        let _ = writeln!(out, "GRANT DELETE ON {rel} TO {role};");
        if with_policies {
            let _ = writeln!(
                out,
                "CREATE POLICY {} ON {rel} FOR DELETE TO {role} USING ({using});",
                name("delete")
            );
        }
    }
}

struct ClaimToSetting<'a>(&'a ServicePolicy);

impl VisitorMut for ClaimToSetting<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Some(Ok(claim)) = claim_call(e) {
            let ty = self
                .0
                .claim_types
                .get(&claim)
                .cloned()
                .unwrap_or_else(|| "text".into());
            let text = format!(
                "CAST(current_setting({}) AS {ty})",
                quote_literal(&format!("app.{claim}"))
            );
            if let Ok(new) = parse_expr(&text) {
                *e = new;
            }
        }
        ControlFlow::Continue(())
    }
}

fn rls_expr(e: &Expr, p: &ServicePolicy) -> String {
    let mut e = e.clone();
    let _ = e.visit(&mut ClaimToSetting(p));
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_mentions_settings() {
        let e = crate::policy::tests::engine();
        let sql = export_rls(&e);
        assert!(sql.contains("CREATE POLICY \"pgward_billing_customers_select\" ON \"public\".\"customers\" FOR SELECT TO \"billing\" USING (tenant_id = CAST(current_setting('app.tenant_id') AS BIGINT));"), "{sql}");
        assert!(sql.contains("GRANT SELECT (\"id\", \"tenant_id\", \"name\", \"email\", \"created_at\") ON \"public\".\"customers\" TO \"support\";"), "{sql}");
    }

    #[test]
    fn shipped_policy_tests_pass() {
        let e = crate::policy::tests::engine();
        for entry in std::fs::read_dir("policies/tests").unwrap() {
            let p = entry.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let (report, failed, total) = run_cases(&e, &p.display().to_string(), &text);
            assert!(total > 0);
            assert_eq!(failed, 0, "{report}");
        }
    }

    #[test]
    fn claims_parse() {
        let m = parse_claims(&["tenant_id=1".into(), "name=bob".into()]).unwrap();
        assert_eq!(m["tenant_id"], serde_json::json!(1));
        assert_eq!(m["name"], serde_json::json!("bob"));
    }
}
