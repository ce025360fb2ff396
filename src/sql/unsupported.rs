//! PostgreSQL syntax that sqlparser cannot read, or reads differently from the server, named in
//! plain words so a refusal tells the developer what to change instead of quoting the parser.
//!
//! Works on tokens (never on the text of a literal, so no value can reach a message), and
//! rewrites nothing except `TABLE name`, which PostgreSQL defines as `SELECT * FROM name`.
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::ParserError;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

/// The significant tokens of `sql` (no whitespace or comments); `None` if it does not lex.
fn tokens(sql: &str) -> Option<Vec<TokenWithSpan>> {
    let all = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    Some(
        all.into_iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .collect(),
    )
}

fn is_keyword(t: &Token, word: &str) -> bool {
    matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// Directly adjacent on one line (no whitespace between), as `U&"…"` must be.
fn adjacent(a: &TokenWithSpan, b: &TokenWithSpan) -> bool {
    a.span.end == b.span.start
}

/// Syntax sqlparser parses *into something else* than PostgreSQL does. Checked before parsing:
/// such a statement must be refused even though it parses.
pub fn misread_construct(sql: &str) -> Option<&'static str> {
    if !sql.contains('&') {
        return None;
    }
    let toks = tokens(sql)?;
    toks.windows(3).find_map(|w| {
        let unicode_ident = is_keyword(&w[0].token, "u")
            && matches!(w[1].token, Token::Ampersand)
            && matches!(&w[2].token, Token::Word(word) if word.quote_style == Some('"'))
            && adjacent(&w[0], &w[1])
            && adjacent(&w[1], &w[2]);
        // sqlparser reads U&"d\0061t" as the column U bitwise-and the column "d\0061t".
        unicode_ident.then_some(
            "Unicode-escaped identifiers (U&\"…\"); write the identifier in plain double quotes",
        )
    })
}

/// A plain-words name for the construct that made `sql` unparsable, when pgward knows it.
pub fn unparsable_construct(sql: &str) -> Option<&'static str> {
    let toks = tokens(sql)?;
    let t: Vec<&Token> = toks.iter().map(|t| &t.token).collect();
    if t.first().is_some_and(|f| is_keyword(f, "move")) {
        return Some("MOVE (cursor positioning); use FETCH");
    }
    if t.first().is_some_and(|f| is_keyword(f, "table")) {
        return Some("TABLE with further clauses; write SELECT * FROM");
    }
    for w in t.windows(3) {
        if is_keyword(w[0], "current") && is_keyword(w[1], "of") {
            return Some("WHERE CURRENT OF (positioned UPDATE/DELETE through a cursor)");
        }
        if is_keyword(w[0], "rows") && is_keyword(w[1], "from") && matches!(w[2], Token::LParen) {
            return Some("ROWS FROM (…) in FROM");
        }
        if matches!(w[0], Token::RParen)
            && matches!(w[1], Token::Period)
            && matches!(w[2], Token::Mul)
        {
            return Some("(composite).* field expansion; name the fields");
        }
        if [
            "current_user",
            "session_user",
            "current_role",
            "user",
            "current_catalog",
        ]
        .iter()
        .any(|k| is_keyword(w[0], k))
            && matches!(w[1], Token::LParen)
        {
            return Some(
                "current_user() with parentheses (PostgreSQL also rejects it); write current_user",
            );
        }
    }
    for w in t.windows(2) {
        if matches!(w[0], Token::Mul)
            && matches!(
                w[1],
                Token::Eq | Token::Neq | Token::Lt | Token::LtEq | Token::Gt | Token::GtEq
            )
        {
            return Some("record image comparison operators (*=, *<>, *<, *>…)");
        }
    }
    None
}

