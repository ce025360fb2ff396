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
//! pgward does not follow positions.
use std::collections::HashMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableAlias,
    TableFactor, TableWithJoins, VisitMut, VisitorMut,
};

use super::{refuse, EncCol, Refused, Transform};
use crate::sql::parse::{ident_name, object_name_parts};

/// Most derived tables and CTEs one statement may carry encrypted columns through.
const MAX_DERIVED: usize = 256;

impl Transform<'_> {
    /// Give every derived table and CTE of `st` the encrypted columns it exposes (inner ones
    /// first, so that a derived table over a derived table sees through both).
    pub(super) fn collect_derived(&mut self, st: &mut Statement) -> Result<(), Refused> {
        struct Collect<'b, 'c> {
            t: &'b mut Transform<'c>,
        }
        impl VisitorMut for Collect<'_, '_> {
            type Break = Refused;
            fn post_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<Refused> {
                if let TableFactor::Derived {
                    subquery,
                    alias: Some(alias),
                    ..
                } = tf
                {
                    let key = format!(
                        "derived:{}:{}",
                        ident_name(&alias.name),
                        self.t.derived.len()
                    );
                    if let Err(e) = self.t.expose(&key, subquery, alias) {
                        return ControlFlow::Break(e);
                    }
                    self.t.aliases.insert(ident_name(&alias.name), key.clone());
                    self.t.tables.push(key);
                }
                ControlFlow::Continue(())
            }
            fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                let Some(with) = &q.with else {
                    return ControlFlow::Continue(());
                };
                for cte in &with.cte_tables {
                    // References to the CTE were recorded under the name they qualify to.
                    let name = sqlparser::ast::ObjectName::from(vec![cte.alias.name.clone()]);
                    let Some(key) = self.t.qualify(&name) else {
                        continue;
                    };
                    if let Err(e) = self.t.expose(&key, &cte.query, &cte.alias) {
                        return ControlFlow::Break(e);
                    }
                }
                ControlFlow::Continue(())
            }
        }
        match st.visit(&mut Collect { t: self }) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    /// Record the encrypted columns `query` exposes under `key`.
    fn expose(&mut self, key: &str, query: &Query, alias: &TableAlias) -> Result<(), Refused> {
        let exposed = self.exposed(query)?;
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
        if self.derived.len() >= MAX_DERIVED {
            return Err(refuse(
                "pgward: too many derived tables over encrypted columns in one statement",
            ));
        }
        self.derived.insert(key.to_string(), exposed);
        Ok(())
    }

    /// Output name → encrypted column, for the SELECT list of `query`.
    fn exposed(&self, query: &Query) -> Result<HashMap<String, EncCol>, Refused> {
        let SetExpr::Select(select) = &*query.body else {
            // Set operations over encrypted columns are refused by the predicate rules.
            return match &*query.body {
                SetExpr::Query(inner) => self.exposed(inner),
                _ => Ok(HashMap::new()),
            };
        };
        let mut out = HashMap::new();
        for item in &select.projection {
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
                    for key in relation_keys(&select.from, self) {
                        self.extend_with_table(&mut out, &key);
                    }
                }
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    let rel = object_name_parts(n).and_then(|p| p.last().cloned());
                    if let Some(key) = rel.and_then(|r| self.aliases.get(&r).cloned()) {
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

    /// Every encrypted column of a relation, under its own name (its blind index comes along).
    fn extend_with_table(&self, out: &mut HashMap<String, EncCol>, key: &str) {
        if let Some(cols) = self.enc_table(key) {
            for (name, c) in cols {
                out.insert(name.clone(), c.clone());
            }
        }
    }
}

/// The name PostgreSQL gives an unaliased column reference in a SELECT list.
fn output_name(expr: &sqlparser::ast::Expr) -> Option<String> {
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

/// The transform's keys of the relations in a FROM list.
fn relation_keys(from: &[TableWithJoins], t: &Transform<'_>) -> Vec<String> {
    let factors = from.iter().flat_map(|twj| {
        std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation))
    });
    let mut keys = Vec::new();
    for factor in factors {
        let name = match factor {
            TableFactor::Table { name, alias, .. } => match alias {
                Some(a) => Some(ident_name(&a.name)),
                None => object_name_parts(name).and_then(|p| p.last().cloned()),
            },
            TableFactor::Derived { alias: Some(a), .. } => Some(ident_name(&a.name)),
            _ => None,
        };
        if let Some(key) = name.and_then(|n| t.aliases.get(&n).cloned()) {
            keys.push(key);
        }
    }
    keys
}
