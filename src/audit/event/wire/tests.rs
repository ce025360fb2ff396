//! The hand-written records against the serde-derived forms they replaced: byte for byte, for
//! any strings (quotes, backslashes, control characters, non-ASCII) and any numbers.
use proptest::prelude::*;
use serde::{Serialize, Serializer};

use super::*;
use crate::audit::event::{Protocol, SqlText};

/// The derived form of a statement's own fields, as written before.
#[derive(Serialize)]
struct StatementBody<'a> {
    protocol: Protocol,
    statement_name: Option<&'a str>,
    decision: Decision,
    rule: Option<&'a str>,
    reason: Option<&'a str>,
    sqlstate: Option<&'a str>,
    fingerprint: &'a str,
    sql: &'a str,
}

#[derive(Serialize)]
struct StatementTail<'a> {
    param_count: usize,
    params: Vec<RecordedParam<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<u32>,
}

#[derive(Serialize)]
struct RecordedParam<'a> {
    type_oid: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    sensitive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
}

fn micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Derived<'a> {
    StatementCompleted {
        session_id: u64,
        service: &'a str,
        statement_seq: u64,
        rows: Option<u64>,
        command: Option<&'a str>,
        #[serde(serialize_with = "micros")]
        duration_us: Duration,
        sqlstate: Option<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        skipped: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        suspended: bool,
    },
}

fn derived_fields(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    write_fields(&mut out, value).unwrap();
    out
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}",
        any::<String>(),
        Just("quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é ☃".to_string()),
    ]
}

fn maybe_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(text())
}

proptest! {
    #[test]
    fn statement_fields_are_written_as_serde_wrote_them(
        extended in any::<bool>(),
        decision in 0..3u8,
        statement_name in maybe_text(),
        rule in maybe_text(),
        reason in maybe_text(),
        sqlstate in maybe_text(),
        sql in text(),
        params in prop::collection::vec((any::<u32>(), any::<bool>(), prop::option::of(text())), 0..4),
        part in prop::option::of((any::<u32>(), any::<u32>())),
        record_values in any::<bool>(),
    ) {
        let protocol = if extended { Protocol::Extended } else { Protocol::Simple };
        let session = std::sync::Arc::new(SessionInfo::default());
        let mut st = StatementRecord::new(session, protocol, SqlText::new(&sql, false));
        st.statement_name = statement_name.clone();
        st.decision = [Decision::Allowed, Decision::Refused, Decision::Failed][usize::from(decision)];
        st.rule = rule.clone();
        st.reason = reason.clone();
        st.sqlstate = sqlstate.clone();
        st.params = params
            .iter()
            .map(|(oid, sensitive, value)| {
                if *sensitive {
                    BoundParam::sensitive(*oid)
                } else {
                    BoundParam::plain(*oid, value.as_deref().map(str::as_bytes))
                }
            })
            .collect();
        st.part = part;

        let mut body = Vec::new();
        write_statement_body(&st, record_values, &mut body).unwrap();
        let expected = derived_fields(&StatementBody {
            protocol,
            statement_name: st.statement_name.as_deref(),
            decision: st.decision,
            rule: st.rule.as_deref(),
            reason: st.reason.as_deref(),
            sqlstate: st.sqlstate.as_deref(),
            fingerprint: &st.fingerprint,
            sql: st.sql.recorded(record_values),
        });
        prop_assert_eq!(String::from_utf8(body).unwrap(), String::from_utf8(expected).unwrap());

        let mut tail = Vec::new();
        write_statement_tail(&st, record_values, &mut tail).unwrap();
        let expected = derived_fields(&StatementTail {
            param_count: st.params.len(),
            params: st
                .params
                .iter()
                .map(|p| RecordedParam {
                    type_oid: p.type_oid,
                    sensitive: p.sensitive,
                    value: recorded_value(p, record_values),
                })
                .collect(),
            part: st.part.map(|(part, _)| part),
            parts: st.part.map(|(_, parts)| parts),
        });
        prop_assert_eq!(String::from_utf8(tail).unwrap(), String::from_utf8(expected).unwrap());
    }

    #[test]
    fn completions_are_written_as_serde_wrote_them(
        session_id in any::<u64>(),
        service in text(),
        statement_seq in any::<u64>(),
        rows in prop::option::of(any::<u64>()),
        command in maybe_text(),
        micros in any::<u64>(),
        sqlstate in maybe_text(),
        skipped in any::<bool>(),
        suspended in any::<bool>(),
    ) {
        let duration = Duration::from_micros(micros);
        let mut written = Vec::new();
        write_completion(
            &Completion {
                session_id,
                service: &service,
                statement_seq,
                rows,
                command: command.as_deref(),
                duration,
                sqlstate: sqlstate.as_deref(),
                skipped,
                suspended,
            },
            &mut written,
        )
        .unwrap();
        let expected = serde_json::to_vec(&Derived::StatementCompleted {
            session_id,
            service: &service,
            statement_seq,
            rows,
            command: command.as_deref(),
            duration_us: duration,
            sqlstate: sqlstate.as_deref(),
            skipped,
            suspended,
        })
        .unwrap();
        prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(expected).unwrap());
    }
}

/// The kept escaped texts are the ones of the record written, whichever entry the record hits
/// and whichever the cache gave away to make room.
#[test]
fn kept_texts_are_those_of_the_record_written() {
    let session = std::sync::Arc::new(SessionInfo::default());
    let records: Vec<StatementRecord> = (0..TEXTS_KEPT + 4)
        .map(|i| {
            let sql = format!("SELECT \"col{i}\" FROM t WHERE a = 'x' -- {i}");
            StatementRecord::new(session.clone(), Protocol::Simple, SqlText::new(&sql, false))
        })
        .collect();
    for _ in 0..3 {
        for st in records.iter().chain(records.iter().rev()) {
            let mut written = Vec::new();
            write_statement_body(st, false, &mut written).unwrap();
            let mut expected = Vec::new();
            write_text_fields(&mut expected, &st.fingerprint, st.sql.redacted()).unwrap();
            assert!(
                written.ends_with(&expected),
                "{}",
                String::from_utf8_lossy(&written)
            );
        }
    }
}

/// A long statement's text is written right but not kept: the cache stays small whatever the
/// statements' size.
#[test]
fn long_texts_are_not_kept() {
    let session = std::sync::Arc::new(SessionInfo::default());
    let sql = format!("SELECT '{}'", "x".repeat(LONGEST_KEPT));
    let st = StatementRecord::new(session, Protocol::Simple, SqlText::new(&sql, false));
    let before = TEXT_JSON.with(|c| c.borrow().entries.len());
    let mut written = Vec::new();
    write_statement_body(&st, false, &mut written).unwrap();
    let mut expected = Vec::new();
    write_text_fields(&mut expected, &st.fingerprint, st.sql.redacted()).unwrap();
    assert!(written.ends_with(&expected));
    // The redaction shortened the literal; a long identifier list is not shortened.
    let long: String = (0..2000).map(|i| format!("c{i}, ")).collect();
    let st = StatementRecord::new(
        std::sync::Arc::new(SessionInfo::default()),
        Protocol::Simple,
        SqlText::new(&format!("SELECT {long} 1"), false),
    );
    write_statement_body(&st, false, &mut Vec::new()).unwrap();
    let after = TEXT_JSON.with(|c| c.borrow().entries.len());
    assert!(after <= before + 1, "only the short one may be kept");
    assert!(TEXT_JSON.with(|c| c
        .borrow()
        .entries
        .iter()
        .all(|(f, r, _)| f.len() + r.len() <= LONGEST_KEPT)));
}
