//! Durability: the writer thread's fsync outside the log's lock, and what follows it —
//! answering the appends it covered, copying their bytes to the sinks — or, when it fails,
//! failing them and abandoning the segment.
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Writer;
use crate::audit::record::Hash;
use crate::audit::AuditError;

/// How far the file was written when an fsync began: what that fsync makes durable.
pub(super) struct SyncTarget {
    file: Arc<File>,
    path: PathBuf,
    generation: u64,
    seq: u64,
    prev: Hash,
    len: u64,
    backlog: usize,
    #[cfg(test)]
    delay: Duration,
}

/// One fsync of everything written so far, if anything waits for one: the lock is taken to
/// note how far to sync and again to record the outcome, not during the fsync, so sessions
/// keep writing (their records wait for the next fsync). Returns whether it synced.
pub(super) fn sync_written_outside_lock(writer: &super::held::LogLock, gather: Duration) -> bool {
    if !gather.is_zero() && writer.lock().has_unsynced() {
        // `group_commit_max_delay`: let more records join this fsync.
        std::thread::sleep(gather);
    }
    let Some(target) = writer.lock().sync_target() else {
        return false;
    };
    #[cfg(test)]
    std::thread::sleep(target.delay);
    let started = Instant::now();
    let result = target.file.sync_data();
    let took = started.elapsed();
    let answered = writer.lock().synced(target, result, took);
    // Each answer may wake a session's worker thread (a futex call): not while sessions
    // wait for the lock to write their records.
    answered.send();
    true
}

/// The durability acknowledgements an fsync answered, to be sent once the log's lock is
/// released. Dropped unsent, each waiter learns the log closed (never that it is durable).
#[must_use = "the sessions waiting for these records are answered only by `send`"]
pub(super) struct Answered(Vec<super::Unsynced>);

impl Answered {
    pub(super) fn send(self) {
        for done in self.0 {
            let _ = done.ack.send(Ok(done.first));
        }
    }
}

impl Writer {
    /// Written bytes no fsync has covered yet.
    pub(super) fn has_unsynced(&self) -> bool {
        self.seg.as_ref().is_some_and(|s| s.written > s.len)
    }

    /// What an fsync begun now covers (`None` when everything written is durable). Clears
    /// the request: a session writing after this wakes the thread again.
    fn sync_target(&mut self) -> Option<SyncTarget> {
        self.sync_requested = false;
        let seg = self.seg.as_ref().filter(|s| s.written > s.len)?;
        Some(SyncTarget {
            file: seg.file.clone(),
            path: seg.path.clone(),
            generation: self.generation,
            seq: self.next_seq,
            prev: self.prev,
            len: seg.written,
            backlog: self.sink_backlog.len(),
            #[cfg(test)]
            delay: self.test_sync_delay,
        })
    }

    /// The outcome of the fsync of `target`. One begun on a segment since rotated or
    /// abandoned says nothing about the current one (a rotation made everything durable
    /// under the lock; an abandonment failed everyone waiting).
    fn synced(
        &mut self,
        target: SyncTarget,
        result: std::io::Result<()>,
        took: Duration,
    ) -> Answered {
        if target.generation != self.generation || target.seq <= self.durable.0 {
            if let Err(e) = result {
                tracing::error!(file = %target.path.display(), error = %e,
                    "fsync of an audit segment already closed failed");
            }
            return Answered(Vec::new());
        }
        match result {
            Ok(()) => {
                self.counters.fsync_seconds.observe(took);
                self.mark_durable(target.seq, target.prev, target.len, target.backlog)
            }
            Err(e) => {
                let error = AuditError::io(&target.path, e);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %error, "audit fsync failed");
                self.count_outage(&error, &[]);
                self.abandon_segment(&error);
                Answered(Vec::new())
            }
        }
    }

    /// Makes everything written so far durable, under the lock (one fdatasync unless
    /// `fsync = false`).
    pub(super) fn sync_written(&mut self) -> Result<(), AuditError> {
        let Some(seg) = self.seg.as_ref() else {
            return Err(AuditError::Closed);
        };
        if self.fsync {
            let started = Instant::now();
            seg.file
                .sync_data()
                .map_err(|e| AuditError::io(&seg.path, e))?;
            self.counters.fsync_seconds.observe(started.elapsed());
        }
        let len = seg.written;
        // Rare (start, rotation, shutdown, or no fsync: nobody waits), so answered here.
        self.mark_durable(self.next_seq, self.prev, len, self.sink_backlog.len())
            .send();
        Ok(())
    }

    /// The chain is durable up to `seq`: copy the newly durable bytes to the sinks, and
    /// return the appends that ends, to be answered.
    fn mark_durable(&mut self, seq: u64, prev: Hash, len: u64, backlog: usize) -> Answered {
        let records = seq.saturating_sub(self.durable.0);
        self.counters.records.fetch_add(records, Ordering::Relaxed);
        self.durable = (seq, prev);
        if let Some(seg) = self.seg.as_mut() {
            seg.len = len;
        }
        let covered = self
            .unsynced
            .iter()
            .take_while(|u| u.end_seq <= seq)
            .count();
        let answered = Answered(self.unsynced.drain(..covered).collect());
        if self.recovery.is_none() {
            // The recovery, and with it the outage record, is durable.
            self.outage = None;
        }
        // Usually the whole backlog: handed over without a copy.
        let rest = self
            .sink_backlog
            .split_off(backlog.min(self.sink_backlog.len()));
        let durable_bytes = std::mem::replace(&mut self.sink_backlog, rest);
        self.copy_to_sinks(&durable_bytes);
        answered
    }

    /// Everyone still waiting for an fsync learns it failed (what they wrote is being cut).
    pub(super) fn fail_unsynced(&mut self, error: &AuditError) {
        if let Some(outage) = self.outage.as_mut() {
            outage.appends_failed += self.unsynced.len() as u64;
        }
        for waiting in self.unsynced.drain(..) {
            let _ = waiting.ack.send(Err(error.clone()));
        }
        self.sink_backlog.clear();
    }

    /// Best effort: a full sink queue drops the copy, never blocks the durable path.
    fn copy_to_sinks(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(tx) = &self.table_tx {
            let text = String::from_utf8_lossy(bytes).into_owned();
            if tx.try_send(text).is_err() {
                tracing::warn!("audit table sink is behind; batch not copied");
            }
        }
        if let Some(syslog) = &mut self.syslog {
            syslog.send_lines(bytes);
        }
        if let Some(siem) = &mut self.syslog_tls {
            siem.send_batch(bytes);
        }
    }
}
