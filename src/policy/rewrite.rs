//! The SQL rewriter: walks one parsed statement and makes every protected table reference
//! reach only the rows and columns the service's policy allows, and every written row pass
//! the policy's check. Fail closed: every AST shape not explicitly handled is refused.
//!
//! How each construct is made safe:
//! * Reads (FROM/JOIN/subqueries/CTE bodies/set operations/LATERAL/UPDATE FROM/DELETE USING/
//!   INSERT SELECT/COPY TO/cursors/EXPLAIN): the table reference is replaced by a barrier
//!   `(SELECT <visible cols> FROM schema.table WHERE <filter> [AND pushed] OFFSET 0) AS alias`.
//!   `OFFSET 0` stops PostgreSQL from pulling the subquery up or pushing the service's quals
//!   into it, so the filter always runs before any user predicate (no leaks through errors
//!   like `CAST(secret AS int)`). Only leakproof `col = literal/$n` conjuncts are copied
//!   inside so indexes still serve point lookups. Hidden columns do not exist in the barrier,
//!   so `*` expands to the visible columns; naming a hidden column is refused with 42501.
//! * UPDATE/DELETE targets cannot be wrapped, so their WHERE becomes
//!   `filter AND CASE WHEN filter THEN (CASE WHEN user_where THEN assert(check(new)) END) END`:
//!   CASE guarantees evaluation order, the outer `filter` lets the planner use indexes.
//! * INSERT: the source becomes `SELECT CAST(v.c AS type).., presets FROM (<source>) v(c..)
//!   WHERE pgward.assert_row(<check over v>, 'msg')`; VALUES items are cast to the column
//!   types so `$n` parameters keep their types. The database verifies bound values.
//! * ON CONFLICT DO UPDATE: the existing row must pass the filter (else 42501, like RLS) and
//!   the new row the check.
use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use serde_json::Value as Json;
use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, CloseCursor, ConflictTarget, CopySource, CopyTarget,
    DeclareType, Delete, DescribeAlias, DiscardObject, Distinct, Expr, FromTable, Insert,
    ObjectName, OnConflictAction, OnInsert, Query, Reset, SelectFlavor, SelectItem,
    SelectItemQualifiedWildcardKind, Set, SetExpr, Statement, TableFactor, TableObject,
    TableWithJoins, Update, UpdateTableFromKind, VisitMut, VisitorMut, WildcardAdditionalOptions,
};

use super::allow;
use super::catalog::{Catalog, TableInfo};
use super::config::{claim_call, Action, ServicePolicy, TablePolicy};
use super::sql::{
    ident_name, object_name_parts, parse_expr, parse_query, parse_table_factor, quote_ident,
    quote_literal,
};
use super::{PolicyDenied, StatementInfo};
use crate::sql::fingerprint::without_values;

type R<T> = Result<T, PolicyDenied>;

mod explain;
mod exprs;
mod introspect;
mod read;
mod references;
mod write;

/// Everything one rewrite needs.
pub struct Rewriter<'a> {
    pub service: &'a str,
    pub policy: &'a ServicePolicy,
    pub catalog: &'a Catalog,
    pub claims: &'a serde_json::Map<String, Json>,
    info: StatementInfo,
    /// column name -> (table, rule) for columns hidden from this service in this statement.
    hidden: HashMap<String, (String, String)>,
    /// Names that would be whole-row references to a write target with hidden columns.
    forbid_rows: HashMap<String, String>,
    locks: bool,
    saw_volatile: bool,
    /// Set by `top` for a statement that is one plain SELECT; taken by the first `select`,
    /// which may then filter its table in place (see `flat_table`).
    top_level_select: bool,
}

/// Leakproof conjuncts that may be copied into a barrier: (relation name, column, rhs SQL).
type Pushdown = Vec<(String, String, String)>;

