//! Auditing by the running proxy: one durable record per statement through mixed drivers and
//! both protocols, completions with row counts, refusals with their rule, no secrets in the
//! log, statements refused when the log cannot write, and no acknowledged statement lost to
//! `kill -9`.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::error::SqlState;

use crate::harness::{self, ProxyOptions};

fn records(dir: &Path) -> Vec<Value> {
    harness::audit_records(dir)
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

/// The seqs of the records `pgward audit search --column` finds (the auditor's "who touched
/// this column?").
fn seqs_naming_column(dir: &Path, column: &str) -> Vec<Value> {
    let out = harness::pgward_cli([
        OsStr::new("audit"),
        OsStr::new("search"),
        dir.as_os_str(),
        OsStr::new("--column"),
        OsStr::new(column),
        OsStr::new("--json"),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["seq"].clone())
        .collect()
}

/// `pgward audit verify` (the binary, as an auditor runs it) must find the log whole.
fn assert_verifies(dir: &Path, live: bool) {
    let mut args = vec![OsStr::new("audit"), OsStr::new("verify")];
    if live {
        args.push(OsStr::new("--live"));
    }
    args.push(dir.as_os_str());
    harness::pgward_cli(args);
}

#[tokio::test]
async fn every_statement_gets_one_durable_record_and_a_completion() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("audit", false).await;
    let proxy = harness::audited_proxy(log.path(), "").await;
    let client = proxy.connect("app", &database).await;

    // 3 simple-protocol statements, 1 Query of two statements (one record each).
    client
        .batch_execute("CREATE TABLE t (id int primary key, secret text)")
        .await
        .unwrap();
    client
        .simple_query("INSERT INTO t VALUES (1, 'hunter2'), (2, 'swordfish')")
        .await
        .unwrap();
    client.simple_query("SELECT * FROM t").await.unwrap();
    client
        .batch_execute("UPDATE t SET secret = 'x' WHERE id = 1; UPDATE t SET secret = 'y'")
        .await
        .unwrap();
    // 4 extended-protocol executions of 2 prepared statements (prepare itself runs nothing).
    let select = client
        .prepare("SELECT secret FROM t WHERE id = $1")
        .await
        .unwrap();
    for id in [1, 2, 3] {
        client.query(&select, &[&id]).await.unwrap();
    }
    client
        .execute("DELETE FROM t WHERE id = $1", &[&2])
        .await
        .unwrap();
    // 1 failing statement.
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    // psql: 1 Query message.
    let (port, db, token) = (
        proxy.addr.port(),
        database.clone(),
        harness::token("app", json!({})),
    );
    // Blocking child process off the runtime thread: the proxy runs on this runtime.
    let psql = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-c", "select count(*) from t"])
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", "app")
            .env("PGDATABASE", db)
            .env("PGPASSWORD", token)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let statements = of_kind(&all, "statement");
    assert_eq!(statements.len(), 5 + 4 + 1 + 1, "{statements:#?}");
    let simple = statements
        .iter()
        .filter(|r| r["protocol"] == "simple")
        .count();
    assert_eq!(simple, 7);
    let extended: Vec<_> = statements
        .iter()
        .filter(|r| r["protocol"] == "extended")
        .collect();
    assert_eq!(extended.len(), 4);
    assert!(extended.iter().all(|r| r["service"] == "app"));

    // Every statement completed, with rows and SQLSTATE.
    let completed = of_kind(&all, "statement_completed");
    assert_eq!(completed.len(), statements.len(), "{completed:#?}");
    let by_seq = |seq: &Value| statements.iter().find(|s| &s["seq"] == seq).copied();
    for c in &completed {
        assert!(
            by_seq(&c["statement_seq"]).is_some(),
            "dangling completion {c}"
        );
    }
    let rows_of = |needle: &str| -> Vec<Value> {
        completed
            .iter()
            .filter(|c| {
                by_seq(&c["statement_seq"])
                    .is_some_and(|s| s["sql"].as_str().unwrap_or("").contains(needle))
            })
            .map(|c| c["rows"].clone())
            .collect()
    };
    assert_eq!(rows_of("INSERT INTO t"), vec![json!(2)]);
    assert_eq!(
        rows_of("UPDATE t SET"),
        vec![json!(1), json!(2)],
        "two UPDATEs in one Query: a record each, 1 and 2 rows"
    );
    assert_eq!(rows_of("DELETE FROM t"), vec![json!(1)]);
    let failed: Vec<_> = completed
        .iter()
        .filter(|c| c["sqlstate"] == "22012")
        .collect();
    assert_eq!(failed.len(), 1);

    // What each statement of this unrestricted service touched (no catalog: names as written).
    let tables_of = |needle: &str| -> Vec<(Value, Value)> {
        statements
            .iter()
            .filter(|s| s["sql"].as_str().unwrap_or("").contains(needle))
            .map(|s| (s["tables_read"].clone(), s["tables_written"].clone()))
            .collect()
    };
    assert_eq!(tables_of("INSERT INTO t"), vec![(json!([]), json!(["t"]))]);
    assert_eq!(
        tables_of("SELECT secret FROM t"),
        vec![(json!(["t"]), json!([])); 3],
        "each execution of the prepared statement"
    );
    assert_eq!(tables_of("DELETE FROM t"), vec![(json!([]), json!(["t"]))]);
    assert_eq!(
        tables_of("count(*) from t"),
        vec![(json!(["t"]), json!([]))]
    );

    // Literal values and tokens never reach the log by default.
    let text = all.iter().map(Value::to_string).collect::<String>();
    for secret in ["hunter2", "swordfish", "eyJ"] {
        assert!(!text.contains(secret), "{secret} in the audit log");
    }
    assert_eq!(of_kind(&all, "connection_opened").len(), 2);
    assert_eq!(of_kind(&all, "connection_closed").len(), 2);
    assert_verifies(log.path(), false);
}

#[tokio::test]
async fn refusals_and_failed_logins_are_recorded_with_rule_and_claims() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditpol", true).await;
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "{}\n[policy]\ndir = {:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n\n\
             {}",
            harness::audit_toml(log.path(), ""),
            policies.display().to_string(),
            harness::superuser_service("support")
        ),
        ..ProxyOptions::default()
    })
    .await;
    let mut config = proxy.client_config("support", &database);
    config.password(harness::token(
        "support",
        json!({"tenant_id": 1, "email": "a@b"}),
    ));
    config.application_name("support-console");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .query("SELECT name FROM customers", &[])
        .await
        .unwrap();
    client
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    let mut bad = proxy.client_config("support", &database);
    bad.password("not-a-token");
    bad.connect(tokio_postgres::NoTls).await.err().unwrap();
    // A genuine token of another service, presented as support: refused, and its jti recorded.
    let mut borrowed = proxy.client_config("support", &database);
    borrowed.password(harness::token(
        "billing",
        json!({"tenant_id": 1, "jti": "borrowed-jti"}),
    ));
    borrowed.connect(tokio_postgres::NoTls).await.err().unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let statements = of_kind(&all, "statement");
    let allowed: Vec<_> = statements
        .iter()
        .filter(|r| r["decision"] == "allowed")
        .collect();
    let refused: Vec<_> = statements
        .iter()
        .filter(|r| r["decision"] == "refused")
        .collect();
    assert_eq!((allowed.len(), refused.len()), (1, 1), "{statements:#?}");
    assert_eq!(refused[0]["sqlstate"], "42501");
    assert!(
        refused[0]["rule"]
            .as_str()
            .unwrap()
            .contains("support.toml"),
        "{}",
        refused[0]
    );
    assert!(
        allowed[0]["tables_read"].to_string().contains("customers"),
        "{}",
        allowed[0]
    );
    assert!(allowed[0]["rewritten_redacted_sha256"].is_string());
    // Records name the columns the statement named, not every column the service may see;
    // a refused statement names its tables and columns like any other.
    assert_eq!(allowed[0]["columns_read"], json!(["customers.name"]));
    assert_eq!(refused[0]["tables_read"], json!(["public.customers"]));
    assert_eq!(refused[0]["columns_read"], json!(["customers.ssn"]));
    assert_eq!(refused[0]["command_class"], json!(["READ"]));
    assert!(
        refused[0]["rewritten_redacted_sha256"].is_null(),
        "nothing was forwarded"
    );
    // The auditor's question "who tried to read ssn" finds the refused attempt only.
    let seqs = seqs_naming_column(log.path(), "customers.ssn");
    assert_eq!(seqs, vec![refused[0]["seq"].clone()]);
    let opened = of_kind(&all, "connection_opened");
    assert_eq!(
        opened[0]["session"]["claims_used"],
        json!({"tenant_id": 1}),
        "only the claims the policy uses: {:?}",
        opened
    );
    // Enough to find the session in PostgreSQL's own log: role, backend PID, application.
    let session = &opened[0]["session"];
    assert!(session["upstream_role"].is_string(), "{session}");
    assert!(
        session["backend_pid"].as_u64().is_some_and(|p| p > 0),
        "{session}"
    );
    assert_eq!(session["application_name"], "support-console");
    let failed = of_kind(&all, "auth_failed");
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert_eq!(failed[0]["user"], "support");
    assert!(
        failed[0]["token_id"].is_null(),
        "not a token: {}",
        failed[0]
    );
    assert_eq!(failed[1]["token_id"], "borrowed-jti", "{}", failed[1]);
    assert!(
        failed[1]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("identity_mismatch")),
        "{}",
        failed[1]
    );
    assert!(!all.iter().any(|r| r.to_string().contains("not-a-token")));
}

