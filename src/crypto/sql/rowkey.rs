//! Row binding (`bind_primary_key`): the primary key of the row a value is written to joins
//! its AAD, and every result column of such a column carries its row's key to the relay.
//!
//! * **Writes** — an `INSERT … VALUES` that supplies the primary key (literal or parameter)
//!   and an `UPDATE … WHERE pk = v [AND …]` seal the value row-bound: a literal under the
//!   key's canonical text here, a parameter at Bind ([`ParamPlan::row_keys`]). Without the
//!   key (a serial default, another predicate, COPY) the value is sealed unbound.
//! * **Reads** — each top-level SELECT list (and RETURNING) that yields a row-bound column
//!   gets, per such output column, `<rel>.<pk>::text AS "pgward_rk:<output name>"` appended
//!   at its end; a derived table or CTE that exposes one carries its key out under
//!   `"pgward_dk:<exposed name>"`, which the outer key then names. The relay pairs each
//!   output column of a row-bound table column with the next unused `pgward_rk:` column of
//!   its name, in order, verifies with it and drops the key columns (`proxy::encryption`).
//!   A result the transform cannot add a key to (a view, an ambiguous name) carries none,
//!   and a row-bound value in it fails closed.
use std::ops::ControlFlow;

use sqlparser::ast::{
    CastKind, DataType, Delete, FromTable, Query, SelectItem, SelectItemQualifiedWildcardKind,
    TableFactor, TableWithJoins, VisitMut, VisitorMut,
};

use super::*;

/// Name prefix of a row key pgward appends to a result (paired and dropped by the relay).
pub const RESULT_KEY_PREFIX: &str = "pgward_rk:";
/// Name prefix of a row key a derived table or CTE carries out (dropped by the relay).
pub const CARRIED_KEY_PREFIX: &str = "pgward_dk:";
/// PostgreSQL's identifier limit (NAMEDATALEN - 1): longer aliases would be truncated.
const MAX_IDENT: usize = 63;

/// The primary key of `table` (`schema.table`) a `bind_primary_key` column binds to, and its
/// type; the reason when the table cannot have one (also reported by `pgward check`).
pub fn primary_key_of(catalog: Option<&Catalog>, table: &str) -> Result<(String, PkType), String> {
    let info = catalog
        .and_then(|c| {
            let (s, t) = table.split_once('.')?;
            c.get(s, t)
        })
        .ok_or_else(|| {
            format!("{table} has a column bound to its primary key (bind_primary_key), and the table is not in the catalog")
        })?;
    let [pk] = info.primary_key.as_slice() else {
        return Err(format!(
            "{table} has a column bound to its primary key (bind_primary_key) but no single-column primary key"
        ));
    };
    let ty = info
        .column(pk)
        .and_then(|c| PkType::of(&c.type_name))
        .ok_or_else(|| {
            format!(
                "the primary key {pk} of {table} has a type bind_primary_key does not support (smallint, integer, bigint, text, varchar, uuid)"
            )
        })?;
    Ok((pk.clone(), ty))
}

/// The types a bound primary key may have: those whose canonical text pgward computes
/// exactly as PostgreSQL's output function prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkType {
    /// smallint, integer, bigint
    Int,
    /// text, varchar
    Text,
    Uuid,
}

impl PkType {
    /// From `format_type` of the column; `None` for any other type.
    pub fn of(type_name: &str) -> Option<Self> {
        match type_name {
            "smallint" | "integer" | "bigint" => Some(PkType::Int),
            "text" => Some(PkType::Text),
            "uuid" => Some(PkType::Uuid),
            t if t.starts_with("character varying") => Some(PkType::Text),
            _ => None,
        }
    }