impl<'a> Rewriter<'a> {
    pub fn new(
        service: &'a str,
        policy: &'a ServicePolicy,
        catalog: &'a Catalog,
        claims: &'a serde_json::Map<String, Json>,
    ) -> Self {
        Rewriter {
            service,
            policy,
            catalog,
            claims,
            info: StatementInfo::default(),
            hidden: HashMap::new(),
            forbid_rows: HashMap::new(),
            locks: false,
            saw_volatile: false,
            top_level_select: false,
        }
    }

    fn deny(&self, what: impl std::fmt::Display, rule: Option<&str>) -> PolicyDenied {
        let message = match rule {
            Some(r) => format!("pgward: service {:?} {what} ({r})", self.service),
            None => format!("pgward: service {:?} {what}", self.service),
        };
        PolicyDenied {
            sqlstate: "42501",
            message,
            rule: rule.map(str::to_string),
            kind: crate::error::RefusalKind::Policy,
        }
    }

    fn refuse(&self, what: impl std::fmt::Display) -> PolicyDenied {
        self.deny(format!("may not run {what}"), Some(&self.policy.allow.rule))
    }

    /// Rewrites one statement; returns the SQL to forward and what it touches.
    pub fn statement(mut self, st: &mut Statement) -> R<(String, StatementInfo)> {
        self.collect_hidden(st);
        let sql = self.top(st)?;
        if self.locks {
            for t in &self.info.tables_read {
                if let Some(tp) = self
                    .policy
                    .tables
                    .values()
                    .find(|tp| &tp.info.qualified() == t)
                {
                    if !tp.update {
                        return Err(self.deny(
                            format!(
                                "may not lock rows of {} (FOR UPDATE/SHARE needs update)",
                                tp.info.name
                            ),
                            Some(&tp.actions_rule),
                        ));
                    }
                }
            }
        }
        Ok((sql, self.info))
    }

    fn collect_hidden(&mut self, st: &Statement) {
        let mut names = Vec::new();
        let _ = sqlparser::ast::visit_relations(st, |rel| {
            if let Some(parts) = object_name_parts(rel) {
                names.push(parts);
            }
            ControlFlow::<()>::Continue(())
        });
        for parts in names {
            let Some(info) = self.catalog.resolve(&parts) else {
                continue;
            };
            if let Some(tp) = self.policy.table(info) {
                for c in &tp.hidden {
                    self.hidden
                        .insert(c.clone(), (tp.info.name.clone(), tp.columns_rule.clone()));
                }
            } else if let Some(Some(cols)) = allow::catalog_relation(&info.schema, &info.name) {
                for c in info
                    .columns
                    .iter()
                    .filter(|c| !cols.contains(&c.name.as_str()))
                {
                    self.hidden.insert(
                        c.name.clone(),
                        (info.name.clone(), "built-in catalog allowlist".into()),
                    );
                }
            }
        }
    }

