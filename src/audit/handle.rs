//! What sessions hold: [`AuditHandle`] writes serialised records to the log itself (through
//! [`InlineLog`], under the log's lock) and waits for the stage it needs — written to the
//! file, or durable ([`DurableReceipt`], answered by the writer thread's fsync); records
//! nobody waits for go on the [`Deferred`] queue.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::config::{Durability, OnFailure};
use super::event::AuditEvent;
use super::AuditError;
use crate::metrics::histogram::Histogram;
use crate::metrics::{FlushLatency, MetricSet};

/// The `[audit]` settings that apply per append, so a SIGHUP can change them live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LiveSettings {
    pub(super) on_failure: OnFailure,
    pub(super) durability: Durability,
    pub(super) record_values: bool,
}

impl LiveSettings {
    pub(super) fn of(config: &super::AuditConfig) -> Self {
        LiveSettings {
            on_failure: config.on_failure,
            durability: config.durability,
            record_values: config.record_values,
        }
    }
}

/// Answered with the sequence number of the first record of an append.
pub(super) type Ack = oneshot::Sender<Result<u64, AuditError>>;

/// One caller's records, framed together into one batch (never split across batches, so
/// one answer covers them all).
pub(super) struct Pending {
    pub(super) bodies: Vec<Vec<u8>>,
    /// A caller waits for the write (it gets the commit's result), so a failure costs it its
    /// statement rather than losing a record nobody waits for.
    pub(super) awaited: bool,
    /// Answered once the records are durable (`None`: nobody waits for an fsync).
    pub(super) durable: Option<Ack>,
}

impl Pending {
    /// Records nobody waits for.
    pub(super) fn unawaited(bodies: Vec<Vec<u8>>) -> Self {
        Pending {
            bodies,
            awaited: false,
            durable: None,
        }
    }
}

pub(super) enum Cmd {
    /// Records were written that wait for an fsync the thread has not begun.
    Sync,
    /// The deferred queue is long: write it now rather than at the next batch or tick.
    Wake,
    /// A SIGHUP changed the live settings: `audit_stopped` must name the ones in force.
    Settings(LiveSettings),
    Shutdown(oneshot::Sender<Result<(), AuditError>>),
}

/// Records written to the log but maybe not yet durable: [`DurableReceipt::wait`] resolves
/// once they are (the `before_response` durability: results are held until then).
#[derive(Debug)]
pub struct DurableReceipt {
    done: Option<oneshot::Receiver<Result<u64, AuditError>>>,
    /// How long [`DurableReceipt::wait`] waits (`durability_timeout`).
    timeout: Duration,
}

impl DurableReceipt {
    /// A receipt for records that were already durable when it was issued.
    pub fn already_durable() -> Self {
        Self {
            done: None,
            timeout: Duration::ZERO,
        }
    }

    /// Whether the records may still be waiting for their fsync.
    pub fn is_pending(&self) -> bool {
        self.done.is_some()
    }

    /// Resolves once the records are durable; an error means they never will be (the write
    /// or the fsync failed and the file was cut back to its last durable byte), or not within
    /// `durability_timeout` (a disk whose fsync hangs holds no session longer than that).
    pub async fn wait(self) -> Result<(), AuditError> {
        let Some(done) = self.done else {
            return Ok(());
        };
        match tokio::time::timeout(self.timeout, done).await {
            Ok(answer) => answer.map_err(|_| AuditError::Closed)?.map(|_| ()),
            Err(_) => Err(AuditError::DurabilityTimeout(self.timeout)),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) records: AtomicU64,
    pub(super) batches: AtomicU64,
    /// Each successful fdatasync of a segment and how long it took (its count is the
    /// number of fsyncs).
    pub(super) fsync_seconds: Histogram<FlushLatency>,
    pub(super) failures: AtomicU64,
    pub(super) dropped_nowait: AtomicU64,
    /// Starts that found the log behind (or different from) its external anchor.
    pub(super) truncations_detected: AtomicU64,
    /// Records delivered to / dropped for the syslog-over-TLS collector.
    pub(super) siem_sent: AtomicU64,
    pub(super) siem_dropped: AtomicU64,
    /// Appends that found the log's lock held by a stalled holder (a write blocked on the
    /// disk) and were committed off the runtime, or refused after `durability_timeout`.
    pub(super) stalled_appends: AtomicU64,
}

/// A snapshot of the writer's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// Records made durable (including checkpoints and recovery records).
    pub records: u64,
    pub batches: u64,
    pub fsyncs: u64,
    /// Batches that failed to write.
    pub failures: u64,
    /// `append_nowait` events that could not be written (log closed or write failed).
    pub dropped_nowait: u64,
    /// Records delivered to the syslog-over-TLS collector, and copies dropped for it.
    pub siem_sent: u64,
    pub siem_dropped: u64,
}

