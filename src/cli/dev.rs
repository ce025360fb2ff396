//! `pgward dev`: everything a first run needs, in one command.
//!
//! Starts a throwaway PostgreSQL (or uses `--upstream`), applies `migrations/`, creates the
//! application role the demo services log in as, generates a dev signing key and a self-signed
//! certificate under `.pgward/`, writes the configuration it runs with (`.pgward/pgward.toml`,
//! reusable with `pgward serve`), and prints a ready-to-paste psql command per demo service.
//! Ctrl-C stops the proxy and removes the throwaway server.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::auth::DevSigningKey;
use crate::config::Config;
use crate::pgserver::{self, EmbeddedOptions, EmbeddedPostgres};
use crate::proxy::Proxy;

/// Working directory of `pgward dev` and `pgward token mint`, under the current directory.
pub const DEFAULT_DIR: &str = ".pgward";
/// Audience of dev tokens.
pub const DEV_AUDIENCE: &str = "pgward";
/// Issuer of dev tokens.
pub const DEV_ISSUER: &str = "pgward-dev";
/// Database the demo schema goes into on the throwaway server.
const DEMO_DATABASE: &str = "pgward_demo";
/// Role pgward's own connections use on the throwaway server (the policy catalog, the wrapped
/// data keys, seeding the encrypted demo values), as the service `pgward_catalog`, which has no
/// policy: no client can connect as it.
const APP_ROLE: &str = "pgward_app";
/// The service pgward reads the catalog and keys as.
const CATALOG_SERVICE: &str = "pgward_catalog";

/// The demo services and the claims of the tokens printed for them.
const DEMO_SERVICES: [(&str, &[(&str, i64)]); 3] = [
    ("billing", &[("tenant_id", 1)]),
    ("support", &[("tenant_id", 1)]),
    ("analytics", &[]),
];

/// `pgward dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Use this PostgreSQL server (a postgresql:// URL) instead of starting one.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Address to accept clients on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: SocketAddr,
    /// Address of the admin endpoint (/metrics, /healthz).
    #[arg(long, default_value = "127.0.0.1:9930")]
    pub admin: SocketAddr,
    /// Working directory for keys, certificate and configuration.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Directory of SQL migrations to apply (default: the demo's, built into the binary and
    /// written to `<dir>/migrations`).
    #[arg(long)]
    pub migrations: Option<PathBuf>,
    /// Directory of the demo services' policies, reloaded when a file changes (default: the
    /// demo's, built into the binary and written to `<dir>/policies` unless already there, so
    /// edits survive a restart).
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Lifetime of the printed tokens.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Keep encryption keys with the `local` provider even when `bao` (OpenBao) is installed.
    #[arg(long)]
    pub local_keys: bool,
    /// Also install the policies as PostgreSQL row-level security (`policy export-rls`) on the
    /// throwaway server, with the claims passed as `app.<claim>` settings: a second line of
    /// defence behind the rewriter.
    #[arg(long)]
    pub rls: bool,
}

/// Where the demo's upstream is and how the services log in to it.
struct Upstream {
    host: String,
    port: u16,
    database: String,
    user: String,
    password: Option<String>,
    /// Each demo service's own least-privilege role and its password (the throwaway server);
    /// empty with `--upstream`, where every service logs in as `user`.
    service_roles: Vec<(String, String)>,
    /// Kept alive for the life of the demo; dropped (stopped and deleted) at exit.
    _server: Option<EmbeddedPostgres>,
}

/// The migrations and policies directories: the given ones, else the demo's built into the
/// binary, written under `dir` (so `pgward dev` works from any directory).
fn demo_files(args: &DevArgs, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let migrations = match &args.migrations {
        Some(path) => path.clone(),
        None => super::demo_files::write_migrations(&dir.join("migrations"))?,
    };
    let policies = match &args.policies {
        Some(path) => path.clone(),
        None => super::demo_files::write_policies(&dir.join("policies"))?,
    };
    Ok((migrations, policies))
}

