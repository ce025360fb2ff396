//! A throwaway PostgreSQL server started from the installed server binaries.
//!
//! Used by `pgward dev` and by the integration-test harness, so both exercise the same code: find
//! the binaries (`pg_config --bindir`, then `/usr/lib/postgresql/*/bin`), `initdb` into a fresh
//! temporary directory, start it with `pg_ctl` on a free loopback port and a private unix socket,
//! and remove everything on drop. PostgreSQL refuses to run as root, so when pgward runs as root
//! the server processes run as the `postgres` account (or `nobody`) instead.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use thiserror::Error;

/// What can go wrong while starting or driving the throwaway server.
#[derive(Debug, Error)]
pub enum PgServerError {
    #[error("PostgreSQL server binaries not found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install -y postgresql`")]
    BinariesNotFound,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no unprivileged account (postgres or nobody) to run PostgreSQL as")]
    NoUnprivilegedUser,
    #[error("applying migration {file}: {source}")]
    Migration {
        file: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgServerError {
    let context = context.into();
    move |source| PgServerError::Io { context, source }
}

/// Options for [`EmbeddedPostgres::start`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Password of the `postgres` superuser (SCRAM-SHA-256 over TCP).
    pub superuser_password: String,
    /// Extra `pg_hba.conf` lines placed before the defaults (first match wins).
    pub extra_hba: Vec<String>,
    /// Extra `postgresql.conf` settings.
    pub extra_conf: Vec<String>,
    /// Keep durability settings (fsync) as in production; tests turn them off for speed.
    pub durable: bool,
    /// Serve TLS with a freshly generated self-signed certificate for `localhost`.
    pub tls: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            superuser_password: random_password(),
            extra_hba: Vec::new(),
            extra_conf: Vec::new(),
            durable: false,
            tls: false,
        }
    }
}

/// A running throwaway PostgreSQL server; stopped and deleted on drop.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    password: String,
    stopped: bool,
}

/// A random alphanumeric password.
pub fn random_password() -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Locate the PostgreSQL server binaries.
pub fn find_bindir() -> Result<PathBuf, PgServerError> {
    if let Ok(dir) = std::env::var("PGWARD_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut candidates = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .collect();
        // Newest major version first.
        versions.sort_by_key(|p| {
            std::cmp::Reverse(
                p.parent()
                    .and_then(Path::file_name)
                    .and_then(OsStr::to_str)
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
            )
        });
        candidates.extend(versions);
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("postgres").is_file() && dir.join("initdb").is_file())
        .ok_or(PgServerError::BinariesNotFound)
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> Result<u16, PgServerError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port();
    Ok(port)
}

fn unprivileged_ids() -> Result<Option<(u32, u32)>, PgServerError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        // SAFETY: getpwnam returns a pointer into static storage or null; we copy the ids at once.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: pw was checked non-null above.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Ok(Some((uid, gid)));
        }
    }
    Err(PgServerError::NoUnprivilegedUser)
}