/// A cheap, cloneable handle for sessions.
#[derive(Clone)]
pub struct AuditHandle {
    pub(super) inner: Arc<HandleInner>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

pub(super) struct HandleInner {
    /// `None` when auditing is disabled.
    pub(super) tx: Option<Sender<Cmd>>,
    /// Records nobody waits for (completions, session ends): queued without waking the writer.
    pub(super) deferred: Arc<Deferred>,
    /// The log itself, appended to by sessions without a hand-off (`None` when disabled).
    pub(super) inline: Option<Arc<dyn InlineLog>>,
    /// The log fsyncs (`AuditConfig::fsync`): appends wait for durability after the write.
    pub(super) fsync: bool,
    /// The longest a receipt waits for its fsync (`AuditConfig::durability_timeout`).
    pub(super) durability_timeout: Duration,
    /// The one turn at waiting for the log's lock off the runtime, behind a stalled holder.
    pub(super) stall_turn: Arc<tokio::sync::Semaphore>,
    /// The settings a SIGHUP may change while the log runs.
    pub(super) live: parking_lot::RwLock<LiveSettings>,
    pub(super) counters: Arc<Counters>,
}

/// The log as sessions append to it directly: frame and write a batch on the caller's
/// thread; durable acks are answered by the fsync that covers them.
pub(super) trait InlineLog: Send + Sync {
    /// Commits `batch` under the log's lock, waiting for it only while its holder is not
    /// stalled: `None` (the batch untouched) once the holder has kept it for longer than any
    /// write takes (2 ms), so that a session's worker never blocks behind a stalled disk.
    fn commit_unless_stalled(&self, batch: &mut Vec<Pending>) -> Option<InlineCommit>;

    /// Off the runtime: waits up to `within` for the lock and commits `batch` unless its
    /// session abandoned it first (`None` then, or when the lock did not come).
    fn commit_claimed(
        &self,
        batch: &mut Vec<Pending>,
        claim: &Claim,
        within: std::time::Duration,
    ) -> Option<InlineCommit>;

    /// Holds the writer thread this long before each fsync (tests of the overlap).
    #[cfg(test)]
    fn delay_syncs(&self, by: std::time::Duration);

    /// Whether someone holds the log's lock right now.
    #[cfg(test)]
    fn is_locked(&self) -> bool;

    /// The next holder of the log's lock keeps it this long: a write to a stalled disk.
    #[cfg(test)]
    fn stall_next_holder(&self, by: std::time::Duration);

    /// The most threads that waited for the lock off the runtime at once.
    #[cfg(test)]
    fn most_claim_waiters(&self) -> usize;
}

/// An off-runtime commit's claim on its batch: the session that gave up waiting abandons it,
/// the thread that got the lock takes it — whichever comes first, atomically, so an
/// abandoned statement's record is never written behind its back.
#[derive(Debug, Default)]
pub(super) struct Claim(AtomicU8);

impl Claim {
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    /// The session gives up on the commit; false when its write has already begun.
    pub(super) fn abandon(&self) -> bool {
        self.settle(Self::ABANDONED)
    }

    /// The thread holding the log's lock begins the write; false when the session gave up.
    pub(super) fn take(&self) -> bool {
        self.settle(Self::TAKEN)
    }

