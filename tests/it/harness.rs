//! The shared integration-test harness: one real PostgreSQL per test binary (stopped at exit,
//! also when a test panics), and a pgward proxy per test, in the test's own runtime.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgward::config::Config;
use pgward::metrics::Metrics;
use pgward::pgserver::{EmbeddedOptions, EmbeddedPostgres};
use pgward::protocol::{FrameReader, Message};
use pgward::proxy::Proxy;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

static SERVER: OnceLock<parking_lot::Mutex<Option<EmbeddedPostgres>>> = OnceLock::new();
static FIXTURES: OnceLock<Fixtures> = OnceLock::new();

extern "C" fn stop_server_at_exit() {
    if let Some(slot) = SERVER.get() {
        drop(slot.lock().take());
    }
}

/// Roles with each upstream authentication method (see `postgres()` for their hba lines).
pub const MD5_ROLE: &str = "md5_user";
pub const PASSWORD_ROLE: &str = "password_user";
pub const TRUST_ROLE: &str = "trust_user";
pub const ROLE_PASSWORD: &str = "role-secret";

/// Connection facts of the shared server.
#[derive(Clone, Debug)]
pub struct Pg {
    pub port: u16,
    pub password: String,
    pub socket_dir: PathBuf,
    /// The server's self-signed TLS certificate (CN/SAN localhost).
    pub tls_cert_file: PathBuf,
}

impl Pg {
    /// tokio-postgres config for the superuser, directly (not through pgward).
    pub fn direct(&self, database: &str) -> tokio_postgres::Config {
        pgward::pgserver::superuser_config(self.port, &self.password, database)
    }
}

/// Files shared by all tests: the token secret, a TLS certificate.
pub struct Fixtures {
    _dir: tempfile::TempDir,
    pub secret_file: PathBuf,
    pub secret: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Shared fixture files.
pub fn fixtures() -> &'static Fixtures {
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = b"integration-test-secret-of-32-bytes!".to_vec();
        let secret_file = dir.path().join("hs256.secret");
        std::fs::write(&secret_file, &secret).expect("write secret");
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        pgward::tls::write_self_signed(&cert_file, &key_file, &["localhost", "127.0.0.1"])
            .expect("cert");
        Fixtures {
            secret_file,
            secret,
            cert_file,
            key_file,
            _dir: dir,
        }
    })
}

