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

/// WHERE clauses of a leaf: none, leakproof point lookups (a top-level SELECT may then filter
/// in place), and predicates that could leak (which always need the barrier).
fn leaf_where() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "",
        " WHERE id = 5",
        " WHERE id = 5 AND status = 'x'",
        " WHERE 1/(id-42) = 1",
        " WHERE CAST(status AS int) = 1 AND id = 5",
        " WHERE id = 5 OR id = 6",
    ])
}

fn query() -> impl Strategy<Value = String> {
    let leaf = (table_ref(), leaf_where()).prop_map(|(t, w)| {
        // `status` only exists in invoices; customers gets `name`.
        let w = if t.to_lowercase().contains("customers") {
            w.replace("status", "name")
        } else {
            w.to_string()
        };
        format!("SELECT * FROM {t}{w}")
    });
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
    depth: usize,
    /// The statement's own SELECT filters its table in place (no barrier).
    flat_top: bool,
}

/// `((["alias".]"tenant_id") = (1))`, the tenant filter, optionally alias-qualified.
fn is_tenant_filter(e: &sqlparser::ast::Expr) -> bool {
    let text = e.to_string();
    text == "((\"tenant_id\") = (1))"
        || (text.starts_with("((") && text.ends_with(".\"tenant_id\") = (1))"))
}

/// A flat top-level WHERE: the tenant filter, then only leakproof `col = literal` conjuncts.
fn is_flat_where(w: &sqlparser::ast::Expr) -> bool {
    use sqlparser::ast::{BinaryOperator, Expr};
    match w {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            is_tenant_filter(left)
                && super::rewrite::conjuncts(right)
                    .into_iter()
                    .all(|c| super::rewrite::leakproof_eq(c).is_some())
        }
        other => is_tenant_filter(other),
    }
}

impl Visitor for BarrierCheck {
    type Break = ();

    fn pre_visit_query(&mut self, q: &sqlparser::ast::Query) -> ControlFlow<()> {
        self.depth += 1;
        let is_barrier =
            matches!(&*q.body, SetExpr::Select(s) if names(s).iter().any(|n| n.len() == 2));
        let flat = self.depth == 1
            && q.with.is_none()
            && matches!(&*q.body, SetExpr::Select(s)
                if s.from.len() == 1 && s.from[0].joins.is_empty() && names(s).len() == 1
                    && s.selection.as_ref().is_some_and(is_flat_where));
        if flat {
            self.flat_top = true;
        } else if is_barrier
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

    fn post_visit_query(&mut self, _q: &sqlparser::ast::Query) -> ControlFlow<()> {
        self.depth -= 1;
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
                        && s.selection.as_ref().is_some_and(|w| {
                            w.to_string().starts_with("((\"tenant_id\") = (1))")
                                || (self.flat_top && self.depth == 1 && is_flat_where(w))
                        });
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
        let mut check = BarrierCheck { ctes: Vec::new(), problems: Vec::new(), depth: 0, flat_top: false };
        let _ = parsed.visit(&mut check);
        prop_assert!(check.problems.is_empty(), "{sql}\n=> {}\n{:?}", out.sql, check.problems);
        // One barrier per reference, but for a top-level SELECT filtered in place.
        prop_assert_eq!(
            out.sql.matches("OFFSET 0").count() + usize::from(check.flat_top),
            out.sql.matches("FROM \"public\".").count()
        );
        // (BarrierCheck accepts a top-level SELECT without a barrier only when every conjunct
        // next to the filter is a leakproof `col = literal`: `1/(id-42)`, CAST and OR leaves
        // must come out behind a barrier.)
    }
}

/// Statements that differ only in literals: `{n}` takes a number, `{s}` a string literal.
const SHAPED: &[(&str, &str)] = &[
    ("billing", "SELECT * FROM customers WHERE id = {n}"),
    ("billing", "SELECT name, email FROM customers c WHERE c.id = {n} AND name = {s} LIMIT {n}"),
    ("billing", "SELECT id FROM invoices WHERE status IN ({s}, {s}) AND amount_cents > -{n} OFFSET {n}"),
    ("billing", "SELECT i.id, c.name FROM invoices i JOIN customers c ON c.id = i.customer_id WHERE i.amount_cents BETWEEN {n} AND {n}"),
    ("billing", "SELECT (SELECT count(*) FROM invoices WHERE customer_id = {n}), {s}, {n} FROM customers WHERE name LIKE {s}"),
    ("billing", "UPDATE invoices SET status = {s}, amount_cents = amount_cents + {n} WHERE id = {n} RETURNING id, status"),
    ("billing", "INSERT INTO invoices (customer_id, amount_cents, status) VALUES ({n}, {n}, {s}), ({n}, {n}, {s})"),
    ("billing", "INSERT INTO customers (id, name, email) VALUES ({n}, {s}, {s}) ON CONFLICT (id) DO UPDATE SET name = {s}"),
    ("billing", "WITH big AS (SELECT * FROM invoices WHERE amount_cents > {n}) SELECT count(*) FROM big WHERE status <> {s}"),
    ("billing", "SELECT CASE WHEN amount_cents > {n} THEN {s} ELSE {s} END FROM invoices; SELECT {n}"),
    ("support", "SELECT name FROM customers WHERE id = {n} UNION ALL SELECT status FROM invoices WHERE id = {n}"),
    ("analytics", "SELECT tenant_id, count(*) FROM customers WHERE created_at > {s} GROUP BY tenant_id HAVING count(*) > {n}"),
];

fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..u64::MAX).prop_map(|n| n.to_string()),
        (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}")),
        (1u32..99, -30i32..30).prop_map(|(a, e)| format!("{a}e{e}")),
        (0u32..100).prop_map(|n| format!(".{n}")),
    ]
}