/// Run the demo until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = absolute(&args.dir)?;
    create_private_dir(&dir)?;
    let key = DevSigningKey::load_or_create(&dir).context("creating the dev signing key")?;
    let (cert, tls_key) = ensure_certificate(&dir)?;
    let (migrations, policies) = demo_files(&args, &dir)?;
    if args.rls && args.upstream.is_some() {
        bail!("--rls installs row-level security on the throwaway server only; with --upstream run `pgward policy export-rls` yourself");
    }
    let upstream = match &args.upstream {
        Some(url) => existing_upstream(url, &migrations).await?,
        None => throwaway_upstream(&migrations, &policies).await?,
    };
    let openbao = match args.local_keys {
        true => None,
        false => DevOpenBao::start_if_installed(&dir).await?,
    };
    let config_path = dir.join("pgward.toml");
    write_private(
        &config_path,
        &dev_config(
            &args,
            &dir,
            &policies,
            &cert,
            &tls_key,
            &upstream,
            openbao.as_ref(),
        )?,
    )?;
    let config = Config::from_file(&config_path)?;
    let seeded = seed_upstream(&config, &upstream).await?;
    eprintln!("pgward dev: encrypted demo values seeded: {seeded}");
    if args.rls {
        install_rls(&upstream, &policies).await?;
    }
    if let Some(bao) = &openbao {
        eprintln!(
            "pgward dev: keys in an OpenBao dev server at {} (token in {}); rotate the demo key with\n  \
             BAO_ADDR={} BAO_TOKEN=$(cat {}) bao write -f transit/keys/{DEMO_KEY}/rotate",
            bao.address,
            bao.token_file.display(),
            bao.address,
            bao.token_file.display()
        );
    }
    let proxy = Proxy::bind(config).await?;
    let address = proxy.local_addr()?;
    super::spawn_reload_on_sighup(&proxy, config_path.clone())?;
    print_banner(&args, &dir, &key, address, &upstream)?;
    proxy.run(super::shutdown_signal()).await;
    eprintln!(
        "pgward dev: stopped{}",
        if upstream._server.is_some() {
            "; throwaway PostgreSQL removed"
        } else {
            ""
        }
    );
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

fn ensure_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("tls-cert.pem");
    let key = dir.join("tls-key.pem");
    if !cert.exists() || !key.exists() {
        crate::tls::write_self_signed(&cert, &key, &["localhost", "127.0.0.1"])?;
    }
    Ok((cert, key))
}

async fn throwaway_upstream(migrations: &Path, policies: &Path) -> anyhow::Result<Upstream> {
    eprintln!("pgward dev: starting a throwaway PostgreSQL ...");
    let server =
        tokio::task::spawn_blocking(|| EmbeddedPostgres::start(EmbeddedOptions::default()))
            .await??;
    let admin = server.client_config("postgres");
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {DEMO_DATABASE}"))
        .await?;
    drop(client);
    let _ = driver.await;
    let applied = server.apply_migrations(DEMO_DATABASE, migrations).await?;
    let password = pgserver::random_password();
    let (client, connection) = server
        .client_config(DEMO_DATABASE)
        .connect(tokio_postgres::NoTls)
        .await?;
    let driver = tokio::spawn(connection);
    // The password is alphanumeric (random_password), so quoting it as a literal is safe.
    client
        .batch_execute(&format!(
            "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{password}';
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};
             GRANT USAGE ON SCHEMA pgward TO {APP_ROLE};
             GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA pgward TO {APP_ROLE};"
        ))
        .await?;
    let service_roles = create_service_roles(&client, &server, policies).await?;
    drop(client);
    let _ = driver.await;
    eprintln!(
        "pgward dev: PostgreSQL on 127.0.0.1:{} (superuser postgres / {}, files in {}), migrations applied: {}",
        server.port(),
        server.password(),
        server.root().display(),
        applied.join(", ")
    );
    Ok(Upstream {
        host: "127.0.0.1".into(),
        port: server.port(),
        database: DEMO_DATABASE.into(),
        user: APP_ROLE.into(),
        password: Some(password),
        service_roles,
        _server: Some(server),
    })
}

