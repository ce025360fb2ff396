//! The durable writer: the current segment file, its chain head, and group commit.
//!
//! Sessions append on their own thread: under the writer's lock they frame their records
//! into the chain and write them with one `write` (from then on they survive a crash of
//! pgward), are answered "written" at once, and leave their durability acknowledgement on
//! the writer's queue. The writer thread makes what was written durable: it notes how far
//! the file was written, releases the lock, runs one `fdatasync` while sessions go on
//! writing, and then answers everyone whose records that fsync covered (outside the lock:
//! each answer may wake a thread). Records written
//! during an fsync are covered by the next one, so batches grow with load, the number of
//! fsyncs stays far below the number of records, and a statement is forwarded without
//! waiting behind an fsync in flight. With `fsync = false` written is as durable as the log
//! gets, and no one waits for the thread at all.
//!
//! The lock is held for a write, never for an fsync — except the rare ones that must
//! complete before anything else is written (start, rotation, shutdown). Records nobody
//! waits for wait on the deferred queue for the next append or the 20 ms tick. A session
//! waits for the lock on its worker only while the holder makes progress (`held`): behind a
//! write stalled on the disk it commits off the runtime, within `durability_timeout`.
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::config::AuditConfig;
use super::handle::{
    Ack, AuditHandle, Cmd, Counters, Deferred, HandleInner, InlineCommit, InlineLog, LiveSettings,
    Pending, DEFERRED_MAX_DELAY,
};
use super::record::{self, Hash, Tail};
use super::signing::SigningKey;
use super::AuditError;

mod frame;
mod held;
mod sync;

/// Owns the writer thread. Dropping it without [`AuditLog::shutdown`] still stops the writer
/// once every handle is gone, but without waiting for it.
pub struct AuditLog {
    tx: Option<Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How long shutdown waits for the writer's final fsync (`durability_timeout`).
    durability_timeout: Duration,
}

impl AuditLog {
    /// Recovers the chain from the existing files, opens a new segment (writing a recovery
    /// record if the last run did not shut down cleanly) and starts the writer.
    pub async fn open(config: AuditConfig) -> Result<(Self, AuditHandle), AuditError> {
        if config.durability_timeout.is_zero() {
            return Err(AuditError::Config(
                "durability_timeout must be above zero (every wait for an fsync would fail)".into(),
            ));
        }
        let counters = Arc::new(Counters::default());
        if !config.enabled {
            let handle = AuditHandle {
                inner: Arc::new(HandleInner {
                    tx: None,
                    deferred: Arc::default(),
                    inline: None,
                    fsync: config.fsync,
                    durability_timeout: config.durability_timeout,
                    stall_turn: Arc::new(tokio::sync::Semaphore::new(1)),
                    live: parking_lot::RwLock::new(LiveSettings::of(&config)),
                    counters,
                }),
            };
            return Ok((
                AuditLog {
                    tx: None,
                    thread: None,
                    durability_timeout: config.durability_timeout,
                },
                handle,
            ));
        }
        let table_tx = config
            .table_sink_url
            .as_ref()
            .map(|url| super::table_sink::spawn(url.clone()));
        // Built here, on the runtime: its sender task is a tokio task.
        let syslog_tls = config
            .syslog_tls
            .as_ref()
            .map(|c| super::syslog_tls::SyslogTlsSink::spawn(c, counters.clone()))
            .transpose()?;
        let anchor = super::anchor::latest_of_config(&config).await;
        let cfg = config.clone();
        let c2 = counters.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = Writer::new(&cfg, c2, table_tx, syslog_tls, anchor.as_ref())?;
            w.write_start_or_abandon()?;
            Ok::<_, AuditError>(w)
        })
        .await
        .map_err(|_| AuditError::Closed)??;
        let (tx, rx) = std::sync::mpsc::channel();
        let deferred = Arc::new(Deferred::default());
        let queue = deferred.clone();
        let writer = Arc::new(held::LogLock::new(writer));
        // Sessions write their records themselves under the log's lock: no hand-off to the
        // thread and back before a statement may be forwarded.
        let inline = writer.clone() as Arc<dyn InlineLog>;
        let thread = std::thread::Builder::new()
            .name("pgward-audit".into())
            .spawn(move || run(&writer, rx, &queue))
            .map_err(|e| AuditError::io(&config.dir, e))?;
        let handle = AuditHandle {
            inner: Arc::new(HandleInner {
                tx: Some(tx.clone()),
                deferred,
                inline: Some(inline),
                fsync: config.fsync,
                durability_timeout: config.durability_timeout,
                stall_turn: Arc::new(tokio::sync::Semaphore::new(1)),
                live: parking_lot::RwLock::new(LiveSettings::of(&config)),
                counters,
            }),
        };
        Ok((
            AuditLog {
                tx: Some(tx),
                thread: Some(thread),
                durability_timeout: config.durability_timeout,
            },
            handle,
        ))
    }

    /// Writes everything queued before this call, a final signed `shutdown` checkpoint, and
    /// stops the writer. A writer stuck in an fsync of a stalled disk is left behind after
    /// `durability_timeout` (the process may exit; the next start finds no `shutdown`
    /// checkpoint and writes a recovery record), so a stalled disk cannot hold a shutdown.
    pub async fn shutdown(mut self) -> Result<(), AuditError> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let (done_tx, done_rx) = oneshot::channel();
        tx.send(Cmd::Shutdown(done_tx))
            .map_err(|_| AuditError::Closed)?;
        let result = match tokio::time::timeout(self.durability_timeout, done_rx).await {
            Ok(answer) => answer.map_err(|_| AuditError::Closed)?,
            Err(_) => return Err(AuditError::DurabilityTimeout(self.durability_timeout)),
        };
        if let Some(thread) = self.thread.take() {
            // The writer returns right after answering; joining cannot block for long.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }
}

