//! Per-tenant data keys against a real OpenBao (transit provider, wrapped keys in the policy
//! database), through the demo schema and policies: each tenant's values are under its own
//! key, a ciphertext copied into another tenant's row fails integrity, and the blind index
//! does not link equal values across tenants.
use std::time::Duration;

use tokio_postgres::Client;

use crate::harness::{self, ProxyOptions, TestProxy};

async fn direct(database: &str) -> Client {
    let (c, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// A session of `service` whose token carries `claims`.
async fn session(
    proxy: &TestProxy,
    database: &str,
    service: &str,
    claims: serde_json::Value,
) -> Client {
    let mut cfg = proxy.client_config(service, database);
    cfg.password(harness::token(service, claims));
    let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

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
         [keys]\nprovider = \"transit\"\npoll_interval = \"1s\"\n",
        bao.addr
    );
    for (column, searchable, bound) in [("email", true, false), ("ssn", false, true)] {
        toml.push_str(&format!(
            "[[encrypt]]\ntable = \"customers\"\ncolumn = \"{column}\"\nkey = \"{key}\"\ntype = \"text\"\n\
             searchable = {searchable}\ncontext_claim = \"tenant_id\"\nbind_primary_key = {bound}\n"
        ));
    }
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_copied_to_another_tenants_row_fails_and_searches_stay_per_tenant() {
    let bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("tenantkeys", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("tenant_pii");
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: config(&bao, &database, &token_file, &key),
        ..ProxyOptions::default()
    })
    .await;
    let one = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 1 }),
    )
    .await;
    let two = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 2 }),
    )
    .await;

    // Writes: a parameter (extended protocol) for tenant 1, literals for tenant 2.
    one.execute(
        "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)",
        &[&"t1", &"one@tenant1.example", &"111-11-1111"],
    )
    .await
    .unwrap();
    two.batch_execute(
        "INSERT INTO customers (name, email, ssn) VALUES ('t2', 'two@tenant2.example', '222-22-2222')",
    )
    .await
    .unwrap();
    // Each tenant reads and searches its own values, by parameter and by literal.
    let r = one
        .query_one(
            "SELECT email, ssn FROM customers WHERE email = $1",
            &[&"one@tenant1.example"],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        ("one@tenant1.example".into(), "111-11-1111".into())
    );
    let r = two
        .simple_query("SELECT ssn FROM customers WHERE email = 'two@tenant2.example'")
        .await
        .unwrap();
    let ssn: Vec<String> = r
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(String::from),
            _ => None,
        })
        .collect();
    assert_eq!(ssn, ["222-22-2222"]);

    // Stored: two different per-tenant keys (header key ids), named without the tenant id.
    let db = direct(&database).await;
    let id_of = |name: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one("SELECT email FROM customers WHERE name = $1", &[&name])
                .await
                .unwrap();
            pgward::crypto::peek_key_ref(&row.get::<_, Vec<u8>>(0))
                .unwrap()
                .key_id
        }
    };
    assert_ne!(id_of("t1").await, id_of("t2").await);
    let names: Vec<String> = db
        .query(
            "SELECT DISTINCT key_name FROM pgward.data_keys WHERE key_name LIKE $1",
            &[&format!("{key}%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names.len(), 2, "one key per tenant: {names:?}");
    assert!(
        names.iter().all(|n| n.starts_with(&format!("{key}-t"))),
        "{names:?}"
    );

    // The attack: tenant 2's ciphertexts (and blind index) copied into a tenant-1 row.
    db.batch_execute(
        "UPDATE customers SET email = s.email, email_bidx = s.email_bidx, ssn = s.ssn \
         FROM (SELECT email, email_bidx, ssn FROM customers WHERE name = 't2') s WHERE customers.name = 't1'",
    )
    .await
    .unwrap();
    for column in ["ssn", "email"] {
        let e = one
            .query(
                &format!("SELECT {column} FROM customers WHERE name = 't1'"),
                &[],
            )
            .await
            .unwrap_err();
        let db_error = e.as_db_error().expect("a server error");
        assert_eq!(db_error.code().code(), "XX001", "{}", db_error.message());
        assert!(
            db_error.message().contains(&format!("customers.{column}")),
            "{}",
            db_error.message()
        );
        assert!(!db_error.message().contains("222-22") && !db_error.message().contains("tenant2"));
    }
    // Tenant 1 searching for tenant 2's email finds nothing, not even the copied row.
    for found in [
        one.query(
            "SELECT name FROM customers WHERE email = $1",
            &[&"two@tenant2.example"],
        )
        .await
        .unwrap()
        .len(),
        one.simple_query("SELECT name FROM customers WHERE email = 'two@tenant2.example'")
            .await
            .unwrap()
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count(),
    ] {
        assert_eq!(found, 0, "tenant 1 found tenant 2's email");
    }
    // Tenant 2 still reads its own row.
    let r = two
        .query_one("SELECT ssn FROM customers WHERE name = 't2'", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "222-22-2222");

    // A session without the claim has no key for these columns: refused, nothing leaks.
    let app = session(&proxy, &database, "app", serde_json::json!({})).await;
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        app.query("SELECT ssn FROM customers WHERE name = 't2'", &[]),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42501", "{e}");
    let e = app
        .batch_execute(
            "INSERT INTO customers (tenant_id, name, ssn) VALUES (1, 'x', '333-33-3333')",
        )
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("333-33"), "{e}");

    // COPY FROM STDIN under the session's tenant key (an unrestricted service with the claim).
    let app2 = session(
        &proxy,
        &database,
        "app",
        serde_json::json!({ "tenant_id": 2 }),
    )
    .await;
    {
        use futures_util::SinkExt;
        let sink = app2
            .copy_in("COPY customers (tenant_id, name, email, ssn) FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(
            b"2\tcopied\tcopy@tenant2.example\t444-44-4444\n",
        ))
        .await
        .unwrap();
        sink.finish().await.unwrap();
    }
    let r = two
        .query_one(
            "SELECT ssn FROM customers WHERE email = $1",
            &[&"copy@tenant2.example"],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "444-44-4444");
    assert!(one
        .query(
            "SELECT 1 FROM customers WHERE email = $1",
            &[&"copy@tenant2.example"]
        )
        .await
        .unwrap()
        .is_empty());
}

