//! Connecting to the upstream PostgreSQL server as a service's configured role.
//!
//! pgward logs in with the credentials configured for the service — never the client's token —
//! using whatever the server asks for: SCRAM-SHA-256, md5, cleartext password, or trust.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamConfig, UpstreamTls};
use crate::net::Conn;
use crate::protocol::fields::ErrorFields;
use crate::protocol::{backend, build, FrameReader, Message, ProtocolError};

/// Largest message accepted from upstream (PostgreSQL's own limit is 1 GiB per field).
pub const MAX_UPSTREAM_MESSAGE: usize = 1 << 30;

/// Failure to establish an upstream session.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to upstream {0} timed out")]
    Timeout(String),
    #[error("upstream TLS: {0}")]
    Tls(String),
    #[error("upstream server refused TLS")]
    TlsRefused,
    #[error("upstream asked for a password but none is configured for role {0:?}")]
    MissingPassword(String),
    #[error("upstream asked for an unsupported authentication method ({0})")]
    UnsupportedAuth(String),
    #[error("upstream SCRAM exchange failed: {0}")]
    Scram(String),
    /// The server's own ErrorResponse, forwarded to the client unchanged.
    #[error("upstream error: {}", .fields.message.as_deref().unwrap_or("(no message)"))]
    Server { raw: Bytes, fields: ErrorFields },
    #[error("upstream protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("upstream closed the connection during startup")]
    Closed,
    /// pgward's own connection (catalog loading) failed.
    #[error("pgward's own upstream connection: {0}")]
    Admin(String),
}

impl From<std::io::Error> for UpstreamError {
    fn from(e: std::io::Error) -> Self {
        UpstreamError::Protocol(ProtocolError::Io(e))
    }
}

/// Where and how to reach upstream, prepared once at start.
#[derive(Clone)]
pub struct UpstreamTarget {
    config: UpstreamConfig,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl std::fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("host", &self.config.host)
            .field("port", &self.config.port)
            .field("tls", &self.config.tls)
            .finish()
    }
}

/// An authenticated upstream session, ready for queries.
pub struct UpstreamSession {
    pub conn: Conn,
    /// Bytes already read past the startup phase (normally empty).
    pub buffered: BytesMut,
    /// The upstream backend's own cancel key.
    pub process_id: u32,
    pub secret_key: u32,
    /// ParameterStatus and NoticeResponse messages of the startup phase, in order, to forward.
    pub startup_messages: Vec<Bytes>,
    /// Transaction status of the first ReadyForQuery.
    pub ready_status: u8,
}

impl UpstreamTarget {
    /// Prepare TLS material for the configured upstream.
    pub fn new(config: &UpstreamConfig) -> Result<Self, crate::tls::TlsError> {
        let tls = match config.tls {
            UpstreamTls::Disable => None,
            mode => {
                let client = crate::tls::upstream_client_config(
                    mode == UpstreamTls::VerifyFull,
                    config.tls_ca_file.as_deref(),
                )?;
                let name = config.tls_server_name.as_deref().unwrap_or(&config.host);
                Some((client, crate::tls::server_name(name)?))
            }
        };
        Ok(Self {
            config: config.clone(),
            tls,
        })
    }

    fn describe(&self) -> String {
        if self.is_unix() {
            format!("{}/.s.PGSQL.{}", self.config.host, self.config.port)
        } else {
            format!("{}:{}", self.config.host, self.config.port)
        }
    }

    fn is_unix(&self) -> bool {
        self.config.host.starts_with('/')
    }