    /// The canonical text of a key value written as text (a literal, a text-format
    /// parameter): as PostgreSQL prints it, so `05` and `5` agree. `None`: not a value
    /// pgward can read as this type (the statement is refused rather than bound wrongly).
    pub fn canonical_text(self, text: &str) -> Option<String> {
        match self {
            PkType::Text => Some(text.to_string()),
            PkType::Int => {
                let t = text.trim();
                let (neg, digits) = match t.as_bytes().first()? {
                    b'-' => (true, &t[1..]),
                    b'+' => (false, &t[1..]),
                    _ => (false, t),
                };
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let magnitude: i128 = digits.trim_start_matches('0').parse().unwrap_or(0);
                let n = if neg { -magnitude } else { magnitude };
                i64::try_from(n).ok().map(|n| n.to_string())
            }
            PkType::Uuid => {
                let t = text.trim();
                let t = t
                    .strip_prefix('{')
                    .and_then(|t| t.strip_suffix('}'))
                    .unwrap_or(t);
                let hex: String = t.chars().filter(|c| *c != '-').collect();
                if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                let bytes = hex::decode(&hex).ok()?;
                Some(uuid_text(&bytes))
            }
        }
    }

    /// The canonical text of a key value bound in binary format.
    pub fn canonical_binary(self, value: &[u8]) -> Option<String> {
        match self {
            PkType::Text => std::str::from_utf8(value).ok().map(str::to_string),
            PkType::Int => Some(match value.len() {
                2 => i16::from_be_bytes([value[0], value[1]]).to_string(),
                4 => i32::from_be_bytes([value[0], value[1], value[2], value[3]]).to_string(),
                8 => i64::from_be_bytes(value.try_into().ok()?).to_string(),
                _ => return None,
            }),
            PkType::Uuid => (value.len() == 16).then(|| uuid_text(value)),
        }
    }
}

/// `8-4-4-4-12` lower-case hex, PostgreSQL's uuid output.
fn uuid_text(bytes: &[u8]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Where the primary key of the row a bound parameter value is written to comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowKey {
    /// A literal in the statement, already in canonical text.
    Literal(String),
    /// Client parameter `index` (0-based), canonicalised at Bind.
    Param { index: usize, ty: PkType },
}

/// How a read key is named: appended to the result, or carried out of a derived table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyRole {
    Result,
    Carry,
}

impl KeyRole {
    fn alias(self, name: &str) -> Result<Ident, Refused> {
        let prefix = match self {
            KeyRole::Result => RESULT_KEY_PREFIX,
            KeyRole::Carry => CARRIED_KEY_PREFIX,
        };
        let alias = format!("{prefix}{name}");
        if alias.len() > MAX_IDENT {
            return Err(refuse(format!(
                "pgward: the output name {name:?} of a column bound to its row is too long for pgward's row key (at most {} bytes)",
                MAX_IDENT - prefix.len()
            )));
        }
        Ok(Ident::with_quote('"', alias))
    }
}

/// A relation of one FROM list: the name it is referenced by, and the transform's key.
struct Rel {
    qualifier: String,
    key: String,
}

