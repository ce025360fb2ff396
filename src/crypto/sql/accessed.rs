//! Which encrypted columns a statement reads, searches or writes, for its audit record
//! (`encrypted_columns`). Computed on the client's statement before the transform renames
//! anything (`email = …` becomes `email_bidx = …`), with the transform's own name resolution:
//! a column named as `col`, `rel.col` or `schema.table.col` anywhere in the statement (a
//! derived table's or CTE's column by the table column it carries); every encrypted column of
//! a table read whole (`*`, `rel.*`, `TABLE t`, `RETURNING *`, INSERT or COPY without a column
//! list); the targets of INSERT, UPDATE, upsert and COPY. When in doubt it names a column rather than
//! leave it out: an auditor asking "who could have seen ssn" must not miss a statement.
use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    AssignmentTarget, CopySource, Expr, Insert, ObjectName, OnConflictAction, OnInsert, Query,
    Select, SelectItem, SelectItemQualifiedWildcardKind, Statement, TableFactor, TableObject,
    Update, Visit, Visitor,
};

use super::Transform;
use crate::sql::parse::{ident_name, object_name_parts};

impl Transform<'_> {
    /// The encrypted columns `st` touches, as `table.column`, sorted.
    pub(super) fn accessed_columns(&self, st: &Statement) -> Vec<String> {
        let mut found = Accessed {
            t: self,
            columns: BTreeSet::new(),
        };
        // The visitor calls `statement_targets` for this statement and every nested one.
        let _ = st.visit(&mut found);
        found
            .columns
            .into_iter()
            .map(|(table, column)| {
                let name = table.rsplit('.').next().unwrap_or(&table);
                format!("{name}.{column}")
            })
            .collect()
    }
}

struct Accessed<'b, 'c> {
    t: &'b Transform<'c>,
    /// (`schema.table`, column)
    columns: BTreeSet<(String, String)>,
}

impl Accessed<'_, '_> {
    /// The encrypted relations a relation name or alias (as the transform recorded it) stands
    /// for.
    fn tables_of_rel(&self, rel: &str) -> Vec<String> {
        self.t
            .rel_keys(rel)
            .iter()
            .filter(|key| self.t.enc_table(key).is_some())
            .cloned()
            .collect()
    }

    fn table_of_name(&self, name: &ObjectName) -> Option<String> {
        let table = self.t.qualify(name)?;
        self.t.enc_table(&table).map(|_| table)
    }

    /// Recorded as the table column it is (a derived table's or CTE's column by what it
    /// carries).
    fn column(&mut self, table: &str, column: &str) {
        if let Some(c) = self.t.enc_table(table).and_then(|cols| cols.get(column)) {
            self.columns
                .insert((c.col.table.clone(), c.col.column.clone()));
        }
    }

    fn whole_table(&mut self, table: &str) {
        if let Some(cols) = self.t.enc_table(table) {
            for c in cols.values() {
                self.columns
                    .insert((c.col.table.clone(), c.col.column.clone()));
            }
        }
    }

    fn every_table(&mut self) {
        for table in self.t.tables.clone() {
            self.whole_table(&table);
        }
    }

    /// An unqualified name: that column of every encrypted table mentioned (the transform's
    /// conservative resolution), or, if it names a relation, its whole row.
    fn unqualified(&mut self, name: &str) {
        let mut named_column = false;
        for table in &self.t.tables {
            if let Some(c) = self.t.enc_table(table).and_then(|cols| cols.get(name)) {
                self.columns
                    .insert((c.col.table.clone(), c.col.column.clone()));
                named_column = true;
            }
        }
        if !named_column {
            for table in self.tables_of_rel(name) {
                self.whole_table(&table);
            }
        }
    }

    fn wildcards(&mut self, items: &[SelectItem]) {
        for item in items {
            match item {
                SelectItem::Wildcard(_) => self.every_table(),
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    let parts = object_name_parts(n).unwrap_or_default();
                    let tables = match parts.as_slice() {
                        [rel] => self.tables_of_rel(rel),
                        _ => self.table_of_name(n).into_iter().collect(),
                    };
                    if tables.is_empty() {
                        // Not resolvable here: count it as everything rather than nothing.
                        self.every_table();
                    }
                    for table in tables {
                        self.whole_table(&table);
                    }
                }
                _ => {}
            }
        }
    }

    fn assignment_targets(&mut self, table: &str, assignments: &[sqlparser::ast::Assignment]) {
        for a in assignments {
            match &a.target {
                AssignmentTarget::ColumnName(n) => {
                    if let Some(c) = object_name_parts(n).and_then(|p| p.last().cloned()) {
                        self.column(table, &c);
                    }
                }
                AssignmentTarget::Tuple(_) => self.whole_table(table),
            }
        }
    }

    /// Written columns, which are names rather than expressions (the visitor's part).
    fn statement_targets(&mut self, st: &Statement) {
        match st {
            Statement::Insert(i) => self.insert_targets(i),
            Statement::Update(u) => self.update_targets(u),
            Statement::Delete(d) => {
                if let Some(returning) = &d.returning {
                    self.wildcards(returning);
                }
            }
            Statement::Copy {
                source:
                    CopySource::Table {
                        table_name,
                        columns,
                    },
                ..
            } => {
                let Some(table) = self.table_of_name(table_name) else {
                    return;
                };
                if columns.is_empty() {
                    self.whole_table(&table);
                }
                for c in columns {
                    self.column(&table, &ident_name(c));
                }
            }
            _ => {}
        }
    }

    fn insert_targets(&mut self, i: &Insert) {
        let TableObject::TableName(name) = &i.table else {
            return;
        };
        let Some(table) = self.table_of_name(name) else {
            return;
        };
        if i.columns.is_empty() {
            self.whole_table(&table);
        }
        for c in &i.columns {
            if let Some(c) = object_name_parts(c).and_then(|p| p.last().cloned()) {
                self.column(&table, &c);
            }
        }
        if let Some(OnInsert::OnConflict(oc)) = &i.on {
            if let OnConflictAction::DoUpdate(du) = &oc.action {
                self.assignment_targets(&table, &du.assignments);
            }
        }
        if let Some(returning) = &i.returning {
            self.wildcards(returning);
        }
    }

    fn update_targets(&mut self, u: &Update) {
        if let TableFactor::Table { name, .. } = &u.table.relation {
            if let Some(table) = self.table_of_name(name) {
                self.assignment_targets(&table, &u.assignments);
            }
        }
        if let Some(returning) = &u.returning {
            self.wildcards(returning);
        }
    }
}