    /// Open the transport (TCP, unix socket, TLS) without speaking the protocol yet.
    async fn open(&self) -> Result<Conn, UpstreamError> {
        let target = self.describe();
        let connect = async {
            if self.is_unix() {
                let path = format!("{}/.s.PGSQL.{}", self.config.host, self.config.port);
                return UnixStream::connect(path).await.map(Conn::Unix);
            }
            TcpStream::connect((self.config.host.as_str(), self.config.port))
                .await
                .map(Conn::Tcp)
        };
        let conn = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::Timeout(target.clone()))?
            .map_err(|source| UpstreamError::Connect { target, source })?;
        conn.set_nodelay();
        match (&self.tls, conn) {
            (Some((client, name)), Conn::Tcp(mut tcp)) => {
                tcp.write_all(&build::ssl_request()).await?;
                let mut answer = [0u8; 1];
                tcp.read_exact(&mut answer).await?;
                if answer[0] != b'S' {
                    return Err(UpstreamError::TlsRefused);
                }
                let tls = tokio_rustls::TlsConnector::from(client.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| UpstreamError::Tls(e.to_string()))?;
                Ok(Conn::TlsClient(Box::new(tls)))
            }
            (_, conn) => Ok(conn),
        }
    }

    /// Connect and log in as `user` to `database`, passing the client's startup parameters.
    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        database: &str,
        params: &[(String, String)],
    ) -> Result<UpstreamSession, UpstreamError> {
        let mut conn = self.open().await?;
        let mut startup = BytesMut::new();
        let all_params = [("user", user), ("database", database)]
            .into_iter()
            .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        frontend::startup_message(all_params, &mut startup)?;
        conn.write_all(&startup).await?;
        let mut reader = FrameReader::new(conn, MAX_UPSTREAM_MESSAGE);
        authenticate(&mut reader, user, password).await?;
        let (process_id, secret_key, startup_messages, ready_status) =
            read_until_ready(&mut reader).await?;
        let (conn, buffered) = reader.into_parts();
        Ok(UpstreamSession {
            conn,
            buffered,
            process_id,
            secret_key,
            startup_messages,
            ready_status,
        })
    }

    /// A `tokio_postgres` client over pgward's own transport (same TCP/unix/TLS settings as the
    /// sessions), for pgward's own queries such as loading the catalog. tokio-postgres performs
    /// the login itself (SCRAM, md5 or password) on the already opened stream.
    pub async fn admin_client(
        &self,
        user: &str,
        password: Option<&str>,
        database: &str,
    ) -> Result<tokio_postgres::Client, UpstreamError> {
        let conn = self.open().await?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .dbname(database)
            .application_name("pgward");
        if let Some(password) = password {
            config.password(password);
        }
        let (client, connection) = config
            .connect_raw(conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| UpstreamError::Admin(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pgward's own upstream connection ended");
            }
        });
        Ok(client)
    }

    /// Whether the server's postmaster answers (`/readyz`): a CancelRequest naming no backend.
    /// Unlike an abandoned startup packet it leaves nothing in the server's log at the default
    /// level, and it needs no login.
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        self.cancel(0, 0).await
    }

    /// Deliver a CancelRequest for an upstream backend and wait until the server has acted on it.
    pub async fn cancel(&self, process_id: u32, secret_key: u32) -> Result<(), UpstreamError> {
        // Cancel requests go over a plain transport: the server answers nothing and closes,
        // and encrypting 16 bytes that carry no secret the client did not already hold adds
        // nothing. When TLS is configured we still honour it, since hba may require it.
        let mut conn = self.open().await?;
        conn.write_all(&build::cancel_request(process_id, secret_key))
            .await?;
        conn.flush().await?;
        // The postmaster signals the backend, then closes: reading to EOF means "delivered".
        let mut sink = [0u8; 64];
        while conn.read(&mut sink).await? > 0 {}
        Ok(())
    }
}

/// Server errors at login whose text may reach the client as the server wrote it: they name
/// what the client itself asked for (its database), or a state any client may know of, never
/// the upstream role pgward logs in as.
const FORWARDABLE_LOGIN_ERRORS: &[&str] = &["3D000", "57P03"];

/// What a client is told when pgward's upstream login for its session fails, after logging
/// the failure with the server's own reason. The upstream role and the server's wording (which
/// often names that role: "password authentication failed for user …") stay in pgward's log.
pub fn login_failure_message(e: &UpstreamError, session: u64, role: &str) -> Bytes {
    use crate::error::{sqlstate, ClientError};
    let UpstreamError::Server { raw, fields } = e else {
        tracing::warn!(session, role, error = %e, "upstream connection failed");
        return ClientError::fatal(
            sqlstate::CANNOT_CONNECT,
            "pgward: could not connect to the upstream server",
        )
        .to_message();
    };
    let code = fields.code.as_deref().unwrap_or_default();
    tracing::warn!(
        session,
        role,
        sqlstate = code,
        reason = fields.message.as_deref().unwrap_or("(no message)"),
        "upstream server refused pgward's login"
    );
    if FORWARDABLE_LOGIN_ERRORS.contains(&code) {
        return raw.clone();
    }
    // Keep the class a driver acts on (retry on 53300, not on 28P01), with pgward's words.
    let state = match code {
        sqlstate::TOO_MANY_CONNECTIONS => sqlstate::TOO_MANY_CONNECTIONS,
        c if c.starts_with("28") => sqlstate::INVALID_AUTHORIZATION,
        sqlstate::INSUFFICIENT_PRIVILEGE => sqlstate::INSUFFICIENT_PRIVILEGE,
        _ => sqlstate::CANNOT_CONNECT,
    };
    ClientError::fatal(
        state,
        "pgward: the upstream server refused the login configured for this service (the reason is in pgward's log)",
    )
    .to_message()
}

