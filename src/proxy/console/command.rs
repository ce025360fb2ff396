//! The console's commands: parsed from the text of a simple Query, case-insensitively, with an
//! optional trailing semicolon.

use thiserror::Error;

use crate::error::{sqlstate, ClientError};

/// What the console answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pools,
    Clients,
    Servers,
    Stats,
    Help,
}

impl Command {
    /// Every command with what it shows (`SHOW HELP`).
    pub const ALL: [(Command, &'static str, &'static str); 5] = [
        (
            Command::Pools,
            "SHOW POOLS",
            "clients and server connections per (upstream role, database, pool mode)",
        ),
        (
            Command::Clients,
            "SHOW CLIENTS",
            "one row per client session",
        ),
        (
            Command::Servers,
            "SHOW SERVERS",
            "one row per server connection pgward holds",
        ),
        (
            Command::Stats,
            "SHOW STATS",
            "totals per service: transactions, queries, bytes, request and wait times",
        ),
        (Command::Help, "SHOW HELP", "this list"),
    ];

    fn from_item(item: &str) -> Option<Command> {
        Some(match item.to_ascii_lowercase().as_str() {
            "pools" => Command::Pools,
            "clients" => Command::Clients,
            "servers" => Command::Servers,
            "stats" => Command::Stats,
            "help" => Command::Help,
            _ => return None,
        })
    }
}

/// Why a text is not a console command.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("syntax error at or near \"{0}\"")]
    SyntaxAt(String),
    #[error("syntax error at end of input")]
    SyntaxAtEnd,
    #[error("the pgward admin console does not support {0}: SHOW HELP lists its commands")]
    NotSupported(String),
    #[error("unrecognized SHOW item \"{0}\": SHOW HELP lists the console's commands")]
    UnknownItem(String),
}

impl CommandError {
    /// The error the client gets (the session goes on).
    pub fn to_client(&self) -> ClientError {
        let state = match self {
            CommandError::SyntaxAt(_) | CommandError::SyntaxAtEnd => sqlstate::SYNTAX_ERROR,
            CommandError::NotSupported(_) | CommandError::UnknownItem(_) => {
                sqlstate::FEATURE_NOT_SUPPORTED
            }
        };
        ClientError::error(state, self.to_string())
    }
}

/// Longest piece of client text quoted back in an error.
const MAX_QUOTED: usize = 63;

fn quoted(text: &str) -> String {
    text.chars().take(MAX_QUOTED).collect()
}

fn is_word(token: &str) -> bool {
    token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
}

/// The statements of a Query's text, split at semicolons (empty ones dropped).
pub fn statements(text: &str) -> Vec<&str> {
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Parse one statement (without its semicolon).
pub fn parse(statement: &str) -> Result<Command, CommandError> {
    let mut tokens = statement.split_whitespace();
    let Some(verb) = tokens.next() else {
        return Err(CommandError::SyntaxAtEnd);
    };
    if !is_word(verb) {
        return Err(CommandError::SyntaxAt(quoted(verb)));
    }
    if !verb.eq_ignore_ascii_case("show") {
        return Err(CommandError::NotSupported(verb.to_ascii_uppercase()));
    }
    let Some(item) = tokens.next() else {
        return Err(CommandError::SyntaxAtEnd);
    };
    if !is_word(item) {
        return Err(CommandError::SyntaxAt(quoted(item)));
    }
    let command =
        Command::from_item(item).ok_or_else(|| CommandError::UnknownItem(quoted(item)))?;
    match tokens.next() {
        Some(extra) => Err(CommandError::SyntaxAt(quoted(extra))),
        None => Ok(command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_commands_parse_in_any_case_with_an_optional_semicolon() {
        assert_eq!(statements("show pools;"), ["show pools"]);
        assert_eq!(statements(" ; "), Vec::<&str>::new());
        assert_eq!(parse("SHOW POOLS"), Ok(Command::Pools));
        assert_eq!(parse("show\tClients"), Ok(Command::Clients));
        assert_eq!(parse("Show servers"), Ok(Command::Servers));
        assert_eq!(parse("show STATS"), Ok(Command::Stats));
        assert_eq!(parse("show help"), Ok(Command::Help));
    }

    #[test]
    fn everything_else_is_a_typed_error_with_its_sqlstate() {
        let state = |text: &str| parse(text).unwrap_err().to_client().sqlstate;
        assert_eq!(state("SELECT 1"), sqlstate::FEATURE_NOT_SUPPORTED);
        assert_eq!(state("show databases"), sqlstate::FEATURE_NOT_SUPPORTED);
        assert_eq!(state("show"), sqlstate::SYNTAX_ERROR);
        assert_eq!(state("show pools now"), sqlstate::SYNTAX_ERROR);
        assert_eq!(state("'; drop"), sqlstate::SYNTAX_ERROR);
        assert_eq!(state("show 'x'"), sqlstate::SYNTAX_ERROR);
        let long = format!("show pools {}", "x".repeat(500));
        assert!(parse(&long).unwrap_err().to_string().len() < 120);
        assert_eq!(
            parse("pause").unwrap_err(),
            CommandError::NotSupported("PAUSE".into())
        );
    }
}
