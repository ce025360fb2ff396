//! What kind of statement a parsed statement is, as a value: the policy engine decides by it,
//! refusals name it, and audit records carry its command class.
use sqlparser::ast::{CloseCursor, DeclareType, DiscardObject, Statement};

use super::parse::ident_name;

/// The kind of one statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatementKind {
    Select,
    Insert,
    Update,
    Delete,
    Explain,
    Prepare,
    Execute,
    /// COPY … TO (a read).
    CopyTo,
    /// COPY … FROM (a write).
    CopyFrom,
    Declare,
    Set,
    Show,
    /// CREATE TABLE / INDEX, ALTER TABLE, DROP.
    Ddl,
    CreateView,
    CreateFunction,
    Truncate,
    Call,
    Lock,
    Vacuum,
    Analyze,
    GrantRevoke,
    Discard,
    /// Anything else sqlparser parses.
    Other,
}

/// pgAudit's classes of statements, for audit records and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandClass {
    /// SELECT, COPY TO.
    Read,
    /// INSERT, UPDATE, DELETE, TRUNCATE, COPY FROM.
    Write,
    /// CALL and other function execution.
    Function,
    /// GRANT, REVOKE.
    Role,
    /// Schema changes.
    Ddl,
    /// Everything else (SET, SHOW, DISCARD, VACUUM, LOCK, EXPLAIN, PREPARE …).
    Misc,
}

impl StatementKind {
    /// The kind of `st`.
    pub fn of(st: &Statement) -> Self {
        match st {
            Statement::Query(_) => StatementKind::Select,
            Statement::Insert(_) => StatementKind::Insert,
            Statement::Update(_) => StatementKind::Update,
            Statement::Delete(_) => StatementKind::Delete,
            Statement::Explain { .. } => StatementKind::Explain,
            Statement::Prepare { .. } => StatementKind::Prepare,
            Statement::Execute { .. } => StatementKind::Execute,
            Statement::Copy { to: true, .. } => StatementKind::CopyTo,
            Statement::Copy { .. } => StatementKind::CopyFrom,
            Statement::Declare { .. } => StatementKind::Declare,
            Statement::Set(_) => StatementKind::Set,
            Statement::ShowVariable { .. } => StatementKind::Show,
            Statement::CreateTable(_)
            | Statement::CreateIndex(_)
            | Statement::AlterTable(_)
            | Statement::Drop { .. } => StatementKind::Ddl,
            Statement::CreateView(_) => StatementKind::CreateView,
            Statement::CreateFunction(_) => StatementKind::CreateFunction,
            Statement::Truncate(_) => StatementKind::Truncate,
            Statement::Call(_) => StatementKind::Call,
            Statement::Lock(_) => StatementKind::Lock,
            Statement::Vacuum(_) => StatementKind::Vacuum,
            Statement::Analyze(_) => StatementKind::Analyze,
            Statement::Grant(_) | Statement::Revoke(_) => StatementKind::GrantRevoke,
            Statement::Discard { .. } => StatementKind::Discard,
            _ => StatementKind::Other,
        }
    }

