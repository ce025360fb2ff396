//! SQL analysis shared by every stage: parsing and sanitizing statements (`parse`; what
//! sqlparser cannot parse faithfully, named or normalised first: `unsupported`), the upstream
//! catalog (`catalog`; `routines`: which built-in functions, operators and types are safe),
//! the one lexer (`lex`) and what the audit makes of a text with it — redaction, fingerprint,
//! statement split (`fingerprint`) —, how deep a statement's tree would grow (`depth`, checked
//! before parsing), the settings under which the server reads SQL differently (`settings`), what kind of statement a text is (`kind`), which columns it names (`columns`), and the
//! interface of a transform that runs beside the policy rewrite (`stage`). The policy engine
//! (`crate::policy`) and field encryption's SQL transform (`crate::crypto::sql`) both build on
//! this module; it depends on neither.
pub mod catalog;
pub mod columns;
pub mod depth;
pub mod fingerprint;
pub mod kind;
pub mod lex;
pub mod parse;
pub mod routines;
pub mod settings;
pub mod stage;
pub mod unsupported;

pub use catalog::{Catalog, CatalogError, ColumnInfo, ForeignKey, RelKind, TableInfo};
pub use kind::{CommandClass, NameKind, SessionName, StatementKind};
