//! The relations a statement names, and the names it references them by: tables (by alias or
//! name), derived tables, CTEs, joins written in parentheses with an alias, and the other FROM
//! items (functions, UNNEST, …). They are all registered before anything is resolved, so a
//! reference resolves the same whatever order the statement's parts are visited in.
//!
//! A qualified column reference whose qualifier names none of them is refused: pgward cannot
//! tell what it reads. So is any mention of a blind-index column (`<col>_bidx`): it is
//! pgward's own, and what it holds — equal for equal values — must not reach a client as a
//! value, a sort key or a group.
use std::ops::ControlFlow;

use sqlparser::ast::{TableAlias, TableWithJoins};

use super::*;

const DERIVED_PREFIX: &str = "derived:";
const JOIN_PREFIX: &str = "join:";
/// A FROM item without encrypted columns of its own (a function, UNNEST, …): a qualifier
/// naming it resolves, to nothing encrypted (what it computes from is checked where it is
/// written, in its arguments).
const OPAQUE_PREFIX: &str = "opaque:";

/// The key of a derived table: its alias and where the alias is written, so that every part of
/// the transform names the same derived table the same way, however often its alias is reused.
pub(super) fn derived_key(alias: &TableAlias) -> String {
    keyed(DERIVED_PREFIX, alias)
}

/// The key of `(a JOIN b) AS j`: its columns are those of its members.
pub(super) fn join_key(alias: &TableAlias) -> String {
    keyed(JOIN_PREFIX, alias)
}

fn keyed(prefix: &str, alias: &TableAlias) -> String {
    let at = alias.name.span.start;
    format!(
        "{prefix}{}@{}:{}",
        ident_name(&alias.name),
        at.line,
        at.column
    )
}

/// The FROM items a FROM list makes visible by name: the members of a join in parentheses
/// without an alias are visible themselves.
pub(super) fn from_factors(from: &[TableWithJoins]) -> Vec<&TableFactor> {
    let mut out = Vec::new();
    for twj in from {
        push_factors(twj, &mut out);
    }
    out
}

fn push_factors<'a>(twj: &'a TableWithJoins, out: &mut Vec<&'a TableFactor>) {
    for tf in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
        match tf {
            TableFactor::NestedJoin {
                table_with_joins,
                alias: None,
            } => push_factors(table_with_joins, out),
            _ => out.push(tf),
        }
    }
}

fn last_part(name: &ObjectName) -> String {
    object_name_parts(name)
        .and_then(|p| p.last().cloned())
        .unwrap_or_default()
}

