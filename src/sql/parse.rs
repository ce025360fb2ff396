//! Parsing and small SQL helpers shared by the policy engine and field encryption: parsing
//! fragments, name normalization, quoting, and the literal sanitizer that makes sqlparser's Display faithful.
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, Value,
    ValueWithSpan, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

/// Parses `sql` as PostgreSQL would, or fails: syntax sqlparser would read differently from
/// the server (`U&"…"` identifiers) is an error, and the bare `TABLE name` form, which sqlparser
/// lacks, is read as the `SELECT * FROM name` PostgreSQL defines it to be.
pub fn parse_statements(sql: &str) -> Result<Vec<Statement>, ParserError> {
    if let Some(why) = super::depth::too_deep(sql) {
        return Err(ParserError::ParserError(why));
    }
    if let Some(what) = super::unsupported::misread_construct(sql) {
        return Err(ParserError::ParserError(what.to_string()));
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => Ok(statements),
        Err(e) => match super::unsupported::table_statement_as_select(sql) {
            Some(select) => Parser::parse_sql(&PostgreSqlDialect {}, &select).map_err(|_| e),
            None => Err(e),
        },
    }
}

/// A parser error as it may be shown to a client, logged and audited: the token the parser
/// stopped at is redacted when it is a literal (`found: 'secret'` → `found: ?`, any quoting:
/// `N''`, `E''`, `U&''`, dollar quotes, numbers), so no value reaches a message.
pub fn describe_parse_error(error: &ParserError) -> String {
    let text = error.to_string();
    let Some(start) = text.find("found: ").map(|i| i + "found: ".len()) else {
        return super::fingerprint::redact(&text);
    };
    let end = text[start..]
        .rfind(" at Line")
        .map_or(text.len(), |i| start + i);
    format!(
        "{}{}{}",
        &text[..start],
        super::fingerprint::redact(&text[start..end]),
        &text[end..]
    )
}

pub fn parse_expr(sql: &str) -> Result<Expr, ParserError> {
    let mut parser = Parser::new(&PostgreSqlDialect {}).try_with_sql(sql)?;
    let expr = parser.parse_expr()?;
    // Trailing garbage means the fragment was not one expression.
    if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
        return Err(ParserError::ParserError(format!(
            "unexpected text after expression in {sql:?}"
        )));
    }
    Ok(expr)
}

pub fn parse_query(sql: &str) -> Result<Box<Query>, ParserError> {
    let mut parser = Parser::new(&PostgreSqlDialect {}).try_with_sql(sql)?;
    parser.parse_query()
}

/// Parses `sql` as a FROM item (e.g. `(SELECT ...) AS x`).
pub fn parse_table_factor(sql: &str) -> Result<TableFactor, ParserError> {
    let q = parse_query(&format!("SELECT 1 FROM {sql}"))?;
    match *q.body {
        SetExpr::Select(mut s) if s.from.len() == 1 => Ok(s.from.remove(0).relation),
        _ => Err(ParserError::ParserError(
            "generated FROM item did not parse".into(),
        )),
    }
}

/// The name PostgreSQL sees. It must match the server exactly, or a reference we consider a
/// CTE (or a harmless column) could be a protected table (or a hidden column) to the server:
/// unquoted identifiers fold ASCII letters only (like `downcase_identifier` with a multibyte
/// server encoding), and every identifier is truncated to NAMEDATALEN-1 = 63 bytes.
pub fn ident_name(id: &Ident) -> String {
    let folded = match id.quote_style {
        None => id.value.to_ascii_lowercase(),
        Some(_) => id.value.clone(),
    };
    truncate_identifier(folded)
}

fn truncate_identifier(mut s: String) -> String {
    const MAX: usize = 63;
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Normalized parts of an object name; `None` for dialect-specific function parts.
pub fn object_name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(ident_name(id)),
            _ => None,
        })
        .collect()
}

/// Always-quoted identifier for names taken from the catalog.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal PostgreSQL reads back exactly, whatever `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Defense in depth against Display infidelity: the text we forward must parse back into a
/// statement that displays as exactly the same text. If sqlparser's printer ever emitted
/// something its own lexer (and so very likely PostgreSQL's) reads differently — a comment
/// opener, a quote that ends early — the texts differ and the statement is refused.
pub fn round_trips(text: &str) -> bool {
    match parse_statements(text) {
        Ok(mut v) if v.len() == 1 => sanitize(&mut v[0]).is_ok() && v[0].to_string() == text,
        _ => false,
    }
}

/// Same for an expression fragment.
pub fn expr_round_trips(text: &str) -> bool {
    parse_expr(text).is_ok_and(|e| e.to_string() == text)
}

/// Why a statement is refused by the sanitizer.
#[derive(Debug)]
pub struct Unsafe(pub String);

/// sqlparser's Display does not escape single-quoted strings or quoted identifiers faithfully
/// (a value containing `\'` or an already doubled quote prints as something PostgreSQL reads
/// differently), which would let a crafted literal end early in the text we forward. This pass
/// runs on every parsed statement before anything is displayed: string literals that contain a
/// quote or backslash become `E'...'` literals (whose Display escapes both), exotic literal
/// kinds are refused, identifiers containing `"` are refused.
pub fn sanitize(stmt: &mut Statement) -> Result<(), Unsafe> {
    if inserts_into_only(stmt) {
        // sqlparser reads `INSERT INTO ONLY t` as a table named ONLY aliased t, so the
        // statement's real target would go unseen (a value for an encrypted column in clear).
        return Err(Unsafe(
            "INSERT INTO ONLY (PostgreSQL does not accept it either)".into(),
        ));
    }
    let mut s = Sanitizer;
    match stmt.visit(&mut s) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(e) => Err(e),
    }
}

