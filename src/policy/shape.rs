//! Statement shapes: the rewrite cache's key for statements that differ only in literals.
//!
//! In the simple protocol a service sends `... WHERE aid = 4711` and then `... WHERE aid = 815`:
//! two texts, so an exact-text cache misses every time and each statement pays a full parse,
//! rewrite and round-trip check. The engine instead caches by *shape*: the text with each
//! ordinary literal replaced by a placeholder (`... WHERE aid = $1`), and it rewrites that
//! parameterised text, never the values.
//!
//! Why a template made this way is safe for every value of its literals: the rewriter never saw
//! them. It took its decisions (filters, refusals, column checks) on `$1`, exactly as it does
//! for a Parse whose values arrive later in a Bind, so the template is as safe for a literal as
//! the extended protocol already is for a bound value. What remains is making sure a literal
//! put back in a placeholder's place means to the server exactly what the placeholder meant to
//! the rewriter: one constant, nothing more. That is what shaping is strict about, over the
//! tokens of the one lexer (`sql::lex`, which marks every constant by how exactly it
//! delimits) — it only normalises literals it can delimit exactly as PostgreSQL does, in
//! positions where a constant is a value, and gives up (the caller falls back to the
//! exact-text path) on anything else:
//!
//! * only statements that start with `SELECT`, `INSERT`, `UPDATE`, `DELETE`, `WITH`, `VALUES`
//!   or `TABLE` (the rewriter inspects values in `SET client_encoding`, so utility statements
//!   never take this path);
//! * plain `'...'` strings without a backslash (they read the same whatever
//!   `standard_conforming_strings` says, which a bound service cannot change anyway), not
//!   followed by another string (PostgreSQL joins `'a'` newline `'b'` into one constant);
//!   `E''`, `U&''`, `B''`, `X''`, `N''` and dollar quotes make the whole statement fall back;
//! * numbers as PostgreSQL lexes them, with no trailing junk (`0x1F`, `1..2`, `1e`);
//! * only after an operator, `(`, `,`, `[` or a keyword that is followed by a value
//!   (`SELECT`, `WHERE`, `AND`, `LIMIT`, ...). A literal after any other word stays part of the
//!   shape: `DATE '2024-01-01'`, `INTERVAL '1 day'` and `ORDER BY 1` are not plain values;
//! * a text that already has `$n` placeholders is left alone.
//!
//! The engine also checks, when it learns a shape, that the template filled with the first
//! statement's literals is the statement's own exact rewrite, and it never uses a shape in
//! which field encryption seals or blind-indexes a value (those literals must be encrypted one
//! by one); a shape that only reads encrypted columns is a template like any other.

use std::ops::Range;

use crate::sql::lex::{is_ident_char, Kind, StrForm, Token, Tokens};

/// A statement split into its shape and its literals.
#[derive(Debug)]
pub struct Shape<'a> {
    sql: &'a str,
    /// The parameterised text, then a NUL and one letter per literal kind (NUL cannot occur
    /// in a statement, so the two parts cannot be confused).
    key: String,
    parameterized_len: usize,
    literals: Vec<Range<usize>>,
}

impl<'a> Shape<'a> {
    /// The cache key: parameterised text and literal kinds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The statement with `$1`, `$2`, ... in place of its literals: what gets rewritten.
    pub fn parameterized(&self) -> &str {
        &self.key[..self.parameterized_len]
    }

    /// How many literals were taken out.
    pub fn literal_count(&self) -> usize {
        self.literals.len()
    }

    fn literal(&self, index: usize) -> &'a str {
        &self.sql[self.literals[index].clone()]
    }
}

