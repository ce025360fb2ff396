//! Which request each backend message answers.
//!
//! The server answers requests strictly in the order it received them, so a reader that knows
//! what it sent, in order, can tell what every response is to. [`Replies`] is that knowledge in
//! one place: the requests sent upstream (each with its reader's own payload) and the rules
//! of how the server answers them —
//!
//! * Parse, Bind and Close are answered by their completion message, Describe by a
//!   RowDescription or NoData (a statement's by a ParameterDescription first), Execute by
//!   CommandComplete, EmptyQueryResponse or PortalSuspended (after its DataRows and COPY
//!   messages); Sync, Query and FunctionCall by ReadyForQuery, everything before it being part
//!   of their answer;
//! * an ErrorResponse fails the request it answers, and the server skips every later request
//!   up to the next Sync (or Query, FunctionCall): they are settled as skipped at once;
//! * ReadyForQuery settles everything up to and including the first Sync, Query or
//!   FunctionCall still queued (the resynchronisation point if anything was missed);
//! * a Sync that reached the server while it was in COPY FROM STDIN mode is ignored there
//!   (no ReadyForQuery will answer it): it is forgotten when copy data follows it;
//! * ParameterStatus, NoticeResponse and NotificationResponse may come at any time and
//!   answer nothing.
//!
//! Every layer of the relay that changes or reads the response stream keeps one of these
//! over the requests it sees (the session's registry and audit the client's own, field
//! encryption its Describes added, the pool its Parses and Closes added), so each of them
//! applies the same rules.

use std::collections::VecDeque;

use super::{backend, frontend, Message};

/// A request the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Parse,
    Bind,
    DescribeStatement,
    DescribePortal,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

impl Request {
    /// The request a frontend message makes; `None` for messages the server does not answer
    /// (Flush, Terminate, copy data) and for tags it does not know.
    pub fn of(message: &Message) -> Option<Self> {
        Some(match message.tag() {
            frontend::PARSE => Request::Parse,
            frontend::BIND => Request::Bind,
            frontend::DESCRIBE if message.body().first() == Some(&b'S') => {
                Request::DescribeStatement
            }
            frontend::DESCRIBE => Request::DescribePortal,
            frontend::EXECUTE => Request::Execute,
            frontend::CLOSE => Request::Close,
            frontend::SYNC => Request::Sync,
            frontend::QUERY => Request::Query,
            frontend::FUNCTION_CALL => Request::FunctionCall,
            _ => return None,
        })
    }

    /// Answered by ReadyForQuery; the point the server skips to after an error.
    pub fn ends_with_ready(self) -> bool {
        matches!(self, Request::Sync | Request::Query | Request::FunctionCall)
    }

    /// Whether a message of `tag` is this request's last answer.
    fn settled_by(self, tag: u8) -> bool {
        match self {
            Request::Parse => tag == backend::PARSE_COMPLETE,
            Request::Bind => tag == backend::BIND_COMPLETE,
            Request::Close => tag == backend::CLOSE_COMPLETE,
            Request::DescribeStatement | Request::DescribePortal => {
                matches!(tag, backend::ROW_DESCRIPTION | backend::NO_DATA)
            }
            Request::Execute => matches!(
                tag,
                backend::COMMAND_COMPLETE
                    | backend::EMPTY_QUERY_RESPONSE
                    | backend::PORTAL_SUSPENDED
            ),
            Request::Sync | Request::Query | Request::FunctionCall => {
                tag == backend::READY_FOR_QUERY
            }
        }
    }
}

/// How a request left the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (for Sync, Query and FunctionCall: without an error before their
    /// ReadyForQuery).
    Done,
    /// Answered by an ErrorResponse (for Sync, Query and FunctionCall: one came before their
    /// ReadyForQuery).
    Failed,
    /// Never run: an earlier request failed and the server skipped to the next Sync.
    Skipped,
}

/// What one backend message is to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answers nothing: an asynchronous message, or a message no queued request expects.
    Unsolicited,
    /// Part of the answer to the request at the front, which stays queued.
    Part,
    /// Settled requests, handed to the caller in queue order; the first is the one this
    /// message answers.
    Settled,
}

/// A queued request with its reader's payload.
#[derive(Debug)]
struct Pending<T> {
    request: Request,
    /// An ErrorResponse came while this request (a Sync, Query or FunctionCall) was at the
    /// front.
    failed: bool,
    item: T,
}

/// The requests sent upstream and not yet answered, in order.
#[derive(Debug)]
pub struct Replies<T> {
    queue: VecDeque<Pending<T>>,
    /// Syncs queued since the last Execute, Query or FunctionCall: the ones a COPY FROM STDIN
    /// started by it ignores, should copy data follow.
    syncs_since_execute: usize,
    /// The server failed a request and no Sync (Query, FunctionCall) has been sent since: it
    /// skips whatever comes before the next one.
    skipping: bool,
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Self {
            queue: VecDeque::new(),
            syncs_since_execute: 0,
            skipping: false,
        }
    }
}

impl<T> Replies<T> {
    /// Requests awaiting an answer.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Every request has been answered.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The request at the front and its payload.
    pub fn front(&self) -> Option<(Request, &T)> {
        self.queue.front().map(|p| (p.request, &p.item))
    }

