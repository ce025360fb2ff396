//! Rotating a key's blind-index root end to end: a real OpenBao and PostgreSQL, a proxy
//! writing and searching, and the `keys rotate-index` / `keys reencrypt` / `keys status` CLI.
use std::time::Duration;

use crate::harness::{self, ProxyOptions};
use crate::vault::Bao;

/// The stored index of row `id`.
async fn index_of(db: &tokio_postgres::Client, id: i32) -> Vec<u8> {
    db.query_one("SELECT email_bidx FROM people WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Run the CLI off the runtime's threads (the proxy keeps serving); (code, stdout, stderr).
async fn cli(config: &std::path::Path, url: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("PGWARD_DATABASE_URL", url)
        .env_remove("VAULT_TOKEN");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ pgward {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The ids a search through the proxy finds, by literal and by parameter (both must agree).
async fn found(app: &tokio_postgres::Client, email: &str) -> Vec<i32> {
    let by_param: Vec<i32> = app
        .query(
            "SELECT id FROM people WHERE email = $1 ORDER BY id",
            &[&email],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = app
        .simple_query(&format!(
            "SELECT id FROM people WHERE email = '{email}' ORDER BY id"
        ))
        .await
        .unwrap();
    let by_literal: Vec<i32> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(by_param, by_literal, "search for {email}");
    by_param
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_root_rotation_keeps_every_row_findable_and_reencrypt_completes_it() {
    let bao = Bao::start().await;
    // Transit keeps wrapped keys in the policy database: the demo one, with a table of our own.
    let database = harness::fresh_database("bidxrot", true).await;
    let db = harness::direct(&database).await;
    db.batch_execute("CREATE TABLE people (id int PRIMARY KEY, email bytea, email_bidx bytea)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("bidx_pii");
    let keys_toml = format!(
        "[vault]\naddress = {:?}\ntoken_file = {token_file:?}\n\
         [keys]\nprovider = \"transit\"\npoll_interval = \"1s\"\n\
         [[encrypt]]\ntable = \"people\"\ncolumn = \"email\"\nkey = \"{key}\"\ntype = \"text\"\nsearchable = true\n",
        bao.addr
    );
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n{keys_toml}"
        ),
        ..ProxyOptions::default()
    })
    .await;
    let app = proxy.connect("app", &database).await;
    let config = dir.path().join("pgward.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nallow_plaintext_loopback = true\n[upstream]\nport = {}\n{keys_toml}",
            harness::postgres().port
        ),
    )
    .unwrap();
    let pg = harness::postgres();
    let url = format!(
        "postgresql://postgres:{}@127.0.0.1:{}/{database}",
        pg.password, pg.port
    );

    let insert = "INSERT INTO people (id, email) VALUES ($1, $2)";
    app.execute(insert, &[&1, &"same@example.com"])
        .await
        .unwrap();
    app.execute(insert, &[&2, &"old@example.com"])
        .await
        .unwrap();
    app.simple_query("INSERT INTO people (id, email) VALUES (3, 'same@example.com')")
        .await
        .unwrap();
    let before = index_of(&db, 1).await;
    assert_eq!(before, index_of(&db, 3).await);

    // Without --confirm nothing starts.
    let (code, _, err) = cli(&config, &url, &["keys", "rotate-index", "--key", &key]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--confirm"), "{err}");
    let (code, out, err) = cli(
        &config,
        &url,
        &["keys", "rotate-index", "--key", &key, "--confirm"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rotation to v2 started"), "{out}");
    let (_, status, _) = cli(&config, &url, &["keys", "status"]).await;
    assert!(
        status.contains("blind-index root v1, rotating to v2"),
        "{status}"
    );

    // Within a poll or two the proxy indexes new rows with the new root.
    let mut id = 10;
    loop {
        app.execute(insert, &[&id, &"same@example.com"])
            .await
            .unwrap();
        if index_of(&db, id).await != before {
            break;
        }
        assert!(id < 60, "the proxy never picked up the new index root");
        id += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new_row = id;
    app.simple_query(&format!(
        "INSERT INTO people (id, email) VALUES ({}, 'lit@example.com')",
        new_row + 1
    ))
    .await
    .unwrap();
    // During the rotation: old and new rows are found, by literal and by parameter.
    let same = found(&app, "same@example.com").await;
    assert!(
        same.contains(&1) && same.contains(&3) && same.contains(&new_row),
        "{same:?}"
    );
    assert_eq!(same.len() as i32, new_row - 10 + 3, "{same:?}");
    assert_eq!(found(&app, "old@example.com").await, vec![2]);
    assert_eq!(found(&app, "lit@example.com").await, vec![new_row + 1]);
    let not_same: i64 = app
        .query_one(
            "SELECT count(*) FROM people WHERE email <> $1",
            &[&"same@example.com"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_same, 2);

    // reencrypt recomputes the old rows' indexes and completes the rotation.
    let (code, out, err) = cli(&config, &url, &["keys", "reencrypt"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("index root rotation complete: v2"), "{out}");
    let distinct: i64 = db
        .query_one(
            "SELECT count(DISTINCT email_bidx) FROM people WHERE id = 1 OR id >= 10 AND id <= $1",
            &[&new_row],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 1, "every 'same' row has the new root's index");
    assert_eq!(index_of(&db, 1).await, index_of(&db, new_row).await);
    assert_ne!(index_of(&db, 1).await, before);
    let (_, status, _) = cli(&config, &url, &["keys", "status"]).await;
    assert!(status.contains("blind-index root v2"), "{status}");
    assert!(!status.contains("rotating"), "{status}");
    let roots: i64 = db
        .query_one(
            "SELECT count(*) FROM pgward.index_roots WHERE completed_at IS NOT NULL AND wrapped IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roots, 1);

    // Once the proxy has seen the completion (and before), every row is still found.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let same_after = found(&app, "same@example.com").await;
    assert_eq!(same_after, same);
    assert_eq!(found(&app, "old@example.com").await, vec![2]);
    assert_eq!(found(&app, "lit@example.com").await, vec![new_row + 1]);
    app.execute(insert, &[&100, &"same@example.com"])
        .await
        .unwrap();
    assert_eq!(index_of(&db, 100).await, index_of(&db, 1).await);
    proxy.shutdown().await;
}
