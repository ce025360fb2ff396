//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a load balancer in front of
//! pgward sends first on each connection, naming the client it accepted — so sessions, logs
//! and audit records carry the client's address instead of the balancer's.
//!
//! A header is read only from the peers listed in `listen.proxy_protocol_from`, and required
//! from them. From anyone else a header would be a client choosing the address it is audited
//! under: it is not looked for, and fails as an invalid startup packet.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The twelve bytes that open a version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The most address and TLV bytes a version 2 header may announce: balancers send tens of
/// bytes; a larger length is a peer that is not speaking the protocol.
const V2_MAX_BODY: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("expected a PROXY protocol header from this load balancer")]
    Missing,
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(&'static str),
    #[error("connection closed inside the PROXY protocol header")]
    Closed,
}

/// Reads the header at the start of `conn` (exactly its bytes: what follows is the client's
/// own first message). `Some` is the client's address; `None` is a header that names none —
/// a balancer's health check (v2 `LOCAL`), `UNKNOWN`, or a non-IP family — and the
/// connection's own peer stands.
pub async fn read_source<R: AsyncRead + Unpin>(
    conn: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    read(conn, &mut head[..5]).await?;
    if &head[..5] == b"PROXY" {
        return read_v1(conn, &head[..5]).await;
    }
    if head[..5] != V2_SIGNATURE[..5] {
        return Err(ProxyHeaderError::Missing);
    }
    read(conn, &mut head[5..]).await?;
    let len = v2_body_len(&head)?;
    let mut body = vec![0u8; len];
    read(conn, &mut body).await?;
    parse_v2(&head, &body)
}

async fn read<R: AsyncRead + Unpin>(conn: &mut R, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    conn.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|_| ProxyHeaderError::Closed)
}

/// A v1 header is a text line of unknown length: read byte by byte (at most 107, once per
/// connection) so that nothing after its CRLF is consumed.
async fn read_v1<R: AsyncRead + Unpin>(
    conn: &mut R,
    start: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyHeaderError::V1("no CRLF within 107 bytes"));
        }
        let mut byte = [0u8; 1];
        read(conn, &mut byte).await?;
        line.push(byte[0]);
    }
    line.truncate(line.len() - 2);
    parse_v1(&line)
}

