//! What the audit makes of a statement's text, on the one lexer (`sql::lex`):
//!
//! * [`fingerprint`]: a normalised form that groups statements differing only in literal
//!   values, spacing, comments and keyword case (literals become `?`, `$n` parameters stay,
//!   `IN (1, 2, 3)` lists collapse to `in (...)`);
//! * [`redact`]: the statement as sent, with literals replaced by `?` and comments dropped,
//!   which is what the audit log stores unless values may be recorded;
//! * [`without_values`]: a parsed construct, printed for a message without its literals;
//! * [`redacted_sha256`]: the SHA-256 of a redaction, which names a statement's form (the
//!   audit's hash of the rewritten statement) without being a hash of its values;
//! * [`split_statements`]: a simple Query's statements, split where PostgreSQL splits them.
//!
//! The lexer never fails: malformed input (an unterminated string) runs to the end of the
//! text, which is then one literal — erring on the side of never leaking a value.

use super::lex::{Kind, Token, Tokens};

/// Keywords after which `(` is separated by a space (`in (`, `values (`), unlike a
/// function call (`count(`).
const SPACED_BEFORE_PAREN: &[&str] = &[
    "all",
    "and",
    "any",
    "as",
    "by",
    "exists",
    "from",
    "in",
    "into",
    "join",
    "not",
    "on",
    "or",
    "over",
    "returning",
    "select",
    "set",
    "table",
    "then",
    "using",
    "values",
    "when",
    "where",
    "with",
    "else",
    "lateral",
    "union",
    "except",
    "intersect",
    "filter",
    "within",
    "conflict",
];

/// Normalises `sql` so that statements differing only in literal values, whitespace,
/// comments and keyword case share one fingerprint.
pub fn fingerprint(sql: &str) -> String {
    let tokens: Vec<Token> = Tokens::from(sql, 0)
        .filter(|t| !matches!(t.kind, Kind::Space | Kind::Comment { .. }))
        .collect();
    let mut out = String::with_capacity(sql.len());
    let mut prev: Option<(Kind, String)> = None;
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i];
        let raw = &sql[t.start..t.end];
        // A unary minus glued to a number is part of the literal.
        if t.kind == Kind::Punct
            && raw == "-"
            && tokens
                .get(i + 1)
                .is_some_and(|n| matches!(n.kind, Kind::Number { .. }))
            && prev_allows_unary(prev.as_ref())
        {
            i += 1;
            continue;
        }
        if t.kind == Kind::Punct && raw == "(" {
            if let Some(skip) = literal_list_len(sql, &tokens, i) {
                if prev
                    .as_ref()
                    .is_some_and(|(k, s)| *k == Kind::Word && s == "in")
                {
                    push_token(&mut out, prev.as_ref(), Kind::Punct, "(...)");
                    prev = Some((Kind::Punct, ")".to_string()));
                    i += skip;
                    continue;
                }
            }
        }
        let text = match t.kind {
            Kind::Str { .. } | Kind::Number { .. } => "?".to_string(),
            Kind::Word => raw.to_lowercase(),
            _ => raw.to_string(),
        };
        push_token(&mut out, prev.as_ref(), t.kind, &text);
        prev = Some((t.kind, text));
        i += 1;
    }
    out
}

/// A statement's text as the audit records it: redacted, with its fingerprint. Statements that
/// differ only in their literals share both, so what analyses a text once for its shape
/// ([`crate::policy`]'s templates) hands them to every statement of the shape, and the audit
/// lexes none of those again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedactedText {
    pub redacted: std::sync::Arc<str>,
    pub fingerprint: std::sync::Arc<str>,
}

impl RedactedText {
    pub fn of(sql: &str) -> Self {
        let redacted = redact(sql);
        let fingerprint = fingerprint(&redacted).into();
        Self {
            redacted: redacted.into(),
            fingerprint,
        }
    }
}

/// Fingerprints of the redacted texts a session ran before. Statements that differ only in
/// their literals redact alike, so a workload of the simple protocol (a new text per value)
/// lexes each shape for its fingerprint once instead of once per statement.
#[derive(Debug, Default)]
pub struct FingerprintMemo {
    known: std::collections::HashMap<std::sync::Arc<str>, std::sync::Arc<str>>,
}

