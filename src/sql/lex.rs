//! The one SQL lexer: PostgreSQL's lexical rules, as far as pgward needs them.
//!
//! Every reader of raw statement text builds on it: the policy engine's statement shapes
//! (`policy::shape`, strict: it only takes literals it can delimit exactly as the server does),
//! the template scanner over the rewriter's printed output, and the audit's redaction,
//! fingerprint and statement split (`sql::fingerprint`, which must never leak a value).
//!
//! It is a lexer, not a parser, and it never fails: every byte belongs to exactly one token,
//! and what the server would lex differently or reject (an unterminated string, a backslash
//! whose meaning depends on `standard_conforming_strings`, a prefixed or dollar-quoted
//! constant) is still one token, marked so that a strict reader can refuse it while the
//! redaction treats the whole of it as a value. Token boundaries are always on ASCII bytes, so
//! slicing the text at them is valid.

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Space,
    /// `-- …` up to a newline, or a (nested) `/* … */`; `closed: false` runs to the end.
    Comment {
        closed: bool,
    },
    /// A string constant; `closed: false` runs to the end of the text.
    Str {
        form: StrForm,
        closed: bool,
    },
    /// A numeric constant; `decimal`: only digits, one point and an exponent — no `0x`/`0o`/
    /// `0b` prefix or `_` separator, which PostgreSQL 15 lexes as a number and a word.
    Number {
        decimal: bool,
    },
    /// `$1`, `$2`: a bound-parameter placeholder.
    Param,
    Word,
    /// `"…"` (or `U&"…"`); `closed: false` runs to the end.
    QuotedIdent {
        closed: bool,
    },
    /// An operator run (`>=`, `::`), or one byte of punctuation (`(`, `,`, `;`, a lone `$`).
    Punct,
}

/// How a string constant is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrForm {
    /// `'…'` with doubled quotes only and no backslash: it reads the same whatever
    /// `standard_conforming_strings` says.
    Plain,
    /// `'…'` holding a backslash (an escape or not, depending on the session's settings).
    Backslash,
    /// `E''`, `B''`, `X''`, `N''` or `U&''`: its text starts with the prefix.
    Prefixed,
    /// `$$…$$` or `$tag$…$tag$`.
    Dollar,
}

/// One token: its kind and its byte range in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token's text.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        &sql[self.start..self.end]
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

pub fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

fn is_op_char(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-'
            | b'*'
            | b'/'
            | b'<'
            | b'>'
            | b'='
            | b'~'
            | b'!'
            | b'@'
            | b'#'
            | b'%'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
    )
}

/// The tokens of a text from a byte offset on (a token boundary), lexed as they are read: a
/// reader that stops early or looks ahead from one token pays for no more. From offset 0
/// they cover every byte of the text, in order.
#[derive(Clone)]
pub struct Tokens<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Tokens<'a> {
    pub fn from(sql: &'a str, at: usize) -> Self {
        Tokens {
            bytes: sql.as_bytes(),
            at,
        }
    }
}

impl Iterator for Tokens<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let start = self.at;
        if start >= self.bytes.len() {
            return None;
        }
        let (kind, end) = next_token(self.bytes, start);
        debug_assert!(end > start);
        self.at = end;
        Some(Token { kind, start, end })
    }
}

fn next_token(b: &[u8], i: usize) -> (Kind, usize) {
    let c = b[i];
    let next = b.get(i + 1).copied();
    match c {
        _ if is_space(c) => {
            let mut j = i + 1;
            while j < b.len() && is_space(b[j]) {
                j += 1;
            }
            (Kind::Space, j)
        }
        // PostgreSQL ends a line comment at either newline byte.
        b'-' if next == Some(b'-') => {
            let end = b[i..]
                .iter()
                .position(|&x| x == b'\n' || x == b'\r')
                .map_or(b.len(), |p| i + p);
            (Kind::Comment { closed: true }, end)
        }
        b'/' if next == Some(b'*') => {
            let end = block_comment_end(b, i);
            (
                Kind::Comment {
                    closed: end.is_some(),
                },
                end.unwrap_or(b.len()),
            )
        }
        b'\'' => plain_string(b, i),
        b'"' => quoted_ident(b, i),
        b'$' => dollar(b, i),
        b'0'..=b'9' => number(b, i),
        b'.' if next.is_some_and(|n| n.is_ascii_digit()) => number(b, i),
        _ if is_ident_start(c) => word_or_prefixed_literal(b, i),
        b':' if next == Some(b':') => (Kind::Punct, i + 2),
        _ if is_op_char(c) => {
            let mut j = i + 1;
            // An operator stops where a comment starts (`a=-- x` is `=` then a comment).
            while j < b.len()
                && is_op_char(b[j])
                && !(b[j] == b'-' && b.get(j + 1) == Some(&b'-'))
                && !(b[j] == b'/' && b.get(j + 1) == Some(&b'*'))
            {
                j += 1;
            }
            (Kind::Punct, j)
        }
        _ => (Kind::Punct, i + 1),
    }
}

