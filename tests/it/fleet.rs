//! A fleet of pgward replicas behind haproxy (TCP mode, round robin): a cancel sent through the
//! load balancer cancels the right query whichever replica it lands on, and forged cancels —
//! a wrong secret, a key naming no configured node, a peer request without the fleet's secret —
//! cancel nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgward::config::Config;
use pgward::metrics::Metrics;
use pgward::protocol::peer_cancel::PeerCancelRequest;
use pgward::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::haproxy::Haproxy;
use crate::harness::{self, ProxyOptions};

/// One pgward replica, run in the test's runtime; stopped when dropped.
struct Replica {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    reloader: pgward::proxy::reload::Reloader,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    audit: tempfile::TempDir,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Replica {
    fn count(&self, pick: impl Fn(&Metrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.metrics).load(Ordering::Relaxed)
    }
}

/// The configuration of replica `node_id`: the harness's services, its own audit directory,
/// the fleet's secret and these peers.
fn replica_config(
    node_id: u8,
    peers: &[(u8, SocketAddr)],
    secret_file: &Path,
    audit: &Path,
) -> Config {
    replica_config_with(node_id, peers, secret_file, audit, "")
}

/// [`replica_config`] with more sections (the same on every replica).
fn replica_config_with(
    node_id: u8,
    peers: &[(u8, SocketAddr)],
    secret_file: &Path,
    audit: &Path,
    extra: &str,
) -> Config {
    let peers: String = peers
        .iter()
        .map(|(id, addr)| format!("[[cluster.peers]]\nnode_id = {id}\naddress = \"{addr}\"\n"))
        .collect();
    let text = harness::proxy_config_text(&ProxyOptions {
        extra_toml: format!(
            "{}\n{extra}\n[cluster]\nnode_id = {node_id}\nsecret = {{ file = {secret_file:?} }}\npeer_timeout = \"2s\"\n{peers}",
            harness::audit_toml(audit, ""),
        ),
        ..ProxyOptions::default()
    });
    toml::from_str(&text).expect("replica config parses")
}

async fn start_replica(node_id: u8, peers: &[(u8, SocketAddr)], secret_file: &Path) -> Replica {
    start_replica_with(node_id, peers, secret_file, "").await
}

async fn start_replica_with(
    node_id: u8,
    peers: &[(u8, SocketAddr)],
    secret_file: &Path,
    extra: &str,
) -> Replica {
    let audit = tempfile::tempdir().unwrap();
    let config = replica_config_with(node_id, peers, secret_file, audit.path(), extra);
    let proxy = Proxy::bind(config).await.expect("replica binds");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let replica = Replica {
        addr: proxy.local_addr().unwrap(),
        metrics: proxy.metrics(),
        reloader: proxy.reloader(),
        stop: Some(stop),
        audit,
    };
    tokio::spawn(proxy.run(async move {
        let _ = stopped.await;
    }));
    replica
}

/// Two replicas that know each other: node 1 starts alone, node 2 with node 1 as its peer,
/// then node 1 learns node 2 by a reload (as SIGHUP applies it).
async fn start_fleet(secret_file: &Path) -> (Replica, Replica) {
    let one = start_replica(1, &[], secret_file).await;
    let two = start_replica(2, &[(1, one.addr)], secret_file).await;
    let reloaded = replica_config(1, &[(2, two.addr)], secret_file, one.audit.path());
    let restart = one.reloader.apply(&reloaded).await.expect("peers reload");
    assert!(restart.is_empty(), "restart-only changes: {restart:?}");
    (one, two)
}

fn cluster_secret() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    std::fs::write(&path, "fleet-secret-shared-by-every-replica-0123456789\n").unwrap();
    (dir, path)
}

