//! The extended protocol on the console, for drivers that send every query that way
//! (psycopg 3, JDBC): Parse/Bind/Describe/Execute/Close of parameterless SHOW commands, in text
//! format. A statement's text is parsed at Parse; each Execute is audited and answered with
//! the command's rows (all of them: a row limit is not honoured). After an error the rest of
//! the batch up to Sync is skipped, as PostgreSQL does.

use std::collections::HashMap;

use bytes::BytesMut;
use thiserror::Error;

use super::command::{self, Command, CommandError};
use super::{views, Audit};
use crate::audit::Protocol;
use crate::error::{sqlstate, ClientError};
use crate::protocol::build;
use crate::protocol::cursor::i16_at;
use crate::protocol::view::{BindView, Frontend, ParseView, Target};
use crate::proxy::Shared;

/// Most prepared statements (and portals) a console session may keep.
const MAX_NAMED: usize = 64;

/// Why an extended-protocol message is refused.
#[derive(Debug, Error)]
enum ExtendedError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("the pgward admin console's commands take no parameters")]
    Parameters,
    #[error("unsupported result format code (only 0, text, and 1, binary)")]
    Format,
    #[error("prepared statement \"{0}\" does not exist")]
    NoStatement(String),
    #[error("portal \"{0}\" does not exist")]
    NoPortal(String),
    #[error("too many prepared statements or portals on the admin console (at most {MAX_NAMED})")]
    TooMany,
}

impl ExtendedError {
    fn to_client(&self) -> ClientError {
        let state = match self {
            ExtendedError::Command(e) => return e.to_client(),
            ExtendedError::Parameters => sqlstate::FEATURE_NOT_SUPPORTED,
            ExtendedError::Format => sqlstate::PROTOCOL_VIOLATION,
            ExtendedError::NoStatement(_) => sqlstate::INVALID_SQL_STATEMENT_NAME,
            ExtendedError::NoPortal(_) => sqlstate::INVALID_CURSOR_NAME,
            ExtendedError::TooMany => sqlstate::PROGRAM_LIMIT_EXCEEDED,
        };
        ClientError::error(state, self.to_string())
    }
}

/// A statement (or portal): its text, as the audit records it, its command and (a portal)
/// which result columns are sent in binary.
#[derive(Debug, Clone)]
struct Prepared {
    text: String,
    command: Command,
    binary: Results,
}

/// The result format codes of a Bind.
#[derive(Debug, Clone, Default)]
enum Results {
    #[default]
    AllText,
    All(bool),
    PerColumn(Vec<bool>),
}

impl Results {
    fn from_bind(section: &[u8]) -> Results {
        let codes = section.get(2..).unwrap_or_default();
        let binary: Vec<bool> = (0..codes.len() / 2)
            .map(|i| i16_at(codes, i) == Some(1))
            .collect();
        match binary.as_slice() {
            [] => Results::AllText,
            [one] => Results::All(*one),
            _ => Results::PerColumn(binary),
        }
    }

    /// Whether each of `columns` columns is binary.
    fn flags(&self, columns: usize) -> Vec<bool> {
        match self {
            Results::AllText => vec![false; columns],
            Results::All(binary) => vec![*binary; columns],
            Results::PerColumn(flags) => (0..columns)
                .map(|i| flags.get(i).copied().unwrap_or(false))
                .collect(),
        }
    }
}

/// One console session's extended-protocol state.
#[derive(Debug, Default)]
pub struct Extended {
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Prepared>,
    /// An error happened: skip everything up to the next Sync.
    pub skipping: bool,
}

impl Extended {
    /// Answer one Parse, Bind, Describe, Execute or Close (other messages are not passed).
    pub async fn answer(
        &mut self,
        shared: &Shared,
        id: u64,
        message: &Frontend<'_>,
        audit: Option<&mut Audit>,
        out: &mut BytesMut,
    ) {
        if self.skipping {
            return;
        }
        let result = match message {
            Frontend::Parse(parse) => self.parse(parse, audit).await,
            Frontend::Bind(bind) => self.bind(bind),
            Frontend::Describe(target) => self.describe(shared, *target, id),
            Frontend::Execute { portal, .. } => self.execute(shared, portal, id, audit).await,
            Frontend::Close(target) => Ok(self.close(*target)),
            _ => return,
        };
        match result {
            Ok(answer) => out.extend_from_slice(&answer),
            Err(error) => {
                self.skipping = true;
                out.extend_from_slice(&error.to_message());
            }
        }
    }

