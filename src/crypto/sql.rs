//! Field encryption in SQL: the statement transform that runs inside the policy engine's
//! per-statement pipeline (one parse serves both), before the row-policy rewrite, for
//! policy-bound and unrestricted services alike.
//!
//! What it does to a statement that touches an encrypted table:
//! * **Writes** — `INSERT … VALUES`, `UPDATE … SET`, `ON CONFLICT DO UPDATE SET`: a literal
//!   going into an encrypted column becomes `E'\\x<ciphertext>'::BYTEA`, a parameter becomes
//!   `CAST($n AS BYTEA)` (the relay encrypts its value at Bind, see [`ParamPlan`]); searchable
//!   columns get their `<col>_bidx` companion written alongside (literal, or a parameter pgward
//!   adds after the client's). `EXCLUDED.col` copies are allowed. Anything else written into
//!   an encrypted column (expressions, `INSERT … SELECT`, `COPY FROM`) is refused (0A000),
//!   because it would store plaintext or computed ciphertext.
//! * **Predicates** — `col = v`, `col <> v`, `col [NOT] IN (v, …)` on a searchable column
//!   become the same comparison of `col_bidx` with the blind index of `v` (a literal, or a
//!   parameter whose value the relay turns into its blind index); `a.col = b.col` on the same
//!   searchable column compares blind indexes. `col IS [NOT] NULL` stays as is.
//! * **Reads** — a column selected as is (`SELECT col`, `SELECT col AS x`, `*`, `RETURNING
//!   col`) in a result the relay sees it in (the statement's own, through derived tables,
//!   CTEs and parentheses: see `outputs`) is left alone: the relay decrypts it by its
//!   RowDescription origin. A cursor's query (`DECLARE … CURSOR FOR`) is transformed as the
//!   same SELECT: its FETCH answers carry the same origins.
//! * Everything else that mentions an encrypted column would compute on ciphertext or hand it
//!   over undecrypted (ORDER BY and GROUP BY, also by position or output name, DISTINCT,
//!   ranges, LIKE, functions, casts, joins of different columns, set operations, subqueries
//!   used as values, whole-row references such as `to_jsonb(c)` or `c.to_jsonb`) and is
//!   refused with 0A000 naming the column. So is any mention of a blind-index column outside
//!   DDL: pgward alone writes and searches them.
//!
//! Name resolution is deliberately conservative: an unqualified column name that is an
//! encrypted column of any table the statement mentions is treated as that column (fail
//! closed); when two different encrypted columns share the name, the reference must be
//! qualified. A qualifier stands for every relation of its name in the statement, whatever
//! the scope, and one that names none is refused (see `relations`).
//!
//! Literal encryption needs keys synchronously: it uses the DEKs the key manager keeps cached
//! ([`KeyManager::encrypt_now`]) and fails closed when none is. A statement with encrypted
//! literals is never cached by the policy engine (its ciphertext must not repeat: equal
//! ciphertexts would reveal equal values).
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use sqlparser::ast::{
    AssignmentTarget, BinaryOperator, ConflictTarget, Expr, Ident, Insert, ObjectName,
    ObjectNamePart, OnConflictAction, OnInsert, Query, SelectItem, SetExpr, Statement, TableFactor,
    TableObject, UnaryOperator, Update, Value, ValueWithSpan, VisitMut, VisitorMut,
};

mod accessed;
mod derived;
mod names;
mod outputs;
mod params;
mod relations;
mod rowkey;
mod search;
mod write;

use params::Params;
pub use params::{CopyPlan, ParamPlan, ParamUse};
pub use rowkey::{primary_key_of, PkType, RowKey, CARRIED_KEY_PREFIX, RESULT_KEY_PREFIX};

use super::codec::{encode_for_encryption, ClientType, WireFormat};
use super::error::CryptoError;
use super::manager::KeyManager;
use super::scope::KeyScope;
use crate::error::RefusalKind;
use crate::sql::catalog::Catalog;
use crate::sql::parse::{ident_name, object_name_parts, parse_expr};
use crate::sql::stage::{StagePlan, StatementTransform, TransformOutcome, TransformRefusal};

/// An encrypted column as a statement uses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnRef {
    /// `schema.table` (the AAD binding).
    pub table: String,
    pub column: String,
    pub ty: ClientType,
}

/// A statement pgward will not run because it would compute on (or store) the wrong thing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub sqlstate: &'static str,
    pub message: String,
}