/// A v1 line without its CRLF: `PROXY TCP4|TCP6 src dst sport dport` or `PROXY UNKNOWN …`.
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let text = std::str::from_utf8(line).map_err(|_| ProxyHeaderError::V1("not ASCII"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyHeaderError::V1("does not start with PROXY"));
    }
    let family = parts.next().ok_or(ProxyHeaderError::V1("no protocol"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [source, _destination, source_port, _destination_port] = fields[..] else {
        return Err(ProxyHeaderError::V1("expected two addresses and two ports"));
    };
    let ip: IpAddr = match family {
        "TCP4" => source
            .parse::<Ipv4Addr>()
            .map_err(|_| ProxyHeaderError::V1("bad IPv4 source address"))?
            .into(),
        "TCP6" => source
            .parse::<Ipv6Addr>()
            .map_err(|_| ProxyHeaderError::V1("bad IPv6 source address"))?
            .into(),
        _ => return Err(ProxyHeaderError::V1("unknown protocol")),
    };
    let port = source_port
        .parse::<u16>()
        .map_err(|_| ProxyHeaderError::V1("bad source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The length of the body that follows a v2 header's 16 fixed bytes.
pub fn v2_body_len(head: &[u8; 16]) -> Result<usize, ProxyHeaderError> {
    if head[..12] != V2_SIGNATURE {
        return Err(ProxyHeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(ProxyHeaderError::V2("announces more than 4096 bytes"));
    }
    Ok(len)
}

/// The client a v2 header names (its 16 fixed bytes, then its body; TLVs are ignored).
pub fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(ProxyHeaderError::V2("version is not 2"));
    }
    match command {
        0 => return Ok(None), // LOCAL: the balancer's own connection (a health check).
        1 => {}
        _ => return Err(ProxyHeaderError::V2("unknown command")),
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    if matches!(family, 1 | 2) && transport != 1 {
        return Err(ProxyHeaderError::V2("not a stream connection"));
    }
    let short = ProxyHeaderError::V2("address block shorter than its family needs");
    match family {
        1 => {
            let block = body.get(..12).ok_or(short)?;
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([block[8], block[9]]),
            )))
        }
        2 => {
            let block = body.get(..36).ok_or(short)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            Ok(Some(SocketAddr::new(
                Ipv6Addr::from(octets).into(),
                u16::from_be_bytes([block[32], block[33]]),
            )))
        }
        // UNSPEC and unix sockets name no IP client.
        0 | 3 => Ok(None),
        _ => Err(ProxyHeaderError::V2("unknown address family")),
    }
}

/// `listen.proxy_protocol_from`: the load balancers whose connections start with a PROXY
/// header, as addresses (`10.0.0.7`) or networks (`10.0.0.0/24`).
#[derive(Debug, Clone, Default)]
pub struct TrustedPeers(Vec<ipnet::IpNet>);

impl TrustedPeers {
    /// Whether a connection from `peer` must carry a header.
    pub fn sends_header(&self, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        self.0.iter().any(|net| net.contains(&peer))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An IPv4 peer seen on an IPv6 socket (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl<'de> Deserialize<'de> for TrustedPeers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        entries
            .iter()
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        serde::de::Error::custom(format!(
                            "proxy_protocol_from: {entry:?} is neither an IP address nor a network (a.b.c.d/n)"
                        ))
                    })
            })
            .collect::<Result<_, _>>()
            .map(TrustedPeers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut conn = bytes;
        let source = read_source(&mut conn).await;
        (source, conn.to_vec())
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_leaves_what_follows() {
        let (source, rest) =
            read_all(b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 6432\r\n\x00\x00").await;
        assert_eq!(source, Ok(Some("203.0.113.9:51000".parse().unwrap())));
        assert_eq!(rest, b"\x00\x00");
        let (source, _) = read_all(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 6432\r\n").await;
        assert_eq!(source, Ok(Some("[2001:db8::7]:4000".parse().unwrap())));
        let (source, rest) = read_all(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!((source, rest), (Ok(None), b"X".to_vec()));
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_and_leaves_what_follows() {
        let mut block = vec![198, 51, 100, 4, 10, 0, 0, 1];
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&6432u16.to_be_bytes());
        block.extend_from_slice(&[0x04, 0x00, 0x01, b'x']); // a TLV, ignored
        let mut bytes = v2(1, 0x11, &block);
        bytes.extend_from_slice(b"next");
        let (source, rest) = read_all(&bytes).await;
        assert_eq!(source, Ok(Some("198.51.100.4:40000".parse().unwrap())));
        assert_eq!(rest, b"next");
        let mut block = vec![0u8; 36];
        block[..16].copy_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        block[32..34].copy_from_slice(&7u16.to_be_bytes());
        let (source, _) = read_all(&v2(1, 0x21, &block)).await;
        assert_eq!(source, Ok(Some("[2001:db8::9]:7".parse().unwrap())));
        // A health check names no client.
        let (source, _) = read_all(&v2(0, 0x00, &[])).await;
        assert_eq!(source, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let startup = [0u8, 0, 0, 8, 4, 210, 22, 47]; // an SSLRequest
        assert_eq!(read_all(&startup).await.0, Err(ProxyHeaderError::Missing));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
        ] {
            assert!(
                matches!(read_all(bad).await.0, Err(ProxyHeaderError::V1(_))),
                "{bad:?}"
            );
        }
        let endless = [b'P', b'R', b'O', b'X', b'Y'].repeat(30);
        assert_eq!(
            read_all(&endless).await.0,
            Err(ProxyHeaderError::V1("no CRLF within 107 bytes"))
        );
        assert_eq!(
            read_all(b"PROXY TCP4 1.2.3.4").await.0,
            Err(ProxyHeaderError::Closed)
        );
        let short = v2(1, 0x11, &[1, 2, 3]);
        assert!(matches!(
            read_all(&short).await.0,
            Err(ProxyHeaderError::V2(_))
        ));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            read_all(&huge).await.0,
            Err(ProxyHeaderError::V2(_))
        ));
        let mut v1_in_v2 = v2(1, 0x11, &[0; 12]);
        v1_in_v2[12] = 0x11;
        assert!(matches!(
            read_all(&v1_in_v2).await.0,
            Err(ProxyHeaderError::V2(_))
        ));
    }

    #[test]
    fn trusted_peers_are_addresses_or_networks() {
        let peers: TrustedPeers =
            serde_json::from_str(r#"["10.0.0.0/24", "192.0.2.7", "2001:db8::/32"]"#).unwrap();
        for ip in ["10.0.0.200", "192.0.2.7", "::ffff:10.0.0.3", "2001:db8::1"] {
            assert!(peers.sends_header(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.1.1", "192.0.2.8", "127.0.0.1"] {
            assert!(!peers.sends_header(ip.parse().unwrap()), "{ip}");
        }
        assert!(serde_json::from_str::<TrustedPeers>(r#"["lb.example"]"#).is_err());
    }

    proptest::proptest! {
        /// Whatever a peer sends, reading a header ends (no panic, no over-read past the
        /// bounds) with an address, none, or an error.
        #[test]
        fn any_bytes_end_in_an_answer(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (_, rest) = runtime.block_on(read_all(&bytes));
            proptest::prop_assert!(bytes.len() - rest.len() <= 16 + V2_MAX_BODY);
        }
    }
}
