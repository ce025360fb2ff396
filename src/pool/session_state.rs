//! Statements that would leave session state on a shared server connection, refused in
//! transaction pooling mode.
//!
//! In transaction mode the next transaction of a client may run on another server connection,
//! and the next transaction on this one may belong to another client (of another tenant). State
//! a statement leaves on the connection beyond its transaction would be lost for its client and
//! leak into someone else's session, so such statements are refused (SQLSTATE 0A000) rather
//! than pinning the connection: pinning would let one client hold a slot of a small pool for
//! its whole session.
//!
//! The check is lexical (first words of each statement, as PostgreSQL splits a Query, and the
//! names of session-level advisory-lock functions anywhere in the text); it errs towards
//! refusing.

use crate::sql::fingerprint::split_statements;

/// The construct a statement uses that cannot survive transaction pooling, if any.
pub fn refused_construct(sql: &str) -> Option<&'static str> {
    for statement in split_statements(sql) {
        let text = strip_comments(statement).to_ascii_lowercase();
        let words: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
            .filter(|w| !w.is_empty())
            .take(4)
            .collect();
        if let Some(construct) = by_leading_words(&words) {
            return Some(construct);
        }
        let squeezed = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if words.first() == Some(&"declare") && squeezed.contains("with hold") {
            return Some("cursors WITH HOLD");
        }
        if text.contains("advisory_lock") {
            // pg_advisory_lock, pg_try_advisory_lock and their _shared forms (the
            // transaction-level pg_advisory_xact_lock family is fine).
            return Some(
                "session-level advisory locks (pg_advisory_lock; use pg_advisory_xact_lock)",
            );
        }
    }
    None
}

fn by_leading_words(words: &[&str]) -> Option<&'static str> {
    let first = *words.first()?;
    let second = words.get(1).copied().unwrap_or("");
    match first {
        "set" if !matches!(second, "local" | "transaction" | "constraints") => {
            Some("SET of a session setting (use SET LOCAL inside a transaction)")
        }
        "listen" => Some("LISTEN"),
        "prepare" => {
            Some("PREPARE (SQL prepared statements; use protocol-level prepared statements)")
        }
        "execute" => Some("EXECUTE of a SQL prepared statement"),
        "discard" => Some("DISCARD"),
        "load" => Some("LOAD"),
        "deallocate" => Some("DEALLOCATE together with other statements"),
        "create" if is_temp_create(words) => Some("temporary tables"),
        _ => None,
    }
}

fn is_temp_create(words: &[&str]) -> bool {
    let second = words.get(1).copied().unwrap_or("");
    let third = words.get(2).copied().unwrap_or("");
    matches!(second, "temp" | "temporary")
        || (matches!(second, "local" | "global") && matches!(third, "temp" | "temporary"))
}

/// The statement without leading/embedded `--` and `/* */` comments (outside literals is not
/// distinguished: a comment marker inside a string only makes the check stricter).
fn strip_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, tail)| tail);
            out.push(' ');
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, tail)| tail);
            out.push(' ');
        } else {
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                out.push(c);
            }
            rest = chars.as_str();
        }
    }
    out
}

/// What a simple Query deallocates: `Some(None)` for every statement (`DEALLOCATE ALL`, or
/// `DISCARD ALL`), `Some(Some(name))` for one, `None` for anything else. Every Query passes
/// here (the session's registry, the pool's statement map): only a text that names one of
/// the words is lexed.
pub fn deallocation(sql: &str) -> Option<Option<String>> {
    let (discard, deallocate) = mentions_deallocation_words(sql.as_bytes());
    if discard && is_discard_all(sql) {
        return Some(None);
    }
    if !deallocate {
        return None;
    }
    deallocate_target(sql)
}

