//! Splitting a byte stream into whole tagged messages, without copying.
//!
//! A [`FrameReader`] reads into one growing buffer and hands out a [`Batch`]: every complete
//! message that has arrived, as one contiguous `Bytes`. Pass-through relaying writes the batch
//! as-is (one write for many pipelined messages); inspection walks the batch's messages as
//! zero-copy slices. The length prefix is checked against a cap before any buffer grows.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;

/// Tag byte plus the four-byte length.
pub const HEADER_LEN: usize = 5;

/// One complete tagged message (tag, length, body), sharing the buffer it arrived in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    raw: Bytes,
}

impl Message {
    /// Wrap raw bytes that already hold exactly one well-framed message.
    pub fn from_raw(raw: Bytes) -> Result<Self, ProtocolError> {
        match frame_len(&raw, usize::MAX)? {
            Some(len) if len == raw.len() => Ok(Self { raw }),
            _ => Err(ProtocolError::Malformed { what: "framed" }),
        }
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message body, after tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The whole message as it goes on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Consume into the wire bytes.
    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

/// Every complete message that had arrived when it was read, contiguous.
#[derive(Clone, Debug)]
pub struct Batch {
    bytes: Bytes,
}

impl Batch {
    /// A batch of messages pgward assembled itself (each framed by `protocol::build` or a
    /// rewrite of a framed message). Callers guarantee whole frames; iteration stops at the
    /// first incomplete one rather than panicking.
    pub fn from_whole_messages(bytes: Bytes) -> Self {
        Self { bytes }
    }

    /// The wire bytes of all messages of the batch.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Iterate the messages (each a zero-copy slice of the batch).
    pub fn messages(&self) -> BatchIter<'_> {
        BatchIter {
            bytes: &self.bytes,
            offset: 0,
        }
    }
}

/// Iterator over a [`Batch`]'s messages.
pub struct BatchIter<'a> {
    bytes: &'a Bytes,
    offset: usize,
}

impl Iterator for BatchIter<'_> {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        let rest = self.bytes.get(self.offset..)?;
        // A Batch only ever holds complete frames, checked when it was cut.
        let len = frame_len(rest, usize::MAX).ok().flatten()?;
        let raw = self.bytes.slice(self.offset..self.offset + len);
        self.offset += len;
        Some(Message { raw })
    }
}

/// Total length (header included) of the frame at the start of `buf`, if it is complete.
///
/// Errors on a length prefix below 4 or above `max_len`, before anything is allocated.
pub fn frame_len(buf: &[u8], max_len: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let declared = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if declared < 4 {
        return Err(ProtocolError::BadLength(i64::from(declared)));
    }
    // declared >= 4, so the conversion cannot fail on any supported platform.
    let body_and_len =
        usize::try_from(declared).map_err(|_| ProtocolError::BadLength(i64::from(declared)))?;
    let total = body_and_len + 1;
    if total > max_len {
        return Err(ProtocolError::TooLarge {
            len: total,
            max: max_len,
        });
    }
    Ok((buf.len() >= total).then_some(total))
}

/// Reads whole messages from a stream with a per-message size cap.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_message_len: usize,
}