fn chown(path: &Path, ids: Option<(u32, u32)>) -> Result<(), PgServerError> {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// tokio-postgres config for the `postgres` superuser of a local server over TCP.
pub fn superuser_config(port: u16, password: &str, database: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(password)
        .dbname(database);
    config
}

impl EmbeddedPostgres {
    /// initdb, configure and start a server. Blocks until it accepts connections.
    pub fn start(options: EmbeddedOptions) -> Result<Self, PgServerError> {
        let bindir = find_bindir()?;
        let run_as = unprivileged_ids()?;
        let root = make_temp_root()?;
        let mut server = Self {
            root,
            bindir,
            port: 0,
            run_as,
            password: options.superuser_password.clone(),
            stopped: true,
        };
        server.init(&options)?;
        server.launch()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The temporary directory holding data, socket and log (removed on drop).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the server's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Password of the `postgres` superuser.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Server log file (useful when a test fails).
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// The server's TLS certificate (PEM), when started with `tls`.
    pub fn tls_cert_file(&self) -> PathBuf {
        self.root.join("server.crt")
    }

    /// The installed binaries' directory.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A libpq-style URL for the superuser over TCP.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{}",
            self.password, self.port, database
        )
    }

    /// A tokio-postgres config for the superuser over TCP.
    pub fn client_config(&self, database: &str) -> tokio_postgres::Config {
        superuser_config(self.port, &self.password, database)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.env_remove("PGDATA").env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            // SAFETY: setgid/setuid are async-signal-safe and run in the forked child only.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output, PgServerError> {
        let out = cmd.output().map_err(io_err(format!("running {what}")))?;
        if !out.status.success() {
            return Err(PgServerError::Command {
                what: what.to_string(),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(out)
    }

    fn init(&mut self, options: &EmbeddedOptions) -> Result<(), PgServerError> {
        let data = self.data_dir();
        let sock = self.socket_dir();
        for dir in [&data, &sock] {
            fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("setting permissions"))?;
            chown(dir, self.run_as)?;
        }
        let pwfile = self.root.join("pwfile");
        fs::write(&pwfile, format!("{}\n", options.superuser_password))
            .map_err(io_err("writing the password file"))?;
        chown(&pwfile, self.run_as)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-instructions",
                "-A",
                "scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        self.run("initdb", &mut initdb)?;
        let _ = fs::remove_file(&pwfile);

        let mut hba = String::from("# written by pgward's embedded server\n");
        for line in &options.extra_hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("local all all trust\n");
        hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
        hba.push_str("host all all ::1/128 scram-sha-256\n");
        let hba_path = data.join("pg_hba.conf");
        fs::write(&hba_path, hba).map_err(io_err("writing pg_hba.conf"))?;
        chown(&hba_path, self.run_as)?;

        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", sock.display()),
            "max_connections = 300".to_string(),
            "shared_buffers = 64MB".to_string(),
            "password_encryption = 'scram-sha-256'".to_string(),
        ];
        if !options.durable {
            conf.extend(
                [
                    "fsync = off",
                    "synchronous_commit = off",
                    "full_page_writes = off",
                ]
                .map(String::from),
            );
        }
        if options.tls {
            let cert = self.tls_cert_file();
            let key = self.root.join("server.key");
            crate::tls::write_self_signed(&cert, &key, &["localhost"]).map_err(|e| {
                PgServerError::Command {
                    what: "generating the server certificate".into(),
                    detail: e.to_string(),
                }
            })?;
            chown(&cert, self.run_as)?;
            chown(&key, self.run_as)?;
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", cert.display()));
            conf.push(format!("ssl_key_file = '{}'", key.display()));
        }
        conf.extend(options.extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.auto.conf");
        fs::write(&conf_path, conf.join("\n") + "\n")
            .map_err(io_err("writing postgresql.auto.conf"))?;
        chown(&conf_path, self.run_as)?;
        Ok(())
    }

    fn launch(&mut self) -> Result<(), PgServerError> {
        // Another process may grab the port between our probe and the bind; retry a few times.
        let mut last_error = None;
        for _ in 0..5 {
            self.port = free_port()?;
            let log = self.log_file();
            if !log.exists() {
                fs::write(&log, "").map_err(io_err("creating the log file"))?;
                chown(&log, self.run_as)?;
            }
            let mut start = self.command("pg_ctl");
            start
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {}", self.port))
                .arg("start");
            match self.run("pg_ctl start", &mut start) {
                Ok(_) => {
                    self.stopped = false;
                    return Ok(());
                }
                Err(e) => last_error = Some(e),
            }
        }
        let log = fs::read_to_string(self.log_file()).unwrap_or_default();
        Err(match last_error {
            Some(PgServerError::Command { what, detail }) => PgServerError::Command {
                what,
                detail: format!("{detail}\n--- server log ---\n{log}"),
            },
            Some(other) => other,
            None => PgServerError::Command {
                what: "pg_ctl start".into(),
                detail: log,
            },
        })
    }

    /// Run SQL files in lexical order (idempotent migrations) against `database`.
    pub async fn apply_migrations(
        &self,
        database: &str,
        dir: &Path,
    ) -> Result<Vec<String>, PgServerError> {
        apply_migrations(&self.client_config(database), dir).await
    }

    /// Stop the server now (also done on drop).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
        self.stopped = true;
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn make_temp_root() -> Result<PathBuf, PgServerError> {
    let base = std::env::temp_dir();
    for _ in 0..16 {
        let candidate = base.join(format!("pgward-pg-{}", &random_password()[..10]));
        match fs::create_dir(&candidate) {
            Ok(()) => {
                // The server account must be able to traverse into its data and socket dirs.
                fs::set_permissions(&candidate, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("setting permissions"))?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("creating a temporary directory")(e)),
        }
    }
    Err(PgServerError::Command {
        what: "creating a temporary directory".into(),
        detail: "no unused name found".into(),
    })
}

/// Apply every `*.sql` file of `dir`, in file-name order, in one connection.
pub async fn apply_migrations(
    config: &tokio_postgres::Config,
    dir: &Path,
) -> Result<Vec<String>, PgServerError> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| PgServerError::Migration {
            file: "(connect)".into(),
            source,
        })?;
    let driver = tokio::spawn(connection);
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(OsStr::to_str) == Some("sql"))
        .collect();
    files.sort();
    let mut applied = Vec::new();
    for file in files {
        let sql =
            fs::read_to_string(&file).map_err(io_err(format!("reading {}", file.display())))?;
        let name = file
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or_default()
            .to_string();
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| PgServerError::Migration {
                file: name.clone(),
                source,
            })?;
        applied.push(name);
    }
    drop(client);
    let _ = driver.await;
    Ok(applied)
}