    /// The payload of the request at the front.
    pub fn front_mut(&mut self) -> Option<(Request, &mut T)> {
        self.queue.front_mut().map(|p| (p.request, &mut p.item))
    }

    /// A request goes upstream.
    pub fn sent(&mut self, request: Request, item: T) {
        if request.ends_with_ready() {
            self.skipping = false;
        }
        match request {
            Request::Sync => self.syncs_since_execute += 1,
            Request::Execute | Request::Query | Request::FunctionCall => {
                self.syncs_since_execute = 0
            }
            _ => {}
        }
        self.queue.push_back(Pending {
            request,
            failed: false,
            item,
        });
    }

    /// A request goes upstream; `Some(item)` when it is settled at once as skipped: the server
    /// failed an earlier request and skips everything up to the next Sync, none of which has
    /// been sent. A client that goes on sending after an error (no answer comes until its
    /// Sync) then costs no memory per request.
    pub fn sent_unless_skipped(&mut self, request: Request, item: T) -> Option<T> {
        if self.skipping && !request.ends_with_ready() {
            return Some(item);
        }
        self.sent(request, item);
        None
    }

    /// CopyData, CopyDone or CopyFail goes upstream: the server is in COPY FROM STDIN mode
    /// since the last Execute (or Query), and ignored every Sync sent after it. Returns their
    /// payloads (no answer will come for them).
    pub fn copy_sent(&mut self) -> Vec<T> {
        let mut ignored = Vec::new();
        for _ in 0..std::mem::take(&mut self.syncs_since_execute) {
            let last_sync = self.queue.iter().rposition(|p| p.request == Request::Sync);
            match last_sync.and_then(|i| self.queue.remove(i)) {
                Some(sync) => ignored.push(sync.item),
                None => break,
            }
        }
        ignored.reverse();
        ignored
    }

    /// Account for one backend message of `tag`; every request it settles goes to `settle`
    /// in queue order.
    pub fn answer(&mut self, tag: u8, mut settle: impl FnMut(Request, Outcome, T)) -> Reply {
        if matches!(
            tag,
            backend::PARAMETER_STATUS | backend::NOTICE_RESPONSE | backend::NOTIFICATION_RESPONSE
        ) {
            return Reply::Unsolicited;
        }
        if tag == backend::READY_FOR_QUERY {
            self.skipping = false;
        }
        let Some(front) = self.queue.front_mut() else {
            return Reply::Unsolicited;
        };
        match tag {
            backend::READY_FOR_QUERY => {
                self.settle_through_ready(&mut settle);
                Reply::Settled
            }
            backend::ERROR_RESPONSE if front.request.ends_with_ready() => {
                front.failed = true;
                Reply::Part
            }
            backend::ERROR_RESPONSE => {
                if let Some(failed) = self.queue.pop_front() {
                    settle(failed.request, Outcome::Failed, failed.item);
                }
                while self
                    .queue
                    .front()
                    .is_some_and(|p| !p.request.ends_with_ready())
                {
                    if let Some(skipped) = self.queue.pop_front() {
                        settle(skipped.request, Outcome::Skipped, skipped.item);
                    }
                }
                // Nothing left before a Sync: what comes next is skipped too, until one is sent.
                self.skipping = self.queue.is_empty();
                Reply::Settled
            }
            _ if front.request.settled_by(tag) => {
                if let Some(done) = self.queue.pop_front() {
                    settle(done.request, Outcome::Done, done.item);
                }
                Reply::Settled
            }
            _ if expected_within(front.request, tag) => Reply::Part,
            _ => Reply::Unsolicited,
        }
    }

    /// ReadyForQuery: requests before the first Sync, Query or FunctionCall got no answer
    /// (skipped, or missed by the reader); that one is answered.
    fn settle_through_ready(&mut self, settle: &mut impl FnMut(Request, Outcome, T)) {
        while let Some(pending) = self.queue.pop_front() {
            let request = pending.request;
            if !request.ends_with_ready() {
                settle(request, Outcome::Skipped, pending.item);
                continue;
            }
            let outcome = if pending.failed {
                Outcome::Failed
            } else {
                Outcome::Done
            };
            settle(request, outcome, pending.item);
            return;
        }
    }
}

/// Whether a message of `tag` may come as part of `request`'s answer before its last one.
fn expected_within(request: Request, tag: u8) -> bool {
    match request {
        // Everything a statement can produce, and the fast-path's FunctionCallResponse.
        Request::Query | Request::FunctionCall | Request::Sync => true,
        Request::DescribeStatement => tag == backend::PARAMETER_DESCRIPTION,
        Request::Execute => matches!(
            tag,
            backend::DATA_ROW
                | backend::COPY_IN_RESPONSE
                | backend::COPY_OUT_RESPONSE
                | backend::COPY_BOTH_RESPONSE
                | COPY_DATA
                | COPY_DONE
        ),
        Request::Parse | Request::Bind | Request::Close | Request::DescribePortal => false,
    }
}

/// The backend's CopyData and CopyDone share their tags with the frontend's.
const COPY_DATA: u8 = frontend::COPY_DATA;
const COPY_DONE: u8 = frontend::COPY_DONE;

#[cfg(test)]
mod tests;