#[tokio::test]
async fn statements_are_refused_while_the_log_cannot_write() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("audit");
    let database = harness::fresh_database("auditfail", false).await;
    let proxy = harness::audited_proxy(&dir, "rotate_size = 512").await;
    let client = proxy.connect("app", &database).await;
    client.simple_query("SELECT 1").await.unwrap();
    // Replace the directory by a file: the next rotation cannot create a segment.
    let moved = root.path().join("moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = client.simple_query("SELECT 2").await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("a statement must be refused once the log cannot write");
    assert_eq!(err.code().map(SqlState::code), Some("58030"), "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("audit log"), "{message}");
    assert!(
        proxy
            .metrics
            .audit_write_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Back to normal once the directory is back.
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&moved, &dir).unwrap();
    client.simple_query("SELECT 3").await.unwrap();
    drop(client);
    proxy.shutdown().await;
    // One outage record with its span and what it cost, and no empty file per retry.
    let all = records(&dir);
    let outages = of_kind(&all, "audit_outage");
    assert_eq!(outages.len(), 1, "{outages:?}");
    let outage = outages[0];
    assert!(
        outage["started"].as_str() < outage["ended"].as_str(),
        "{outage}"
    );
    assert!(
        outage["statements_refused_or_unaudited"].as_u64() >= Some(1),
        "{outage}"
    );
    for entry in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".jsonl") {
            assert!(entry.metadata().unwrap().len() > 0, "empty segment {name}");
        }
    }
    assert_verifies(&dir, false);
}

