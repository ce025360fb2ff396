//! The upstream schema as the rewriter needs it: relations, their columns and types.
//!
//! Loaded once from the live database (`Catalog::load`) and again after DDL (`Catalog::refresh`).
//! Unit tests build one by hand with [`Catalog::from_tables`].
use std::collections::HashMap;

use thiserror::Error;

use super::routines::{self, Routines};

/// Errors while reading the catalog.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("reading the upstream catalog: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Kind of a relation, from `pg_class.relkind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelKind {
    Table,
    View,
    MaterializedView,
    Foreign,
    Sequence,
    Other,
}

impl RelKind {
    fn from_relkind(c: &str) -> Self {
        match c {
            "r" | "p" => RelKind::Table,
            "v" => RelKind::View,
            "m" => RelKind::MaterializedView,
            "f" => RelKind::Foreign,
            "S" => RelKind::Sequence,
            _ => RelKind::Other,
        }
    }
}

/// One column of a relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `bigint`, `character varying(20)`.
    pub type_name: String,
    pub type_oid: u32,
    pub not_null: bool,
}

/// One relation of the upstream database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub oid: u32,
    pub kind: RelKind,
    /// In `attnum` order, dropped columns excluded.
    pub columns: Vec<ColumnInfo>,
    /// The primary key's columns, in key order (empty: none).
    pub primary_key: Vec<String>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A foreign key: `columns` of a table reference `referenced_columns` of `referenced`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignKey {
    /// The referencing columns, in key order.
    pub columns: Vec<String>,
    /// The referenced relation's (schema, name).
    pub referenced: (String, String),
    /// The referenced columns, in the same order.
    pub referenced_columns: Vec<String>,
}

/// The relations of the upstream database, keyed by (schema, name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    tables: HashMap<(String, String), TableInfo>,
    /// Foreign keys by the OID of the referencing relation.
    foreign_keys: HashMap<u32, Vec<ForeignKey>>,
    /// `pg_catalog` functions, operators and types classified safe (`sql::routines`).
    routines: Routines,
}

const LOAD_SQL: &str = "
SELECT n.nspname::text, c.relname::text, c.oid, c.relkind::text,
       a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid, a.attnotnull
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
ORDER BY n.nspname, c.relname, a.attnum";

/// The primary keys' columns, in key order.
const PRIMARY_KEYS_SQL: &str = "
SELECT k.conrelid, a.attname::text
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
WHERE k.contype = 'p'
ORDER BY k.conrelid, array_position(k.conkey, a.attnum)";

