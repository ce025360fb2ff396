//! Per-tenant data keys against a real OpenBao (transit provider, wrapped keys in the policy
//! database), through the demo schema and policies: each tenant's values are under its own
//! key, a ciphertext copied into another tenant's row fails integrity, and the blind index
//! does not link equal values across tenants.
use std::time::Duration;

use tokio_postgres::Client;

use crate::harness::{self, ProxyOptions, TestProxy};

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
    let db = harness::direct(&database).await;
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
    let db = harness::direct(&database).await;
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

/// A proxy serving the demo schema with per-tenant `email`/`ssn`, its configuration file
/// for the key commands, and the OpenBao and database behind it.
struct Tenants {
    bao: crate::vault::Bao,
    database: String,
    key: String,
    config_file: std::path::PathBuf,
    proxy: TestProxy,
    _dir: tempfile::TempDir,
}

impl Tenants {
    async fn start(prefix: &str) -> Self {
        let bao = crate::vault::Bao::start().await;
        let database = harness::fresh_database(prefix, true).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("vault-token");
        std::fs::write(&token_file, &bao.token).unwrap();
        let key = harness::unique_name(&format!("{prefix}_pii"));
        let options = ProxyOptions {
            extra_toml: config(&bao, &database, &token_file, &key),
            ..ProxyOptions::default()
        };
        let config_file = dir.path().join("pgward.toml");
        std::fs::write(&config_file, harness::proxy_config_text(&options)).unwrap();
        let proxy = harness::start_proxy(options).await;
        Tenants {
            bao,
            database,
            key,
            config_file,
            proxy,
            _dir: dir,
        }
    }

    /// A billing session of `tenant`.
    async fn tenant(&self, tenant: i64) -> Client {
        let claims = serde_json::json!({ "tenant_id": tenant });
        session(&self.proxy, &self.database, "billing", claims).await
    }

    async fn keys(&self, args: &[&str]) -> (i32, String, String) {
        harness::keys_cli(&self.config_file, &self.database, args).await
    }