async fn next(reader: &mut FrameReader<Conn>) -> Result<Message, UpstreamError> {
    reader.next_message().await?.ok_or(UpstreamError::Closed)
}

fn server_error(msg: Message) -> UpstreamError {
    let fields = ErrorFields::parse(msg.body()).unwrap_or_default();
    UpstreamError::Server {
        raw: msg.into_raw(),
        fields,
    }
}

async fn send(reader: &mut FrameReader<Conn>, buf: &BytesMut) -> Result<(), UpstreamError> {
    let conn = reader.get_mut();
    conn.write_all(buf).await?;
    conn.flush().await?;
    Ok(())
}

/// Answer the server's authentication requests until AuthenticationOk.
async fn authenticate(
    reader: &mut FrameReader<Conn>,
    user: &str,
    password: Option<&str>,
) -> Result<(), UpstreamError> {
    let need_password = || password.ok_or_else(|| UpstreamError::MissingPassword(user.to_string()));
    let mut scram: Option<ScramSha256> = None;
    loop {
        let msg = next(reader).await?;
        match msg.tag() {
            backend::AUTHENTICATION => {}
            backend::ERROR_RESPONSE => return Err(server_error(msg)),
            _ => {
                return Err(ProtocolError::Malformed {
                    what: "authentication",
                }
                .into())
            }
        }
        let body = msg.body();
        let (code, data) = body
            .split_first_chunk::<4>()
            .map(|(c, d)| (i32::from_be_bytes(*c), d))
            .ok_or(ProtocolError::Malformed {
                what: "authentication",
            })?;
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(need_password()?.as_bytes(), &mut out)?,
            5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| ProtocolError::Malformed { what: "md5 salt" })?;
                let hash = postgres_protocol::authentication::md5_hash(
                    user.as_bytes(),
                    need_password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let offers_scram = data
                    .split(|&b| b == 0)
                    .any(|mechanism| mechanism == b"SCRAM-SHA-256");
                if !offers_scram {
                    return Err(UpstreamError::UnsupportedAuth(
                        String::from_utf8_lossy(data)
                            .replace('\0', " ")
                            .trim()
                            .to_string(),
                    ));
                }
                let state =
                    ScramSha256::new(need_password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", state.message(), &mut out)?;
                scram = Some(state);
            }
            11 => {
                let state = scram.as_mut().ok_or(ProtocolError::Malformed {
                    what: "SASLContinue",
                })?;
                state
                    .update(data)
                    .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                frontend::sasl_response(state.message(), &mut out)?;
            }
            12 => {
                let mut state = scram
                    .take()
                    .ok_or(ProtocolError::Malformed { what: "SASLFinal" })?;
                state
                    .finish(data)
                    .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                continue;
            }
            other => {
                return Err(UpstreamError::UnsupportedAuth(format!(
                    "authentication request code {other}"
                )))
            }
        }
        send(reader, &out).await?;
    }
}

/// Collect ParameterStatus, BackendKeyData and notices until the first ReadyForQuery.
async fn read_until_ready(
    reader: &mut FrameReader<Conn>,
) -> Result<(u32, u32, Vec<Bytes>, u8), UpstreamError> {
    let mut key = (0, 0);
    let mut forwarded = Vec::new();
    loop {
        let msg = next(reader).await?;
        match msg.tag() {
            backend::PARAMETER_STATUS | backend::NOTICE_RESPONSE => forwarded.push(msg.into_raw()),
            backend::BACKEND_KEY_DATA => {
                let body = msg.body();
                let (pid, rest) =
                    body.split_first_chunk::<4>()
                        .ok_or(ProtocolError::Malformed {
                            what: "BackendKeyData",
                        })?;
                let secret = rest.first_chunk::<4>().ok_or(ProtocolError::Malformed {
                    what: "BackendKeyData",
                })?;
                key = (u32::from_be_bytes(*pid), u32::from_be_bytes(*secret));
            }
            backend::READY_FOR_QUERY => {
                let status = msg.body().first().copied().unwrap_or(b'I');
                return Ok((key.0, key.1, forwarded, status));
            }
            backend::ERROR_RESPONSE => return Err(server_error(msg)),
            backend::NEGOTIATE_PROTOCOL_VERSION => {}
            _ => {
                return Err(ProtocolError::Malformed {
                    what: "startup response",
                }
                .into())
            }
        }
    }
}