/// The shared server, started on first use, with roles for every upstream auth method.
pub fn postgres() -> Pg {
    let slot = SERVER.get_or_init(|| {
        let options = EmbeddedOptions {
            extra_hba: vec![
                format!("host all {MD5_ROLE} 127.0.0.1/32 md5"),
                format!("host all {PASSWORD_ROLE} 127.0.0.1/32 password"),
                format!("host all {TRUST_ROLE} 127.0.0.1/32 trust"),
            ],
            tls: true,
            ..EmbeddedOptions::default()
        };
        let server = EmbeddedPostgres::start(options).expect("start PostgreSQL");
        let setup = format!(
            "SET password_encryption = 'md5';
             CREATE ROLE {MD5_ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}';
             CREATE ROLE {TRUST_ROLE} LOGIN;"
        );
        let psql = server.bindir().join("psql");
        let out = std::process::Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(server.socket_dir())
            .args([
                "-p",
                &server.port().to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                &setup,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "role setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: registering a plain extern "C" fn with atexit.
        unsafe { libc::atexit(stop_server_at_exit) };
        parking_lot::Mutex::new(Some(server))
    });
    let guard = slot.lock();
    let server = guard.as_ref().expect("server running");
    Pg {
        port: server.port(),
        password: server.password().to_string(),
        socket_dir: server.socket_dir(),
        tls_cert_file: server.tls_cert_file(),
    }
}

/// A unique database name for one test.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Create a fresh database (optionally with the demo migrations) and return its name.
pub async fn fresh_database(prefix: &str, with_demo: bool) -> String {
    let pg = postgres();
    let name = unique_name(prefix);
    let (client, conn) = pg
        .direct("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    drop(client);
    let _ = driver.await;
    if with_demo {
        pgward::pgserver::apply_migrations(&pg.direct(&name), std::path::Path::new("migrations"))
            .await
            .expect("migrations");
    }
    name
}

/// The demo schema as it was before field encryption: readable text columns holding the
/// seed's values, no blind indexes. The policy tests check the rewriter against PostgreSQL
/// (and its RLS) on readable data, so a leak shows as a value; field encryption of the demo
/// through the proxy is tested in `encryption.rs`.
pub const PLAINTEXT_DEMO_SQL: &str = "
ALTER TABLE customers DROP COLUMN email_bidx,
    ALTER COLUMN email TYPE text USING NULL, ALTER COLUMN ssn TYPE text USING NULL;
ALTER TABLE invoices DROP COLUMN card_number_bidx, ALTER COLUMN card_number TYPE text USING NULL;
UPDATE customers SET
    email = format('customer%s@tenant%s.example', split_part(name, '-', 2), tenant_id),
    ssn = format('%s-%s-%s', lpad((100 + tenant_id)::text, 3, '0'),
                 lpad(split_part(name, '-', 2), 2, '0'),
                 lpad((1000 + split_part(name, '-', 2)::int * tenant_id)::text, 4, '0'));
UPDATE invoices SET card_number = format('4111-1111-1111-%s', lpad(customer_id::text, 4, '0'));
";

/// A fresh database with the demo migrations, turned into the plaintext demo
/// ([`PLAINTEXT_DEMO_SQL`]).
pub async fn fresh_plaintext_demo(prefix: &str) -> String {
    let name = fresh_database(prefix, true).await;
    let (client, conn) = postgres()
        .direct(&name)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(conn);
    client
        .batch_execute(PLAINTEXT_DEMO_SQL)
        .await
        .expect("plaintext demo");
    drop(client);
    let _ = driver.await;
    name
}

/// Options of a test proxy.
#[derive(Clone)]
pub struct ProxyOptions {
    /// Replaces the whole [upstream] table when set.
    pub upstream: Option<String>,
    pub tls: bool,
    pub client_ca: bool,
    pub allow_plaintext: bool,
    pub extra_listen: String,
    pub extra_auth: String,
    pub extra_toml: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            upstream: None,
            tls: true,
            client_ca: false,
            allow_plaintext: true,
            extra_listen: String::new(),
            extra_auth: String::new(),
            extra_toml: String::new(),
        }
    }
}

/// A running proxy; shut down when dropped.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// Stop accepting and wait for the proxy to finish its graceful shutdown.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// A tokio-postgres config through the proxy (plaintext, loopback) as `service`.
    pub fn client_config(&self, service: &str, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(service)
            .password(token(service, serde_json::json!({})))
            .dbname(database);
        config
    }

    /// Connect through the proxy as `service` and drive the connection in the background.
    pub async fn connect(&self, service: &str, database: &str) -> tokio_postgres::Client {
        let (client, conn) = self
            .client_config(service, database)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect through pgward");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The configuration text of a test proxy (services: `app` as superuser over SCRAM, and one
/// service per upstream auth method).
pub fn proxy_config_text(options: &ProxyOptions) -> String {
    let pg = postgres();
    let fx = fixtures();
    let tls = if options.tls {
        format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n{}",
            fx.cert_file,
            fx.key_file,
            if options.client_ca {
                format!("client_ca_file = {:?}\n", fx.cert_file)
            } else {
                String::new()
            }
        )
    } else {
        String::new()
    };
    let password_env = "PGWARD_TEST_SUPERUSER_PASSWORD";
    std::env::set_var(password_env, &pg.password);
    let role_password_file = fx.secret_file.with_file_name("role.password");
    std::fs::write(&role_password_file, ROLE_PASSWORD).expect("write role password");
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
{tls}allow_plaintext_loopback = {plain}
startup_timeout = "5s"
{extra_listen}

{upstream}

[auth]
hs256_secret_file = {secret:?}
audience = ["pgward-tests"]
max_token_lifetime = "1h"
{extra_auth}

[admin]
address = "127.0.0.1:0"

[services.app]
upstream_user = "postgres"
upstream_password = {{ env = "{password_env}" }}
unrestricted = true

[services.other]
upstream_user = "postgres"
upstream_password = {{ env = "{password_env}" }}
unrestricted = true

[services.md5svc]
upstream_user = "{MD5_ROLE}"
upstream_password = {{ file = {role_password_file:?} }}
unrestricted = true

[services.passwordsvc]
upstream_user = "{PASSWORD_ROLE}"
upstream_password = {{ file = {role_password_file:?} }}
unrestricted = true

[services.trustsvc]
upstream_user = "{TRUST_ROLE}"
unrestricted = true

{extra}
"#,
        plain = options.allow_plaintext,
        extra_listen = options.extra_listen,
        upstream = options
            .upstream
            .clone()
            .unwrap_or_else(|| format!("[upstream]\nhost = \"127.0.0.1\"\nport = {}\n", pg.port)),
        secret = fx.secret_file,
        extra_auth = options.extra_auth,
        extra = options.extra_toml,
    )
}