/// `--rls`: the policies as row-level security on the throwaway server (after seeding, which
/// writes as pgward's own role, which no policy names).
async fn install_rls(upstream: &Upstream, policies: &Path) -> anyhow::Result<()> {
    let Some(server) = &upstream._server else {
        bail!("--rls needs the throwaway server");
    };
    let url = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/{DEMO_DATABASE}",
        server.password(),
        server.port()
    );
    let rls = crate::policy::cli::run_export_rls(&crate::policy::cli::ExportRlsArgs {
        dir: policies.to_path_buf(),
        database_url: url,
    })
    .await?;
    let (client, connection) = server
        .client_config(DEMO_DATABASE)
        .connect(tokio_postgres::NoTls)
        .await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&rls)
        .await
        .context("installing the row-level security policy export-rls printed")?;
    drop(client);
    let _ = driver.await;
    eprintln!("pgward dev: row-level security installed (policy export-rls), claims passed as app.<claim>");
    Ok(())
}

/// One login role per demo service, named after it (as `pgward policy export-rls` expects),
/// neither superuser nor owner of anything, with only the privileges its policy needs: the
/// GRANTs `export-rls` prints, the sequences of the tables it may insert into, and the
/// `pgward` schema's `assert_row` (write checks). The rewriter stays the first line of defence;
/// these roles make a statement it should have refused fail in the server too.
async fn create_service_roles(
    client: &tokio_postgres::Client,
    server: &EmbeddedPostgres,
    policies: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let url = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/{DEMO_DATABASE}",
        server.password(),
        server.port()
    );
    let grants = crate::policy::cli::grants_for(policies, &url)
        .await
        .context("computing the demo services' privileges from their policies")?;
    let mut roles = Vec::new();
    for (service, _) in DEMO_SERVICES {
        let password = pgserver::random_password();
        // Service names and the password are plain identifiers/alphanumerics.
        let mut sql = format!(
            "CREATE ROLE {service} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}';
             GRANT USAGE ON SCHEMA pgward TO {service};"
        );
        let role = format!("TO \"{service}\";");
        if grants
            .lines()
            .any(|l| l.starts_with("GRANT INSERT") && l.ends_with(&role))
        {
            sql.push_str(&format!(
                "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {service};"
            ));
        }
        client.batch_execute(&sql).await?;
        roles.push((service.to_string(), password));
    }
    client.batch_execute(&grants).await?;
    Ok(roles)
}

