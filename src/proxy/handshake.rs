//! From an accepted TCP connection to an authenticated client: encryption negotiation, the
//! startup packet, startup-parameter checks, and token authentication.
//!
//! The result is an [`Authenticated`] value — the only way to reach the code that opens an
//! upstream connection, so an unauthenticated client has no path upstream.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Shared;
use crate::audit::AuditEvent;
use crate::auth::Identity;
use crate::error::{sqlstate, ClientError};
use crate::net::Conn;
use crate::protocol::peer_cancel::PeerCancelRequest;
use crate::protocol::proxy_header::{self, ProxyHeaderError};
use crate::protocol::startup::{read_startup_packet, StartupMessage, StartupPacket};
use crate::protocol::{build, fields, frontend, FrameReader, ProtocolError};
use crate::tls::ALPN_POSTGRESQL;

mod params;
use params::startup_rules;
pub use params::{check_startup_parameters, parse_options, StartupRules};

/// The database name that opens the admin console (`proxy::console`) instead of a session.
pub const CONSOLE_DATABASE: &str = "pgward";

/// First byte of a TLS ClientHello record: a client using direct TLS (PostgreSQL 17).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Largest password message (a JWT) accepted.
const MAX_PASSWORD_MESSAGE: usize = 16 * 1024;

/// A client that proved its identity.
pub struct Authenticated {
    pub conn: Conn,
    pub startup: StartupMessage,
    pub identity: Identity,
    pub database: String,
    pub client_addr: SocketAddr,
}

/// How a connection's startup phase ended other than in a session.
pub enum HandshakeOutcome {
    Session(Box<Authenticated>),
    /// An authenticated client of a console service asking for the admin console (database
    /// `pgward`): it is answered by pgward and never reaches upstream.
    Console(Box<Authenticated>),
    Cancel {
        process_id: u32,
        secret_key: u32,
    },
    /// A cancel another replica of the fleet sent on (tag not yet checked); the connection is
    /// kept open until it is acted on, so the sender learns when.
    PeerCancel {
        request: PeerCancelRequest,
        conn: Conn,
    },
    /// The client went away or was refused; nothing more to do.
    Closed,
}

/// A refusal during the startup phase: the error to send (if the stream can still carry one).
struct Refusal {
    conn: Option<Conn>,
    error: ClientError,
    reason: &'static str,
    /// The service and database the client asked for, once the startup packet was read.
    target: Option<(String, String)>,
    /// The `jti` of a genuine token refused for how it was used.
    token_id: Option<String>,
}

impl Refusal {
    fn new(conn: Conn, error: ClientError, reason: &'static str) -> Self {
        Self {
            target: None,
            conn: Some(conn),
            error,
            reason,
            token_id: None,
        }
    }
}

/// Run the startup phase, bounded by the configured startup timeout.
pub async fn handshake(shared: &Shared, mut tcp: TcpStream, peer: SocketAddr) -> HandshakeOutcome {
    let timeout = shared.config.listen.startup_timeout;
    // The peer until a load balancer's PROXY header names the client behind it.
    let mut client_addr = peer;
    let attempt = tokio::time::timeout(timeout, async {
        client_addr = client_behind(shared, &mut tcp, peer).await?;
        handshake_inner(shared, tcp, client_addr, peer).await
    })
    .await;
    match attempt {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(refusal)) => {
            if refusal.reason != "client_gone" {
                shared.metrics.auth_failure(refusal.reason);
                tracing::info!(client = %client_addr, reason = refusal.reason, error = %refusal.error.message, "connection refused");
                audit_refusal(shared, client_addr, &refusal);
            }
            if let Some(mut conn) = refusal.conn {
                let _ = conn.write_all(&refusal.error.to_message()).await;
                let _ = conn.flush().await;
                let _ = conn.shutdown().await;
            }
            HandshakeOutcome::Closed
        }
        Err(_) => {
            shared.metrics.auth_failure("startup_timeout");
            tracing::info!(client = %client_addr, "startup timed out");
            HandshakeOutcome::Closed
        }
    }
}