    /// The per-context key name of `tenant`.
    fn name(&self, tenant: &str) -> String {
        pgward::crypto::scope::context_key_name(&self.key, tenant)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shredding_a_tenants_key_makes_its_values_unreadable_while_others_read_on() {
    let t = Tenants::start("tenantshred").await;
    let (bao, database, key) = (&t.bao, &t.database, &t.key);
    let (one, two) = (t.tenant(1).await, t.tenant(2).await);
    let insert = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
    one.execute(insert, &[&"s1", &"one@shred.example", &"111-11-1111"])
        .await
        .unwrap();
    two.execute(insert, &[&"s2", &"two@shred.example", &"222-22-2222"])
        .await
        .unwrap();
    let db = harness::direct(database).await;
    // A backup taken before the shred: the wrapped data keys of tenant 2.
    let name = t.name("2");
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
    let (code, _, stderr) = t.keys(&["shred", "--key", key, "--context", "2"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--confirm"), "{stderr}");
    assert_eq!(
        two.query_one("SELECT ssn FROM customers WHERE name = 's2'", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "222-22-2222"
    );

    let (code, stdout, stderr) = t
        .keys(&["shred", "--key", key, "--context", "2", "--confirm"])
        .await;
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
    let fresh = t.tenant(2).await;
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
    let (code, stdout, stderr) = t.keys(&["status", "--no-count"]).await;
    assert!(code == 0 || code == 1, "{stderr}");
    assert!(
        stdout.contains("Destroyed keys")
            && stdout.contains(&name)
            && stdout.contains("shredded since"),
        "{stdout}{stderr}"
    );
}

/// (key id, DEK version) in the header of `column` of the row named `name`.
async fn header_of(db: &Client, column: &str, name: &str) -> (u32, u32) {
    let row = db
        .query_one(
            &format!("SELECT {column} FROM customers WHERE name = $1"),
            &[&name],
        )
        .await
        .unwrap();
    let key_ref = pgward::crypto::peek_key_ref(&row.get::<_, Vec<u8>>(0)).unwrap();
    (key_ref.key_id, key_ref.dek_version)
}

/// The names of the rows a tenant finds by equality on `email`, by parameter and by literal.
async fn found_by_email(session: &Client, email: &str) -> Vec<String> {
    let by_param: Vec<String> = session
        .query(
            "SELECT name FROM customers WHERE email = $1 ORDER BY name",
            &[&email],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let by_literal: Vec<String> = session
        .simple_query(&format!(
            "SELECT name FROM customers WHERE email = '{email}' ORDER BY name"
        ))
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(String::from),
            _ => None,
        })
        .collect();
    assert_eq!(by_param, by_literal, "search for {email}");
    by_param
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_tools_rotate_reindex_and_retire_each_tenants_keys_and_skip_shredded_ones() {
    let t = Tenants::start("tenantbatch").await;
    let (one, two, three) = (t.tenant(1).await, t.tenant(2).await, t.tenant(3).await);
    let insert = "INSERT INTO customers (name, email, ssn) VALUES ($1, $2, $3)";
    for (session, name, email, ssn) in [
        (&one, "a1", "a1@one.example", "111-00-0001"),
        (&one, "a2", "a2@one.example", "111-00-0002"),
        (&two, "b1", "b1@two.example", "222-00-0001"),
        (&three, "c1", "c1@three.example", "333-00-0001"),
    ] {
        session
            .execute(insert, &[&name, &email, &ssn])
            .await
            .unwrap();
    }
    let db = harness::direct(&t.database).await;
    let (id1, id2, id3) = (
        pgward::crypto::key_name_id(&t.name("1")),
        pgward::crypto::key_name_id(&t.name("2")),
        pgward::crypto::key_name_id(&t.name("3")),
    );
    assert_eq!(header_of(&db, "ssn", "a1").await, (id1, 1));
    assert_eq!(header_of(&db, "ssn", "b1").await, (id2, 1));
    // A backup of b1's ssn under tenant 2's first data key, restored later.
    let b1_backup: Vec<u8> = db
        .query_one("SELECT ssn FROM customers WHERE name = 'b1'", &[])
        .await
        .unwrap()
        .get(0);
    // The attack: tenant 2's ciphertext copied into tenant 1's row a2.
    db.execute(
        "UPDATE customers SET ssn = $1 WHERE name = 'a2'",
        &[&b1_backup],
    )
    .await
    .unwrap();

    // Rotate both tenants' KEKs: the proxy writes under each context's DEK 2 from its next poll.
    for tenant in ["1", "2"] {
        t.bao.rotate(&t.name(tenant)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM pgward.data_keys WHERE key_name = ANY($1) AND dek_version = 2",
                &[&vec![t.name("1"), t.name("2")]],
            )
            .await
            .unwrap()
            .get(0);
        if n == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no DEK 2 per tenant");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    one.execute(insert, &[&"a3", &"a3@one.example", &"111-00-0003"])
        .await
        .unwrap();
    assert_eq!(header_of(&db, "ssn", "a3").await, (id1, 2));

    // Tenant 3 is shredded: its values must stay unreadable, whatever the batch tools do.
    let (code, _, err) = t
        .keys(&["shred", "--key", &t.key, "--context", "3", "--confirm"])
        .await;
    assert_eq!(code, 0, "{err}");
    let c1_before: Vec<u8> = db
        .query_one("SELECT ssn FROM customers WHERE name = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    let c1_id: i64 = db
        .query_one("SELECT id FROM customers WHERE name = 'c1'", &[])
        .await
        .unwrap()
        .get(0);

    // keys status: one line for the per-tenant key, not one per tenant.
    let (_, out, _) = t.keys(&["status"]).await;
    assert!(
        out.contains(&format!(
            "{}: 2 contexts with a key of their own, 1 shredded",
            t.key
        )) && out.contains("under older ones (`keys reencrypt`)"),
        "{out}"
    );

    // reencrypt: every value under its own context's newest data key; the shredded tenant's
    // values are named by primary key and left as they are; exit 1 says some were skipped.
    let (code, _, err) = t.keys(&["reencrypt", "--pause-ms", "1"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("customers.ssn: 1 values could not be read")
            && err.contains(&format!("primary keys: {c1_id}")),
        "{err}"
    );
    for (name, id) in [("a1", id1), ("a2", id2), ("a3", id1), ("b1", id2)] {
        assert_eq!(header_of(&db, "ssn", name).await, (id, 2), "{name}.ssn");
    }
    for (name, id) in [("a1", id1), ("a2", id1), ("b1", id2)] {
        assert_eq!(header_of(&db, "email", name).await, (id, 2), "{name}.email");
    }
    let c1_after: Vec<u8> = db
        .query_one("SELECT ssn FROM customers WHERE name = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(c1_after, c1_before, "the shredded value was rewritten");
    assert_eq!(header_of(&db, "email", "c1").await, (id3, 1));
    let resurrected: i64 = db
        .query_one(
            "SELECT count(*) FROM pgward.data_keys WHERE key_name = $1",
            &[&t.name("3")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        resurrected, 0,
        "a data key of the shredded tenant came back"
    );
    assert_eq!(
        t.bao
            .api("GET", &format!("transit/keys/{}", t.name("3")), None)
            .await
            .err(),
        Some(404),
        "the shredded tenant's transit key came back"
    );
    // Both tenants read their own values through the proxy; the copied value still fails.
    let r = one
        .query_one("SELECT email, ssn FROM customers WHERE name = 'a1'", &[])
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        ("a1@one.example".into(), "111-00-0001".into())
    );
    let r = two
        .query_one("SELECT email, ssn FROM customers WHERE name = 'b1'", &[])
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        ("b1@two.example".into(), "222-00-0001".into())
    );
    let e = one
        .query("SELECT ssn FROM customers WHERE name = 'a2'", &[])
        .await
        .unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "XX001", "{e}");

    // retire: the restored backup keeps tenant 2's DEK 1 in use; tenant 1's DEK 1 goes.
    db.execute(
        "UPDATE customers SET ssn = $1 WHERE name = 'b1'",
        &[&b1_backup],
    )
    .await
    .unwrap();
    db.execute(
        "UPDATE pgward.data_keys SET created_at = now() - interval '2 days' WHERE dek_version = 2",
        &[],
    )
    .await
    .unwrap();
    let (one_name, two_name) = (t.name("1"), t.name("2"));
    let (code, out, err) = t.keys(&["retire"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{one_name} (per-tenant key of {}): would retire DEK 1",
            t.key
        )) && out.contains(&format!(
            "{two_name} (per-tenant key of {}): kept DEK 1: 1 values left",
            t.key
        )),
        "{out}"
    );
    let (code, out, err) = t.keys(&["retire", "--key", &t.key, "--confirm"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{one_name} (per-tenant key of {}): retired DEK 1",
            t.key
        )),
        "{out}"
    );
    let retired: Vec<(String, i32)> = db
        .query("SELECT key_name, dek_version FROM pgward.retired_keys", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(retired, [(one_name.clone(), 1)]);
    let r = two
        .query_one("SELECT ssn FROM customers WHERE name = 'b1'", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "222-00-0001");

    // rotate-index: each tenant's blind-index root is replaced; searches keep working during
    // and after, and reencrypt completes every context's rotation.
    let a1_index: Vec<u8> = db
        .query_one("SELECT email_bidx FROM customers WHERE name = 'a1'", &[])
        .await
        .unwrap()
        .get(0);
    let (code, out, err) = t
        .keys(&["rotate-index", "--key", &t.key, "--confirm"])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("index root rotation of 2 per-tenant contexts started"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    one.execute(insert, &[&"a4", &"a1@one.example", &"111-00-0004"])
        .await
        .unwrap();
    assert_eq!(found_by_email(&one, "a1@one.example").await, ["a1", "a4"]);
    let (code, out, err) = t.keys(&["reencrypt", "--pause-ms", "1"]).await;
    // Still 1: tenant 3's values are unreadable for good.
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains(&format!(
            "{}: index root rotation complete in 2 per-tenant contexts",
            t.key
        )),
        "{out}{err}"
    );
    let a1_new: Vec<u8> = db
        .query_one("SELECT email_bidx FROM customers WHERE name = 'a1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(a1_new, a1_index, "a1's index was not recomputed");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(found_by_email(&one, "a1@one.example").await, ["a1", "a4"]);
    assert_eq!(found_by_email(&one, "a2@one.example").await, ["a2"]);
    assert_eq!(found_by_email(&two, "b1@two.example").await, ["b1"]);
    assert!(found_by_email(&one, "b1@two.example").await.is_empty());
    let (_, out, _) = t.keys(&["status"]).await;
    assert!(!out.contains("rotation in progress"), "{out}");
}