async fn existing_upstream(url: &str, migrations: &Path) -> anyhow::Result<Upstream> {
    let config: tokio_postgres::Config = url.parse().context("parsing --upstream")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let Some(user) = config.get_user().map(str::to_string) else {
        bail!("--upstream needs a user name in the URL");
    };
    let database = config.get_dbname().unwrap_or(&user).to_string();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let applied = pgserver::apply_migrations(&config, migrations).await?;
    eprintln!(
        "pgward dev: using {host}:{port}/{database} as {user}; migrations applied: {}",
        applied.join(", ")
    );
    Ok(Upstream {
        host,
        port,
        database,
        user,
        password,
        service_roles: Vec::new(),
        _server: None,
    })
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn dev_config(
    args: &DevArgs,
    dir: &Path,
    policies: &Path,
    cert: &Path,
    key: &Path,
    upstream: &Upstream,
    openbao: Option<&DevOpenBao>,
) -> anyhow::Result<String> {
    let password_line = match &upstream.password {
        Some(password) => {
            let path = dir.join("upstream-password");
            write_private(&path, password)?;
            format!(
                "upstream_password = {{ file = {} }}\n",
                toml_string(&path.display().to_string())
            )
        }
        None => String::new(),
    };
    let mut text = format!(
        "# Written by `pgward dev`; usable as is with `pgward serve --config {config}`.\n\
         [listen]\naddress = {listen}\ntls_cert_file = {cert}\ntls_key_file = {key}\n\
         # Development only: plaintext clients are accepted from loopback addresses.\n\
         allow_plaintext_loopback = true\n\n\
         [upstream]\nhost = {host}\nport = {port}\n\n\
         [auth]\njwks_file = {jwks}\nissuer = {issuer}\naudience = [{audience}]\nmax_token_lifetime = \"24h\"\n\n\
         [admin]\naddress = {admin}\n\n\
         [policy]\ndir = {policies}\ndatabase = {database}\n{catalog}\n\
         [audit]\ndir = {audit}\nsigning_key_file = {audit_key}\ncheckpoint_interval = \"10s\"\n",
        config = dir.join("pgward.toml").display(),
        listen = toml_string(&args.listen.to_string()),
        cert = toml_string(&cert.display().to_string()),
        key = toml_string(&key.display().to_string()),
        host = toml_string(&upstream.host),
        port = upstream.port,
        jwks = toml_string(&DevSigningKey::jwks_path(dir).display().to_string()),
        issuer = toml_string(DEV_ISSUER),
        audience = toml_string(DEV_AUDIENCE),
        admin = toml_string(&args.admin.to_string()),
        policies = toml_string(&absolute(policies)?.display().to_string()),
        database = toml_string(&upstream.database),
        catalog = if upstream.service_roles.is_empty() {
            String::new()
        } else {
            format!(
                "catalog_service = {}\n{}",
                toml_string(CATALOG_SERVICE),
                if args.rls { "claims_as_settings = true\n" } else { "" }
            )
        },
        audit = toml_string(&dir.join("audit").display().to_string()),
        audit_key = toml_string(&audit_signing_key(dir)?.display().to_string()),
    );
    if upstream.service_roles.is_empty() {
        for (service, _) in DEMO_SERVICES {
            text.push_str(&format!(
                "\n[services.{service}]\nupstream_user = {}\n{password_line}",
                toml_string(&upstream.user)
            ));
        }
    } else {
        text.push_str(&format!(
            "\n# pgward's own logins (catalog, data keys); it has no policy, so no client can use it.\n\
             [services.{CATALOG_SERVICE}]\nupstream_user = {}\n{password_line}",
            toml_string(&upstream.user)
        ));
        for (service, password) in &upstream.service_roles {
            let path = dir.join(format!("upstream-password-{service}"));
            write_private(&path, password)?;
            text.push_str(&format!(
                "\n# Least-privilege role: only what policies/{service}.toml allows.\n\
                 [services.{service}]\nupstream_user = {}\nupstream_password = {{ file = {} }}\n",
                toml_string(service),
                toml_string(&path.display().to_string())
            ));
        }
    }
    text.push('\n');
    match openbao {
        Some(bao) => text.push_str(&format!(
            "# Field encryption with keys in the OpenBao dev server `pgward dev` started.\n\
             [vault]\naddress = {}\ntoken_file = {}\n\n[keys]\nprovider = \"transit\"\npoll_interval = \"5s\"\n{}",
            toml_string(&bao.address),
            toml_string(&bao.token_file.display().to_string()),
            demo_encrypt_columns()
        )),
        None => {
            let master_key = dir.join("master.key");
            if !master_key.exists() {
                crate::keys::local::LocalProvider::generate_file(&master_key)
                    .context("creating the dev master key")?;
            }
            text.push_str(&demo_encryption_toml(&master_key));
        }
    }
    Ok(text)
}

/// The Ed25519 key that signs the demo's audit checkpoints (created on first run).
fn audit_signing_key(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("audit-signing.pem");
    crate::audit::SigningKey::load_or_create(&path)?;
    Ok(path)
}

/// Name of the demo's key (transit key / local key name).
const DEMO_KEY: &str = "demo-pii";

/// An OpenBao dev server (`bao server -dev`) with transit enabled, stopped when dropped.
struct DevOpenBao {
    address: String,
    token_file: PathBuf,
    child: std::process::Child,
}

impl Drop for DevOpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevOpenBao {
    /// Start one when `bao` is on PATH; `None` (local keys) otherwise.
    async fn start_if_installed(dir: &Path) -> anyhow::Result<Option<Self>> {
        let Some(bao) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("bao"))
                .find(|p| p.is_file())
        }) else {
            return Ok(None);
        };
        let port = pgserver::free_port()?;
        let token = pgserver::random_password();
        let token_file = dir.join("openbao-token");
        write_private(&token_file, &token)?;
        let log = fs::File::create(dir.join("openbao.log"))?;
        let child = std::process::Command::new(&bao)
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={token}"),
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bao.display()))?;
        let server = DevOpenBao {
            address: format!("http://127.0.0.1:{port}"),
            token_file,
            child,
        };
        let client = crate::keys::vault::VaultClient::new(crate::keys::vault::VaultClientConfig {
            address: server.address.clone(),
            auth: crate::keys::vault::VaultAuth::Token(zeroize::Zeroizing::new(token)),
            ca_file: None,
            request_timeout: Duration::from_secs(5),
        })?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !matches!(
            client.health().await,
            Ok(crate::keys::vault::Health::Active)
        ) {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the OpenBao dev server did not start (see {}/openbao.log); use --local-keys",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client
            .post("sys/mounts/transit", serde_json::json!({"type": "transit"}))
            .await
            .context("enabling transit in the OpenBao dev server")?;
        eprintln!(
            "pgward dev: OpenBao dev server on {} (transit)",
            server.address
        );
        Ok(Some(server))
    }
}