    fn settle(&self, outcome: u8) -> bool {
        let settled =
            self.0
                .compare_exchange(Self::WAITING, outcome, Ordering::AcqRel, Ordering::Acquire);
        settled.is_ok()
    }
}

/// What an inline commit did: the sequence number of the first record of the batch's last
/// entry (the caller's), and whether the writer thread must be woken for an fsync (it is
/// woken once per fsync, not once per append).
pub(super) struct InlineCommit {
    pub(super) first: Result<u64, AuditError>,
    pub(super) wake: bool,
}

/// How many deferred records make the writer come for them at once.
const DEFERRED_WAKE_AT: usize = 256;

/// Records nobody waits for, queued by sessions without a hand-off to the writer thread: the
/// writer takes them with the next batch it writes (a statement's record, which every
/// statement sends) or at its next tick ([`DEFERRED_MAX_DELAY`]), whichever comes first. A
/// completion therefore costs a lock and a push, not a wake-up of the writer and a write of
/// its own.
#[derive(Default)]
pub(super) struct Deferred {
    bodies: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// The longest a deferred record waits for the writer when nothing else is written.
pub(super) const DEFERRED_MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

impl Deferred {
    /// Queues `body`; returns the queue's length after the push.
    fn push(&self, body: Vec<u8>) -> usize {
        let mut bodies = self.bodies.lock();
        bodies.push(body);
        bodies.len()
    }

    /// Puts back, ahead of anything queued since, records taken for a commit that did not
    /// happen.
    fn restore(&self, pending: Pending) {
        let mut bodies = self.bodies.lock();
        let later = std::mem::replace(&mut *bodies, pending.bodies);
        bodies.extend(later);
    }

    /// Everything queued so far, as one batch entry nobody waits for (`None` when empty).
    pub(super) fn take(&self) -> Option<Pending> {
        let bodies = std::mem::take(&mut *self.bodies.lock());
        (!bodies.is_empty()).then(|| Pending::unawaited(bodies))
    }
}

impl AuditHandle {
    /// Appends `event` and resolves with its sequence number once the batch holding it was
    /// written and fsync'ed. On error the caller consults [`AuditHandle::on_failure`].
    pub async fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (seqs, _) = self.append_staged(vec![event], true).await?;
        Ok(seqs.first().copied().unwrap_or(0))
    }

    /// Appends several events and resolves with their sequence numbers once all are durable.
    /// They are framed together, so they share one group commit.
    pub async fn append_all(&self, events: Vec<AuditEvent>) -> Result<Vec<u64>, AuditError> {
        let (written, receipt) = self.append_staged(events, true).await?;
        receipt.wait().await?;
        Ok(written)
    }

    /// Appends several events and resolves with their sequence numbers once they are written
    /// to the log file, with a receipt that resolves once they are durable. With
    /// `wait_durable` (or [`Durability::BeforeForward`]) it resolves only after both.
    pub async fn append_staged(
        &self,
        events: Vec<AuditEvent>,
        wait_durable: bool,
    ) -> Result<(Vec<u64>, DurableReceipt), AuditError> {
        let (Some(tx), Some(log)) = (&self.inner.tx, &self.inner.inline) else {
            return Ok((vec![0; events.len()], DurableReceipt::already_durable()));
        };
        let count = events.len() as u64;
        let bodies = events
            .iter()
            .map(|event| self.serialise(event))
            .collect::<Result<Vec<_>, _>>()?;
        let (first, receipt) = self.append_inline(tx, log, bodies).await?;
        let seqs = (first..first + count).collect();
        if wait_durable || self.durability() == Durability::BeforeForward {
            receipt.wait().await?;
            return Ok((seqs, DurableReceipt::already_durable()));
        }
        Ok((seqs, receipt))
    }

