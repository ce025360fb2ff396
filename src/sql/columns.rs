//! The columns a statement names, for its audit record: `SELECT id FROM customers` reads
//! `customers.id`, not every column the service could see, and a refused attempt to read
//! `customers.ssn` is still recorded as naming it.
//!
//! Names are resolved against the relations the statement mentions (through the catalog): a
//! qualified reference (`c.email`) against the relation of that alias or name, a bare one
//! against every mentioned relation that has such a column. `*` and `rel.*` stand for the
//! columns the caller says the service sees of that relation. A column of a CTE or derived
//! table that is not also a column of a mentioned relation is not recorded.
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableFactor,
    Visit, Visitor,
};

use super::catalog::{Catalog, TableInfo};
use super::parse::{ident_name, object_name_parts};

/// `table.column` of every column `st` names, in order of first mention. `visible` gives the
/// columns a wildcard over a relation expands to.
pub fn named_columns(
    st: &Statement,
    catalog: &Catalog,
    visible: impl Fn(&TableInfo) -> Vec<String>,
) -> Vec<String> {
    let mut names = Names {
        catalog,
        relations: Vec::new(),
        references: Vec::new(),
    };
    let _ = st.visit(&mut names);
    let mut out = Vec::new();
    for reference in &names.references {
        for (table, column) in names.resolve(reference, &visible) {
            let name = format!("{}.{column}", table.name);
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// A column reference as written.
enum Reference {
    /// `col`
    Bare(String),
    /// `rel.col` (the qualifier's last part)
    Qualified(String, String),
    /// `*`
    Wildcard,
    /// `rel.*`
    QualifiedWildcard(String),
}

struct Names<'a> {
    catalog: &'a Catalog,
    /// Relations mentioned, with the name they are referred to by (alias or own name).
    relations: Vec<(String, &'a TableInfo)>,
    references: Vec<Reference>,
}

impl<'a> Names<'a> {
    fn resolve(
        &self,
        reference: &Reference,
        visible: &impl Fn(&TableInfo) -> Vec<String>,
    ) -> Vec<(&'a TableInfo, String)> {
        let relations = &self.relations;
        let by_name = |q: &String| {
            let q = q.clone();
            relations.iter().filter(move |(n, _)| *n == q)
        };
        match reference {
            Reference::Bare(column) => self
                .relations
                .iter()
                .filter(|(_, t)| t.column(column).is_some())
                .map(|(_, t)| (*t, column.clone()))
                .collect(),
            Reference::Qualified(q, column) => by_name(q)
                .filter(|(_, t)| t.column(column).is_some())
                .map(|(_, t)| (*t, column.clone()))
                .collect(),
            Reference::Wildcard => self
                .relations
                .iter()
                .flat_map(|(_, t)| visible(t).into_iter().map(|c| (*t, c)))
                .collect(),
            Reference::QualifiedWildcard(q) => by_name(q)
                .flat_map(|(_, t)| visible(t).into_iter().map(|c| (*t, c)))
                .collect(),
        }
    }

    fn projection(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(select) => {
                for item in &select.projection {
                    match item {
                        SelectItem::Wildcard(_) => self.references.push(Reference::Wildcard),
                        SelectItem::QualifiedWildcard(
                            SelectItemQualifiedWildcardKind::ObjectName(name),
                            _,
                        ) => {
                            if let Some(last) =
                                object_name_parts(name).and_then(|p| p.last().cloned())
                            {
                                self.references.push(Reference::QualifiedWildcard(last));
                            }
                        }
                        _ => {}
                    }
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.projection(left);
                self.projection(right);
            }
            SetExpr::Query(q) => self.projection(&q.body),
            _ => {}
        }
    }
}

impl Visitor for Names<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.projection(&q.body);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = tf
        {
            let catalog: &Catalog = self.catalog;
            let parts = object_name_parts(name);
            if let Some(info) = parts.as_deref().and_then(|p| catalog.resolve(p)) {
                let called = alias
                    .as_ref()
                    .map(|a| ident_name(&a.name))
                    .unwrap_or_else(|| info.name.clone());
                self.relations.push((called, info));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(id) => self.references.push(Reference::Bare(ident_name(id))),
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let n = parts.len();
                self.references.push(Reference::Qualified(
                    ident_name(&parts[n - 2]),
                    ident_name(&parts[n - 1]),
                ));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parse::parse_statements;
    use crate::sql::{ColumnInfo, RelKind};

    fn table(name: &str, columns: &[&str]) -> TableInfo {
        TableInfo {
            schema: "public".into(),
            name: name.into(),
            oid: 1,
            kind: RelKind::Table,
            columns: columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.to_string(),
                    type_name: "text".into(),
                    type_oid: 25,
                    not_null: false,
                })
                .collect(),
            primary_key: Vec::new(),
        }
    }

    fn named(sql: &str) -> Vec<String> {
        let catalog = Catalog::from_tables(vec![
            table("customers", &["id", "name", "email", "ssn"]),
            table("invoices", &["id", "customer_id", "amount"]),
        ]);
        let st = &parse_statements(sql).unwrap()[0];
        // The service sees every column but ssn.
        named_columns(st, &catalog, |t| {
            t.columns
                .iter()
                .map(|c| c.name.clone())
                .filter(|c| c != "ssn")
                .collect()
        })
    }

    #[test]
    fn records_name_what_the_statement_names() {
        assert_eq!(named("SELECT id FROM customers"), ["customers.id"]);
        assert_eq!(
            named("SELECT ssn FROM customers WHERE name = 'x'"),
            ["customers.ssn", "customers.name"]
        );
        assert_eq!(
            named(
                "SELECT c.email, i.amount FROM customers c JOIN invoices i ON i.customer_id = c.id"
            ),
            [
                "customers.email",
                "invoices.amount",
                "invoices.customer_id",
                "customers.id"
            ]
        );
        assert_eq!(
            named("SELECT * FROM invoices"),
            ["invoices.id", "invoices.customer_id", "invoices.amount"]
        );
        assert_eq!(
            named("SELECT c.* FROM customers c, invoices"),
            ["customers.id", "customers.name", "customers.email"]
        );
        // The columns an UPDATE sets are its columns_written; it reads what its WHERE names.
        assert_eq!(
            named("UPDATE customers SET email = 'e' WHERE id = 2"),
            ["customers.id"]
        );
        assert!(named("SELECT 1").is_empty());
        assert!(named("SELECT x FROM (SELECT 1 AS x) s").is_empty());
    }
}
