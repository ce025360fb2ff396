//! Telling a column from a function call on a whole row.
//!
//! PostgreSQL reads `rel.f` (and `schema.table.f`) as the function call `f(rel)` when `rel`
//! has no column `f`: `c.to_jsonb`, `c.record_send`, `c.pg_column_size`, `c.array_agg` hand
//! over the whole row, encrypted columns and blind index included, as ciphertext or something
//! computed from it. So a qualified name on a relation that carries encrypted columns must be
//! one of its columns: known from the catalog for a table, from the SELECT list for a derived
//! table or CTE, from its members for a join. When they cannot be known (no catalog, a FROM
//! item pgward cannot see into), the names of the built-in functions that take any row are
//! refused instead.
use std::collections::HashSet;

use sqlparser::ast::{SelectItemQualifiedWildcardKind, TableAlias, TableWithJoins};

use super::relations::{derived_key, from_factors, join_key};
use super::*;

/// Built-in functions and aggregates PostgreSQL calls with a whole row for `rel.name`: those
/// whose one (or variadic) argument is `record`, `anyelement`, `"any"` or `anycompatible`.
const ROW_FUNCTIONS: &[&str] = &[
    "any_out",
    "anycompatible_out",
    "anycompatiblenonarray_out",
    "anyelement_out",
    "anynonarray_out",
    "array_agg",
    "concat",
    "count",
    "cume_dist",
    "dense_rank",
    "first_value",
    "hash_record",
    "hash_record_extended",
    "hstore",
    "json_agg",
    "json_agg_strict",
    "json_build_array",
    "json_build_object",
    "jsonb_agg",
    "jsonb_agg_strict",
    "jsonb_build_array",
    "jsonb_build_object",
    "lag",
    "last_value",
    "lead",
    "mode",
    "num_nonnulls",
    "num_nulls",
    "percent_rank",
    "pg_collation_for",
    "pg_column_compression",
    "pg_column_size",
    "pg_column_toast_chunk_id",
    "pg_typeof",
    "quote_literal",
    "quote_nullable",
    "rank",
    "record_out",
    "record_send",
    "row_to_json",
    "to_json",
    "to_jsonb",
];

/// The system columns every table has (the catalog lists only the user's).
const SYSTEM_COLUMNS: &[&str] = &["tableoid", "ctid", "xmin", "xmax", "cmin", "cmax"];

impl Transform<'_> {
    /// Refuse `column` of the relations `keys` (referenced as `rel`) when one of them carries
    /// encrypted columns and has no such column: PostgreSQL would call a function with its row.
    pub(super) fn refuse_row_call(
        &self,
        rel: &str,
        keys: &[String],
        column: &str,
    ) -> Result<(), Refused> {
        for key in keys {
            let Some(c) = self.first_encrypted_column(key) else {
                continue;
            };
            let is_column = match self.relation_columns(key) {
                Some(columns) => columns.contains(column),
                None => !ROW_FUNCTIONS.contains(&column),
            };
            if !is_column {
                return Err(refuse(format!(
                    "pgward: {rel}.{column} is no column pgward knows of a relation with encrypted column {}.{}, and PostgreSQL would read it as {column}({rel}), a function of the whole row, ciphertext included",
                    c.table, c.column
                )));
            }
        }
        Ok(())
    }

    /// Every column name of a relation, when it can be known.
    pub(super) fn relation_columns(&self, key: &str) -> Option<HashSet<String>> {
        if let Some(columns) = self.output_columns.get(key) {
            return Some(columns.clone());
        }
        if self.derived.contains_key(key) {
            return None;
        }
        let (schema, table) = key.split_once('.')?;
        let info = self.catalog?.get(schema, table)?;
        let system = SYSTEM_COLUMNS.iter().map(|c| c.to_string());
        Some(
            info.columns
                .iter()
                .map(|c| c.name.clone())
                .chain(system)
                .collect(),
        )
    }

    /// The column names of a query body's result, when they can be known.
    pub(super) fn output_names(&self, body: &SetExpr) -> Option<HashSet<String>> {
        match body {
            SetExpr::Select(s) => self.select_names(&s.projection, &s.from),
            SetExpr::Query(q) => self.output_names(&q.body),
            SetExpr::SetOperation { left, .. } => self.output_names(left),
            SetExpr::Table(t) => self.relation_columns(&self.table_body_key(t)?),
            SetExpr::Values(v) => {
                let width = v.rows.first().map_or(0, |r| r.content.len());
                Some((1..=width).map(|i| format!("column{i}")).collect())
            }
            _ => None,
        }
    }

    /// The column names of a join's members.
    pub(super) fn join_names(&self, twj: &TableWithJoins) -> Option<HashSet<String>> {
        let mut out = HashSet::new();
        for factor in from_factors(std::slice::from_ref(twj)) {
            out.extend(self.factor_names(factor)?);
        }
        Some(out)
    }

    fn select_names(
        &self,
        items: &[SelectItem],
        from: &[TableWithJoins],
    ) -> Option<HashSet<String>> {
        let mut out = HashSet::new();
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e) => {
                    out.insert(figure_name(e));
                }
                SelectItem::ExprWithAlias { alias, .. } => {
                    out.insert(ident_name(alias));
                }
                SelectItem::Wildcard(_) => {
                    for factor in from_factors(from) {
                        out.extend(self.factor_names(factor)?);
                    }
                }
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    for key in self.qualified_wildcard_keys(n).ok()? {
                        out.extend(self.relation_columns(&key)?);
                    }
                }
                _ => return None,
            }
        }
        Some(out)
    }

    fn factor_names(&self, factor: &TableFactor) -> Option<HashSet<String>> {
        match factor {
            TableFactor::Table { name, alias, .. } => {
                let mut names = self.relation_columns(&self.qualify(name)?)?;
                names.extend(alias_column_names(alias.as_ref()));
                Some(names)
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                let mut names = match alias {
                    Some(a) => self.relation_columns(&derived_key(a)),
                    None => self.output_names(&subquery.body),
                }?;
                names.extend(alias_column_names(alias.as_ref()));
                Some(names)
            }
            TableFactor::NestedJoin { alias: Some(a), .. } => self.relation_columns(&join_key(a)),
            _ => None,
        }
    }
}

/// The column names an alias gives its relation (`AS c(a, b)`).
fn alias_column_names(alias: Option<&TableAlias>) -> impl Iterator<Item = String> + '_ {
    alias
        .into_iter()
        .flat_map(|a| &a.columns)
        .map(|c| ident_name(&c.name))
}

/// The name PostgreSQL gives an unaliased SELECT list item (`FigureColname`), as far as
/// pgward needs it: a column's, a function's, `?column?` for what it does not name.
fn figure_name(expr: &Expr) -> String {
    match expr {
        Expr::Identifier(id) => ident_name(id),
        Expr::CompoundIdentifier(parts) => parts.last().map(ident_name).unwrap_or_default(),
        Expr::Function(f) => object_name_parts(&f.name)
            .and_then(|p| p.last().cloned())
            .unwrap_or_default(),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => figure_name(expr),
        Expr::Case { .. } => "case".into(),
        Expr::Exists { .. } => "exists".into(),
        Expr::Array(_) => "array".into(),
        _ => "?column?".into(),
    }
}