/// The rows of a simple query's first column.
async fn simple_rows(
    client: &Client,
    sql: &str,
) -> Result<Vec<Option<String>>, tokio_postgres::Error> {
    Ok(client
        .simple_query(sql)
        .await?
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(String::from)),
            _ => None,
        })
        .collect())
}

/// An integrity failure naming `customers.ssn` and none of the values.
fn assert_integrity_failure(e: &tokio_postgres::Error, values: &[&str]) {
    let db_error = e.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "XX001", "{}", db_error.message());
    assert!(
        db_error.message().contains("customers.ssn"),
        "{}",
        db_error.message()
    );
    for v in values {
        assert!(!db_error.message().contains(v), "{}", db_error.message());
    }
}

/// `bind_primary_key` on `customers.ssn`: a ciphertext copied between two rows of the same
/// tenant (same key) fails integrity, read plainly, through a derived table or a CTE, in both
/// protocols; rows written without their key stay unbound (the documented gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_copied_between_rows_of_one_tenant_fails_when_bound_to_the_primary_key() {
    let bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("pkbind", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("pk_pii");
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: config(&bao, &database, &token_file, &key),
        ..ProxyOptions::default()
    })
    .await;
    let one = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 1 }),
    )
    .await;

    // Row A by literals (simple protocol, key written `0901`), row B by parameters (extended),
    // row C without its key (bigserial default).
    one.batch_execute("INSERT INTO customers (id, name, ssn) VALUES (0901, 'A', '111-11-1111')")
        .await
        .unwrap();
    one.execute(
        "INSERT INTO customers (id, name, ssn) VALUES ($1, $2, $3)",
        &[&902i64, &"B", &"222-22-2222"],
    )
    .await
    .unwrap();
    one.execute(
        "INSERT INTO customers (name, ssn) VALUES ($1, $2)",
        &[&"C", &"333-33-3333"],
    )
    .await
    .unwrap();
    let db = direct(&database).await;
    let format_of = |name: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one("SELECT ssn FROM customers WHERE name = $1", &[&name])
                .await
                .unwrap();
            row.get::<_, Vec<u8>>(0)[0]
        }
    };
    assert_eq!(
        format_of("A").await,
        pgward::crypto::envelope::FORMAT_ROW_BOUND
    );
    assert_eq!(
        format_of("B").await,
        pgward::crypto::envelope::FORMAT_ROW_BOUND
    );
    assert_eq!(format_of("C").await, pgward::crypto::envelope::FORMAT_V1);

    // Reads verify against each row's own key: plain, *, derived table, CTE, both protocols.
    let reads = [
        "SELECT ssn FROM customers WHERE id = {id}",
        "SELECT * FROM customers WHERE id = {id}",
        "SELECT x.s FROM (SELECT ssn AS s, id FROM customers) x WHERE x.id = {id}",
        "WITH c AS (SELECT * FROM customers) SELECT c.ssn FROM c WHERE c.id = {id}",
        "SELECT c.name, c.ssn FROM customers c JOIN customers d ON d.id = c.id WHERE c.id = {id}",
    ];
    for (id, ssn) in [(901, "111-11-1111"), (902, "222-22-2222")] {
        for sql in reads {
            let sql = sql.replace("{id}", &id.to_string());
            let rows = one.query(sql.as_str(), &[]).await.unwrap();
            assert_eq!(rows.len(), 1, "{sql}");
            let column = rows[0]
                .columns()
                .iter()
                .position(|c| c.name() == "ssn" || c.name() == "s")
                .unwrap();
            assert_eq!(rows[0].get::<_, String>(column), ssn, "{sql}");
            assert!(
                rows[0]
                    .columns()
                    .iter()
                    .all(|c| !c.name().starts_with("pgward_")),
                "row keys reach the client: {sql}"
            );
        }
        let simple = simple_rows(&one, &format!("SELECT ssn FROM customers WHERE id = {id}"))
            .await
            .unwrap();
        assert_eq!(simple, [Some(ssn.to_string())]);
    }
    // What a driver sees of the result is what it saw before: no key columns, client type.
    let stmt = one
        .prepare("SELECT id, ssn FROM customers WHERE id = $1")
        .await
        .unwrap();
    let names: Vec<&str> = stmt.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["id", "ssn"]);
    assert_eq!(
        stmt.columns()[1].type_(),
        &tokio_postgres::types::Type::TEXT
    );
    // An UPDATE by primary key re-binds (parameters); RETURNING verifies too.
    let row = one
        .query_one(
            "UPDATE customers SET ssn = $1 WHERE id = $2 RETURNING ssn",
            &[&"222-00-0000", &902i64],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "222-00-0000");
    assert_eq!(
        format_of("B").await,
        pgward::crypto::envelope::FORMAT_ROW_BOUND
    );
    // The primary key of a row with bound values cannot be changed through pgward.
    let e = one
        .batch_execute("UPDATE customers SET id = 999 WHERE id = 902")
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "0A000", "{e}");

    // The attack: as the DBA, copy row A's ssn ciphertext into row B (same tenant, same key).
    db.batch_execute(
        "UPDATE customers SET ssn = (SELECT ssn FROM customers WHERE id = 901) WHERE id = 902",
    )
    .await
    .unwrap();
    for sql in reads {
        let sql = sql.replace("{id}", "902");
        let e = one.query(sql.as_str(), &[]).await.unwrap_err();
        assert_integrity_failure(&e, &["111-11", "222-"]);
    }
    let e = simple_rows(&one, "SELECT ssn FROM customers WHERE id = 902")
        .await
        .unwrap_err();
    assert_integrity_failure(&e, &["111-11", "222-"]);
    // Row A still reads, also in a result that does not include row B.
    let rows = one
        .query("SELECT ssn FROM customers WHERE id = $1", &[&901i64])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "111-11-1111");

    // The gap: a value written without its key is unbound, and moves undetected.
    db.batch_execute(
        "UPDATE customers SET ssn = (SELECT ssn FROM customers WHERE name = 'C') WHERE id = 902",
    )
    .await
    .unwrap();
    let rows = one
        .query("SELECT ssn FROM customers WHERE id = $1", &[&902i64])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "333-33-3333");
}

