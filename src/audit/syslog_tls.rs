//! Live copy of every audit record to a SIEM over syslog on TCP with TLS (`[audit.syslog_tls]`):
//! RFC 5424 messages in RFC 5425 octet-counting frames (`LEN SP MSG`), one per record.
//!
//! The JSON Lines files stay the record of truth and the durable path never waits for the
//! collector: the writer thread hands each durable batch to a bounded queue and returns. A
//! slow or unreachable collector costs dropped copies, never a stalled statement: batches that
//! do not fit the queue, or arrive while the connection is down (reconnects back off from
//! 250 ms to 30 s), are dropped and counted (`pgward_audit_siem_dropped_total`, and a `siem_dropped` record in the log at the next
//! checkpoint). Checkpoints are
//! not dropped: the newest one of a dropped batch is sent with the next batch that goes out,
//! so the collector keeps anchoring everything before it (`verify --anchor` reads a file of the
//! collector's lines), and the `seq` gap shows what it missed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::config::SyslogTlsConfig;
use super::handle::Counters;
use super::AuditError;

/// RFC 5424 PRI: facility `authpriv` (10) × 8 + severity `info` (6), as the datagram sink.
const PRIORITY: u32 = 10 * 8 + 6;
const APP_NAME: &str = "pgward";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A collector that takes longer than this for one batch is treated as down.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The writer thread's end: never blocks.
pub(crate) struct SyslogTlsSink {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Records queued and not yet taken by the sender task.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    /// The newest checkpoint of a batch dropped here, sent ahead of the next batch.
    held_checkpoint: Option<Vec<u8>>,
    counters: Arc<Counters>,
}

impl SyslogTlsSink {
    /// Loads the TLS material (a bad file fails the start) and spawns the sender task.
    pub(crate) fn spawn(
        config: &SyslogTlsConfig,
        counters: Arc<Counters>,
    ) -> Result<Self, AuditError> {
        let client = match (&config.client_cert_file, &config.client_key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(AuditError::Config(
                    "[audit.syslog_tls] client_cert_file and client_key_file go together".into(),
                ))
            }
        };
        let tls = crate::tls::verified_client_config(&config.ca_file, client)
            .map_err(|e| AuditError::Config(format!("[audit.syslog_tls]: {e}")))?;
        let host = config
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(&config.address).to_string());
        let server_name = crate::tls::server_name(&host)
            .map_err(|e| AuditError::Config(format!("[audit.syslog_tls]: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let sender = Sender {
            address: config.address.clone(),
            connector: TlsConnector::from(tls),
            server_name,
            queued: queued.clone(),
            conn: None,
            backoff: BACKOFF_MIN,
            retry_at: None,
            held_checkpoint: None,
            procid: std::process::id().to_string(),
            counters: counters.clone(),
        };
        tokio::spawn(sender.run(rx));
        Ok(Self {
            tx,
            queued,
            capacity: config.queue_records.max(1),
            held_checkpoint: None,
            counters,
        })
    }

    /// Hands a durable batch (newline-terminated records) to the sender, or drops it when
    /// the queue is full.
    pub(crate) fn send_batch(&mut self, batch: &[u8]) {
        let records = count_lines(batch);
        if self.queued.load(Ordering::Relaxed) + records > self.capacity {
            self.counters
                .siem_dropped
                .fetch_add(records as u64, Ordering::Relaxed);
            if let Some(cp) = newest_checkpoint(batch) {
                self.held_checkpoint = Some(cp.to_vec());
            }
            return;
        }
        let mut owned = self.held_checkpoint.take().unwrap_or_default();
        let held = count_lines(&owned);
        owned.extend_from_slice(batch);
        self.queued.fetch_add(records + held, Ordering::Relaxed);
        if self.tx.send(owned).is_err() {
            // The sender task is gone (runtime shutting down): nothing more can be delivered.
            self.counters
                .siem_dropped
                .fetch_add(records as u64, Ordering::Relaxed);
        }
    }
}

struct Sender {
    address: String,
    connector: TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    queued: Arc<AtomicUsize>,
    conn: Option<TlsStream<TcpStream>>,
    backoff: Duration,
    retry_at: Option<Instant>,
    held_checkpoint: Option<Vec<u8>>,
    procid: String,
    counters: Arc<Counters>,
}