    fn top(&mut self, st: &mut Statement) -> R<String> {
        let kind = crate::sql::StatementKind::of(st);
        self.info.kind.get_or_insert(kind);
        match st {
            Statement::Query(q) => {
                self.top_level_select = q.with.is_none() && matches!(&*q.body, SetExpr::Select(_));
                self.query(q, &mut Vec::new())?
            }
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
                self.dml(st, &mut Vec::new())?
            }
            Statement::Explain {
                statement,
                describe_alias,
                analyze,
                verbose,
                query_plan,
                estimate,
                format,
                options,
            } => {
                if !self.policy.allow.explain {
                    return Err(self.refuse("EXPLAIN (allow.explain is off)"));
                }
                if !matches!(describe_alias, DescribeAlias::Explain) || !is_plain_dml(statement) {
                    return Err(self.refuse("this EXPLAIN form"));
                }
                self.explain_options(analyze, verbose, format, options, *query_plan, *estimate)?;
                self.top(statement)?;
            }
            Statement::Prepare {
                statement,
                data_types,
                ..
            } => {
                for t in data_types.iter() {
                    if !self.safe_type(t) {
                        return Err(self.refuse(format!("PREPARE with parameter type {t}")));
                    }
                }
                if !is_plain_dml(statement) {
                    return Err(self.refuse("PREPARE of anything but SELECT/INSERT/UPDATE/DELETE"));
                }
                self.top(statement)?;
            }
            Statement::Execute {
                name: Some(_),
                parameters,
                immediate: false,
                into,
                using,
                output: false,
                default: false,
                ..
            } if into.is_empty() && using.is_empty() => {
                // Prepared statements can only have been created through this rewriter.
                self.check_node(parameters, &mut Vec::new())?;
            }
            Statement::Deallocate { .. }
            | Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => {}
            Statement::Rollback { .. } | Statement::UNLISTEN { .. } => {}
            Statement::Fetch { into: None, .. } => {}
            Statement::Close {
                cursor: CloseCursor::All | CloseCursor::Specific { .. },
            } => {}
            Statement::Declare { stmts, .. } => {
                for d in stmts.iter_mut() {
                    match (
                        &d.declare_type,
                        &mut d.for_query,
                        &d.assignment,
                        &d.data_type,
                    ) {
                        (Some(DeclareType::Cursor), Some(q), None, None) => {
                            self.query(q, &mut Vec::new())?
                        }
                        _ => return Err(self.refuse("this DECLARE form")),
                    }
                }
            }
            Statement::Set(set) => self.set(set)?,
            Statement::Reset(r) => match &r.reset {
                Reset::ConfigurationParameter(name) => {
                    let p = object_name_parts(name)
                        .map(|p| p.join("."))
                        .unwrap_or_default();
                    self.settable(&p)?;
                }
                _ => return Err(self.refuse("RESET ALL / RESET SESSION AUTHORIZATION")),
            },
            Statement::ShowVariable { variable } => {
                let p = variable
                    .iter()
                    .map(ident_name)
                    .collect::<Vec<_>>()
                    .join(" ");
                if !(self.is_settable(&p) || allow::SAFE_SHOW_PARAMS.contains(&p.as_str())) {
                    return Err(self.refuse(format!("SHOW {p}")));
                }
            }
            Statement::LISTEN { channel } => {
                if !self.policy.allow.listen.contains(&ident_name(channel)) {
                    return Err(self.refuse(format!("LISTEN {}", ident_name(channel))));
                }
            }
            Statement::Discard { object_type } => {
                if matches!(object_type, DiscardObject::ALL) {
                    // DISCARD ALL implies RESET ALL and SET SESSION AUTHORIZATION DEFAULT.
                    return Err(self.refuse("DISCARD ALL"));
                }
            }
            Statement::Call(f) => {
                let name = object_name_parts(&f.name)
                    .map(|p| p.join("."))
                    .unwrap_or_default();
                if !self.policy.allow.procedures.contains(&name) {
                    return Err(self.refuse(format!("CALL {name}")));
                }
                self.check_node(&mut f.args, &mut Vec::new())?;
            }
            Statement::Copy { .. } => return self.copy(st),
            Statement::CreateTable(ct) if self.policy.allow.ddl && ct.query.is_none() => {
                self.info.is_ddl = true
            }
            Statement::CreateIndex(_) | Statement::AlterTable(_) | Statement::Drop { .. }
                if self.policy.allow.ddl =>
            {
                self.info.is_ddl = true
            }
            _ => {
                let kind = match kind {
                    crate::sql::StatementKind::Other => leading_keywords(st),
                    known => known.as_str().to_string(),
                };
                return Err(self.refuse(format!(
                    "{kind} statements (a policy-bound service may run SELECT and the writes \
                     its policy allows, transactions, cursors, prepared statements, and SET/SHOW \
                     of allowed parameters)"
                )));
            }
        }
        Ok(st.to_string())
    }

    fn is_settable(&self, p: &str) -> bool {
        allow::is_settable(p, &self.policy.allow.set)
    }

    fn settable(&self, p: &str) -> R<()> {
        if self.is_settable(p) {
            Ok(())
        } else {
            Err(self.refuse(format!("SET/RESET of {p}")))
        }
    }

    fn set(&mut self, set: &mut Set) -> R<()> {
        match set {
            Set::SingleAssignment {
                variable,
                values,
                hivevar: false,
                ..
            } => {
                let p = object_name_parts(variable)
                    .map(|p| p.join("."))
                    .unwrap_or_default();
                self.settable(&p)?;
                if p == "client_encoding" {
                    return self.utf8_only(values);
                }
                self.literals_only(values)
            }
            Set::SetTimeZone { value, .. } => {
                self.settable("timezone")?;
                self.literals_only(std::slice::from_mut(value))
            }
            Set::SetTransaction { .. } => Ok(()),
            Set::SetNames { charset_name, .. } => {
                self.settable("client_encoding")?;
                self.utf8_only(&[Expr::Identifier(charset_name.clone())])
            }
            _ => Err(self.refuse(
                "this SET form (role, session authorization and friends are never allowed)",
            )),
        }
    }

    /// The rewritten text is UTF-8; a client encoding such as SJIS or BIG5 would let the
    /// server read our quoting differently (multibyte characters swallowing `\\`).
    fn utf8_only(&self, values: &[Expr]) -> R<()> {
        let ok = match values {
            [Expr::Value(v)] => match &v.value {
                sqlparser::ast::Value::SingleQuotedString(s) => allow::is_utf8_encoding(s),
                _ => false,
            },
            [Expr::Identifier(id)] => allow::is_utf8_encoding(&id.value),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.refuse("a client_encoding other than UTF8"))
        }
    }

    fn literals_only(&self, values: &[Expr]) -> R<()> {
        for v in values {
            match v {
                Expr::Value(_) | Expr::Identifier(_) | Expr::UnaryOp { .. } | Expr::Interval(_) => {
                }
                _ => return Err(self.refuse(format!("SET with value {}", without_values(v)))),
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- queries

    fn query(&mut self, q: &mut Query, scope: &mut Vec<String>) -> R<()> {
        if q.for_clause.is_some()
            || q.settings.is_some()
            || q.format_clause.is_some()
            || !q.pipe_operators.is_empty()
        {
            return Err(
                self.refuse("FOR XML/JSON, SETTINGS, FORMAT or pipe clauses of other SQL dialects")
            );
        }
        let base = scope.len();
        if let Some(with) = &mut q.with {
            if with.recursive {
                // In WITH RECURSIVE every CTE name is visible in every CTE body.
                scope.extend(with.cte_tables.iter().map(|c| ident_name(&c.alias.name)));
            }
            for cte in &mut with.cte_tables {
                if cte.from.is_some() {
                    return Err(self.refuse("a CTE with a FROM clause of another SQL dialect"));
                }
                // A non-recursive CTE's own name is not visible in its body: a reference
                // there is the real table and gets filtered.
                self.query(&mut cte.query, scope)?;
                if !with.recursive {
                    scope.push(ident_name(&cte.alias.name));
                }
            }
        }
        if !q.locks.is_empty() {
            self.locks = true;
        }
        self.set_expr(&mut q.body, scope)?;
        self.check_node(&mut q.order_by, scope)?;
        self.check_node(&mut q.limit_clause, scope)?;
        self.check_node(&mut q.fetch, scope)?;
        scope.truncate(base);
        Ok(())
    }

    fn set_expr(&mut self, s: &mut SetExpr, scope: &mut Vec<String>) -> R<()> {
        match s {
            SetExpr::Select(sel) => self.select(sel, scope),
            SetExpr::Query(q) => self.query(q, scope),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left, scope)?;
                self.set_expr(right, scope)
            }
            SetExpr::Values(v) => self.check_node(v, scope),
            SetExpr::Insert(st) | SetExpr::Update(st) | SetExpr::Delete(st) => self.dml(st, scope),
            other => Err(self.refuse(format!("the query form {}", without_values(other)))),
        }
    }

    fn select(&mut self, s: &mut sqlparser::ast::Select, scope: &mut Vec<String>) -> R<()> {
        if !s.optimizer_hints.is_empty()
            || s.select_modifiers.is_some()
            || s.top.is_some()
            || s.exclude.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.qualify.is_some()
            || s.value_table_mode.is_some()
            || !matches!(s.flavor, SelectFlavor::Standard)
        {
            return Err(self.refuse(
                "SELECT clauses of other SQL dialects (TOP, QUALIFY, CONNECT BY, PREWHERE, \
                 LATERAL VIEW, CLUSTER/DISTRIBUTE/SORT BY, hints)",
            ));
        }
        if s.into.is_some() {
            return Err(self.refuse("SELECT INTO"));
        }
        if std::mem::take(&mut self.top_level_select) {
            if let Some((tp, alias)) = self.flat_table(s, scope) {
                return self.flat_select(s, scope, &tp, &alias);
            }
        }
        let pushdown = self.pushdown_candidates(&s.from, s.selection.as_ref());
        for twj in &mut s.from {
            self.table_with_joins(twj, scope, &pushdown)?;
        }
        self.select_clauses(s, scope)
    }

    /// Checks (and rewrites subqueries in) everything of a SELECT but its FROM.
    fn select_clauses(&mut self, s: &mut sqlparser::ast::Select, scope: &mut Vec<String>) -> R<()> {
        for item in &s.projection {
            if let SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o) = item {
                check_wildcard(o).map_err(|_| self.refuse("wildcard options"))?;
            }
        }
        if let Some(Distinct::On(exprs)) = &mut s.distinct {
            self.check_node(exprs, scope)?;
        }
        self.check_node(&mut s.projection, scope)?;
        self.check_node(&mut s.selection, scope)?;
        self.check_node(&mut s.group_by, scope)?;
        self.check_node(&mut s.having, scope)?;
        self.check_node(&mut s.named_window, scope)?;
        Ok(())
    }
}

