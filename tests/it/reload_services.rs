//! SIGHUP on a running `pgward serve` reloads what can change without rebinding: services
//! added and removed, upstream passwords, policies (for the next statement of an open
//! session), live audit settings; settings that need a restart are ignored, and a broken file
//! changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{self, ProxyOptions};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sighup(child: &Child) {
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(i32::try_from(child.0.id()).unwrap(), libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// A session as `service` on `database`, or the server's (or pgward's) refusal.
async fn session(
    port: u16,
    service: &str,
    database: &str,
    claims: serde_json::Value,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(service)
        .password(harness::token(service, claims))
        .dbname(database);
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
        e.as_db_error()
            .map_or(e.to_string(), |d| d.message().to_string())
    })?;
    tokio::spawn(conn);
    Ok(client)
}

/// `pgward serve --config config`, once `service` can query `database` through it.
async fn serve_until_it_answers(config: &Path, port: u16, service: &str, database: &str) -> Child {
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_pgward"))
            .args(["serve", "--config"])
            .arg(config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if can_query(port, service, database).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pgward serve did not come up");
}

async fn can_query(port: u16, service: &str, database: &str) -> Result<(), String> {
    let client = session(port, service, database, json!({})).await?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn audit_text(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        if entry.path().extension().is_some_and(|x| x == "jsonl") {
            text.push_str(&std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_services_passwords_policies_and_audit_settings() {
    let work = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("reloadsvc", true).await;
    // A role whose password the test rotates.
    let role = format!("rot_{}", std::process::id());
    let (admin, conn) = harness::postgres()
        .direct("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'first-password'"
        ))
        .await
        .unwrap();
    let password_file = work.path().join("rot.password");
    std::fs::write(&password_file, "first-password").unwrap();
    let policies = work.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let support = std::fs::read_to_string("policies/support.toml").unwrap();
    std::fs::write(policies.join("support.toml"), &support).unwrap();
    let log = work.path().join("audit");

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = harness::proxy_config_text(&ProxyOptions::default()).replacen(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{port}\""),
        1,
    );
    let text = |services: &str, audit: &str| {
        format!(
            "{base}\n{}\n[services.rotsvc]\nupstream_user = \"{role}\"\n\
             upstream_password = {{ file = {password_file:?} }}\nunrestricted = true\n\
             {services}\n[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\n\
             catalog_service = \"app\"\nwatch_interval = \"0s\"\ncatalog_refresh_interval = \"0s\"\n\n\
             [audit]\ndir = {:?}\ncheckpoint_interval = \"1s\"\n{audit}\n",
            harness::superuser_service("support"),
            if audit.contains("dir =") { work.path().join("elsewhere") } else { log.clone() },
        )
    };
    let config = work.path().join("pgward.toml");
    std::fs::write(&config, text("", "")).unwrap();
    let child = serve_until_it_answers(&config, port, "app", &database).await;
    assert!(can_query(port, "rotsvc", &database).await.is_ok());
    let err = can_query(port, "newsvc", &database).await.unwrap_err();
    assert!(err.contains("not configured"), "{err}");

    // A service added, one removed: new logins see both changes.
    let add = "[services.newsvc]\nupstream_user = \"postgres\"\n\
               upstream_password = { env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }\nunrestricted = true\n";
    let without_other = |t: String| {
        t.replace(
            "[services.other]\nupstream_user = \"postgres\"\n\
             upstream_password = { env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }\nunrestricted = true\n",
            "",
        )
    };
    assert!(can_query(port, "other", &database).await.is_ok());
    let open_other = session(port, "other", &database, json!({})).await.unwrap();
    std::fs::write(&config, without_other(text(add, ""))).unwrap();
    sighup(&child).await;
    can_query(port, "newsvc", &database)
        .await
        .expect("the added service logs in (unrestricted, also under [policy])");
    let err = can_query(port, "other", &database).await.unwrap_err();
    assert!(err.contains("not configured"), "{err}");
    open_other
        .simple_query("SELECT 1")
        .await
        .expect("a session already open keeps running");

    // The upstream password rotated: new sessions use the new one after SIGHUP.
    admin
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD 'second-password'"))
        .await
        .unwrap();
    std::fs::write(&password_file, "second-password").unwrap();
    assert!(
        can_query(port, "rotsvc", &database).await.is_err(),
        "old password still in use"
    );
    sighup(&child).await;
    can_query(port, "rotsvc", &database)
        .await
        .expect("the new upstream password is used");

    // A changed policy applies to the next statement of an open session.
    let support_session = session(port, "support", &database, json!({"tenant_id": 1}))
        .await
        .unwrap();
    let refused = support_session
        .simple_query("SELECT ssn FROM customers")
        .await
        .unwrap_err();
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"));
    std::fs::write(
        policies.join("support.toml"),
        support.replacen("except_columns = [\"ssn\"]\n", "", 1),
    )
    .unwrap();
    sighup(&child).await;
    support_session
        .simple_query("SELECT ssn FROM customers")
        .await
        .expect("the new policy allows ssn");

    // Audit: record_values changes live (and leaves a record); dir needs a restart.
    support_session
        .simple_query("SELECT name FROM customers WHERE name = 'before-reload'")
        .await
        .unwrap();
    std::fs::write(&config, without_other(text(add, "record_values = true"))).unwrap();
    sighup(&child).await;
    support_session
        .simple_query("SELECT name FROM customers WHERE name = 'after-reload'")
        .await
        .unwrap();
    // Another directory: needs a restart, so it is ignored (logged) and records stay here.
    std::fs::write(
        &config,
        without_other(text(add, "record_values = true\n#dir =\n")),
    )
    .unwrap();
    sighup(&child).await;
    support_session
        .simple_query("SELECT name FROM customers WHERE name = 'after-dir-change'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!work.path().join("elsewhere").exists());
    let audit = audit_text(&log);
    assert!(audit.contains("after-dir-change"));
    assert!(
        audit.contains("\"kind\":\"audit_settings_changed\""),
        "{audit}"
    );
    assert!(!audit.contains("before-reload"));
    assert!(
        audit.contains("after-reload"),
        "record_values applies to new statements"
    );

    // A broken file: nothing of it applies (not the service it adds), the old one keeps running.
    let broken = format!(
        "{}\n[services.brokensvc]\nupstream_user = \"postgres\"\nunrestricted = true\nbogus = 1\n",
        without_other(text(add, "record_values = true"))
    );
    std::fs::write(&config, broken).unwrap();
    sighup(&child).await;
    assert!(can_query(port, "brokensvc", &database).await.is_err());
    can_query(port, "newsvc", &database)
        .await
        .expect("the running configuration stays");
    // A file that parses but names a password file that cannot be read: rejected as a whole.
    let missing = without_other(text(
        &format!("{add}\n[services.late]\nupstream_user = \"postgres\"\nupstream_password = {{ file = \"/nonexistent/pw\" }}\nunrestricted = true\n"),
        "record_values = true",
    ));
    std::fs::write(&config, missing).unwrap();
    sighup(&child).await;
    let err = can_query(port, "late", &database).await.unwrap_err();
    assert!(err.contains("not configured"), "{err}");
    drop(open_other);
    drop(support_session);

    // A graceful stop: `audit_stopped` names the settings in force, the reloaded ones.
    let mut child = child;
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(i32::try_from(child.0.id()).unwrap(), libc::SIGTERM) };
    for _ in 0..100 {
        if child.0.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped: Vec<serde_json::Value> = audit_text(&log)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "audit_stopped")
        .collect();
    let last = stopped.last().expect("an audit_stopped record");
    assert_eq!(last["settings"]["record_values"], true, "{last}");
    assert!(last["settings"]["durability"].is_string(), "{last}");
}

/// Client backends of `database`, seen from another database.
async fn backends(database: &str) -> i64 {
    crate::policy_proxy::direct("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_resizes_pools_in_place_and_a_new_pool_mode_applies_to_new_sessions() {
    let work = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("reloadpool", false).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = harness::proxy_config_text(&ProxyOptions::default()).replacen(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{port}\""),
        1,
    );
    let text = |mode: &str, size: usize| {
        format!(
            "{base}\n{}pool_mode = \"{mode}\"\npool_size = {size}\npool_timeout = \"30s\"\n",
            harness::superuser_service("pooled").replace(
                "upstream_password",
                "unrestricted = true\nupstream_password"
            )
        )
    };
    let config = work.path().join("pgward.toml");
    std::fs::write(&config, text("transaction", 2)).unwrap();
    let child = serve_until_it_answers(&config, port, "pooled", &database).await;
    let connect = || session(port, "pooled", &database, json!({}));
    let holders = [connect().await.unwrap(), connect().await.unwrap()];
    for client in &holders {
        client.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    // Both server connections are in transactions: two more clients wait (a new session
    // borrows one to log in).
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let database = database.clone();
        waiting.push(tokio::spawn(async move {
            let client = session(port, "pooled", &database, json!({})).await.unwrap();
            client.simple_query("SELECT 1").await.unwrap();
            client
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(waiting.iter().all(|w| !w.is_finished()));
    assert_eq!(backends(&database).await, 2);

    // pool_size 2 → 4: the waiting clients get new connections at once, while the two
    // transactions are still open.
    std::fs::write(&config, text("transaction", 4)).unwrap();
    sighup(&child).await;
    let mut idle_clients = Vec::new();
    for task in waiting {
        idle_clients.push(
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("a waiting client got one of the new connections")
                .unwrap(),
        );
    }
    assert_eq!(backends(&database).await, 4);

    // 4 → 1: the two idle connections close now; the two in transactions finish undisturbed
    // and close when they come back, down to one.
    std::fs::write(&config, text("transaction", 1)).unwrap();
    sighup(&child).await;
    assert_eq!(backends(&database).await, 2);
    for client in &holders {
        let rows = client.simple_query("SELECT 2").await.unwrap();
        assert!(!rows.is_empty());
        client.batch_execute("COMMIT").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backends(&database).await, 1);
    for client in &idle_clients {
        client.simple_query("SELECT 3").await.unwrap();
    }
    assert_eq!(backends(&database).await, 1);

    // pool_mode: sessions opened after the reload run in session mode (SET is theirs),
    // sessions already open keep transaction mode (SET is refused there).
    let set = "SET work_mem = '8MB'";
    std::fs::write(&config, text("session", 1)).unwrap();
    sighup(&child).await;
    let refused = holders[0].batch_execute(set).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
    );
    let fresh = connect().await.unwrap();
    fresh.batch_execute(set).await.unwrap();
    drop((holders, idle_clients, fresh));
}