impl Transform<'_> {
    /// The primary key column of `table` (`schema.table`) and its type, for a table with a
    /// `bind_primary_key` column. Refused when it is not one column of a supported type.
    pub(super) fn primary_key(&self, table: &str) -> Result<(String, PkType), Refused> {
        primary_key_of(self.catalog, table).map_err(|e| refuse(format!("pgward: {e}")))
    }

    /// The row key a written expression for the primary key gives: a literal's canonical
    /// text, a parameter, or `None` (DEFAULT, NULL, an expression: the value stays unbound).
    pub(super) fn row_key_of(
        &self,
        table: &str,
        expr: &Expr,
        ty: PkType,
    ) -> Result<Option<RowKey>, Refused> {
        if let Some(index) = param_index(expr) {
            return Ok(Some(RowKey::Param { index, ty }));
        }
        let Some(text) = literal_text(expr) else {
            return Ok(None);
        };
        ty.canonical_text(&text)
            .map(|t| Some(RowKey::Literal(t)))
            .ok_or_else(|| Refused {
                sqlstate: "22P02",
                message: format!(
                    "pgward: the primary key value of a row of {table} is not one pgward can bind encrypted values to"
                ),
            })
    }

    /// The row key of an `UPDATE`'s rows: `WHERE pk = v`, alone or as a top-level conjunct
    /// (qualified by the target's name when other relations are joined).
    pub(super) fn update_row_key(
        &self,
        u: &Update,
        table: &str,
    ) -> Result<Option<RowKey>, Refused> {
        let TableFactor::Table { name, alias, .. } = &u.table.relation else {
            return Ok(None);
        };
        let Some(selection) = &u.selection else {
            return Ok(None);
        };
        let (pk, ty) = self.primary_key(table)?;
        let qualifier = match alias {
            Some(a) => ident_name(&a.name),
            None => object_name_parts(name)
                .and_then(|p| p.last().cloned())
                .unwrap_or_default(),
        };
        let joined = u.from.is_some() || !u.table.joins.is_empty();
        let names_pk = |e: &Expr| match e {
            Expr::Identifier(id) => !joined && ident_name(id) == pk,
            Expr::CompoundIdentifier(p) if p.len() == 2 => {
                ident_name(&p[0]) == qualifier && ident_name(&p[1]) == pk
            }
            _ => false,
        };
        let mut conjuncts = vec![selection];
        let mut found = None;
        while let Some(e) = conjuncts.pop() {
            match e {
                Expr::Nested(inner) => conjuncts.push(inner),
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::And,
                    right,
                } => {
                    conjuncts.push(left);
                    conjuncts.push(right);
                }
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    let value = if names_pk(left) {
                        right
                    } else if names_pk(right) {
                        left
                    } else {
                        continue;
                    };
                    if let Some(key) = self.row_key_of(table, value, ty)? {
                        found = Some(key);
                    }
                }
                _ => {}
            }
        }
        Ok(found)
    }

    /// Add the read keys of row-bound columns: to the statement's top-level result (SELECT
    /// list, RETURNING) and to every derived table and CTE that carries one out.
    pub(super) fn add_row_keys(&mut self, st: &mut Statement) -> Result<(), Refused> {
        if !self.any_bound() {
            return Ok(());
        }
        struct Carry<'b, 'c> {
            t: &'b mut Transform<'c>,
        }
        impl VisitorMut for Carry<'_, '_> {
            type Break = Refused;
            fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<Refused> {
                if let TableFactor::Derived { subquery, .. } = tf {
                    if let Err(e) = self.t.query_keys(subquery, KeyRole::Carry) {
                        return ControlFlow::Break(e);
                    }
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                if let Some(with) = &mut q.with {
                    for cte in &mut with.cte_tables {
                        if let Err(e) = self.t.query_keys(&mut cte.query, KeyRole::Carry) {
                            return ControlFlow::Break(e);
                        }
                    }
                }
                ControlFlow::Continue(())
            }
        }
        let added = match st {
            Statement::Query(q) => self.query_keys(q, KeyRole::Result)?,
            Statement::Insert(i) => match (&i.table, &mut i.returning) {
                (TableObject::TableName(name), Some(items)) => {
                    let qualifier = match &i.table_alias {
                        Some(a) => ident_name(&a.alias),
                        None => last_part(name),
                    };
                    self.returning_keys(name, qualifier, items)?
                }
                _ => 0,
            },
            Statement::Update(u) => match (&u.table.relation, &mut u.returning) {
                (TableFactor::Table { name, alias, .. }, Some(items))
                    if u.table.joins.is_empty() && u.from.is_none() =>
                {
                    let qualifier = alias
                        .as_ref()
                        .map_or_else(|| last_part(name), |a| ident_name(&a.name));
                    let name = name.clone();
                    self.returning_keys(&name, qualifier, items)?
                }
                _ => 0,
            },
            Statement::Delete(Delete {
                from: FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from),
                returning: Some(items),
                using: None,
                ..
            }) if from.len() == 1 && from[0].joins.is_empty() => match &from[0].relation {
                TableFactor::Table { name, alias, .. } => {
                    let qualifier = alias
                        .as_ref()
                        .map_or_else(|| last_part(name), |a| ident_name(&a.name));
                    let name = name.clone();
                    self.returning_keys(&name, qualifier, items)?
                }
                _ => 0,
            },
            _ => 0,
        };
        self.params.result_keys += added;
        match st.visit(&mut Carry { t: self }) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    fn any_bound(&self) -> bool {
        self.tables.iter().any(|t| {
            self.enc_table(t)
                .is_some_and(|cols| cols.values().any(|c| c.bind_row))
        })
    }

    /// Keys for a RETURNING list of a write into `name` (referenced as `qualifier`).
    fn returning_keys(
        &mut self,
        name: &ObjectName,
        qualifier: String,
        items: &mut Vec<SelectItem>,
    ) -> Result<usize, Refused> {
        let Some(key) = self.qualify(name) else {
            return Ok(0);
        };
        let rels = [Rel { qualifier, key }];
        self.projection_keys(items, &rels, KeyRole::Result)
    }

    /// Keys for the SELECT list of `q` (its first SELECT: set operations over encrypted
    /// columns are refused elsewhere). Returns how many were appended.
    fn query_keys(&mut self, q: &mut Query, role: KeyRole) -> Result<usize, Refused> {
        let select = match &mut *q.body {
            SetExpr::Select(s) => s,
            SetExpr::Query(inner) => return self.query_keys(inner, role),
            _ => return Ok(0),
        };
        let rels = self.relations(&select.from);
        self.projection_keys(&mut select.projection, &rels, role)
    }

    /// The relations of a FROM list a row key can be taken from: tables, derived tables and
    /// CTEs (not a join in parentheses with an alias: a bound value read through one carries
    /// no key, and fails closed).
    fn relations(&self, from: &[TableWithJoins]) -> Vec<Rel> {
        let mut rels = Vec::new();
        for factor in super::relations::from_factors(from) {
            match factor {
                TableFactor::Table { name, alias, .. } => {
                    let qualifier = alias
                        .as_ref()
                        .map_or_else(|| last_part(name), |a| ident_name(&a.name));
                    if let Some(key) = self.qualify(name) {
                        rels.push(Rel { qualifier, key });
                    }
                }
                TableFactor::Derived { alias: Some(a), .. } => rels.push(Rel {
                    qualifier: ident_name(&a.name),
                    key: super::relations::derived_key(a),
                }),
                _ => {}
            }
        }
        rels
    }

    fn projection_keys(
        &mut self,
        items: &mut Vec<SelectItem>,
        rels: &[Rel],
        role: KeyRole,
    ) -> Result<usize, Refused> {
        let mut keys: Vec<SelectItem> = Vec::new();
        for item in items.iter() {
            match item {
                SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => {
                    let output = match item {
                        SelectItem::ExprWithAlias { alias, .. } => Some(ident_name(alias)),
                        _ => match expr {
                            Expr::Identifier(id) => Some(ident_name(id)),
                            Expr::CompoundIdentifier(p) => p.last().map(ident_name),
                            _ => None,
                        },
                    };
                    let (Some(output), Some((rel, column))) =
                        (output, self.bound_source(expr, rels))
                    else {
                        continue;
                    };
                    keys.push(self.key_item(rel, &column, &output, role)?);
                }
                SelectItem::Wildcard(_) => {
                    for rel in rels {
                        self.wildcard_keys(rel, role, &mut keys)?;
                    }
                }
                SelectItem::QualifiedWildcard(
                    SelectItemQualifiedWildcardKind::ObjectName(n),
                    _,
                ) => {
                    let q = last_part(n);
                    if let Some(rel) = rels.iter().find(|r| r.qualifier == q) {
                        self.wildcard_keys(rel, role, &mut keys)?;
                    }
                }
                _ => {}
            }
        }
        let n = keys.len();
        items.extend(keys);
        Ok(n)
    }

    /// Keys for the row-bound columns `rel.*` yields. A derived relation's `*` already
    /// carries its keys out when the key itself is carried.
    fn wildcard_keys(
        &self,
        rel: &Rel,
        role: KeyRole,
        keys: &mut Vec<SelectItem>,
    ) -> Result<(), Refused> {
        let derived = self.derived.contains_key(&rel.key);
        if derived && role == KeyRole::Carry {
            return Ok(());
        }
        let Some(cols) = self.enc_table(&rel.key) else {
            return Ok(());
        };
        let mut bound: Vec<&String> = cols
            .iter()
            .filter(|(_, c)| c.bind_row)
            .map(|(name, _)| name)
            .collect();
        bound.sort();
        for name in bound {
            keys.push(self.key_item(rel, name, name, role)?);
        }
        Ok(())
    }

    /// The relation and column name a select item reads a row-bound column from.
    fn bound_source<'r>(&self, expr: &Expr, rels: &'r [Rel]) -> Option<(&'r Rel, String)> {
        let bound = |rel: &Rel, column: &str| {
            self.enc_table(&rel.key)
                .and_then(|cols| cols.get(column))
                .is_some_and(|c| c.bind_row)
        };
        match expr {
            Expr::Identifier(id) => {
                let column = ident_name(id);
                let mut found = rels.iter().filter(|r| {
                    self.enc_table(&r.key)
                        .is_some_and(|cols| cols.contains_key(&column))
                });
                let rel = found.next()?;
                // Ambiguous: no key, and a row-bound value read this way fails closed.
                if found.next().is_some() || !bound(rel, &column) {
                    return None;
                }
                Some((rel, column))
            }
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                let column = ident_name(&parts[parts.len() - 1]);
                let qualifier = ident_name(&parts[parts.len() - 2]);
                let rel = rels.iter().find(|r| r.qualifier == qualifier)?;
                bound(rel, &column).then_some((rel, column))
            }
            _ => None,
        }
    }

    /// `<rel>.<pk>::text AS "<prefix><output>"` for a base table, `<rel>."pgward_dk:<column>"`
    /// for a derived table or CTE.
    fn key_item(
        &self,
        rel: &Rel,
        column: &str,
        output: &str,
        role: KeyRole,
    ) -> Result<SelectItem, Refused> {
        let qualifier = Ident::with_quote('"', rel.qualifier.clone());
        let expr = if self.derived.contains_key(&rel.key) {
            Expr::CompoundIdentifier(vec![qualifier, KeyRole::Carry.alias(column)?])
        } else {
            let (pk, _) = self.primary_key(&rel.key)?;
            Expr::Cast {
                kind: CastKind::DoubleColon,
                expr: Box::new(Expr::CompoundIdentifier(vec![
                    qualifier,
                    Ident::with_quote('"', pk),
                ])),
                data_type: DataType::Text,
                format: None,
            }
        };
        Ok(SelectItem::ExprWithAlias {
            expr,
            alias: role.alias(output)?,
        })
    }
}