/// The statement's leading keywords (`CREATE FUNCTION`, `VACUUM`) to name a statement kind
/// pgward does not classify: sqlparser prints keywords in upper case, and the first words of
/// a statement are never a literal.
fn leading_keywords(st: &Statement) -> String {
    let text = st.to_string();
    let words: Vec<&str> = text
        .split_whitespace()
        .take(3)
        .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    if words.is_empty() {
        "these".to_string()
    } else {
        words.join(" ")
    }
}

/// Columns whose `=` operator is leakproof (cannot raise or reveal the value).
fn leakproof_type(info: &TableInfo, col: &str) -> bool {
    info.column(col).is_some_and(|c| {
        ["bigint", "integer", "smallint", "text", "uuid", "boolean"].contains(&c.type_name.as_str())
    })
}

fn is_default(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(id) if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default"))
}

/// ORMs write `DEFAULT` for columns they leave to the database. A column that is DEFAULT in
/// every row is dropped from the INSERT (same effect); mixed rows are refused because a
/// `VALUES` list inside a subquery cannot carry DEFAULT.
fn drop_default_columns(
    cols: &mut Vec<String>,
    rows: &mut [sqlparser::ast::Parens<Vec<Expr>>],
) -> Result<(), ()> {
    let mut keep = vec![true; cols.len()];
    for (i, k) in keep.iter_mut().enumerate() {
        let defaults = rows
            .iter()
            .filter(|r| r.get(i).is_some_and(is_default))
            .count();
        if defaults == rows.len() && !rows.is_empty() {
            *k = false;
        } else if defaults > 0 {
            return Err(());
        }
    }
    let mut it = keep.iter();
    cols.retain(|_| it.next().copied().unwrap_or(true));
    for row in rows.iter_mut() {
        let mut it = keep.iter();
        row.content.retain(|_| it.next().copied().unwrap_or(true));
    }
    Ok(())
}

