//! `pgward keys retire` end to end, after the README's rotation runbook: a real OpenBao, the
//! demo schema, a proxy writing through it, and the real `pgward` binary for the key steps.
use std::time::Duration;

use tokio_postgres::Client;

use crate::harness::{self, ProxyOptions, TestProxy};

async fn session(proxy: &TestProxy, database: &str) -> Client {
    let mut cfg = proxy.client_config("billing", database);
    cfg.password(harness::token(
        "billing",
        serde_json::json!({ "tenant_id": 1 }),
    ));
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// Both encrypted columns of `customers` under one key (not per tenant). A pgward may write
/// under an older data key for keys.poll_interval + keys.dek_cache_max_stale (2 s here).
fn config(
    bao: &crate::vault::Bao,
    database: &str,
    token_file: &std::path::Path,
    key: &str,
) -> String {
    let policies = std::fs::canonicalize("policies").unwrap();
    let mut toml = format!(
        "[policy]\ndir = {policies:?}\ndatabase = \"{database}\"\ncatalog_service = \"billing\"\n\
         [services.billing]\nupstream_user = \"postgres\"\nupstream_password = {{ env = \"PGWARD_TEST_SUPERUSER_PASSWORD\" }}\n\
         [vault]\naddress = {:?}\ntoken_file = {token_file:?}\n\
         [keys]\nprovider = \"transit\"\npoll_interval = \"1s\"\ndek_cache_ttl = \"1s\"\ndek_cache_max_stale = \"1s\"\n",
        bao.addr
    );
    for (column, searchable) in [("email", true), ("ssn", false)] {
        toml.push_str(&format!(
            "[[encrypt]]\ntable = \"customers\"\ncolumn = \"{column}\"\nkey = \"{key}\"\ntype = \"text\"\nsearchable = {searchable}\n"
        ));
    }
    toml
}

/// `pgward keys <args> --config <config>`: (exit code, stdout, stderr).
async fn keys(config: &std::path::Path, database: &str, args: &[&str]) -> (i32, String, String) {
    harness::keys_cli(config, database, args).await
}

/// (DEK version, KEK version, first KEK version) of every stored key of `key`, index root first.
async fn stored(db: &Client, key: &str) -> Vec<(i32, i32, Option<i32>)> {
    db.query(
        "SELECT dek_version, kek_version, first_kek_version FROM pgward.data_keys WHERE key_name = $1 ORDER BY dek_version",
        &[&key],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// DEK version in the header of every stored email and ssn.
async fn dek_versions(db: &Client) -> Vec<u32> {
    let mut out = Vec::new();
    for row in db
        .query(
            "SELECT email, ssn FROM customers WHERE email IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
    {
        for i in 0..2 {
            let ct: Vec<u8> = row.get(i);
            out.push(pgward::crypto::peek_key_ref(&ct).unwrap().dek_version);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_retire_after_rotation_reencrypt_and_rewrap() {
    let bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("keysretire", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("retire_pii");
    let options = ProxyOptions {
        extra_toml: config(&bao, &database, &token_file, &key),
        ..ProxyOptions::default()
    };
    let config_file = dir.path().join("pgward.toml");
    std::fs::write(&config_file, harness::proxy_config_text(&options)).unwrap();
    let proxy = harness::start_proxy(options.clone()).await;
    let app = session(&proxy, &database).await;
    let db = harness::direct(&database).await;
    let insert = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
    for i in 1..=4 {
        app.execute(
            insert,
            &[
                &format!("r{i}"),
                &format!("r{i}@retire.example"),
                &format!("{i}{i}{i}-00-0000"),
            ],
        )
        .await
        .unwrap();
    }
    assert!(dek_versions(&db).await.iter().all(|&v| v == 1));
    // A backup taken now: row r1 as stored, under DEK 1 (wrapped by KEK v1).
    let backup = db
        .query_one(
            "SELECT email, email_bidx, ssn FROM customers WHERE name = 'r1'",
            &[],
        )
        .await
        .unwrap();
    let (old_email, old_bidx, old_ssn): (Vec<u8>, Vec<u8>, Vec<u8>) =
        (backup.get(0), backup.get(1), backup.get(2));

    // Runbook: rotate the KEK; the proxy picks it up at its next poll and writes under DEK 2.
    bao.rotate(&key).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stored(&db, &key).await.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no DEK 2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.execute(insert, &[&"r5", &"r5@retire.example", &"555-00-0000"])
        .await
        .unwrap();

    // A data key with values left is kept.
    let (code, out, err) = keys(&config_file, &database, &["retire", "--confirm"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{key}: kept DEK 1: 8 values left")),
        "{out}"
    );
    assert!(out.contains(&format!("{key}: kept DEK 2: newest")), "{out}");
    assert!(out.contains(&format!("{key}: nothing to retire")), "{out}");
    assert_eq!(stored(&db, &key).await.len(), 3, "index root, DEK 1, DEK 2");

    // Reencrypt, rewrap.
    let (code, _, err) = keys(&config_file, &database, &["reencrypt", "--pause-ms", "1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(dek_versions(&db).await.iter().all(|&v| v == 2));
    let (code, _, err) = keys(&config_file, &database, &["rewrap"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        stored(&db, &key).await,
        [(0, 2, Some(1)), (1, 2, Some(1)), (2, 2, Some(2))],
        "rewrap keeps the first KEK version"
    );

    // Nothing goes while the newest data key is younger than the stale-write window (a
    // pgward that has not picked it up could still write under DEK 1).
    let age = |a: &'static str| {
        let db = &db;
        let key = key.clone();
        async move {
            db.execute(
                &format!("UPDATE pgward.data_keys SET created_at = now() - interval '{a}' WHERE key_name = $1 AND dek_version = 2"),
                &[&key],
            )
            .await
            .unwrap();
        }
    };
    age("0 s").await;
    let (code, _, err) = keys(&config_file, &database, &["retire", "--confirm"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the newest data key (DEK 2) was created 0s ago") && err.contains("= 2s"),
        "{err}"
    );
    assert_eq!(stored(&db, &key).await.len(), 3);
    age("1 hour").await;

    // Fail closed: a column of the key that cannot be counted holds the whole key.
    let uncounted = dir.path().join("uncounted.toml");
    std::fs::write(
        &uncounted,
        format!(
            "{}[[encrypt]]\ntable = \"customers\"\ncolumn = \"name\"\nkey = \"{key}\"\ntype = \"text\"\n",
            std::fs::read_to_string(&config_file).unwrap()
        ),
    )
    .unwrap();
    let (code, _, err) = keys(&uncounted, &database, &["retire", "--confirm"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("column public.customers.name could not be counted (stored as text"),
        "{err}"
    );
    assert_eq!(stored(&db, &key).await.len(), 3);

    // Dry run: says what would go, changes nothing, exits 1.
    let (code, out, err) = keys(&config_file, &database, &["retire"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("{key}: would retire DEK 1 (wrapped by KEK v2)")),
        "{out}"
    );
    assert!(err.contains("dry run, nothing changed"), "{err}");
    assert_eq!(stored(&db, &key).await.len(), 3);
    let retired: i64 = db
        .query_one("SELECT count(*) FROM pgward.retired_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(retired, 0);

    // --confirm: exactly DEK 1 goes; the newest and the blind-index root stay.
    let (code, out, err) = keys(
        &config_file,
        &database,
        &["retire", "--key", &key, "--confirm"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("{key}: retired DEK 1 (wrapped by KEK v2)")),
        "{out}"
    );
    assert_eq!(stored(&db, &key).await, [(0, 2, Some(1)), (2, 2, Some(2))]);
    let row = db
        .query_one(
            "SELECT key_name, dek_version, kek_version, first_kek_version FROM pgward.retired_keys",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2),
            row.get::<_, Option<i32>>(3)
        ),
        (key.clone(), 1, 2, Some(1))
    );
    // Rerun: nothing left to retire.
    let (code, out, _) = keys(&config_file, &database, &["retire", "--confirm"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("{key}: nothing to retire")), "{out}");

    // keys status: which KEK version backups taken before the retirement still need.
    let (code, out, err) = keys(&config_file, &database, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("What old backups still need:"), "{out}");
    assert!(
        out.contains(&format!(
            "{key} DEK 1: retired 20"
        )) && out.contains(&format!(
            "backups taken before then hold values under it, wrapped by KEK v1 of transit key {key} (v2 if taken after"
        )),
        "{out}"
    );
    assert!(
        out.contains("keep KEK v1 (do not raise min_decryption_version above 1, do not trim it)"),
        "{out}"
    );

    // A row restored from the backup: a proxy that never cached DEK 1 refuses it cleanly,
    // naming the column and not the value; the other rows read on.
    db.execute(
        "UPDATE customers SET email = $1, email_bidx = $2, ssn = $3 WHERE name = 'r1'",
        &[&old_email, &old_bidx, &old_ssn],
    )
    .await
    .unwrap();
    let fresh_proxy = harness::start_proxy(options).await;
    let fresh = session(&fresh_proxy, &database).await;
    let e = fresh
        .query("SELECT email FROM customers WHERE name = 'r1'", &[])
        .await
        .unwrap_err();
    let db_error = e.as_db_error().expect("a database error");
    assert_eq!(db_error.code().code(), "55000", "{e}");
    assert!(
        db_error.message().contains("customers.email") && db_error.message().contains("retired"),
        "{}",
        db_error.message()
    );
    assert!(!db_error.message().contains("retire.example"));
    let rows = fresh
        .query(
            "SELECT email, ssn FROM customers WHERE name <> 'r1' AND email IS NOT NULL ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    let emails: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        emails,
        [
            "r2@retire.example",
            "r3@retire.example",
            "r4@retire.example",
            "r5@retire.example"
        ]
    );

    // reencrypt cannot read the restored row: it names it and leaves it.
    let (code, _, err) = keys(&config_file, &database, &["reencrypt", "--pause-ms", "1"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("could not be read"), "{err}");
    assert!(!err.contains("retire.example"), "{err}");
}
