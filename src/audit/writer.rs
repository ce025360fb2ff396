//! The durable writer: one OS thread owns the current segment file and does group commit.
//!
//! Callers serialise their event on their own task and send the bytes over a channel.
//! The writer takes everything queued, frames each body into a chained record, writes the
//! batch with one `write`, answers the callers waiting for the write, then makes it durable
//! with one `fdatasync` and answers the callers waiting for durability. While one fsync is
//! in flight the next batch accumulates in the channel, so batch size grows with load and
//! the number of fsyncs stays far below the number of records.
//!
//! The writer's state sits behind one lock, taken per commit and never while waiting on the
//! channel. With `fsync = false` sessions take it themselves for their one `write` (there is
//! no fsync to overlap, so the hand-off would only add two wake-ups); with fsync the thread
//! is the only one that writes. Records nobody waits for wait on the deferred queue for the
//! next commit or the 20 ms tick.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::sync::oneshot;

use super::config::AuditConfig;
use super::handle::{
    AuditHandle, Cmd, Counters, Deferred, HandleInner, InlineLog, LiveSettings, Pending,
    DEFERRED_MAX_DELAY,
};
use super::record::{self, Hash, Tail, FORMAT_VERSION};
use super::signing::SigningKey;
use super::AuditError;

/// Most records framed into one write; bounds the writer's buffer under overload.
const MAX_BATCH: usize = 8192;

