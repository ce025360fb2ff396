//! Per-session state shared by the two relay directions and the cancel path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::audit::DurableReceipt;
use crate::error::ClientError;

pub use crate::error::REFUSAL_MARKER_PREFIX;

/// State one session's relay directions share.
#[derive(Debug)]
pub struct SessionState {
    /// Session id (also used in logs and audit).
    pub id: u64,
    /// The upstream backend's cancel key.
    pub upstream_process_id: u32,
    pub upstream_secret_key: u32,
    /// Bumped (under `cancel_gate`) whenever a message that starts execution goes upstream.
    generation: AtomicU64,
    /// Held while the generation is bumped for a batch that starts execution (before it is
    /// written upstream), and while a cancel is delivered: a cancel is either delivered before
    /// a later request is written or dropped, so it never hits a request forwarded after it
    /// arrived. Not held across the write itself, so a cancel reaches a busy server while a
    /// large pipeline is still being written to it.
    pub cancel_gate: tokio::sync::Mutex<()>,
    /// Transaction status byte of the last ReadyForQuery.
    tx_status: AtomicU8,
    /// The last upstream message was a ReadyForQuery and nothing was sent since.
    upstream_idle: AtomicBool,
    /// Statements refused by pgward, by marker id, awaiting their place in the response stream.
    refusals: Mutex<HashMap<u64, ClientError>>,
    refusals_pending: AtomicU64,
    next_refusal: AtomicU64,
    /// Audit records written but maybe not yet durable, of statements already forwarded: no
    /// response goes to the client before these resolve (`[audit] durability`).
    undurable: Mutex<Vec<DurableReceipt>>,
    /// The session's one response tracker: the requests forwarded and not yet answered, with
    /// what the registry, the audit and the latency histogram await of each.
    pub replies: super::replies::SessionReplies,
    /// The service's statement series in `/metrics` (set with [`SessionState::with_series`]).
    pub series: Arc<crate::metrics::ServiceSeries>,
    /// Transaction pooling: the session holds a server connection only while it runs a
    /// transaction; cancels go to the one it holds now (`None`: dropped).
    pooled: bool,
    held: Mutex<Option<(u32, u32)>>,
    /// The server reports `standard_conforming_strings = off` or an ASCII-embedding client
    /// encoding: it reads SQL differently from pgward's analysis (`sql::settings`).
    reads_sql_differently: AtomicBool,
}

/// Most refusals remembered while their markers are in flight.
const MAX_PENDING_REFUSALS: usize = 1024;

impl SessionState {
    /// Fresh state for a session whose upstream backend has this cancel key.
    pub fn new(id: u64, upstream_process_id: u32, upstream_secret_key: u32) -> Self {
        Self {
            id,
            upstream_process_id,
            upstream_secret_key,
            generation: AtomicU64::new(0),
            cancel_gate: tokio::sync::Mutex::new(()),
            tx_status: AtomicU8::new(b'I'),
            upstream_idle: AtomicBool::new(true),
            refusals: Mutex::new(HashMap::new()),
            refusals_pending: AtomicU64::new(0),
            next_refusal: AtomicU64::new(1),
            undurable: Mutex::new(Vec::new()),
            replies: Default::default(),
            series: Arc::default(),
            pooled: false,
            held: Mutex::new(None),
            reads_sql_differently: AtomicBool::new(false),
        }
    }

    /// State of a session in transaction pooling mode; `client_process_id` is the PID its
    /// client is given (that of the server connection it first borrowed).
    pub fn pooled(id: u64, client_process_id: u32) -> Self {
        Self {
            pooled: true,
            ..Self::new(id, client_process_id, 0)
        }
    }

    /// Transaction pooling: the server connection (its cancel key) the session holds now;
    /// call with `cancel_gate` held.
    pub fn hold_server(&self, key: Option<(u32, u32)>) {
        *self.held.lock() = key;
    }

    /// The upstream cancel key a cancel of this session goes to, if any.
    pub fn cancel_target(&self) -> Option<(u32, u32)> {
        if self.pooled {
            *self.held.lock()
        } else {
            Some((self.upstream_process_id, self.upstream_secret_key))
        }
    }

    /// Count this session's statements in its service's series.
    pub fn with_series(mut self, series: Arc<crate::metrics::ServiceSeries>) -> Self {
        self.series = series;
        self
    }

    /// Current request generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A message that starts execution is being forwarded (call with `cancel_gate` held).
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Something was sent upstream: the session is not idle until the next ReadyForQuery.
    pub fn mark_busy(&self) {
        self.upstream_idle.store(false, Ordering::Release);
    }