/// A `[services.<name>]` table logging in upstream as the superuser (policy-bound unless the
/// config names it unrestricted elsewhere).
pub fn superuser_service(name: &str) -> String {
    format!(
        "\n[services.{name}]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n"
    )
}

/// Start a proxy in the current runtime.
pub async fn start_proxy(options: ProxyOptions) -> TestProxy {
    start_proxy_text(&proxy_config_text(&options)).await
}

/// Start a proxy from a whole configuration text (e.g. [`proxy_config_text`] edited).
pub async fn start_proxy_text(text: &str) -> TestProxy {
    let config: Config = toml::from_str(text).expect("test config parses");
    let proxy = Proxy::bind(config).await.expect("proxy binds");
    let addr = proxy.local_addr().expect("addr");
    let admin = proxy.admin_addr();
    let metrics = proxy.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    TestProxy {
        addr,
        admin,
        metrics,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A valid HS256 test token for `service` with extra claims, 10 minutes long.
pub fn token(service: &str, extra: serde_json::Value) -> String {
    let now = now_secs();
    let mut claims = serde_json::json!({
        "sub": service, "aud": "pgward-tests", "iat": now, "nbf": now - 5, "exp": now + 600,
        "jti": unique_name("jti"),
    });
    if let (Some(map), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    sign(&claims)
}

/// Sign arbitrary claims with the test secret (HS256).
pub fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(&fixtures().secret),
    )
    .expect("sign token")
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A raw protocol client, for scripted message sequences.
pub struct RawClient<S> {
    reader: FrameReader<tokio::io::ReadHalf<S>>,
    writer: tokio::io::WriteHalf<S>,
}

/// One received message, as (tag, body).
pub type Received = (u8, Vec<u8>);

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite> RawClient<S> {
    pub fn new(stream: S) -> Self {
        let (r, w) = tokio::io::split(stream);
        Self {
            reader: FrameReader::new(r, 1 << 30),
            writer: w,
        }
    }

    /// Send raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
        self.writer.flush().await.expect("flush");
    }

    /// Send raw bytes; false once the peer has closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).await.is_ok() && self.writer.flush().await.is_ok()
    }

    /// Next message, or None at end of stream / after 10 s.
    pub async fn recv(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(10), self.reader.next_message())
            .await
            .ok()?
            .ok()?
    }

    /// Read until `n` ReadyForQuery messages arrived; returns everything in order.
    pub async fn until_ready(&mut self, n: usize) -> Vec<Received> {
        let mut seen = 0;
        let mut out = Vec::new();
        while seen < n {
            let Some(message) = self.recv().await else {
                panic!("stream ended after {out:?}");
            };
            if message.tag() == b'Z' {
                seen += 1;
            }
            out.push((message.tag(), message.body().to_vec()));
        }
        out
    }

    /// Run the startup phase; returns messages up to the first ReadyForQuery.
    async fn startup(
        &mut self,
        user: &str,
        database: &str,
        password: Option<&str>,
    ) -> Vec<Received> {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [
                ("user", user),
                ("database", database),
                ("client_encoding", "UTF8"),
            ],
            &mut buf,
        )
        .expect("startup message");
        self.send(&buf).await;
        let mut out = Vec::new();
        loop {
            let message = self.recv().await.expect("startup response");
            if message.tag() == b'R' && message.body()[..4] == [0, 0, 0, 3] {
                let mut buf = BytesMut::new();
                postgres_protocol::message::frontend::password_message(
                    password.expect("password asked").as_bytes(),
                    &mut buf,
                )
                .expect("password message");
                self.send(&buf).await;
                continue;
            }
            let tag = message.tag();
            out.push((tag, message.body().to_vec()));
            if tag == b'Z' || tag == b'E' {
                return out;
            }
        }
    }
}

