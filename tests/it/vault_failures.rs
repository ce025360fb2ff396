//! Vault failures through the proxy, in bounded time: a hung OpenBao (SIGSTOP), a revoked
//! token, a sealed OpenBao, a rotated token file, and a token file that does not answer.
//! Real OpenBao, real PostgreSQL.
use pgward::crypto::scope::KeyScope;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::harness::{self, ProxyOptions, TestProxy};
use crate::vault::Bao;

/// Keys poll every second; reads through the proxy are checked against this.
const POLL: Duration = Duration::from_secs(1);
/// Vault request timeout of the proxies below.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);

struct Setup {
    bao: Bao,
    proxy: TestProxy,
    database: String,
    key: String,
    token_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// A proxy encrypting `customers.email` (searchable) and `customers.ssn` with transit key
/// `key`, its Vault token read from a file, polling every second with a 1 s cache TTL (so
/// every cached key is past its TTL during the failures below).
/// `least_privilege`: a revocable token limited to `transit/*` instead of the root token.
async fn setup(prefix: &str, least_privilege: bool) -> Setup {
    let bao = Bao::start().await;
    let token = if least_privilege {
        Some(bao.transit_token().await)
    } else {
        None
    };
    let database = harness::fresh_database(prefix, true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, token.unwrap_or_else(|| bao.token.clone())).unwrap();
    let key = harness::unique_name("pii");
    let policies = std::fs::canonicalize("policies").unwrap();
    let mut extra_toml = format!(
        "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"billing\"\n\
         [services.billing]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n\
         [vault]\naddress = {:?}\ntoken_file = {token_file:?}\nrequest_timeout = \"{}s\"\n\
         [keys]\nprovider = \"transit\"\npoll_interval = \"{}s\"\ndek_cache_ttl = \"1s\"\ndek_cache_max_stale = \"1h\"\n",
        bao.addr,
        REQUEST_TIMEOUT.as_secs(),
        POLL.as_secs()
    );
    for (column, searchable) in [("email", true), ("ssn", false)] {
        extra_toml.push_str(&format!(
            "[[encrypt]]\ntable = \"customers\"\ncolumn = \"{column}\"\nkey = \"{key}\"\ntype = \"text\"\nsearchable = {searchable}\n"
        ));
    }
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .await;
    Setup {
        bao,
        proxy,
        database,
        key,
        token_file,
        _dir: dir,
    }
}

impl Setup {
    async fn billing(&self) -> Client {
        let mut cfg = self.proxy.client_config("billing", &self.database);
        cfg.password(harness::token(
            "billing",
            serde_json::json!({ "tenant_id": 1 }),
        ));
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// The client message of a refused statement must name the column, not Vault.
    fn assert_safe_key_error(&self, e: &tokio_postgres::Error) -> String {
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(db.code().code(), "58000", "{db:?}");
        let msg = db.message().to_string();
        assert!(msg.contains("customers."), "names the column: {msg}");
        let port = self.bao.addr.rsplit(':').next().unwrap();
        for leak in [
            self.key.as_str(),
            port,
            "127.0.0.1",
            "transit",
            "/v1/",
            "403",
            "503",
            "HTTP",
        ] {
            assert!(!msg.contains(leak), "{leak:?} leaked into {msg:?}");
        }
        msg
    }
}

fn write_token(path: &Path, token: &str) {
    // Write then rename, as a Vault Agent sink does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const INSERT: &str = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
const INSERT_SSN_ONLY: &str = "INSERT INTO customers (name, ssn) VALUES ($1, $2)";
const READ: &str = "SELECT name, email, ssn FROM customers WHERE name LIKE 'vf-%' ORDER BY name";

async fn seed(client: &Client, rows: usize) {
    for i in 0..rows {
        client
            .execute(
                INSERT,
                &[
                    &format!("vf-{i:02}"),
                    &format!("vf{i}@example.com"),
                    &format!("{i:03}-00-0000"),
                ],
            )
            .await
            .unwrap();
    }
}

async fn read_all(client: &Client) -> Result<Vec<(String, String, String)>, tokio_postgres::Error> {
    let rows = client.query(READ, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Retry `check` until it holds, for at most `limit`.
async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// OpenBao stopped with SIGSTOP: every cached key is past its TTL, yet a 10-row read (and a
/// write) finishes in well under one Vault request timeout, served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_vault_reads_finish_in_bounded_time() {
    let s = setup("vfhung", false).await;
    if !s.bao.owned() {
        eprintln!("skipped: external Vault cannot be paused");
        return;
    }
    let billing = s.billing().await;
    seed(&billing, 10).await;
    assert_eq!(read_all(&billing).await.unwrap().len(), 10);

    s.bao.pause();
    // Past the TTL, and the poller is now stuck in a request to the hung server.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    let rows = read_all(&billing).await.unwrap();
    let read_time = started.elapsed();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[3].2, "003-00-0000");
    let started = Instant::now();
    billing
        .execute(INSERT, &[&"vf-hang", &"hang@example.com", &"999-99-9999"])
        .await
        .unwrap();
    let found = billing
        .query(
            "SELECT ssn FROM customers WHERE email = $1",
            &[&"hang@example.com"],
        )
        .await
        .unwrap();
    let write_time = started.elapsed();
    s.bao.resume();
    assert_eq!(found[0].get::<_, String>(0), "999-99-9999");
    eprintln!("during the hang: 10-row read {read_time:?}, write+search {write_time:?}");
    assert!(
        read_time < REQUEST_TIMEOUT / 6,
        "10-row read took {read_time:?} (request timeout {REQUEST_TIMEOUT:?})"
    );
    assert!(
        write_time < REQUEST_TIMEOUT / 6,
        "write took {write_time:?}"
    );
}

/// A revoked token stops reads and writes (also of a non-searchable column) within about one
/// poll interval; a new token written to `token_file` brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_stops_reads_and_writes_and_a_new_token_file_restores_them() {
    let s = setup("vfrevoke", true).await;
    let billing = s.billing().await;
    seed(&billing, 3).await;
    assert_eq!(read_all(&billing).await.unwrap().len(), 3);

    let old = std::fs::read_to_string(&s.token_file).unwrap();
    s.bao.revoke(&old).await;
    let revoked_at = Instant::now();
    let stopped = within(POLL * 3, || async { read_all(&billing).await.is_err() }).await;
    assert!(stopped, "reads still served after revocation");
    eprintln!("reads stopped {:?} after revocation", revoked_at.elapsed());
    let err = read_all(&billing).await.unwrap_err();
    let msg = s.assert_safe_key_error(&err);
    assert!(msg.contains("refused"), "{msg}");
    // Writes stop too: a non-searchable column through a parameter and through a literal.
    let err = billing
        .execute(INSERT_SSN_ONLY, &[&"vf-after", &"123-45-6789"])
        .await
        .unwrap_err();
    s.assert_safe_key_error(&err);
    let err = billing
        .simple_query("INSERT INTO customers (name, ssn) VALUES ('vf-lit', '123-45-6789')")
        .await
        .unwrap_err();
    s.assert_safe_key_error(&err);

    // The Vault Agent sink writes a new token: picked up at the next poll.
    write_token(&s.token_file, &s.bao.transit_token().await);
    let back = within(POLL * 5, || async { read_all(&billing).await.is_ok() }).await;
    assert!(back, "a new token in token_file was not picked up");
    assert_eq!(read_all(&billing).await.unwrap().len(), 3);
    billing
        .execute(INSERT_SSN_ONLY, &[&"vf-after", &"123-45-6789"])
        .await
        .unwrap();
}

/// A sealed OpenBao (503) stops reads and writes within about one poll interval, even though
/// every key is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_vault_stops_reads_and_writes() {
    let s = setup("vfseal", false).await;
    if !s.bao.owned() {
        eprintln!("skipped: external Vault must not be sealed");
        return;
    }
    let billing = s.billing().await;
    seed(&billing, 3).await;
    assert_eq!(read_all(&billing).await.unwrap().len(), 3);
    s.bao.seal().await;
    let stopped = within(POLL * 3, || async { read_all(&billing).await.is_err() }).await;
    assert!(stopped, "reads still served with Vault sealed");
    let err = read_all(&billing).await.unwrap_err();
    let msg = s.assert_safe_key_error(&err);
    assert!(msg.contains("sealed"), "{msg}");
    let err = billing
        .execute(INSERT_SSN_ONLY, &[&"vf-sealed", &"123-45-6789"])
        .await
        .unwrap_err();
    s.assert_safe_key_error(&err);
    let err = billing
        .execute(INSERT, &[&"vf-sealed", &"s@example.com", &"123-45-6789"])
        .await
        .unwrap_err();
    s.assert_safe_key_error(&err);
    // /metrics shows the sealed answers and the blocked key.
    let text = s.proxy.metrics.render();
    assert!(text.contains("pgward_keys_blocked 1"), "{text}");
    assert!(
        !text.contains("pgward_vault_requests_total{outcome=\"sealed\"} 0"),
        "{text}"
    );
    assert!(text.contains("pgward_key_cache_lookups_total{result=\"hit\"}"));
}

/// A key manager on OpenBao's transit engine for column `t.c` (a fresh key named after
/// `prefix`), its token read from `token_file`, polling only when told (`reload`).
fn polled_manager(
    bao: &Bao,
    token_file: &Path,
    prefix: &str,
) -> pgward::crypto::manager::KeyManager {
    use pgward::crypto::{ClientType, CryptoConfig, EncryptColumn};
    use pgward::keys::store::{MemoryKeyStore, WrappedKeyStore};
    let config: CryptoConfig = toml::from_str(&format!(
        "[vault]\naddress = {:?}\ntoken_file = {token_file:?}\n[keys]\npoll_interval = \"1h\"\n",
        bao.addr
    ))
    .unwrap();
    let config = CryptoConfig {
        encrypt: vec![EncryptColumn {
            table: "t".into(),
            column: "c".into(),
            key: harness::unique_name(prefix),
            ty: ClientType::Text,
            searchable: false,
            context_claim: None,
            bind_primary_key: false,
        }],
        ..config
    };
    let store: Arc<dyn WrappedKeyStore> = Arc::new(MemoryKeyStore::default());
    pgward::crypto::manager::KeyManager::from_config(&config, Some(store)).unwrap()
}

/// SIGHUP's handler calls `KeyManager::reload`: the token file is re-read at once, without
/// waiting for a poll (the poller is not even running here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_token_file() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    let first = bao.transit_token().await;
    write_token(&token_file, &first);
    let m = polled_manager(&bao, &token_file, "hup");
    let ct = m
        .encrypt("t", "c", &KeyScope::default(), b"v")
        .await
        .unwrap();
    bao.revoke(&first).await;
    m.reload().await;
    assert!(
        m.decrypt("t", "c", &KeyScope::default(), &ct)
            .await
            .is_err(),
        "revoked token blocks"
    );
    write_token(&token_file, &bao.transit_token().await);
    m.reload().await;
    assert_eq!(
        m.decrypt("t", "c", &KeyScope::default(), &ct)
            .await
            .unwrap(),
        b"v"
    );
}