    /// The name used in refusal messages and audit records (`SELECT`, `DDL`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "SELECT",
            StatementKind::Insert => "INSERT",
            StatementKind::Update => "UPDATE",
            StatementKind::Delete => "DELETE",
            StatementKind::Explain => "EXPLAIN",
            StatementKind::Prepare => "PREPARE",
            StatementKind::Execute => "EXECUTE",
            StatementKind::CopyTo => "COPY TO",
            StatementKind::CopyFrom => "COPY FROM",
            StatementKind::Declare => "DECLARE",
            StatementKind::Set => "SET",
            StatementKind::Show => "SHOW",
            StatementKind::Ddl => "DDL",
            StatementKind::CreateView => "CREATE VIEW",
            StatementKind::CreateFunction => "CREATE FUNCTION",
            StatementKind::Truncate => "TRUNCATE",
            StatementKind::Call => "CALL",
            StatementKind::Lock => "LOCK",
            StatementKind::Vacuum => "VACUUM",
            StatementKind::Analyze => "ANALYZE",
            StatementKind::GrantRevoke => "GRANT/REVOKE",
            StatementKind::Discard => "DISCARD",
            StatementKind::Other => "this kind of",
        }
    }

    /// Whether the statement changes the schema (the catalog must be reloaded after it).
    pub fn is_ddl(self) -> bool {
        matches!(
            self,
            StatementKind::Ddl | StatementKind::CreateView | StatementKind::CreateFunction
        )
    }

    /// Whether PostgreSQL fixes the result columns of a prepared statement of this kind when
    /// it is prepared: a query's or a data change's (`RETURNING`) columns never change while
    /// the statement lives (a schema change that would change them makes its next execution
    /// fail, "cached plan must not change result type"), while a `FETCH`, `EXECUTE`, `SHOW`
    /// or `EXPLAIN` describes what its cursor, prepared statement or setting is at each run.
    pub fn has_fixed_result(self) -> bool {
        matches!(
            self,
            StatementKind::Select
                | StatementKind::Insert
                | StatementKind::Update
                | StatementKind::Delete
        )
    }
}

/// The two kinds of name a statement can give something for later statements of its session
/// to run: a cursor (`DECLARE`, then `FETCH`, `CLOSE`) and a prepared statement (`PREPARE`,
/// then `EXECUTE`, `DEALLOCATE`). Separate namespaces, as in PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NameKind {
    Cursor,
    Prepared,
}

/// What a statement does with a name of its session, as the server knows the name: a
/// statement that runs one (`FETCH`, `EXECUTE`) touches what the statement that created it
/// names, which only that statement's text shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionName {
    Create(NameKind, String),
    Run(NameKind, String),
    Drop(NameKind, String),
    /// `CLOSE ALL` (cursors), `DEALLOCATE ALL` (prepared statements), `DISCARD ALL` (both:
    /// `None`).
    DropAll(Option<NameKind>),
}

impl SessionName {
    /// The name `st` creates, runs or drops, if any.
    pub fn of(st: &Statement) -> Option<Self> {
        use NameKind::{Cursor, Prepared};
        match st {
            Statement::Declare { stmts, .. } => stmts
                .iter()
                .find(|d| d.declare_type == Some(DeclareType::Cursor) && d.for_query.is_some())
                .and_then(|d| d.names.first())
                .map(|name| SessionName::Create(Cursor, ident_name(name))),
            Statement::Fetch { name, .. } => Some(SessionName::Run(Cursor, ident_name(name))),
            Statement::Close {
                cursor: CloseCursor::Specific { name },
            } => Some(SessionName::Drop(Cursor, ident_name(name))),
            Statement::Close {
                cursor: CloseCursor::All,
            } => Some(SessionName::DropAll(Some(Cursor))),
            Statement::Prepare { name, .. } => {
                Some(SessionName::Create(Prepared, ident_name(name)))
            }
            Statement::Execute {
                name: Some(name), ..
            } => match &name.0[..] {
                [part] => part
                    .as_ident()
                    .map(|id| SessionName::Run(Prepared, ident_name(id))),
                _ => None,
            },
            // `DEALLOCATE ALL` is the keyword only unquoted.
            Statement::Deallocate { name, .. }
                if name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all") =>
            {
                Some(SessionName::DropAll(Some(Prepared)))
            }
            Statement::Deallocate { name, .. } => {
                Some(SessionName::Drop(Prepared, ident_name(name)))
            }
            Statement::Discard {
                object_type: DiscardObject::ALL,
            } => Some(SessionName::DropAll(None)),
            _ => None,
        }
    }
}

impl CommandClass {
    /// The class of `st` (a COPY reads or writes by its direction).
    pub fn of(st: &Statement) -> Self {
        match StatementKind::of(st) {
            StatementKind::Select | StatementKind::Declare | StatementKind::CopyTo => {
                CommandClass::Read
            }
            StatementKind::CopyFrom
            | StatementKind::Insert
            | StatementKind::Update
            | StatementKind::Delete
            | StatementKind::Truncate => CommandClass::Write,
            StatementKind::Call => CommandClass::Function,
            StatementKind::GrantRevoke => CommandClass::Role,
            k if k.is_ddl() => CommandClass::Ddl,
            _ => CommandClass::Misc,
        }
    }