fn refuse(message: impl Into<String>) -> Refused {
    Refused {
        sqlstate: "0A000",
        message: message.into(),
    }
}

/// What the transform did to a (possibly multi-statement) text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Some statement mentions an encrypted table (and was transformed or checked).
    pub touched: bool,
    /// Ciphertext was embedded: the rewrite must not be cached.
    pub encrypted_literals: bool,
    /// `None` when no parameter needs the relay.
    pub params: Option<Arc<ParamPlan>>,
    /// Per statement of the text, the encrypted columns it reads, searches or writes
    /// (`table.column`, for the audit record; see `accessed.rs`).
    pub accessed: Vec<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct EncCol {
    col: ColumnRef,
    searchable: bool,
    /// `bind_primary_key`: values are sealed bound to their row's primary key.
    bind_row: bool,
}

/// The encrypted columns, as the SQL transform needs them, and the keys for literals.
pub struct SqlEncryption {
    manager: Arc<KeyManager>,
    /// `schema.table` → column → spec.
    tables: HashMap<String, HashMap<String, EncCol>>,
}

impl std::fmt::Debug for SqlEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlEncryption")
            .field("tables", &self.tables.keys())
            .finish()
    }
}

/// Name of the blind-index companion of a searchable column.
pub fn bidx_column(column: &str) -> String {
    format!("{column}_bidx")
}

impl SqlEncryption {
    pub fn new(manager: Arc<KeyManager>) -> Self {
        let mut tables: HashMap<String, HashMap<String, EncCol>> = HashMap::new();
        for spec in manager.columns() {
            tables.entry(spec.table.clone()).or_default().insert(
                spec.column.column.clone(),
                EncCol {
                    col: ColumnRef {
                        table: spec.table.clone(),
                        column: spec.column.column.clone(),
                        ty: spec.column.ty,
                    },
                    searchable: spec.column.searchable,
                    bind_row: spec.column.bind_primary_key,
                },
            );
        }
        SqlEncryption { manager, tables }
    }

    /// The encrypted tables' names (`schema.table`), for a cheap "could this text touch one"
    /// test on text that does not parse.
    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Transform the statements of one Query or Parse in place. `catalog` resolves unqualified
    /// table names and column lists; without it, unqualified names mean `public`.
    /// `scope`: the session's claims, selecting per-tenant keys for literals.
    pub fn transform(
        &self,
        statements: &mut [Statement],
        catalog: Option<&Catalog>,
        scope: &KeyScope,
    ) -> Result<Outcome, Refused> {
        let mut outcome = Outcome::default();
        let mut params = Params::default();
        for st in statements.iter_mut() {
            let accessed = match cursor_query(st) {
                Some(query) => {
                    self.transform_cursor(query, catalog, scope, &mut params, &mut outcome)?
                }
                None => self.transform_one(st, catalog, scope, &mut params, &mut outcome)?,
            };
            outcome.accessed.push(accessed);
        }
        outcome.params = params.plan()?;
        Ok(outcome)
    }

    /// A cursor's rows are its query's: FETCH answers carry the same column origins, which
    /// the relay decrypts by, so the query gets the transform a SELECT gets (searches, row
    /// keys, refusals) and the cursor keeps it.
    fn transform_cursor(
        &self,
        query: &mut Option<Box<Query>>,
        catalog: Option<&Catalog>,
        scope: &KeyScope,
        params: &mut Params,
        outcome: &mut Outcome,
    ) -> Result<Vec<String>, Refused> {
        let Some(taken) = query.take() else {
            return Ok(Vec::new());
        };
        let mut inner = Statement::Query(taken);
        let accessed = self.transform_one(&mut inner, catalog, scope, params, outcome);
        if let Statement::Query(transformed) = inner {
            *query = Some(transformed);
        }
        accessed
    }

    /// One statement's transform, in place; returns the encrypted columns it accesses.
    fn transform_one(
        &self,
        st: &mut Statement,
        catalog: Option<&Catalog>,
        scope: &KeyScope,
        params: &mut Params,
        outcome: &mut Outcome,
    ) -> Result<Vec<String>, Refused> {
        refuse_writes_through_views(st, catalog)?;
        let mut t = Transform {
            enc: self,
            catalog,
            aliases: HashMap::new(),
            tables: Vec::new(),
            derived: HashMap::new(),
            output_columns: HashMap::new(),
            params,
            literals: false,
            scope,
        };
        if !t.collect_tables(st) {
            return Ok(Vec::new());
        }
        outcome.touched = true;
        t.collect_derived(st)?;
        let accessed = t.accessed_columns(st);
        // Schema changes may name blind indexes (`CREATE UNIQUE INDEX … (email_bidx)`).
        if crate::sql::StatementKind::of(st) != crate::sql::StatementKind::Ddl {
            t.refuse_blind_index_names(st)?;
        }
        t.statement(st)?;
        t.add_row_keys(st)?;
        outcome.encrypted_literals |= t.literals;
        Ok(accessed)
    }
}