/// End of a block comment opened at `i` (they nest); `None` when it never closes.
fn block_comment_end(b: &[u8], i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut j = i;
    while j + 1 < b.len() {
        if b[j] == b'/' && b[j + 1] == b'*' {
            depth += 1;
            j += 2;
        } else if b[j] == b'*' && b[j + 1] == b'/' {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return Some(j);
            }
        } else {
            j += 1;
        }
    }
    None
}

/// End of a token opened at `i` by the quote `q` (a doubled quote stands for itself); with
/// `backslash`, `\` escapes the next byte (E'' strings). `None`: it never closes.
fn quoted_end(b: &[u8], i: usize, q: u8, backslash: bool) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return Some(j + 1);
        }
        j += 1;
    }
    None
}

/// `'…'`, plain unless it holds a backslash.
fn plain_string(b: &[u8], i: usize) -> (Kind, usize) {
    let end = quoted_end(b, i, b'\'', false);
    let stop = end.unwrap_or(b.len());
    let form = if b[i..stop].contains(&b'\\') {
        StrForm::Backslash
    } else {
        StrForm::Plain
    };
    let closed = end.is_some();
    (Kind::Str { form, closed }, stop)
}

/// A quoted identifier whose opening quote is at `quote`.
fn quoted_ident(b: &[u8], quote: usize) -> (Kind, usize) {
    match quoted_end(b, quote, b'"', false) {
        Some(end) => (Kind::QuotedIdent { closed: true }, end),
        None => (Kind::QuotedIdent { closed: false }, b.len()),
    }
}

/// A prefixed string constant whose opening quote is at `quote`.
fn prefixed_string(b: &[u8], quote: usize, backslash: bool) -> (Kind, usize) {
    let end = quoted_end(b, quote, b'\'', backslash);
    let kind = Kind::Str {
        form: StrForm::Prefixed,
        closed: end.is_some(),
    };
    (kind, end.unwrap_or(b.len()))
}

/// `$1` parameter, `$tag$…$tag$` / `$$…$$` constant, or a lone `$`.
fn dollar(b: &[u8], i: usize) -> (Kind, usize) {
    let mut j = i + 1;
    if b.get(j).is_some_and(u8::is_ascii_digit) {
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        return (Kind::Param, j);
    }
    // A tag is an identifier without `$`.
    if b.get(j).is_some_and(|&c| is_ident_start(c)) {
        while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        return (Kind::Punct, i + 1);
    }
    let tag = &b[i..=j];
    let body = j + 1;
    let end = b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map(|p| body + p + tag.len());
    let kind = Kind::Str {
        form: StrForm::Dollar,
        closed: end.is_some(),
    };
    (kind, end.unwrap_or(b.len()))
}

/// Decimal, `.5`, `1.`, `1e-3`, and (not `decimal`) `0x1F`, `0o17`, `0b101`, `1_000`.
fn number(b: &[u8], i: usize) -> (Kind, usize) {
    if b[i] == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
        let mut j = i + 2;
        while j < b.len() && (b[j].is_ascii_hexdigit() || b[j] == b'_') {
            j += 1;
        }
        return (Kind::Number { decimal: false }, j);
    }
    let mut decimal = true;
    let mut digits = |mut j: usize| {
        while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'_') {
            decimal &= b[j] != b'_';
            j += 1;
        }
        j
    };
    let mut j = digits(i);
    if b.get(j) == Some(&b'.') && b.get(j + 1) != Some(&b'.') {
        j = digits(j + 1);
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        let mut k = j + 1;
        if matches!(b.get(k), Some(b'+' | b'-')) {
            k += 1;
        }
        if b.get(k).is_some_and(u8::is_ascii_digit) {
            j = k;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
        }
    }
    (Kind::Number { decimal }, j)
}