/// `TABLE name;` → `SELECT * FROM name` (PostgreSQL's own definition of the form), or `None`.
/// Only the bare form: any further clause is left to the refusal.
pub fn table_statement_as_select(sql: &str) -> Option<String> {
    let toks = tokens(sql)?;
    let mut t: Vec<&Token> = toks.iter().map(|t| &t.token).collect();
    while matches!(t.last(), Some(Token::SemiColon | Token::EOF)) {
        t.pop();
    }
    let (first, rest) = t.split_first()?;
    if !is_keyword(first, "table") || rest.is_empty() || rest.len() % 2 == 0 {
        return None;
    }
    // name parts separated by dots: w (. w)*
    let mut name = String::new();
    for (i, tok) in rest.iter().enumerate() {
        match (i % 2, tok) {
            (0, Token::Word(w)) if w.quote_style.is_none() || w.quote_style == Some('"') => {
                if w.quote_style.is_none() && w.keyword != sqlparser::keywords::Keyword::NoKeyword {
                    // ONLY, LATERAL… are not names
                    if is_keyword(tok, "only") {
                        return None;
                    }
                }
                name.push_str(&tok.to_string());
            }
            (1, Token::Period) => name.push('.'),
            _ => return None,
        }
    }
    Some(format!("SELECT * FROM {name}"))
}

/// The message of a statement pgward cannot parse: the construct in plain words when known,
/// else where the parser stopped (line and column only: the token could be a literal).
pub fn describe_unparsable(sql: &str, error: &ParserError) -> String {
    if let Some(why) = super::depth::too_deep(sql) {
        return why;
    }
    if let Some(what) = misread_construct(sql).or_else(|| unparsable_construct(sql)) {
        return format!("{what} is not supported by pgward's SQL parser");
    }
    let text = error.to_string();
    match text.rfind(" at Line: ") {
        Some(i) => format!(
            "pgward's SQL parser does not understand the statement at {}",
            text[i + " at ".len()..]
                .to_ascii_lowercase()
                .replace(": ", " ")
        ),
        None => "pgward's SQL parser does not understand the statement".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_identifiers_are_caught_before_parsing() {
        assert!(misread_construct("SELECT U&\"d\\0061t\" FROM t").is_some());
        assert!(misread_construct("SELECT u&\"x\" FROM t").is_some());
        assert!(misread_construct("SELECT u & \"x\" FROM t").is_none());
        assert!(misread_construct("SELECT 'U&\"x\"' FROM t").is_none());
        assert!(misread_construct("SELECT a & b FROM t").is_none());
    }

    #[test]
    fn constructs_are_named() {
        for (sql, needle) in [
            ("MOVE NEXT FROM c", "MOVE"),
            ("UPDATE t SET a = 1 WHERE CURRENT OF c", "CURRENT OF"),
            (
                "SELECT * FROM ROWS FROM (generate_series(1,2)) AS x",
                "ROWS FROM",
            ),
            ("SELECT (c).* FROM t", "(composite).*"),
            ("SELECT current_user()", "current_user()"),
            ("SELECT a *<> b FROM t", "record image"),
            ("TABLE t ORDER BY 1", "TABLE"),
        ] {
            let e = crate::sql::parse::parse_statements(sql).expect_err(sql);
            let m = describe_unparsable(sql, &e);
            assert!(m.contains(needle), "{sql}: {m}");
            assert!(!m.contains("Expected"), "{sql}: {m}");
        }
        let sql = "SELECT id FROM t WHERE name = 'a' 'secret'";
        let e = crate::sql::parse::parse_statements(sql).expect_err(sql);
        let m = describe_unparsable(sql, &e);
        assert!(m.contains("line 1, column"), "{m}");
        assert!(!m.contains("secret") && !m.contains("Expected"), "{m}");
    }

    #[test]
    fn bare_table_statement_becomes_select_star() {
        assert_eq!(
            table_statement_as_select("TABLE customers;").as_deref(),
            Some("SELECT * FROM customers")
        );
        assert_eq!(
            table_statement_as_select("table public.\"Odd\"").as_deref(),
            Some("SELECT * FROM public.\"Odd\"")
        );
        for sql in [
            "TABLE ONLY customers",
            "TABLE customers ORDER BY 1",
            "TABLE",
            "SELECT 1",
            "TABLE a.",
        ] {
            assert!(table_statement_as_select(sql).is_none(), "{sql}");
        }
    }
}
