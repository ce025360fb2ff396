//! The two session settings under which the server reads SQL text differently from pgward's
//! analysis: `standard_conforming_strings = off` (a backslash then escapes a quote, so
//! `'\' …'` hides text pgward reads as SQL) and a client encoding whose multibyte characters
//! embed ASCII bytes (SJIS, BIG5, GBK, UHC, GB18030, JOHAB: a trailing `\` or `'` byte pgward
//! reads as syntax is part of a character to the server). A session in either state has its
//! statements refused; a statement or startup parameter that would put it there is refused.
use super::lex::{Kind, Tokens};

/// Client encodings whose multibyte characters can hold ASCII bytes (PostgreSQL's
/// client-only encodings), in PostgreSQL's normalised spelling (lower case, letters and
/// digits only) with their aliases.
const ASCII_EMBEDDING_ENCODINGS: [&str; 14] = [
    "sjis",
    "shiftjis",
    "mskanji",
    "win932",
    "windows932",
    "shiftjis2004",
    "big5",
    "win950",
    "windows950",
    "gbk",
    "win936",
    "windows936",
    "uhc",
    "gb18030",
];

/// Whether `encoding` (any spelling PostgreSQL accepts) embeds ASCII bytes in its characters.
pub fn embeds_ascii(encoding: &str) -> bool {
    let normalised: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    ASCII_EMBEDDING_ENCODINGS.contains(&normalised.as_str())
        || normalised == "johab"
        || normalised == "win949"
        || normalised == "windows949"
}

/// Whether a boolean setting's value reads as off (PostgreSQL accepts unique prefixes).
fn is_off(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    matches!(
        v.as_str(),
        "0" | "n" | "no" | "f" | "fa" | "fal" | "fals" | "false" | "of" | "off"
    )
}

/// Whether the server, with setting `name` at `value` (a ParameterStatus or a startup
/// parameter), would read SQL differently from pgward; `None` for any other setting.
pub fn reads_differently(name: &str, value: &str) -> Option<bool> {
    match name.to_ascii_lowercase().as_str() {
        "standard_conforming_strings" => Some(is_off(value)),
        "client_encoding" => Some(embeds_ascii(value)),
        _ => None,
    }
}

/// Whether a statement text may set either setting to a value under which the server reads
/// SQL differently (`SET standard_conforming_strings = off`, `SET NAMES 'SJIS'`,
/// `set_config('client_encoding', 'BIG5', false)` …): the setting's name followed, anywhere
/// later in the text, by such a value. Refused before it runs, since a pipelined statement
/// after it would be read by the server under the new setting before pgward learns of it.
pub fn may_set_unsafely(sql: &str) -> bool {
    // Most statements name neither setting: a byte scan spares them the lexer pass.
    if !mentions_a_setting(sql) {
        return false;
    }
    let mut setting: Option<&str> = None;
    for token in Tokens::from(sql, 0) {
        let text = match token.kind {
            Kind::Word => token.text(sql),
            Kind::Str { .. } => token
                .text(sql)
                .trim_matches(|c| c == '\'' || c == 'E' || c == 'e'),
            Kind::Number { .. } => token.text(sql),
            _ => continue,
        };
        let lower = text.to_ascii_lowercase();
        match lower.as_str() {
            "standard_conforming_strings" => setting = Some("scs"),
            "client_encoding" | "names" => setting = Some("encoding"),
            _ => match setting {
                Some("scs") if is_off(&lower) => return true,
                Some("encoding") if embeds_ascii(&lower) => return true,
                _ => {}
            },
        }
    }
    false
}

/// Whether the text holds, in any case, a word of the settings' names (or `SET NAMES`).
fn mentions_a_setting(sql: &str) -> bool {
    ["conforming", "encoding", "names"].iter().any(|needle| {
        sql.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_change_how_the_server_reads_sql_are_recognised() {
        for sql in [
            "SET standard_conforming_strings = off",
            "set standard_conforming_strings to 'of'",
            "SET SESSION standard_conforming_strings = false",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'big5'",
            "SET client_encoding TO 'Shift_JIS_2004'",
            "SELECT set_config('client_encoding', 'GB18030', false)",
        ] {
            assert!(may_set_unsafely(sql), "{sql}");
        }
        for sql in [
            "SET standard_conforming_strings = on",
            "SHOW standard_conforming_strings",
            "SET client_encoding = 'UTF8'",
            "SET NAMES 'UTF8'",
            "SELECT 'off', 'sjis'",
            "SET application_name = 'off'",
        ] {
            assert!(!may_set_unsafely(sql), "{sql}");
        }
        assert_eq!(
            reads_differently("standard_conforming_strings", "off"),
            Some(true)
        );
        assert_eq!(
            reads_differently("standard_conforming_strings", "on"),
            Some(false)
        );
        assert_eq!(reads_differently("client_encoding", "SJIS"), Some(true));
        assert_eq!(reads_differently("client_encoding", "UTF8"), Some(false));
        assert_eq!(reads_differently("DateStyle", "ISO"), None);
    }
}