/// A superuser connection straight to PostgreSQL, to watch the backends.
async fn direct(database: &str) -> tokio_postgres::Client {
    let (client, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// The text of sleep number `n`: distinct, so that the server's activity view cannot show a
/// session's previous sleep (still `active` for a moment after its error was sent) as this one.
fn sleep_sql(n: usize) -> String {
    format!("SELECT pg_sleep(30), {n} AS sleep")
}

/// Wait until backend `pid` is running sleep number `n` (so a cancel now can only hit it).
async fn wait_until_sleeping(direct: &tokio_postgres::Client, pid: i32, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = direct
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query = $2",
                &[&pid, &sleep_sql(n)],
            )
            .await
            .unwrap();
        if row.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never started sleeping"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Send a raw CancelRequest and wait until the receiver closes the connection.
async fn send_cancel(addr: SocketAddr, process_id: u32, secret_key: u32) {
    send_raw(
        addr,
        &pgward::protocol::build::cancel_request(process_id, secret_key),
    )
    .await;
}

async fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tcp.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
}

/// Wait (up to 2 s) until `done` holds.
async fn settle(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const ATTEMPTS: usize = 100;

/// A session through the load balancer: its client, upstream PID and cancel token.
struct Session {
    client: Option<tokio_postgres::Client>,
    pid: i32,
    token: tokio_postgres::CancelToken,
}

impl Session {
    async fn open(lb: &Haproxy, database: &str) -> Self {
        let client = lb.connect(database).await;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let token = client.cancel_token();
        Self {
            client: Some(client),
            pid,
            token,
        }
    }

    /// Start sleep number `n`; the handle gives the client back with the query's result.
    fn sleep(
        &mut self,
        n: usize,
    ) -> tokio::task::JoinHandle<(
        tokio_postgres::Client,
        Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    )> {
        let client = self.client.take().expect("session idle");
        tokio::spawn(async move {
            let result = client.simple_query(&sleep_sql(n)).await;
            (client, result)
        })
    }
}

/// The cancel counters of a replica, for failure messages.
fn cancel_counts(replica: &Replica) -> String {
    format!(
        "delivered {} dropped {} sent {} failed {} received {} refused {}",
        replica.count(|m| &m.cancels_forwarded),
        replica.count(|m| &m.cancels_dropped),
        replica.count(|m| &m.peer_cancels_sent),
        replica.count(|m| &m.peer_cancels_failed),
        replica.count(|m| &m.peer_cancels_received),
        replica.count(|m| &m.peer_cancels_refused),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_the_load_balancer_cancels_the_right_query_every_time() {
    let database = harness::fresh_database("fleet", false).await;
    let (_secret_dir, secret_file) = cluster_secret();
    let (one, two) = start_fleet(&secret_file).await;
    let lb = Haproxy::start(&[one.addr, two.addr]).await;
    let watch = direct(&database).await;
    // Round robin puts the two sessions on different replicas, and alternates the replica
    // each cancel connection lands on. Cancelling session (attempt / 2) % 2 makes the pairs
    // (session's replica, cancel's replica) run through all four combinations: half of the
    // cancels land on the replica holding the session, half on the other one.
    let mut sessions = [
        Session::open(&lb, &database).await,
        Session::open(&lb, &database).await,
    ];
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for attempt in 0..ATTEMPTS {
        let target = (attempt / 2) % 2;
        let other = 1 - target;
        // Both sessions run a query; only the target's may be cancelled.
        let sleepers = [sessions[0].sleep(attempt), sessions[1].sleep(attempt)];
        for session in &sessions {
            wait_until_sleeping(&watch, session.pid, attempt).await;
        }
        let [first, second] = sleepers;
        let (target_sleeper, other_sleeper) = if target == 0 {
            (first, second)
        } else {
            (second, first)
        };
        let sent = Instant::now();
        sessions[target]
            .token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .unwrap();
        let (client, result) = tokio::time::timeout(Duration::from_secs(5), target_sleeper)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "attempt {attempt}: the query was not cancelled; replica one {}, replica two {}",
                    cancel_counts(&one),
                    cancel_counts(&two)
                )
            })
            .unwrap();
        slowest = slowest.max(sent.elapsed());
        sessions[target].client = Some(client);
        let error = result.expect_err("the sleep must be cancelled");
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "attempt {attempt}: {error}"
        );
        // The other session's query still runs; stop it from the server side.
        let running = watch
            .query_opt(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query = $2",
                &[&sessions[other].pid, &sleep_sql(attempt)],
            )
            .await
            .unwrap();
        assert!(
            running.is_some(),
            "attempt {attempt}: the other session's query was stopped"
        );
        let (client, result) = tokio::time::timeout(Duration::from_secs(5), other_sleeper)
            .await
            .unwrap()
            .unwrap();
        sessions[other].client = Some(client);
        assert!(result.is_err());
    }
    // Counters move once the server has closed the cancel connection, which can be just
    // after the client saw its error.
    let delivered = || one.count(|m| &m.cancels_forwarded) + two.count(|m| &m.cancels_forwarded);
    settle(|| delivered() >= ATTEMPTS as u64).await;
    let crossed = one.count(|m| &m.peer_cancels_sent) + two.count(|m| &m.peer_cancels_sent);
    let received =
        one.count(|m| &m.peer_cancels_received) + two.count(|m| &m.peer_cancels_received);
    println!(
        "{ATTEMPTS} cancels through haproxy in {:?}: {crossed} crossed to the other replica, slowest {slowest:?}",
        started.elapsed()
    );
    assert_eq!(
        delivered(),
        ATTEMPTS as u64,
        "every cancel delivered upstream once"
    );
    assert_eq!(crossed, received, "every cancel sent on was received");
    assert!(
        crossed > 0 && crossed < ATTEMPTS as u64,
        "both paths taken: {crossed} of {ATTEMPTS} crossed"
    );
    for replica in [&one, &two] {
        assert_eq!(replica.count(|m| &m.peer_cancels_failed), 0);
        assert_eq!(replica.count(|m| &m.peer_cancels_refused), 0);
    }
    assert!(
        slowest < Duration::from_secs(2),
        "cancels must be prompt: {slowest:?}"
    );
}