    /// A ReadyForQuery with transaction status `status` arrived.
    pub fn ready_for_query(&self, status: u8, last_in_batch: bool) {
        self.tx_status.store(status, Ordering::Release);
        if last_in_batch {
            self.upstream_idle.store(true, Ordering::Release);
        }
    }

    /// Idle outside a transaction: safe to close for idle timeout or shutdown.
    pub fn is_idle(&self) -> bool {
        self.upstream_idle.load(Ordering::Acquire) && self.tx_status.load(Ordering::Acquire) == b'I'
    }

    /// Records of a batch about to be forwarded are written but not yet durable (call before
    /// the batch goes upstream, so that every response to it finds the receipt).
    pub fn hold_responses_until(&self, receipt: DurableReceipt) {
        if receipt.is_pending() {
            self.undurable.lock().push(receipt);
        }
    }

    /// The receipts every response from now on must wait for (taken: each is awaited once).
    pub fn take_undurable(&self) -> Vec<DurableReceipt> {
        std::mem::take(&mut *self.undurable.lock())
    }

    /// A ParameterStatus from the server (at login or after a statement): notes whether the
    /// server now reads SQL differently from pgward.
    pub fn note_parameter_status(&self, body: &[u8]) {
        let mut fields = body.split(|b| *b == 0);
        let (Some(name), Some(value)) = (fields.next(), fields.next()) else {
            return;
        };
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return;
        };
        if let Some(differently) = crate::sql::settings::reads_differently(name, value) {
            if differently {
                tracing::warn!(
                    session = self.id,
                    setting = name,
                    value,
                    "the server now reads SQL differently from pgward: statements are refused"
                );
            }
            self.reads_sql_differently
                .store(differently, Ordering::Release);
        }
    }

    /// Whether the server reads SQL differently from pgward (see `note_parameter_status`).
    pub fn reads_sql_differently(&self) -> bool {
        self.reads_sql_differently.load(Ordering::Acquire)
    }

    /// Register a refusal; returns the marker statement to send upstream in its place.
    pub fn register_refusal(&self, error: ClientError) -> String {
        let id = self.next_refusal.fetch_add(1, Ordering::Relaxed);
        let mut refusals = self.refusals.lock();
        // A marker the server skipped (an earlier error in the same batch) never comes back;
        // bound what such leftovers can hold. Ids grow, so the smallest is the oldest.
        if refusals.len() >= MAX_PENDING_REFUSALS {
            if let Some(oldest) = refusals.keys().min().copied() {
                refusals.remove(&oldest);
            }
        }
        refusals.insert(id, error);
        self.refusals_pending
            .store(refusals.len() as u64, Ordering::Release);
        format!("{REFUSAL_MARKER_PREFIX}{id}")
    }

    /// Whether any refusal still waits for its marker's error (cheap hot-path check).
    pub fn has_pending_refusals(&self) -> bool {
        self.refusals_pending.load(Ordering::Acquire) > 0
    }

    /// The refusal whose marker appears in an upstream error message, if any.
    pub fn take_refusal(&self, upstream_message: &str) -> Option<ClientError> {
        let start = upstream_message.find(REFUSAL_MARKER_PREFIX)? + REFUSAL_MARKER_PREFIX.len();
        let digits: String = upstream_message[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let id: u64 = digits.parse().ok()?;
        let mut refusals = self.refusals.lock();
        let error = refusals.remove(&id)?;
        self.refusals_pending
            .store(refusals.len() as u64, Ordering::Release);
        Some(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::sqlstate;

    #[test]
    fn refusal_markers_map_back_to_their_errors() {
        let state = SessionState::new(1, 0, 0);
        let marker =
            state.register_refusal(ClientError::error(sqlstate::INSUFFICIENT_PRIVILEGE, "no"));
        assert!(state.has_pending_refusals());
        let upstream = format!("syntax error at or near \"{marker}\"");
        assert_eq!(state.take_refusal(&upstream).unwrap().message, "no");
        assert!(!state.has_pending_refusals());
        assert!(state.take_refusal(&upstream).is_none());
    }

    #[test]
    fn idle_needs_ready_for_query_outside_a_transaction() {
        let state = SessionState::new(1, 0, 0);
        state.mark_busy();
        assert!(!state.is_idle());
        state.ready_for_query(b'T', true);
        assert!(!state.is_idle());
        state.ready_for_query(b'I', true);
        assert!(state.is_idle());
    }
}