impl FingerprintMemo {
    /// Shapes kept; past it the memo starts over (a session of ever-new shapes gains nothing).
    const MAX_SHAPES: usize = 256;
    /// Longer texts are fingerprinted each time rather than kept per session.
    const MAX_TEXT: usize = 4096;

    /// `fingerprint(redacted)`, computed once per distinct text.
    pub fn of(&mut self, redacted: &str) -> std::sync::Arc<str> {
        if let Some(known) = self.known.get(redacted) {
            return known.clone();
        }
        let computed: std::sync::Arc<str> = fingerprint(redacted).into();
        if redacted.len() <= Self::MAX_TEXT {
            if self.known.len() >= Self::MAX_SHAPES {
                self.known.clear();
            }
            self.known.insert(redacted.into(), computed.clone());
        }
        computed
    }
}

fn prev_allows_unary(prev: Option<&(Kind, String)>) -> bool {
    match prev {
        None => true,
        Some((Kind::Punct, p)) => p != ")" && p != "]",
        Some((Kind::Word, w)) => SPACED_BEFORE_PAREN.contains(&w.as_str()),
        _ => false,
    }
}

/// If tokens[i] is `(` starting a list of two or more literals/params, how many tokens the
/// list spans (including both parentheses).
fn literal_list_len(sql: &str, tokens: &[Token], i: usize) -> Option<usize> {
    let mut j = i + 1;
    let mut items = 0;
    loop {
        let t = tokens.get(j)?;
        let raw = &sql[t.start..t.end];
        if t.kind == Kind::Punct && raw == "-" {
            j += 1;
            continue;
        }
        if !matches!(t.kind, Kind::Str { .. } | Kind::Number { .. } | Kind::Param) {
            return None;
        }
        items += 1;
        j += 1;
        let sep = tokens.get(j)?;
        match &sql[sep.start..sep.end] {
            "," => j += 1,
            ")" if items >= 2 => return Some(j + 1 - i),
            _ => return None,
        }
    }
}

fn push_token(out: &mut String, prev: Option<&(Kind, String)>, kind: Kind, text: &str) {
    if let Some((pk, pt)) = prev {
        if needs_space(*pk, pt, kind, text) {
            out.push(' ');
        }
    }
    out.push_str(text);
}

fn needs_space(pk: Kind, pt: &str, kind: Kind, text: &str) -> bool {
    if matches!(pt, "(" | "." | "::" | "[") {
        return false;
    }
    if kind == Kind::Punct && matches!(text, "," | ")" | "." | "::" | ";" | "[" | "]") {
        return false;
    }
    if kind == Kind::Punct && text == "(" {
        return match pk {
            Kind::Word => SPACED_BEFORE_PAREN.contains(&pt),
            Kind::QuotedIdent { .. } => false,
            _ => true,
        };
    }
    true
}

/// The statement as sent with every literal replaced by `?` and comments removed (they can
/// carry values too). Spacing and case are kept so the auditor reads what the client wrote.
pub fn redact(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut after_comment = false;
    for t in Tokens::from(sql, 0) {
        match t.kind {
            Kind::Str { .. } | Kind::Number { .. } => out.push('?'),
            // A comment becomes at most one space, merged with the spacing around it.
            Kind::Comment { .. } => {
                if !out.ends_with(|c: char| c.is_whitespace()) && !out.is_empty() {
                    out.push(' ');
                }
            }
            Kind::Space if after_comment && out.ends_with(|c: char| c.is_whitespace()) => {}
            _ => out.push_str(&sql[t.start..t.end]),
        }
        after_comment = matches!(t.kind, Kind::Comment { .. });
    }
    out
}

/// A parsed construct as a message may quote it: printed, with its literals redacted. A
/// refusal names the construct it refused, never the values in it: its message reaches the
/// client, pgward's log and the audit record.
pub fn without_values(node: &impl std::fmt::Display) -> String {
    redact(&node.to_string())
}

/// Hex SHA-256 of the text's redaction ([`redact`]). Never the hash of a text that holds
/// values: an unkeyed hash of `… WHERE ssn = '123-45-6789'` lets anyone who reads it try every
/// candidate value until one hashes alike, so the hash would give away the literal the
/// redaction hid.
pub fn redacted_sha256(sql: &str) -> std::sync::Arc<str> {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(redact(sql).as_bytes())).into()
}

