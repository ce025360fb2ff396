//! Framing records into the writer's buffer: the chained envelope of each line, signed
//! checkpoints, and the records the writer adds itself (recovery, outage, SIEM drops).
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use base64::Engine;

use super::{Recovery, Writer};
use crate::audit::record::{self, FORMAT_VERSION};
use crate::audit::signing::SigningKey;
use crate::audit::AuditError;

impl Writer {
    /// Copies dropped for the SIEM since the last such record leave a trace in the log itself
    /// (written before each interval checkpoint while there are new drops).
    pub(super) fn push_siem_dropped(&mut self) -> Result<(), AuditError> {
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
    pub(super) fn push_record(&mut self, body: &[u8]) -> u64 {
        debug_assert!(body.len() > 2 && body[0] == b'{');
        let seq = self.next_seq;
        let start = self.begin_frame(seq);
        self.buf.extend_from_slice(&body[1..]);
        self.end_frame(start, seq);
        seq
    }

    /// Writes the envelope of record `seq`, stamped now, up to and including the comma
    /// before `kind`; returns where the line starts in `buf`. Written piece by piece, not
    /// through the formatting machinery: every record of the log passes here under its lock.
    fn begin_frame(&mut self, seq: u64) -> usize {
        let start = self.buf.len();
        let mut number = itoa::Buffer::new();
        self.buf.extend_from_slice(br#"{"v":"#);
        self.buf
            .extend_from_slice(number.format(FORMAT_VERSION).as_bytes());
        self.buf.extend_from_slice(br#","seq":"#);
        self.buf.extend_from_slice(number.format(seq).as_bytes());
        self.buf.extend_from_slice(br#","ts":""#);
        self.stamps.write(SystemTime::now(), &mut self.buf);
        self.buf.extend_from_slice(br#"","node":"#);
        self.buf.extend_from_slice(self.node_json.as_bytes());
        self.buf.extend_from_slice(br#","prev":""#);
        self.buf.extend_from_slice(&lower_hex(&self.prev));
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
    pub(super) fn push_checkpoint(&mut self, reason: &str) -> Result<(), AuditError> {
        let seq = self.next_seq;
        let body = crate::audit::lifecycle::checkpoint_body(
            reason,
            seq,
            self.checkpoint_interval,
            self.key.as_ref().map(SigningKey::key_id),
        )?;
        let start = self.begin_frame(seq);
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

    pub(super) fn push_recovery(&mut self, r: &Recovery) -> Result<(), AuditError> {
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
}

/// The chain head as lower-case hex, one table lookup per digit (every record's envelope
/// carries it; the `hex` crate's encoder spends several times that).
fn lower_hex(hash: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (pair, byte) in out.chunks_exact_mut(2).zip(hash) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_chain_head_is_written_as_the_hex_crate_writes_it(hash in any::<[u8; 32]>()) {
            prop_assert_eq!(super::lower_hex(&hash).to_vec(), hex::encode(hash).into_bytes());
        }
    }
}
