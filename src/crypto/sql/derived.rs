//! Scopes for encrypted columns carried out of derived tables and CTEs.
//!
//! `SELECT length(x.e) FROM (SELECT email AS e FROM customers) x` computes on ciphertext as
//! surely as `SELECT length(email) FROM customers`: the derived table's column `e` *is*
//! `customers.email`. After the statement's relations are collected, every derived table
//! (`(…) AS x`, LATERAL included) and every CTE is given the encrypted columns its SELECT
//! list exposes — a plain selection under its output name, or all encrypted columns of its
//! relations for `*` / `rel.*` — so references to them through the outer query's names are
//! held to the same rules (select it, test IS NULL, compare when searchable) as the column
//! itself. A column exposed under another name is not searchable through it (its blind index
//! is not exposed with it); one renamed by a column alias list (`AS x(a, b)`) is refused, as
//! pgward does not follow positions. `TABLE t` exposes every encrypted column of `t`, a
//! data-modifying CTE what its RETURNING list returns, and a join in parentheses with an alias
//! (`(a JOIN b) AS j`) the encrypted columns of its members.
//!
//! Exposures depend on one another in any order — a derived table in a SELECT list may read
//! one in the FROM list, which is visited after it — so they are computed again until none
//! changes.
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

use sqlparser::ast::{
    FromTable, Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableAlias,
    TableFactor, TableWithJoins, UpdateTableFromKind, Visit, Visitor,
};

use super::relations::{derived_key, from_factors, join_key};
use super::{refuse, EncCol, Refused, Transform};
use crate::sql::parse::ident_name;

/// Most derived tables, joins and CTEs one statement may carry encrypted columns through.
const MAX_DERIVED: usize = 256;

