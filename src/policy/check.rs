//! Preflight type checks of compiled policies (`pgward check`).
//!
//! Loading a policy proves its tables and columns exist; it cannot prove that
//! `tenant_id = claim('tenant_id')` compares values of one type, because a claim's type is what
//! `claim_types` declares and only the server knows which operators exist. So each filter, check
//! and preset becomes a probe statement in which every `claim('x')` is `CAST(NULL AS <declared
//! type>)` — the shape the rewriter gives typed claims — and the caller asks the server to
//! *prepare* (never execute) it: the server's parse analysis reports any type mismatch.
use std::ops::ControlFlow;

use sqlparser::ast::{Expr, VisitMut, VisitorMut};

use super::config::{claim_call, ServicePolicy};
use super::sql::{parse_expr, quote_ident};

/// One statement to prepare upstream, with the rule it checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeProbe {
    /// `file:line` of the rule.
    pub rule: String,
    /// What is checked, e.g. `filter of public.customers`.
    pub what: String,
    /// The statement to prepare.
    pub sql: String,
}

/// Problems found without the server, and the probes to run on it.
#[derive(Clone, Debug, Default)]
pub struct TypeCheckPlan {
    /// Claims referenced but absent from `claim_types` (their SQL type would depend on the
    /// JSON type of each token's value), as messages with the rule.
    pub undeclared: Vec<String>,
    pub probes: Vec<TypeProbe>,
}

/// Builds the probes of one service's policy.
pub fn type_check_plan(policy: &ServicePolicy) -> TypeCheckPlan {
    let mut plan = TypeCheckPlan::default();
    let mut tables: Vec<_> = policy.tables.values().collect();
    tables.sort_by_key(|tp| tp.info.qualified());
    for tp in tables {
        let target = format!(
            "{}.{}",
            quote_ident(&tp.info.schema),
            quote_ident(&tp.info.name)
        );
        let table = format!("{}.{}", tp.info.schema, tp.info.name);
        let mut exprs: Vec<(String, &str, &Expr, Option<&str>)> = Vec::new();
        if let Some(filter) = &tp.filter {
            exprs.push((format!("filter of {table}"), &tp.filter_rule, filter, None));
        }
        // A check defaulted from the filter is the same expression: probe it once.
        if let Some(check) = tp
            .check
            .as_ref()
            .filter(|_| tp.check_rule != tp.filter_rule)
        {
            exprs.push((format!("check of {table}"), &tp.check_rule, check, None));
        }
        for (column, expr) in &tp.presets {
            exprs.push((
                format!("preset {table}.{column}"),
                &tp.presets_rule,
                expr,
                Some(column.as_str()),
            ));
        }
        for (what, rule, expr, preset_column) in exprs {
            let mut typed = expr.clone();
            let mut typer = ClaimTyper {
                policy,
                undeclared: Vec::new(),
            };
            let _ = typed.visit(&mut typer);
            for claim in typer.undeclared {
                let message = format!(
                    "{rule}: claim {claim:?} is not declared in claim_types of service {:?}",
                    policy.service
                );
                if !plan.undeclared.contains(&message) {
                    plan.undeclared.push(message);
                }
            }
            // An INSERT checks a preset as the rewriter uses it: assigned to its column.
            let sql = match preset_column {
                Some(column) => format!(
                    "INSERT INTO {target} ({}) VALUES ({typed})",
                    quote_ident(column)
                ),
                None => format!("SELECT 1 FROM {target} WHERE ({typed})"),
            };
            plan.probes.push(TypeProbe {
                rule: rule.to_string(),
                what,
                sql,
            });
        }
    }
    plan
}

/// Replaces `claim('x')` by `CAST(NULL AS <declared type>)`, noting undeclared claims (left as
/// an untyped NULL, which type-checks against anything, so they are reported only once).
struct ClaimTyper<'a> {
    policy: &'a ServicePolicy,
    undeclared: Vec<String>,
}

impl VisitorMut for ClaimTyper<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let Some(Ok(name)) = claim_call(expr) else {
            return ControlFlow::Continue(());
        };
        let replacement = match self.policy.claim_types.get(&name) {
            // Declared types passed `allow::is_safe_type` when the policy was compiled.
            Some(ty) => parse_expr(&format!("CAST(NULL AS {ty})")),
            None => {
                self.undeclared.push(name);
                parse_expr("NULL")
            }
        };
        if let Ok(replacement) = replacement {
            *expr = replacement;
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::catalog::{Catalog, ColumnInfo, RelKind, TableInfo};
    use crate::policy::config::compile_file;

    fn catalog() -> Catalog {
        let column = |name: &str, ty: &str| ColumnInfo {
            name: name.into(),
            type_name: ty.into(),
            type_oid: 20,
            not_null: false,
        };
        Catalog::from_tables(vec![TableInfo {
            schema: "public".into(),
            name: "orders".into(),
            oid: 1,
            kind: RelKind::Table,
            columns: vec![column("id", "bigint"), column("tenant_id", "bigint")],
            primary_key: vec!["id".into()],
        }])
    }

    #[test]
    fn claims_become_typed_nulls_and_undeclared_ones_are_reported() {
        let text = r#"
            claim_types = { tenant = "bigint" }
            [tables.orders]
            actions = ["select", "insert"]
            filter = "tenant_id = claim('tenant') OR id = claim('region')"
            presets = { tenant_id = "claim('tenant')" }
        "#;
        let policy = compile_file("svc.toml", "svc", text, &catalog()).unwrap();
        let plan = type_check_plan(&policy);
        assert_eq!(plan.undeclared.len(), 1, "{:?}", plan.undeclared);
        assert!(plan.undeclared[0].contains("\"region\""));
        let sqls: Vec<&str> = plan.probes.iter().map(|p| p.sql.as_str()).collect();
        assert!(sqls.iter().any(
            |s| s.starts_with("SELECT 1 FROM \"public\".\"orders\" WHERE")
                && s.to_lowercase().contains("cast(null as bigint)")
                && !s.contains("claim(")
        ));
        assert!(sqls
            .iter()
            .any(|s| s.starts_with("INSERT INTO \"public\".\"orders\" (\"tenant_id\")")));
    }
}