/// The query of `DECLARE name CURSOR FOR query` (PostgreSQL declares one cursor per
/// statement; anything else sqlparser reads as a DECLARE is left to the general rules).
fn cursor_query(st: &mut Statement) -> Option<&mut Option<Box<Query>>> {
    let Statement::Declare { stmts, .. } = st else {
        return None;
    };
    let [declare] = stmts.as_mut_slice() else {
        return None;
    };
    let is_cursor = declare.declare_type == Some(sqlparser::ast::DeclareType::Cursor);
    (is_cursor && declare.for_query.is_some()).then_some(&mut declare.for_query)
}

/// Writes into a view (or a foreign or other non-plain relation) are refused while field
/// encryption is on: pgward cannot see which base-table columns a view, its rules or its
/// INSTEAD OF triggers write, so plaintext could reach an encrypted column. (Without a catalog
/// a view is indistinguishable from a table; `[policy]` provides one.)
fn refuse_writes_through_views(st: &Statement, catalog: Option<&Catalog>) -> Result<(), Refused> {
    let Some(catalog) = catalog else {
        return Ok(());
    };
    let target = match st {
        Statement::Insert(Insert {
            table: TableObject::TableName(name),
            ..
        }) => Some(name),
        Statement::Update(Update { table, .. }) => match &table.relation {
            TableFactor::Table { name, .. } => Some(name),
            _ => None,
        },
        Statement::Copy {
            source: sqlparser::ast::CopySource::Table { table_name, .. },
            to: false,
            ..
        } => Some(table_name),
        _ => None,
    };
    let Some(info) = target
        .and_then(object_name_parts)
        .and_then(|parts| catalog.resolve(&parts))
    else {
        return Ok(());
    };
    if info.kind == crate::sql::RelKind::Table {
        return Ok(());
    }
    Err(refuse(format!(
        "pgward: writes into {} are refused while field encryption is on: it is not a plain table, and pgward cannot see which encrypted columns it writes",
        info.qualified()
    )))
}

/// One statement's transform.
struct Transform<'a> {
    enc: &'a SqlEncryption,
    catalog: Option<&'a Catalog>,
    /// Relation name or alias (as PostgreSQL folds it) → the keys of the relations it names
    /// somewhere in the statement (`schema.table`, or a derived table's, join's or CTE's key;
    /// see `relations`). One name can stand for different relations in different scopes: a
    /// reference through it is held to the rules of every one of them.
    aliases: HashMap<String, Vec<String>>,
    /// Every table the statement mentions (`schema.table`), and the keys of its derived
    /// tables and CTEs that carry encrypted columns.
    tables: Vec<String>,
    /// Encrypted columns exposed by derived tables and CTEs, by key (see `derived`).
    derived: HashMap<String, HashMap<String, EncCol>>,
    /// Every column name of a derived table, CTE or aliased join, by key, where it can be
    /// known (see `names`).
    output_columns: HashMap<String, std::collections::HashSet<String>>,
    params: &'a mut Params,
    literals: bool,
    scope: &'a KeyScope,
}

/// A value a client wrote for an encrypted column.
enum Written {
    Null,
    Default,
    Literal(String),
    Param(usize),
}