/// Whether `stmt` is an INSERT whose target sqlparser read as a table named `ONLY`.
fn inserts_into_only(stmt: &Statement) -> bool {
    let Statement::Insert(insert) = stmt else {
        return false;
    };
    let sqlparser::ast::TableObject::TableName(name) = &insert.table else {
        return false;
    };
    matches!(
        name.0.as_slice(),
        [sqlparser::ast::ObjectNamePart::Identifier(id)]
            if id.quote_style.is_none() && id.value.eq_ignore_ascii_case("only")
    )
}

struct Sanitizer;

impl VisitorMut for Sanitizer {
    type Break = Unsafe;

    fn pre_visit_value(&mut self, v: &mut ValueWithSpan) -> ControlFlow<Unsafe> {
        let replacement = match &v.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                if s.contains('\0') {
                    return ControlFlow::Break(Unsafe("NUL in string literal".into()));
                }
                if s.contains('\'') || s.contains('\\') {
                    Some(Value::EscapedStringLiteral(s.clone()))
                } else {
                    Some(Value::SingleQuotedString(s.clone()))
                }
            }
            Value::DollarQuotedString(d) => {
                Some(if d.value.contains('\'') || d.value.contains('\\') {
                    Value::EscapedStringLiteral(d.value.clone())
                } else {
                    Value::SingleQuotedString(d.value.clone())
                })
            }
            Value::Number(..) | Value::Boolean(_) | Value::Null | Value::Placeholder(_) => None,
            other => {
                return ControlFlow::Break(Unsafe(format!(
                    "unsupported literal {}",
                    super::fingerprint::without_values(other)
                )))
            }
        };
        if let Some(r) = replacement {
            v.value = r;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, id: &mut Ident) -> ControlFlow<Unsafe> {
        match id.quote_style {
            None if !id.value.contains('"') => ControlFlow::Continue(()),
            Some('"') if !id.value.contains('"') && !id.value.contains('\0') => {
                ControlFlow::Continue(())
            }
            // Never the identifier's text: a string literal parsed in a name's place
            // (`SET NAMES 'x'`) would carry a value into the refusal, the log and the audit.
            _ => ControlFlow::Break(Unsafe(match id.quote_style {
                Some(q) if q != '"' => format!("an identifier quoted with {q}"),
                _ => "an identifier holding a double quote or NUL".to_string(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_into_only_is_refused_not_read_as_a_table_named_only() {
        let mut statements =
            parse_statements("INSERT INTO ONLY customers (email) VALUES ('x')").unwrap();
        assert!(sanitize(&mut statements[0]).is_err());
        let mut quoted = parse_statements("INSERT INTO \"only\" (a) VALUES (1)").unwrap();
        assert!(
            sanitize(&mut quoted[0]).is_ok(),
            "a table really named only"
        );
    }

    #[test]
    fn a_refused_identifier_is_never_quoted_back() {
        for sql in [
            "SET NAMES 'secret-value'",
            "SET ROLE 'secret-value'",
            "SET SESSION AUTHORIZATION 'secret-value'",
        ] {
            let mut statements = parse_statements(sql).unwrap();
            let Err(Unsafe(why)) = sanitize(&mut statements[0]) else {
                panic!("{sql}: the string in a name's place passed");
            };
            assert!(!why.contains("secret"), "{sql}: {why}");
        }
    }

    #[test]
    fn parse_errors_never_carry_the_literal_they_stopped_at() {
        for sql in [
            "SELECT a b 'secret-value'",
            "SELECT a b N'secret-value'",
            "SELECT a b E'secret-value'",
            "SELECT a b U&'secret-value'",
            "SELECT a b $q$secret-value$q$",
            "SELECT a b 4111111111111111",
        ] {
            let error = parse_statements(sql).unwrap_err();
            // sqlparser itself names the token, value included.
            assert!(
                error.to_string().contains("secret") || error.to_string().contains("4111"),
                "{sql}: {error}"
            );
            let message = describe_parse_error(&error);
            assert!(
                !message.contains("secret") && !message.contains("4111"),
                "{sql}: {message}"
            );
            assert!(message.contains("found: "), "{sql}: {message}");
        }
    }

    #[test]
    fn sanitized_literals_round_trip() {
        for lit in [
            r"'\''' || 'x'",
            "'a''b'",
            r"E'\\'' , 1 --'",
            "$$it's$$",
            "'plain'",
            r"'\'",
        ] {
            let sql = format!("SELECT {lit}");
            let mut st = parse_statements(&sql).unwrap();
            sanitize(&mut st[0]).unwrap();
            let once = st[0].to_string();
            let mut again = parse_statements(&once).unwrap();
            sanitize(&mut again[0]).unwrap();
            assert_eq!(once, again[0].to_string(), "{lit}");
        }
    }

    #[test]
    fn identifiers_fold_like_postgres() {
        assert_eq!(ident_name(&Ident::new("CUSTÖMERS")), "custÖmers");
        assert_eq!(
            ident_name(&Ident::with_quote('"', "Customers")),
            "Customers"
        );
        let long = "a".repeat(70);
        assert_eq!(ident_name(&Ident::new(long)).len(), 63);
        let multibyte = format!("{}é", "a".repeat(62));
        assert_eq!(ident_name(&Ident::new(multibyte)), "a".repeat(62));
    }

    #[test]
    fn round_trip_guard() {
        assert!(round_trips("SELECT 1 - -1"));
        assert!(!round_trips("SELECT --1\n1"));
        assert!(!round_trips("SELECT 1; SELECT 2"));
        assert!(!round_trips("select 1"), "not in printer form");
    }

    #[test]
    fn quote_literal_escapes() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\\'b'");
    }
}
