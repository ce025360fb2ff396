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
//!   col`) is left alone: the relay decrypts it by its RowDescription origin.
//! * Everything else that mentions an encrypted column would compute on ciphertext (ORDER
//!   BY, GROUP BY, DISTINCT, ranges, LIKE, functions, casts, joins of different columns, set
//!   operations) and is refused with 0A000 naming the column.
//!
//! Name resolution is deliberately conservative: an unqualified column name that is an
//! encrypted column of any table the statement mentions is treated as that column (fail
//! closed); when two different encrypted columns share the name, the reference must be
//! qualified.
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

use super::codec::{encode_for_encryption, ClientType, WireFormat};
use super::error::CryptoError;
use super::manager::KeyManager;
use crate::sql::catalog::Catalog;
use crate::sql::parse::{ident_name, object_name_parts, parse_expr};

/// An encrypted column as a statement uses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ColumnRef {
    /// `schema.table` (the AAD binding).
    pub table: String,
    pub column: String,
    pub ty: ClientType,
}

/// What the relay does with one bound parameter value on its way upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamUse {
    /// Forwarded as the client sent it.
    Plain,
    /// Replaced by the ciphertext of the value, in binary format.
    Encrypt(ColumnRef),
    /// Replaced by the blind index of the value, in binary format.
    BlindIndex(ColumnRef),
}

/// How the parameters the server sees are made from the parameters the client binds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamPlan {
    /// Parameters the client binds (`$1..$client_count`).
    pub client_count: usize,
    /// Per server-side parameter: which client parameter (0-based) supplies it, and how.
    /// Parameters beyond `client_count` are added by pgward (blind indexes of an inserted value).
    pub params: Vec<(usize, ParamUse)>,
    /// `COPY … FROM STDIN` into a table with encrypted columns: how its rows are encrypted.
    pub copy: Option<CopyPlan>,
}

/// How the rows of a `COPY … FROM STDIN` (text or CSV) are encrypted on their way upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyPlan {
    pub csv: bool,
    pub delimiter: u8,
    /// The string that means NULL (`\N` in text format, empty in CSV by default).
    pub null: String,
    pub header: bool,
    pub quote: u8,
    pub escape: u8,
    /// Per field of a row: the encrypted column it fills, if any.
    pub fields: Vec<Option<ColumnRef>>,
    /// Fields pgward appends: the blind index of field `i` (column list extended to match).
    pub blind_indexes: Vec<usize>,
    /// Names of the appended columns (for a header line).
    pub appended_names: Vec<String>,
}

impl ParamPlan {
    /// True when some parameter needs work in the relay.
    pub fn is_active(&self) -> bool {
        self.copy.is_some()
            || self.params.len() != self.client_count
            || self.params.iter().any(|(_, u)| *u != ParamUse::Plain)
    }

    /// The type OID the client should be told for its parameter `i` (0-based), if pgward
    /// changed it.
    pub fn client_type_oid(&self, i: usize) -> Option<u32> {
        match self.params.get(i) {
            Some((_, ParamUse::Encrypt(c) | ParamUse::BlindIndex(c))) => Some(c.ty.oid()),
            _ => None,
        }
    }
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

#[derive(Clone, Debug)]
struct EncCol {
    col: ColumnRef,
    searchable: bool,
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
    pub fn transform(
        &self,
        statements: &mut [Statement],
        catalog: Option<&Catalog>,
    ) -> Result<Outcome, Refused> {
        let mut outcome = Outcome::default();
        let mut params = Params::default();
        for st in statements.iter_mut() {
            refuse_writes_through_views(st, catalog)?;
            let mut t = Transform {
                enc: self,
                catalog,
                aliases: HashMap::new(),
                tables: Vec::new(),
                derived: HashMap::new(),
                params: &mut params,
                literals: false,
            };
            if !t.collect_tables(st) {
                outcome.accessed.push(Vec::new());
                continue;
            }
            outcome.touched = true;
            outcome.accessed.push(t.accessed_columns(st));
            t.collect_derived(st)?;
            t.statement(st)?;
            outcome.encrypted_literals |= t.literals;
        }
        outcome.params = params.plan()?;
        Ok(outcome)
    }
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

/// Parameter bookkeeping across one text.
#[derive(Default)]
struct Params {
    /// 0-based client parameter → how it is used (only encrypted uses are recorded).
    uses: HashMap<usize, ParamUse>,
    /// Occurrences of each client parameter, and how many an encrypted context consumed.
    seen: HashMap<usize, usize>,
    consumed: HashMap<usize, usize>,
    /// Parameters pgward adds: (source client parameter, use), numbered after the client's.
    added: Vec<(usize, ParamUse)>,
    max_client: usize,
    copy: Option<CopyPlan>,
}

impl Params {
    fn claim(&mut self, index: usize, usage: ParamUse) -> Result<(), Refused> {
        match self.uses.get(&index) {
            Some(existing) if *existing != usage => {
                return Err(refuse(format!(
                "pgward: parameter ${} is used for two different encrypted purposes; bind it twice",
                index + 1
            )))
            }
            _ => {}
        }
        self.uses.insert(index, usage);
        *self.consumed.entry(index).or_default() += 1;
        Ok(())
    }