impl Transform<'_> {
    fn qualify(&self, name: &ObjectName) -> Option<String> {
        let parts = object_name_parts(name)?;
        if let Some(catalog) = self.catalog {
            if let Some(info) = catalog.resolve(&parts) {
                return Some(info.qualified());
            }
        }
        match parts.as_slice() {
            [table] => Some(format!("public.{table}")),
            [schema, table] => Some(format!("{schema}.{table}")),
            // `database.schema.table`: PostgreSQL accepts only the current database there
            // (any other is an error), so the table is `schema.table` — read otherwise, a
            // value written through a three-part name went upstream in clear.
            [_database, schema, table] => Some(format!("{schema}.{table}")),
            _ => None,
        }
    }

    /// The encrypted columns of a table, or those a derived table or CTE carries (a CTE
    /// shadows a table of its name).
    fn enc_table(&self, qualified: &str) -> Option<&HashMap<String, EncCol>> {
        self.derived
            .get(qualified)
            .or_else(|| self.enc.tables.get(qualified))
    }

    /// Record tables, aliases and parameters; true if an encrypted table is mentioned.
    fn collect_tables(&mut self, st: &mut Statement) -> bool {
        struct Collect<'b, 'c> {
            t: &'b mut Transform<'c>,
        }
        impl VisitorMut for Collect<'_, '_> {
            type Break = ();
            fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
                self.t.register_factor(tf);
                ControlFlow::Continue(())
            }
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
                self.t.register_table_bodies(&q.body);
                ControlFlow::Continue(())
            }
            fn pre_visit_relation(&mut self, name: &mut ObjectName) -> ControlFlow<()> {
                if let Some(q) = self.t.qualify(name) {
                    self.t.tables.push(q);
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_value(&mut self, v: &mut ValueWithSpan) -> ControlFlow<()> {
                if let Some(i) = placeholder(&v.value) {
                    *self.t.params.seen.entry(i).or_default() += 1;
                    self.t.params.max_client = self.t.params.max_client.max(i + 1);
                }
                ControlFlow::Continue(())
            }
        }
        if let Statement::Insert(i) = &*st {
            self.register_insert(i);
        }
        // COPY's table is not visited as a relation by sqlparser.
        if let Statement::Copy {
            source: sqlparser::ast::CopySource::Table { table_name, .. },
            ..
        } = &*st
        {
            if let Some(q) = self.qualify(table_name) {
                self.tables.push(q);
            }
        }
        let _ = st.visit(&mut Collect { t: self });
        self.tables.iter().any(|t| self.enc.tables.contains_key(t))
    }

    fn first_encrypted_table(&self) -> String {
        self.tables
            .iter()
            .find(|t| self.enc.tables.contains_key(*t))
            .cloned()
            .unwrap_or_default()
    }

    fn statement(&mut self, st: &mut Statement) -> Result<(), Refused> {
        self.nested_writes(st)?;
        match st {
            Statement::Query(_) => {}
            Statement::Insert(i) => self.insert(i)?,
            Statement::Update(u) => self.update(u)?,
            Statement::Delete(_) => {}
            Statement::Explain { statement, .. } => return self.statement(statement),
            Statement::Copy {
                source: sqlparser::ast::CopySource::Table { table_name, columns },
                to: false,
                target: sqlparser::ast::CopyTarget::Stdin,
                options,
                legacy_options,
                payload: None,
            } => return self.copy_from(table_name, columns, options, legacy_options),
            Statement::Copy { .. } => {
                return Err(refuse(format!(
                    "pgward: only COPY … FROM STDIN (text or CSV) works on {}, which has encrypted columns; COPY TO would return ciphertext (use SELECT)",
                    self.first_encrypted_table()
                )))
            }
            Statement::CreateTable(ct) if ct.query.is_some() => {
                return Err(refuse(format!(
                    "pgward: CREATE TABLE … AS on {}, which has encrypted columns, is not supported through pgward: it would store ciphertext, or values computed from it, where pgward does not decrypt them",
                    self.first_encrypted_table()
                )))
            }
            other if crate::sql::StatementKind::of(other) == crate::sql::StatementKind::Ddl => return Ok(()),
            other => {
                return Err(refuse(format!(
                    "pgward: {} statements on {}, which has encrypted columns, are not supported through pgward",
                    crate::sql::StatementKind::of(other).as_str(),
                    self.first_encrypted_table()
                )))
            }
        }
        self.predicates(st)
    }

    /// Data-modifying CTEs (`WITH x AS (INSERT … RETURNING …)`) and other DML nested in a
    /// query get the same write transform as top-level statements.
    fn nested_writes(&mut self, st: &mut Statement) -> Result<(), Refused> {
        struct Nested<'b, 'c> {
            t: &'b mut Transform<'c>,
        }
        impl VisitorMut for Nested<'_, '_> {
            type Break = Refused;
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                let result = match &mut *q.body {
                    SetExpr::Insert(Statement::Insert(i)) => self.t.insert(i),
                    SetExpr::Update(Statement::Update(u)) => self.t.update(u),
                    SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Merge(_) => Err(refuse(
                        "pgward: this data-modifying statement form is not supported next to encrypted columns",
                    )),
                    _ => Ok(()),
                };
                match result {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => ControlFlow::Break(e),
                }
            }
        }
        match st.visit(&mut Nested { t: self }) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }

    /// The encrypted column an expression names directly, if any.
    fn column_of(&self, expr: &Expr) -> Result<Option<EncCol>, Refused> {
        match expr {
            Expr::Identifier(id) => {
                let name = ident_name(id);
                let mut found: Option<EncCol> = None;
                for t in &self.tables {
                    if let Some(c) = self.enc_table(t).and_then(|cols| cols.get(&name)) {
                        merge_found(&mut found, c, &name)?;
                    }
                }
                Ok(found)
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(ident_name).collect();
                self.qualified_column(&names)
            }
            _ => Ok(None),
        }
    }

    fn written(&self, expr: &Expr, c: &EncCol) -> Result<Written, Refused> {
        if let Expr::Identifier(id) = expr {
            if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("default") {
                return Ok(Written::Default);
            }
        }
        if let Expr::Value(v) = expr {
            if matches!(v.value, Value::Null) {
                return Ok(Written::Null);
            }
        }
        // `$n`, also as `$n::type` or `CAST($n AS type)` (drivers add such casts).
        if let Some(i) = param_index(expr) {
            return Ok(Written::Param(i));
        }
        match literal_text(expr) {
            Some(text) => Ok(Written::Literal(text)),
            None => Err(refuse(format!(
                "pgward: only a literal, a parameter, NULL or DEFAULT can be written to encrypted column {}.{}",
                c.col.table, c.col.column
            ))),
        }
    }

    fn canonical(&self, c: &EncCol, text: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Refused> {
        encode_for_encryption(c.col.ty, WireFormat::Text, text.as_bytes())
            .map(zeroize::Zeroizing::new)
            .map_err(|e| Refused {
                sqlstate: "22P02",
                message: format!(
                    "pgward: invalid value for encrypted column {}.{}: {e}",
                    c.col.table, c.col.column
                ),
            })
    }

    fn key_error(&self, c: &EncCol, e: CryptoError) -> Refused {
        tracing::warn!(table = %c.col.table, column = %c.col.column, error = %e, "literal encryption failed");
        Refused {
            sqlstate: "58000",
            message: format!(
                "pgward: cannot encrypt a value for {}.{}: {e}",
                c.col.table, c.col.column
            ),
        }
    }

    /// The SQL for a value stored in `c` (ciphertext literal, cast parameter, NULL, DEFAULT),
    /// sealed bound to `row` when the column binds rows and the row's key is known.
    fn sealed(&mut self, c: &EncCol, w: &Written, row: Option<&RowKey>) -> Result<Expr, Refused> {
        let row = row.filter(|_| c.bind_row);
        match w {
            Written::Null => Ok(null()),
            Written::Default => Ok(default()),
            Written::Param(i) => {
                self.params.claim(*i, ParamUse::Encrypt(c.col.clone()))?;
                if let Some(key) = row {
                    self.params.bind_row(*i, key.clone())?;
                }
                Ok(bytea_param(*i + 1))
            }
            Written::Literal(text) => {
                let key = match row {
                    None => None,
                    Some(RowKey::Literal(key)) => Some(key.as_str()),
                    Some(RowKey::Param { .. }) => {
                        return Err(refuse(format!(
                            "pgward: {}.{} is bound to its row's primary key, which this statement binds as a parameter: bind the value as a parameter too",
                            c.col.table, c.col.column
                        )))
                    }
                };
                let canonical = self.canonical(c, text)?;
                let sealed = self
                    .enc
                    .manager
                    .encrypt_now_row(&c.col.table, &c.col.column, self.scope, key, &canonical)
                    .map_err(|e| self.key_error(c, e))?;
                self.literals = true;
                Ok(bytea_literal(&sealed))
            }
        }
    }

    /// The SQL for the blind index of a value written to `c`. `added`: a parameter must be a
    /// new one (the client's own is used for the ciphertext).
    fn index(&mut self, c: &EncCol, w: &Written, added: bool) -> Result<Expr, Refused> {
        match w {
            Written::Null => Ok(null()),
            Written::Default => Ok(default()),
            Written::Param(i) if added => {
                let n = self.params.add(*i, ParamUse::BlindIndex(c.col.clone()));
                Ok(bytea_param(self.params.max_client + n))
            }
            Written::Param(i) => {
                self.params.claim(*i, ParamUse::BlindIndex(c.col.clone()))?;
                Ok(bytea_param(*i + 1))
            }
            Written::Literal(text) => {
                let canonical = self.canonical(c, text)?;
                let index = self
                    .enc
                    .manager
                    .blind_index_now(&c.col.table, &c.col.column, self.scope, &canonical)
                    .map_err(|e| self.key_error(c, e))?;
                // A per-tenant index value differs per session: never cached for another.
                self.literals |= self
                    .enc
                    .manager
                    .column(&c.col.table, &c.col.column)
                    .is_ok_and(|s| s.column.context_claim.is_some());
                Ok(bytea_literal(&index))
            }
        }
    }
}