/// Owns the writer thread. Dropping it without [`AuditLog::shutdown`] still stops the writer
/// once every handle is gone, but without waiting for it.
pub struct AuditLog {
    tx: Option<Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    /// Recovers the chain from the existing files, opens a new segment (writing a recovery
    /// record if the last run did not shut down cleanly) and starts the writer.
    pub async fn open(config: AuditConfig) -> Result<(Self, AuditHandle), AuditError> {
        let counters = Arc::new(Counters::default());
        if !config.enabled {
            let handle = AuditHandle {
                inner: Arc::new(HandleInner {
                    tx: None,
                    deferred: Arc::default(),
                    inline: None,
                    live: parking_lot::RwLock::new(LiveSettings::of(&config)),
                    counters,
                }),
            };
            return Ok((
                AuditLog {
                    tx: None,
                    thread: None,
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
        let writer = Arc::new(parking_lot::Mutex::new(writer));
        // Without fsync a statement's record needs only a write to the page cache: the session
        // does it itself under the log's lock, which saves two thread hand-offs per statement.
        let inline = (!config.fsync).then(|| writer.clone() as Arc<dyn InlineLog>);
        let thread = std::thread::Builder::new()
            .name("pgward-audit".into())
            .spawn(move || run(&writer, rx, &queue))
            .map_err(|e| AuditError::io(&config.dir, e))?;
        let handle = AuditHandle {
            inner: Arc::new(HandleInner {
                tx: Some(tx.clone()),
                deferred,
                inline,
                live: parking_lot::RwLock::new(LiveSettings::of(&config)),
                counters,
            }),
        };
        Ok((
            AuditLog {
                tx: Some(tx),
                thread: Some(thread),
            },
            handle,
        ))
    }

    /// Writes everything queued before this call, a final signed `shutdown` checkpoint, and
    /// stops the writer.
    pub async fn shutdown(mut self) -> Result<(), AuditError> {
        let Some(tx) = self.tx.take() else {
            return Ok(());
        };
        let (done_tx, done_rx) = oneshot::channel();
        tx.send(Cmd::Shutdown(done_tx))
            .map_err(|_| AuditError::Closed)?;
        let result = done_rx.await.map_err(|_| AuditError::Closed)?;
        if let Some(thread) = self.thread.take() {
            // The writer returns right after answering; joining cannot block for long.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }
}

/// The file currently appended to.
struct Segment {
    file: File,
    path: PathBuf,
    name: String,
    /// Bytes known durable.
    len: u64,
    opened: Instant,
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
    /// Held for the writer's lifetime: one writer per directory.
    _lock: super::lock::DirLock,
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
            _lock: lock,
        };
        // Fail at startup, not on the first statement, if the directory is unusable; and make
        // a recovery durable right away.
        Ok(w)
    }

    /// Writes `batch` on the caller's thread (the inline path of `fsync = false`), after the
    /// deferred records taken with it; answers like [`Writer::commit`]. After shutdown every
    /// waiter gets [`AuditError::Closed`].
    pub(super) fn commit_inline(&mut self, batch: &mut Vec<Pending>) {
        if !self.stopped {
            self.commit(batch);
            return;
        }
        for pending in batch.drain(..) {
            for ack in [pending.written, pending.durable].into_iter().flatten() {
                let _ = ack.send(Err(AuditError::Closed));
            }
        }
    }

    /// The final commit and checkpoint; later inline appends are refused.
    fn stop(&mut self, batch: &mut Vec<Pending>) -> Result<(), AuditError> {
        self.commit(batch);
        self.stopped = true;
        self.close()
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

    /// Writes `batch` durably and answers every waiter: the written acks after the write,
    /// the durable acks after the fsync; on failure every waiter not yet answered gets the
    /// error.
    fn commit(&mut self, batch: &mut Vec<Pending>) {
        let result = self.write_batch(batch);
        for pending in batch.drain(..) {
            let Err(e) = &result else {
                continue;
            };
            if pending.written.is_none() && pending.durable.is_none() {
                self.counters
                    .dropped_nowait
                    .fetch_add(pending.bodies.len() as u64, Ordering::Relaxed);
            }
            for ack in [pending.written, pending.durable].into_iter().flatten() {
                let _ = ack.send(Err(e.clone()));
            }
        }
    }

    /// Frames, writes and fsyncs; returns after the data is durable. Records that must
    /// precede the batch (recovery, due checkpoint, rotation) are handled here too.
    fn write_batch(&mut self, batch: &mut [Pending]) -> Result<(), AuditError> {
        let result = self.try_write_batch(batch);
        match &result {
            Err(e) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "audit write failed");
                self.count_outage(e, batch);
                self.abandon_segment();
                // Retry a due checkpoint one interval later instead of spinning on a broken disk.
                self.last_checkpoint = Instant::now();
            }
            // The recovery (and with it the outage record) is durable.
            Ok(()) if self.recovery.is_none() => self.outage = None,
            Ok(()) => {}
        }
        result
    }

    fn try_write_batch(&mut self, batch: &mut [Pending]) -> Result<(), AuditError> {
        let checkpoint_due = self.checkpoint_due();
        if batch.is_empty() && self.recovery.is_none() && !checkpoint_due {
            return Ok(());
        }
        self.rotate_if_due()?;
        self.ensure_segment()?;
        self.buf.clear();
        if let Some(r) = self.recovery.clone() {
            self.push_recovery(&r)?;
        }
        if checkpoint_due {
            self.push_siem_dropped()?;
            self.push_checkpoint("interval")?;
        }
        let mut firsts = Vec::with_capacity(batch.len());
        for pending in batch.iter() {
            firsts.push(self.next_seq);
            for body in &pending.bodies {
                self.push_record(body);
            }
        }
        self.write_buf()?;
        // Written: callers that forward before durability may go on while the fsync runs.
        for (pending, first) in batch.iter_mut().zip(&firsts) {
            if let Some(ack) = pending.written.take() {
                let _ = ack.send(Ok(*first));
            }
        }
        self.sync_buf()?;
        self.recovery = None;
        for (pending, first) in batch.iter_mut().zip(&firsts) {
            if let Some(ack) = pending.durable.take() {
                let _ = ack.send(Ok(*first));
            }
        }
        Ok(())
    }

    /// Copies dropped for the SIEM since the last such record leave a trace in the log itself
    /// (written before each interval checkpoint while there are new drops).
    fn push_siem_dropped(&mut self) -> Result<(), AuditError> {
        if self.syslog_tls.is_none() {
            return Ok(());
        }
        let total = self.counters.siem_dropped.load(Ordering::Relaxed);
        if total <= self.siem_dropped_recorded {
            return Ok(());
        }
        let body = serde_json::to_vec(&serde_json::json!({
            "kind": "siem_dropped",
            "sink": "syslog_tls",
            "records_dropped": total - self.siem_dropped_recorded,
            "total_dropped": total,
        }))?;
        self.push_record(&body);
        self.siem_dropped_recorded = total;
        Ok(())
    }

    /// Appends one framed record to `buf` and advances the chain head.
    fn push_record(&mut self, body: &[u8]) -> u64 {
        let seq = self.next_seq;
        let ts = record::format_ts(SystemTime::now());
        self.frame(seq, &ts, body);
        seq
    }

    fn frame(&mut self, seq: u64, ts: &str, body: &[u8]) {
        debug_assert!(body.len() > 2 && body[0] == b'{');
        let start = self.begin_frame(seq, ts);
        self.buf.extend_from_slice(&body[1..]);
        self.end_frame(start, seq);
    }

    /// Writes the envelope of record `seq` up to and including the comma before `kind`;
    /// returns where the line starts in `buf`.
    fn begin_frame(&mut self, seq: u64, ts: &str) -> usize {
        let start = self.buf.len();
        let mut prev_hex = [0u8; 64];
        // Infallible: the output buffer is exactly twice the input.
        let _ = hex::encode_to_slice(self.prev, &mut prev_hex);
        let _ = write!(
            self.buf,
            "{{\"v\":{FORMAT_VERSION},\"seq\":{seq},\"ts\":\"{ts}\",\"node\":{},\"prev\":\"",
            self.node_json
        );
        self.buf.extend_from_slice(&prev_hex);
        self.buf.extend_from_slice(b"\",");
        start
    }

    /// Hashes the complete line that starts at `start`, ends it and advances the chain head.
    fn end_frame(&mut self, start: usize, seq: u64) {
        self.prev = record::record_hash(&self.buf[start..]);
        self.buf.push(b'\n');
        self.next_seq = seq + 1;
        self.since_checkpoint += 1;
    }

    /// A checkpoint signs every byte of its own line before `"sig"` (envelope with `prev`,
    /// reason, `covers_seq`, `interval_ms`, `key_id`): see [`record::checkpoint_message_v2`].
    /// Without a key the same record is written without `key_id`/`sig`.
    fn push_checkpoint(&mut self, reason: &str) -> Result<(), AuditError> {
        let seq = self.next_seq;
        let ts = record::format_ts(SystemTime::now());
        let body = super::lifecycle::checkpoint_body(
            reason,
            seq,
            self.checkpoint_interval,
            self.key.as_ref().map(SigningKey::key_id),
        )?;
        let start = self.begin_frame(seq, &ts);
        // The body without its closing brace: the signature is appended as the last field.
        self.buf.extend_from_slice(&body[1..body.len() - 1]);
        if let Some(key) = &self.key {
            let msg = record::checkpoint_message_v2(&self.buf[start..]);
            let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(&msg).to_bytes());
            let _ = write!(self.buf, ",\"sig\":\"{sig}\"");
        }
        self.buf.push(b'}');
        self.end_frame(start, seq);
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Fails at startup, not on the first statement, if the directory is unusable.
    fn write_start_or_abandon(&mut self) -> Result<(), AuditError> {
        let r = self.write_start();
        if r.is_err() {
            self.abandon_segment();
        }
        r
    }

    /// `audit_started` (effective settings) and a `start` checkpoint, so that every run of a
    /// signed log begins with a signature and says how it was configured.
    fn write_start(&mut self) -> Result<(), AuditError> {
        self.ensure_segment()?;
        self.buf.clear();
        if let Some(r) = self.recovery.clone() {
            self.push_recovery(&r)?;
        }
        if let Some((anchor, why)) = &self.truncation {
            let body = super::lifecycle::truncation_body(anchor, why, self.next_seq)?;
            self.push_record(&body);
        }
        let body = super::lifecycle::started_body(&self.settings)?;
        self.push_record(&body);
        self.push_checkpoint("start")?;
        self.flush()?;
        self.recovery = None;
        tracing::info!(node = %self.node, seq = self.next_seq, "audit log started");
        Ok(())
    }

    fn push_recovery(&mut self, r: &Recovery) -> Result<(), AuditError> {
        let body = serde_json::json!({
            "kind": "recovery",
            "reason": r.reason,
            "file": r.file,
            "torn_bytes": r.torn_bytes,
            "resumed_after_seq": self.next_seq.checked_sub(1),
        });
        let bytes = serde_json::to_vec(&body)?;
        self.push_record(&bytes);
        if let Some(outage) = &self.outage {
            let now = record::format_ts(SystemTime::now());
            let body = outage.body(&now)?;
            self.push_record(&body);
        }
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
            if pending.written.is_some() || pending.durable.is_some() {
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

    /// One write, one fdatasync (unless `fsync = false`) for the whole buffer.
    fn flush(&mut self) -> Result<(), AuditError> {
        self.write_buf()?;
        self.sync_buf()
    }

    /// One write of the whole buffer to the segment (in the kernel from here on: survives a
    /// crash of pgward, not of the machine).
    fn write_buf(&mut self) -> Result<(), AuditError> {
        let Some(seg) = self.seg.as_mut() else {
            return Err(AuditError::Closed);
        };
        seg.file
            .write_all(&self.buf)
            .map_err(|e| AuditError::io(&seg.path, e))
    }

    /// Makes the written buffer durable and advances the durable chain head.
    fn sync_buf(&mut self) -> Result<(), AuditError> {
        let Some(seg) = self.seg.as_mut() else {
            return Err(AuditError::Closed);
        };
        if self.fsync {
            seg.file
                .sync_data()
                .map_err(|e| AuditError::io(&seg.path, e))?;
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        seg.len += self.buf.len() as u64;
        let lines = self.buf.iter().filter(|&&b| b == b'\n').count() as u64;
        self.durable = (self.next_seq, self.prev);
        self.closed_cleanly = false;
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters.records.fetch_add(lines, Ordering::Relaxed);
        self.copy_to_table_sink();
        if let Some(syslog) = &mut self.syslog {
            syslog.send_lines(&self.buf);
        }
        if let Some(siem) = &mut self.syslog_tls {
            siem.send_batch(&self.buf);
        }
        Ok(())
    }

    /// Best effort: a full sink queue drops the copy, never blocks the durable path.
    fn copy_to_table_sink(&self) {
        let Some(tx) = &self.table_tx else {
            return;
        };
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        if tx.try_send(text).is_err() {
            tracing::warn!("audit table sink is behind; batch not copied");
        }
    }

    fn rotate_if_due(&mut self) -> Result<(), AuditError> {
        let due = self.seg.as_ref().is_some_and(|s| {
            s.len > 0 && (s.len >= self.rotate_size || s.opened.elapsed() >= self.rotate_interval)
        });
        if !due {
            return Ok(());
        }
        self.buf.clear();
        self.push_checkpoint("rotation")?;
        self.flush()?;
        self.seg = None;
        Ok(())
    }

    fn ensure_segment(&mut self) -> Result<(), AuditError> {
        if self.seg.is_none() {
            self.seg = Some(open_segment(&self.dir, self.next_seq)?);
        }
        Ok(())
    }

    /// After a failed write the file's tail is unknown: cut it back to the last durable
    /// byte, drop it, rewind the chain, and start the next segment with a recovery record.
    fn abandon_segment(&mut self) {
        (self.next_seq, self.prev) = self.durable;
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
        self.rotate_if_due()?;
        self.ensure_segment()?;
        self.buf.clear();
        if let Some(r) = self.recovery.clone() {
            self.push_recovery(&r)?;
        }
        let body = super::lifecycle::stopped_body(&self.settings)?;
        self.push_record(&body);
        self.push_checkpoint("shutdown")?;
        let r = self.flush();
        if r.is_ok() {
            self.closed_cleanly = true;
            self.recovery = None;
        } else {
            self.abandon_segment();
        }
        r
    }
}

/// The writer thread: gathers the records sent to it into group commits, writes deferred
/// records at least every [`DEFERRED_MAX_DELAY`] and a checkpoint every interval. The log's
/// lock is taken per commit, never while waiting.
fn run(writer: &parking_lot::Mutex<Writer>, rx: Receiver<Cmd>, deferred: &Deferred) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut records = 0;
    loop {
        let tick = writer.lock().until_checkpoint().min(DEFERRED_MAX_DELAY);
        let first = match rx.recv_timeout(tick) {
            Ok(cmd) => cmd,
            Err(RecvTimeoutError::Timeout) => {
                batch.extend(deferred.take());
                writer.lock().commit(&mut batch);
                records = 0;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Every handle and the log were dropped without shutdown: still close cleanly.
                batch.extend(deferred.take());
                let _ = writer.lock().stop(&mut batch);
                return;
            }
        };
        let mut shutdown = None;
        let mut next = Some(first);
        let deadline = Instant::now() + writer.lock().max_delay;
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Append(pending) => {
                    records += pending.bodies.len();
                    batch.push(pending);
                }
                Cmd::Wake => {}
                Cmd::Settings(live) => writer.lock().settings_changed(live),
                Cmd::Shutdown(done) => {
                    shutdown = Some(done);
                    break;
                }
            }
            if records >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok().or_else(|| {
                let now = Instant::now();
                (now < deadline)
                    .then(|| rx.recv_timeout(deadline - now).ok())
                    .flatten()
            });
        }
        // Taken after the batch was gathered, ahead of it: a session's completion of its
        // previous statement precedes the record of its next one, which it sent later.
        if let Some(earlier) = deferred.take() {
            batch.insert(0, earlier);
        }
        let mut w = writer.lock();
        if let Some(done) = shutdown {
            let _ = done.send(w.stop(&mut batch));
            return;
        }
        w.commit(&mut batch);
        records = 0;
    }
}

impl InlineLog for parking_lot::Mutex<Writer> {
    fn commit_inline(&self, batch: &mut Vec<Pending>) {
        self.lock().commit_inline(batch);
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
                    file,
                    path,
                    name,
                    len: 0,
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