/// A token file that does not answer (a stalled disk) costs the poll a bounded wait on a
/// blocking thread: the runtime serves keys meanwhile (one thread here: a read on it would hold
/// everything), and the next poll skips the read rather than leave a second thread behind the
/// first.
#[tokio::test(flavor = "current_thread")]
async fn a_token_file_that_does_not_answer_holds_neither_the_runtime_nor_the_next_poll() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    write_token(&token_file, &bao.token);
    let m = polled_manager(&bao, &token_file, "stall");
    let scope = KeyScope::default();
    let ct = m.encrypt("t", "c", &scope, b"v").await.unwrap();
    std::fs::remove_file(&token_file).unwrap();
    let stalled = harness::StalledFile::at(&token_file);
    let started = Instant::now();
    let ((), (plain, served_after)) = tokio::join!(m.reload(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let plain = m.decrypt("t", "c", &scope, &ct).await;
        (plain, started.elapsed())
    });
    let poll_took = started.elapsed();
    assert_eq!(plain.unwrap(), b"v");
    assert!(
        served_after < Duration::from_secs(2),
        "a decryption waited {served_after:?} behind the poll's read"
    );
    assert!(
        poll_took < Duration::from_secs(7),
        "the poll waited {poll_took:?} for the token file"
    );
    // The first read still waits on its thread: this poll goes on without reading the file.
    let again = Instant::now();
    m.reload().await;
    assert!(
        again.elapsed() < Duration::from_secs(2),
        "the next poll waited {:?} behind the read still blocked",
        again.elapsed()
    );
    drop(stalled);
}
