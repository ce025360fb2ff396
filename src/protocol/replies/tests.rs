use proptest::prelude::*;

use super::*;
use crate::protocol::backend::*;

const FUNCTION_CALL_RESPONSE: u8 = b'V';

/// Feed `tags` and collect what got settled.
fn run<T: Copy>(replies: &mut Replies<T>, tags: &[u8]) -> Vec<(Request, Outcome, T)> {
    let mut settled = Vec::new();
    for &tag in tags {
        replies.answer(tag, |r, o, t| settled.push((r, o, t)));
    }
    settled
}

fn queue(requests: &[Request]) -> Replies<usize> {
    let mut replies = Replies::default();
    for (i, r) in requests.iter().enumerate() {
        replies.sent(*r, i);
    }
    replies
}

#[test]
fn an_extended_round_trip_settles_each_request_by_its_answer() {
    use Request::*;
    let mut replies = queue(&[Parse, Bind, DescribePortal, Execute, Sync]);
    let settled = run(
        &mut replies,
        &[
            PARSE_COMPLETE,
            BIND_COMPLETE,
            ROW_DESCRIPTION,
            DATA_ROW,
            DATA_ROW,
            COMMAND_COMPLETE,
            READY_FOR_QUERY,
        ],
    );
    let order: Vec<_> = settled.iter().map(|s| (s.0, s.1, s.2)).collect();
    assert_eq!(
        order,
        vec![
            (Parse, Outcome::Done, 0),
            (Bind, Outcome::Done, 1),
            (DescribePortal, Outcome::Done, 2),
            (Execute, Outcome::Done, 3),
            (Sync, Outcome::Done, 4),
        ]
    );
    assert!(replies.is_empty());
}

#[test]
fn an_error_fails_its_request_and_skips_the_rest_up_to_sync() {
    use Request::*;
    let mut replies = queue(&[Parse, Bind, Execute, Sync, Parse]);
    let settled = run(&mut replies, &[ERROR_RESPONSE]);
    assert_eq!(
        settled,
        vec![
            (Parse, Outcome::Failed, 0),
            (Bind, Outcome::Skipped, 1),
            (Execute, Outcome::Skipped, 2),
        ]
    );
    assert_eq!(replies.front(), Some((Sync, &3)));
    let settled = run(&mut replies, &[READY_FOR_QUERY, PARSE_COMPLETE]);
    assert_eq!(
        settled,
        vec![(Sync, Outcome::Done, 3), (Parse, Outcome::Done, 4)]
    );
}

#[test]
fn requests_sent_after_an_error_and_before_a_sync_are_skipped_at_once() {
    use Request::*;
    let mut replies = queue(&[Bind, Execute]);
    run(&mut replies, &[BIND_COMPLETE, ERROR_RESPONSE]);
    assert!(replies.is_empty());
    // The server discards everything up to the next Sync: nothing of it is queued.
    assert_eq!(replies.sent_unless_skipped(Bind, 2), Some(2));
    assert_eq!(replies.sent_unless_skipped(Execute, 3), Some(3));
    assert_eq!(replies.sent_unless_skipped(Sync, 4), None);
    assert_eq!(replies.sent_unless_skipped(Parse, 5), None);
    assert_eq!(replies.len(), 2);
    let settled = run(&mut replies, &[READY_FOR_QUERY, PARSE_COMPLETE]);
    assert_eq!(
        settled,
        vec![(Sync, Outcome::Done, 4), (Parse, Outcome::Done, 5)]
    );
    // A Sync already on its way ends the skipping when it is sent, not when it is answered.
    let mut replies = queue(&[Execute, Sync]);
    run(&mut replies, &[ERROR_RESPONSE]);
    assert_eq!(replies.sent_unless_skipped(Execute, 2), None);
}

#[test]
fn a_query_collects_its_statements_and_fails_on_an_error() {
    let mut replies = queue(&[Request::Query]);
    let parts = [
        ROW_DESCRIPTION,
        DATA_ROW,
        COMMAND_COMPLETE,
        EMPTY_QUERY_RESPONSE,
        ERROR_RESPONSE,
    ];
    for tag in parts {
        assert_eq!(
            replies.answer(tag, |_, _, _| panic!("settled early")),
            Reply::Part
        );
    }
    let settled = run(&mut replies, &[READY_FOR_QUERY]);
    assert_eq!(settled, vec![(Request::Query, Outcome::Failed, 0)]);
}

#[test]
fn asynchronous_messages_answer_nothing() {
    let mut replies = queue(&[Request::Parse]);
    for tag in [PARAMETER_STATUS, NOTICE_RESPONSE, NOTIFICATION_RESPONSE] {
        assert_eq!(replies.answer(tag, |_, _, _| panic!()), Reply::Unsolicited);
    }
    assert_eq!(replies.len(), 1);
}

