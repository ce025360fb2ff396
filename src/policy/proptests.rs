//! Property tests of the rewriter: for generated queries (nesting, joins, set operations,
//! CTEs including ones shadowing table names, quoting variants), the output reparses and
//! every reference to a protected table sits directly under its filter barrier.
use std::ops::ControlFlow;

use proptest::prelude::*;
use sqlparser::ast::{Select, SetExpr, TableFactor, Visit, Visitor};

use super::sql::{object_name_parts, parse_statements};
use super::tests::engine;
use super::PolicyIdentity;

fn table_ref() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "customers",
        "public.customers",
        "Customers",
        "\"customers\"",
        "invoices",
        "PUBLIC.Invoices",
        "public.\"invoices\"",
    ]);
    let alias = prop::sample::select(vec!["", " AS t", " x", " AS \"Q\""]);
    (names, alias).prop_map(|(n, a)| format!("{n}{a}"))
}

fn query() -> impl Strategy<Value = String> {
    let leaf = table_ref().prop_map(|t| format!("SELECT * FROM {t}"));
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            (inner.clone(), table_ref()).prop_map(|(q, t)| format!("SELECT * FROM ({q}) AS s JOIN {t} ON true")),
            (table_ref(), inner.clone()).prop_map(|(t, q)| format!("SELECT * FROM {t} WHERE id IN (SELECT id FROM ({q}) i)")),
            (table_ref(), inner.clone()).prop_map(|(t, q)| format!("SELECT (SELECT count(*) FROM ({q}) z) FROM {t} WHERE EXISTS (SELECT 1 FROM ({q}) y) AND id = 5")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) UNION ALL ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("WITH customers AS ({a}) SELECT * FROM customers WHERE EXISTS (SELECT 1 FROM ({b}) e)")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("WITH cte AS ({a}) SELECT * FROM cte, LATERAL ({b}) l")),
            (inner.clone(), table_ref()).prop_map(|(q, t)| format!("SELECT * FROM {t} JOIN ({q}) AS j ON j.id = 1 ORDER BY (SELECT 1)")),
        ]
    })
}

/// Checks every SELECT in the output: a FROM item naming a protected table must be the
/// only item of a barrier SELECT whose WHERE starts with the tenant filter and that has
/// OFFSET 0; unqualified names must be CTEs defined in the output.
struct BarrierCheck {
    ctes: Vec<String>,
    problems: Vec<String>,
}

impl Visitor for BarrierCheck {
    type Break = ();

    fn pre_visit_query(&mut self, q: &sqlparser::ast::Query) -> ControlFlow<()> {
        let is_barrier =
            matches!(&*q.body, SetExpr::Select(s) if names(s).iter().any(|n| n.len() == 2));
        if is_barrier
            && q.limit_clause
                .as_ref()
                .is_none_or(|l| !l.to_string().contains("OFFSET 0"))
        {
            self.problems.push(format!("barrier without OFFSET 0: {q}"));
        }
        if let Some(w) = &q.with {
            self.ctes.extend(
                w.cte_tables
                    .iter()
                    .map(|c| c.alias.name.value.to_lowercase()),
            );
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        for n in names(s) {
            match n.as_slice() {
                [schema, table]
                    if schema == "public" && (table == "customers" || table == "invoices") =>
                {
                    let ok = s.from.len() == 1
                        && s.from[0].joins.is_empty()
                        && s.selection
                            .as_ref()
                            .is_some_and(|w| w.to_string().starts_with("((\"tenant_id\") = (1))"));
                    if !ok {
                        self.problems.push(format!("unfiltered reference: {s}"));
                    }
                }
                [name] if self.ctes.contains(name) => {}
                other => self
                    .problems
                    .push(format!("unexpected relation {other:?} in {s}")),
            }
        }
        ControlFlow::Continue(())
    }
}

fn names(s: &Select) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for twj in &s.from {
        let mut factors = vec![&twj.relation];
        factors.extend(twj.joins.iter().map(|j| &j.relation));
        for f in factors {
            if let TableFactor::Table { name, .. } = f {
                out.push(object_name_parts(name).unwrap_or_default());
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn rewrite_never_drops_a_filter(sql in query()) {
        let e = engine();
        let mut claims = serde_json::Map::new();
        claims.insert("tenant_id".into(), serde_json::json!(1));
        let out = e.rewrite(&PolicyIdentity { service: "billing", claims: &claims }, &sql);
        let out = match out {
            Ok(o) => o,
            // Inputs sqlparser cannot parse are refused: fail closed, fine.
            Err(d) if d.message.contains("cannot parse") => return Err(TestCaseError::reject("unparsable input")),
            Err(d) => return Err(TestCaseError::fail(format!("{sql}: refused: {}", d.message))),
        };
        let parsed = parse_statements(&out.sql).map_err(|err| TestCaseError::fail(format!("{}: {err}", out.sql)))?;
        let mut check = BarrierCheck { ctes: Vec::new(), problems: Vec::new() };
        let _ = parsed.visit(&mut check);
        prop_assert!(check.problems.is_empty(), "{sql}\n=> {}\n{:?}", out.sql, check.problems);
        // Rewriting is idempotent in shape: the output contains one barrier per reference.
        prop_assert_eq!(out.sql.matches("OFFSET 0").count(), out.sql.matches("FROM \"public\".").count());
    }
}