    async fn parse(
        &mut self,
        parse: &ParseView<'_>,
        audit: Option<&mut Audit>,
    ) -> Result<BytesMut, ClientError> {
        let checked = check_parse(parse);
        if let (Err(error), Some(audit)) = (&checked, audit) {
            audit
                .record(parse.sql, Some(error), Protocol::Extended)
                .await?;
        }
        let command = checked?;
        if !self.statements.contains_key(parse.name) && self.statements.len() >= MAX_NAMED {
            return Err(ExtendedError::TooMany.to_client());
        }
        let prepared = Prepared {
            text: parse.sql.trim().trim_end_matches(';').trim().to_string(),
            command,
            binary: Results::AllText,
        };
        self.statements.insert(parse.name.to_string(), prepared);
        Ok(BytesMut::from(&build::acknowledgement(b'1')[..]))
    }

    fn bind(&mut self, bind: &BindView<'_>) -> Result<BytesMut, ClientError> {
        let bound = self.check_bind(bind).map_err(|e| e.to_client())?;
        self.portals.insert(bind.portal.to_string(), bound);
        Ok(BytesMut::from(&build::acknowledgement(b'2')[..]))
    }

    fn check_bind(&self, bind: &BindView<'_>) -> Result<Prepared, ExtendedError> {
        let prepared = self
            .statements
            .get(bind.statement)
            .ok_or_else(|| ExtendedError::NoStatement(bind.statement.to_string()))?;
        if !bind.values.is_empty() {
            return Err(ExtendedError::Parameters);
        }
        let codes = bind.results.get(2..).unwrap_or_default();
        if (0..codes.len() / 2).any(|i| !matches!(i16_at(codes, i), Some(0 | 1))) {
            return Err(ExtendedError::Format);
        }
        if !self.portals.contains_key(bind.portal) && self.portals.len() >= MAX_NAMED {
            return Err(ExtendedError::TooMany);
        }
        Ok(Prepared {
            binary: Results::from_bind(bind.results),
            ..prepared.clone()
        })
    }

    fn describe(
        &self,
        shared: &Shared,
        target: Target<'_>,
        id: u64,
    ) -> Result<BytesMut, ClientError> {
        let mut out = BytesMut::new();
        let prepared = if target.is_statement() {
            let prepared = self
                .statements
                .get(target.name)
                .ok_or_else(|| ExtendedError::NoStatement(target.name.to_string()).to_client())?;
            out.extend_from_slice(&build::parameter_description(&[]));
            prepared
        } else {
            self.portal(target.name)?
        };
        let table = views::show(shared, prepared.command, id);
        let binary = prepared.binary.flags(table.columns.len());
        out.extend_from_slice(&table.row_description(&binary));
        Ok(out)
    }

    async fn execute(
        &self,
        shared: &Shared,
        portal: &str,
        id: u64,
        audit: Option<&mut Audit>,
    ) -> Result<BytesMut, ClientError> {
        let prepared = self.portal(portal)?;
        if let Some(audit) = audit {
            audit
                .record(&prepared.text, None, Protocol::Extended)
                .await?;
        }
        tracing::info!(session = id, command = ?prepared.command, "admin console command");
        let mut out = BytesMut::new();
        let table = views::show(shared, prepared.command, id);
        table.write_rows(&prepared.binary.flags(table.columns.len()), &mut out);
        Ok(out)
    }

    fn close(&mut self, target: Target<'_>) -> BytesMut {
        if target.is_statement() {
            self.statements.remove(target.name);
        } else {
            self.portals.remove(target.name);
        }
        BytesMut::from(&build::acknowledgement(b'3')[..])
    }

    fn portal(&self, name: &str) -> Result<&Prepared, ClientError> {
        self.portals
            .get(name)
            .ok_or_else(|| ExtendedError::NoPortal(name.to_string()).to_client())
    }
}

/// A Parse's text must be one console command and declare no parameters.
fn check_parse(parse: &ParseView<'_>) -> Result<Command, ClientError> {
    if parse.param_types().next().is_some() {
        return Err(ExtendedError::Parameters.to_client());
    }
    let statements = command::statements(parse.sql);
    let [statement] = statements.as_slice() else {
        let error = match statements.get(1) {
            Some(second) => CommandError::SyntaxAt(second.chars().take(63).collect()),
            None => CommandError::SyntaxAtEnd,
        };
        return Err(error.to_client());
    };
    command::parse(statement).map_err(|e| e.to_client())
}