#[test]
fn an_answer_the_front_does_not_expect_leaves_the_queue_alone() {
    let mut replies = queue(&[Request::Bind, Request::Sync]);
    assert_eq!(
        replies.answer(PARSE_COMPLETE, |_, _, _| panic!()),
        Reply::Unsolicited
    );
    // ReadyForQuery resynchronises: the unanswered Bind counts as skipped.
    let settled = run(&mut replies, &[READY_FOR_QUERY]);
    assert_eq!(
        settled,
        vec![
            (Request::Bind, Outcome::Skipped, 0),
            (Request::Sync, Outcome::Done, 1)
        ]
    );
}

#[test]
fn syncs_sent_into_copy_in_mode_are_forgotten() {
    use Request::*;
    let mut replies = queue(&[Sync, Parse, Bind, Execute, Sync, Sync]);
    assert_eq!(replies.copy_sent(), vec![4, 5]);
    // A second copy message finds no more Syncs to forget.
    assert!(replies.copy_sent().is_empty());
    replies.sent(Sync, 6);
    let settled = run(
        &mut replies,
        &[
            READY_FOR_QUERY,
            PARSE_COMPLETE,
            BIND_COMPLETE,
            COPY_IN_RESPONSE,
            COMMAND_COMPLETE,
            READY_FOR_QUERY,
        ],
    );
    let items: Vec<usize> = settled.iter().map(|s| s.2).collect();
    assert_eq!(items, vec![0, 1, 2, 3, 6]);
    assert!(replies.is_empty());
}

/// One request and whether the server fails it.
fn request() -> impl Strategy<Value = (Request, bool)> {
    use Request::*;
    (
        prop::sample::select(vec![
            Parse,
            Bind,
            DescribeStatement,
            DescribePortal,
            Execute,
            Close,
            Sync,
            Query,
            FunctionCall,
        ]),
        prop::bool::weighted(0.2),
    )
}

/// What a PostgreSQL backend sends for `requests`, and the outcome of each request.
fn serve(requests: &[(Request, bool)], rows: usize) -> (Vec<u8>, Vec<Outcome>) {
    let (mut tags, mut outcomes) = (Vec::new(), Vec::new());
    let mut skipping = false;
    for &(request, fails) in requests {
        if skipping && !request.ends_with_ready() {
            outcomes.push(Outcome::Skipped);
            continue;
        }
        let (answer, outcome): (Vec<u8>, _) = match (request, fails) {
            (Request::Sync, _) => (vec![READY_FOR_QUERY], Outcome::Done),
            (Request::Query, false) => {
                let mut t = vec![ROW_DESCRIPTION];
                t.extend(std::iter::repeat_n(DATA_ROW, rows));
                t.extend([COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, READY_FOR_QUERY]);
                (t, Outcome::Done)
            }
            (Request::Query, true) => (
                vec![COMMAND_COMPLETE, ERROR_RESPONSE, READY_FOR_QUERY],
                Outcome::Failed,
            ),
            (Request::FunctionCall, false) => {
                (vec![FUNCTION_CALL_RESPONSE, READY_FOR_QUERY], Outcome::Done)
            }
            (Request::FunctionCall, true) => {
                (vec![ERROR_RESPONSE, READY_FOR_QUERY], Outcome::Failed)
            }
            (_, true) => {
                skipping = true;
                (vec![ERROR_RESPONSE], Outcome::Failed)
            }
            (Request::Parse, false) => (vec![PARSE_COMPLETE], Outcome::Done),
            (Request::Bind, false) => (vec![BIND_COMPLETE], Outcome::Done),
            (Request::Close, false) => (vec![CLOSE_COMPLETE], Outcome::Done),
            (Request::DescribeStatement, false) => {
                (vec![PARAMETER_DESCRIPTION, NO_DATA], Outcome::Done)
            }
            (Request::DescribePortal, false) => (vec![ROW_DESCRIPTION], Outcome::Done),
            (Request::Execute, false) => {
                let mut t = vec![DATA_ROW; rows];
                t.push(if rows % 2 == 0 {
                    COMMAND_COMPLETE
                } else {
                    PORTAL_SUSPENDED
                });
                (t, Outcome::Done)
            }
        };
        if request.ends_with_ready() {
            skipping = false;
        }
        tags.extend(answer);
        tags.push(NOTICE_RESPONSE);
        outcomes.push(outcome);
    }
    (tags, outcomes)
}

proptest! {
    /// Against a model of the server, every request is settled once, in order, with the
    /// outcome the server gave it; requests after the last answer stay queued.
    #[test]
    fn settles_as_the_server_answers(
        requests in prop::collection::vec(request(), 0..40),
        rows in 0usize..4,
    ) {
        let (tags, outcomes) = serve(&requests, rows);
        let mut replies = Replies::default();
        for (i, (request, _)) in requests.iter().enumerate() {
            replies.sent(*request, i);
        }
        let settled = run(&mut replies, &tags);
        let items: Vec<usize> = settled.iter().map(|s| s.2).collect();
        prop_assert_eq!(items, (0..requests.len()).collect::<Vec<_>>());
        let got: Vec<Outcome> = settled.iter().map(|s| s.1).collect();
        prop_assert_eq!(got, outcomes);
        prop_assert!(replies.is_empty());
    }
}