/// Whether the text holds `discard`, `deallocate` (any case). Both start with a `d`: only
/// where one is does the scan compare, so a Query costs a pass of `memchr` over its text.
fn mentions_deallocation_words(sql: &[u8]) -> (bool, bool) {
    let at = |i: usize, word: &[u8]| {
        sql.get(i..i + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    let (mut discard, mut deallocate) = (false, false);
    for i in memchr::memchr2_iter(b'd', b'D', sql) {
        discard |= at(i, b"discard");
        deallocate |= at(i, b"deallocate");
    }
    (discard, deallocate)
}

/// What `DEALLOCATE` names: `Some(None)` for ALL, `Some(Some(name))` for one statement;
/// `None` when the text is not a single DEALLOCATE.
fn deallocate_target(sql: &str) -> Option<Option<String>> {
    let statements = split_statements(sql);
    let [statement] = statements.as_slice() else {
        return None;
    };
    let text = strip_comments(statement);
    let trimmed = text.trim().trim_end_matches(';').trim();
    let mut words = trimmed.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if words.next().is_some() {
        return None;
    }
    if name.eq_ignore_ascii_case("all") {
        return Some(None);
    }
    let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    };
    Some(Some(name))
}

/// Whether the text is a single `DISCARD ALL`, which deallocates every prepared statement of
/// the session too (`DISCARD PLANS` does not).
fn is_discard_all(sql: &str) -> bool {
    let statements = split_statements(sql);
    let [statement] = statements.as_slice() else {
        return false;
    };
    let text = strip_comments(statement);
    let mut words = text.trim().trim_end_matches(';').split_whitespace();
    matches!(
        (words.next(), words.next(), words.next()),
        (Some(verb), Some(all), None)
            if verb.eq_ignore_ascii_case("discard") && all.eq_ignore_ascii_case("all")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_state_is_refused_and_transaction_state_is_not() {
        for sql in [
            "SET search_path = x",
            "set session statement_timeout = 5",
            "select 1; SET work_mem = '1MB'",
            "LISTEN jobs",
            "/* hi */ create temp table t (a int)",
            "CREATE LOCAL TEMPORARY TABLE t (a int)",
            "select pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(7)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "DISCARD TEMP",
        ] {
            assert!(refused_construct(sql).is_some(), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "set transaction isolation level serializable",
            "SELECT pg_advisory_xact_lock(1)",
            "BEGIN; UPDATE t SET a = 1; COMMIT",
            "DECLARE c CURSOR FOR SELECT 1",
            "create table t (a int)",
            "-- SET x\nSELECT 1",
        ] {
            assert_eq!(refused_construct(sql), None, "{sql}");
        }
    }

    #[test]
    fn deallocate_names_its_statement() {
        assert_eq!(deallocate_target("DEALLOCATE ALL"), Some(None));
        assert_eq!(
            deallocate_target("deallocate prepare S1"),
            Some(Some("s1".into()))
        );
        assert_eq!(
            deallocate_target("DEALLOCATE \"S1\";"),
            Some(Some("S1".into()))
        );
        assert_eq!(deallocate_target("SELECT 1"), None);
        assert_eq!(deallocate_target("DEALLOCATE a; SELECT 1"), None);
    }

    #[test]
    fn every_case_of_the_words_is_found_and_only_those() {
        assert_eq!(deallocation("DeAlLoCaTe ALL"), Some(None));
        assert_eq!(
            deallocation("/* d */ dEALLOCATE s1"),
            Some(Some("s1".into()))
        );
        assert_eq!(deallocation("DISCARD ALL"), Some(None));
        assert_eq!(deallocation("  discard all ;"), Some(None));
        // A `d` at the very end, words cut short, other statements.
        for sql in [
            "SELECT id FROM d",
            "SELECT 1 -- dealloc",
            "DISCARD PLANS",
            "SELECT 'x'",
        ] {
            assert_eq!(deallocation(sql), None, "{sql}");
        }
        assert_eq!(mentions_deallocation_words(b"xDiScArDy"), (true, false));
        assert_eq!(mentions_deallocation_words(b"ddeallocate"), (false, true));
        assert_eq!(mentions_deallocation_words(b"d"), (false, false));
    }

    #[test]
    fn discard_all_is_told_from_the_other_discards() {
        for sql in ["DISCARD ALL", "discard all;", "/* pool */ Discard  ALL ; "] {
            assert!(is_discard_all(sql), "{sql}");
        }
        for sql in [
            "DISCARD PLANS",
            "DISCARD ALL; SELECT 1",
            "SELECT 'discard all'",
        ] {
            assert!(!is_discard_all(sql), "{sql}");
        }
    }
}