/// `pgward keys shred` as an operator runs it: (exit code, stdout, stderr).
fn keys_cli(config: &std::path::Path, database: &str, args: &[&str]) -> (i32, String, String) {
    let pg = harness::postgres();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgward"))
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
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shredding_a_tenants_key_makes_its_values_unreadable_while_others_read_on() {
    let bao = crate::vault::Bao::start().await;
    let database = harness::fresh_database("tenantshred", true).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.token).unwrap();
    let key = harness::unique_name("shred_pii");
    let options = ProxyOptions {
        extra_toml: config(&bao, &database, &token_file, &key),
        ..ProxyOptions::default()
    };
    let config_file = dir.path().join("pgward.toml");
    std::fs::write(&config_file, harness::proxy_config_text(&options)).unwrap();
    let proxy = harness::start_proxy(options).await;
    let one = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 1 }),
    )
    .await;
    let two = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 2 }),
    )
    .await;
    let insert = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
    one.execute(insert, &[&"s1", &"one@shred.example", &"111-11-1111"])
        .await
        .unwrap();
    two.execute(insert, &[&"s2", &"two@shred.example", &"222-22-2222"])
        .await
        .unwrap();
    let db = direct(&database).await;
    // A backup taken before the shred: the wrapped data keys of tenant 2.
    let name = pgward::crypto::scope::context_key_name(&key, "2");
    let backup: Vec<String> = db
        .query(
            "SELECT wrapped FROM pgward.data_keys WHERE key_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!backup.is_empty());

    // Refused without the confirmation flag; nothing destroyed.
    let (code, _, stderr) = keys_cli(
        &config_file,
        &database,
        &["shred", "--key", &key, "--context", "2"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--confirm"), "{stderr}");
    assert_eq!(
        two.query_one("SELECT ssn FROM customers WHERE name = 's2'", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "222-22-2222"
    );

    let (code, stdout, stderr) = keys_cli(
        &config_file,
        &database,
        &["shred", "--key", &key, "--context", "2", "--confirm"],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&name), "{stdout}");

    // Within one poll interval (1 s) tenant 2's values stop being served, in the open
    // session (whose key was cached) and in a new one; tenant 1 reads on.
    let mut refused = None;
    for _ in 0..50 {
        match two
            .query("SELECT ssn FROM customers WHERE name = 's2'", &[])
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("tenant 2's values are refused after the shred");
    let db_error = e.as_db_error().unwrap();
    assert_eq!(db_error.code().code(), "55000", "{}", db_error.message());
    assert!(
        db_error.message().contains("customers.ssn") && db_error.message().contains("shredded")
    );
    assert!(!db_error.message().contains("222-22"));
    let fresh = session(
        &proxy,
        &database,
        "billing",
        serde_json::json!({ "tenant_id": 2 }),
    )
    .await;
    let e = fresh
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "55000", "{e}");
    // Nor can tenant 2 write under a new key made afresh.
    assert!(fresh
        .execute(insert, &[&"s3", &"three@shred.example", &"333-33-3333"])
        .await
        .is_err());
    assert_eq!(
        one.query_one(
            "SELECT ssn FROM customers WHERE email = $1",
            &[&"one@shred.example"]
        )
        .await
        .unwrap()
        .get::<_, String>(0),
        "111-11-1111"
    );

    // Gone everywhere: the wrapped keys, and the Vault key that a restored backup's copies need.
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM pgward.data_keys WHERE key_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_eq!(
        bao.api("GET", &format!("transit/keys/{name}"), None)
            .await
            .err(),
        Some(404)
    );
    for wrapped in &backup {
        let restored = bao
            .api(
                "POST",
                &format!("transit/decrypt/{name}"),
                Some(serde_json::json!({ "ciphertext": wrapped })),
            )
            .await;
        assert!(restored.is_err(), "a backup's wrapped key still unwraps");
    }
    // keys status says which key was destroyed and since when.
    let (code, stdout, stderr) = keys_cli(&config_file, &database, &["status", "--no-count"]);
    assert!(code == 0 || code == 1, "{stderr}");
    assert!(
        stdout.contains("Destroyed keys")
            && stdout.contains(&name)
            && stdout.contains("shredded since"),
        "{stdout}{stderr}"
    );
}