/// The file currently appended to.
struct Segment {
    /// Shared with the fsync the writer thread runs outside the lock.
    file: Arc<File>,
    path: PathBuf,
    name: String,
    /// Bytes known durable.
    len: u64,
    /// Bytes written (durable or not).
    written: u64,
    opened: Instant,
}

/// A durability acknowledgement waiting for the fsync that covers its records.
struct Unsynced {
    /// The chain head after the records: durable once the durable head reaches it.
    end_seq: u64,
    first: u64,
    ack: Ack,
}

/// Why the next segment must start with a `recovery` record.
#[derive(Debug, Clone)]
struct Recovery {
    reason: &'static str,
    file: Option<String>,
    torn_bytes: u64,
}

pub(super) struct Writer {
    /// Shut down: nothing may follow the final checkpoint.
    stopped: bool,
    dir: PathBuf,
    node: String,
    node_json: String,
    /// Record timestamps, the part up to the second formatted once per second.
    stamps: record::Timestamps,
    rotate_size: u64,
    rotate_interval: Duration,
    checkpoint_interval: Duration,
    max_delay: Duration,
    /// fdatasync each batch (`AuditConfig::fsync`).
    fsync: bool,
    key: Option<SigningKey>,
    seg: Option<Segment>,
    /// Chain head including records framed but maybe not yet durable.
    next_seq: u64,
    prev: Hash,
    /// Chain head as of the last successful fsync; restored when a write fails.
    durable: (u64, Hash),
    /// Durability acknowledgements of records written since the last fsync, in order.
    unsynced: VecDeque<Unsynced>,
    /// Bytes written since the last fsync, for the sinks (kept only when one is configured):
    /// copies leave the host only once durable here.
    sink_backlog: Vec<u8>,
    /// Changes whenever the segment does (rotation, abandonment): an fsync begun on an
    /// older one says nothing about the current file.
    generation: u64,
    /// A session wrote and woke the writer thread for an fsync it has not begun yet.
    sync_requested: bool,
    /// Tests hold the writer thread between noting how far to sync and the fsync itself.
    #[cfg(test)]
    test_sync_delay: Duration,
    /// The last durable record is a shutdown checkpoint.
    closed_cleanly: bool,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    recovery: Option<Recovery>,
    /// The write outage in progress, recorded once the log can be written again.
    outage: Option<super::lifecycle::Outage>,
    buf: Vec<u8>,
    counters: Arc<Counters>,
    table_tx: Option<tokio::sync::mpsc::Sender<String>>,
    syslog: Option<super::syslog_sink::SyslogSink>,
    syslog_tls: Option<super::syslog_tls::SyslogTlsSink>,
    /// SIEM drops already recorded in a `siem_dropped` record.
    siem_dropped_recorded: u64,
    /// Found at start against the anchor: recorded before `audit_started`.
    truncation: Option<(super::anchor::Anchor, &'static str)>,
    /// Effective settings, recorded in `audit_started` / `audit_stopped`.
    settings: serde_json::Value,
    /// Held until the log stops: one writer per directory. Released then, not when the last
    /// session's handle goes, so a restart in the same process can take the directory.
    dir_lock: Option<super::lock::DirLock>,
}

impl Writer {
    fn new(
        config: &AuditConfig,
        counters: Arc<Counters>,
        table_tx: Option<tokio::sync::mpsc::Sender<String>>,
        syslog_tls: Option<super::syslog_tls::SyslogTlsSink>,
        anchor: Option<&super::anchor::Anchor>,
    ) -> Result<Self, AuditError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| AuditError::io(&config.dir, e))?;
        // Before reading the tail: a second writer must not even write a recovery record.
        let lock = super::lock::acquire(&config.dir)?;
        let key = config
            .signing_key_file
            .as_deref()
            .map(SigningKey::load)
            .transpose()?;
        let tail: Tail = record::scan_tail(&config.dir)?;
        let recovery = (!tail.clean).then(|| Recovery {
            reason: "unclean_shutdown",
            file: tail.file.clone(),
            torn_bytes: tail.torn_bytes,
        });
        if let Some(r) = &recovery {
            tracing::warn!(file = ?r.file, torn_bytes = r.torn_bytes, resume_seq = tail.next_seq,
                "audit log was not shut down cleanly; resuming chain after the last valid record");
        }
        let truncation = anchor.and_then(|a| {
            let why = super::anchor::check_start(&config.dir, tail.next_seq, a)?;
            tracing::error!(anchor_seq = a.seq, anchor_ts = %a.ts, local_next_seq = tail.next_seq, why,
                "AUDIT LOG TRUNCATED OR REWRITTEN: the log's head does not reach its newest checkpoint anchored outside this host");
            counters.truncations_detected.fetch_add(1, Ordering::Relaxed);
            Some((a.clone(), why))
        });
        let node = config.resolved_node_id();
        let w = Writer {
            stopped: false,
            dir: config.dir.clone(),
            node_json: serde_json::to_string(&node)?,
            stamps: record::Timestamps::default(),
            node,
            rotate_size: config.rotate_size.max(1),
            rotate_interval: config.rotate_interval,
            checkpoint_interval: config.checkpoint_interval,
            max_delay: config.group_commit_max_delay,
            fsync: config.fsync,
            key,
            seg: None,
            next_seq: tail.next_seq,
            prev: tail.prev,
            durable: (tail.next_seq, tail.prev),
            unsynced: VecDeque::new(),
            sink_backlog: Vec::new(),
            generation: 0,
            sync_requested: false,
            #[cfg(test)]
            test_sync_delay: Duration::ZERO,
            closed_cleanly: tail.clean,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            recovery,
            outage: None,
            buf: Vec::with_capacity(1 << 20),
            counters,
            table_tx,
            syslog: config
                .syslog_socket
                .as_deref()
                .map(super::syslog_sink::SyslogSink::connect)
                .transpose()
                .map_err(|e| {
                    AuditError::io(config.syslog_socket.as_deref().unwrap_or(Path::new("")), e)
                })?,
            syslog_tls,
            siem_dropped_recorded: 0,
            settings: super::lifecycle::settings(config),
            truncation,
            dir_lock: Some(lock),
        };
        // Fail at startup, not on the first statement, if the directory is unusable; and make
        // a recovery durable right away.
        Ok(w)
    }

    /// Writes `batch` on the caller's thread, after the deferred records taken with it;
    /// answers like [`Writer::commit`]. After shutdown every waiter gets
    /// [`AuditError::Closed`].
    pub(super) fn commit_inline(&mut self, batch: &mut Vec<Pending>) -> InlineCommit {
        if !self.stopped {
            let first = self.commit(batch);
            let wake = self.has_unsynced() && !self.sync_requested;
            self.sync_requested |= wake;
            return InlineCommit { first, wake };
        }
        for pending in batch.drain(..) {
            if let Some(ack) = pending.durable {
                let _ = ack.send(Err(AuditError::Closed));
            }
        }
        InlineCommit {
            first: Err(AuditError::Closed),
            wake: false,
        }
    }

    /// The final commit and checkpoint; later inline appends are refused.
    fn stop(&mut self, batch: &mut Vec<Pending>) -> Result<(), AuditError> {
        let _ = self.commit(batch);
        self.stopped = true;
        let closed = self.close();
        self.dir_lock = None;
        closed
    }

    /// A checkpoint is due every interval even when idle: a live log's newest signature is
    /// then never older than one interval, which is what bounds `verify --live`.
    fn until_checkpoint(&self) -> Duration {
        self.checkpoint_interval
            .saturating_sub(self.last_checkpoint.elapsed())
    }

    fn checkpoint_due(&self) -> bool {
        self.last_checkpoint.elapsed() >= self.checkpoint_interval
    }

    /// Writes `batch`; returns the sequence number of the first record of its last entry
    /// (the inline caller's). Durable acks are answered once an fsync covers them (at once
    /// without fsync); on failure every one not yet answered gets the error.
    fn commit(&mut self, batch: &mut Vec<Pending>) -> Result<u64, AuditError> {
        let result = self.write_batch(batch);
        for pending in batch.drain(..) {
            let Err(e) = &result else {
                continue;
            };
            if !pending.awaited {
                self.counters
                    .dropped_nowait
                    .fetch_add(pending.bodies.len() as u64, Ordering::Relaxed);
            }
            if let Some(ack) = pending.durable {
                let _ = ack.send(Err(e.clone()));
            }
        }
        result
    }

    /// Frames and writes; returns once the data is in the file. Records that must precede
    /// the batch (recovery, due checkpoint, rotation) are handled here too.
    fn write_batch(&mut self, batch: &mut [Pending]) -> Result<u64, AuditError> {
        let result = self.try_write_batch(batch);
        if let Err(e) = &result {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit write failed");
            self.count_outage(e, batch);
            self.abandon_segment(e);
            // Retry a due checkpoint one interval later instead of spinning on a broken disk.
            self.last_checkpoint = Instant::now();
        }
        result
    }

    fn try_write_batch(&mut self, batch: &mut [Pending]) -> Result<u64, AuditError> {
        let checkpoint_due = self.checkpoint_due();
        if batch.is_empty() && self.recovery.is_none() && !checkpoint_due {
            return Ok(self.next_seq);
        }
        self.begin_buffer()?;
        if checkpoint_due {
            self.push_siem_dropped()?;
            self.push_checkpoint("interval")?;
        }
        let first_of_batch = self.next_seq;
        for body in batch.iter().flat_map(|p| &p.bodies) {
            self.push_record(body);
        }
        self.write_buf()?;
        // Written, and the recovery with it (a failed fsync asks for a new one).
        self.recovery = None;
        // Callers that forward before durability go on while the fsync runs.
        let (mut entry_first, mut last_first) = (first_of_batch, first_of_batch);
        for pending in batch.iter_mut() {
            last_first = entry_first;
            if let Some(ack) = pending.durable.take() {
                self.unsynced.push_back(Unsynced {
                    end_seq: self.next_seq,
                    first: entry_first,
                    ack,
                });
            }
            entry_first += pending.bodies.len() as u64;
        }
        if !self.fsync {
            // Written is as durable as this log gets.
            self.sync_written()?;
        }
        Ok(last_first)
    }

    /// A segment to write to (rotated when due) and an empty buffer, which starts with the
    /// recovery record when one is owed.
    fn begin_buffer(&mut self) -> Result<(), AuditError> {
        self.rotate_if_due()?;
        self.ensure_segment()?;
        self.buf.clear();
        if let Some(r) = self.recovery.clone() {
            self.push_recovery(&r)?;
        }
        Ok(())
    }

    /// Fails at startup, not on the first statement, if the directory is unusable.
    fn write_start_or_abandon(&mut self) -> Result<(), AuditError> {
        let r = self.write_start();
        if let Err(e) = &r {
            self.abandon_segment(e);
        }
        r
    }

    /// `audit_started` (effective settings) and a `start` checkpoint, so that every run of a
    /// signed log begins with a signature and says how it was configured.
    fn write_start(&mut self) -> Result<(), AuditError> {
        self.begin_buffer()?;
        if let Some((anchor, why)) = &self.truncation {
            let body = super::lifecycle::truncation_body(anchor, why, self.next_seq)?;
            self.push_record(&body);
        }
        let body = super::lifecycle::started_body(&self.settings)?;
        self.push_record(&body);
        self.push_checkpoint("start")?;
        self.flush()?;
        tracing::info!(node = %self.node, seq = self.next_seq, "audit log started");
        Ok(())
    }

    /// One outage (from the first failed write to the next durable one) becomes one
    /// `audit_outage` record with counts, written with the recovery.
    fn count_outage(&mut self, error: &AuditError, batch: &[Pending]) {
        let outage = self.outage.get_or_insert_with(|| {
            super::lifecycle::Outage::new(record::format_ts(SystemTime::now()), error)
        });
        outage.failed_writes += 1;
        for pending in batch {
            let records = pending.bodies.len() as u64;
            if pending.awaited {
                outage.appends_failed += records;
            } else {
                outage.records_lost += records;
            }
        }
        if self.recovery.is_none() {
            self.recovery = Some(Recovery {
                reason: "write_error",
                file: None,
                torn_bytes: 0,
            });
        }
    }

    /// One write, one fdatasync (unless `fsync = false`) of the whole buffer, under the lock:
    /// for the records that must be durable before anything else is written.
    fn flush(&mut self) -> Result<(), AuditError> {
        self.write_buf()?;
        self.recovery = None;
        self.sync_written()
    }

    /// One write of the whole buffer to the segment (in the kernel from here on: survives a
    /// crash of pgward, not of the machine).
    fn write_buf(&mut self) -> Result<(), AuditError> {
        let Some(seg) = self.seg.as_mut() else {
            return Err(AuditError::Closed);
        };
        (&*seg.file)
            .write_all(&self.buf)
            .map_err(|e| AuditError::io(&seg.path, e))?;
        seg.written += self.buf.len() as u64;
        self.closed_cleanly = false;
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        if self.table_tx.is_some() || self.syslog.is_some() || self.syslog_tls.is_some() {
            self.sink_backlog.extend_from_slice(&self.buf);
        }
        Ok(())
    }

    fn rotate_if_due(&mut self) -> Result<(), AuditError> {
        let due = self.seg.as_ref().is_some_and(|s| {
            s.written > 0
                && (s.written >= self.rotate_size || s.opened.elapsed() >= self.rotate_interval)
        });
        if !due {
            return Ok(());
        }
        self.buf.clear();
        self.push_checkpoint("rotation")?;
        self.flush()?;
        self.seg = None;
        self.generation += 1;
        Ok(())
    }

    fn ensure_segment(&mut self) -> Result<(), AuditError> {
        if self.seg.is_none() {
            self.seg = Some(open_segment(&self.dir, self.next_seq)?);
        }
        Ok(())
    }

    /// After a failed write or fsync the file's tail is unknown: cut it back to the last
    /// durable byte, drop it, rewind the chain, fail everyone still waiting for an fsync of
    /// what is cut, and start the next segment with a recovery record.
    fn abandon_segment(&mut self, error: &AuditError) {
        self.fail_unsynced(error);
        (self.next_seq, self.prev) = self.durable;
        self.generation += 1;
        let Some(seg) = self.seg.take() else {
            return;
        };
        let _ = seg.file.set_len(seg.len);
        let torn_bytes = seg
            .file
            .metadata()
            .map_or(0, |m| m.len().saturating_sub(seg.len));
        if seg.len == 0 && torn_bytes == 0 {
            // Opened for this attempt and nothing written: no empty file per failed retry.
            let _ = std::fs::remove_file(&seg.path);
            self.recovery.get_or_insert(Recovery {
                reason: "write_error",
                file: None,
                torn_bytes: 0,
            });
            return;
        }
        self.recovery = Some(Recovery {
            reason: "write_error",
            file: Some(seg.name),
            torn_bytes,
        });
    }

    /// The effective settings `audit_stopped` reports, after a SIGHUP changed the live ones.
    fn settings_changed(&mut self, live: super::handle::LiveSettings) {
        if let Some(settings) = self.settings.as_object_mut() {
            settings.insert("on_failure".into(), serde_json::json!(live.on_failure));
            settings.insert("durability".into(), serde_json::json!(live.durability));
            settings.insert(
                "record_values".into(),
                serde_json::json!(live.record_values),
            );
        }
    }

    /// Final checkpoint, unless the log already ends with one and nothing was written since.
    fn close(&mut self) -> Result<(), AuditError> {
        if self.closed_cleanly && self.recovery.is_none() {
            return Ok(());
        }
        self.begin_buffer()?;
        let body = super::lifecycle::stopped_body(&self.settings)?;
        self.push_record(&body);
        self.push_checkpoint("shutdown")?;
        let r = self.flush();
        match &r {
            Ok(()) => self.closed_cleanly = true,
            Err(e) => self.abandon_segment(e),
        }
        r
    }
}