/// The encrypted demo columns (`[keys]` with the `local` provider and `[[encrypt]]`).
pub fn demo_encryption_toml(master_key: &Path) -> String {
    format!(
        "# Field encryption. The local provider derives keys from a file: development only.\n\
         [keys]\nprovider = \"local\"\nlocal_master_key_file = {}\n{}",
        toml_string(&master_key.display().to_string()),
        demo_encrypt_columns()
    )
}

/// The `[[encrypt]]` entries of the demo.
fn demo_encrypt_columns() -> String {
    let mut text = String::new();
    for (table, column, searchable, bound) in [
        ("customers", "email", true, false),
        ("customers", "ssn", false, true),
        ("invoices", "card_number", true, false),
    ] {
        text.push_str(&format!(
            "\n[[encrypt]]\ntable = \"{table}\"\ncolumn = \"{column}\"\nkey = \"{DEMO_KEY}\"\ntype = \"text\"\nsearchable = {searchable}\ncontext_claim = \"tenant_id\"\n"
        ));
        if bound {
            // Each ssn is bound to its customer's id: copied into another row, it fails.
            text.push_str("bind_primary_key = true\n");
        }
    }
    text
}

/// Fill the seeded rows' encrypted columns through the crypto library (the seed migration
/// leaves them NULL: plaintext never reaches the database).
async fn seed_upstream(config: &Config, upstream: &Upstream) -> anyhow::Result<usize> {
    let mut db = tokio_postgres::Config::new();
    db.host(&upstream.host)
        .port(upstream.port)
        .user(&upstream.user)
        .dbname(&upstream.database);
    if let Some(password) = &upstream.password {
        db.password(password.as_str());
    }
    let (client, connection) = db.connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let client = std::sync::Arc::new(client);
    let crypto = config.crypto();
    let store: Option<std::sync::Arc<dyn crate::keys::store::WrappedKeyStore>> =
        match crypto.keys.provider {
            crate::crypto::ProviderKind::Transit => Some(std::sync::Arc::new(
                crate::keys::store::PgKeyStore::new(client.clone()),
            )),
            _ => None,
        };
    let manager = crate::crypto::KeyManager::from_config(&crypto, store)?;
    let seeded = seed_encrypted_demo(&client, &manager).await;
    drop(manager);
    drop(client);
    let _ = driver.await;
    seeded
}

/// The demo's personal data, derived from a seeded customer's name (`Customer <tenant>-<n>`):
/// (email, ssn).
pub fn demo_customer_values(name: &str) -> Option<(String, String)> {
    let (t, n) = name.strip_prefix("Customer ")?.split_once('-')?;
    let (t, n): (u32, u32) = (t.parse().ok()?, n.parse().ok()?);
    Some((
        format!("customer{n}@tenant{t}.example"),
        format!("{:03}-{n:02}-{:04}", 100 + t, 1000 + n * t),
    ))
}