impl Transform<'_> {
    /// Give every derived table, aliased join and CTE of `st` the encrypted columns it exposes.
    pub(super) fn collect_derived(&mut self, st: &Statement) -> Result<(), Refused> {
        // Each round settles at least one more level of nesting; exposures only grow.
        for _ in 0..=MAX_DERIVED + 1 {
            let before = (self.derived.clone(), self.output_columns.clone());
            self.expose_all(st)?;
            if (&self.derived, &self.output_columns) == (&before.0, &before.1) {
                return Ok(());
            }
        }
        Err(refuse(
            "pgward: too many derived tables over encrypted columns in one statement",
        ))
    }

    fn expose_all(&mut self, st: &Statement) -> Result<(), Refused> {
        struct Collect<'b, 'c> {
            t: &'b mut Transform<'c>,
            /// This round's column names (see `names`); CTEs of one name share a key, and
            /// only the names all of them have count.
            names: HashMap<String, Option<HashSet<String>>>,
        }
        impl Collect<'_, '_> {
            fn names(&mut self, key: String, names: Option<HashSet<String>>) {
                let merged = match self.names.remove(&key) {
                    None => names,
                    Some(known) => known.zip(names).map(|(a, b)| &a & &b),
                };
                self.names.insert(key, merged);
            }
        }
        impl Visitor for Collect<'_, '_> {
            type Break = Refused;
            fn post_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<Refused> {
                let result = match tf {
                    TableFactor::Table { name, alias, .. } => {
                        self.t.refuse_renamed_table(name, alias)
                    }
                    TableFactor::Derived {
                        subquery,
                        alias: Some(alias),
                        ..
                    } => {
                        let names = self.t.output_names(&subquery.body);
                        self.names(derived_key(alias), names);
                        self.t
                            .exposed(subquery)
                            .and_then(|e| self.t.expose(derived_key(alias), e, alias))
                    }
                    TableFactor::NestedJoin {
                        table_with_joins,
                        alias: Some(alias),
                    } => {
                        let names = self.t.join_names(table_with_joins);
                        self.names(join_key(alias), names);
                        let e = self.t.join_exposed(table_with_joins);
                        e.and_then(|e| self.t.expose(join_key(alias), e, alias))
                    }
                    _ => Ok(()),
                };
                match result {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => ControlFlow::Break(e),
                }
            }
            fn post_visit_query(&mut self, q: &Query) -> ControlFlow<Refused> {
                let Some(with) = &q.with else {
                    return ControlFlow::Continue(());
                };
                for cte in &with.cte_tables {
                    // References to the CTE were recorded under the name they qualify to.
                    let name = sqlparser::ast::ObjectName::from(vec![cte.alias.name.clone()]);
                    let Some(key) = self.t.qualify(&name) else {
                        continue;
                    };
                    let names = self.t.output_names(&cte.query.body);
                    self.names(key.clone(), names);
                    let result = self
                        .t
                        .exposed(&cte.query)
                        .and_then(|e| self.t.expose(key, e, &cte.alias));
                    if let Err(e) = result {
                        return ControlFlow::Break(e);
                    }
                }
                ControlFlow::Continue(())
            }
        }
        let mut collect = Collect {
            t: self,
            names: HashMap::new(),
        };
        if let ControlFlow::Break(e) = st.visit(&mut collect) {
            return Err(e);
        }
        let names = collect.names;
        self.output_columns = names
            .into_iter()
            .filter_map(|(key, names)| Some((key, names?)))
            .collect();
        Ok(())
    }

    /// A table renamed by a column alias list (`customers AS c(a, b, e)`) while it has
    /// encrypted columns: pgward does not follow columns through positional renames.
    fn refuse_renamed_table(
        &self,
        name: &sqlparser::ast::ObjectName,
        alias: &Option<TableAlias>,
    ) -> Result<(), Refused> {
        let Some(alias) = alias.as_ref().filter(|a| !a.columns.is_empty()) else {
            return Ok(());
        };
        match self.qualify(name).and_then(|t| self.first_encrypted_column(&t)) {
            Some(c) => Err(refuse(format!(
                "pgward: {} renames the columns (AS {}(…)) of a table with encrypted column {}.{}; pgward does not follow encrypted columns through positional renames",
                ident_name(&alias.name),
                ident_name(&alias.name),
                c.table,
                c.column
            ))),
            None => Ok(()),
        }
    }

    /// Record the encrypted columns `exposed` under `key` (added to what it already exposes:
    /// CTEs of one name in different scopes share their key).
    fn expose(
        &mut self,
        key: String,
        exposed: HashMap<String, EncCol>,
        alias: &TableAlias,
    ) -> Result<(), Refused> {
        if exposed.is_empty() {
            return Ok(());
        }
        if !alias.columns.is_empty() {
            return Err(refuse(format!(
                "pgward: {} renames its columns (AS {}(…)) while carrying encrypted columns; pgward does not follow encrypted columns through positional renames — name them in the inner SELECT list instead",
                ident_name(&alias.name),
                ident_name(&alias.name)
            )));
        }
        if !self.derived.contains_key(&key) && self.derived.len() >= MAX_DERIVED {
            return Err(refuse(
                "pgward: too many derived tables over encrypted columns in one statement",
            ));
        }
        let known = self.derived.entry(key).or_default();
        for (name, c) in exposed {
            match known.get_mut(&name) {
                Some(k) if k.col != c.col => {
                    return Err(refuse(format!(
                        "pgward: {} exposes two encrypted columns named {name} ({}.{} and {}.{}); name them apart",
                        ident_name(&alias.name),
                        k.col.table,
                        k.col.column,
                        c.col.table,
                        c.col.column
                    )))
                }
                Some(k) => k.searchable &= c.searchable,
                None => {
                    known.insert(name, c);
                }
            }
        }
        Ok(())
    }

    /// Output name → encrypted column, for the result of `query`.
    fn exposed(&self, query: &Query) -> Result<HashMap<String, EncCol>, Refused> {
        self.exposed_body(&query.body)
    }

    fn exposed_body(&self, body: &SetExpr) -> Result<HashMap<String, EncCol>, Refused> {
        match body {
            SetExpr::Select(select) => {
                self.exposed_items(&select.projection, &self.factor_keys(&select.from))
            }
            SetExpr::Query(inner) => self.exposed(inner),
            // A set operation's columns are named by its first branch (branches carrying
            // encrypted columns are refused by the predicate rules).
            SetExpr::SetOperation { left, .. } => self.exposed_body(left),
            SetExpr::Table(t) => {
                let mut out = HashMap::new();
                if let Some(key) = self.table_body_key(t) {
                    self.extend_with_table(&mut out, &key);
                }
                Ok(out)
            }
            SetExpr::Insert(Statement::Insert(i)) => {
                let target = match &i.table {
                    sqlparser::ast::TableObject::TableName(name) => self.qualify(name),
                    _ => None,
                };
                self.exposed_items(
                    i.returning.as_deref().unwrap_or_default(),
                    &target.into_iter().collect::<Vec<_>>(),
                )
            }
            SetExpr::Update(Statement::Update(u)) => {
                let mut from = vec![u.table.clone()];
                if let Some(UpdateTableFromKind::BeforeSet(f) | UpdateTableFromKind::AfterSet(f)) =
                    &u.from
                {
                    from.extend(f.iter().cloned());
                }
                self.exposed_items(
                    u.returning.as_deref().unwrap_or_default(),
                    &self.factor_keys(&from),
                )
            }
            SetExpr::Delete(Statement::Delete(d)) => {
                let (FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f)) = &d.from;
                let mut from = f.clone();
                from.extend(d.using.iter().flatten().cloned());
                self.exposed_items(
                    d.returning.as_deref().unwrap_or_default(),
                    &self.factor_keys(&from),
                )
            }
            _ => Ok(HashMap::new()),
        }
    }

    /// Output name → encrypted column, for a SELECT or RETURNING list over the relations
    /// `from` (by key).
    fn exposed_items(
        &self,
        items: &[SelectItem],
        from: &[String],
    ) -> Result<HashMap<String, EncCol>, Refused> {
        let mut out = HashMap::new();
        for item in items {
            match item {
                SelectItem::UnnamedExpr(expr) => {
                    if let (Some(c), Some(name)) = (self.column_of(expr)?, output_name(expr)) {
                        out.insert(name, renamed(c));
                    }
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    if let Some(c) = self.column_of(expr)? {
                        out.insert(ident_name(alias), renamed(c));
                    }
                }
                SelectItem::Wildcard(_) => {
                    for key in from {
                        self.extend_with_table(&mut out, key);
                    }
                }
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    for key in self.qualified_wildcard_keys(n)? {
                        self.extend_with_table(&mut out, &key);
                    }
                }
                SelectItem::ExprWithAliases { expr, .. } => {
                    if self.column_of(expr)?.is_some() {
                        return Err(refuse(
                            "pgward: an encrypted column cannot be selected under a list of aliases",
                        ));
                    }
                }
                SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::Expr(_), _) => {}
            }
        }
        Ok(out)
    }

    /// The encrypted columns of the members of a join in parentheses, under their own names.
    fn join_exposed(&self, twj: &TableWithJoins) -> Result<HashMap<String, EncCol>, Refused> {
        let mut out: HashMap<String, EncCol> = HashMap::new();
        for key in self.factor_keys(std::slice::from_ref(twj)) {
            for (name, c) in self.enc_table(&key).into_iter().flatten() {
                match out.get(name) {
                    Some(k) if k.col != c.col => {
                        return Err(refuse(format!(
                            "pgward: a join in parentheses with an alias joins two encrypted columns named {name} ({}.{} and {}.{}); reference them through their own tables",
                            k.col.table, k.col.column, c.col.table, c.col.column
                        )))
                    }
                    _ => {
                        out.insert(name.clone(), c.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every encrypted column of a relation, under its own name (its blind index comes along).
    pub(super) fn extend_with_table(&self, out: &mut HashMap<String, EncCol>, key: &str) {
        if let Some(cols) = self.enc_table(key) {
            for (name, c) in cols {
                out.insert(name.clone(), c.clone());
            }
        }
    }

    /// The transform's keys of the relations a FROM list makes visible (what `*` reads).
    pub(super) fn factor_keys(&self, from: &[TableWithJoins]) -> Vec<String> {
        from_factors(from)
            .into_iter()
            .filter_map(|factor| match factor {
                TableFactor::Table { name, .. } => self.qualify(name),
                TableFactor::Derived { alias: Some(a), .. } => Some(derived_key(a)),
                TableFactor::NestedJoin { alias: Some(a), .. } => Some(join_key(a)),
                _ => None,
            })
            .collect()
    }
}

/// The name PostgreSQL gives an unaliased column reference in a SELECT list.
pub(super) fn output_name(expr: &sqlparser::ast::Expr) -> Option<String> {
    match expr {
        sqlparser::ast::Expr::Identifier(id) => Some(ident_name(id)),
        sqlparser::ast::Expr::CompoundIdentifier(parts) => parts.last().map(ident_name),
        _ => None,
    }
}

/// A column exposed under a derived table's name: its blind index is not exposed with it.
fn renamed(c: EncCol) -> EncCol {
    EncCol {
        searchable: false,
        ..c
    }
}
