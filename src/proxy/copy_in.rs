//! `COPY … FROM STDIN` into tables with encrypted columns: the relay splits the client's
//! CopyData stream into rows (text or CSV format, rows may span messages), encrypts the fields
//! of encrypted columns and appends their blind indexes, as the statement's [`CopyPlan`]
//! (from `crypto::sql`) says. Rows end at LF (or CRLF); a row that cannot be read or whose
//! value is invalid for its column's type fails the COPY (the client's CopyData is replaced by
//! a CopyFail upstream, so the server rolls the whole COPY back).
use crate::crypto::scope::KeyScope;
use crate::crypto::sql::{ColumnRef, CopyPlan};
use crate::crypto::{encode_for_encryption, CryptoError, KeyManager, WireFormat};

/// Why a COPY row could not be encrypted (the message names the column, never the value).
#[derive(Debug)]
pub struct CopyError(pub String);

/// The state of one COPY FROM STDIN.
pub struct CopyIn {
    plan: CopyPlan,
    /// Bytes of a row not yet complete.
    pending: Vec<u8>,
    header_pending: bool,
    /// The end-of-data line `\.` was seen: the rest passes as is.
    ended: bool,
    row: usize,
}

impl CopyIn {
    pub fn new(plan: CopyPlan) -> Self {
        CopyIn {
            header_pending: plan.header,
            plan,
            pending: Vec::new(),
            ended: false,
            row: 0,
        }
    }

    /// Take one CopyData payload; returns the encrypted rows completed so far.
    pub async fn data(
        &mut self,
        manager: &KeyManager,
        scope: &KeyScope,
        chunk: &[u8],
    ) -> Result<Vec<u8>, CopyError> {
        if self.ended {
            return Ok(chunk.to_vec());
        }
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len() * 2);
        let mut start = 0;
        while let Some(end) = self.row_end(start) {
            let line = self.pending[start..end].to_vec();
            self.line(manager, scope, &line, &mut out).await?;
            start = end + 1;
            if self.ended {
                out.extend_from_slice(&self.pending[start..]);
                start = self.pending.len();
                break;
            }
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// CopyDone: a last row without a newline is still a row.
    pub async fn finish(
        &mut self,
        manager: &KeyManager,
        scope: &KeyScope,
    ) -> Result<Vec<u8>, CopyError> {
        let mut out = Vec::new();
        if !self.pending.is_empty() && !self.ended {
            let line = std::mem::take(&mut self.pending);
            self.line(manager, scope, &line, &mut out).await?;
        }
        Ok(out)
    }

    /// Index of the LF ending the row that starts at `start`, outside quotes and escapes.
    fn row_end(&self, start: usize) -> Option<usize> {
        let bytes = &self.pending[start..];
        let mut i = 0;
        let mut quoted = false;
        while i < bytes.len() {
            let b = bytes[i];
            if self.plan.csv {
                if quoted
                    && b == self.plan.escape
                    && bytes.get(i + 1) == Some(&self.plan.quote)
                    && self.plan.escape != self.plan.quote
                {
                    i += 2;
                    continue;
                }
                if b == self.plan.quote {
                    quoted = !quoted;
                } else if b == b'\n' && !quoted {
                    return Some(start + i);
                }
            } else if b == b'\\' {
                i += 2;
                continue;
            } else if b == b'\n' {
                return Some(start + i);
            }
            i += 1;
        }
        None
    }

    async fn line(
        &mut self,
        manager: &KeyManager,
        scope: &KeyScope,
        line: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CopyError> {
        let (line, crlf) = match line.strip_suffix(b"\r") {
            Some(l) => (l, true),
            None => (line, false),
        };
        let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        if line == b"\\." {
            self.ended = true;
            out.extend_from_slice(line);
            out.extend_from_slice(eol);
            return Ok(());
        }
        if std::mem::take(&mut self.header_pending) {
            out.extend_from_slice(line);
            for name in &self.plan.appended_names {
                out.push(self.plan.delimiter);
                out.extend_from_slice(name.as_bytes());
            }
            out.extend_from_slice(eol);
            return Ok(());
        }
        self.row += 1;
        let fields = self.split(line);
        if fields.len() != self.plan.fields.len() {
            return Err(CopyError(format!(
                "pgward: COPY row {} has {} fields, the column list has {}",
                self.row,
                fields.len(),
                self.plan.fields.len()
            )));
        }
        let mut canonicals: Vec<Option<zeroize::Zeroizing<Vec<u8>>>> = Vec::new();
        for (i, (raw, target)) in fields.iter().zip(&self.plan.fields).enumerate() {
            if i > 0 {
                out.push(self.plan.delimiter);
            }
            let Some(c) = target else {
                out.extend_from_slice(raw);
                canonicals.push(None);
                continue;
            };
            match self.value(raw) {
                None => {
                    out.extend_from_slice(self.plan.null.as_bytes());
                    canonicals.push(None);
                }
                Some(text) => {
                    let canonical = zeroize::Zeroizing::new(
                        encode_for_encryption(c.ty, WireFormat::Text, &text)
                            .map_err(|e| self.error(c, &e.to_string()))?,
                    );
                    let sealed = manager
                        .encrypt(&c.table, &c.column, scope, &canonical)
                        .await
                        .map_err(|e| self.crypto_error(c, &e))?;
                    self.put_bytea(out, &sealed);
                    canonicals.push(Some(canonical));
                }
            }
        }
        for &i in &self.plan.blind_indexes {
            out.push(self.plan.delimiter);
            match (&canonicals[i], &self.plan.fields[i]) {
                (Some(canonical), Some(c)) => {
                    let index = manager
                        .blind_index(&c.table, &c.column, scope, canonical)
                        .await
                        .map_err(|e| self.crypto_error(c, &e))?;
                    self.put_bytea(out, &index);
                }
                _ => out.extend_from_slice(self.plan.null.as_bytes()),
            }
        }
        out.extend_from_slice(eol);
        Ok(())
    }

    fn error(&self, c: &ColumnRef, what: &str) -> CopyError {
        CopyError(format!(
            "pgward: COPY row {}: invalid value for encrypted column {}.{}: {what}",
            self.row, c.table, c.column
        ))
    }

    fn crypto_error(&self, c: &ColumnRef, e: &CryptoError) -> CopyError {
        tracing::warn!(table = %c.table, column = %c.column, error = %e, "COPY encryption failed");
        CopyError(format!(
            "pgward: COPY row {}: cannot encrypt {}.{}: {e}",
            self.row, c.table, c.column
        ))
    }

    /// A bytea value as the format writes it: `\\x…` in text (backslash escaped), `\x…` in CSV.
    fn put_bytea(&self, out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(if self.plan.csv { b"\\x" } else { b"\\\\x" });
        out.extend_from_slice(hex::encode(bytes).as_bytes());
    }

    /// The raw fields of a row (still escaped or quoted).
    fn split<'a>(&self, line: &'a [u8]) -> Vec<&'a [u8]> {
        let mut fields = Vec::new();
        let (mut start, mut i, mut quoted) = (0, 0, false);
        while i < line.len() {
            let b = line[i];
            if self.plan.csv {
                if quoted
                    && b == self.plan.escape
                    && self.plan.escape != self.plan.quote
                    && line.get(i + 1) == Some(&self.plan.quote)
                {
                    i += 2;
                    continue;
                }
                if b == self.plan.quote {
                    quoted = !quoted;
                } else if b == self.plan.delimiter && !quoted {
                    fields.push(&line[start..i]);
                    start = i + 1;
                }
            } else if b == b'\\' {
                i += 2;
                continue;
            } else if b == self.plan.delimiter {
                fields.push(&line[start..i]);
                start = i + 1;
            }
            i += 1;
        }
        fields.push(&line[start..line.len().min(line.len())]);
        fields
    }

