//! The on-disk record envelope, segment files, and the hash chain primitives shared by the
//! writer and the verifier. See the module docs of `audit` for the format specification.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuditError;

/// Format version written in every record's `v`.
pub const FORMAT_VERSION: u32 = 1;
/// `prev` of the very first record.
pub const GENESIS: [u8; 32] = [0u8; 32];
/// Domain separator of the signed checkpoint message of format 1 (still verified).
pub const CHECKPOINT_DOMAIN: &str = "pgward-audit-checkpoint-v1";
/// Domain separator of the v2 checkpoint message (every field of the record is signed).
pub const CHECKPOINT_DOMAIN_V2: &str = "pgward-audit-checkpoint-v2";

pub(crate) type Hash = [u8; 32];

/// SHA-256 of one record: the exact bytes of its line, without the trailing `\n`.
pub fn record_hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

/// RFC 3339 UTC with microseconds, fixed width, so string order is time order.
pub(crate) fn format_ts(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(UNIX_EPOCH + representable(t)).to_string()
}

/// The latest time a record's timestamp shows: 9999-12-31T23:59:59.999999Z.
const TS_MAX: Duration = Duration::new(253_402_300_799, 999_999_000);

/// `t` as time since the epoch, within what a fixed-width timestamp can show: a clock set
/// before 1970 or past 9999 is recorded as the nearest bound (the formatter panics outside
/// them, which took the log's writer down with it).
fn representable(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(TS_MAX)
}

/// Length of a [`format_ts`] timestamp: `2026-12-04T14:24:46.879488Z`.
const TS_LEN: usize = 27;
/// Where its microseconds start, after `…:46.`.
const TS_MICROS_AT: usize = 20;

/// [`format_ts`] for the writer's every record: the date and time up to the second are
/// formatted once per second and only the microseconds per record (the calendar arithmetic
/// and formatting machinery cost more than the rest of a record's envelope).
#[derive(Debug, Default)]
pub(crate) struct Timestamps {
    /// The second of `last` since the epoch.
    second: Option<u64>,
    last: [u8; TS_LEN],
}

impl Timestamps {
    /// `t` as [`format_ts`] writes it, appended to `out`.
    pub(crate) fn write(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let since_epoch = representable(t);
        let second = since_epoch.as_secs();
        if self.second != Some(second) {
            let formatted = format_ts(t);
            let Ok(last) = <[u8; TS_LEN]>::try_from(formatted.as_bytes()) else {
                // Every representable time has the fixed width; as formatted if not.
                out.extend_from_slice(formatted.as_bytes());
                return;
            };
            self.last = last;
            self.second = Some(second);
        }
        let mut micros = since_epoch.subsec_micros();
        for digit in self.last[TS_MICROS_AT..TS_LEN - 1].iter_mut().rev() {
            // Below 10: a decimal digit.
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.extend_from_slice(&self.last);
    }
}

/// The message a checkpoint signs: it binds node, position, time and the hash of every
/// record before it (through `prev`).
pub fn checkpoint_message(node: &str, seq: u64, ts: &str, prev_hex: &str, reason: &str) -> Vec<u8> {
    format!("{CHECKPOINT_DOMAIN}\n{node}\n{seq}\n{ts}\n{prev_hex}\n{reason}").into_bytes()
}

/// The v2 message a checkpoint signs: the domain, a newline, and the exact bytes of the
/// checkpoint's line up to (not including) `,"sig":"`. It thereby covers the envelope
/// (node, seq, ts, prev — the whole chain before it) and every field of the checkpoint.
pub fn checkpoint_message_v2(line_before_sig: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CHECKPOINT_DOMAIN_V2.len() + 1 + line_before_sig.len());
    msg.extend_from_slice(CHECKPOINT_DOMAIN_V2.as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(line_before_sig);
    msg
}

/// Splits a signed checkpoint line into the part its v2 signature covers and the signature:
/// `sig` must be the last field (`…,"sig":"<base64>"}`).
pub(crate) fn split_signature(line: &[u8]) -> Option<(&[u8], &str)> {
    const MARK: &[u8] = b",\"sig\":\"";
    let at = line.windows(MARK.len()).rposition(|w| w == MARK)?;
    let rest = line.get(at + MARK.len()..)?.strip_suffix(b"\"}")?;
    let sig = std::str::from_utf8(rest).ok()?;
    (!sig.contains('"')).then_some((&line[..at], sig))
}

/// `audit-<first seq, 20 digits>-<UTC start, YYYYMMDDTHHMMSSZ>.jsonl`: names sort in chain
/// order and tell the time range without opening the file.
pub(crate) fn segment_name(first_seq: u64, t: SystemTime, attempt: u32) -> String {
    let stamp: String = humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    if attempt == 0 {
        format!("audit-{first_seq:020}-{stamp}.jsonl")
    } else {
        format!("audit-{first_seq:020}-{stamp}-{attempt}.jsonl")
    }
}

pub(crate) fn is_segment_name(name: &str) -> bool {
    name.starts_with("audit-") && name.ends_with(".jsonl")
}

/// The start time encoded in a segment name as an RFC 3339 prefix ("2024-05-01T10:00:00"),
/// comparable with record timestamps.
pub(crate) fn segment_start_ts(name: &str) -> Option<String> {
    let stamp = name.strip_prefix("audit-")?.get(21..36)?;
    let b = stamp.as_bytes();
    if b.len() != 15 || b[8] != b'T' {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}",
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15]
    ))
}