    /// A parameter pgward adds, carrying `usage` of client parameter `source`; its number.
    fn add(&mut self, source: usize, usage: ParamUse) -> usize {
        self.added.push((source, usage));
        self.added.len() // offset after max_client, fixed up in `plan`
    }

    fn plan(&self) -> Result<Option<Arc<ParamPlan>>, Refused> {
        for (index, n) in &self.seen {
            if self.uses.contains_key(index) && self.consumed.get(index) != Some(n) {
                return Err(refuse(format!(
                    "pgward: parameter ${} goes into an encrypted column and is also used elsewhere; bind it twice",
                    index + 1
                )));
            }
        }
        if self.uses.is_empty() && self.added.is_empty() && self.copy.is_none() {
            return Ok(None);
        }
        let mut params: Vec<(usize, ParamUse)> = (0..self.max_client)
            .map(|i| (i, self.uses.get(&i).cloned().unwrap_or(ParamUse::Plain)))
            .collect();
        params.extend(self.added.iter().cloned());
        Ok(Some(Arc::new(ParamPlan {
            client_count: self.max_client,
            params,
            copy: self.copy.clone(),
        })))
    }
}

/// One statement's transform.
struct Transform<'a> {
    enc: &'a SqlEncryption,
    catalog: Option<&'a Catalog>,
    /// Relation name or alias (as PostgreSQL folds it) → `schema.table`.
    aliases: HashMap<String, String>,
    /// Every table the statement mentions (`schema.table`), and the keys of its derived
    /// tables and CTEs that carry encrypted columns.
    tables: Vec<String>,
    /// Encrypted columns exposed by derived tables and CTEs, by key (see `derived`).
    derived: HashMap<String, HashMap<String, EncCol>>,
    params: &'a mut Params,
    literals: bool,
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
                if let TableFactor::Table { name, alias, .. } = tf {
                    if let Some(q) = self.t.qualify(name) {
                        let key = match alias {
                            Some(a) => ident_name(&a.name),
                            None => object_name_parts(name)
                                .and_then(|p| p.last().cloned())
                                .unwrap_or_default(),
                        };
                        self.t.aliases.insert(key, q.clone());
                        self.t.tables.push(q);
                    }
                }
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
        if let Statement::Insert(Insert {
            table: TableObject::TableName(name),
            table_alias,
            ..
        }) = &*st
        {
            if let Some(q) = self.qualify(name) {
                let key = match table_alias {
                    Some(a) => ident_name(&a.alias),
                    None => object_name_parts(name)
                        .and_then(|p| p.last().cloned())
                        .unwrap_or_default(),
                };
                self.aliases.insert(key, q);
            }
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
                        match &found {
                            Some(f) if f.col != c.col => {
                                return Err(refuse(format!(
                                    "pgward: column {name} is encrypted in both {} and {}; qualify it with its table",
                                    f.col.table, c.col.table
                                )))
                            }
                            _ => found = Some(c.clone()),
                        }
                    }
                }
                Ok(found)
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(ident_name).collect();
                let (table, column) = match names.as_slice() {
                    [q, c] => (self.aliases.get(q).cloned(), c),
                    [s, t, c] => (Some(format!("{s}.{t}")), c),
                    _ => return Ok(None),
                };
                Ok(table
                    .and_then(|t| self.enc_table(&t).and_then(|cols| cols.get(column)))
                    .cloned())
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

    /// The SQL for a value stored in `c` (ciphertext literal, cast parameter, NULL, DEFAULT).
    fn sealed(&mut self, c: &EncCol, w: &Written) -> Result<Expr, Refused> {
        match w {
            Written::Null => Ok(null()),
            Written::Default => Ok(default()),
            Written::Param(i) => {
                self.params.claim(*i, ParamUse::Encrypt(c.col.clone()))?;
                Ok(bytea_param(*i + 1))
            }
            Written::Literal(text) => {
                let canonical = self.canonical(c, text)?;
                let sealed = self
                    .enc
                    .manager
                    .encrypt_now(&c.col.table, &c.col.column, &canonical)
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
                    .blind_index_now(&c.col.table, &c.col.column, &canonical)
                    .map_err(|e| self.key_error(c, e))?;
                Ok(bytea_literal(&index))
            }
        }
    }