/// Keywords after which a literal is a plain value (matched case-insensitively; runs for
/// every word of every simple-protocol statement).
fn is_value_keyword(word: &str) -> bool {
    let mut lower = [0u8; 9];
    let Some(buf) = lower.get_mut(..word.len()) else {
        return false;
    };
    for (l, c) in buf.iter_mut().zip(word.bytes()) {
        *l = c.to_ascii_lowercase();
    }
    matches!(
        &*buf,
        b"select"
            | b"where"
            | b"and"
            | b"or"
            | b"not"
            | b"like"
            | b"ilike"
            | b"then"
            | b"else"
            | b"when"
            | b"case"
            | b"between"
            | b"returning"
            | b"limit"
            | b"offset"
            | b"having"
            | b"on"
            | b"distinct"
            | b"from"
            | b"for"
    )
}

/// Statements whose literals the rewriter only ever carries along, never inspects.
const SHAPED_STATEMENTS: &[&str] = &[
    "select", "insert", "update", "delete", "with", "values", "table",
];

/// The last significant token before the current position.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// Start of a statement (of the text, or after `;`).
    Start,
    /// A word: whether a literal after it is a plain value.
    Word { admits_value: bool },
    /// A quoted identifier.
    QuotedIdent,
    /// A literal (normalised or kept).
    Literal,
    /// One byte of punctuation or an operator.
    Punct(u8),
}

impl Prev {
    fn admits_literal(self) -> bool {
        match self {
            Prev::Word { admits_value } => admits_value,
            Prev::Punct(c) => b"(,[=<>+-*/%|:!~^&#@".contains(&c),
            Prev::Start | Prev::QuotedIdent | Prev::Literal => false,
        }
    }
}

/// Splits `sql` into its shape and literals, or `None` when the statement must take the
/// exact-text path: it has no literal to take out, or it does not qualify (see the module
/// documentation).
pub fn shape_of(sql: &str) -> Option<Shape<'_>> {
    let b = sql.as_bytes();
    let mut key = String::with_capacity(sql.len() + 8);
    let mut literals = Vec::new();
    let mut copied = 0;
    let mut prev = Prev::Start;
    for token in Tokens::from(sql, 0) {
        let text = token.text(sql);
        match token.kind {
            Kind::Space | Kind::Comment { closed: true } => continue,
            Kind::Comment { closed: false } | Kind::QuotedIdent { closed: false } => return None,
            _ => {}
        }
        if prev == Prev::Start && text != ";" && !is_shaped_statement(&token, text) {
            return None;
        }
        match token.kind {
            Kind::Str {
                form: StrForm::Plain,
                closed: true,
            }
            | Kind::Number { decimal: true } => {
                literal_may_end_here(sql, &token)?;
                if prev.admits_literal() {
                    key.push_str(sql.get(copied..token.start)?);
                    literals.push(token.start..token.end);
                    key.push('$');
                    push_decimal(&mut key, literals.len());
                    copied = token.end;
                }
                prev = Prev::Literal;
            }
            Kind::QuotedIdent { .. } if text.starts_with('"') => prev = Prev::QuotedIdent,
            // A word glued to a quote or `&` starts a constant of a form this path does not take.
            Kind::Word if !matches!(b.get(token.end), Some(b'\'' | b'&')) => {
                prev = Prev::Word {
                    admits_value: is_value_keyword(text),
                }
            }
            Kind::Punct if text == ";" => prev = Prev::Start,
            Kind::Punct if !text.starts_with('$') => prev = Prev::Punct(b[token.end - 1]),
            // `$n` placeholders, dollar quotes, a lone `$`, strings with a backslash or a
            // prefix, unterminated ones, numbers PostgreSQL 15 does not lex as one constant.
            _ => return None,
        }
    }
    if literals.is_empty() {
        return None; // the exact-text cache serves it without a copy
    }
    key.push_str(sql.get(copied..)?);
    let parameterized_len = key.len();
    key.push('\0');
    // A literal's kind is its first byte: a string starts with its quote.
    key.extend(
        literals
            .iter()
            .map(|r| if b[r.start] == b'\'' { 'S' } else { 'N' }),
    );
    Some(Shape {
        sql,
        key,
        parameterized_len,
        literals,
    })
}