fn check_wildcard(o: &WildcardAdditionalOptions) -> Result<(), ()> {
    if o.opt_ilike.is_some()
        || o.opt_exclude.is_some()
        || o.opt_except.is_some()
        || o.opt_replace.is_some()
        || o.opt_rename.is_some()
        || o.opt_alias.is_some()
    {
        Err(())
    } else {
        Ok(())
    }
}

/// (SQL text to qualify columns with, normalized name) of a write target.
fn rel_names(name: &ObjectName, alias: Option<&sqlparser::ast::Ident>) -> (String, String) {
    match alias {
        Some(a) => (a.to_string(), ident_name(a)),
        None => {
            let last = name.0.last().map(|p| p.to_string()).unwrap_or_default();
            let norm = object_name_parts(name)
                .and_then(|p| p.last().cloned())
                .unwrap_or_default();
            (last, norm)
        }
    }
}

fn is_plain_dml(st: &Statement) -> bool {
    matches!(
        st,
        Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)
    )
}

/// Top-level AND-ed parts of a predicate.
pub(crate) fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        Expr::Nested(inner) => conjuncts(inner),
        other => vec![other],
    }
}

/// `[rel.]col = <number | string | $n>` (either side) → (rel, col, rhs).
pub(crate) fn leakproof_eq(e: &Expr) -> Option<(Option<String>, String, String)> {
    let Expr::BinaryOp {
        left,
        op: BinaryOperator::Eq,
        right,
    } = e
    else {
        return None;
    };
    let col = |x: &Expr| match x {
        Expr::Identifier(id) => Some((None, ident_name(id))),
        Expr::CompoundIdentifier(p) if p.len() == 2 => {
            Some((Some(ident_name(&p[0])), ident_name(&p[1])))
        }
        _ => None,
    };
    let lit = |x: &Expr| match x {
        Expr::Value(v) => match &v.value {
            // Every string literal alike (the sanitizer turns the ones holding a quote into
            // E'..'): no rewrite decision may depend on a literal's value (see shape.rs).
            sqlparser::ast::Value::Number(..)
            | sqlparser::ast::Value::SingleQuotedString(_)
            | sqlparser::ast::Value::EscapedStringLiteral(_)
            | sqlparser::ast::Value::Placeholder(_) => Some(x.to_string()),
            _ => None,
        },
        _ => None,
    };
    if let (Some((r, c)), Some(l)) = (col(left), lit(right)) {
        return Some((r, c, l));
    }
    if let (Some((r, c)), Some(l)) = (col(right), lit(left)) {
        return Some((r, c, l));
    }
    None
}