/// The statements of a simple Query's text, in order, as PostgreSQL splits them: at each `;`
/// outside literals, quoted identifiers, comments and parentheses, and — as psql does —
/// not inside the `BEGIN ATOMIC … END` (or `CASE … END`) body of a `CREATE [OR REPLACE]
/// FUNCTION|PROCEDURE`. Each piece is trimmed; pieces holding only spaces and comments
/// (which the server skips) are left out.
pub fn split_statements(sql: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut parens = 0usize;
    let mut blocks = 0usize;
    // The first words of the current statement (lowercased), to spot a routine body.
    let mut lead: Vec<String> = Vec::new();
    let mut has_code = false;
    for t in Tokens::from(sql, 0) {
        let raw = &sql[t.start..t.end];
        match t.kind {
            Kind::Space | Kind::Comment { .. } => continue,
            Kind::Punct if raw == ";" && parens == 0 && blocks == 0 => {
                if has_code {
                    out.push(sql[start..t.start].trim());
                }
                start = t.end;
                lead.clear();
                has_code = false;
                continue;
            }
            Kind::Punct if raw == "(" => parens += 1,
            Kind::Punct if raw == ")" => parens = parens.saturating_sub(1),
            Kind::Word => {
                let word = raw.to_ascii_lowercase();
                if is_routine(&lead) {
                    match word.as_str() {
                        "begin" | "case" => blocks += 1,
                        "end" => blocks = blocks.saturating_sub(1),
                        _ => {}
                    }
                }
                if lead.len() < 4 {
                    lead.push(word);
                }
            }
            _ => {}
        }
        has_code = true;
    }
    if has_code {
        out.push(sql[start..].trim());
    }
    out
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`: its SQL-standard body may hold semicolons.
fn is_routine(lead: &[String]) -> bool {
    let words: Vec<&str> = lead.iter().map(String::as_str).collect();
    matches!(
        words.as_slice(),
        ["create", "function" | "procedure", ..]
            | ["create", "or", "replace", "function" | "procedure", ..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redacted_hash_is_the_same_whatever_the_values() {
        let a = redacted_sha256("SELECT name FROM people WHERE ssn = '123-45-6789' AND id = 4711");
        let b = redacted_sha256("SELECT name FROM people WHERE ssn = '987-65-4321' AND id = 1");
        assert_eq!(
            a, b,
            "a hash that changes with a value is an oracle for that value"
        );
        assert_eq!(
            &*a,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                "SELECT name FROM people WHERE ssn = ? AND id = ?"
            ))
        );
        assert_ne!(
            a,
            redacted_sha256("SELECT name FROM people WHERE id = 4711")
        );
    }

    #[test]
    fn the_memo_gives_the_fingerprint_of_each_text_and_stays_bounded() {
        let mut memo = FingerprintMemo::default();
        for id in 0..1000 {
            let redacted = redact(&format!("SELECT a FROM t WHERE id = {id} AND b = -{id}"));
            assert_eq!(&*memo.of(&redacted), fingerprint(&redacted));
            let other = format!("SELECT a{id} FROM t WHERE id = ?");
            assert_eq!(&*memo.of(&other), fingerprint(&other));
            assert!(memo.known.len() <= FingerprintMemo::MAX_SHAPES);
        }
        let long = format!("SELECT '{}'", "x".repeat(5000));
        assert_eq!(&*memo.of(&long), fingerprint(&long));
        assert!(!memo.known.contains_key(long.as_str()));
    }

    #[test]
    fn statements_split_where_postgres_splits_them() {
        assert_eq!(
            split_statements(
                "SELECT 1; UPDATE t SET a = ';' -- x;\n WHERE b = $$;$$;;  ; SELECT 3"
            ),
            vec![
                "SELECT 1",
                "UPDATE t SET a = ';' -- x;\n WHERE b = $$;$$",
                "SELECT 3"
            ]
        );
        assert_eq!(split_statements("select 1"), vec!["select 1"]);
        assert_eq!(
            split_statements(" ; -- only a comment\n"),
            Vec::<&str>::new()
        );
        assert_eq!(
            split_statements(r#"select "a;b" /* ; */ from t; select E'\';'"#),
            vec![r#"select "a;b" /* ; */ from t"#, r#"select E'\';'"#]
        );
        // A routine's SQL-standard body is one statement, as in psql.
        let body = "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql \
                    BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END";
        assert_eq!(
            split_statements(&format!("{body}; SELECT f()")),
            vec![body, "SELECT f()"]
        );
        // An unterminated literal runs to the end, as the lexer says.
        assert_eq!(
            split_statements("select 1; select 'a;b"),
            vec!["select 1", "select 'a;b"]
        );
    }

    #[test]
    fn literals_whitespace_and_case() {
        assert_eq!(
            fingerprint("SELECT  *\n FROM Orders WHERE id = 42 AND name='bob'"),
            "select * from orders where id = ? and name = ?"
        );
        assert_eq!(
            fingerprint("select * from orders where id=7 and name = 'al''ice'"),
            "select * from orders where id = ? and name = ?"
        );
    }

    #[test]
    fn params_stay_and_numbers_vanish() {
        assert_eq!(
            fingerprint("UPDATE t SET a = $1, b = 1.5e-3, c = -2, d = .5, e = 0x1F WHERE id = $12"),
            "update t set a = $1, b = ?, c = ?, d = ?, e = ? where id = $12"
        );
        // binary minus is an operator, not part of the literal
        assert_eq!(fingerprint("select a-1 from t"), "select a - ? from t");
        // digits inside identifiers are not numbers
        assert_eq!(fingerprint("select c1 from t2"), "select c1 from t2");
    }

    #[test]
    fn quotes_and_prefixed_strings() {
        assert_eq!(
            fingerprint(r#"SELECT "MixedCase", E'it\'s', B'101', X'ff', U&'d\0061t' FROM "T""x""#),
            r#"select "MixedCase", ?, ?, ?, ? from "T""x""#
        );
        // A quote inside a double-quoted identifier does not open a string.
        assert_eq!(
            fingerprint(r#"select "a'b" from t where x = 'y'"#),
            r#"select "a'b" from t where x = ?"#
        );
    }

    #[test]
    fn dollar_quoting() {
        assert_eq!(
            fingerprint("select $$it's; -- not a comment$$, $fn$ body $x$ $fn$ from t"),
            "select ?, ? from t"
        );
        assert_eq!(fingerprint("select $1::int"), "select $1::int");
    }

    #[test]
    fn comments() {
        assert_eq!(
            fingerprint("select /* a /* nested */ 'x' */ 1 -- trailing 'y'\n from t"),
            "select ? from t"
        );
        assert_eq!(fingerprint("select a--b\nfrom t"), "select a from t");
        // PostgreSQL ends a line comment at a carriage return too: what follows is code, and
        // its literals are redacted as such.
        assert_eq!(redact("select 1 -- c\r, 'x'"), "select ? , ?");
    }

    #[test]
    fn in_lists_collapse_and_calls() {
        assert_eq!(
            fingerprint("SELECT count(*) FROM t WHERE id IN (1, 2, 3)"),
            "select count(*) from t where id in (...)"
        );
        assert_eq!(
            fingerprint("SELECT count(*) FROM t WHERE id IN (1,2)"),
            fingerprint("select COUNT(*) from t where id in ( 5 , 6 , 7 , 8 )")
        );
        assert_eq!(
            fingerprint("insert into t (a, b) values (1, 'x')"),
            "insert into t(a, b) values (?, ?)"
        );
    }

    #[test]
    fn unterminated_literal_swallows_rest() {
        assert_eq!(fingerprint("select 'secret"), "select ?");
        assert_eq!(redact("select 'secret"), "select ?");
        assert_eq!(fingerprint("select $a$ secret"), "select ?");
    }

    #[test]
    fn redact_keeps_layout() {
        assert_eq!(
            redact("SELECT ssn FROM people /* 123-45-6789 */ WHERE ssn = '123-45-6789' AND n > 10"),
            "SELECT ssn FROM people WHERE ssn = ? AND n > ?"
        );
        assert_eq!(redact("select $1, $$x$$"), "select $1, ?");
    }

    #[test]
    fn non_ascii_is_safe() {
        assert_eq!(
            fingerprint("select 'é', ñame from tablé"),
            "select ?, ñame from tablé"
        );
    }
}
