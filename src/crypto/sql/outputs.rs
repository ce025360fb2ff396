//! Where an encrypted column may reach a result as itself, and the references that would carry
//! it out in another form.
//!
//! The relay decrypts a result column by its origin (table OID and attribute number in
//! RowDescription), which PostgreSQL gives a plain column reference that reaches the result
//! directly or through derived tables, CTEs and parentheses — not through a set operation, an
//! ARRAY or scalar subquery, a row value or a cast. So an encrypted column, whether named,
//! read by `*` / `rel.*` or by `TABLE t`, may be selected only in an *output position*: the
//! statement's own SELECT list (RETURNING: see `search`), a derived table's, a CTE's, or an
//! EXISTS subquery's (whose values nobody sees) — not in a set operation's branch, a subquery
//! used as a value, `INSERT … SELECT`, `SELECT … INTO` or a DISTINCT list.
//!
//! Also refused: a whole-row reference (`c`, `to_jsonb(c)`, `ROW(c.*)`) to a relation with
//! encrypted columns, which carries them as ciphertext, and an ORDER BY or GROUP BY item that
//! names one by position or output name (`ORDER BY 2`, `ORDER BY e` for `email AS e`), which
//! PostgreSQL resolves against the SELECT list.
use sqlparser::ast::{
    FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, GroupByWithModifier, OrderByKind,
    Select, SelectItemQualifiedWildcardKind, Table,
};

use super::derived::output_name;
use super::*;