fn last_part(name: &ObjectName) -> String {
    object_name_parts(name)
        .and_then(|p| p.last().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_keys_match_postgres_output() {
        assert_eq!(PkType::Int.canonical_text("05").as_deref(), Some("5"));
        assert_eq!(PkType::Int.canonical_text(" -007 ").as_deref(), Some("-7"));
        assert_eq!(PkType::Int.canonical_text("+0").as_deref(), Some("0"));
        assert_eq!(PkType::Int.canonical_text("1e3"), None);
        assert_eq!(PkType::Int.canonical_text("99999999999999999999"), None);
        assert_eq!(
            PkType::Uuid
                .canonical_text("{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}")
                .as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(PkType::Text.canonical_text(" x ").as_deref(), Some(" x "));
        assert_eq!(
            PkType::Int.canonical_binary(&5i32.to_be_bytes()).as_deref(),
            Some("5")
        );
        assert_eq!(
            PkType::Int
                .canonical_binary(&(-2i16).to_be_bytes())
                .as_deref(),
            Some("-2")
        );
        assert_eq!(PkType::Int.canonical_binary(&[1, 2, 3]), None);
        assert_eq!(
            PkType::Uuid.canonical_binary(&[0xab; 16]).as_deref(),
            Some("abababab-abab-abab-abab-abababababab")
        );
        assert_eq!(PkType::of("character varying(20)"), Some(PkType::Text));
        assert_eq!(PkType::of("numeric"), None);
    }
}