impl Sender {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
        let mut frames = Vec::with_capacity(64 * 1024);
        while let Some(batch) = rx.recv().await {
            self.queued
                .fetch_sub(count_lines(&batch), Ordering::Relaxed);
            let batch = match self.held_checkpoint.take() {
                Some(mut cp) => {
                    cp.extend_from_slice(&batch);
                    cp
                }
                None => batch,
            };
            frames.clear();
            let records = frame_batch(&batch, &self.procid, &mut frames);
            if self.deliver(&frames).await {
                self.counters
                    .siem_sent
                    .fetch_add(records, Ordering::Relaxed);
            } else {
                self.counters
                    .siem_dropped
                    .fetch_add(records, Ordering::Relaxed);
                self.held_checkpoint = newest_checkpoint(&batch).map(<[u8]>::to_vec);
            }
        }
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.shutdown().await;
        }
    }

    /// Writes `frames` on the connection, (re)connecting when the backoff allows.
    async fn deliver(&mut self, frames: &[u8]) -> bool {
        if self.conn.is_none() && !self.reconnect().await {
            return false;
        }
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let write = async {
            conn.write_all(frames).await?;
            conn.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => true,
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "write timed out".to_string(),
                };
                tracing::warn!(address = %self.address, %error,
                    "audit syslog collector write failed; records kept only in the files until it is back");
                self.conn = None;
                self.retry_at = Some(Instant::now() + self.backoff);
                false
            }
        }
    }

    async fn reconnect(&mut self) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let attempt = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(self.server_name.clone(), tcp).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(stream)) => {
                tracing::info!(address = %self.address, "audit syslog collector connected");
                self.conn = Some(stream);
                self.backoff = BACKOFF_MIN;
                self.retry_at = None;
                true
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "connect timed out".to_string(),
                };
                tracing::warn!(address = %self.address, %error, retry_in = ?self.backoff,
                    "audit syslog collector unreachable; records kept only in the files");
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
        }
    }
}

/// The fields of a record's envelope the syslog header carries.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    ts: &'a str,
    #[serde(borrow, default)]
    node: &'a str,
    #[serde(borrow, default)]
    kind: &'a str,
}

/// Appends one octet-counted RFC 5424 message per record of `batch` to `out`; returns how
/// many. `<86>1 TIMESTAMP HOSTNAME pgward PROCID KIND - JSON`: the record's own time, its
/// node as host name, its kind as MSGID, no structured data, the record as the message.
fn frame_batch(batch: &[u8], procid: &str, out: &mut Vec<u8>) -> u64 {
    let mut records = 0;
    let mut message = Vec::with_capacity(1024);
    for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let head = serde_json::from_slice::<Head<'_>>(line).unwrap_or(Head {
            ts: "",
            node: "",
            kind: "",
        });
        message.clear();
        message.extend_from_slice(format!("<{PRIORITY}>1 ").as_bytes());
        push_header_field(&mut message, head.ts, 64);
        push_header_field(&mut message, head.node, 255);
        message.extend_from_slice(APP_NAME.as_bytes());
        message.push(b' ');
        push_header_field(&mut message, procid, 128);
        push_header_field(&mut message, head.kind, 32);
        message.extend_from_slice(b"- ");
        message.extend_from_slice(line);
        out.extend_from_slice(format!("{} ", message.len()).as_bytes());
        out.extend_from_slice(&message);
        records += 1;
    }
    records
}

/// A header field (RFC 5424 PRINTUSASCII, no spaces, bounded length), `-` when empty,
/// followed by a space.
fn push_header_field(out: &mut Vec<u8>, value: &str, max: usize) {
    let start = out.len();
    out.extend(value.bytes().filter(|b| (33..=126).contains(b)).take(max));
    if out.len() == start {
        out.push(b'-');
    }
    out.push(b' ');
}

fn count_lines(batch: &[u8]) -> usize {
    batch.iter().filter(|&&b| b == b'\n').count()
}

/// The last checkpoint record of a batch, with its newline.
fn newest_checkpoint(batch: &[u8]) -> Option<&[u8]> {
    let needle = b"\"kind\":\"checkpoint\"";
    let mut end = batch.len();
    while end > 0 {
        let body_end = if batch[end - 1] == b'\n' {
            end - 1
        } else {
            end
        };
        let start = batch[..body_end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let line = &batch[start..body_end];
        if line.windows(needle.len()).any(|w| w == needle) {
            return Some(&batch[start..end]);
        }
        end = start;
    }
    None
}

/// `host` of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_octet_counted_rfc5424_messages() {
        let batch = b"{\"v\":1,\"seq\":7,\"ts\":\"2026-12-03T10:00:00.000001Z\",\"node\":\"n 1\",\"prev\":\"00\",\"kind\":\"statement\"}\n";
        let mut out = Vec::new();
        assert_eq!(frame_batch(batch, "42", &mut out), 1);
        let text = String::from_utf8(out).unwrap();
        let (len, message) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len());
        assert!(
            message.starts_with(
                "<86>1 2026-12-03T10:00:00.000001Z n1 pgward 42 statement - {\"v\":1,\"seq\":7"
            ),
            "{message}"
        );
    }

    #[test]
    fn the_newest_checkpoint_of_a_batch_is_found() {
        let batch = b"{\"kind\":\"checkpoint\",\"seq\":1}\n{\"kind\":\"statement\"}\n{\"kind\":\"checkpoint\",\"seq\":3}\n{\"kind\":\"statement\"}\n";
        assert_eq!(
            newest_checkpoint(batch),
            Some(&b"{\"kind\":\"checkpoint\",\"seq\":3}\n"[..])
        );
        assert_eq!(newest_checkpoint(b"{\"kind\":\"statement\"}\n"), None);
        assert_eq!(host_of("siem.example:6514"), "siem.example");
        assert_eq!(host_of("[::1]:6514"), "::1");
    }
}