    /// Frames and writes `bodies` (after the deferred records) on this thread: one write to
    /// the page cache under the log's lock, no hand-off to the writer thread and back. The
    /// receipt resolves once the writer thread's fsync covers them (at once without fsync).
    /// Behind a stalled holder of the lock, the write is done off the runtime instead.
    async fn append_inline(
        &self,
        tx: &Sender<Cmd>,
        log: &Arc<dyn InlineLog>,
        bodies: Vec<Vec<u8>>,
    ) -> Result<(u64, DurableReceipt), AuditError> {
        let (durable, durable_rx) = match self.inner.fsync {
            true => {
                let (ack, done) = oneshot::channel();
                (Some(ack), Some(done))
            }
            false => (None, None),
        };
        let mut batch: Vec<Pending> = self.inner.deferred.take().into_iter().collect();
        batch.push(Pending {
            bodies,
            awaited: true,
            durable,
        });
        let commit = match log.commit_unless_stalled(&mut batch) {
            Some(commit) => commit,
            None => self.commit_behind_stall(log, batch).await?,
        };
        if commit.wake {
            // A closed channel means the thread is gone, and with it answered every waiter.
            let _ = tx.send(Cmd::Sync);
        }
        let first = commit.first?;
        let Some(mut durable_rx) = durable_rx else {
            // Without fsync, written is as durable as this log gets.
            return Ok((first, DurableReceipt::already_durable()));
        };
        let receipt = match durable_rx.try_recv() {
            Ok(done) => done.map(|_| DurableReceipt::already_durable())?,
            Err(oneshot::error::TryRecvError::Empty) => DurableReceipt {
                done: Some(durable_rx),
                timeout: self.inner.durability_timeout,
            },
            Err(oneshot::error::TryRecvError::Closed) => return Err(AuditError::Closed),
        };
        Ok((first, receipt))
    }

    /// Commits the batch's own entry (the last) on a blocking thread when the log's lock is
    /// held by a stalled holder, within `durability_timeout`; the deferred records taken with
    /// it go back to their queue. One blocking thread at a time waits for the lock (the
    /// others wait for their turn on the runtime), so a long stall cannot fill the blocking
    /// pool that the rest of the proxy shares. Past the timeout the commit is abandoned — its
    /// record is then never written — unless its write had already begun, which gets one
    /// more timeout.
    async fn commit_behind_stall(
        &self,
        log: &Arc<dyn InlineLog>,
        mut batch: Vec<Pending>,
    ) -> Result<InlineCommit, AuditError> {
        self.inner
            .counters
            .stalled_appends
            .fetch_add(1, Ordering::Relaxed);
        let own = batch.pop().ok_or(AuditError::Closed)?;
        for deferred in batch {
            self.inner.deferred.restore(deferred);
        }
        let within = self.inner.durability_timeout;
        let timed_out = AuditError::DurabilityTimeout(within);
        let deadline = tokio::time::Instant::now() + within;
        let turn = self.inner.stall_turn.clone().acquire_owned();
        let turn = tokio::time::timeout_at(deadline, turn)
            .await
            .map_err(|_| timed_out.clone())?
            .map_err(|_| AuditError::Closed)?;
        let claim = Arc::new(Claim::default());
        let (log, claimed) = (log.clone(), claim.clone());
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut commit = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            log.commit_claimed(&mut vec![own], &claimed, left)
        });
        let joined = match tokio::time::timeout_at(deadline, &mut commit).await {
            Ok(joined) => joined,
            Err(_) if claim.abandon() => return Err(timed_out),
            // Its write had begun when the wait ran out.
            Err(_) => tokio::time::timeout(within, commit)
                .await
                .map_err(|_| timed_out.clone())?,
        };
        joined.map_err(|_| AuditError::Closed)?.ok_or(timed_out)
    }

    /// Whether records are written at all (`enabled = false` gives a handle that drops them).
    pub fn is_enabled(&self) -> bool {
        self.inner.tx.is_some()
    }

    /// Queues `event` without waiting (for completion records): it is written with the next
    /// batch, at most [`DEFERRED_MAX_DELAY`] later. Failures are logged and counted in
    /// [`AuditStats::dropped_nowait`].
    pub fn append_nowait(&self, event: AuditEvent) {
        let Some(tx) = &self.inner.tx else {
            return;
        };
        let Ok(body) = self.serialise(&event) else {
            self.inner
                .counters
                .dropped_nowait
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("audit record dropped: it could not be serialised");
            return;
        };
        let queued = self.inner.deferred.push(body);
        if queued >= DEFERRED_WAKE_AT && tx.send(Cmd::Wake).is_err() {
            let lost = self.inner.deferred.take().map_or(0, |p| p.bodies.len());
            self.inner
                .counters
                .dropped_nowait
                .fetch_add(lost as u64, Ordering::Relaxed);
            tracing::error!(records = lost, "audit records dropped: log closed");
        }
    }

    /// When a statement's record must be durable (`[audit] durability`).
    pub fn durability(&self) -> Durability {
        self.inner.live.read().durability
    }

    /// Whether this start found the log behind, or different from, its newest checkpoint
    /// anchored outside the host (a `truncation_detected` record was written).
    pub fn truncation_detected(&self) -> bool {
        self.inner
            .counters
            .truncations_detected
            .load(Ordering::Relaxed)
            > 0
    }

    /// What the proxy must do when `append` fails.
    pub fn on_failure(&self) -> OnFailure {
        self.inner.live.read().on_failure
    }

    /// SIGHUP: applies the settings of `config` that can change while the log runs
    /// (`on_failure`, `durability`, `record_values`) and records the change in the log
    /// (`audit_settings_changed`, durable before this returns). Returns the names changed.
    pub async fn apply_live(
        &self,
        config: &super::AuditConfig,
    ) -> Result<Vec<&'static str>, AuditError> {
        let new = LiveSettings::of(config);
        let old = *self.inner.live.read();
        let mut changed = Vec::new();
        if old.on_failure != new.on_failure {
            changed.push("on_failure");
        }
        if old.durability != new.durability {
            changed.push("durability");
        }
        if old.record_values != new.record_values {
            changed.push("record_values");
        }
        if changed.is_empty() {
            return Ok(changed);
        }
        // Recorded under the old settings first: the trail shows the change before any
        // statement is handled under the new ones.
        self.append(AuditEvent::SettingsChanged {
            changed: changed.clone(),
            settings: serde_json::json!({
                "on_failure": new.on_failure,
                "durability": new.durability,
                "record_values": new.record_values,
            }),
        })
        .await?;
        *self.inner.live.write() = new;
        if let Some(tx) = &self.inner.tx {
            // Behind the change record in the writer's queue, ahead of any shutdown.
            let _ = tx.send(Cmd::Settings(new));
        }
        Ok(changed)
    }

    pub fn stats(&self) -> AuditStats {
        let c = &self.inner.counters;
        AuditStats {
            records: c.records.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            fsyncs: c.fsync_seconds.count(),
            failures: c.failures.load(Ordering::Relaxed),
            dropped_nowait: c.dropped_nowait.load(Ordering::Relaxed),
            siem_sent: c.siem_sent.load(Ordering::Relaxed),
            siem_dropped: c.siem_dropped.load(Ordering::Relaxed),
        }
    }

    fn serialise(&self, event: &AuditEvent) -> Result<Vec<u8>, AuditError> {
        let mut body = Vec::with_capacity(512);
        event.write_json(self.inner.live.read().record_values, &mut body)?;
        Ok(body)
    }
}

