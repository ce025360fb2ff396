use std::sync::Arc;

use super::*;
use crate::protocol::view::Frontend;
use crate::proxy::encryption::StatementCrypto;
use crate::proxy::statements::SessionStatements;

/// A backend message of `tag` with an empty body (ReadyForQuery: idle).
fn backend(tag: u8) -> Message {
    let raw: Vec<u8> = match tag {
        backend::READY_FOR_QUERY => vec![tag, 0, 0, 0, 5, b'I'],
        _ => vec![tag, 0, 0, 0, 4],
    };
    Message::from_raw(raw.into()).unwrap()
}

fn answer(replies: &SessionReplies, tags: &[u8]) {
    for &tag in tags {
        replies.answered(&backend(tag));
    }
}

fn parse_of(name: &str) -> Message {
    let raw = [
        &b"P"[..],
        &(u32::try_from(name.len() + 16).unwrap()).to_be_bytes(),
        name.as_bytes(),
        b"\0SELECT 1\0\0\0",
    ]
    .concat();
    Message::from_raw(raw.into()).unwrap()
}

fn held(registry: &SessionStatements, name: &str) -> bool {
    let parse = parse_of(name);
    registry
        .conflict(&Frontend::decode(&parse).unwrap(), None)
        .is_some()
}

fn request(request: Request) -> Sent {
    Sent::Request(request, Awaited::default())
}

#[test]
fn a_named_parse_the_server_rejects_or_skips_is_forgotten_and_one_it_completes_is_kept() {
    let mut registry = SessionStatements::default();
    let replies = SessionReplies::default();
    let named_parse = |registry: &mut SessionStatements, name: &str| {
        let entry = registry.parsed(name, StatementCrypto::default(), None);
        let awaited = Awaited::new(Some(Arc::downgrade(&entry)), None);
        Sent::Request(Request::Parse, awaited)
    };
    // Parse a (completes), Parse b (fails), Parse c (skipped), Sync; then, before any
    // answer, Parse d, Sync — a later segment, answered on its own.
    let batch = vec![
        named_parse(&mut registry, "a"),
        named_parse(&mut registry, "b"),
        named_parse(&mut registry, "c"),
        request(Request::Sync),
        named_parse(&mut registry, "d"),
        request(Request::Sync),
    ];
    replies.sent(batch);
    answer(
        &replies,
        &[
            backend::PARSE_COMPLETE,
            backend::ERROR_RESPONSE,
            backend::READY_FOR_QUERY,
        ],
    );
    registry.forget_failed(replies.take_failed());
    assert!(held(&registry, "a"));
    assert!(!held(&registry, "b") && !held(&registry, "c"));
    assert!(held(&registry, "d"), "d's own segment is not answered yet");
    answer(
        &replies,
        &[backend::PARSE_COMPLETE, backend::READY_FOR_QUERY],
    );
    registry.forget_failed(replies.take_failed());
    assert!(held(&registry, "d"));
    assert!(replies.is_empty());
}

#[test]
fn syncs_a_copy_ignores_do_not_shift_later_answers() {
    let mut registry = SessionStatements::default();
    let replies = SessionReplies::default();
    // tokio-postgres' COPY: Bind, Execute, Sync (ignored in copy-in mode), data, CopyDone, Sync.
    replies.sent([
        request(Request::Bind),
        request(Request::Execute),
        request(Request::Sync),
        Sent::Copy,
        Sent::Copy,
        request(Request::Sync),
    ]);
    answer(
        &replies,
        &[
            backend::BIND_COMPLETE,
            b'G', // CopyInResponse
            backend::COMMAND_COMPLETE,
            backend::READY_FOR_QUERY,
        ],
    );
    assert!(replies.is_empty());
    // Then a Parse that fails: forgotten at its own error, not one segment late.
    let entry = registry.parsed("x", StatementCrypto::default(), None);
    replies.sent([
        Sent::Request(
            Request::Parse,
            Awaited::new(Some(Arc::downgrade(&entry)), None),
        ),
        request(Request::Sync),
    ]);
    answer(&replies, &[backend::ERROR_RESPONSE]);
    registry.forget_failed(replies.take_failed());
    assert!(!held(&registry, "x"));
}

#[test]
fn each_ready_for_query_times_the_request_it_answers() {
    let replies = SessionReplies::default();
    replies.sent([request(Request::FunctionCall)]);
    replies.sent([request(Request::Parse), request(Request::Sync)]);
    let times: Vec<Option<Instant>> = [
        backend::READY_FOR_QUERY,
        backend::PARSE_COMPLETE,
        backend::READY_FOR_QUERY,
        backend::READY_FOR_QUERY,
    ]
    .iter()
    .map(|&tag| replies.answered(&backend(tag)))
    .collect();
    assert!(times[0].is_some() && times[2].is_some());
    assert!(times[0] <= times[2]);
    assert_eq!(times[1], None, "only a ReadyForQuery ends a timed request");
    assert_eq!(
        times[3], None,
        "a ReadyForQuery nothing awaited times nothing"
    );
}

#[test]
fn a_named_parse_sent_after_an_error_before_any_sync_is_forgotten_at_once() {
    let mut registry = SessionStatements::default();
    let replies = SessionReplies::default();
    replies.sent([request(Request::Execute)]);
    answer(&replies, &[backend::ERROR_RESPONSE]);
    // The client goes on without reading the error: the server skips this Parse.
    let entry = registry.parsed("late", StatementCrypto::default(), None);
    replies.sent([Sent::Request(
        Request::Parse,
        Awaited::new(Some(Arc::downgrade(&entry)), None),
    )]);
    assert!(
        replies.is_empty(),
        "nothing is kept for a request the server skips"
    );
    registry.forget_failed(replies.take_failed());
    assert!(!held(&registry, "late"));
}