#[tokio::test]
async fn kill_9_mid_load_loses_no_acknowledged_statement_record() {
    // The default: responses wait for the record's fsync, which overlaps execution.
    kill_9_mid_load(r#"durability = "before_response""#, "auditkill").await;
}

#[tokio::test]
async fn kill_9_mid_load_loses_no_record_when_durable_before_forwarding() {
    kill_9_mid_load(r#"durability = "before_forward""#, "auditkillfwd").await;
}

/// Four writers insert as fast as they can; pgward is killed mid-load: every statement a
/// client saw acknowledged has its record in the log, and the log verifies.
async fn kill_9_mid_load(durability: &str, database: &str) {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database(database, false).await;
    let setup = harness::postgres();
    let (admin, conn) = setup
        .direct(&database)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute("CREATE TABLE probe (n int)")
        .await
        .unwrap();

    let port = pgward::pgserver::free_port().unwrap();
    let text = harness::proxy_config_text(&ProxyOptions {
        extra_toml: harness::audit_toml(log.path(), durability),
        ..ProxyOptions::default()
    })
    .replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1);
    let config_file = log.path().with_extension("toml");
    std::fs::write(&config_file, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgward"))
        .args(["serve", "--config"])
        .arg(&config_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("app")
        .dbname(&database)
        .password(harness::token("app", json!({})));
    let mut clients = Vec::new();
    for _ in 0..50 {
        if let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            clients.push(client);
            if clients.len() == 4 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(clients.len(), 4, "pgward serve did not come up");
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, client)| {
            tokio::spawn(async move {
                let mut acknowledged = 0u64;
                for i in 0.. {
                    let sql = format!("INSERT INTO probe VALUES ({})", w * 1_000_000 + i);
                    if client.simple_query(&sql).await.is_err() {
                        break;
                    }
                    acknowledged += 1;
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut acknowledged = 0;
    for w in workers {
        acknowledged += w.await.unwrap();
    }
    assert!(acknowledged > 50, "too little load: {acknowledged}");

    let all = records(log.path());
    let inserts = of_kind(&all, "statement")
        .into_iter()
        .filter(|r| {
            r["sql"]
                .as_str()
                .unwrap_or("")
                .contains("INSERT INTO probe")
        })
        .count() as u64;
    assert!(
        inserts >= acknowledged,
        "{acknowledged} statements acknowledged but only {inserts} records survived"
    );
    assert_verifies(log.path(), true);
}

#[tokio::test]
async fn values_are_recorded_only_when_asked_and_never_with_encrypted_columns() {
    let database = harness::fresh_database("auditvals", false).await;
    let key_dir = tempfile::tempdir().unwrap();
    let master = key_dir.path().join("master.key");
    std::fs::write(&master, "11".repeat(32)).unwrap();
    let encrypted = format!(
        "[keys]\nprovider = \"local\"\nlocal_master_key_file = {:?}\n\n\
         [[encrypt]]\ntable = \"t\"\ncolumn = \"secret\"\nkey = \"k\"\ntype = \"text\"\n",
        master.display().to_string()
    );
    for (extra, expect_values) in [("", true), (encrypted.as_str(), false)] {
        let log = tempfile::tempdir().unwrap();
        let proxy = harness::start_proxy(ProxyOptions {
            extra_toml: format!(
                "{}{extra}",
                harness::audit_toml(log.path(), "record_values = true")
            ),
            ..ProxyOptions::default()
        })
        .await;
        let client = proxy.connect("app", &database).await;
        client
            .simple_query("SELECT 'visible-literal-42'")
            .await
            .unwrap();
        client
            .query("SELECT $1::text", &[&"bound-value-43"])
            .await
            .unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.shutdown().await;
        let text = records(log.path())
            .iter()
            .map(Value::to_string)
            .collect::<String>();
        for value in ["visible-literal-42", "bound-value-43"] {
            assert_eq!(
                text.contains(value),
                expect_values,
                "{value} with encryption configured = {}",
                !expect_values
            );
        }
    }
}

#[tokio::test]
async fn records_are_copied_to_syslog_when_asked() {
    let log = tempfile::tempdir().unwrap();
    let socket_path = log.path().join("syslog.sock");
    let daemon = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let database = harness::fresh_database("auditsyslog", false).await;
    let proxy = harness::audited_proxy(
        &log.path().join("audit"),
        &format!("syslog_socket = {:?}", socket_path.display().to_string()),
    )
    .await;
    let client = proxy.connect("app", &database).await;
    client.simple_query("SELECT 42").await.unwrap();
    let mut buf = vec![0u8; 65536];
    let mut kinds = Vec::new();
    while !kinds
        .iter()
        .any(|k: &String| k.contains("\"kind\":\"statement\""))
    {
        let n = tokio::time::timeout(Duration::from_secs(5), daemon.recv(&mut buf))
            .await
            .expect("a syslog datagram")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("<86>pgward-audit: {"), "{text}");
        kinds.push(text);
    }
}

#[tokio::test]
async fn records_say_which_columns_were_written_and_which_encrypted_columns_were_touched() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditcols", true).await;
    let key_file = log.path().join("master.key");
    pgward::keys::local::LocalProvider::generate_file(&key_file).unwrap();
    let audit_dir = log.path().join("audit");
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml: format!(
            "{}\n[policy]\ndir = {:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n\n{}\n{}",
            harness::audit_toml(&audit_dir, ""),
            policies.display().to_string(),
            harness::superuser_service("billing"),
            pgward::cli::dev::demo_encryption_toml(&key_file),
        ),
        ..ProxyOptions::default()
    })
    .await;
    let mut config = proxy.client_config("billing", &database);
    config.password(harness::token("billing", json!({"tenant_id": 1})));
    let (billing, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    billing
        .query("SELECT name, email FROM customers WHERE id = $1", &[&1i64])
        .await
        .unwrap();
    billing
        .simple_query("INSERT INTO customers (name, ssn) VALUES ('audited', '999-12-3456')")
        .await
        .unwrap();
    billing
        .simple_query("UPDATE invoices SET status = 'paid' WHERE id = 1")
        .await
        .unwrap();
    let computed = billing
        .simple_query("SELECT length(email) FROM customers")
        .await
        .unwrap_err();
    assert_eq!(
        computed.code().map(SqlState::code),
        Some("0A000"),
        "{computed}"
    );
    let app = proxy.connect("app", &database).await;
    app.simple_query("SELECT * FROM invoices").await.unwrap();
    drop((billing, app));
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(&audit_dir);
    let statement = |text: &str| {
        of_kind(&all, "statement")
            .into_iter()
            .find(|r| r["sql"].as_str().is_some_and(|s| s.starts_with(text)))
            .unwrap_or_else(|| panic!("no record of {text}: {all:#?}"))
            .clone()
    };
    let select = statement("SELECT name, email");
    assert_eq!(select["tables_read"], json!(["public.customers"]));
    assert_eq!(select["encrypted_columns"], json!(["customers.email"]));
    assert_eq!(select["columns_written"], json!([]));
    assert_eq!(select["command_class"], json!(["READ"]));
    let insert = statement("INSERT INTO customers");
    assert_eq!(
        insert["columns_written"],
        json!(["customers.name", "customers.ssn", "customers.tenant_id"]),
        "the client's columns and the policy's preset"
    );
    assert_eq!(insert["encrypted_columns"], json!(["customers.ssn"]));
    assert_eq!(insert["tables_written"], json!(["public.customers"]));
    let update = statement("UPDATE invoices");
    assert_eq!(update["columns_written"], json!(["invoices.status"]));
    assert_eq!(update["encrypted_columns"], json!([]));
    assert_eq!(update["command_class"], json!(["WRITE"]));
    // Field encryption's refusal is a decision, recorded as such with what it named.
    let computed = statement("SELECT length(email)");
    assert_eq!(computed["decision"], "refused", "{computed}");
    assert_eq!(computed["sqlstate"], "0A000");
    assert_eq!(computed["columns_read"], json!(["customers.email"]));
    let star = statement("SELECT * FROM invoices");
    assert_eq!(star["encrypted_columns"], json!(["invoices.card_number"]));
    assert!(
        !all.iter().any(|r| r.to_string().contains("999-12-3456")),
        "plaintext of an encrypted column in the audit log"
    );

    // The auditor's question: who touched ssn?
    let seqs = seqs_naming_column(&audit_dir, "customers.ssn");
    assert!(seqs.contains(&insert["seq"]), "{seqs:?}");
    assert!(!seqs.contains(&update["seq"]), "{seqs:?}");
    assert!(!seqs.contains(&star["seq"]), "{seqs:?}");
}