impl Transform<'_> {
    /// How many encrypted columns `q` hands on as themselves, as it is in an output position
    /// (each wildcard or `TABLE t` reading some counts once).
    pub(super) fn output_items(&self, q: &Query) -> Result<usize, Refused> {
        match &*q.body {
            SetExpr::Select(s) if s.distinct.is_none() && s.into.is_none() => {
                Ok(self.plain_items(Some(&s.projection))? + self.encrypted_wildcards(s)?.len())
            }
            SetExpr::Query(inner) => self.output_items(inner),
            SetExpr::Table(t) => Ok(usize::from(self.encrypted_table_body(t).is_some())),
            _ => Ok(0),
        }
    }

    /// The wildcards of a SELECT list that read encrypted columns: one column of each.
    pub(super) fn encrypted_wildcards(&self, s: &Select) -> Result<Vec<ColumnRef>, Refused> {
        let mut out = Vec::new();
        for item in &s.projection {
            let keys = match item {
                SelectItem::Wildcard(_) => self.factor_keys(&s.from),
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => self.qualified_wildcard_keys(n)?,
                _ => continue,
            };
            if let Some(c) = keys.iter().find_map(|k| self.first_encrypted_column(k)) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// The relations `rel.*` reads; refused when `rel` is none of the statement's.
    pub(super) fn qualified_wildcard_keys(&self, n: &ObjectName) -> Result<Vec<String>, Refused> {
        let parts = object_name_parts(n).unwrap_or_default();
        let keys: Vec<String> = match parts.as_slice() {
            [rel] => self.rel_keys(rel).to_vec(),
            _ => self
                .qualify(n)
                .filter(|q| self.tables.contains(q))
                .into_iter()
                .collect(),
        };
        if keys.is_empty() {
            return Err(self.unresolved(&format!("{}.*", parts.join("."))));
        }
        Ok(keys)
    }

    /// One encrypted column of relation `key` (the first by name), to name in refusals.
    pub(super) fn first_encrypted_column(&self, key: &str) -> Option<ColumnRef> {
        self.enc_table(key)?
            .values()
            .map(|c| &c.col)
            .min_by(|a, b| a.column.cmp(&b.column))
            .cloned()
    }

    /// An encrypted column `TABLE t` reads, if it reads any.
    pub(super) fn encrypted_table_body(&self, t: &Table) -> Option<ColumnRef> {
        self.first_encrypted_column(&self.table_body_key(t)?)
    }

    /// The encrypted columns the `TABLE t` branches of a query body read (one per branch;
    /// branches in parentheses are queries of their own).
    pub(super) fn table_branches(&self, body: &SetExpr, out: &mut Vec<ColumnRef>) {
        match body {
            SetExpr::Table(t) => out.extend(self.encrypted_table_body(t)),
            SetExpr::SetOperation { left, right, .. } => {
                self.table_branches(left, out);
                self.table_branches(right, out);
            }
            _ => {}
        }
    }

    /// Refuse `expr` if it is a whole-row reference to a relation with encrypted columns: a
    /// bare relation name that is no column, `rel.*` used as a value or a function argument.
    pub(super) fn refuse_whole_row(&self, expr: &Expr) -> Result<(), Refused> {
        match expr {
            Expr::Identifier(id) => {
                if self.column_of(expr)?.is_some() {
                    return Ok(());
                }
                let name = ident_name(id);
                match self
                    .rel_keys(&name)
                    .iter()
                    .find_map(|k| self.first_encrypted_column(k))
                {
                    Some(c) => Err(whole_row(&name, &c)),
                    None => Ok(()),
                }
            }
            Expr::QualifiedWildcard(n, _) => self.refuse_wildcard_value(n),
            Expr::Function(f) => {
                let FunctionArguments::List(list) = &f.args else {
                    return Ok(());
                };
                for arg in &list.args {
                    let (FunctionArg::Unnamed(a)
                    | FunctionArg::Named { arg: a, .. }
                    | FunctionArg::ExprNamed { arg: a, .. }) = arg;
                    if let FunctionArgExpr::QualifiedWildcard(n) = a {
                        self.refuse_wildcard_value(n)?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn refuse_wildcard_value(&self, n: &ObjectName) -> Result<(), Refused> {
        let keys = self.qualified_wildcard_keys(n)?;
        match keys.iter().find_map(|k| self.first_encrypted_column(k)) {
            Some(c) => Err(whole_row(&format!("{n}.*"), &c)),
            None => Ok(()),
        }
    }

    /// Refuse a query's ORDER BY items that name an encrypted column of its SELECT list by
    /// position or output name.
    pub(super) fn refuse_sorted_outputs(&self, q: &Query) -> Result<(), Refused> {
        let Some(order_by) = &q.order_by else {
            return Ok(());
        };
        let Some(select) = first_select(&q.body) else {
            return Ok(());
        };
        match &order_by.kind {
            OrderByKind::Expressions(items) => {
                let keys: Vec<&Expr> = items.iter().map(|o| &o.expr).collect();
                self.refuse_output_keys(&keys, select, "ORDER BY")
            }
            OrderByKind::All(_) => self.refuse_all_outputs(select, "ORDER BY ALL"),
        }
    }

    /// Refuse a SELECT's GROUP BY items that name an encrypted column of its SELECT list by
    /// position or output name.
    pub(super) fn refuse_grouped_outputs(&self, s: &Select) -> Result<(), Refused> {
        let (exprs, modifiers) = match &s.group_by {
            GroupByExpr::Expressions(exprs, modifiers) => (exprs, modifiers),
            GroupByExpr::All(_) => return self.refuse_all_outputs(s, "GROUP BY ALL"),
        };
        let mut keys: Vec<&Expr> = Vec::new();
        let sets = modifiers.iter().filter_map(|m| match m {
            GroupByWithModifier::GroupingSets(e) => Some(e),
            _ => None,
        });
        for e in exprs.iter().chain(sets) {
            match e {
                Expr::Rollup(lists) | Expr::Cube(lists) | Expr::GroupingSets(lists) => {
                    keys.extend(lists.iter().flatten());
                }
                _ => keys.push(e),
            }
        }
        self.refuse_output_keys(&keys, s, "GROUP BY")
    }

    fn refuse_output_keys(&self, keys: &[&Expr], s: &Select, clause: &str) -> Result<(), Refused> {
        for key in keys {
            let mut key = *key;
            while let Expr::Nested(inner) = key {
                key = inner;
            }
            let target = match key {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => self.item_at(s, n)?,
                    _ => None,
                },
                // An encrypted column named as itself is refused by the general rule.
                Expr::Identifier(id) if self.column_of(key)?.is_none() => {
                    self.item_named(&s.projection, &ident_name(id))?
                }
                _ => None,
            };
            if let Some(c) = target {
                return Err(refuse(format!(
                    "pgward: column {}.{} is encrypted; {clause} cannot sort or group by it, here named by its position or output name in the SELECT list (that would compute on ciphertext)",
                    c.table, c.column
                )));
            }
        }
        Ok(())
    }

    /// The encrypted column at 1-based position `n` of a SELECT list. Past a wildcard the
    /// position depends on what the wildcard expands to: any encrypted column it reads.
    fn item_at(&self, s: &Select, n: &str) -> Result<Option<ColumnRef>, Refused> {
        let Ok(n) = n.parse::<usize>() else {
            return Ok(None);
        };
        for (i, item) in s.projection.iter().enumerate() {
            match item {
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    return Ok(self.encrypted_wildcards(s)?.into_iter().next());
                }
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. }
                    if i + 1 == n =>
                {
                    return Ok(self.column_of(e)?.map(|c| c.col));
                }
                _ if i + 1 == n => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// The encrypted column a SELECT list outputs under `name`, if any.
    fn item_named(&self, items: &[SelectItem], name: &str) -> Result<Option<ColumnRef>, Refused> {
        for item in items {
            let (expr, output) = match item {
                SelectItem::UnnamedExpr(e) => (e, output_name(e)),
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(ident_name(alias))),
                _ => continue,
            };
            if output.as_deref() == Some(name) {
                if let Some(c) = self.column_of(expr)? {
                    return Ok(Some(c.col));
                }
            }
        }
        Ok(None)
    }

    fn refuse_all_outputs(&self, s: &Select, clause: &str) -> Result<(), Refused> {
        let mut found = self.encrypted_wildcards(s)?.into_iter().next();
        for item in &s.projection {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
                found = found.or(self.column_of(e)?.map(|c| c.col));
            }
        }
        match found {
            Some(c) => Err(refuse(format!(
                "pgward: column {}.{} is encrypted; {clause} would sort or group by it",
                c.table, c.column
            ))),
            None => Ok(()),
        }
    }
}

/// The SELECT whose list names a query's output columns (its first branch's, for a set
/// operation).
fn first_select(body: &SetExpr) -> Option<&Select> {
    match body {
        SetExpr::Select(s) => Some(s),
        SetExpr::Query(q) => first_select(&q.body),
        SetExpr::SetOperation { left, .. } => first_select(left),
        _ => None,
    }
}

fn whole_row(name: &str, c: &ColumnRef) -> Refused {
    refuse(format!(
        "pgward: {name} is a whole-row reference to a relation with encrypted column {}.{}; as a value it would carry ciphertext — select the columns themselves",
        c.table, c.column
    ))
}
