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

type R<T> = Result<T, PolicyDenied>;

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
        let kind = statement_kind(st);
        if self.info.kind.is_empty() {
            self.info.kind = kind.to_string();
        }
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
                ..
            } => {
                if !self.policy.allow.explain {
                    return Err(self.refuse("EXPLAIN (allow.explain is off)"));
                }
                if !matches!(describe_alias, DescribeAlias::Explain) || !is_plain_dml(statement) {
                    return Err(self.refuse("this EXPLAIN form"));
                }
                self.top(statement)?;
            }
            Statement::Prepare {
                statement,
                data_types,
                ..
            } => {
                for t in data_types.iter() {
                    if !allow::is_safe_type(&t.to_string()) {
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
            _ => return Err(self.refuse(format!("{kind} statements"))),
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
                _ => return Err(self.refuse(format!("SET with value {v}"))),
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
            return Err(self.refuse("this query syntax"));
        }
        let base = scope.len();
        if let Some(with) = &mut q.with {
            if with.recursive {
                // In WITH RECURSIVE every CTE name is visible in every CTE body.
                scope.extend(with.cte_tables.iter().map(|c| ident_name(&c.alias.name)));
            }
            for cte in &mut with.cte_tables {
                if cte.from.is_some() {
                    return Err(self.refuse("this CTE syntax"));
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
            _ => Err(self.refuse("this query form")),
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
            return Err(self.refuse("this SELECT syntax"));
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

    fn table_with_joins(
        &mut self,
        twj: &mut TableWithJoins,
        scope: &mut Vec<String>,
        pushdown: &Pushdown,
    ) -> R<()> {
        self.table_factor(&mut twj.relation, scope, pushdown)?;
        for j in &mut twj.joins {
            self.table_factor(&mut j.relation, scope, pushdown)?;
            self.check_node(&mut j.join_operator, scope)?;
        }
        Ok(())
    }

    fn table_factor(
        &mut self,
        tf: &mut TableFactor,
        scope: &mut Vec<String>,
        pushdown: &Pushdown,
    ) -> R<()> {
        match tf {
            TableFactor::Table {
                name,
                alias,
                args,
                with_hints,
                version,
                with_ordinality,
                partitions,
                json_path,
                sample,
                index_directives,
                inheritance,
            } => {
                if !with_hints.is_empty()
                    || version.is_some()
                    || !partitions.is_empty()
                    || json_path.is_some()
                    || sample.is_some()
                    || !index_directives.is_empty()
                    || inheritance.is_some()
                {
                    return Err(self.refuse("this FROM syntax"));
                }
                if let Some(args) = args {
                    // A set-returning function in FROM.
                    self.check_function_name(name)?;
                    return self.check_node(&mut args.args, scope);
                }
                if *with_ordinality {
                    return Err(self.refuse("WITH ORDINALITY on a table"));
                }
                let parts =
                    object_name_parts(name).ok_or_else(|| self.refuse("this relation name"))?;
                if parts.len() == 1 && scope.contains(&parts[0]) {
                    return Ok(()); // a CTE in scope
                }
                let shown = name.to_string();
                let info = self
                    .catalog
                    .resolve(&parts)
                    .ok_or_else(|| {
                        self.deny(format!("may not read unknown relation {shown}"), None)
                    })?
                    .clone();
                let alias_text = match alias {
                    Some(a) if a.columns.is_empty() => a.name.to_string(),
                    Some(a) => format!(
                        "{}({})",
                        a.name,
                        a.columns
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => match name.0.last() {
                        Some(p) => p.to_string(),
                        None => return Err(self.refuse("this relation name")),
                    },
                };
                let alias_norm = alias
                    .as_ref()
                    .map(|a| ident_name(&a.name))
                    .unwrap_or_else(|| parts.last().cloned().unwrap_or_default());
                if let Some(tp) = self.policy.table(&info) {
                    let tp = tp.clone();
                    if !tp.select {
                        return Err(self.deny(
                            format!("may not read table {}", info.name),
                            Some(&tp.actions_rule),
                        ));
                    }
                    if alias.as_ref().is_some_and(|a| !a.columns.is_empty())
                        && !tp.hidden.is_empty()
                    {
                        return Err(self.deny(
                            format!(
                                "may not use a column alias list on {} (hidden columns)",
                                info.name
                            ),
                            Some(&tp.columns_rule),
                        ));
                    }
                    self.note_read(&tp.info, &tp.visible);
                    let pushed: Vec<String> = pushdown
                        .iter()
                        .filter(|(rel, col, _)| {
                            rel == &alias_norm
                                && tp.visible.contains(col)
                                && leakproof_type(&tp.info, col)
                        })
                        .map(|(_, col, rhs)| format!("{} = {rhs}", quote_ident(col)))
                        .collect();
                    *tf = self.barrier(&tp, &alias_text, &pushed)?;
                    Ok(())
                } else if let Some(cols) = allow::catalog_relation(&info.schema, &info.name) {
                    if let Some(cols) = cols {
                        let list: Vec<String> = info
                            .columns
                            .iter()
                            .filter(|c| cols.contains(&c.name.as_str()))
                            .map(|c| quote_ident(&c.name))
                            .collect();
                        let text = format!(
                            "(SELECT {} FROM {}.{}) AS {alias_text}",
                            list.join(", "),
                            quote_ident(&info.schema),
                            quote_ident(&info.name)
                        );
                        *tf = parse_table_factor(&text)
                            .map_err(|e| self.refuse(format!("(internal: {e})")))?;
                    }
                    Ok(())
                } else {
                    let what = if matches!(info.kind, super::catalog::RelKind::View) {
                        "view"
                    } else {
                        "relation"
                    };
                    Err(self.deny(
                        format!(
                            "may not read {what} {} (not in its policy)",
                            info.qualified()
                        ),
                        Some(&format!("{}:1", self.policy.file)),
                    ))
                }
            }
            TableFactor::Derived {
                subquery,
                sample: None,
                ..
            } => self.query(subquery, scope),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.table_with_joins(table_with_joins, scope, pushdown),
            TableFactor::UNNEST { array_exprs, .. } => self.check_node(array_exprs, scope),
            TableFactor::Function { name, args, .. } => {
                self.check_function_name(name)?;
                self.check_node(args, scope)
            }
            _ => Err(self.refuse("this FROM item")),
        }
    }

    /// Whether a top-level SELECT can filter its table in place instead of through a barrier
    /// subquery: the barrier exists so the service's predicates never run on rows the filter
    /// hides, so it can go when there are none that could leak. That holds when the statement
    /// is one SELECT (no outer query whose predicates the planner could push down into it, no
    /// INSERT check or CTE around it) over one protected table with a filter and no hidden
    /// columns (`*` and whole-row references then mean the same rows and columns), whose WHERE
    /// is only leakproof `col = literal/$n` conjuncts — the same ones the barrier form copies
    /// inside the barrier anyway — and which has no HAVING (the planner moves aggregate-free
    /// HAVING clauses into WHERE). Everything else of the SELECT runs on rows that passed
    /// WHERE. Saves the server planning a subquery: measurably faster for point lookups.
    /// Returns the table's policy and the alias to qualify the filter with.
    fn flat_table(
        &self,
        s: &sqlparser::ast::Select,
        scope: &[String],
    ) -> Option<(TablePolicy, String)> {
        let [twj] = s.from.as_slice() else {
            return None;
        };
        let TableFactor::Table {
            name,
            alias,
            args: None,
            with_hints,
            version: None,
            with_ordinality: false,
            partitions,
            json_path: None,
            sample: None,
            index_directives,
            inheritance: None,
        } = &twj.relation
        else {
            return None;
        };
        if !twj.joins.is_empty()
            || !with_hints.is_empty()
            || !partitions.is_empty()
            || !index_directives.is_empty()
            || alias.as_ref().is_some_and(|a| !a.columns.is_empty())
            || s.having.is_some()
        {
            return None;
        }
        let parts = object_name_parts(name)?;
        if parts.len() == 1 && scope.contains(&parts[0]) {
            return None;
        }
        let info = self.catalog.resolve(&parts)?;
        let tp = self.policy.table(info)?;
        if !tp.select || tp.filter.is_none() || !tp.hidden.is_empty() {
            return None;
        }
        let (alias_text, alias_norm) = match alias {
            Some(a) => (a.name.to_string(), ident_name(&a.name)),
            None => (name.0.last()?.to_string(), parts.last()?.clone()),
        };
        let leakproof = |c: &Expr| {
            leakproof_eq(c).is_some_and(|(rel, col, _)| {
                rel.is_none_or(|r| r == alias_norm) && leakproof_type(&tp.info, &col)
            })
        };
        if let Some(selection) = &s.selection {
            if !conjuncts(selection).into_iter().all(leakproof) {
                return None;
            }
        }
        Some((tp.clone(), alias_text))
    }

    /// A SELECT `flat_table` accepted: `FROM "schema"."table" AS alias WHERE (filter) AND
    /// (the service's WHERE)`.
    fn flat_select(
        &mut self,
        s: &mut sqlparser::ast::Select,
        scope: &mut Vec<String>,
        tp: &TablePolicy,
        alias: &str,
    ) -> R<()> {
        self.note_read(&tp.info, &tp.visible);
        let relation = format!(
            "{}.{} AS {alias}",
            quote_ident(&tp.info.schema),
            quote_ident(&tp.info.name)
        );
        s.from[0].relation = parse_table_factor(&relation)
            .map_err(|e| self.refuse(format!("(internal: table did not parse: {e})")))?;
        self.select_clauses(s, scope)?;
        let Some(filter) = &tp.filter else {
            return Err(self.refuse("(internal: no filter)"));
        };
        let filter = self.render(filter, tp, &|c| Some(format!("{alias}.{}", quote_ident(c))))?;
        let filter = parse_expr(&filter)
            .map_err(|e| self.refuse(format!("(internal: filter did not parse: {e})")))?;
        let filter = Expr::Nested(Box::new(filter));
        s.selection = Some(match s.selection.take() {
            Some(own) => Expr::BinaryOp {
                left: Box::new(filter),
                op: BinaryOperator::And,
                right: Box::new(Expr::Nested(Box::new(own))),
            },
            None => filter,
        });
        Ok(())
    }

    /// The filtered, column-restricted stand-in for a protected table.
    fn barrier(&self, tp: &TablePolicy, alias: &str, pushed: &[String]) -> R<TableFactor> {
        let cols: Vec<String> = tp.visible.iter().map(|c| quote_ident(c)).collect();
        let base = format!(
            "{}.{}",
            quote_ident(&tp.info.schema),
            quote_ident(&tp.info.name)
        );
        let text = match &tp.filter {
            Some(f) => {
                let filter = self.render(f, tp, &|c| Some(quote_ident(c)))?;
                let mut conds = vec![format!("({filter})")];
                conds.extend(pushed.iter().cloned());
                format!(
                    "(SELECT {} FROM {base} WHERE {} OFFSET 0) AS {alias}",
                    cols.join(", "),
                    conds.join(" AND ")
                )
            }
            None if tp.hidden.is_empty() => format!("{base} AS {alias}"),
            None => format!("(SELECT {} FROM {base}) AS {alias}", cols.join(", ")),
        };
        parse_table_factor(&text)
            .map_err(|e| self.refuse(format!("(internal: barrier did not parse: {e})")))
    }

    fn note_read(&mut self, info: &TableInfo, cols: &[String]) {
        let q = info.qualified();
        if !self.info.tables_read.contains(&q) {
            self.info.tables_read.push(q);
            self.info
                .columns_read
                .extend(cols.iter().map(|c| format!("{}.{c}", info.name)));
        }
    }

    fn note_write(&mut self, info: &TableInfo) {
        let q = info.qualified();
        if !self.info.tables_written.contains(&q) {
            self.info.tables_written.push(q);
        }
    }

    /// Columns a write stores values in (the client's and the presets), for the audit record.
    fn note_columns_written<'c>(
        &mut self,
        info: &TableInfo,
        cols: impl IntoIterator<Item = &'c String>,
    ) {
        for c in cols {
            let q = format!("{}.{c}", info.name);
            if !self.info.columns_written.contains(&q) {
                self.info.columns_written.push(q);
            }
        }
    }

    /// `rel.col = literal` / `col = $n` conjuncts of a WHERE clause, by relation name.
    fn pushdown_candidates(&self, from: &[TableWithJoins], selection: Option<&Expr>) -> Pushdown {
        let single = match from {
            [twj] if twj.joins.is_empty() => match &twj.relation {
                TableFactor::Table {
                    name,
                    alias,
                    args: None,
                    ..
                } => Some(
                    alias
                        .as_ref()
                        .map(|a| ident_name(&a.name))
                        .or_else(|| object_name_parts(name).and_then(|p| p.last().cloned()))
                        .unwrap_or_default(),
                ),
                _ => None,
            },
            _ => None,
        };
        let mut out = Vec::new();
        if let Some(sel) = selection {
            for c in conjuncts(sel) {
                if let Some((rel, col, rhs)) = leakproof_eq(c) {
                    match (rel, &single) {
                        (Some(r), _) => out.push((r, col, rhs)),
                        (None, Some(s)) => out.push((s.clone(), col, rhs)),
                        _ => {}
                    }
                }
            }
        }
        out
    }

    // ---------------------------------------------------------------- expressions

    /// Checks every expression inside `node` (and rewrites nested queries).
    fn check_node<T: VisitMut + ?Sized>(&mut self, node: &mut T, scope: &mut Vec<String>) -> R<()> {
        let mut checker = ExprChecker {
            rw: self,
            scope,
            depth: 0,
        };
        match node.visit(&mut checker) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    fn check_function_name(&mut self, name: &ObjectName) -> R<()> {
        let parts = object_name_parts(name).ok_or_else(|| self.refuse("this function name"))?;
        let full = parts.join(".");
        let builtin = match parts.as_slice() {
            [n] => Some(n.as_str()),
            [s, n] if s == "pg_catalog" => Some(n.as_str()),
            _ => None,
        };
        if builtin.is_some_and(allow::is_volatile_function) {
            self.saw_volatile = true;
        }
        if builtin.is_some_and(allow::is_safe_function)
            || self.policy.allow.functions.contains(&full)
        {
            Ok(())
        } else {
            Err(self.deny(
                format!("may not call function {full}"),
                Some(&self.policy.allow.rule),
            ))
        }
    }

    fn check_column(&self, col: &str) -> R<()> {
        if let Some((table, rule)) = self.hidden.get(col) {
            return Err(self.deny(format!("may not read column {table}.{col}"), Some(rule)));
        }
        if let Some(table) = self.forbid_rows.get(col) {
            return Err(self.deny(
                format!("may not use a whole-row reference to {table} (it has hidden columns)"),
                None,
            ));
        }
        Ok(())
    }

    fn check_expr(&mut self, expr: &mut Expr) -> R<()> {
        match expr {
            Expr::Identifier(id) => self.check_column(&ident_name(id)),
            Expr::CompoundIdentifier(parts) => {
                let schema_qualified = parts.len() == 3
                    && self
                        .catalog
                        .resolve(&[ident_name(&parts[0]), ident_name(&parts[1])])
                        .is_some();
                if schema_qualified {
                    // schema.table.col: the barrier is aliased by the bare table name.
                    parts.remove(0);
                } else if parts.len() >= 3 {
                    return Err(self.refuse("this column reference"));
                }
                match parts.last() {
                    Some(last) => self.check_column(&ident_name(last)),
                    None => Ok(()),
                }
            }
            Expr::BinaryOp { op, .. } => match op {
                BinaryOperator::Custom(_) | BinaryOperator::PGCustomBinaryOperator(_) => {
                    Err(self.refuse(format!("operator {op}")))
                }
                _ => Ok(()),
            },
            Expr::Cast {
                data_type, format, ..
            } => {
                if format.is_some() || !allow::is_safe_type(&data_type.to_string()) {
                    return Err(self.refuse(format!("a cast to {data_type}")));
                }
                Ok(())
            }
            Expr::TypedString(ts) => {
                if !allow::is_safe_type(&ts.data_type.to_string()) {
                    return Err(self.refuse(format!("a literal of type {}", ts.data_type)));
                }
                Ok(())
            }
            Expr::Function(f) => {
                if !matches!(f.parameters, sqlparser::ast::FunctionArguments::None) {
                    return Err(self.refuse("this function call syntax"));
                }
                // `f(t.*)` on a write target with hidden columns would pass the whole row.
                if let sqlparser::ast::FunctionArguments::List(list) = &f.args {
                    for a in &list.args {
                        let (sqlparser::ast::FunctionArg::Unnamed(arg)
                        | sqlparser::ast::FunctionArg::Named { arg, .. }
                        | sqlparser::ast::FunctionArg::ExprNamed { arg, .. }) = a;
                        if let sqlparser::ast::FunctionArgExpr::QualifiedWildcard(n) = arg {
                            if let Some(last) = object_name_parts(n).and_then(|p| p.last().cloned())
                            {
                                self.check_column(&last)?;
                            }
                        }
                    }
                }
                let name = f.name.clone();
                self.check_function_name(&name)
            }
            Expr::IsFalse(_)
            | Expr::IsNotFalse(_)
            | Expr::IsTrue(_)
            | Expr::IsNotTrue(_)
            | Expr::IsNull(_)
            | Expr::IsNotNull(_)
            | Expr::IsUnknown(_)
            | Expr::IsNotUnknown(_)
            | Expr::IsDistinctFrom(..)
            | Expr::IsNotDistinctFrom(..)
            | Expr::In { .. }
            | Expr::Between { .. }
            | Expr::Like { .. }
            | Expr::ILike { .. }
            | Expr::SimilarTo { .. }
            | Expr::AnyOp { .. }
            | Expr::AllOp { .. }
            | Expr::UnaryOp { .. }
            | Expr::AtTimeZone { .. }
            | Expr::Extract { .. }
            | Expr::Ceil { .. }
            | Expr::Floor { .. }
            | Expr::Position { .. }
            | Expr::Substring { .. }
            | Expr::Trim { .. }
            | Expr::Overlay { .. }
            | Expr::Collate { .. }
            | Expr::Nested(_)
            | Expr::Value(_)
            | Expr::Case { .. }
            | Expr::Exists { .. }
            | Expr::Subquery(_)
            | Expr::GroupingSets(_)
            | Expr::Cube(_)
            | Expr::Rollup(_)
            | Expr::Tuple(_)
            | Expr::Array(_)
            | Expr::Interval(_)
            | Expr::CompoundFieldAccess { .. } => Ok(()),
            other => Err(self.refuse(format!("the expression {other}"))),
        }
    }

    // ---------------------------------------------------------------- policy expressions

    /// Renders a policy expression: claims become literals, column names go through `map`.
    fn render(
        &self,
        expr: &Expr,
        tp: &TablePolicy,
        map: &dyn Fn(&str) -> Option<String>,
    ) -> R<String> {
        let mut e = expr.clone();
        let mut sub = Substituter {
            rw: self,
            tp,
            map,
            err: None,
        };
        let _ = e.visit(&mut sub);
        if let Some(err) = sub.err {
            return Err(err);
        }
        Ok(e.to_string())
    }

    fn claim_literal(&self, name: &str) -> R<String> {
        let value = self
            .claims
            .get(name)
            .ok_or_else(|| self.deny(format!("has no claim {name:?} in its token"), None))?;
        claim_literal(value, self.policy.claim_types.get(name).map(String::as_str))
            .ok_or_else(|| self.deny(format!("has an unusable value for claim {name:?}"), None))
    }

    fn assert_sql(&self, cond: &str, message: &str) -> String {
        format!("pgward.assert_row({cond}, {})", quote_literal(message))
    }

    fn write_message(&self, what: &str, tp: &TablePolicy) -> String {
        format!(
            "pgward: service {:?} may not {what} {} ({})",
            self.service, tp.info.name, tp.check_rule
        )
    }

    // ---------------------------------------------------------------- writes

    fn dml(&mut self, st: &mut Statement, scope: &mut Vec<String>) -> R<()> {
        match st {
            Statement::Insert(i) => self.insert(i, scope),
            Statement::Update(u) => self.update(u, scope),
            Statement::Delete(d) => self.delete(d, scope),
            _ => Err(self.refuse("this statement here")),
        }
    }

    fn target(&self, name: &ObjectName, action: Action) -> R<TablePolicy> {
        let parts = object_name_parts(name).ok_or_else(|| self.refuse("this relation name"))?;
        let info = self.catalog.resolve(&parts).ok_or_else(|| {
            self.deny(
                format!("may not {} unknown relation {name}", action.verb()),
                None,
            )
        })?;
        let tp = self.policy.table(info).ok_or_else(|| {
            self.deny(
                format!(
                    "may not {} {} (not in its policy)",
                    action.verb(),
                    info.qualified()
                ),
                Some(&format!("{}:1", self.policy.file)),
            )
        })?;
        if !tp.allows(action) {
            return Err(self.deny(
                format!("may not {} table {}", action.verb(), info.name),
                Some(&tp.actions_rule),
            ));
        }
        Ok(tp.clone())
    }

    fn writable_column(&self, tp: &TablePolicy, col: &str) -> R<()> {
        if tp.info.column(col).is_none() {
            return Err(self.deny(
                format!("may not write unknown column {}.{col}", tp.info.name),
                None,
            ));
        }
        if tp.hidden.contains(col) {
            return Err(self.deny(
                format!("may not write column {}.{col}", tp.info.name),
                Some(&tp.columns_rule),
            ));
        }
        if tp.is_preset(col) {
            return Err(self.deny(
                format!("may not write preset column {}.{col}", tp.info.name),
                Some(&tp.presets_rule),
            ));
        }
        Ok(())
    }

    /// SET list → column → SQL of the new value.
    fn assignments(
        &mut self,
        tp: &TablePolicy,
        assignments: &mut [sqlparser::ast::Assignment],
        scope: &mut Vec<String>,
    ) -> R<HashMap<String, String>> {
        let mut map = HashMap::new();
        for a in assignments.iter_mut() {
            let col = match &a.target {
                AssignmentTarget::ColumnName(n) => object_name_parts(n)
                    .and_then(|p| p.last().cloned())
                    .ok_or_else(|| self.refuse("this SET target"))?,
                AssignmentTarget::Tuple(_) => return Err(self.refuse("tuple assignments")),
            };
            self.writable_column(tp, &col)?;
            self.saw_volatile = false;
            self.check_node(&mut a.value, scope)?;
            if self.saw_volatile {
                // The value is evaluated again inside the write check; it must be stable.
                return Err(self.refuse(format!("a volatile function in the new value of {col}")));
            }
            self.note_columns_written(&tp.info, [&col]);
            map.insert(col, format!("({})", a.value));
        }
        Ok(map)
    }

    fn returning(
        &mut self,
        r: &mut Option<Vec<SelectItem>>,
        tp: &TablePolicy,
        (rel, rel_norm): (&str, &str),
        scope: &mut Vec<String>,
    ) -> R<()> {
        let Some(items) = r else { return Ok(()) };
        let mut out = Vec::new();
        for item in items.drain(..) {
            // Does a qualified `x.*` name the write target (else: a barrier-wrapped FROM item)?
            let names_target = match &item {
                SelectItem::Wildcard(_) => true,
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    object_name_parts(n)
                        .and_then(|p| p.last().cloned())
                        .as_deref()
                        == Some(rel_norm)
                }
                SelectItem::QualifiedWildcard(..) => {
                    return Err(self.refuse("this RETURNING wildcard"));
                }
                _ => false,
            };
            match &item {
                SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o)
                    if names_target && !tp.hidden.is_empty() =>
                {
                    check_wildcard(o).map_err(|_| self.refuse("wildcard options"))?;
                    // `*` on a table with hidden columns means its visible columns.
                    for c in &tp.visible {
                        let e = parse_expr(&format!("{rel}.{}", quote_ident(c)))
                            .map_err(|e| self.refuse(format!("(internal: {e})")))?;
                        out.push(SelectItem::UnnamedExpr(e));
                    }
                }
                SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o) => {
                    check_wildcard(o).map_err(|_| self.refuse("wildcard options"))?;
                    out.push(item);
                }
                _ => out.push(item),
            }
        }
        *items = out;
        self.check_node(items, scope)
    }

    /// `filter AND pk = c AND (CASE WHEN filter THEN <guarded> END)`.
    /// The WHERE of an UPDATE/DELETE target: the row filter, the leakproof conjuncts hoisted
    /// next to it (indexes), and the service's own predicate evaluated only on rows the filter
    /// admits (with the write check, for UPDATE); records the table as written.
    fn guard_target_rows(
        &mut self,
        selection: &mut Option<Expr>,
        (tp, rel, rel_norm): (&TablePolicy, &str, &str),
        sole_source: bool,
        filter: Option<String>,
        check: Option<String>,
    ) -> R<()> {
        let hoisted = self.hoisted(selection.as_ref(), tp, rel_norm, rel, sole_source);
        let text = self.guarded_where(
            filter,
            hoisted,
            selection.as_ref().map(|e| e.to_string()),
            check,
        );
        *selection = Some(parse_expr(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?);
        self.note_write(&tp.info);
        Ok(())
    }

    fn guarded_where(
        &self,
        filter: Option<String>,
        hoisted: Vec<String>,
        user: Option<String>,
        check: Option<String>,
    ) -> String {
        let body = match (user, check) {
            (Some(u), Some(c)) => format!("CASE WHEN ({u}) THEN {c} END"),
            (Some(u), None) => format!("({u})"),
            (None, Some(c)) => c,
            (None, None) => "TRUE".to_string(),
        };
        let mut parts = Vec::new();
        if let Some(f) = &filter {
            parts.push(format!("({f})"));
        }
        parts.extend(hoisted);
        match filter {
            Some(f) => parts.push(format!("(CASE WHEN ({f}) THEN {body} END)")),
            None => parts.push(body),
        }
        parts.join(" AND ")
    }

    fn hoisted(
        &self,
        selection: Option<&Expr>,
        tp: &TablePolicy,
        rel_norm: &str,
        rel: &str,
        single: bool,
    ) -> Vec<String> {
        let Some(sel) = selection else {
            return Vec::new();
        };
        conjuncts(sel)
            .into_iter()
            .filter_map(leakproof_eq)
            .filter(|(r, col, _)| {
                (r.as_deref() == Some(rel_norm) || (r.is_none() && single))
                    && tp.visible.contains(col)
            })
            .filter(|(_, col, _)| leakproof_type(&tp.info, col))
            .map(|(_, col, rhs)| format!("{rel}.{} = {rhs}", quote_ident(&col)))
            .collect()
    }

    fn update(&mut self, u: &mut Update, scope: &mut Vec<String>) -> R<()> {
        if u.on_cluster.is_some()
            || u.output.is_some()
            || u.or.is_some()
            || !u.order_by.is_empty()
            || u.limit.is_some()
            || u.settings.is_some()
            || !u.optimizer_hints.is_empty()
            || !u.table.joins.is_empty()
        {
            return Err(self.refuse("this UPDATE syntax"));
        }
        let (name, alias) = match &u.table.relation {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } if alias.as_ref().is_none_or(|a| a.columns.is_empty()) => {
                (name.clone(), alias.clone())
            }
            _ => return Err(self.refuse("this UPDATE target")),
        };
        let tp = self.target(&name, Action::Update)?;
        let (rel, rel_norm) = rel_names(&name, alias.as_ref().map(|a| &a.name));
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let has_from = u.from.is_some();
        if let Some(from) = &mut u.from {
            let (UpdateTableFromKind::BeforeSet(v) | UpdateTableFromKind::AfterSet(v)) = from;
            for twj in v.iter_mut() {
                self.table_with_joins(twj, scope, &Vec::new())?;
            }
        }
        let set_map = self.assignments(&tp, &mut u.assignments, scope)?;
        self.check_node(&mut u.selection, scope)?;
        self.returning(&mut u.returning, &tp, (&rel, &rel_norm), scope)?;
        let filter = tp
            .filter
            .as_ref()
            .map(|f| self.render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c)))))
            .transpose()?;
        let check = match &tp.check {
            Some(c) => {
                let cond = self.render(c, &tp, &|col| {
                    Some(
                        set_map
                            .get(col)
                            .cloned()
                            .unwrap_or_else(|| format!("{rel}.{}", quote_ident(col))),
                    )
                })?;
                Some(self.assert_sql(&cond, &self.write_message("write this row to", &tp)))
            }
            None => None,
        };
        let target = (&tp, rel.as_str(), rel_norm.as_str());
        self.guard_target_rows(&mut u.selection, target, !has_from, filter, check)
    }

    fn delete(&mut self, d: &mut Delete, scope: &mut Vec<String>) -> R<()> {
        if !d.tables.is_empty()
            || d.on_cluster.is_some()
            || d.output.is_some()
            || !d.order_by.is_empty()
            || d.limit.is_some()
            || d.settings.is_some()
            || !d.optimizer_hints.is_empty()
        {
            return Err(self.refuse("this DELETE syntax"));
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
        let (name, alias) = match from.as_slice() {
            [twj] if twj.joins.is_empty() => match &twj.relation {
                TableFactor::Table {
                    name,
                    alias,
                    args: None,
                    ..
                } if alias.as_ref().is_none_or(|a| a.columns.is_empty()) => {
                    (name.clone(), alias.clone())
                }
                _ => return Err(self.refuse("this DELETE target")),
            },
            _ => return Err(self.refuse("this DELETE target")),
        };
        let tp = self.target(&name, Action::Delete)?;
        let (rel, rel_norm) = rel_names(&name, alias.as_ref().map(|a| &a.name));
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let has_using = d.using.is_some();
        if let Some(using) = &mut d.using {
            for twj in using.iter_mut() {
                self.table_with_joins(twj, scope, &Vec::new())?;
            }
        }
        self.check_node(&mut d.selection, scope)?;
        self.returning(&mut d.returning, &tp, (&rel, &rel_norm), scope)?;
        let filter = tp
            .filter
            .as_ref()
            .map(|f| self.render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c)))))
            .transpose()?;
        let target = (&tp, rel.as_str(), rel_norm.as_str());
        self.guard_target_rows(&mut d.selection, target, !has_using, filter, None)
    }

    fn insert(&mut self, i: &mut Insert, scope: &mut Vec<String>) -> R<()> {
        if i.or.is_some()
            || i.ignore
            || i.overwrite
            || i.partitioned.is_some()
            || !i.after_columns.is_empty()
            || i.by_name
            || i.replace_into
            || i.priority.is_some()
            || i.insert_alias.is_some()
            || !i.assignments.is_empty()
            || i.output.is_some()
            || i.overriding.is_some()
            || !i.optimizer_hints.is_empty()
        {
            return Err(self.refuse("this INSERT syntax"));
        }
        let TableObject::TableName(name) = &i.table else {
            return Err(self.refuse("this INSERT target"));
        };
        let name = name.clone();
        let tp = self.target(&name, Action::Insert)?;
        let alias_ident = i.table_alias.as_ref().map(|a| a.alias.clone());
        let (rel, rel_norm) = rel_names(&name, alias_ident.as_ref());
        if !tp.hidden.is_empty() {
            self.forbid_rows
                .insert(rel_norm.clone(), tp.info.name.clone());
        }
        let mut cols: Vec<String> = Vec::new();
        for c in &i.columns {
            let col = object_name_parts(c)
                .and_then(|p| p.last().cloned())
                .ok_or_else(|| self.refuse("this column name"))?;
            if cols.contains(&col) {
                return Err(self.refuse(format!("INSERT naming column {col} twice")));
            }
            cols.push(col);
        }
        let Some(source) = i.source.as_mut() else {
            return Err(self.refuse("INSERT ... DEFAULT VALUES"));
        };
        let values_rows = match (
            &*source.body,
            &source.with,
            &source.order_by,
            &source.limit_clause,
        ) {
            (SetExpr::Values(v), None, None, None) => Some(v.rows.len()),
            _ => None,
        };
        if cols.is_empty() {
            let n = match &*source.body {
                SetExpr::Values(v) if values_rows.is_some() => {
                    v.rows.first().map(|r| r.len()).unwrap_or(0)
                }
                _ => {
                    return Err(self.deny(
                        format!(
                            "must name the columns of INSERT INTO {} ... SELECT",
                            tp.info.name
                        ),
                        None,
                    ))
                }
            };
            cols = tp
                .info
                .columns
                .iter()
                .take(n)
                .map(|c| c.name.clone())
                .collect();
        }
        for c in &cols {
            self.writable_column(&tp, c)?;
        }
        if values_rows.is_some() {
            let SetExpr::Values(v) = &mut *source.body else {
                return Err(self.refuse("(internal)"));
            };
            drop_default_columns(&mut cols, &mut v.rows)
                .map_err(|()| self.refuse("DEFAULT in only some VALUES rows of a column"))?;
            if cols.is_empty() {
                return Err(self.refuse("INSERT of only DEFAULT values"));
            }
            for row in v.rows.iter_mut() {
                if row.len() != cols.len() {
                    return Err(
                        self.refuse("VALUES rows whose length differs from the column list")
                    );
                }
                for (e, col) in row.iter_mut().zip(&cols) {
                    if is_default(e) {
                        return Err(self.refuse("DEFAULT in VALUES (omit the column instead)"));
                    }
                    self.check_node(e, scope)?;
                    let ty = tp
                        .info
                        .column(col)
                        .map(|c| c.type_name.clone())
                        .unwrap_or_default();
                    // The cast gives $n parameters the column's type.
                    *e = parse_expr(&format!("CAST(({e}) AS {ty})"))
                        .map_err(|err| self.refuse(format!("(internal: {err})")))?;
                }
            }
        } else {
            self.query(source, scope)?;
        }
        let type_of = |c: &str| {
            tp.info
                .column(c)
                .map(|c| c.type_name.clone())
                .unwrap_or_default()
        };
        let mut value_of: HashMap<String, String> = cols
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    format!("CAST(pgward_v.{} AS {})", quote_ident(c), type_of(c)),
                )
            })
            .collect();
        let mut out_cols = cols.clone();
        for (col, e) in &tp.presets {
            let v = self.render(e, &tp, &|_| None)?;
            value_of.insert(col.clone(), format!("CAST(({v}) AS {})", type_of(col)));
            out_cols.push(col.clone());
        }
        self.note_columns_written(&tp.info, &out_cols);
        let select_list: Vec<String> = out_cols
            .iter()
            .filter_map(|c| value_of.get(c).cloned())
            .collect();
        let mut text = format!(
            "SELECT {} FROM ({source}) AS pgward_v({})",
            select_list.join(", "),
            cols.iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(check) = &tp.check {
            let missing = std::cell::RefCell::new(BTreeSet::new());
            let cond = self.render(check, &tp, &|c| {
                let v = value_of.get(c).cloned();
                if v.is_none() {
                    missing.borrow_mut().insert(c.to_string());
                }
                v
            });
            if let Some(c) = missing.borrow().iter().next() {
                return Err(self.deny(
                    format!(
                        "must supply column {}.{c} (used by the write check)",
                        tp.info.name
                    ),
                    Some(&tp.check_rule),
                ));
            }
            text.push_str(&format!(
                " WHERE {}",
                self.assert_sql(&cond?, &self.write_message("insert this row into", &tp))
            ));
        }
        i.source = Some(parse_query(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?);
        i.columns = out_cols
            .iter()
            .map(|c| ObjectName::from(vec![sqlparser::ast::Ident::with_quote('"', c.clone())]))
            .collect();
        match &mut i.on {
            None => {}
            Some(OnInsert::OnConflict(oc)) => {
                if let Some(ConflictTarget::Columns { columns, predicate }) =
                    &mut oc.conflict_target
                {
                    for c in columns.iter() {
                        self.check_column(&ident_name(c))?;
                    }
                    self.check_node(predicate, scope)?;
                }
                if let OnConflictAction::DoUpdate(du) = &mut oc.action {
                    if !tp.update {
                        return Err(self.deny(
                            format!(
                                "may not update table {} (ON CONFLICT DO UPDATE)",
                                tp.info.name
                            ),
                            Some(&tp.actions_rule),
                        ));
                    }
                    let set_map = self.assignments(&tp, &mut du.assignments, scope)?;
                    self.check_node(&mut du.selection, scope)?;
                    let check =
                        match &tp.check {
                            Some(c) => {
                                let cond =
                                    self.render(c, &tp, &|col| {
                                        Some(set_map.get(col).cloned().unwrap_or_else(|| {
                                            format!("{rel}.{}", quote_ident(col))
                                        }))
                                    })?;
                                Some(self.assert_sql(
                                    &cond,
                                    &self.write_message("write this row to", &tp),
                                ))
                            }
                            None => None,
                        };
                    let body = self.guarded_where(
                        None,
                        Vec::new(),
                        du.selection.as_ref().map(|e| e.to_string()),
                        check,
                    );
                    let text = match &tp.filter {
                        Some(f) => {
                            // Like RLS: conflicting with a row the service cannot see is an error.
                            let f = self
                                .render(f, &tp, &|c| Some(format!("{rel}.{}", quote_ident(c))))?;
                            let msg = format!("pgward: service {:?} may not update a conflicting row of {} it cannot see ({})", self.service, tp.info.name, tp.filter_rule);
                            format!("CASE WHEN {} THEN {body} END", self.assert_sql(&f, &msg))
                        }
                        None => body,
                    };
                    du.selection = Some(
                        parse_expr(&text).map_err(|e| self.refuse(format!("(internal: {e})")))?,
                    );
                }
            }
            Some(_) => return Err(self.refuse("this ON CONFLICT form")),
        }
        self.returning(&mut i.returning, &tp, (&rel, &rel_norm), scope)?;
        self.note_write(&tp.info);
        Ok(())
    }

    fn copy(&mut self, st: &mut Statement) -> R<String> {
        if !self.policy.allow.copy {
            return Err(self.refuse("COPY (allow.copy is off)"));
        }
        let Statement::Copy {
            source,
            to,
            target,
            payload,
            ..
        } = st
        else {
            return Err(self.refuse("(internal)"));
        };
        if payload.is_some() {
            return Err(self.refuse("COPY with inline data"));
        }
        if *to {
            if !matches!(target, CopyTarget::Stdout) {
                return Err(self.refuse("COPY TO a file or program"));
            }
            if let CopySource::Table {
                table_name,
                columns,
            } = source
            {
                let cols = if columns.is_empty() {
                    "*".to_string()
                } else {
                    columns
                        .iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let q = parse_query(&format!("SELECT {cols} FROM {table_name}"))
                    .map_err(|e| self.refuse(format!("(internal: {e})")))?;
                *source = CopySource::Query(q);
            }
            if let CopySource::Query(q) = source {
                self.query(q, &mut Vec::new())?;
            }
            return Ok(st.to_string());
        }
        if !matches!(target, CopyTarget::Stdin) {
            return Err(self.refuse("COPY FROM a file or program"));
        }
        let CopySource::Table {
            table_name,
            columns,
        } = source
        else {
            return Err(self.refuse("this COPY form"));
        };
        let tp = self.target(table_name, Action::Insert)?;
        if !tp.presets.is_empty() {
            return Err(self.deny(
                format!(
                    "may not COPY into {} (it has presets; use INSERT)",
                    tp.info.name
                ),
                Some(&tp.presets_rule),
            ));
        }
        let cols: Vec<String> = if columns.is_empty() {
            tp.info.columns.iter().map(|c| c.name.clone()).collect()
        } else {
            columns.iter().map(ident_name).collect()
        };
        for c in &cols {
            self.writable_column(&tp, c)?;
        }
        self.note_columns_written(&tp.info, &cols);
        let mut text = st.to_string();
        if !super::sql::round_trips(&text) {
            return Err(self.refuse("this COPY statement (it does not round-trip)"));
        }
        if let Some(check) = &tp.check {
            let cond = self.render(check, &tp, &|c| {
                cols.iter().any(|x| x == c).then(|| quote_ident(c))
            })?;
            let assert = self.assert_sql(&cond, &self.write_message("copy this row into", &tp));
            if !super::sql::expr_round_trips(&assert) {
                return Err(self.refuse("this COPY statement (check does not round-trip)"));
            }
            // COPY FROM ... WHERE runs per row inside the server: bound data is verified there.
            text.push_str(&format!(" WHERE {assert}"));
        }
        self.info.kind = "COPY FROM".into();
        self.note_write(&tp.info);
        Ok(text)
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

pub fn statement_kind(st: &Statement) -> &'static str {
    crate::sql::StatementKind::of(st).as_str()
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

struct ExprChecker<'r, 'a> {
    rw: &'r mut Rewriter<'a>,
    scope: &'r mut Vec<String>,
    depth: usize,
}

impl VisitorMut for ExprChecker<'_, '_> {
    type Break = PolicyDenied;

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<PolicyDenied> {
        if self.depth == 0 {
            // A nested query: rewrite it with its own scope handling, then let the visitor
            // walk over the (already rewritten) result without looking at it.
            let mut scope = self.scope.clone();
            if let Err(e) = self.rw.query(q, &mut scope) {
                return ControlFlow::Break(e);
            }
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &mut Query) -> ControlFlow<PolicyDenied> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<PolicyDenied> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match self.rw.check_expr(e) {
            Ok(()) => ControlFlow::Continue(()),
            Err(err) => ControlFlow::Break(err),
        }
    }
}

struct Substituter<'r, 'a> {
    rw: &'r Rewriter<'a>,
    tp: &'r TablePolicy,
    map: &'r dyn Fn(&str) -> Option<String>,
    err: Option<PolicyDenied>,
}

impl Substituter<'_, '_> {
    fn replacement(&self, e: &Expr) -> R<Option<Expr>> {
        if let Some(Ok(claim)) = claim_call(e) {
            let lit = self.rw.claim_literal(&claim)?;
            return parse_expr(&lit)
                .map(Some)
                .map_err(|err| self.rw.refuse(format!("(internal: {err})")));
        }
        if let Expr::Identifier(id) = e {
            let col = ident_name(id);
            let text = (self.map)(&col).ok_or_else(|| {
                self.rw.deny(
                    format!(
                        "must supply column {}.{col} (used by the write check)",
                        self.tp.info.name
                    ),
                    Some(&self.tp.check_rule),
                )
            })?;
            let parsed =
                parse_expr(&text).map_err(|err| self.rw.refuse(format!("(internal: {err})")))?;
            return Ok(Some(Expr::Nested(Box::new(parsed))));
        }
        Ok(None)
    }
}

impl VisitorMut for Substituter<'_, '_> {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        match self.replacement(e) {
            Ok(Some(new)) => *e = new,
            Ok(None) => {}
            Err(err) => {
                self.err = Some(err);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}
