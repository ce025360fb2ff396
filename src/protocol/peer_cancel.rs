//! PeerCancelRequest: a client's CancelRequest that one pgward replica hands on to the replica
//! whose node id its secret key names (pgward's own startup-phase packet, never sent by a
//! PostgreSQL client or server).
//!
//! ```text
//! Int32 length (60) · Int32 code (1234.5701) · Int32 process id · Int32 secret key
//! · Int32 origin node id · Int64 unix time (seconds) · Byte32 HMAC-SHA256 tag
//! ```
//!
//! The tag covers everything before it under the cluster's shared secret
//! ([`PeerCancelRequest::signed_bytes`]); checking it is the receiver's job (`proxy::cluster`).
//! A distinct request code, not a flag inside a CancelRequest, is what tells a forwarded cancel
//! from a client's on the same port: a receiver never forwards one again.

use bytes::{BufMut, Bytes, BytesMut};

use super::{codes, ProtocolError};

/// Total length of the packet, length word included.
pub const PEER_CANCEL_LEN: usize = 60;

/// Length of the authentication tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;

/// Domain separation for the tag, so it can never be confused with another use of the secret.
const TAG_CONTEXT: &[u8] = b"pgward peer cancel v1\0";

/// A forwarded cancel, as read from the wire (the tag not yet checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCancelRequest {
    pub process_id: u32,
    pub secret_key: u32,
    /// The replica that forwarded it.
    pub origin: u32,
    /// When it was forwarded (seconds since the Unix epoch, the origin's clock).
    pub unix_time: u64,
    pub tag: [u8; TAG_LEN],
}

impl PeerCancelRequest {
    /// The bytes the tag authenticates: a context string and every field before the tag.
    pub fn signed_bytes(process_id: u32, secret_key: u32, origin: u32, unix_time: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(TAG_CONTEXT.len() + 20);
        out.extend_from_slice(TAG_CONTEXT);
        out.extend_from_slice(&process_id.to_be_bytes());
        out.extend_from_slice(&secret_key.to_be_bytes());
        out.extend_from_slice(&origin.to_be_bytes());
        out.extend_from_slice(&unix_time.to_be_bytes());
        out
    }

    /// The packet on the wire.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(PEER_CANCEL_LEN);
        // A constant that fits: 60.
        buf.put_u32(PEER_CANCEL_LEN as u32);
        buf.put_u32(codes::PEER_CANCEL_REQUEST);
        buf.put_u32(self.process_id);
        buf.put_u32(self.secret_key);
        buf.put_u32(self.origin);
        buf.put_u64(self.unix_time);
        buf.put_slice(&self.tag);
        buf.freeze()
    }

    /// Parse what follows the request code (the length was already checked by the caller's
    /// framing; anything but exactly the fields is malformed).
    pub fn decode(rest: &[u8]) -> Result<Self, ProtocolError> {
        let malformed = || ProtocolError::Malformed {
            what: "PeerCancelRequest",
        };
        let fields: &[u8; PEER_CANCEL_LEN - 8] = rest.try_into().map_err(|_| malformed())?;
        let (pid, rest) = fields.split_first_chunk::<4>().ok_or_else(malformed)?;
        let (key, rest) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let (origin, rest) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let (time, tag) = rest.split_first_chunk::<8>().ok_or_else(malformed)?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| malformed())?;
        Ok(Self {
            process_id: u32::from_be_bytes(*pid),
            secret_key: u32::from_be_bytes(*key),
            origin: u32::from_be_bytes(*origin),
            unix_time: u64::from_be_bytes(*time),
            tag,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::startup::{parse_startup_body, StartupPacket};

    #[test]
    fn round_trips_through_the_startup_parser() {
        let request = PeerCancelRequest {
            process_id: 4242,
            secret_key: 0xdead_beef,
            origin: 3,
            unix_time: 1_700_000_000,
            tag: [7; TAG_LEN],
        };
        let wire = request.encode();
        assert_eq!(wire.len(), PEER_CANCEL_LEN);
        assert_eq!(&wire[..4], &60u32.to_be_bytes());
        assert_eq!(
            parse_startup_body(&wire[4..]).unwrap(),
            StartupPacket::PeerCancel(request)
        );
    }

    #[test]
    fn any_other_length_is_malformed() {
        let request = PeerCancelRequest {
            process_id: 1,
            secret_key: 2,
            origin: 3,
            unix_time: 4,
            tag: [0; TAG_LEN],
        };
        let wire = request.encode();
        assert!(parse_startup_body(&wire[4..wire.len() - 1]).is_err());
        let mut long = wire.to_vec();
        long.push(0);
        assert!(parse_startup_body(&long[4..]).is_err());
        assert!(PeerCancelRequest::decode(&[]).is_err());
    }

    #[test]
    fn the_signed_bytes_cover_every_field() {
        let base = PeerCancelRequest::signed_bytes(1, 2, 3, 4);
        for other in [
            PeerCancelRequest::signed_bytes(9, 2, 3, 4),
            PeerCancelRequest::signed_bytes(1, 9, 3, 4),
            PeerCancelRequest::signed_bytes(1, 2, 9, 4),
            PeerCancelRequest::signed_bytes(1, 2, 3, 9),
        ] {
            assert_ne!(base, other);
        }
    }
}