/// The writer thread: makes what sessions wrote durable (one fsync at a time, outside the
/// log's lock, each covering everything written before it began), writes deferred records
/// at least every [`DEFERRED_MAX_DELAY`] and a checkpoint every interval.
fn run(writer: &held::LogLock, rx: Receiver<Cmd>, deferred: &Deferred) {
    // However the thread ends, no one may wait for an fsync that will never come.
    let _stop = StopOnExit(writer);
    let gather = writer.lock().max_delay;
    let mut batch: Vec<Pending> = Vec::new();
    loop {
        if sync::sync_written_outside_lock(writer, gather) {
            continue;
        }
        let tick = writer.lock().until_checkpoint().min(DEFERRED_MAX_DELAY);
        match rx.recv_timeout(tick) {
            Ok(Cmd::Sync) => {}
            Ok(Cmd::Settings(live)) => writer.lock().settings_changed(live),
            // The deferred queue is long, or a tick passed: write it (and a due checkpoint).
            Ok(Cmd::Wake) | Err(RecvTimeoutError::Timeout) => {
                batch.extend(deferred.take());
                // Nobody waits for these: a failure is counted and logged by the commit.
                let _ = writer.lock().commit(&mut batch);
            }
            Ok(Cmd::Shutdown(done)) => {
                batch.extend(deferred.take());
                let _ = done.send(writer.lock().stop(&mut batch));
                return;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Every handle and the log were dropped without shutdown: still close cleanly.
                batch.extend(deferred.take());
                let _ = writer.lock().stop(&mut batch);
                return;
            }
        }
    }
}

/// Ends the log when the writer thread ends, even by a panic: later appends are refused and
/// everyone waiting for an fsync is told it will not come, instead of waiting forever.
struct StopOnExit<'a>(&'a held::LogLock);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        let mut writer = self.0.lock();
        writer.stopped = true;
        writer.fail_unsynced(&AuditError::Closed);
        writer.dir_lock = None;
    }
}

/// Creates a new segment and fsyncs the directory so the file itself survives a crash.
fn open_segment(dir: &Path, first_seq: u64) -> Result<Segment, AuditError> {
    let now = SystemTime::now();
    for attempt in 0..100 {
        let name = record::segment_name(first_seq, now, attempt);
        let path = dir.join(&name);
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create_new(true);
        // Owner only: records name services, tables and (with record_values) literal values.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(file) => {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| AuditError::io(dir, e))?;
                tracing::debug!(file = %path.display(), "opened audit segment");
                return Ok(Segment {
                    file: Arc::new(file),
                    path,
                    name,
                    len: 0,
                    written: 0,
                    opened: Instant::now(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(AuditError::io(path, e)),
        }
    }
    Err(AuditError::io(
        dir,
        std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free segment name"),
    ))
}