    /// The value of a raw field; `None` for NULL.
    fn value(&self, raw: &[u8]) -> Option<Vec<u8>> {
        if self.plan.csv {
            if raw == self.plan.null.as_bytes() {
                return None;
            }
            let Some(inner) = raw
                .strip_prefix(&[self.plan.quote])
                .and_then(|r| r.strip_suffix(&[self.plan.quote]))
            else {
                return Some(raw.to_vec());
            };
            let mut v = Vec::with_capacity(inner.len());
            let mut i = 0;
            while i < inner.len() {
                if inner[i] == self.plan.escape && inner.get(i + 1) == Some(&self.plan.quote) {
                    v.push(self.plan.quote);
                    i += 2;
                } else {
                    v.push(inner[i]);
                    i += 1;
                }
            }
            return Some(v);
        }
        if raw == self.plan.null.as_bytes() {
            return None;
        }
        Some(unescape_text(raw))
    }
}

/// COPY text-format escapes: `\b \f \n \r \t \v \\`, octal `\ooo`, hex `\xhh`, else the char.
fn unescape_text(raw: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 >= raw.len() {
            v.push(raw[i]);
            i += 1;
            continue;
        }
        let c = raw[i + 1];
        i += 2;
        match c {
            b'b' => v.push(8),
            b'f' => v.push(12),
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'v' => v.push(11),
            b'0'..=b'7' => {
                let mut n = u32::from(c - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            n = n * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                v.push((n & 0xff) as u8);
            }
            b'x' if raw.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut n = 0u32;
                for _ in 0..2 {
                    match raw.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            n = n * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                v.push(n as u8);
            }
            other => v.push(other),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_escapes_decode_like_postgres() {
        assert_eq!(
            unescape_text(br"a\tb\\c\nd\101\x41\q"),
            b"a\tb\\c\ndAAq".to_vec()
        );
    }
}