/// Encrypt the seeded customers' email and ssn and the invoices' card numbers where they are
/// still NULL. Returns the number of rows written.
pub async fn seed_encrypted_demo(
    client: &tokio_postgres::Client,
    manager: &crate::crypto::KeyManager,
) -> anyhow::Result<usize> {
    let mut written = 0;
    for row in client
        .query(
            "SELECT id, name, tenant_id FROM customers WHERE email IS NULL AND ssn IS NULL AND name LIKE 'Customer %'",
            &[],
        )
        .await?
    {
        let (id, name, tenant): (i64, String, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let Some((email, ssn)) = demo_customer_values(&name) else {
            continue;
        };
        let scope = tenant_scope(tenant);
        let email_ct = manager.encrypt("customers", "email", &scope, email.as_bytes()).await?;
        let email_bidx = manager
            .blind_index("customers", "email", &scope, email.as_bytes())
            .await?;
        let ssn_ct = match manager.column("customers", "ssn") {
            Ok(spec) if spec.column.bind_primary_key => {
                manager
                    .encrypt_row("customers", "ssn", &scope, Some(&id.to_string()), ssn.as_bytes())
                    .await?
            }
            _ => manager.encrypt("customers", "ssn", &scope, ssn.as_bytes()).await?,
        };
        written += client
            .execute(
                "UPDATE customers SET email = $1, email_bidx = $2, ssn = $3 WHERE id = $4",
                &[&email_ct, &email_bidx.as_slice(), &ssn_ct, &id],
            )
            .await?;
    }
    for row in client
        .query(
            "SELECT id, customer_id, tenant_id FROM invoices WHERE card_number IS NULL AND customer_id IS NOT NULL",
            &[],
        )
        .await?
    {
        let (id, customer, tenant): (i64, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let card = format!("4111-1111-1111-{customer:04}");
        let scope = tenant_scope(tenant);
        let ct = manager
            .encrypt("invoices", "card_number", &scope, card.as_bytes())
            .await?;
        let bidx = manager
            .blind_index("invoices", "card_number", &scope, card.as_bytes())
            .await?;
        written += client
            .execute(
                "UPDATE invoices SET card_number = $1, card_number_bidx = $2 WHERE id = $3",
                &[&ct, &bidx.as_slice(), &id],
            )
            .await?;
    }
    Ok(written as usize)
}

/// The key context of a demo row: its tenant, as the `tenant_id` claim of that tenant's tokens.
fn tenant_scope(tenant: i64) -> crate::crypto::scope::KeyScope {
    crate::crypto::scope::KeyScope::with([("tenant_id".to_string(), tenant.to_string())])
}

fn print_banner(
    args: &DevArgs,
    dir: &Path,
    key: &DevSigningKey,
    address: SocketAddr,
    upstream: &Upstream,
) -> anyhow::Result<()> {
    let mut out = String::new();
    out.push_str(&format!(
        "\npgward dev is running on {address} (TLS with a self-signed certificate; admin on http://{}/metrics)\n\
         working files: {}  (config: pgward.toml, dev signing key, certificate)\n\n\
         Connect as a demo service (tokens valid for {}):\n",
        args.admin,
        dir.display(),
        humantime::format_duration(args.token_ttl)
    ));
    for (service, claims) in DEMO_SERVICES {
        let claims: serde_json::Map<String, serde_json::Value> = claims
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let token = key.mint(
            service,
            &claims,
            args.token_ttl,
            Some(DEV_AUDIENCE),
            Some(DEV_ISSUER),
        )?;
        out.push_str(&format!(
            "\n  # {service}{}\n  psql \"postgresql://{service}:{token}@{address}/{}?sslmode=require\"\n",
            if claims.is_empty() { String::new() } else { format!(" ({})", serde_json::Value::Object(claims)) },
            upstream.database
        ));
    }
    out.push_str(&format!(
        "\nEvery statement is audited to {audit}/ ; check it with:\n  cargo run -- audit verify --live --public-key {key}.pub {audit}\n",
        audit = dir.join("audit").display(),
        key = dir.join("audit-signing.pem").display(),
    ));
    out.push_str("\nMint more tokens with: cargo run -- token mint --service billing --claim tenant_id=2\nPress Ctrl-C to stop.\n");
    // One write, errors ignored: whoever reads the banner may close the pipe right after it
    // (`pgward dev | head`, a test harness), and that must never take the proxy down.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush());
    Ok(())
}
