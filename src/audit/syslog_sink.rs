//! Best-effort copy of every audit record to syslog (`[audit] syslog_socket`, e.g. `/dev/log`),
//! for sites that ship logs through rsyslog/journald. The JSON Lines files stay the record of
//! truth: a datagram the syslog daemon cannot take right now is dropped and counted, never
//! waited for (the writer thread must not stall statements on a slow daemon).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// RFC 3164 priority: facility `authpriv` (10) × 8 + severity `info` (6).
const PRIORITY: u32 = 10 * 8 + 6;

/// Largest datagram sent; longer records are truncated (the file keeps them whole).
const MAX_DATAGRAM: usize = 64 * 1024;

pub struct SyslogSink {
    socket: UnixDatagram,
    path: PathBuf,
    /// Datagrams dropped because the daemon was not keeping up or not listening.
    pub dropped: u64,
}

impl SyslogSink {
    /// A non-blocking datagram socket towards `path`.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            path: path.to_path_buf(),
            dropped: 0,
        })
    }

    /// Send every line of a just-written batch as one syslog message each.
    pub fn send_lines(&mut self, batch: &[u8]) {
        for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut datagram = format!("<{PRIORITY}>pgward-audit: ").into_bytes();
            let room = MAX_DATAGRAM.saturating_sub(datagram.len());
            datagram.extend_from_slice(&line[..line.len().min(room)]);
            if self.socket.send_to(&datagram, &self.path).is_err() {
                self.dropped += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_becomes_one_tagged_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let daemon = UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::connect(&path).unwrap();
        sink.send_lines(b"{\"seq\":1}\n{\"seq\":2}\n");
        let mut buf = [0u8; 256];
        for seq in ["1", "2"] {
            let n = daemon.recv(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert_eq!(text, format!("<86>pgward-audit: {{\"seq\":{seq}}}"));
        }
        assert_eq!(sink.dropped, 0);
        drop(daemon);
        sink.send_lines(b"{\"seq\":3}\n");
        assert_eq!(sink.dropped, 1, "no daemon: dropped, not blocked");
    }
}