/// The first word of a statement is one whose literals the rewriter only carries along.
fn is_shaped_statement(token: &Token, text: &str) -> bool {
    token.kind == Kind::Word
        && SHAPED_STATEMENTS
            .iter()
            .any(|s| text.eq_ignore_ascii_case(s))
}

fn push_decimal(out: &mut String, n: usize) {
    if n < 10 {
        // The common case, without the formatting machinery.
        out.push(char::from(b'0' + n as u8));
    } else {
        use std::fmt::Write as _;
        let _ = write!(out, "{n}");
    }
}

/// What may follow a literal: not an identifier character, `.` or quote glued to
/// it (PostgreSQL would lex that differently, or reject it), and for a string not another
/// string after only whitespace and comments (which PostgreSQL would join into one constant).
fn literal_may_end_here(sql: &str, literal: &Token) -> Option<()> {
    let b = sql.as_bytes();
    if let Some(&next) = b.get(literal.end) {
        if is_ident_char(next) || matches!(next, b'.' | b'\'' | b'"') {
            return None;
        }
    }
    if matches!(literal.kind, Kind::Str { .. }) {
        for next in Tokens::from(sql, literal.end) {
            match next.kind {
                Kind::Space | Kind::Comment { closed: true } => continue,
                Kind::Comment { closed: false } => return None,
                _ => return (b[next.start] != b'\'').then_some(()),
            }
        }
    }
    Some(())
}

/// A rewritten parameterised statement, ready to take a shape's literals.
#[derive(Debug)]
pub struct Template {
    /// Text between placeholders: one more piece than slots.
    pieces: Vec<String>,
    /// The literal (0-based) that goes into each slot.
    slots: Vec<usize>,
}

impl Template {
    /// Finds the placeholders in the rewriter's output (outside strings and quoted
    /// identifiers). `None` when the text has anything this scanner does not expect from
    /// sqlparser's printer: comments, dollar quotes, a placeholder glued to a word, a
    /// placeholder number out of range.
    pub fn from_rewritten(text: &str, literal_count: usize) -> Option<Template> {
        let b = text.as_bytes();
        let glued_to_word = |at: usize| at > 0 && is_ident_char(b[at - 1]);
        let mut pieces = Vec::new();
        let mut slots = Vec::new();
        let mut piece_start = 0;
        for token in Tokens::from(text, 0) {
            match token.kind {
                // The printer writes `'…'` and `E'…'`, never glued to a word.
                Kind::Str {
                    form: StrForm::Plain | StrForm::Backslash,
                    closed: true,
                } if !glued_to_word(token.start) => {}
                Kind::Str {
                    form: StrForm::Prefixed,
                    closed: true,
                } if matches!(b[token.start], b'E' | b'e') && !glued_to_word(token.start) => {}
                Kind::QuotedIdent { closed: true } | Kind::Word | Kind::Space => {}
                Kind::Number { .. } => {}
                Kind::Punct if !token.text(text).starts_with('$') => {}
                Kind::Param => {
                    let n: usize = token.text(text).get(1..)?.parse().ok()?;
                    let glued_before = glued_to_word(token.start)
                        || (token.start > 0 && b[token.start - 1] == b'.');
                    let glued_after = b
                        .get(token.end)
                        .is_some_and(|&c| is_ident_char(c) || c == b'.' || c == b'\'');
                    if n == 0 || n > literal_count || glued_before || glued_after {
                        return None;
                    }
                    pieces.push(text.get(piece_start..token.start)?.to_string());
                    slots.push(n - 1);
                    piece_start = token.end;
                }
                // Comments, dollar quotes, a lone `$`, anything unterminated or unexpected.
                _ => return None,
            }
        }
        pieces.push(text.get(piece_start..)?.to_string());
        Some(Template { pieces, slots })
    }