/// Add `c` to what a name was found to stand for: the same column (searchable only if it is
/// searchable everywhere it is found), or refused as ambiguous.
fn merge_found(found: &mut Option<EncCol>, c: &EncCol, name: &str) -> Result<(), Refused> {
    match found {
        Some(f) if f.col != c.col => Err(refuse(format!(
            "pgward: column {name} is encrypted in both {} and {}; qualify it with its table",
            f.col.table, c.col.table
        ))),
        Some(f) => {
            f.searchable &= c.searchable;
            Ok(())
        }
        None => {
            *found = Some(c.clone());
            Ok(())
        }
    }
}

/// The client parameter an expression is (through casts and parentheses).
fn param_index(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Value(v) => placeholder(&v.value),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => param_index(expr),
        _ => None,
    }
}

/// `$n` → 0-based n.
fn placeholder(v: &Value) -> Option<usize> {
    match v {
        Value::Placeholder(p) => p.strip_prefix('$')?.parse::<usize>().ok()?.checked_sub(1),
        _ => None,
    }
}

/// The text of a literal as a client would write it for the column's type.
fn literal_text(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            Value::Number(n, _) => Some(n.to_string()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match &**expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(format!("-{n}")),
                _ => None,
            },
            _ => None,
        },
        Expr::TypedString(ts) => match &ts.value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => Some(s.clone()),
            _ => None,
        },
        // `'x'::text`: the column's client type decides how the text is read.
        Expr::Cast { expr, .. } => literal_text(expr),
        Expr::Nested(inner) => literal_text(inner),
        _ => None,
    }
}