/// The (PID, secret key) from the BackendKeyData of a raw startup.
fn backend_key(startup: &[harness::Received]) -> (u32, u32) {
    let (_, body) = startup
        .iter()
        .find(|(tag, _)| *tag == b'K')
        .expect("BackendKeyData");
    let pid = u32::from_be_bytes(body[..4].try_into().unwrap());
    let key = u32::from_be_bytes(body[4..8].try_into().unwrap());
    (pid, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cancels_through_the_fleet_cancel_nothing() {
    let database = harness::fresh_database("fleetforged", false).await;
    let (_secret_dir, secret_file) = cluster_secret();
    let (one, two) = start_fleet(&secret_file).await;
    let lb = Haproxy::start(&[one.addr, two.addr]).await;
    let watch = direct(&database).await;

    let mut session = harness::raw_tcp(lb.addr).await;
    let startup = session
        .startup_with(
            "app",
            &database,
            &harness::token("app", serde_json::json!({})),
        )
        .await;
    let (pid, key) = backend_key(&startup);
    let node = pgward::proxy::cancel::node_of(key);
    assert!(node == 1 || node == 2, "the key names its replica: {node}");
    session.send(&harness::msg::query(&sleep_sql(0))).await;
    wait_until_sleeping(&watch, i32::try_from(pid).unwrap(), 0).await;

    let dropped_before = one.count(|m| &m.cancels_dropped) + two.count(|m| &m.cancels_dropped);
    // A wrong secret naming the right node, and keys naming no configured node; each sent
    // twice so that one copy lands on each replica.
    let unknown_node =
        |n: u32| (n << (32 - pgward::proxy::cancel::NODE_BITS)) | (key & 0x03ff_ffff);
    for forged in [key ^ 1, unknown_node(9), unknown_node(0)] {
        for _ in 0..2 {
            send_cancel(lb.addr, pid, forged).await;
        }
    }
    // A peer request tagged with another secret, straight to the replica that holds the query.
    let holder = if node == 1 { &one } else { &two };
    let forged_peer = PeerCancelRequest {
        process_id: pid,
        secret_key: key,
        origin: u32::from(3 - node),
        unix_time: u64::try_from(harness::now_secs()).unwrap(),
        tag: [0x5a; 32],
    };
    send_raw(holder.addr, &forged_peer.encode()).await;
    let dropped = || one.count(|m| &m.cancels_dropped) + two.count(|m| &m.cancels_dropped);
    settle(|| dropped() - dropped_before >= 6 && holder.count(|m| &m.peer_cancels_refused) >= 1)
        .await;
    let still = watch
        .query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
            &[&i32::try_from(pid).unwrap()],
        )
        .await
        .unwrap();
    assert!(still.is_some(), "a forged cancel stopped the query");
    assert_eq!(dropped() - dropped_before, 6, "every forged cancel dropped");
    assert_eq!(holder.count(|m| &m.peer_cancels_refused), 1);
    assert_eq!(
        one.count(|m| &m.cancels_forwarded) + two.count(|m| &m.cancels_forwarded),
        0
    );

    // The genuine key, through the load balancer, still works.
    send_cancel(lb.addr, pid, key).await;
    let responses = tokio::time::timeout(Duration::from_secs(5), session.until_ready(1))
        .await
        .expect("the query was not cancelled");
    let error = responses
        .iter()
        .find(|(tag, _)| *tag == b'E')
        .expect("an ErrorResponse");
    assert!(
        error.1.windows(6).any(|w| w == b"C57014"),
        "{:?}",
        String::from_utf8_lossy(&error.1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_reload_on_sighup_a_bad_secret_rejects_the_reload_and_node_id_needs_a_restart() {
    let (secret_dir, secret_file) = cluster_secret();
    let (one, two) = start_fleet(&secret_file).await;
    // A secret file too short: the reload is rejected as a whole.
    let short = secret_dir.path().join("short.key");
    std::fs::write(&short, "too short").unwrap();
    let bad = replica_config(1, &[(2, two.addr)], &short, one.audit.path());
    let err = one.reloader.apply(&bad).await.unwrap_err();
    assert!(err.to_string().contains("cluster.secret"), "{err}");
    // A new node id is named as restart-only, and [cluster] stays as it runs.
    let renumbered = replica_config(5, &[(2, two.addr)], &secret_file, one.audit.path());
    let restart = one.reloader.apply(&renumbered).await.unwrap();
    assert_eq!(restart, vec!["[cluster] node_id"]);

    // `pgward check` loads the secret and reports each peer (unreachable ones as warnings).
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = unused.local_addr().unwrap();
    drop(unused);
    let dir = tempfile::tempdir().unwrap();
    let write = |secret: &Path| {
        let config = harness::proxy_config_text(&ProxyOptions {
            extra_toml: format!(
                "[cluster]\nnode_id = 3\nsecret = {{ file = {secret:?} }}\npeer_timeout = \"1s\"\n[[cluster.peers]]\nnode_id = 1\naddress = \"{}\"\n[[cluster.peers]]\nnode_id = 9\naddress = \"{gone}\"\n",
                one.addr
            ),
            ..ProxyOptions::default()
        });
        let path = dir.path().join("pgward.toml");
        std::fs::write(&path, config).unwrap();
        path
    };
    let report = pgward::cli::check::check(&write(&secret_file), None).await;
    let text = report.render();
    assert_eq!(report.failures(), 0, "{text}");
    for expected in [
        "ok    cluster: node 3, 2 peer(s), secret loaded",
        "ok    cluster peer 1: ",
        "warn  cluster peer 9: ",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let report = pgward::cli::check::check(&write(&short), None).await;
    assert!(
        report.render().contains("FAIL  cluster: ") && report.failures() == 1,
        "{}",
        report.render()
    );
}

/// Insert a customer named `name` through `client`; the data-key version its email was
/// written with (read from the server directly).
async fn write_customer(
    client: &tokio_postgres::Client,
    watch: &tokio_postgres::Client,
    name: String,
) -> u32 {
    let email = format!("{name}@fleet.example");
    client
        .execute(
            "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)",
            &[&name, &email, &"123-45-6789"],
        )
        .await
        .unwrap();
    let row = watch
        .query_one("SELECT email FROM customers WHERE name = $1", &[&name])
        .await
        .unwrap();
    pgward::crypto::peek_key_ref(&row.get::<_, Vec<u8>>(0))
        .unwrap()
        .dek_version
}

/// A policy-bound `billing` session (tenant 1) straight to one replica.
async fn billing_on(replica: &Replica, database: &str) -> tokio_postgres::Client {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(replica.addr.port())
        .user("billing")
        .password(harness::token(
            "billing",
            serde_json::json!({ "tenant_id": 1 }),
        ))
        .dbname(database);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Both replicas encrypt `customers.email`/`ssn` under one transit key of the harness's
/// OpenBao, with the data keys in the shared database: after a KEK rotation each replica
/// writes with the new data key within a poll interval (both the same one), and each reads
/// and searches what the other wrote, before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_every_replica_writes_with_the_new_key_and_reads_the_others() {
    const POLL: Duration = Duration::from_secs(1);
    let bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("fleetkeys", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("fleet_pii");
    let policies = std::fs::canonicalize("policies").unwrap();
    let mut extra = format!(
        "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"billing\"\n\
         [services.billing]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n\
         [vault]\naddress = {:?}\ntoken_file = {token_file:?}\n\
         [keys]\nprovider = \"transit\"\npoll_interval = \"{}s\"\n",
        bao.addr,
        POLL.as_secs()
    );
    for (column, searchable) in [("email", true), ("ssn", false)] {
        extra.push_str(&format!(
            "[[encrypt]]\ntable = \"customers\"\ncolumn = \"{column}\"\nkey = \"{key}\"\ntype = \"text\"\nsearchable = {searchable}\n"
        ));
    }
    let (_secret_dir, secret_file) = cluster_secret();
    let one = start_replica_with(1, &[], &secret_file, &extra).await;
    let two = start_replica_with(2, &[(1, one.addr)], &secret_file, &extra).await;
    let clients = [
        ("one", billing_on(&one, &database).await),
        ("two", billing_on(&two, &database).await),
    ];
    let watch = direct(&database).await;
    let mut before = Vec::new();
    for (replica, client) in &clients {
        before.push(write_customer(client, &watch, format!("{replica}-before")).await);
    }
    assert_eq!(before[0], before[1], "the replicas share one data key");

    bao.rotate(&key).await;
    let rotated = Instant::now();
    let mut moved: [Option<(Duration, u32)>; 2] = [None, None];
    for attempt in 0.. {
        for (i, (replica, client)) in clients.iter().enumerate() {
            if moved[i].is_none() {
                let version =
                    write_customer(client, &watch, format!("{replica}-after-{attempt}")).await;
                if version > before[i] {
                    moved[i] = Some((rotated.elapsed(), version));
                }
            }
        }
        if moved.iter().all(Option::is_some) || rotated.elapsed() > 5 * POLL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "after the rotation: replica one {:?}, replica two {:?}",
        moved[0], moved[1]
    );
    let [Some((took_one, new_one)), Some((took_two, new_two))] = moved else {
        panic!("a replica kept writing with the old data key: {moved:?}");
    };
    assert_eq!(new_one, new_two, "one new data key for the fleet");
    // One poll interval, plus the poll's own work and this loop's step on a shared machine.
    let bound = POLL + Duration::from_secs(2);
    assert!(
        took_one < bound && took_two < bound,
        "picked up in {took_one:?} / {took_two:?}"
    );

    // Every replica reads, and finds by the encrypted column, what any replica wrote.
    let mut written = vec!["one-before".to_string(), "two-before".to_string()];
    for (replica, client) in &clients {
        let rows = client
            .query(
                "SELECT name FROM customers WHERE name LIKE $1 || '-after-%' ORDER BY name DESC LIMIT 1",
                &[replica],
            )
            .await
            .unwrap();
        written.push(rows[0].get(0));
    }
    for (replica, client) in &clients {
        for name in &written {
            let email = format!("{name}@fleet.example");
            let row = client
                .query_one(
                    "SELECT name, email, ssn FROM customers WHERE email = $1",
                    &[&email],
                )
                .await
                .unwrap_or_else(|e| panic!("replica {replica} reading {name}: {e}"));
            let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
            assert_eq!(
                got,
                (name.clone(), email.clone(), "123-45-6789".to_string()),
                "replica {replica}"
            );
        }
    }
}
