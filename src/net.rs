//! One stream type for every transport pgward speaks over: TCP, unix sockets, and TLS on TCP,
//! in both roles. Keeping it an enum (not a trait object) keeps reads and writes monomorphic.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A connected byte stream.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::TlsServer(_) | Conn::TlsClient(_))
    }

    /// DER of the client certificate a TLS client presented (server role only).
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Conn::TlsServer(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| cert.as_ref().to_vec()),
            _ => None,
        }
    }

    /// Disable Nagle's algorithm: the protocol is request/response and latency matters.
    pub fn set_nodelay(&self) {
        let tcp = match self {
            Conn::Tcp(s) => Some(s),
            Conn::TlsServer(s) => Some(s.get_ref().0),
            Conn::TlsClient(s) => Some(s.get_ref().0),
            Conn::Unix(_) => None,
        };
        if let Some(tcp) = tcp {
            let _ = tcp.set_nodelay(true);
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Tcp($s) => $e,
            Conn::Unix($s) => $e,
            Conn::TlsServer($s) => $e,
            Conn::TlsClient($s) => $e,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
            Conn::TlsServer(s) => s.is_write_vectored(),
            Conn::TlsClient(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Read half of a [`Conn`]. Plain sockets split without a lock (`into_split`); TLS streams share
/// one session state, so they go through tokio's locking split.
pub enum ConnReader {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Unix(tokio::net::unix::OwnedReadHalf),
    Shared(tokio::io::ReadHalf<Conn>),
}

/// Write half of a [`Conn`].
pub enum ConnWriter {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
    Shared(tokio::io::WriteHalf<Conn>),
}

impl Conn {
    /// Split into independently usable halves.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        match self {
            Conn::Tcp(s) => {
                let (r, w) = s.into_split();
                (ConnReader::Tcp(r), ConnWriter::Tcp(w))
            }
            Conn::Unix(s) => {
                let (r, w) = s.into_split();
                (ConnReader::Unix(r), ConnWriter::Unix(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (ConnReader::Shared(r), ConnWriter::Shared(w))
            }
        }
    }
}

impl AsyncRead for ConnReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnReader::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ConnReader::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ConnReader::Shared(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWriter::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ConnWriter::Unix(s) => Pin::new(s).poll_write(cx, buf),
            ConnWriter::Shared(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWriter::Tcp(s) => Pin::new(s).poll_flush(cx),
            ConnWriter::Unix(s) => Pin::new(s).poll_flush(cx),
            ConnWriter::Shared(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWriter::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ConnWriter::Unix(s) => Pin::new(s).poll_shutdown(cx),
            ConnWriter::Shared(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