impl Visitor for Accessed<'_, '_> {
    type Break = ();

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        self.wildcards(&select.projection);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        // `TABLE t` reads every column of t.
        let mut tables = Vec::new();
        self.t.table_branches(&q.body, &mut tables);
        for c in tables {
            self.whole_table(&c.table);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, st: &Statement) -> ControlFlow<()> {
        // Data-modifying CTEs and other nested writes.
        self.statement_targets(st);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(id) => self.unqualified(&ident_name(id)),
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(ident_name).collect();
                match names.as_slice() {
                    [rel, column] => {
                        for table in self.tables_of_rel(rel) {
                            self.column(&table, column);
                        }
                    }
                    [schema, table, column] => {
                        self.column(&format!("{schema}.{table}"), column);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::enc;
    use crate::sql::parse::{parse_statements, sanitize};

    async fn accessed(sql: &str) -> Vec<Vec<String>> {
        let e = enc().await;
        let mut stmts = parse_statements(sql).unwrap();
        for st in &mut stmts {
            sanitize(st).unwrap();
        }
        let outcome = e
            .transform(&mut stmts, None, &crate::crypto::scope::KeyScope::default())
            .unwrap();
        assert_eq!(outcome.accessed.len(), stmts.len(), "{sql}");
        outcome.accessed
    }

    #[tokio::test]
    async fn reads_searches_and_writes_of_encrypted_columns_are_named() {
        let both = ["customers.email", "customers.ssn"];
        let cases: &[(&str, &[&str])] = &[
            ("SELECT name FROM customers WHERE id = 1", &[]),
            ("SELECT count(*) FROM customers", &[]),
            ("SELECT name, email FROM customers", &["customers.email"]),
            ("SELECT c.ssn AS s FROM customers c", &["customers.ssn"]),
            ("SELECT public.customers.ssn FROM public.customers", &["customers.ssn"]),
            ("SELECT name FROM customers WHERE email = 'a@example.com'", &["customers.email"]),
            ("SELECT * FROM customers", &both),
            (
                "SELECT c.*, i.amount_cents FROM customers c JOIN invoices i ON i.customer_id = c.id",
                &both,
            ),
            (
                "SELECT c.name FROM customers c WHERE c.id IN (SELECT customer_id FROM invoices WHERE card_number = '4111')",
                &["invoices.card_number"],
            ),
            (
                "WITH x AS (SELECT * FROM customers) SELECT x.ssn FROM x",
                &both,
            ),
            (
                "SELECT y.e FROM (SELECT email AS e FROM customers) y",
                &["customers.email"],
            ),
            ("SELECT x.id FROM (TABLE customers) x", &both),
            ("INSERT INTO customers (name, ssn) VALUES ('n', '123')", &["customers.ssn"]),
            ("UPDATE customers SET email = 'b@example.com' WHERE id = 1", &["customers.email"]),
            ("UPDATE customers SET name = 'x' WHERE id = 1 RETURNING *", &both),
            ("DELETE FROM customers WHERE id = 1 RETURNING *", &both),
            ("DELETE FROM customers WHERE id = 1", &[]),
            ("COPY customers (name, email) FROM STDIN", &["customers.email"]),
            (
                "WITH x AS (INSERT INTO invoices (amount_cents, card_number) VALUES (1, '4111') RETURNING id) SELECT id FROM x",
                &["invoices.card_number"],
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(accessed(sql).await, vec![expected.to_vec()], "{sql}");
        }
    }

    #[tokio::test]
    async fn each_statement_of_a_text_has_its_own_list() {
        assert_eq!(
            accessed("SELECT email FROM customers; SELECT 1; SELECT card_number FROM invoices")
                .await,
            vec![
                vec!["customers.email".to_string()],
                vec![],
                vec!["invoices.card_number".to_string()],
            ]
        );
    }
}
