//! The PostgreSQL frontend/backend wire protocol, as far as a proxy needs it.
//!
//! Everything that frames, parses or builds protocol bytes lives here, so length caps and the
//! "nothing may follow an SSLRequest" rule are enforced in one place:
//! - [`frame`]: splitting a byte stream into whole messages, zero-copy, with a size cap;
//! - [`startup`]: the untagged startup packets (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage);
//! - [`peer_cancel`]: pgward's own PeerCancelRequest, a cancel one replica hands on to another;
//! - [`proxy_header`]: the PROXY protocol header a load balancer sends before all of these;
//! - [`build`]: the messages pgward itself originates (ErrorResponse, AuthenticationOk, ...);
//! - [`cursor`]: the one bounds-checked reader every body is read with;
//! - [`view`]: typed zero-copy views of the messages pgward reads, decoded once per message;
//! - [`fields`]: ErrorResponse fields and the password message;
//! - [`replies`]: which request each backend message answers.

pub mod build;
pub mod cursor;
pub mod fields;
pub mod frame;
pub mod peer_cancel;
pub mod proxy_header;
pub mod replies;
pub mod startup;
pub mod view;

pub use frame::{Batch, FrameReader, Message};

use thiserror::Error;

/// Request codes of the untagged startup packets.
pub mod codes {
    /// SSLRequest.
    pub const SSL_REQUEST: u32 = 80_877_103;
    /// GSSENCRequest.
    pub const GSSENC_REQUEST: u32 = 80_877_104;
    /// CancelRequest.
    pub const CANCEL_REQUEST: u32 = 80_877_102;
    /// pgward's PeerCancelRequest (1234.5701): a cancel forwarded by another replica.
    pub const PEER_CANCEL_REQUEST: u32 = 80_877_125;
    /// Protocol version 3.0.
    pub const PROTOCOL_3_0: u32 = 196_608;
}

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Tags of frontend (client → server) messages.
pub mod frontend {
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PARSE: u8 = b'P';
    pub const PASSWORD: u8 = b'p';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const TERMINATE: u8 = b'X';
}

/// Tags of backend (server → client) messages.
pub mod backend {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// A violation of the wire protocol by the peer.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("unexpected data after SSLRequest or GSSENCRequest before the encryption handshake")]
    DataAfterEncryptionRequest,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