/// The client a connection serves: its peer, or — from a load balancer listed in
/// `listen.proxy_protocol_from`, which must open with a PROXY header — the client it names.
async fn client_behind(
    shared: &Shared,
    tcp: &mut TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, Refusal> {
    if !shared
        .config
        .listen
        .proxy_protocol_from
        .sends_header(peer.ip())
    {
        return Ok(peer);
    }
    let (message, reason) = match proxy_header::read_source(tcp).await {
        Ok(source) => return Ok(source.unwrap_or(peer)),
        Err(ProxyHeaderError::Closed) => ("connection closed".to_owned(), "client_gone"),
        Err(e) => (format!("pgward: {e}"), "bad_proxy_header"),
    };
    let error = ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, message);
    if reason != "client_gone" {
        // Before any Postgres message: the balancer passes the error on to its client.
        let _ = tcp.write_all(&error.to_message()).await;
    }
    Err(Refusal {
        conn: None,
        error,
        reason,
        target: None,
        token_id: None,
    })
}

/// Record a failed connection attempt in the audit log (not waited for: nothing runs).
fn audit_refusal(shared: &Shared, client_addr: SocketAddr, refusal: &Refusal) {
    let Some(audit) = &shared.audit else {
        return;
    };
    let (user, database) = refusal.target.clone().unzip();
    audit.append_nowait(AuditEvent::AuthFailed {
        client_addr: client_addr.to_string(),
        tls: refusal.conn.as_ref().is_some_and(Conn::is_tls),
        cert_identity: None,
        user,
        database,
        token_id: refusal.token_id.clone(),
        reason: format!("{}: {}", refusal.reason, refusal.error.message),
        sqlstate: refusal.error.sqlstate.to_string(),
    });
}

fn protocol_refusal(conn: Conn, error: &ProtocolError) -> Refusal {
    match error {
        ProtocolError::Truncated | ProtocolError::Io(_) => Refusal {
            target: None,
            conn: None,
            error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "connection closed"),
            reason: "client_gone",
            token_id: None,
        },
        ProtocolError::UnsupportedVersion { major, minor } => Refusal::new(
            conn,
            ClientError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                ),
            ),
            "bad_startup",
        ),
        other => Refusal::new(
            conn,
            ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgward: invalid startup packet: {other}"),
            ),
            "bad_startup",
        ),
    }
}

async fn handshake_inner(
    shared: &Shared,
    tcp: TcpStream,
    client_addr: SocketAddr,
    peer: SocketAddr,
) -> Result<HandshakeOutcome, Refusal> {
    let _ = tcp.set_nodelay(true);
    let (mut conn, startup) = match negotiate(shared, tcp).await? {
        Negotiated::Startup(conn, startup) => (conn, startup),
        Negotiated::Cancel {
            process_id,
            secret_key,
        } => {
            return Ok(HandshakeOutcome::Cancel {
                process_id,
                secret_key,
            })
        }
        Negotiated::PeerCancel(conn, request) => {
            return Ok(HandshakeOutcome::PeerCancel { request, conn })
        }
    };
    if startup.minor_version > 0 || startup.params.iter().any(|(k, _)| k.starts_with("_pq_.")) {
        // Tell a newer client we speak 3.0 and none of its protocol extensions (as PostgreSQL does).
        let unrecognized: Vec<&str> = startup
            .params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect();
        let _ = conn
            .write_all(&build::negotiate_protocol_version(0, &unrecognized))
            .await;
    }
    // Both hops must be local: a balancer on loopback may relay a client from afar.
    let plaintext_allowed = shared.config.listen.allow_plaintext_loopback
        && client_addr.ip().is_loopback()
        && peer.ip().is_loopback();
    if !conn.is_tls() && !plaintext_allowed {
        return Err(Refusal::new(
            conn,
            ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "pgward: TLS is required: tokens are never accepted over an unencrypted connection",
            )
            .with_hint("connect with sslmode=require (or verify-full)"),
            "tls_required",
        ));
    }
    let Some(user) = startup.get("user").map(str::to_string) else {
        return Err(Refusal::new(
            conn,
            ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ),
            "bad_startup",
        ));
    };
    let database = startup
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_string();
    let target = || Some((user.clone(), database.clone()));
    let Some(service) = shared.service(&user) else {
        // Ask for the token anyway? No: an unknown service can never authenticate, so say so.
        return Err(Refusal {
            target: target(),
            ..Refusal::new(
                conn,
                ClientError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("pgward: service \"{user}\" is not configured"),
                ),
                "unknown_service",
            )
        });
    };
    let rules = startup_rules(shared, &user, service.unrestricted);
    if let Err(error) = check_startup_parameters(&startup, &rules) {
        return Err(Refusal {
            target: target(),
            ..Refusal::new(conn, error, "forbidden_parameter")
        });
    }
    let identity = authenticate(shared, &mut conn, &user)
        .await
        .map_err(|refusal| Refusal {
            target: target(),
            ..refusal
        })?;
    let console = database == CONSOLE_DATABASE;
    if console && !shared.may_use_console(&user) {
        // As PostgreSQL refuses a role without CONNECT on a database: after authentication,
        // 42501, so that only a genuine token learns the console exists for others.
        return Err(Refusal {
            target: target(),
            token_id: identity.token_id.clone(),
            ..Refusal::new(
                conn,
                ClientError::fatal(
                    sqlstate::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "permission denied for database \"{}\": service \"{user}\" may not use the pgward admin console",
                        CONSOLE_DATABASE
                    ),
                ),
                "console_not_allowed",
            )
        });
    }
    let authenticated = Box::new(Authenticated {
        conn,
        startup,
        identity,
        database,
        client_addr,
    });
    Ok(if console {
        HandshakeOutcome::Console(authenticated)
    } else {
        HandshakeOutcome::Session(authenticated)
    })
}