/// Segment files in `dir`, in chain order.
pub fn list_segments(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let rd = std::fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(is_segment_name) {
            files.push(entry.path());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Expands command-line paths (files or directories) into segment files in chain order.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AuditError> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(list_segments(p)?);
        } else {
            files.push(p.clone());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    files.dedup();
    Ok(files)
}

/// The envelope and chain-relevant fields of any record.
#[derive(Debug, Deserialize)]
pub(crate) struct Head {
    pub v: u32,
    pub seq: u64,
    pub ts: String,
    pub node: String,
    pub prev: String,
    pub kind: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub sig: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub torn_bytes: Option<u64>,
    #[serde(default)]
    pub covers_seq: Option<u64>,
    /// Checkpoints of format 2: the writer's checkpoint interval.
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

pub(crate) fn parse_head(line: &[u8]) -> Option<Head> {
    serde_json::from_slice(line).ok()
}

/// Where the chain stands at the end of the existing files.
#[derive(Debug)]
pub(crate) struct Tail {
    pub next_seq: u64,
    pub prev: Hash,
    /// The last record is a shutdown checkpoint and nothing follows it.
    pub clean: bool,
    /// File holding the tear (or the last record), and bytes after the last valid record.
    pub file: Option<String>,
    pub torn_bytes: u64,
}

/// Finds the last valid record of the newest non-empty segment in `dir`.
pub(crate) fn scan_tail(dir: &Path) -> Result<Tail, AuditError> {
    let mut tear: Option<(String, u64)> = None;
    for path in list_segments(dir)?.iter().rev() {
        let data = std::fs::read(path).map_err(|e| AuditError::io(path, e))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let Some((line, end)) = last_valid_line(&data) else {
            if !data.is_empty() && tear.is_none() {
                tear = Some((name, data.len() as u64));
            }
            continue;
        };
        let torn = (data.len() - end) as u64;
        if tear.is_none() {
            tear = Some((name, torn));
        }
        let (file, torn_bytes) = tear.unwrap_or_default();
        let head = parse_head(line);
        let is_shutdown = head
            .as_ref()
            .is_some_and(|h| h.kind == "checkpoint" && h.reason.as_deref() == Some("shutdown"));
        let seq = head.map_or(0, |h| h.seq);
        return Ok(Tail {
            next_seq: seq + 1,
            prev: record_hash(line),
            clean: is_shutdown && torn_bytes == 0,
            file: Some(file),
            torn_bytes,
        });
    }
    let (file, torn_bytes) = match tear {
        Some((f, n)) => (Some(f), n),
        None => (None, 0),
    };
    Ok(Tail {
        next_seq: 0,
        prev: GENESIS,
        clean: torn_bytes == 0 && file.is_none(),
        file,
        torn_bytes,
    })
}

/// The last newline-terminated line that parses as a record, and the offset just past its
/// newline. Anything after it is a tear (partial write at a crash).
fn last_valid_line(data: &[u8]) -> Option<(&[u8], usize)> {
    let mut end = data.iter().rposition(|&b| b == b'\n')? + 1;
    loop {
        let body = &data[..end - 1];
        let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let line = &body[start..];
        if parse_head(line).is_some() {
            return Some((line, end));
        }
        if start == 0 {
            return None;
        }
        end = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_and_carry_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_714_557_600); // 2024-05-01T10:00:00Z
        let n = segment_name(42, t, 0);
        assert_eq!(n, "audit-00000000000000000042-20240501T100000Z.jsonl");
        assert_eq!(segment_start_ts(&n).as_deref(), Some("2024-05-01T10:00:00"));
        assert!(segment_name(9, t, 0) < segment_name(10, t, 0));
        assert!(is_segment_name(&segment_name(1, t, 2)));
    }

    proptest::proptest! {
        /// The cached formatter writes what `format_ts` writes, whether the second changed
        /// since its last record or not (each case is a run of times a few ms apart).
        #[test]
        fn timestamps_are_written_as_format_ts_writes_them(
            start in 0u64..253_402_300_000_000_000,
            steps in proptest::collection::vec(0u64..3_000_000, 1..20),
        ) {
            let mut stamps = Timestamps::default();
            let mut micros = start;
            for step in steps {
                micros += step;
                let t = UNIX_EPOCH
                    + Duration::from_micros(micros)
                    + Duration::from_nanos(step % 1000);
                let mut out = Vec::new();
                stamps.write(t, &mut out);
                proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), format_ts(t));
            }
        }
    }

    #[test]
    fn clocks_outside_the_fixed_width_are_recorded_at_its_bounds() {
        let mut stamps = Timestamps::default();
        for (t, shown) in [
            (
                UNIX_EPOCH - Duration::from_secs(1),
                "1970-01-01T00:00:00.000000Z",
            ),
            (
                UNIX_EPOCH + Duration::from_secs(253_402_300_800), // year 10000
                "9999-12-31T23:59:59.999999Z",
            ),
        ] {
            assert_eq!(format_ts(t), shown);
            let mut out = Vec::new();
            stamps.write(t, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), shown);
        }
    }

    #[test]
    fn ts_is_fixed_width() {
        let a = format_ts(UNIX_EPOCH + Duration::from_secs(1_714_557_600));
        let b = format_ts(UNIX_EPOCH + Duration::from_micros(1_714_557_600_000_001));
        assert_eq!(a.len(), b.len());
        assert!(a < b);
    }
}
