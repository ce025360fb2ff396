//! The untagged packets a connection starts with.
//!
//! The length is checked against [`MAX_STARTUP_PACKET`] before anything is allocated, and the
//! packet is read with exact reads so that no byte past it is consumed: whatever a client sends
//! after an SSLRequest belongs to the TLS handshake, never to the protocol.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::cursor::take_cstr;
use super::{codes, ProtocolError, MAX_STARTUP_PACKET};

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption (always declined).
    GssEncRequest,
    /// Cancel the query running on the session with this key.
    CancelRequest { process_id: u32, secret_key: u32 },
    /// A cancel forwarded by another pgward replica (its tag not yet checked).
    PeerCancel(super::peer_cancel::PeerCancelRequest),
    /// A protocol-3 StartupMessage.
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version and the parameters, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// Minor protocol version requested (major is always 3).
    pub minor_version: u16,
    /// Parameters as (name, value), in the order the client sent them.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// Value of a parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read one startup packet. `first` holds bytes already read (at most 8: direct-TLS sniffing).
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<StartupPacket, ProtocolError> {
    let mut len_bytes = [0u8; 4];
    read_exact_or_truncated(stream, &mut len_bytes).await?;
    read_startup_packet_after_len(stream, len_bytes).await
}

/// Like [`read_startup_packet`], for a caller that already consumed the four length bytes.
pub async fn read_startup_packet_after_len<R: AsyncRead + Unpin>(
    stream: &mut R,
    len_bytes: [u8; 4],
) -> Result<StartupPacket, ProtocolError> {
    let declared = i32::from_be_bytes(len_bytes);
    let len =
        usize::try_from(declared).map_err(|_| ProtocolError::BadLength(i64::from(declared)))?;
    if len < 8 {
        return Err(ProtocolError::BadLength(i64::from(declared)));
    }
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    let mut body = vec![0u8; len - 4];
    read_exact_or_truncated(stream, &mut body).await?;
    parse_startup_body(&body)
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut [u8],
) -> Result<(), ProtocolError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProtocolError::Truncated),
        Err(e) => Err(ProtocolError::Io(e)),
    }
}

/// Parse the body of a startup packet (everything after the length).
pub fn parse_startup_body(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let (code_bytes, rest) = body
        .split_first_chunk::<4>()
        .ok_or(ProtocolError::Malformed { what: "startup" })?;
    let code = u32::from_be_bytes(*code_bytes);
    match code {
        codes::SSL_REQUEST if rest.is_empty() => Ok(StartupPacket::SslRequest),
        codes::GSSENC_REQUEST if rest.is_empty() => Ok(StartupPacket::GssEncRequest),
        codes::CANCEL_REQUEST => {
            let (pid, key) = rest
                .split_first_chunk::<4>()
                .and_then(|(pid, tail)| Some((pid, tail.first_chunk::<4>()?)))
                .filter(|_| rest.len() == 8)
                .ok_or(ProtocolError::Malformed {
                    what: "CancelRequest",
                })?;
            Ok(StartupPacket::CancelRequest {
                process_id: u32::from_be_bytes(*pid),
                secret_key: u32::from_be_bytes(*key),
            })
        }
        codes::PEER_CANCEL_REQUEST => Ok(StartupPacket::PeerCancel(
            super::peer_cancel::PeerCancelRequest::decode(rest)?,
        )),
        codes::SSL_REQUEST | codes::GSSENC_REQUEST => Err(ProtocolError::Malformed {
            what: "encryption request",
        }),
        version => {
            let major = (version >> 16) as u16;
            let minor = (version & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            Ok(StartupPacket::Startup(StartupMessage {
                minor_version: minor,
                params: parse_params(rest)?,
            }))
        }
    }
}

/// NUL-terminated name/value pairs, ended by an empty name.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let malformed = ProtocolError::Malformed {
        what: "StartupMessage",
    };
    let mut params = Vec::new();
    loop {
        let (name, after_name) = take_cstr(rest).ok_or(ProtocolError::Malformed {
            what: "StartupMessage",
        })?;
        if name.is_empty() {
            if !after_name.is_empty() {
                return Err(malformed);
            }
            return Ok(params);
        }
        let (value, after_value) = take_cstr(after_name).ok_or(ProtocolError::Malformed {
            what: "StartupMessage",
        })?;
        let name = std::str::from_utf8(name).map_err(|_| ProtocolError::Malformed {
            what: "StartupMessage",
        })?;
        let value = std::str::from_utf8(value).map_err(|_| ProtocolError::Malformed {
            what: "StartupMessage",
        })?;
        if params.iter().any(|(k, _): &(String, String)| k == name) {
            return Err(ProtocolError::Malformed {
                what: "StartupMessage (duplicate parameter)",
            });
        }
        params.push((name.to_string(), value.to_string()));
        rest = after_value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[tokio::test]
    async fn parses_startup_parameters_in_order() {
        let wire = packet(
            codes::PROTOCOL_3_0,
            b"user\0billing\0database\0app\0options\0-c x=1\0\0",
        );
        let StartupPacket::Startup(msg) = read_startup_packet(&mut &wire[..]).await.unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!(msg.get("user"), Some("billing"));
        assert_eq!(msg.params[2], ("options".into(), "-c x=1".into()));
    }

    #[tokio::test]
    async fn reads_exactly_the_ssl_request_and_nothing_after_it() {
        let mut wire = packet(codes::SSL_REQUEST, b"");
        wire.extend_from_slice(b"Qgarbage");
        let mut cursor = &wire[..];
        assert_eq!(
            read_startup_packet(&mut cursor).await.unwrap(),
            StartupPacket::SslRequest
        );
        assert_eq!(cursor, b"Qgarbage");
    }

    #[tokio::test]
    async fn bounds_the_length_before_allocating() {
        let wire = [0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0];
        assert!(matches!(
            read_startup_packet(&mut &wire[..]).await,
            Err(ProtocolError::TooLarge { .. })
        ));
        let wire = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_startup_packet(&mut &wire[..]).await,
            Err(ProtocolError::BadLength(_))
        ));
    }

    #[test]
    fn cancel_request_needs_exactly_eight_bytes() {
        let ok = packet(codes::CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            parse_startup_body(&ok[4..]).unwrap(),
            StartupPacket::CancelRequest {
                process_id: 7,
                secret_key: 9
            }
        );
        let short = packet(codes::CANCEL_REQUEST, &[0, 0, 0, 7]);
        assert!(parse_startup_body(&short[4..]).is_err());
    }

    #[test]
    fn rejects_unterminated_and_non_utf8_parameters() {
        assert!(parse_startup_body(&packet(codes::PROTOCOL_3_0, b"user\0x")[4..]).is_err());
        assert!(parse_startup_body(&packet(codes::PROTOCOL_3_0, b"user\0\xff\0\0")[4..]).is_err());
        assert!(
            parse_startup_body(&packet(codes::PROTOCOL_3_0, b"user\0a\0user\0b\0\0")[4..]).is_err()
        );
        assert!(parse_startup_body(&packet(2 << 16, b"\0")[4..]).is_err());
    }
}
