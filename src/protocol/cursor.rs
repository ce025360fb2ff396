//! One reader for message bodies: every read is bounds-checked and a short body is an error,
//! never a panic or a silently truncated value.

use super::ProtocolError;

/// A cursor over a message body.
#[derive(Clone, Copy, Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
    /// The message being read, for the error.
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor over `body`, reporting a short read as a malformed `what` message.
    pub fn new(body: &'a [u8], what: &'static str) -> Self {
        Self { rest: body, what }
    }

    fn malformed(&self) -> ProtocolError {
        ProtocolError::Malformed { what: self.what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < n {
            return Err(self.malformed());
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.bytes(1).map(|b| b[0])
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        self.bytes(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        self.bytes(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string's bytes (without the NUL).
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let (s, rest) = take_cstr(self.rest).ok_or_else(|| self.malformed())?;
        self.rest = rest;
        Ok(s)
    }

    /// A NUL-terminated UTF-8 string. pgward sessions are UTF8 end to end, so anything else is
    /// a malformed message rather than a name to be converted lossily (two different byte
    /// strings must never become the same statement or portal name).
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed())
    }

    /// A length-prefixed value; `None` is SQL NULL (length -1).
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, ProtocolError> {
        let len = self.i32()?;
        if len < 0 {
            return if len == -1 {
                Ok(None)
            } else {
                Err(self.malformed())
            };
        }
        let len = usize::try_from(len).map_err(|_| self.malformed())?;
        self.bytes(len).map(Some)
    }

    /// `n` big-endian 16-bit values, as their raw bytes (read lazily with [`i16_at`]).
    pub fn i16_array(&mut self, n: u16) -> Result<&'a [u8], ProtocolError> {
        self.bytes(usize::from(n) * 2)
    }

    /// What has not been read.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// Nothing may follow: trailing bytes make the message malformed.
    pub fn finish(self) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed())
        }
    }
}

/// The `i`-th value of an array read by [`Cursor::i16_array`].
pub fn i16_at(array: &[u8], i: usize) -> Option<i16> {
    let at = i.checked_mul(2)?;
    let b = array.get(at..at + 2)?;
    Some(i16::from_be_bytes([b[0], b[1]]))
}

/// Split a NUL-terminated string off the front of `buf`.
pub fn take_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_errors() {
        let mut c = Cursor::new(&[0, 1, 2], "Test");
        assert_eq!(c.u16().unwrap(), 1);
        assert!(c.u16().is_err());
        assert!(Cursor::new(b"abc", "Test").cstr().is_err());
    }

    #[test]
    fn values_reject_negative_lengths_other_than_null() {
        let null = (-1i32).to_be_bytes();
        assert_eq!(Cursor::new(&null, "T").value().unwrap(), None);
        let bad = (-2i32).to_be_bytes();
        assert!(Cursor::new(&bad, "T").value().is_err());
        let huge = i32::MAX.to_be_bytes();
        assert!(Cursor::new(&huge, "T").value().is_err());
    }

    #[test]
    fn names_must_be_utf8() {
        assert!(Cursor::new(b"\xff\xfe\0", "T").cstr().is_err());
        assert_eq!(Cursor::new(b"s1\0", "T").cstr().unwrap(), "s1");
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let mut c = Cursor::new(b"a\0x", "T");
        c.cstr().unwrap();
        assert!(c.finish().is_err());
    }
}