/// Every foreign key's columns and referenced columns, in key order.
const FOREIGN_KEYS_SQL: &str = "
SELECT k.conrelid, rn.nspname::text, r.relname::text,
       ARRAY(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY AS u(n, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n
             ORDER BY u.i),
       ARRAY(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY AS u(n, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n
             ORDER BY u.i)
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class r ON r.oid = k.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
WHERE k.contype = 'f'
ORDER BY k.conrelid, k.conname";

impl Catalog {
    /// Builds a catalog from known relations (tests, tools).
    pub fn from_tables(tables: Vec<TableInfo>) -> Self {
        let tables = tables
            .into_iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t))
            .collect();
        Catalog {
            tables,
            foreign_keys: HashMap::new(),
            routines: Routines::default(),
        }
    }

    /// The same relations with a foreign key of `table` (tests, tools).
    pub fn with_foreign_key(mut self, table: u32, key: ForeignKey) -> Self {
        self.foreign_keys.entry(table).or_default().push(key);
        self
    }

    /// The foreign keys of `table` (empty: none, or a catalog built without them).
    pub fn foreign_keys(&self, table: &TableInfo) -> &[ForeignKey] {
        self.foreign_keys.get(&table.oid).map_or(&[], Vec::as_slice)
    }

    /// The same relations with classified routines (tests, tools).
    pub fn with_routines(mut self, routines: Routines) -> Self {
        self.routines = routines;
        self
    }

    /// The `pg_catalog` functions, operators and types a bound service may use.
    pub fn routines(&self) -> &Routines {
        &self.routines
    }

    /// Reads every relation (including `pg_catalog` and `information_schema`, whose names
    /// must be known to resolve unqualified references the way PostgreSQL does) and
    /// classifies the built-in routines.
    pub async fn load(client: &tokio_postgres::Client) -> Result<Self, CatalogError> {
        let tables = Self::load_tables(client).await?;
        let foreign_keys = Self::load_foreign_keys(client).await?;
        let routines = routines::load(client).await?;
        Ok(Catalog {
            tables,
            foreign_keys,
            routines,
        })
    }

    async fn load_foreign_keys(
        client: &tokio_postgres::Client,
    ) -> Result<HashMap<u32, Vec<ForeignKey>>, CatalogError> {
        let mut keys: HashMap<u32, Vec<ForeignKey>> = HashMap::new();
        for row in client.query(FOREIGN_KEYS_SQL, &[]).await? {
            keys.entry(row.try_get(0)?).or_default().push(ForeignKey {
                referenced: (row.try_get(1)?, row.try_get(2)?),
                columns: row.try_get(3)?,
                referenced_columns: row.try_get(4)?,
            });
        }
        Ok(keys)
    }

    async fn load_tables(
        client: &tokio_postgres::Client,
    ) -> Result<HashMap<(String, String), TableInfo>, CatalogError> {
        let rows = client.query(LOAD_SQL, &[]).await?;
        let mut tables: HashMap<(String, String), TableInfo> = HashMap::new();
        for row in rows {
            let schema: String = row.try_get(0)?;
            let name: String = row.try_get(1)?;
            let oid: u32 = row.try_get(2)?;
            let kind: String = row.try_get(3)?;
            let entry = tables
                .entry((schema.clone(), name.clone()))
                .or_insert_with(|| TableInfo {
                    schema,
                    name,
                    oid,
                    kind: RelKind::from_relkind(&kind),
                    columns: Vec::new(),
                    primary_key: Vec::new(),
                });
            let column: Option<String> = row.try_get(4)?;
            if let Some(column) = column {
                entry.columns.push(ColumnInfo {
                    name: column,
                    type_name: row.try_get(5)?,
                    type_oid: row.try_get(6)?,
                    not_null: row.try_get(7)?,
                });
            }
        }
        let mut keys: HashMap<u32, Vec<String>> = HashMap::new();
        for row in client.query(PRIMARY_KEYS_SQL, &[]).await? {
            keys.entry(row.try_get(0)?)
                .or_default()
                .push(row.try_get(1)?);
        }
        for table in tables.values_mut() {
            if let Some(key) = keys.remove(&table.oid) {
                table.primary_key = key;
            }
        }
        tracing::debug!(relations = tables.len(), "loaded upstream catalog");
        Ok(tables)
    }

    /// Re-reads the relations (call after DDL; then hand the result to
    /// `PolicyEngine::set_catalog`). The classified routines are kept: `pg_catalog`'s
    /// functions change only with the server's version, i.e. across a restart of pgward's
    /// sessions, and a missing one is refused, never allowed.
    pub async fn refresh(&self, client: &tokio_postgres::Client) -> Result<Self, CatalogError> {
        Ok(Catalog {
            tables: Self::load_tables(client).await?,
            foreign_keys: Self::load_foreign_keys(client).await?,
            routines: self.routines.clone(),
        })
    }

    pub fn get(&self, schema: &str, name: &str) -> Option<&TableInfo> {
        self.tables.get(&(schema.to_string(), name.to_string()))
    }

    /// Resolves a (normalized) relation name the way PostgreSQL's default search path does:
    /// `pg_catalog` first (implicitly), then `public`. Session search_path changes are refused,
    /// so this is what the server will resolve too.
    pub fn resolve(&self, parts: &[String]) -> Option<&TableInfo> {
        match parts {
            [name] => self
                .get("pg_catalog", name)
                .or_else(|| self.get("public", name)),
            [schema, name] => self.get(schema, name),
            _ => None,
        }
    }

    pub fn tables(&self) -> impl Iterator<Item = &TableInfo> {
        self.tables.values()
    }
}