/// A claim value as a SQL literal. Never spliced text: numbers are validated, strings quoted.
pub fn claim_literal(value: &Json, declared: Option<&str>) -> Option<String> {
    const INTS: &[&str] = &[
        "smallint", "int", "integer", "bigint", "int2", "int4", "int8",
    ];
    match declared {
        Some(t) if INTS.contains(&t) => {
            let n: i64 = match value {
                Json::Number(n) => n.as_i64()?,
                Json::String(s) => s.trim().parse().ok()?,
                _ => return None,
            };
            Some(format!("({n})"))
        }
        Some(t) => {
            let s = match value {
                Json::String(s) => s.clone(),
                Json::Number(n) => n.to_string(),
                Json::Bool(b) => b.to_string(),
                _ => return None,
            };
            if s.contains('\0') {
                return None;
            }
            Some(format!("CAST({} AS {t})", quote_literal(&s)))
        }
        None => match value {
            Json::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(format!("({i})"))
                } else {
                    let f = n.as_f64()?;
                    f.is_finite().then(|| format!("({f:?})"))
                }
            }
            Json::String(s) if !s.contains('\0') => Some(quote_literal(s)),
            Json::Bool(b) => Some(if *b { "TRUE".into() } else { "FALSE".into() }),
            Json::Null => Some("NULL".into()),
            Json::Array(items) => {
                let parts: Option<Vec<String>> = items
                    .iter()
                    .map(|v| {
                        if v.is_array() || v.is_object() {
                            None
                        } else {
                            claim_literal(v, None)
                        }
                    })
                    .collect();
                Some(format!("ARRAY[{}]", parts?.join(", ")))
            }
            _ => None,
        },
    }
}