enum Negotiated {
    Startup(Conn, StartupMessage),
    Cancel { process_id: u32, secret_key: u32 },
    PeerCancel(Conn, PeerCancelRequest),
}

/// SSLRequest / GSSENCRequest / direct TLS, until a StartupMessage or CancelRequest arrives.
async fn negotiate(shared: &Shared, tcp: TcpStream) -> Result<Negotiated, Refusal> {
    let mut conn = Conn::Tcp(tcp);
    loop {
        if let (Conn::Tcp(tcp), Some(_)) = (&conn, &shared.tls) {
            let mut first = [0u8; 1];
            let peeked = tcp.peek(&mut first).await.unwrap_or(0);
            if peeked == 1 && first[0] == TLS_HANDSHAKE_RECORD {
                conn = accept_tls(shared, conn, true).await?;
                continue;
            }
        }
        let packet = match read_startup_packet(&mut conn).await {
            Ok(packet) => packet,
            Err(e) => return Err(protocol_refusal(conn, &e)),
        };
        match packet {
            StartupPacket::SslRequest if conn.is_tls() => {
                return Err(protocol_refusal(
                    conn,
                    &ProtocolError::Malformed {
                        what: "SSLRequest over TLS",
                    },
                ));
            }
            StartupPacket::SslRequest => {
                if unread_bytes_pending(&conn).await {
                    return Err(protocol_refusal(
                        conn,
                        &ProtocolError::DataAfterEncryptionRequest,
                    ));
                }
                if shared.tls.is_some() {
                    write_or_gone(&mut conn, b"S").await?;
                    conn = accept_tls(shared, conn, false).await?;
                } else {
                    write_or_gone(&mut conn, b"N").await?;
                }
            }
            StartupPacket::GssEncRequest => {
                if unread_bytes_pending(&conn).await {
                    return Err(protocol_refusal(
                        conn,
                        &ProtocolError::DataAfterEncryptionRequest,
                    ));
                }
                write_or_gone(&mut conn, b"N").await?;
            }
            StartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => {
                return Ok(Negotiated::Cancel {
                    process_id,
                    secret_key,
                })
            }
            StartupPacket::PeerCancel(request) => return Ok(Negotiated::PeerCancel(conn, request)),
            StartupPacket::Startup(startup) => return Ok(Negotiated::Startup(conn, startup)),
        }
    }
}

async fn write_or_gone(conn: &mut Conn, bytes: &[u8]) -> Result<(), Refusal> {
    let result = async {
        conn.write_all(bytes).await?;
        conn.flush().await
    }
    .await;
    result.map_err(|_| Refusal {
        target: None,
        conn: None,
        error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "connection closed"),
        reason: "client_gone",
        token_id: None,
    })
}