/// A word, or a constant with a letter prefix: E'..', B'..', X'..', N'..', U&'..', U&"..".
fn word_or_prefixed_literal(b: &[u8], i: usize) -> (Kind, usize) {
    let c = b[i].to_ascii_lowercase();
    let next = b.get(i + 1).copied();
    if next == Some(b'\'') {
        match c {
            b'e' => return prefixed_string(b, i + 1, true),
            b'b' | b'x' | b'n' => return prefixed_string(b, i + 1, false),
            _ => {}
        }
    }
    if c == b'u' && next == Some(b'&') {
        match b.get(i + 2) {
            Some(b'\'') => return prefixed_string(b, i + 2, false),
            Some(b'"') => return quoted_ident(b, i + 2),
            _ => {}
        }
    }
    let mut j = i + 1;
    while j < b.len() && is_ident_char(b[j]) {
        j += 1;
    }
    (Kind::Word, j)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(Kind, &str)> {
        Tokens::from(sql, 0)
            .map(|t| (t.kind, t.text(sql)))
            .collect()
    }

    #[test]
    fn constants_are_marked_by_how_exactly_they_delimit() {
        let string = |form, closed| Kind::Str { form, closed };
        for (sql, kind) in [
            ("'a''b'", string(StrForm::Plain, true)),
            ("'é'", string(StrForm::Plain, true)),
            ("'open''", string(StrForm::Plain, false)),
            (r"'a\'", string(StrForm::Backslash, true)),
            (r"'a\", string(StrForm::Backslash, false)),
            (r"E'\''", string(StrForm::Prefixed, true)),
            ("b'01'", string(StrForm::Prefixed, true)),
            ("X'ff'", string(StrForm::Prefixed, true)),
            ("N'n", string(StrForm::Prefixed, false)),
            ("U&'d'", string(StrForm::Prefixed, true)),
            ("$$x$$", string(StrForm::Dollar, true)),
            ("$t$x$t$", string(StrForm::Dollar, true)),
            ("$t$x$", string(StrForm::Dollar, false)),
            ("1.5e-3", Kind::Number { decimal: true }),
            (".5", Kind::Number { decimal: true }),
            ("0x1F", Kind::Number { decimal: false }),
            ("1_000", Kind::Number { decimal: false }),
            ("$12", Kind::Param),
            ("\"a\"\"b\"", Kind::QuotedIdent { closed: true }),
            ("U&\"a\"", Kind::QuotedIdent { closed: true }),
            ("\"open", Kind::QuotedIdent { closed: false }),
            ("/* a /* b */ c */", Kind::Comment { closed: true }),
            ("/* open", Kind::Comment { closed: false }),
        ] {
            assert_eq!(kinds(sql), vec![(kind, sql)], "{sql}");
        }
    }

    #[test]
    fn line_comments_end_at_either_newline_byte() {
        assert_eq!(
            kinds("a--x\rb"),
            vec![
                (Kind::Word, "a"),
                (Kind::Comment { closed: true }, "--x"),
                (Kind::Space, "\r"),
                (Kind::Word, "b"),
            ]
        );
    }

    #[test]
    fn operators_stop_where_a_comment_starts() {
        assert_eq!(
            kinds("a>=-- c\n1"),
            vec![
                (Kind::Word, "a"),
                (Kind::Punct, ">="),
                (Kind::Comment { closed: true }, "-- c"),
                (Kind::Space, "\n"),
                (Kind::Number { decimal: true }, "1"),
            ]
        );
        assert_eq!(kinds("x::int")[1], (Kind::Punct, "::"));
        assert_eq!(kinds("$ 1")[0], (Kind::Punct, "$"));
    }

    proptest::proptest! {
        /// Tokens cover the text without gap or overlap, on character boundaries.
        #[test]
        fn tokens_cover_every_byte(sql in "[ -~é\n\r]{0,80}") {
            let mut at = 0;
            for token in Tokens::from(&sql, 0) {
                proptest::prop_assert_eq!(token.start, at);
                proptest::prop_assert!(token.end > token.start);
                proptest::prop_assert!(sql.is_char_boundary(token.end));
                at = token.end;
            }
            proptest::prop_assert_eq!(at, sql.len());
        }
    }
}