    fn insert(&mut self, i: &mut Insert) -> Result<(), Refused> {
        let TableObject::TableName(name) = &i.table else {
            return Ok(());
        };
        let Some(table) = self.qualify(name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        let mut names: Vec<String> = Vec::new();
        for c in &i.columns {
            names.push(
                object_name_parts(c)
                    .and_then(|p| p.last().cloned())
                    .unwrap_or_default(),
            );
        }
        if names.is_empty() {
            names = self.default_columns(&table, &cols, i)?;
            i.columns = names
                .iter()
                .map(|n| ObjectName(vec![ObjectNamePart::Identifier(Ident::new(n.clone()))]))
                .collect();
        }
        refuse_bidx_targets(&cols, names.iter())?;
        let targets: Vec<(usize, EncCol)> = names
            .iter()
            .enumerate()
            .filter_map(|(k, n)| cols.get(n).map(|c| (k, c.clone())))
            .collect();
        if !targets.is_empty() {
            let Some(source) = i.source.as_mut() else {
                return Ok(());
            };
            let SetExpr::Values(values) = &mut *source.body else {
                return Err(refuse(format!(
                    "pgward: INSERT … SELECT into encrypted column {table}.{} is not supported (it would store unencrypted or computed values); use VALUES",
                    targets[0].1.col.column
                )));
            };
            for (_, c) in targets.iter().filter(|(_, c)| c.searchable) {
                i.columns
                    .push(ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                        bidx_column(&c.col.column),
                    ))]));
            }
            for row in values.rows.iter_mut() {
                let mut extra = Vec::new();
                for (k, c) in &targets {
                    let Some(expr) = row.content.get(*k) else {
                        continue;
                    };
                    let w = self.written(expr, c)?;
                    let sealed = self.sealed(c, &w)?;
                    if c.searchable {
                        extra.push(self.index(c, &w, true)?);
                    }
                    row.content[*k] = sealed;
                }
                row.content.extend(extra);
            }
        }
        if let Some(OnInsert::OnConflict(oc)) = &mut i.on {
            if let Some(ConflictTarget::Columns { columns, .. }) = &mut oc.conflict_target {
                for id in columns.iter_mut() {
                    if let Some(c) = cols.get(&ident_name(id)) {
                        if !c.searchable {
                            return Err(refuse(format!(
                                "pgward: ON CONFLICT on encrypted column {table}.{} needs it searchable (a unique index on {})",
                                c.col.column,
                                bidx_column(&c.col.column)
                            )));
                        }
                        *id = Ident::new(bidx_column(&c.col.column));
                    }
                }
            }
            if let OnConflictAction::DoUpdate(du) = &mut oc.action {
                self.assignments(&table, &cols, &mut du.assignments, true)?;
            }
        }
        Ok(())
    }

    /// `COPY t [(cols)] FROM STDIN` in text or CSV format: the column list gains the blind
    /// indexes, and the relay encrypts each row's fields ([`CopyPlan`]).
    fn copy_from(
        &mut self,
        table_name: &ObjectName,
        columns: &mut Vec<Ident>,
        options: &[sqlparser::ast::CopyOption],
        legacy: &[sqlparser::ast::CopyLegacyOption],
    ) -> Result<(), Refused> {
        use sqlparser::ast::{CopyLegacyCsvOption as Csv, CopyLegacyOption as L, CopyOption as O};
        let Some(table) = self.qualify(table_name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        if self.params.copy.is_some() {
            return Err(refuse(
                "pgward: one COPY into a table with encrypted columns per query",
            ));
        }
        let unsupported = |what: &str| {
            refuse(format!(
                "pgward: COPY into {table} (it has encrypted columns) supports text and CSV without {what}"
            ))
        };
        let byte = |c: char, what: &str| -> Result<u8, Refused> {
            u8::try_from(c)
                .ok()
                .filter(u8::is_ascii)
                .ok_or_else(|| unsupported(what))
        };
        let mut plan = CopyPlan {
            csv: false,
            delimiter: b'\t',
            null: "\\N".into(),
            header: false,
            quote: b'"',
            escape: b'"',
            fields: Vec::new(),
            blind_indexes: Vec::new(),
            appended_names: Vec::new(),
        };
        let (mut delimiter, mut null, mut escape) = (None, None, None);
        for o in options {
            match o {
                O::Format(f) => match ident_name(f).as_str() {
                    "text" => plan.csv = false,
                    "csv" => plan.csv = true,
                    _ => return Err(unsupported("binary format")),
                },
                O::Freeze(_) => {}
                O::Delimiter(c) => delimiter = Some(byte(*c, "a non-ASCII delimiter")?),
                O::Null(n) => null = Some(n.clone()),
                O::Header(h) => plan.header = *h,
                O::Quote(c) => plan.quote = byte(*c, "a non-ASCII quote")?,
                O::Escape(c) => escape = Some(byte(*c, "a non-ASCII escape")?),
                O::ForceNotNull(_) | O::ForceNull(_) | O::ForceQuote(_) | O::Encoding(_) => {
                    return Err(unsupported("FORCE_* or ENCODING options"))
                }
            }
        }
        for o in legacy {
            match o {
                L::Delimiter(c) => delimiter = Some(byte(*c, "a non-ASCII delimiter")?),
                L::Null(n) => null = Some(n.clone()),
                L::Csv(csv) => {
                    plan.csv = true;
                    for c in csv {
                        match c {
                            Csv::Header => plan.header = true,
                            Csv::Quote(q) => plan.quote = byte(*q, "a non-ASCII quote")?,
                            Csv::Escape(e) => escape = Some(byte(*e, "a non-ASCII escape")?),
                            _ => return Err(unsupported("FORCE options")),
                        }
                    }
                }
                _ => return Err(unsupported("this option")),
            }
        }
        if plan.csv {
            plan.delimiter = b',';
            plan.null = String::new();
        }
        plan.delimiter = delimiter.unwrap_or(plan.delimiter);
        plan.null = null.unwrap_or(plan.null);
        plan.escape = escape.unwrap_or(plan.quote);
        let mut names: Vec<String> = columns.iter().map(ident_name).collect();
        if names.is_empty() {
            let info = self
                .catalog
                .and_then(|c| {
                    let (s, t) = table.split_once('.')?;
                    c.get(s, t)
                })
                .ok_or_else(|| {
                    refuse(format!(
                        "pgward: name the columns of COPY {table} (it has encrypted columns)"
                    ))
                })?;
            names = info
                .columns
                .iter()
                .map(|c| c.name.clone())
                .filter(|n| {
                    !n.strip_suffix("_bidx")
                        .and_then(|b| cols.get(b))
                        .is_some_and(|c| c.searchable)
                })
                .collect();
            *columns = names.iter().map(|n| Ident::new(n.clone())).collect();
        }
        refuse_bidx_targets(&cols, names.iter())?;
        for (i, n) in names.iter().enumerate() {
            let c = cols.get(n);
            plan.fields.push(c.map(|c| c.col.clone()));
            if let Some(c) = c.filter(|c| c.searchable) {
                plan.blind_indexes.push(i);
                plan.appended_names.push(bidx_column(&c.col.column));
                columns.push(Ident::new(bidx_column(&c.col.column)));
            }
        }
        self.params.copy = Some(plan);
        Ok(())
    }

    /// The column list PostgreSQL would use for `INSERT INTO t VALUES (…)`, minus blind indexes.
    fn default_columns(
        &self,
        table: &str,
        cols: &HashMap<String, EncCol>,
        i: &Insert,
    ) -> Result<Vec<String>, Refused> {
        let width = match i.source.as_deref().map(|q| &*q.body) {
            Some(SetExpr::Values(v)) => v.rows.first().map_or(0, |r| r.content.len()),
            None => return Ok(Vec::new()),
            _ => {
                return Err(refuse(format!(
                    "pgward: name the columns of INSERT INTO {table} (it has encrypted columns)"
                )))
            }
        };
        let info = self
            .catalog
            .and_then(|c| {
                let (s, t) = table.split_once('.')?;
                c.get(s, t)
            })
            .ok_or_else(|| {
                refuse(format!(
                    "pgward: name the columns of INSERT INTO {table} (it has encrypted columns)"
                ))
            })?;
        let is_bidx = |n: &str| {
            n.strip_suffix("_bidx")
                .and_then(|b| cols.get(b))
                .is_some_and(|c| c.searchable)
        };
        Ok(info
            .columns
            .iter()
            .map(|c| c.name.clone())
            .filter(|n| !is_bidx(n))
            .take(width)
            .collect())
    }

    fn update(&mut self, u: &mut Update) -> Result<(), Refused> {
        let TableFactor::Table { name, .. } = &u.table.relation else {
            return Ok(());
        };
        let Some(table) = self.qualify(name) else {
            return Ok(());
        };
        let Some(cols) = self.enc_table(&table).cloned() else {
            return Ok(());
        };
        self.assignments(&table, &cols, &mut u.assignments, false)
    }

    /// `SET col = v` of UPDATE or ON CONFLICT DO UPDATE (`excluded`: `EXCLUDED.col` allowed).
    fn assignments(
        &mut self,
        table: &str,
        cols: &HashMap<String, EncCol>,
        assignments: &mut Vec<sqlparser::ast::Assignment>,
        excluded: bool,
    ) -> Result<(), Refused> {
        let mut extra = Vec::new();
        for a in assignments.iter_mut() {
            let names: Vec<String> = match &a.target {
                AssignmentTarget::ColumnName(n) => object_name_parts(n)
                    .and_then(|p| p.last().cloned())
                    .into_iter()
                    .collect(),
                AssignmentTarget::Tuple(ns) => ns
                    .iter()
                    .filter_map(|n| object_name_parts(n).and_then(|p| p.last().cloned()))
                    .collect(),
            };
            refuse_bidx_targets(cols, names.iter())?;
            let Some(c) = names.iter().find_map(|n| cols.get(n)).cloned() else {
                continue;
            };
            if matches!(a.target, AssignmentTarget::Tuple(_)) {
                return Err(refuse(format!(
                    "pgward: assign encrypted column {table}.{} on its own, not in a tuple",
                    c.col.column
                )));
            }
            let bidx_target =
                AssignmentTarget::ColumnName(ObjectName(vec![ObjectNamePart::Identifier(
                    Ident::new(bidx_column(&c.col.column)),
                )]));
            if excluded && is_excluded_copy(&a.value, &c.col.column) {
                if c.searchable {
                    extra.push(sqlparser::ast::Assignment {
                        target: bidx_target,
                        value: Expr::CompoundIdentifier(vec![
                            Ident::new("EXCLUDED"),
                            Ident::new(bidx_column(&c.col.column)),
                        ]),
                    });
                }
                // Mark the reference as handled: it copies ciphertext within its own column.
                a.value = Expr::CompoundIdentifier(vec![
                    Ident::new("EXCLUDED"),
                    Ident::new(c.col.column.clone()),
                ]);
                continue;
            }
            let w = self.written(&a.value, &c)?;
            let sealed = self.sealed(&c, &w)?;
            if c.searchable {
                extra.push(sqlparser::ast::Assignment {
                    target: bidx_target,
                    value: self.index(&c, &w, true)?,
                });
            }
            a.value = sealed;
        }
        assignments.extend(extra);
        Ok(())
    }

    /// Rewrite equality predicates to blind indexes, then refuse every remaining reference to
    /// an encrypted column that is not a plain selection or an IS [NOT] NULL test.
    fn predicates(&mut self, st: &mut Statement) -> Result<(), Refused> {
        struct Rewrite<'b, 'c> {
            t: &'b mut Transform<'c>,
            /// References in allowed positions (IS NULL operands, plain select items).
            allowed: usize,
            /// Plain selections inside expression subqueries (counted in `allowed` by
            /// `pre_visit_query`, taken back here).
            penalty: usize,
            /// Every reference to an encrypted column.
            total: usize,
            first: Option<ColumnRef>,
        }
        impl VisitorMut for Rewrite<'_, '_> {
            type Break = Refused;
            fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<Refused> {
                match self.t.plain_query_items(q) {
                    Ok(n) => self.allowed += n,
                    Err(e) => return ControlFlow::Break(e),
                }
                ControlFlow::Continue(())
            }
            fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Refused> {
                // A subquery used as a value loses the column's origin (its result would
                // be ciphertext) or compares ciphertext (`IN (SELECT col …)`): its plain
                // selections of encrypted columns do not count as allowed.
                if let Expr::Subquery(q)
                | Expr::In {
                    target: sqlparser::ast::InTarget::Subquery(q),
                    ..
                } = &*expr
                {
                    match self.t.plain_query_items(q) {
                        Ok(n) => self.penalty += n,
                        Err(e) => return ControlFlow::Break(e),
                    }
                }
                match self.t.rewrite_predicate(expr) {
                    Ok(Some(n)) => self.allowed += n,
                    Ok(None) => {}
                    Err(e) => return ControlFlow::Break(e),
                }
                match self.t.column_of(expr) {
                    Ok(Some(c)) => {
                        self.total += 1;
                        self.first.get_or_insert(c.col);
                    }
                    Ok(None) => {}
                    Err(e) => return ControlFlow::Break(e),
                }
                ControlFlow::Continue(())
            }
        }
        let mut r = Rewrite {
            t: self,
            allowed: 0,
            penalty: 0,
            total: 0,
            first: None,
        };
        if let ControlFlow::Break(e) = st.visit(&mut r) {
            return Err(e);
        }
        let (allowed, total, first) = (r.allowed.saturating_sub(r.penalty), r.total, r.first);
        let returning_allowed = match st {
            Statement::Insert(i) => self.plain_items(i.returning.as_deref())?,
            Statement::Update(u) => self.plain_items(u.returning.as_deref())?,
            Statement::Delete(d) => self.plain_items(d.returning.as_deref())?,
            _ => 0,
        };
        if total > allowed + returning_allowed {
            let c = first.unwrap_or_else(|| ColumnRef {
                table: String::new(),
                column: String::new(),
                ty: ClientType::Text,
            });
            return Err(refuse(format!(
                "pgward: column {}.{} is encrypted; pgward can only select it, test it with IS [NOT] NULL, or compare it with =, <> or IN when it is searchable — not compute on it (ORDER BY, GROUP BY, DISTINCT, ranges, LIKE, functions, casts, set operations, joins with other columns)",
                c.table, c.column
            )));
        }
        Ok(())
    }

    /// Plain selections of encrypted columns in a query's own (non-DISTINCT) SELECT list.
    fn plain_query_items(&self, q: &Query) -> Result<usize, Refused> {
        match &*q.body {
            SetExpr::Select(s) if s.distinct.is_none() => self.plain_items(Some(&s.projection)),
            _ => Ok(0),
        }
    }

    fn plain_items(&self, items: Option<&[SelectItem]>) -> Result<usize, Refused> {
        let mut n = 0;
        for item in items.unwrap_or_default() {
            if let SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } = item {
                if self.column_of(e)?.is_some() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Rewrite one allowed predicate shape; returns how many encrypted references it leaves
    /// in allowed positions (`None`: not such a predicate).
    fn rewrite_predicate(&mut self, expr: &mut Expr) -> Result<Option<usize>, Refused> {
        match expr {
            Expr::IsNull(inner) | Expr::IsNotNull(inner) => Ok(self.column_of(inner)?.map(|_| 1)),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq | BinaryOperator::NotEq,
                right,
            } => {
                let (lc, rc) = (self.column_of(left)?, self.column_of(right)?);
                match (lc, rc) {
                    (Some(a), Some(b)) => {
                        if a.col != b.col || !a.searchable {
                            return Err(refuse(format!(
                                "pgward: {}.{} and {}.{} can only be compared when they are the same searchable encrypted column",
                                a.col.table, a.col.column, b.col.table, b.col.column
                            )));
                        }
                        to_bidx(left);
                        to_bidx(right);
                        Ok(Some(0))
                    }
                    (Some(c), None) => self.compare(c, left, right),
                    (None, Some(c)) => self.compare(c, right, left),
                    (None, None) => Ok(None),
                }
            }
            Expr::In {
                expr: col,
                target: sqlparser::ast::InTarget::List(list),
                ..
            } => {
                let Some(c) = self.column_of(col)? else {
                    return Ok(None);
                };
                self.searchable(&c)?;
                let mut out = Vec::with_capacity(list.len());
                for v in list.iter() {
                    let w = self.comparand(v, &c)?;
                    out.push(self.index(&c, &w, false)?);
                }
                *list = out;
                to_bidx(col);
                Ok(Some(0))
            }
            _ => Ok(None),
        }
    }

    fn searchable(&self, c: &EncCol) -> Result<(), Refused> {
        if c.searchable {
            Ok(())
        } else {
            Err(refuse(format!(
                "pgward: encrypted column {}.{} is not searchable; equality search needs searchable = true (a blind index)",
                c.col.table, c.col.column
            )))
        }
    }

    fn comparand(&self, v: &Expr, c: &EncCol) -> Result<Written, Refused> {
        match self.written(v, c) {
            Ok(Written::Default) | Err(_) => Err(refuse(format!(
                "pgward: encrypted column {}.{} can only be compared with a literal or a parameter",
                c.col.table, c.col.column
            ))),
            Ok(w) => Ok(w),
        }
    }

    fn compare(
        &mut self,
        c: EncCol,
        col: &mut Expr,
        value: &mut Expr,
    ) -> Result<Option<usize>, Refused> {
        self.searchable(&c)?;
        let w = self.comparand(value, &c)?;
        *value = self.index(&c, &w, false)?;
        to_bidx(col);
        Ok(Some(0))
    }
}

/// Refuse writing a blind-index column directly: pgward maintains it.
fn refuse_bidx_targets<'a>(
    cols: &HashMap<String, EncCol>,
    names: impl Iterator<Item = &'a String>,
) -> Result<(), Refused> {
    for n in names {
        if let Some(c) = n.strip_suffix("_bidx").and_then(|b| cols.get(b)) {
            if c.searchable {
                return Err(refuse(format!(
                    "pgward: {n} is the blind index of encrypted column {}.{}; pgward maintains it",
                    c.col.table, c.col.column
                )));
            }
        }
    }
    Ok(())
}

