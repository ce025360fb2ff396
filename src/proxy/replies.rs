//! The session's one response tracker: every request the client's stream sends upstream, in
//! order, with what each stage keeps for its answer ([`Awaited`]); the upstream direction
//! hands each answer back to the stage that waits for it.
//!
//! Which message answers which request is the protocol's rule, kept in
//! [`crate::protocol::replies`]; this is the session's queue of it:
//!
//! * the statement registry learns which named Parses the server failed or skipped (it then
//!   forgets the name, so the client can prepare it again);
//! * the audit gets each statement's answer for its completion record (rows, command tag,
//!   SQLSTATE, skipped after an error, suspended portal);
//! * the latency histogram gets, with each ReadyForQuery, when its Sync, Query or
//!   FunctionCall went upstream.
//!
//! A request sent after an error and before any Sync is settled as skipped as it is sent:
//! the server discards it without an answer, and a client that goes on sending must not cost
//! an entry per request.
//!
//! The queue holds the client's requests as the client sent them: what field encryption
//! inserts (a Describe before an Execute) and what the pool inserts (Parse and Close on a lent
//! connection) are answered out of the stream before it reaches this tracker, each by its own
//! queue under the same rules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::audit::{Awaiting, Completions};
use super::statements::Statement;
use crate::protocol::replies::{Outcome, Replies, Reply, Request};
use crate::protocol::{backend, Message};

/// What the session keeps of one forwarded request until the server answers it.
#[derive(Debug, Default)]
pub struct Awaited {
    /// A named Parse's entry in the registry: forgotten if the server fails or skips it.
    statement: Option<Weak<Statement>>,
    /// The completion its answer makes of its audit records.
    audit: Option<Awaiting>,
    /// When a Sync, Query or FunctionCall went upstream: the statement latency histogram
    /// measures to its ReadyForQuery.
    sent_at: Option<Instant>,
}

impl Awaited {
    pub fn new(statement: Option<Weak<Statement>>, audit: Option<Awaiting>) -> Self {
        Self {
            statement,
            audit,
            sent_at: None,
        }
    }
}

/// One message of a forwarded batch, as the tracker sees it.
#[derive(Debug)]
pub enum Sent {
    /// A request the server will answer.
    Request(Request, Awaited),
    /// CopyData, CopyDone or CopyFail: the server ignores Syncs sent into COPY FROM STDIN.
    Copy,
}

/// The requests a session forwarded and not yet answered.
#[derive(Default)]
pub struct SessionReplies {
    inner: Mutex<Inner>,
    /// An audited session's completion writer (set once, when its audit opens).
    completions: OnceLock<Completions>,
    /// DataRows since the last other message: counted without the lock (a result set is mostly
    /// DataRows) and credited to the request at the front when the next other message comes.
    data_rows: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    queue: Replies<Awaited>,
    /// Named statements whose Parse the server failed or skipped, for the registry.
    failed: Vec<Weak<Statement>>,
}

impl std::fmt::Debug for SessionReplies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReplies")
            .field("awaited", &self.len())
            .field("audited", &self.is_audited())
            .finish()
    }
}

impl SessionReplies {
    /// The session is audited: settled requests complete their records through `completions`.
    pub fn audit_with(&self, completions: Completions) {
        // Set once per session; a second audit cannot open.
        let _ = self.completions.set(completions);
    }

    /// Whether the session is audited.
    pub fn is_audited(&self) -> bool {
        self.completions.get().is_some()
    }

    /// The requests of a batch about to go upstream, in order (call before it is written, so
    /// that every answer finds its request). A request the server will skip (it failed an
    /// earlier one and no Sync has been sent since) is settled at once.
    pub fn sent(&self, batch: impl IntoIterator<Item = Sent>) {
        let mut now = None;
        let mut inner = self.inner.lock();
        let Inner { queue, failed } = &mut *inner;
        for sent in batch {
            match sent {
                Sent::Request(request, mut awaited) => {
                    if request.ends_with_ready() {
                        awaited.sent_at = Some(*now.get_or_insert_with(Instant::now));
                    }
                    if let Some(skipped) = queue.sent_unless_skipped(request, awaited) {
                        self.settle(failed, request, Outcome::Skipped, skipped, None);
                    }
                }
                Sent::Copy => drop(queue.copy_sent()),
            }
        }
    }

    /// What a settled request means to the registry and the audit; `answer` is the message
    /// that settled it, if the server sent one.
    fn settle(
        &self,
        failed: &mut Vec<Weak<Statement>>,
        request: Request,
        outcome: Outcome,
        awaited: Awaited,
        answer: Option<&Message>,
    ) {
        if outcome != Outcome::Done {
            failed.extend(awaited.statement);
        }
        if let (Some(completions), Some(audit)) = (self.completions.get(), awaited.audit) {
            completions.settled(request, outcome, audit, answer);
        }
    }

    /// One upstream message on its way to the client (after field encryption's and the pool's
    /// own answers were taken out; after a value failed to decrypt, the server's message the
    /// client does not get). Returns, for a ReadyForQuery, when the request it answers went
    /// upstream.
    pub fn answered(&self, message: &Message) -> Option<Instant> {
        let tag = message.tag();
        if tag == backend::DATA_ROW {
            self.data_rows.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut sent_at = None;
        let mut inner = self.inner.lock();
        let Inner { queue, failed } = &mut *inner;
        let rows = self.data_rows.swap(0, Ordering::Relaxed);
        if let Some(audit) = queue.front_mut().and_then(|(_, a)| a.audit.as_mut()) {
            audit.rows_seen(rows);
        }
        let reply = queue.answer(tag, |request, outcome, awaited| {
            if request.ends_with_ready() {
                sent_at = awaited.sent_at;
            }
            self.settle(failed, request, outcome, awaited, Some(message));
        });
        if reply != Reply::Part {
            return sent_at;
        }
        if let (Some(completions), Some((_, front))) = (self.completions.get(), queue.front_mut()) {
            if let Some(audit) = front.audit.as_mut() {
                completions.part(audit, message);
            }
        }
        None
    }

    /// The client got an error with `sqlstate` in place of a row of the request being
    /// answered (a value failed to decrypt); the server's own answer still settles it.
    pub fn failed_for_client(&self, sqlstate: &'static str) {
        let mut inner = self.inner.lock();
        if let Some(audit) = inner.queue.front_mut().and_then(|(_, a)| a.audit.as_mut()) {
            audit.failed_for_client(sqlstate);
        }
    }

    /// The named statements the server failed or skipped since the last call.
    pub fn take_failed(&self) -> Vec<Weak<Statement>> {
        std::mem::take(&mut self.inner.lock().failed)
    }

    /// Requests awaiting their answer.
    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Every request has been answered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