/// Initial read buffer; grows to fit the largest message seen (up to the cap).
const READ_CHUNK: usize = 16 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses messages larger than `max_message_len` bytes.
    pub fn new(inner: R, max_message_len: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_message_len,
        }
    }

    /// A reader that starts with bytes already read from the stream.
    pub fn with_buffered(inner: R, max_message_len: usize, already: BytesMut) -> Self {
        let mut reader = Self::new(inner, max_message_len);
        reader.buf.extend_from_slice(&already);
        reader
    }

    /// Next batch of complete messages; `None` on a clean end of stream between messages.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, ProtocolError> {
        loop {
            let complete = self.complete_prefix_len()?;
            if complete > 0 {
                let bytes = self.buf.split_to(complete).freeze();
                return Ok(Some(Batch { bytes }));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Next single message (used during startup and authentication).
    pub async fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        loop {
            if let Some(len) = frame_len(&self.buf, self.max_message_len)? {
                let raw = self.buf.split_to(len).freeze();
                return Ok(Some(Message { raw }));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Read more bytes: room for more of the pending frame once its length is known — growing
    /// with what has arrived (doubling), never by the length alone: a peer that declares a
    /// message of a hundred megabytes and sends ten bytes must not make the proxy reserve them
    /// (on a host with strict overcommit a failed reservation aborts the process) — else a
    /// chunk. `false` at a clean end of stream (between messages); a stream ending inside a
    /// message is `Truncated`.
    async fn fill(&mut self) -> Result<bool, ProtocolError> {
        if let Some(needed) = self.pending_frame_len()? {
            let missing = needed.saturating_sub(self.buf.len());
            self.buf
                .reserve(missing.min(self.buf.len().max(READ_CHUNK)));
        } else if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        if self.inner.read_buf(&mut self.buf).await? > 0 {
            return Ok(true);
        }
        if self.buf.is_empty() {
            Ok(false)
        } else {
            Err(ProtocolError::Truncated)
        }
    }

    /// Length of the run of complete frames at the start of the buffer.
    fn complete_prefix_len(&self) -> Result<usize, ProtocolError> {
        let mut offset = 0;
        while let Some(len) = frame_len(&self.buf[offset..], self.max_message_len)? {
            offset += len;
        }
        Ok(offset)
    }

    /// Declared total length of the incomplete frame at the buffer start, once its header is in.
    fn pending_frame_len(&self) -> Result<Option<usize>, ProtocolError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = &self.buf[1..HEADER_LEN];
        let declared = header.get_i32();
        if declared < 4 {
            return Err(ProtocolError::BadLength(i64::from(declared)));
        }
        let total = usize::try_from(declared)
            .map_err(|_| ProtocolError::BadLength(i64::from(declared)))?
            + 1;
        if total > self.max_message_len {
            return Err(ProtocolError::TooLarge {
                len: total,
                max: self.max_message_len,
            });
        }
        Ok(Some(total))
    }

    /// Bytes read but not yet handed out.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Give back the stream and whatever was buffered.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn batches_whole_messages_and_keeps_partial_ones() {
        let mut wire = msg(b'Q', b"select 1\0");
        wire.extend(msg(b'S', b""));
        let partial = msg(b'Q', b"select 2\0");
        wire.extend_from_slice(&partial[..7]);
        let mut reader = FrameReader::new(&wire[..], 1024);
        let batch = reader.next_batch().await.unwrap().unwrap();
        let tags: Vec<u8> = batch.messages().map(|m| m.tag()).collect();
        assert_eq!(tags, vec![b'Q', b'S']);
        assert_eq!(batch.bytes().len(), 10 + 4 + 5);
        assert!(matches!(
            reader.next_batch().await,
            Err(ProtocolError::Truncated)
        ));
    }

    #[tokio::test]
    async fn a_declared_length_alone_reserves_nothing_near_it() {
        let mut wire = vec![b'Q'];
        wire.extend_from_slice(&100_000_000i32.to_be_bytes());
        wire.extend_from_slice(b"select 1");
        let mut reader = FrameReader::new(&wire[..], 128 << 20);
        assert!(reader.fill().await.unwrap());
        assert!(matches!(reader.fill().await, Err(ProtocolError::Truncated)));
        assert!(
            reader.buf.capacity() < 1 << 20,
            "reserved {} bytes for 13 received",
            reader.buf.capacity()
        );
        // A message that does arrive is still read whole.
        let body = vec![b'x'; 3 << 20];
        let whole = msg(b'd', &body);
        let mut reader = FrameReader::new(&whole[..], 128 << 20);
        let batch = reader.next_batch().await.unwrap().unwrap();
        assert_eq!(batch.bytes().len(), whole.len());
    }

    #[tokio::test]
    async fn refuses_oversized_length_before_reading_the_body() {
        let wire = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        let mut reader = FrameReader::new(&wire[..], 1024);
        assert!(matches!(
            reader.next_batch().await,
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn refuses_lengths_below_four() {
        for declared in [-1i32, 0, 3] {
            let mut wire = vec![b'Q'];
            wire.extend_from_slice(&declared.to_be_bytes());
            let mut reader = FrameReader::new(&wire[..], 1024);
            assert!(matches!(
                reader.next_batch().await,
                Err(ProtocolError::BadLength(_))
            ));
        }
    }

    #[tokio::test]
    async fn clean_eof_between_messages_is_none() {
        let wire = msg(b'X', b"");
        let mut reader = FrameReader::new(&wire[..], 1024);
        assert!(reader.next_message().await.unwrap().is_some());
        assert!(reader.next_message().await.unwrap().is_none());
    }

    #[test]
    fn message_views_share_the_batch_buffer() {
        let mut wire = msg(b'P', b"\0select 1\0\0\0");
        wire.extend(msg(b'S', b""));
        let batch = Batch {
            bytes: Bytes::from(wire),
        };
        let first = batch.messages().next().unwrap();
        assert_eq!(first.body(), b"\0select 1\0\0\0");
        assert_eq!(first.raw().as_ptr(), batch.bytes().as_ptr());
    }
}
