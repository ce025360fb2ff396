//! SQL analysis shared by every stage: parsing and sanitizing statements (`parse`), the
//! upstream catalog (`catalog`; `routines`: which built-in functions, operators and types are safe), what kind of statement a text is (`kind`) and which columns
//! it names (`columns`). The policy engine (`crate::policy`) and field encryption's SQL
//! transform (`crate::crypto::sql`) both build on this module; it depends on neither.
pub mod catalog;
pub mod columns;
pub mod kind;
pub mod parse;
pub mod routines;
pub mod unsupported;

pub use catalog::{Catalog, CatalogError, ColumnInfo, RelKind, TableInfo};
pub use kind::{CommandClass, StatementKind};