fn is_excluded_copy(value: &Expr, column: &str) -> bool {
    matches!(value, Expr::CompoundIdentifier(p) if p.len() == 2
        && ident_name(&p[0]) == "excluded" && ident_name(&p[1]) == column)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::config::EncryptColumn;
    use crate::crypto::manager::CachePolicy;
    use crate::keys::local::LocalProvider;
    use crate::keys::SecretKey;
    use crate::sql::parse::parse_statements;

    /// Encryption of the demo's personal columns under a local key (unit tests).
    pub(crate) async fn enc() -> SqlEncryption {
        let col = |table: &str, column: &str, ty, searchable| EncryptColumn {
            table: table.into(),
            column: column.into(),
            key: "pii".into(),
            ty,
            searchable,
        };
        let manager = Arc::new(
            KeyManager::new(
                Arc::new(LocalProvider::from_key(SecretKey::from_bytes([3; 32]))),
                None,
                &[
                    col("customers", "email", ClientType::Text, true),
                    col("customers", "ssn", ClientType::Text, false),
                    col("invoices", "card_number", ClientType::Text, true),
                    col("users", "email", ClientType::Text, true),
                    col("t", "n", ClientType::Int4, true),
                ],
                CachePolicy {
                    ttl: std::time::Duration::from_secs(60),
                    max_stale: std::time::Duration::from_secs(60),
                    blocking_threshold: 1 << 20,
                },
            )
            .unwrap(),
        );
        assert!(manager.prefetch().await.is_empty());
        SqlEncryption::new(manager)
    }

    fn run(enc: &SqlEncryption, sql: &str) -> Result<(String, Outcome), Refused> {
        let mut stmts = parse_statements(sql).unwrap();
        for st in &mut stmts {
            crate::sql::parse::sanitize(st).unwrap();
        }
        let outcome = enc.transform(&mut stmts, None)?;
        let text = stmts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        for st in text.split("; ") {
            assert!(crate::sql::parse::round_trips(st), "{st}");
        }
        Ok((text, outcome))
    }

    #[tokio::test]
    async fn literals_are_encrypted_and_blind_indexed() {
        let e = enc().await;
        let (sql, out) = run(
            &e,
            "INSERT INTO customers (name, email, ssn) VALUES ('Ann', 'ann@x.example', '123-45-6789')",
        )
        .unwrap();
        assert!(out.touched && out.encrypted_literals && out.params.is_none());
        assert!(!sql.contains("ann@x") && !sql.contains("123-45"), "{sql}");
        assert!(sql.contains("(name, email, ssn, email_bidx)"), "{sql}");
        assert_eq!(sql.matches("::BYTEA").count(), 3, "{sql}");
        // Fresh ciphertext each time: the same text never yields the same statement.
        let (again, _) = run(
            &e,
            "INSERT INTO customers (name, email, ssn) VALUES ('Ann', 'ann@x.example', '123-45-6789')",
        )
        .unwrap();
        assert_ne!(sql, again);
    }

    #[tokio::test]
    async fn parameters_get_a_plan_and_added_blind_index_parameters() {
        let e = enc().await;
        let (sql, out) = run(
            &e,
            "INSERT INTO customers (tenant_id, email) VALUES ($1, $2) ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email",
        )
        .unwrap();
        assert!(!out.encrypted_literals);
        assert!(
            sql.contains("VALUES ($1, CAST($2 AS BYTEA), CAST($3 AS BYTEA))"),
            "{sql}"
        );
        assert!(sql.contains("ON CONFLICT(email_bidx)"), "{sql}");
        assert!(sql.contains("email_bidx = EXCLUDED.email_bidx"), "{sql}");
        let plan = out.params.unwrap();
        assert_eq!(plan.client_count, 2);
        assert_eq!(plan.params[0], (0, ParamUse::Plain));
        assert!(matches!(&plan.params[1], (1, ParamUse::Encrypt(c)) if c.column == "email"));
        assert!(matches!(&plan.params[2], (1, ParamUse::BlindIndex(c)) if c.column == "email"));
        assert_eq!(plan.client_type_oid(1), Some(25));
    }

    #[tokio::test]
    async fn equality_predicates_use_the_blind_index() {
        let e = enc().await;
        let (sql, out) = run(
            &e,
            "SELECT c.email, ssn AS s FROM customers c WHERE c.email = 'a@b' AND email IN ($1, 'c@d') AND ssn IS NOT NULL",
        )
        .unwrap();
        assert!(!sql.contains("a@b") && !sql.contains("c@d"), "{sql}");
        assert!(sql.contains("c.email_bidx = E'\\\\x"), "{sql}");
        assert!(
            sql.contains("email_bidx IN (CAST($1 AS BYTEA), E'"),
            "{sql}"
        );
        assert!(sql.contains("ssn IS NOT NULL"), "{sql}");
        // Blind indexes are deterministic: such statements may be cached.
        assert!(!out.encrypted_literals);
        let (_, out) = run(&e, "SELECT 1 FROM t WHERE n <> -5").unwrap();
        assert!(out.touched);
        let (sql, out) = run(&e, "SELECT id FROM orders WHERE note LIKE 'x%'").unwrap();
        assert!(!out.touched && sql.contains("LIKE 'x%'"));
    }

    #[tokio::test]
    async fn computing_on_ciphertext_is_refused() {
        let e = enc().await;
        for sql in [
            "SELECT * FROM customers WHERE email LIKE 'a%'",
            "SELECT * FROM customers ORDER BY email",
            "SELECT email, count(*) FROM customers GROUP BY email",
            "SELECT DISTINCT email FROM customers",
            "SELECT lower(email) FROM customers",
            "SELECT * FROM customers WHERE ssn = 'x'",
            "SELECT * FROM t WHERE n > 3",
            "SELECT * FROM customers c JOIN invoices i ON c.email = i.card_number",
            "SELECT email FROM customers UNION SELECT card_number FROM invoices",
            "UPDATE customers SET email = lower('X')",
            "UPDATE customers SET (email, name) = ('a', 'b')",
            "INSERT INTO customers (email) SELECT 'x'",
            "INSERT INTO customers (email_bidx) VALUES ('x')",
            "INSERT INTO customers (email, name) VALUES ($1, $1)",
            "COPY customers FROM STDIN",
            "SELECT * FROM customers, users WHERE email = 'x'",
            "INSERT INTO t (n) VALUES ('not a number')",
            "SELECT (SELECT email FROM customers LIMIT 1)",
            "SELECT id FROM invoices WHERE card_number IN (SELECT email FROM customers)",
        ] {
            let r = run(&e, sql).unwrap_err();
            assert!(["0A000", "22P02"].contains(&r.sqlstate), "{sql}: {r:?}");
            assert!(
                !r.message.contains("'x'") && !r.message.contains("not a number"),
                "{sql}: {}",
                r.message
            );
        }
        // Allowed: selection, IS NULL, DDL.
        for sql in [
            "SELECT email AS e, customers.ssn FROM customers WHERE email IS NULL",
            "SELECT * FROM customers c JOIN customers d ON c.email = d.email",
            "ALTER TABLE customers ADD COLUMN x int",
            "DELETE FROM customers WHERE email = $1 RETURNING ssn",
        ] {
            run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
        }
        // Writes nested in a query are encrypted too.
        let (sql, out) = run(
            &e,
            "WITH x AS (INSERT INTO customers (email) VALUES ('cte@x.example') RETURNING id) SELECT id FROM x",
        )
        .unwrap();
        assert!(out.encrypted_literals && !sql.contains("cte@x"), "{sql}");
        let (sql, _) = run(
            &e,
            "WITH x AS (UPDATE customers SET ssn = 'cte-ssn' WHERE email = 'a' RETURNING id) SELECT count(*) FROM x",
        )
        .unwrap();
        assert!(
            !sql.contains("cte-ssn") && sql.contains("email_bidx ="),
            "{sql}"
        );
        for sql in ["SELECT 1", "SELECT email FROM customers WHERE id = 1"] {
            run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
        }
    }

    #[tokio::test]
    async fn computing_on_ciphertext_through_derived_tables_and_ctes_is_refused() {
        let e = enc().await;
        for sql in [
            "SELECT length(x.e) FROM (SELECT email AS e FROM customers) x",
            "SELECT length(e) FROM (SELECT email AS e FROM customers) x",
            "SELECT upper(x.email) FROM (SELECT email FROM customers) x",
            "SELECT length(y.email) FROM (SELECT * FROM customers) y",
            "SELECT length(y.email) FROM (SELECT c.* FROM customers c) y",
            "SELECT length(z.e) FROM (SELECT x.e FROM (SELECT email AS e FROM customers) x) z",
            "WITH x AS (SELECT email AS e FROM customers) SELECT length(e) FROM x",
            "WITH x AS (SELECT email FROM customers) SELECT * FROM x ORDER BY x.email",
            "SELECT * FROM (SELECT email AS e FROM customers) x WHERE x.e LIKE 'a%'",
            "SELECT x.e FROM (SELECT email AS e FROM customers) x WHERE x.e = 'a@b'",
            "SELECT a FROM (SELECT email FROM customers) AS x(a)",
            "SELECT count(DISTINCT x.e) FROM (SELECT email AS e FROM customers) x",
            "SELECT length(l.e) FROM customers c, LATERAL (SELECT c.email AS e) l",
        ] {
            let r = run(&e, sql).unwrap_err();
            assert_eq!(r.sqlstate, "0A000", "{sql}: {r:?}");
            assert!(!r.message.contains("a@b"), "{sql}: {}", r.message);
        }
        // Selecting through them, testing IS NULL, and searching through `*` (the blind
        // index comes along) still work.
        for sql in [
            "SELECT x.e FROM (SELECT email AS e FROM customers) x",
            "SELECT e FROM (SELECT email AS e FROM customers) x WHERE e IS NOT NULL",
            "WITH x AS (SELECT email FROM customers) SELECT email FROM x",
            "SELECT y.email FROM (SELECT * FROM customers) y WHERE y.email = 'a@b'",
            "SELECT n FROM (SELECT length(name) AS n FROM customers) x ORDER BY n",
        ] {
            run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
        }
        let (sql, _) = run(
            &e,
            "SELECT y.email FROM (SELECT * FROM customers) y WHERE y.email = 'a@b'",
        )
        .unwrap();
        assert!(
            sql.contains("y.email_bidx =") && !sql.contains("a@b"),
            "{sql}"
        );
    }
}