    /// The template with `shape`'s literals in their places.
    pub fn fill(&self, shape: &Shape<'_>) -> String {
        let literals: usize = self.slots.iter().map(|&s| shape.literals[s].len()).sum();
        let fixed: usize = self.pieces.iter().map(String::len).sum();
        let mut out = String::with_capacity(fixed + literals);
        for (piece, &slot) in self.pieces.iter().zip(&self.slots) {
            out.push_str(piece);
            out.push_str(shape.literal(slot));
        }
        if let Some(last) = self.pieces.last() {
            out.push_str(last);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> Option<(String, Vec<&str>)> {
        shape_of(sql).map(|s| {
            let lits = (0..s.literal_count()).map(|i| s.literal(i)).collect();
            (s.key().to_string(), lits)
        })
    }

    #[test]
    fn ordinary_literals_become_placeholders() {
        let (key, lits) =
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 4711 AND name = 'O''Hara'")
                .unwrap();
        assert_eq!(
            key,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1 AND name = $2\0NS"
        );
        assert_eq!(lits, ["4711", "'O''Hara'"]);
        let (key, lits) =
            shape("insert into t (a, b, c) values (-1, 2.5e-3, 'x'), (.5, 1., 'é')").unwrap();
        assert_eq!(
            key,
            "insert into t (a, b, c) values (-$1, $2, $3), ($4, $5, $6)\0NNSNNS"
        );
        assert_eq!(lits, ["1", "2.5e-3", "'x'", ".5", "1.", "'é'"]);
        let (key, _) = shape("UPDATE t SET a = a + 5 WHERE id IN (1,2) LIMIT 3; SELECT 1").unwrap();
        assert_eq!(
            key,
            "UPDATE t SET a = a + $1 WHERE id IN ($2,$3) LIMIT $4; SELECT $5\0NNNNN"
        );
    }

    #[test]
    fn literals_that_are_not_plain_values_stay_in_the_shape() {
        for sql in [
            "SELECT DATE '2024-01-01'",
            "SELECT now() - INTERVAL '1 day'",
            "SELECT a FROM t ORDER BY 1",
            "SELECT a FROM t GROUP BY 1",
            "SELECT a FROM t FETCH FIRST 5 ROWS ONLY",
            "SELECT \"a\" 'x'",
        ] {
            assert!(
                shape(sql).is_none(),
                "{sql}: no literal is a plain value here"
            );
            let with_value = format!("{sql} LIMIT 1");
            let (key, _) = shape(&with_value).unwrap_or_else(|| panic!("{with_value}"));
            assert_eq!(key, format!("{sql} LIMIT $1\0N"));
        }
        // numeric(10,2) follows `(` and `,`: both are taken, the rewrite of `numeric($1,$2)`
        // does not parse, and the engine falls back to the exact path for that shape.
        assert_eq!(
            shape("SELECT x::numeric(10,2) FROM t").unwrap().1,
            ["10", "2"]
        );
    }

    #[test]
    fn anything_the_lexer_cannot_delimit_like_postgres_falls_back() {
        for sql in [
            r"SELECT 'a\' OR true --'",
            "SELECT E'a'",
            "SELECT e'\\''",
            "SELECT U&'d\\0061t'",
            "SELECT B'0101'",
            "SELECT X'ff'",
            "SELECT N'abc'",
            "SELECT $$x$$",
            "SELECT $tag$x$tag$",
            "SELECT $1",
            "SELECT 'a'\n'b'",
            "SELECT 'a' -- c\n 'b'",
            "SELECT 'a' /* c */ 'b'",
            "SELECT 0x1F",
            "SELECT 1..2",
            "SELECT 1e",
            "SELECT 1abc",
            "SELECT 'a'b",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
            "SELECT /* unterminated",
            "SET statement_timeout = 5",
            "SET client_encoding = 'SJIS'",
            "SELECT 1; SET client_encoding = 'SJIS'",
            "EXPLAIN SELECT 1",
            "(SELECT 1)",
            "COPY t FROM STDIN",
            "PREPARE p AS SELECT 1",
        ] {
            assert!(shape(sql).is_none(), "{sql} was shaped");
        }
    }

    #[test]
    fn comments_and_quoted_identifiers_are_part_of_the_shape() {
        let (key, lits) =
            shape("SELECT /* 'x' /* 1 */ */ \"it's\", 'a' -- 'b'\nFROM t WHERE x = 2").unwrap();
        assert_eq!(
            key,
            "SELECT /* 'x' /* 1 */ */ \"it's\", $1 -- 'b'\nFROM t WHERE x = $2\0SN"
        );
        assert_eq!(lits, ["'a'", "2"]);
    }

    proptest::proptest! {
        /// Whatever the text, shaping never panics, and a shape's parameterised text with its
        /// literals put back is the original text: nothing is lost or moved.
        #[test]
        fn shaping_is_lossless(sql in "(SELECT|select|UPDATE t SET|INSERT INTO t VALUES|SET) [ -~é\n]{0,60}") {
            if let Some(shape) = shape_of(&sql) {
                let text = shape.parameterized();
                let template = Template::from_rewritten(text, shape.literal_count());
                // The printer never writes comments; the scanner refuses them.
                let commented = text.contains("--") || text.contains("/*");
                proptest::prop_assert!(template.is_some() || commented, "{:?}", text);
                if let Some(template) = template {
                    proptest::prop_assert_eq!(template.fill(&shape), sql);
                }
            }
        }

        /// Statements of one shape redact and fingerprint alike, whatever their literals: what
        /// lets a template hand the audit the first statement's redacted text.
        #[test]
        fn statements_of_a_shape_redact_alike(
            sql in "(SELECT|select|UPDATE t SET) [a-z]{1,3} ?(=|<|,|\\() ?([0-9]{1,3}|'[a-z]{0,3}')[ -~é\n\r]{0,50}",
            number in "[0-9]{1,4}(\\.[0-9]{1,3})?",
            string in "[a-z ';-]{0,6}",
        ) {
            let Some(shape) = shape_of(&sql) else {
                return Ok(());
            };
            let string = format!("'{}'", string.replace('\'', "''"));
            let mut other = String::new();
            let mut copied = 0;
            for range in &shape.literals {
                other.push_str(&sql[copied..range.start]);
                let is_string = sql.as_bytes()[range.start] == b'\'';
                other.push_str(if is_string { &string } else { &number });
                copied = range.end;
            }
            other.push_str(&sql[copied..]);
            let Some(other_shape) = shape_of(&other) else {
                return Ok(());
            };
            if other_shape.key() != shape.key() {
                return Ok(());
            }
            proptest::prop_assert_eq!(
                crate::sql::fingerprint::RedactedText::of(&sql),
                crate::sql::fingerprint::RedactedText::of(&other),
                "{:?} vs {:?}", sql, other
            );
        }
    }

    #[test]
    fn templates_put_literals_back_only_at_placeholders() {
        let sql = "SELECT a FROM t WHERE id = 7 AND name = 'x'";
        let s = shape_of(sql).unwrap();
        let printed = "SELECT a FROM (SELECT a FROM t WHERE tenant = '$1' AND id = $1 OFFSET 0) AS t WHERE id = $1 AND name = $2 AND E'\\'$2' = \"$1\"";
        let t = Template::from_rewritten(printed, s.literal_count()).unwrap();
        assert_eq!(
            t.fill(&s),
            "SELECT a FROM (SELECT a FROM t WHERE tenant = '$1' AND id = 7 OFFSET 0) AS t WHERE id = 7 AND name = 'x' AND E'\\'$2' = \"$1\""
        );
        for bad in [
            "SELECT $3",
            "SELECT $0",
            "SELECT 1.$1",
            "SELECT $1a",
            "SELECT 1 -- $1",
            "SELECT x'$1'",
        ] {
            assert!(Template::from_rewritten(bad, 2).is_none(), "{bad}");
        }
        // `a$1` is an identifier, not a placeholder.
        let t = Template::from_rewritten("SELECT a$1, $1 FROM t", 1).unwrap();
        assert_eq!(t.fill(&s), "SELECT a$1, 7 FROM t");
    }
}