impl Transform<'_> {
    /// Record that `name` stands for the relation `key`.
    pub(super) fn register(&mut self, name: String, key: String) {
        let keys = self.aliases.entry(name).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// The keys of the relations `name` stands for somewhere in the statement.
    pub(super) fn rel_keys(&self, name: &str) -> &[String] {
        self.aliases.get(name).map_or(&[], Vec::as_slice)
    }

    /// Register one FROM item under the name it is referenced by.
    pub(super) fn register_factor(&mut self, tf: &TableFactor) {
        match tf {
            TableFactor::Table { name, alias, .. } => {
                if let Some(q) = self.qualify(name) {
                    let key = match alias {
                        Some(a) => ident_name(&a.name),
                        None => last_part(name),
                    };
                    self.register(key, q.clone());
                    self.tables.push(q);
                }
            }
            TableFactor::Derived { alias: Some(a), .. } => {
                let key = derived_key(a);
                self.register(ident_name(&a.name), key.clone());
                self.tables.push(key);
            }
            TableFactor::NestedJoin { alias: Some(a), .. } => {
                let key = join_key(a);
                self.register(ident_name(&a.name), key.clone());
                self.tables.push(key);
            }
            TableFactor::Function { name, alias, .. } => {
                let name = alias
                    .as_ref()
                    .map_or_else(|| last_part(name), |a| ident_name(&a.name));
                self.register(name.clone(), format!("{OPAQUE_PREFIX}{name}"));
            }
            TableFactor::UNNEST { alias, .. } => {
                let name = alias
                    .as_ref()
                    .map_or_else(|| "unnest".to_string(), |a| ident_name(&a.name));
                self.register(name.clone(), format!("{OPAQUE_PREFIX}{name}"));
            }
            TableFactor::TableFunction { alias: Some(a), .. }
            | TableFactor::JsonTable { alias: Some(a), .. }
            | TableFactor::OpenJsonTable { alias: Some(a), .. }
            | TableFactor::XmlTable { alias: Some(a), .. } => {
                let name = ident_name(&a.name);
                self.register(name.clone(), format!("{OPAQUE_PREFIX}{name}"));
            }
            // Not PostgreSQL (or without a name to reference it by): references through
            // them stay unresolved, and are refused.
            _ => {}
        }
    }

    /// `TABLE t` as a query body (or a branch of one) reads every column of `t`.
    pub(super) fn register_table_bodies(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(t) => {
                if let Some(q) = self.table_body_key(t) {
                    self.tables.push(q);
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.register_table_bodies(left);
                self.register_table_bodies(right);
            }
            _ => {}
        }
    }

    /// The key of the table `TABLE t` reads.
    pub(super) fn table_body_key(&self, t: &sqlparser::ast::Table) -> Option<String> {
        let name = ObjectName::from(
            t.schema_name
                .iter()
                .chain(t.table_name.iter())
                .cloned()
                .collect::<Vec<Ident>>(),
        );
        t.table_name.as_ref()?;
        self.qualify(&name)
    }

    /// An INSERT's target, under its alias or name, and as `excluded` in ON CONFLICT.
    pub(super) fn register_insert(&mut self, i: &Insert) {
        let TableObject::TableName(name) = &i.table else {
            return;
        };
        let Some(q) = self.qualify(name) else {
            return;
        };
        let key = match &i.table_alias {
            Some(a) => ident_name(&a.alias),
            None => last_part(name),
        };
        self.register(key, q.clone());
        if matches!(i.on, Some(OnInsert::OnConflict(_))) {
            self.register("excluded".into(), q);
        }
    }

    /// The encrypted column a qualified name (`rel.col`, `schema.table.col`) is, if any;
    /// refused when pgward cannot tell which relation it reads.
    pub(super) fn qualified_column(&self, names: &[String]) -> Result<Option<EncCol>, Refused> {
        match names {
            [rel, column] => self.column_of_rel(rel, column),
            [schema, table, column] => {
                let key = format!("{schema}.{table}");
                if self.tables.contains(&key) {
                    let found = self.enc_table(&key).and_then(|cols| cols.get(column));
                    if found.is_none() {
                        self.refuse_row_call(&format!("{schema}.{table}"), &[key], column)?;
                    }
                    return Ok(found.cloned());
                }
                // `rel.col.field`: a field of a composite column.
                match names {
                    [rel, column, _] if !self.rel_keys(rel).is_empty() => {
                        self.column_of_rel(rel, column)
                    }
                    _ => Err(self.unresolved(&names.join("."))),
                }
            }
            _ => Err(self.unresolved(&names.join("."))),
        }
    }

    /// Column `column` of the relations `rel` names.
    fn column_of_rel(&self, rel: &str, column: &str) -> Result<Option<EncCol>, Refused> {
        let keys = self.rel_keys(rel);
        if keys.is_empty() {
            return Err(self.unresolved(&format!("{rel}.{column}")));
        }
        let mut found = None;
        for key in keys {
            if let Some(c) = self.enc_table(key).and_then(|cols| cols.get(column)) {
                merge_found(&mut found, c, column)?;
            }
        }
        if found.is_none() {
            self.refuse_row_call(rel, keys, column)?;
        }
        Ok(found)
    }

    pub(super) fn unresolved(&self, name: &str) -> Refused {
        refuse(format!(
            "pgward: {name} is qualified by a name that is not a relation of this statement as pgward reads it, and the statement reads {}, which has encrypted columns; qualify columns by a table, alias, derived table or CTE of the statement",
            self.first_encrypted_table()
        ))
    }

    /// Refuse a statement that names a blind-index column: pgward writes and searches them
    /// itself (its rewrites come after this check).
    pub(super) fn refuse_blind_index_names(&self, st: &mut Statement) -> Result<(), Refused> {
        struct Names<'b, 'c> {
            t: &'b Transform<'c>,
        }
        impl VisitorMut for Names<'_, '_> {
            type Break = Refused;
            fn pre_visit_ident(&mut self, id: &mut Ident) -> ControlFlow<Refused> {
                let name = ident_name(id);
                match self.t.blind_index_of(&name) {
                    Some(c) => ControlFlow::Break(refuse(format!(
                        "pgward: {name} is pgward's blind index of encrypted column {}.{}; statements may not name it (compare the column itself: {} = …)",
                        c.table, c.column, c.column
                    ))),
                    None => ControlFlow::Continue(()),
                }
            }
        }
        match st.visit(&mut Names { t: self }) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    /// The encrypted column `name` is the blind-index companion of, in any relation of the
    /// statement.
    fn blind_index_of(&self, name: &str) -> Option<&ColumnRef> {
        let stem = name.strip_suffix("_bidx")?;
        self.tables
            .iter()
            .filter_map(|t| self.enc_table(t))
            .find_map(|cols| cols.get(stem))
            .map(|c| &c.col)
    }
}