fn string_literal() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 '%_é;$-]{0,12}".prop_map(|s| format!("'{}'", s.replace('\'', "''")))
}

fn fill(shape: &str, numbers: &[String], strings: &[String]) -> String {
    let (mut n, mut s) = (numbers.iter().cycle(), strings.iter().cycle());
    let mut out = String::new();
    let mut rest = shape;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let literal = if rest[at..].starts_with("{n}") {
            n.next()
        } else {
            s.next()
        };
        out.push_str(literal.map_or("0", String::as_str));
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// A statement served from its shape's template says exactly what its own rewrite says,
    /// for any values of its literals, and the template is what served it.
    #[test]
    fn shape_templates_equal_exact_rewrites(
        which in 0..SHAPED.len(),
        numbers in prop::collection::vec(number_literal(), 1..6),
        strings in prop::collection::vec(string_literal(), 1..6),
    ) {
        let (service, shape) = SHAPED[which];
        let e = engine();
        let policy = e.policy(service).expect("demo policy");
        let mut claims = serde_json::Map::new();
        claims.insert("tenant_id".into(), serde_json::json!(7));
        let who = PolicyIdentity { service, claims: &claims };
        // Learn the shape from fixed values, then rewrite the generated ones through it.
        let first = fill(shape, &["1".to_string()], &["'a'".to_string()]);
        e.rewrite(&who, &first).expect("the shape's first statement is allowed");
        let sql = fill(shape, &numbers, &strings);
        let exact = super::rewrite_with(service, &policy, &e.catalog(), &claims, &sql);
        let hits = e.counters().shape_hits.load(std::sync::atomic::Ordering::Relaxed);
        let templated = e.rewrite(&who, &sql);
        match (exact, templated) {
            (Ok(exact), Ok(templated)) => {
                prop_assert!(super::template::same_statements(&templated.sql, &exact.sql), "{sql}\ntemplate: {}\nexact:    {}", templated.sql, exact.sql);
                prop_assert_eq!(&templated.statements, &exact.statements);
                // The audit's text of it comes from the template, made from the first statement.
                let own = crate::sql::fingerprint::RedactedText::of(&sql);
                prop_assert_eq!(templated.client_text.as_ref(), Some(&own));
                // So does the audit's hash of the rewrite: the one its own rewrite would give.
                let own_hash = crate::sql::fingerprint::redacted_sha256(&exact.sql);
                prop_assert_eq!(templated.rewritten_redacted_sha256.as_ref(), Some(&own_hash));
            }
            (exact, templated) => prop_assert!(false, "{sql}: exact {exact:?} vs template {templated:?}"),
        }
        prop_assert_eq!(e.counters().shape_hits.load(std::sync::atomic::Ordering::Relaxed), hits + 1, "{} was not served by its template", sql);
    }
}