/// A raw session directly to PostgreSQL (unix socket, trust) as the superuser.
pub async fn raw_direct(database: &str) -> RawClient<UnixStream> {
    let pg = postgres();
    let path = pg.socket_dir.join(format!(".s.PGSQL.{}", pg.port));
    let mut client = RawClient::new(UnixStream::connect(path).await.expect("unix connect"));
    let startup = client.startup("postgres", database, None).await;
    assert_eq!(
        startup.last().map(|m| m.0),
        Some(b'Z'),
        "direct startup: {startup:?}"
    );
    client
}

/// A raw session through pgward (plaintext loopback) as service `app`.
pub async fn raw_proxied(proxy: &TestProxy, database: &str) -> RawClient<TcpStream> {
    raw_as(proxy, "app", database, serde_json::json!({})).await
}

/// A raw session through pgward (plaintext loopback) as `service`, its token carrying
/// `claims`.
pub async fn raw_as(
    proxy: &TestProxy,
    service: &str,
    database: &str,
    claims: serde_json::Value,
) -> RawClient<TcpStream> {
    let mut client = raw_tcp(proxy.addr).await;
    let startup = client
        .startup(service, database, Some(&token(service, claims)))
        .await;
    assert_eq!(
        startup.last().map(|m| m.0),
        Some(b'Z'),
        "proxied startup: {startup:?}"
    );
    client
}

/// The ErrorResponses among `replies`, each as its body's text (fields NUL-separated).
pub fn error_texts(replies: &[Received]) -> Vec<String> {
    replies
        .iter()
        .filter(|(tag, _)| *tag == b'E')
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect()
}

/// A raw TCP connection (no startup yet).
pub async fn raw_tcp(addr: SocketAddr) -> RawClient<TcpStream> {
    RawClient::new(TcpStream::connect(addr).await.expect("tcp connect"))
}

impl RawClient<TcpStream> {
    /// Startup through pgward with a given user and token; returns what came back.
    pub async fn startup_with(&mut self, user: &str, database: &str, token: &str) -> Vec<Received> {
        self.startup(user, database, Some(token)).await
    }
}

/// Frontend message builders for scripted sequences.
pub mod msg {
    use super::*;
    use postgres_protocol::message::frontend;
    use postgres_protocol::IsNull;

    pub fn query(sql: &str) -> Bytes {
        pgward::protocol::build::query(sql)
    }

    pub fn parse(name: &str, sql: &str) -> Bytes {
        pgward::protocol::build::parse(name, sql)
    }

