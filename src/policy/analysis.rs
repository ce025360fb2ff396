//! What a statement of an unrestricted service touches, for its audit record: the tables it
//! reads and the tables it writes. Policy-bound services get this from the rewriter (which
//! sees only protected tables); an unrestricted service's statements are analysed here, on
//! the parse field encryption already made, or — when the session is audited and nothing
//! else parses its statements — through [`AnalysisMemo`], which parses each statement shape
//! of a session once.
use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    CopySource, FromTable, Insert, ObjectName, ObjectType, Query, Statement, TableFactor,
    TableObject, Visit, Visitor,
};

use super::catalog::Catalog;
use super::memo::BoundedMap;
use super::shape;
use super::sql::{ident_name, object_name_parts, parse_statements};
use super::{Rewritten, StatementInfo};

/// The analysis of one statement of an unrestricted service. `catalog` qualifies names
/// (`public.customers`); without one they are recorded as written, case-folded (`customers`).
pub fn unrestricted_info(st: &Statement, catalog: Option<&Catalog>) -> StatementInfo {
    let kind = crate::sql::StatementKind::of(st);
    let (tables_read, tables_written) = tables_touched(st, catalog);
    let columns_read = catalog
        .map(|c| {
            super::columns::named_columns(st, c, |t| {
                t.columns.iter().map(|c| c.name.clone()).collect()
            })
        })
        .unwrap_or_default();
    StatementInfo {
        kind: Some(kind),
        is_ddl: kind.is_ddl(),
        tables_read,
        tables_written,
        columns_read,
        class: Some(crate::sql::CommandClass::of(st)),
        session_name: crate::sql::SessionName::of(st),
        ..StatementInfo::default()
    }
}

/// (tables read, tables written), each in order of first mention.
fn tables_touched(st: &Statement, catalog: Option<&Catalog>) -> (Vec<String>, Vec<String>) {
    let mut found = Tables {
        catalog,
        ctes: BTreeSet::new(),
        read: Vec::new(),
        written: Vec::new(),
    };
    let _ = st.visit(&mut found);
    let Tables {
        ctes,
        read,
        written,
        ..
    } = found;
    // A CTE's name is not a table (recorded unqualified: only names without a catalog
    // entry can be one).
    let is_table = |t: &String| !ctes.contains(t);
    let written: Vec<String> = written.into_iter().filter(is_table).collect();
    let read = read
        .into_iter()
        .filter(|t| is_table(t) && !written.contains(t))
        .collect();
    (read, written)
}

struct Tables<'a> {
    catalog: Option<&'a Catalog>,
    ctes: BTreeSet<String>,
    read: Vec<String>,
    written: Vec<String>,
}

impl Tables<'_> {
    fn name(&self, name: &ObjectName) -> Option<String> {
        let parts = object_name_parts(name)?;
        if let Some(info) = self.catalog.and_then(|c| c.resolve(&parts)) {
            return Some(info.qualified());
        }
        Some(parts.join("."))
    }

    fn push(list: &mut Vec<String>, name: Option<String>) {
        if let Some(name) = name {
            if !list.contains(&name) {
                list.push(name);
            }
        }
    }

    fn write_target(&mut self, name: &ObjectName) {
        let name = self.name(name);
        Self::push(&mut self.written, name);
    }

    fn write_targets(&mut self, st: &Statement) {
        match st {
            Statement::Insert(Insert {
                table: TableObject::TableName(name),
                ..
            }) => self.write_target(name),
            Statement::Update(u) => {
                if let TableFactor::Table { name, .. } = &u.table.relation {
                    self.write_target(name);
                }
            }
            Statement::Delete(d) => {
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
                for twj in from {
                    if let TableFactor::Table { name, .. } = &twj.relation {
                        self.write_target(name);
                    }
                }
            }
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                to,
                ..
            } => {
                let name = self.name(table_name);
                if *to {
                    Self::push(&mut self.read, name);
                } else {
                    Self::push(&mut self.written, name);
                }
            }
            Statement::Truncate(t) => {
                for target in &t.table_names {
                    self.write_target(&target.name);
                }
            }
            // DDL names the relations it creates, changes or drops.
            Statement::CreateTable(ct) => self.write_target(&ct.name),
            Statement::CreateView(cv) => self.write_target(&cv.name),
            Statement::CreateIndex(ci) => self.write_target(&ci.table_name),
            Statement::AlterTable(at) => self.write_target(&at.name),
            Statement::Drop {
                object_type:
                    ObjectType::Table
                    | ObjectType::View
                    | ObjectType::MaterializedView
                    | ObjectType::Index
                    | ObjectType::Sequence,
                names,
                ..
            } => {
                for name in names {
                    self.write_target(name);
                }
            }
            _ => {}
        }
    }
}