    /// pgAudit's name of the class.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandClass::Read => "READ",
            CommandClass::Write => "WRITE",
            CommandClass::Function => "FUNCTION",
            CommandClass::Role => "ROLE",
            CommandClass::Ddl => "DDL",
            CommandClass::Misc => "MISC",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::parse::parse_statements;

    fn class(sql: &str) -> &'static str {
        CommandClass::of(&parse_statements(sql).unwrap()[0]).as_str()
    }

    fn named(sql: &str) -> Option<SessionName> {
        SessionName::of(&parse_statements(sql).unwrap()[0])
    }

    #[test]
    fn only_queries_and_data_changes_have_results_fixed_at_prepare() {
        let fixed =
            |sql: &str| StatementKind::of(&parse_statements(sql).unwrap()[0]).has_fixed_result();
        for sql in [
            "SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "VALUES (1)",
            "INSERT INTO t VALUES (1) RETURNING *",
            "UPDATE t SET a = 1 RETURNING a",
            "DELETE FROM t RETURNING a",
        ] {
            assert!(fixed(sql), "{sql}");
        }
        // Each describes what its cursor, prepared statement or setting is when it runs.
        for sql in [
            "FETCH 10 FROM c",
            "EXECUTE q(1)",
            "SHOW search_path",
            "EXPLAIN SELECT 1",
            "CALL p()",
        ] {
            assert!(!fixed(sql), "{sql}");
        }
    }

    #[test]
    fn session_names_are_the_names_the_server_knows() {
        use NameKind::{Cursor, Prepared};
        let name = |kind, n: &str| (kind, n.to_string());
        let create = |(k, n)| Some(SessionName::Create(k, n));
        let run = |(k, n)| Some(SessionName::Run(k, n));
        let drop = |(k, n)| Some(SessionName::Drop(k, n));
        let declared = named("DECLARE Big_C NO SCROLL CURSOR WITH HOLD FOR SELECT 1");
        assert_eq!(declared, create(name(Cursor, "big_c")));
        assert_eq!(
            named(r#"FETCH FORWARD 10 FROM "Big_C""#),
            run(name(Cursor, "Big_C"))
        );
        assert_eq!(named("FETCH ALL IN big_c"), run(name(Cursor, "big_c")));
        assert_eq!(named("CLOSE big_c"), drop(name(Cursor, "big_c")));
        assert_eq!(named("CLOSE ALL"), Some(SessionName::DropAll(Some(Cursor))));
        let prepared = named("PREPARE Q (int) AS SELECT $1");
        assert_eq!(prepared, create(name(Prepared, "q")));
        assert_eq!(named("EXECUTE q(1)"), run(name(Prepared, "q")));
        assert_eq!(named("DEALLOCATE PREPARE q"), drop(name(Prepared, "q")));
        assert_eq!(
            named("DEALLOCATE ALL"),
            Some(SessionName::DropAll(Some(Prepared)))
        );
        assert_eq!(named(r#"DEALLOCATE "ALL""#), drop(name(Prepared, "ALL")));
        assert_eq!(named("DISCARD ALL"), Some(SessionName::DropAll(None)));
        assert_eq!(named("DISCARD PLANS"), None);
        assert_eq!(named("SELECT 1"), None);
    }

    #[test]
    fn statements_fall_in_pgaudit_classes() {
        assert_eq!(class("SELECT 1"), "READ");
        assert_eq!(class("COPY t TO STDOUT"), "READ");
        assert_eq!(class("COPY t FROM STDIN"), "WRITE");
        assert_eq!(class("DELETE FROM t"), "WRITE");
        assert_eq!(class("CREATE TABLE t (a int)"), "DDL");
        assert_eq!(class("CREATE VIEW v AS SELECT 1"), "DDL");
        assert_eq!(class("GRANT SELECT ON t TO r"), "ROLE");
        assert_eq!(class("CALL p()"), "FUNCTION");
        assert_eq!(class("SET search_path = x"), "MISC");
    }
}