/// The log's series in `/metrics`.
impl MetricSet for AuditHandle {
    fn render(&self, out: &mut String) {
        let counters = &self.inner.counters;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP pgward_audit_records_total Audit records made durable (fdatasync'ed, or written when fsync = false), checkpoints included.\n\
             # TYPE pgward_audit_records_total counter\npgward_audit_records_total {}\n\
             # HELP pgward_audit_fsync_duration_seconds Each group commit's fdatasync of the audit log; with durability = \"before_response\" every statement's results wait for one.\n\
             # TYPE pgward_audit_fsync_duration_seconds histogram",
            load(&counters.records)
        );
        counters
            .fsync_seconds
            .render(out, "pgward_audit_fsync_duration_seconds", "");
        let _ = writeln!(
            out,
            "# HELP pgward_audit_stalled_appends_total Statements whose audit record found the log's lock held over 2 ms by a stalled write or a slow rotation fsync (committed off the runtime, or failed after durability_timeout).\n\
             # TYPE pgward_audit_stalled_appends_total counter\npgward_audit_stalled_appends_total {}\n\
             # HELP pgward_audit_siem_sent_total Audit records delivered to the syslog-over-TLS collector.\n\
             # TYPE pgward_audit_siem_sent_total counter\npgward_audit_siem_sent_total {}\n\
             # HELP pgward_audit_siem_dropped_total Audit record copies dropped for the syslog-over-TLS collector (queue full or collector down; the files keep them).\n\
             # TYPE pgward_audit_siem_dropped_total counter\npgward_audit_siem_dropped_total {}",
            load(&counters.stalled_appends),
            load(&counters.siem_sent),
            load(&counters.siem_dropped)
        );
    }
}