/// `col` → `col_bidx` (keeping any qualifier).
fn to_bidx(expr: &mut Expr) {
    match expr {
        Expr::Identifier(id) => *id = Ident::new(bidx_column(&ident_name(id))),
        Expr::CompoundIdentifier(parts) => {
            if let Some(last) = parts.last_mut() {
                *last = Ident::new(bidx_column(&ident_name(last)));
            }
        }
        _ => {}
    }
}

fn null() -> Expr {
    Expr::Value(Value::Null.into())
}

fn default() -> Expr {
    Expr::Identifier(Ident::new("DEFAULT"))
}

fn bytea_literal(bytes: &[u8]) -> Expr {
    Expr::Cast {
        kind: sqlparser::ast::CastKind::DoubleColon,
        expr: Box::new(Expr::Value(
            Value::EscapedStringLiteral(format!("\\x{}", hex::encode(bytes))).into(),
        )),
        data_type: sqlparser::ast::DataType::Bytea,
        format: None,
    }
}

fn bytea_param(n: usize) -> Expr {
    parse_expr(&format!("CAST(${n} AS BYTEA)")).unwrap_or_else(|_| null())
}

/// Field encryption as the stage the policy engine runs before its rewrite.
impl StatementTransform for SqlEncryption {
    fn apply(
        &self,
        statements: &mut [Statement],
        catalog: Option<&Catalog>,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TransformOutcome, TransformRefusal> {
        let outcome = self
            .transform(statements, catalog, &KeyScope::from_claims(claims))
            .map_err(|r| TransformRefusal {
                kind: RefusalKind::Encryption,
                sqlstate: r.sqlstate,
                message: r.message,
            })?;
        let transforms_values = outcome.encrypted_literals
            || outcome
                .params
                .as_ref()
                .is_some_and(|p| p.transforms_values());
        Ok(TransformOutcome {
            touched: outcome.touched,
            unrepeatable: outcome.encrypted_literals,
            transforms_values,
            plan: outcome.params.map(StagePlan::new),
            accessed: outcome.accessed,
        })
    }

    /// An encrypted table whose name appears in the text (case-insensitively).
    fn may_touch(&self, sql: &str) -> Option<String> {
        let lower = sql.to_ascii_lowercase();
        self.table_names()
            .find(|t| {
                let name = t.rsplit('.').next().unwrap_or(t);
                lower.contains(&name.to_ascii_lowercase())
            })
            .map(str::to_string)
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_reads;
