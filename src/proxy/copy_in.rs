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
        while let Some(end) = self.row_end(start)? {
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
            if self.pending.last() == Some(&b'\r') {
                return Err(self.bare_carriage_return());
            }
            let line = std::mem::take(&mut self.pending);
            self.line(manager, scope, &line, &mut out).await?;
        }
        Ok(out)
    }

    /// Index of the LF ending the row that starts at `start`, found as the server finds it
    /// (`CopyReadLineText`): in CSV, outside quotes — an escape inside quotes escapes the next
    /// escape or quote, toggling as the server's does; in text, outside backslash escapes.
    /// A bare carriage return (one not followed by LF) is refused: the server would end the
    /// row there (CR line endings), which this relay does not split on.
    fn row_end(&self, start: usize) -> Result<Option<usize>, CopyError> {
        let bytes = &self.pending[start..];
        // The server ignores the escape when it is the quote (`""` is then two toggles).
        let escape = (self.plan.escape != self.plan.quote).then_some(self.plan.escape);
        let (mut in_quote, mut last_was_escape) = (false, false);
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if self.plan.csv {
                if in_quote && Some(b) == escape {
                    last_was_escape = !last_was_escape;
                }
                if b == self.plan.quote && !last_was_escape {
                    in_quote = !in_quote;
                }
                if Some(b) != escape {
                    last_was_escape = false;
                }
                if in_quote {
                    i += 1;
                    continue;
                }
            } else if b == b'\\' {
                i += 2;
                continue;
            }
            match b {
                b'\n' => return Ok(Some(start + i)),
                b'\r' => match bytes.get(i + 1) {
                    Some(b'\n') | None => {}
                    Some(_) => return Err(self.bare_carriage_return()),
                },
                _ => {}
            }
            i += 1;
        }
        Ok(None)
    }

    fn bare_carriage_return(&self) -> CopyError {
        CopyError(format!(
            "pgward: COPY row {}: a carriage return outside a quoted field must be followed by a newline (rows end with LF or CRLF)",
            self.row + 1
        ))
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
        let fields = if self.plan.csv {
            self.csv_fields(line)?
        } else {
            self.text_fields(line)
        };
        if fields.len() != self.plan.fields.len() {
            return Err(CopyError(format!(
                "pgward: COPY row {} has {} fields, the column list has {}",
                self.row,
                fields.len(),
                self.plan.fields.len()
            )));
        }
        let mut canonicals: Vec<Option<zeroize::Zeroizing<Vec<u8>>>> = Vec::new();
        for (i, (field, target)) in fields.iter().zip(&self.plan.fields).enumerate() {
            if i > 0 {
                out.push(self.plan.delimiter);
            }
            let Some(c) = target else {
                out.extend_from_slice(field.raw);
                canonicals.push(None);
                continue;
            };
            match self.value(field) {
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

    /// A text-format row's fields: split at unescaped delimiters, decoded lazily.
    fn text_fields<'a>(&self, line: &'a [u8]) -> Vec<Field<'a>> {
        let mut fields = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < line.len() {
            match line[i] {
                b'\\' => {
                    i += 2;
                    continue;
                }
                b if b == self.plan.delimiter => {
                    fields.push(self.text_field(&line[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        fields.push(self.text_field(&line[start..]));
        fields
    }

    fn text_field<'a>(&self, raw: &'a [u8]) -> Field<'a> {
        Field {
            raw,
            csv_value: None,
        }
    }

    /// A field's value (`None`: NULL).
    fn value<'f>(&self, field: &'f Field<'_>) -> Option<std::borrow::Cow<'f, [u8]>> {
        match &field.csv_value {
            Some(csv) => csv.as_deref().map(std::borrow::Cow::Borrowed),
            None => (field.raw != self.plan.null.as_bytes())
                .then(|| std::borrow::Cow::Owned(unescape_text(field.raw))),
        }
    }

    /// A CSV row's fields, read as the server reads them (`CopyReadAttributesCSV`): quotes may
    /// open and close anywhere in a field; inside them the escape makes a following escape or
    /// quote literal; an unquoted field equal to the NULL string is NULL.
    fn csv_fields<'a>(&self, line: &'a [u8]) -> Result<Vec<Field<'a>>, CopyError> {
        let (delimiter, quote, escape) = (self.plan.delimiter, self.plan.quote, self.plan.escape);
        let mut fields = Vec::new();
        let mut i = 0;
        loop {
            let start = i;
            let (mut value, mut saw_quote, mut in_quote) = (Vec::new(), false, false);
            while i < line.len() {
                let b = line[i];
                i += 1;
                if in_quote {
                    if b == escape && matches!(line.get(i), Some(&n) if n == escape || n == quote) {
                        value.push(line[i]);
                        i += 1;
                    } else if b == quote {
                        in_quote = false;
                    } else {
                        value.push(b);
                    }
                } else if b == delimiter {
                    i -= 1;
                    break;
                } else if b == quote {
                    (saw_quote, in_quote) = (true, true);
                } else {
                    value.push(b);
                }
            }
            if in_quote {
                return Err(CopyError(format!(
                    "pgward: COPY row {}: unterminated CSV quoted field",
                    self.row
                )));
            }
            let raw = &line[start..i];
            let null = !saw_quote && raw == self.plan.null.as_bytes();
            fields.push(Field {
                raw,
                csv_value: Some((!null).then_some(value)),
            });
            if i >= line.len() {
                return Ok(fields);
            }
            i += 1; // the delimiter
        }
    }
}

/// One field of a COPY row: its bytes as sent (passed on as is for a column that is not
/// encrypted) and, read in CSV, its value (`None`: NULL); a text field's value is decoded
/// only when its column is encrypted.
struct Field<'a> {
    raw: &'a [u8],
    csv_value: Option<Option<Vec<u8>>>,
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

    fn csv(escape: u8) -> CopyIn {
        CopyIn::new(CopyPlan {
            csv: true,
            delimiter: b',',
            null: String::new(),
            header: false,
            quote: b'"',
            escape,
            fields: Vec::new(),
            blind_indexes: Vec::new(),
            appended_names: Vec::new(),
        })
    }

    /// The rows and field values of `data` as the relay reads them (`None`: NULL).
    fn read(copy: &mut CopyIn, data: &[u8]) -> Result<Vec<Vec<Option<String>>>, CopyError> {
        copy.pending = data.to_vec();
        let mut rows = Vec::new();
        let mut start = 0;
        while let Some(end) = copy.row_end(start)? {
            let line = copy.pending[start..end].to_vec();
            let fields = if copy.plan.csv {
                copy.csv_fields(&line)?
            } else {
                copy.text_fields(&line)
            };
            rows.push(
                fields
                    .iter()
                    .map(|f| {
                        copy.value(f)
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                    })
                    .collect(),
            );
            start = end + 1;
        }
        Ok(rows)
    }

    fn row(fields: &[Option<&str>]) -> Vec<Option<String>> {
        fields.iter().map(|f| f.map(str::to_string)).collect()
    }

    #[test]
    fn a_csv_escape_escapes_itself_inside_quotes_as_the_server_reads_it() {
        // ESCAPE '\': `"\\"` is one backslash and the quote closes after it, so the row
        // ends at the first newline, with the third field on it — not inside a quote that
        // swallows the next row.
        let mut copy = csv(b'\\');
        let rows = read(&mut copy, b"1,\"\\\\\",ZZ\n1,\\\"\",x\n").unwrap();
        assert_eq!(
            rows,
            vec![
                row(&[Some("1"), Some("\\"), Some("ZZ")]),
                // Outside quotes the escape is data; `""` opens and closes an empty quote.
                row(&[Some("1"), Some("\\"), Some("x")]),
            ]
        );
        // A quote reopened after an escaped escape holds the newline and an end-of-data
        // line: one row, whose third field is the one after it.
        let rows = read(&mut copy, b"1,\"\\\\\"\",x\n\\.\n\",ZZ\n").unwrap();
        assert_eq!(
            rows,
            vec![row(&[Some("1"), Some("\\,x\n\\.\n"), Some("ZZ")])]
        );
    }

    #[test]
    fn csv_fields_read_like_postgres() {
        let mut copy = csv(b'"');
        let rows = read(
            &mut copy,
            b"\"a\"\"b\",c\na\"b,c\"d,e\n,\"\"\n\"multi\nline\",x\r\n",
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                row(&[Some("a\"b"), Some("c")]),
                row(&[Some("ab,cd"), Some("e")]),
                row(&[None, Some("")]),
                row(&[Some("multi\nline"), Some("x\r")]),
            ]
        );
        assert!(copy.csv_fields(b"\"open,x").is_err());
    }

    #[test]
    fn a_bare_carriage_return_is_refused_not_read_as_data() {
        let mut copy = csv(b'"');
        assert!(read(&mut copy, b"a,b\rc,d\n").is_err());
        assert!(
            read(&mut copy, b"\"a\rb\",c\n").is_ok(),
            "quoted CR is data"
        );
        copy.plan.csv = false;
        copy.plan.delimiter = b'\t';
        copy.plan.null = "\\N".into();
        assert!(read(&mut copy, b"a\tb\rc\n").is_err());
        assert_eq!(
            read(&mut copy, b"a\\\rb\t\\N\n").unwrap(),
            vec![row(&[Some("a\rb"), None])],
            "an escaped CR is data"
        );
    }

    #[test]
    fn text_escapes_decode_like_postgres() {
        assert_eq!(
            unescape_text(br"a\tb\\c\nd\101\x41\q"),
            b"a\tb\\c\ndAAq".to_vec()
        );
    }
}