    /// Parse with declared parameter types.
    pub fn parse_typed(name: &str, sql: &str, types: &[u32]) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::parse(name, sql, types.iter().copied(), &mut buf).expect("parse");
        buf.freeze()
    }

    /// Bind text parameters; `binary_results` asks for binary result columns.
    pub fn bind(
        portal: &str,
        statement: &str,
        params: &[Option<&str>],
        binary_results: bool,
    ) -> Bytes {
        let mut buf = BytesMut::new();
        let result_formats: &[i16] = if binary_results { &[1] } else { &[] };
        frontend::bind(
            portal,
            statement,
            std::iter::empty::<i16>(),
            params.iter(),
            |param, out| match param {
                Some(v) => {
                    out.extend_from_slice(v.as_bytes());
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            result_formats.iter().copied(),
            &mut buf,
        )
        .map_err(|_| ())
        .expect("bind");
        buf.freeze()
    }

    pub fn describe_statement(name: &str) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::describe(b'S', name, &mut buf).expect("describe");
        buf.freeze()
    }

    pub fn describe_portal(name: &str) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::describe(b'P', name, &mut buf).expect("describe");
        buf.freeze()
    }

    pub fn execute(portal: &str, max_rows: i32) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::execute(portal, max_rows, &mut buf).expect("execute");
        buf.freeze()
    }

    pub fn close_statement(name: &str) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::close(b'S', name, &mut buf).expect("close");
        buf.freeze()
    }

    /// FunctionCall (the fast-path interface) of function `oid` with text arguments and a
    /// text result.
    pub fn function_call(oid: u32, args: &[Option<&str>]) -> Bytes {
        let mut body = BytesMut::new();
        body.extend_from_slice(&oid.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes()); // one format code for all: text
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&(args.len() as i16).to_be_bytes());
        for arg in args {
            match arg {
                Some(value) => {
                    body.extend_from_slice(&(value.len() as i32).to_be_bytes());
                    body.extend_from_slice(value.as_bytes());
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        body.extend_from_slice(&0i16.to_be_bytes()); // result format: text
        let mut out = BytesMut::new();
        out.extend_from_slice(b"F");
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&body);
        out.freeze()
    }

    pub fn sync() -> Bytes {
        let mut buf = BytesMut::new();
        frontend::sync(&mut buf);
        buf.freeze()
    }

    pub fn flush() -> Bytes {
        let mut buf = BytesMut::new();
        frontend::flush(&mut buf);
        buf.freeze()
    }

    pub fn copy_data(data: &[u8]) -> Bytes {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"d");
        buf.extend_from_slice(&((data.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(data);
        buf.freeze()
    }

    pub fn copy_done() -> Bytes {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        buf.freeze()
    }

    pub fn copy_fail(reason: &str) -> Bytes {
        let mut buf = BytesMut::new();
        frontend::copy_fail(reason, &mut buf).expect("copy fail");
        buf.freeze()
    }

    /// Concatenate messages into one write (a pipelined batch).
    pub fn batch(parts: &[Bytes]) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }
}

/// Fetch an admin endpoint page.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(addr).await.expect("admin connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

/// Runs the `pgward` binary as an operator would and returns its output; a failing run
/// panics with both of its streams.
pub fn pgward_cli<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(args)
        .output()
        .expect("run pgward");
    assert!(
        out.status.success(),
        "pgward failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `[audit]` section of a test proxy writing to `dir` (checkpoints every second), with
/// `extra` settings.
pub fn audit_toml(dir: &Path, extra: &str) -> String {
    format!(
        "[audit]\ndir = {:?}\ncheckpoint_interval = \"1s\"\n{extra}\n",
        dir.display().to_string()
    )
}

/// A proxy auditing into `dir`.
pub async fn audited_proxy(dir: &Path, extra: &str) -> TestProxy {
    start_proxy(ProxyOptions {
        extra_toml: audit_toml(dir, extra),
        ..ProxyOptions::default()
    })
    .await
}

/// A FIFO standing in for a file on a stalled disk: opening it blocks whoever opens it (for
/// reading or for writing) until the other side comes. The other side comes when this is
/// dropped, or after 15 s — so a proxy that blocks on it fails its test instead of hanging it.
pub struct StalledFile {
    released: Option<std::sync::mpsc::Sender<()>>,
    release: Option<std::thread::JoinHandle<()>>,
}

impl StalledFile {
    pub fn at(path: &Path) -> Self {
        let made = std::process::Command::new("mkfifo").arg(path).status();
        assert!(made.expect("mkfifo runs").success(), "mkfifo {path:?}");
        let (released, wait) = std::sync::mpsc::channel::<()>();
        let path = path.to_path_buf();
        let release = std::thread::spawn(move || {
            let _ = wait.recv_timeout(Duration::from_secs(15));
            answer_fifo(&path);
        });
        StalledFile {
            released: Some(released),
            release: Some(release),
        }
    }
}

impl Drop for StalledFile {
    fn drop(&mut self) {
        drop(self.released.take());
        if let Some(release) = self.release.take() {
            let _ = release.join();
        }
    }
}

/// Opens both ends of the FIFO at once (never blocks on Linux), which lets a blocked opener
/// through; takes what a writer writes and closes, which gives a reader its end of file.
fn answer_fifo(path: &Path) {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    if let Ok(mut fifo) = opened {
        std::thread::sleep(Duration::from_millis(200));
        let _ = fifo.read_to_end(&mut Vec::new());
    }
}

/// Every record of the audit log in `dir`, in file order (lines that are not JSON skipped).
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<serde_json::Value>>()
        })
        .collect()
}

/// A superuser client connected directly to `database` (not through pgward).
pub async fn direct(database: &str) -> tokio_postgres::Client {
    let (client, conn) = postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect directly");
    tokio::spawn(conn);
    client
}

/// `pgward keys <args> --config <config>` against `database` as an operator runs it, off
/// the runtime's threads (a proxy in the same runtime keeps serving): (exit code, stdout,
/// stderr), both streams echoed for a failing test's log.
pub async fn keys_cli(config: &Path, database: &str, args: &[&str]) -> (i32, String, String) {
    let pg = postgres();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .env(
            "PGWARD_DATABASE_URL",
            format!(
                "postgresql://postgres:{}@127.0.0.1:{}/{database}",
                pg.password, pg.port
            ),
        )
        .env_remove("VAULT_TOKEN")
        .output()
        .await
        .expect("run pgward keys");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ pgward keys {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout, stderr)
}