impl Visitor for Tables<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, st: &Statement) -> ControlFlow<()> {
        // Nested statements too: data-modifying CTEs, EXPLAIN's statement.
        self.write_targets(st);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.ctes.insert(ident_name(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        // `args: Some(..)` is a set-returning function, not a relation.
        if let TableFactor::Table {
            name, args: None, ..
        } = tf
        {
            let name = self.name(name);
            Self::push(&mut self.read, name);
        }
        ControlFlow::Continue(())
    }
}

/// One audited unrestricted session's analyses, by statement shape (or text, for a statement
/// without literals): which tables a statement touches does not depend on its literals.
#[derive(Default)]
pub struct AnalysisMemo {
    by_shape: BoundedMap<Arc<[StatementInfo]>>,
}

impl AnalysisMemo {
    /// The analysis of `sql` (statements that do not parse have none: they are still
    /// forwarded, as the service is unrestricted, and recorded with their text).
    /// `catalog` is only asked for on a miss.
    pub fn analyse(
        &mut self,
        sql: &str,
        catalog: impl FnOnce() -> Option<Arc<Catalog>>,
    ) -> Arc<Rewritten> {
        let shape = shape::shape_of(sql);
        let key = shape.as_ref().map_or(sql, |s| s.key());
        let statements = match self.by_shape.get(key) {
            Some(hit) => hit.clone(),
            None => {
                let catalog = catalog();
                let statements: Arc<[StatementInfo]> = parse_statements(sql)
                    .map(|v| {
                        v.iter()
                            .map(|st| unrestricted_info(st, catalog.as_deref()))
                            .collect()
                    })
                    .unwrap_or_default();
                self.by_shape.insert(key, statements.clone());
                statements
            }
        };
        Arc::new(Rewritten {
            sql: sql.to_string(),
            statements,
            unrestricted: true,
            params: None,
            client_text: None,
            rewritten_redacted_sha256: None,
        })
    }

    /// After DDL the same text may name other tables (a view became a table): start over.
    pub fn clear(&mut self) {
        self.by_shape.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touched(sql: &str) -> Vec<(Vec<String>, Vec<String>)> {
        parse_statements(sql)
            .unwrap()
            .iter()
            .map(|st| {
                let info = unrestricted_info(st, None);
                (info.tables_read, info.tables_written)
            })
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_and_writes_are_told_apart() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("SELECT 1", &[], &[]),
            ("SELECT * FROM Customers c JOIN sales.Orders o ON o.c = c.id", &["customers", "sales.orders"], &[]),
            ("SELECT * FROM generate_series(1, 3)", &[], &[]),
            ("SELECT (SELECT max(x) FROM t2) FROM t1 WHERE EXISTS (SELECT 1 FROM t3)", &["t2", "t1", "t3"], &[]),
            ("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent", &["orders"], &[]),
            ("INSERT INTO audit_copy SELECT * FROM orders", &["orders"], &["audit_copy"]),
            ("UPDATE orders SET total = 0 FROM customers WHERE customers.id = orders.cid", &["customers"], &["orders"]),
            ("DELETE FROM orders USING customers WHERE customers.id = orders.cid", &["customers"], &["orders"]),
            ("WITH gone AS (DELETE FROM orders RETURNING *) INSERT INTO archive SELECT * FROM gone", &[], &["orders", "archive"]),
            ("COPY orders FROM STDIN", &[], &["orders"]),
            ("COPY orders TO STDOUT", &["orders"], &[]),
            ("TRUNCATE orders, lines", &[], &["orders", "lines"]),
            ("EXPLAIN ANALYZE UPDATE orders SET total = 1", &[], &["orders"]),
            ("CREATE TABLE archive (id int)", &[], &["archive"]),
            ("CREATE TABLE copy AS SELECT * FROM orders", &["orders"], &["copy"]),
            ("ALTER TABLE orders ADD COLUMN note text", &[], &["orders"]),
            ("CREATE INDEX ON orders (total)", &[], &["orders"]),
            ("DROP TABLE orders, lines", &[], &["orders", "lines"]),
            ("CREATE VIEW big AS SELECT * FROM orders", &["orders"], &["big"]),
        ];
        for (sql, read, written) in cases {
            assert_eq!(touched(sql), vec![(names(read), names(written))], "{sql}");
        }
    }

    #[test]
    fn a_catalog_qualifies_names() {
        let catalog = Catalog::from_tables(vec![crate::policy::TableInfo {
            schema: "public".into(),
            name: "customers".into(),
            oid: 1,
            kind: crate::policy::RelKind::Table,
            columns: Vec::new(),
            primary_key: Vec::new(),
        }]);
        let st = &parse_statements("SELECT * FROM customers, unknown").unwrap()[0];
        assert_eq!(
            unrestricted_info(st, Some(&catalog)).tables_read,
            names(&["public.customers", "unknown"])
        );
    }

    #[test]
    fn the_memo_analyses_a_shape_once_and_never_mixes_statements() {
        let mut memo = AnalysisMemo::default();
        let a = memo.analyse("SELECT * FROM orders WHERE id = 1", || None);
        let b = memo.analyse("SELECT * FROM orders WHERE id = 2", || {
            panic!("a hit needs no catalog")
        });
        assert!(
            Arc::ptr_eq(&a.statements, &b.statements),
            "same shape, one analysis"
        );
        assert_eq!(b.sql, "SELECT * FROM orders WHERE id = 2");
        let c = memo.analyse("SELECT * FROM lines WHERE id = 2", || None);
        assert_eq!(c.statements[0].tables_read, names(&["lines"]));
        assert!(memo
            .analyse("SELEKT garbage", || None)
            .statements
            .is_empty());
    }
}