/// Bytes already sent after an encryption request, before our answer: a protocol violation
/// (and the CVE-2021-23214 class of bugs if they were treated as protocol).
async fn unread_bytes_pending(conn: &Conn) -> bool {
    let Conn::Tcp(tcp) = conn else {
        return false;
    };
    let mut probe = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::ZERO, tcp.peek(&mut probe)).await,
        Ok(Ok(n)) if n > 0
    )
}

async fn accept_tls(shared: &Shared, conn: Conn, direct: bool) -> Result<Conn, Refusal> {
    let (Conn::Tcp(tcp), Some(acceptor)) = (conn, shared.tls.as_ref()) else {
        return Err(Refusal {
            target: None,
            conn: None,
            error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "TLS negotiated twice"),
            reason: "bad_startup",
            token_id: None,
        });
    };
    let tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            tracing::info!(error = %e, "TLS handshake failed");
            return Err(Refusal {
                target: None,
                conn: None,
                error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "TLS handshake failed"),
                reason: "tls_handshake",
                token_id: None,
            });
        }
    };
    // PostgreSQL 17 requires ALPN for direct TLS so that TLS to the wrong service cannot be confused.
    if direct && tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(Refusal::new(
            Conn::TlsServer(Box::new(tls)),
            ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "pgward: direct TLS connections must negotiate ALPN protocol \"postgresql\"",
            ),
            "bad_startup",
        ));
    }
    Ok(Conn::TlsServer(Box::new(tls)))
}

/// Ask for the token as a cleartext password, verify it, and bind the session to its identity.
async fn authenticate(shared: &Shared, conn: &mut Conn, user: &str) -> Result<Identity, Refusal> {
    let gone = || Refusal {
        target: None,
        conn: None,
        error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, "connection closed"),
        reason: "client_gone",
        token_id: None,
    };
    write_or_gone(conn, &build::authentication_cleartext_password()).await?;
    let token = {
        let mut reader = FrameReader::new(&mut *conn, MAX_PASSWORD_MESSAGE);
        let message = match reader.next_message().await {
            Ok(Some(message)) => message,
            Ok(None) | Err(ProtocolError::Truncated) | Err(ProtocolError::Io(_)) => {
                return Err(gone())
            }
            Err(e) => {
                return Err(Refusal {
                    target: None,
                    conn: None,
                    error: ClientError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
                    reason: "bad_password_message",
                    token_id: None,
                })
            }
        };
        if !reader.buffered().is_empty() {
            // Nothing may be pipelined ahead of AuthenticationOk.
            return Err(Refusal {
                target: None,
                conn: None,
                error: ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "unexpected data during authentication",
                ),
                reason: "bad_password_message",
                token_id: None,
            });
        }
        if message.tag() != frontend::PASSWORD {
            return Err(Refusal {
                target: None,
                conn: None,
                error: ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "expected a password message",
                ),
                reason: "bad_password_message",
                token_id: None,
            });
        }
        match fields::password_text(message.body()) {
            Ok(token) => token.to_string(),
            Err(_) => {
                return Err(Refusal {
                    target: None,
                    conn: None,
                    error: ClientError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "malformed password message",
                    ),
                    reason: "bad_password_message",
                    token_id: None,
                })
            }
        }
    };
    let cert_identity = conn
        .peer_certificate()
        .and_then(|der| crate::auth::cert_identity_from_der(&der));
    match shared
        .verifier
        .verify(&token, user, cert_identity.as_deref())
        .await
    {
        Ok(identity) => Ok(identity),
        Err(e) => {
            let error = ClientError::fatal(e.sqlstate(), e.client_message());
            // The connection stays borrowed by the caller, so the error is sent from here.
            let _ = conn.write_all(&error.to_message()).await;
            let _ = conn.flush().await;
            Err(Refusal {
                target: None,
                conn: None,
                error,
                reason: e.reason(),
                token_id: e.token_id().map(str::to_string),
            })
        }
    }
}

/// Negotiate encryption and read the startup packet, then send `error` and close: used to tell
/// an over-limit client why it is refused, in a form its driver shows to the user.
pub async fn refuse_after_startup(shared: &Shared, tcp: TcpStream, error: ClientError) {
    if let Ok(Negotiated::Startup(mut conn, _)) = negotiate(shared, tcp).await {
        let _ = conn.write_all(&error.to_message()).await;
        let _ = conn.flush().await;
        let _ = conn.shutdown().await;
    }
}
