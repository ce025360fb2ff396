//! A simple Query carrying several statements is audited as pgAudit does: one record per
//! statement, each with its own text, analysis and completion; the statements after a
//! failing one are recorded as skipped, and the auditor's tools see each of them.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::error::SqlState;

use crate::harness;

fn records(dir: &Path) -> Vec<Value> {
    harness::audit_records(dir)
}

/// The completion of the statement record `statement`.
fn completion_of<'a>(all: &'a [Value], statement: &Value) -> &'a Value {
    all.iter()
        .find(|r| r["kind"] == "statement_completed" && r["statement_seq"] == statement["seq"])
        .unwrap_or_else(|| panic!("no completion for {statement}"))
}

/// `pgward audit search … --json` as an auditor runs it: the matching records.
fn search(dir: &Path, filter: &[&str]) -> Vec<Value> {
    let mut args = vec![OsStr::new("audit"), OsStr::new("search"), dir.as_os_str()];
    args.extend(filter.iter().map(OsStr::new));
    args.push(OsStr::new("--json"));
    let out = harness::pgward_cli(args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test]
async fn each_statement_of_a_query_has_its_record_and_completion() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditmulti", false).await;
    let proxy = harness::audited_proxy(log.path(), "").await;
    let client = proxy.connect("app", &database).await;
    client
        .batch_execute("CREATE TABLE t (id int primary key, secret text)")
        .await
        .unwrap();

    client
        .simple_query(
            "SELECT 1; INSERT INTO t VALUES (1, 'hunter2'), (2, 'swordfish'); \
             SELECT * FROM t; -- done;\n",
        )
        .await
        .unwrap();
    // The middle statement fails: the first is rolled back with the implicit transaction,
    // the last never runs.
    let err = client
        .simple_query("INSERT INTO t VALUES (3, 'x'); SELECT 1/0; DELETE FROM t")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let left = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(left.get::<_, i64>(0), 2, "nothing after the error ran");
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let statements: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "statement" && r["protocol"] == "simple")
        .collect();
    let texts: Vec<&str> = statements
        .iter()
        .map(|s| s["sql"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "CREATE TABLE t (id int primary key, secret text)",
            "SELECT ?",
            "INSERT INTO t VALUES (?, ?), (?, ?)",
            "SELECT * FROM t",
            "INSERT INTO t VALUES (?, ?)",
            "SELECT ?/?",
            "DELETE FROM t",
        ]
    );
    let first = &statements[1..4];
    let parts: Vec<(Value, Value)> = first
        .iter()
        .map(|s| (s["part"].clone(), s["parts"].clone()))
        .collect();
    assert_eq!(
        parts,
        [
            (json!(1), json!(3)),
            (json!(2), json!(3)),
            (json!(3), json!(3))
        ]
    );
    assert!(
        statements[0].get("part").is_none(),
        "a single statement has no part"
    );
    let touched: Vec<(Value, Value, Value)> = first
        .iter()
        .map(|s| {
            let t = (s["tables_read"].clone(), s["tables_written"].clone());
            (t.0, t.1, s["command_class"].clone())
        })
        .collect();
    assert_eq!(
        touched,
        [
            (json!([]), json!([]), json!(["READ"])),
            (json!([]), json!(["t"]), json!(["WRITE"])),
            (json!(["t"]), json!([]), json!(["READ"])),
        ]
    );
    let done: Vec<(Value, Value, Value)> = first
        .iter()
        .map(|s| {
            let c = completion_of(&all, s);
            (
                c["command"].clone(),
                c["rows"].clone(),
                c["sqlstate"].clone(),
            )
        })
        .collect();
    assert_eq!(
        done,
        [
            (json!("SELECT"), json!(1), Value::Null),
            (json!("INSERT"), json!(2), Value::Null),
            (json!("SELECT"), json!(2), Value::Null),
        ]
    );
    let failing = &statements[4..7];
    let (insert, division, delete) = (
        completion_of(&all, failing[0]),
        completion_of(&all, failing[1]),
        completion_of(&all, failing[2]),
    );
    assert_eq!(
        (&insert["command"], &insert["rows"]),
        (&json!("INSERT"), &json!(1))
    );
    assert_eq!(division["sqlstate"], "22012");
    assert!(division.get("skipped").is_none());
    assert_eq!(delete["skipped"], true, "{delete}");
    assert_eq!(
        delete["sqlstate"],
        Value::Null,
        "a skipped statement raised nothing"
    );
    // Every statement record got exactly one completion.
    let completions = all
        .iter()
        .filter(|r| r["kind"] == "statement_completed")
        .count();
    let recorded = all.iter().filter(|r| r["kind"] == "statement").count();
    assert_eq!(completions, recorded);
    // Values never reach the log.
    let text = all.iter().map(Value::to_string).collect::<String>();
    assert!(!text.contains("hunter2") && !text.contains("swordfish"));

    // The auditor's tools see each statement on its own.
    let writes: Vec<Value> = search(log.path(), &["--table", "t", "--kind", "statement"])
        .iter()
        .map(|r| r["sql"].clone())
        .collect();
    assert_eq!(
        writes,
        [
            json!("CREATE TABLE t (id int primary key, secret text)"),
            json!("INSERT INTO t VALUES (?, ?), (?, ?)"),
            json!("SELECT * FROM t"),
            json!("INSERT INTO t VALUES (?, ?)"),
            json!("DELETE FROM t"),
            json!("SELECT count(*) FROM t"),
        ]
    );
    let failed = search(log.path(), &["--sqlstate", "22012"]);
    let failed_texts: Vec<&Value> = failed.iter().map(|r| &r["sql"]).collect();
    assert!(failed_texts.contains(&&json!("SELECT ?/?")), "{failed:#?}");
    assert!(
        !failed_texts.contains(&&json!("DELETE FROM t")),
        "{failed:#?}"
    );
    let page = log.path().join("report.html");
    harness::pgward_cli([
        OsStr::new("audit"),
        OsStr::new("report"),
        OsStr::new("--out"),
        page.as_os_str(),
        log.path().as_os_str(),
    ]);
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.to_lowercase().contains("delete from t"),
        "the report lists each statement"
    );
    harness::pgward_cli([
        OsStr::new("audit"),
        OsStr::new("verify"),
        log.path().as_os_str(),
    ]);
}

/// A proxy auditing into `log` in front of a fresh demo database, and a client of the
/// policy-bound `support` service (tenant 1) on it.
async fn support_audited(log: &Path, prefix: &str) -> (harness::TestProxy, tokio_postgres::Client) {
    let database = harness::fresh_database(prefix, true).await;
    let policies = std::fs::canonicalize("policies").unwrap();
    let proxy = harness::start_proxy(harness::ProxyOptions {
        extra_toml: format!(
            "{}\n[policy]\ndir = {:?}\ndatabase = \"{database}\"\ncatalog_service = \"app\"\n\n{}",
            harness::audit_toml(log, ""),
            policies.display().to_string(),
            harness::superuser_service("support")
        ),
        ..harness::ProxyOptions::default()
    })
    .await;
    let mut config = proxy.client_config("support", &database);
    config.password(harness::token(
        "support",
        json!({"tenant_id": 1, "email": "a@b"}),
    ));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    (proxy, client)
}

#[tokio::test]
async fn a_policy_bound_query_of_several_statements_is_recorded_per_statement() {
    let log = tempfile::tempdir().unwrap();
    let (proxy, client) = support_audited(log.path(), "auditmultipol").await;
    client
        .simple_query("SELECT name FROM customers; SELECT count(*) FROM customers WHERE id > 0")
        .await
        .unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let statements: Vec<&Value> = all.iter().filter(|r| r["kind"] == "statement").collect();
    assert_eq!(statements.len(), 2, "{statements:#?}");
    for (i, s) in statements.iter().enumerate() {
        assert_eq!((&s["part"], &s["parts"]), (&json!(i + 1), &json!(2)));
        assert_eq!(s["decision"], "allowed");
        assert_eq!(s["tables_read"], json!(["public.customers"]), "{s}");
        assert!(s["rewritten_redacted_sha256"].is_string(), "{s}");
        let done = completion_of(&all, s);
        assert_eq!(done["command"], "SELECT", "{done}");
    }
    assert_ne!(
        statements[0]["rewritten_redacted_sha256"], statements[1]["rewritten_redacted_sha256"],
        "each record hashes its own rewritten statement"
    );
    assert_eq!(statements[0]["sql"], "SELECT name FROM customers");
    assert_eq!(
        statements[1]["sql"],
        "SELECT count(*) FROM customers WHERE id > ?"
    );
}

/// The hash of the rewritten statement says which rewrite ran, not with which values: an
/// unkeyed hash of the text itself would let anyone who reads the log try candidate values
/// (an id, an SSN of a plain column) until one hashes alike, undoing the redaction of `sql`.
/// Nor does a refusal's reason quote the values of what it refused.
#[tokio::test]
async fn statement_records_give_away_no_values_through_hashes_or_refusals() {
    let log = tempfile::tempdir().unwrap();
    let (proxy, client) = support_audited(log.path(), "auditrewritehash").await;
    for sql in [
        "SELECT name FROM customers WHERE id = 4711 AND name = 'Ada Lovelace'",
        "SELECT name FROM customers WHERE id = 1 AND name = 'Grace Hopper'",
        "SELECT name FROM customers WHERE id = 4711",
    ] {
        client.simple_query(sql).await.unwrap();
    }
    // A refusal names the construct it refused, without its values, to the client and in the
    // record's reason.
    let refused = client
        .simple_query("SELECT name FROM customers WHERE 'Ada Lovelace' IS NORMALIZED")
        .await
        .unwrap_err();
    let refused = refused.as_db_error().unwrap();
    assert_eq!(refused.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(
        refused.message().contains("the expression ? IS NORMALIZED"),
        "{refused:?}"
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let statements: Vec<&Value> = all.iter().filter(|r| r["kind"] == "statement").collect();
    assert_eq!(statements.len(), 4, "{statements:#?}");
    assert!(
        statements[3]["reason"]
            .as_str()
            .unwrap()
            .contains("the expression ? IS NORMALIZED"),
        "{}",
        statements[3]
    );
    let hash = |i: usize| statements[i]["rewritten_redacted_sha256"].as_str().unwrap();
    assert_eq!(
        hash(0),
        hash(1),
        "statements that differ only in values hash alike"
    );
    assert_ne!(hash(0), hash(2), "another rewrite, another hash");
    assert_eq!(
        statements[0]["sql"],
        "SELECT name FROM customers WHERE id = ? AND name = ?"
    );
    let text: String = all.iter().map(Value::to_string).collect();
    for value in ["Ada Lovelace", "Grace Hopper"] {
        assert!(!text.contains(value), "{value} reached the log");
    }
}

/// A portal read in chunks (Execute with a row limit, as JDBC's fetch size and psycopg's
/// server-side cursors do) has one record per Execute, and the completions together account
/// for every row it returned; those that stopped at PortalSuspended say so.
#[tokio::test]
async fn every_fetch_of_a_portal_is_recorded_with_its_rows() {
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditportal", false).await;
    let proxy = harness::audited_proxy(log.path(), "").await;
    let mut client = proxy.connect("app", &database).await;
    client
        .batch_execute(
            "CREATE TABLE f (id int primary key); INSERT INTO f SELECT generate_series(1, 5)",
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let statement = tx.prepare("SELECT id FROM f ORDER BY id").await.unwrap();
    let portal = tx.bind(&statement, &[]).await.unwrap();
    let mut fetched = Vec::new();
    for _ in 0..3 {
        let rows = tx.query_portal(&portal, 2).await.unwrap();
        fetched.push(rows.len());
    }
    assert_eq!(fetched, [2, 2, 1]);
    tx.commit().await.unwrap();
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let executes: Vec<&Value> = all
        .iter()
        .filter(|r| {
            r["kind"] == "statement"
                && r["protocol"] == "extended"
                && r["sql"] == "SELECT id FROM f ORDER BY id"
        })
        .collect();
    assert_eq!(executes.len(), 3, "one record per Execute of the portal");
    let parts: Vec<(Value, Value)> = executes
        .iter()
        .map(|s| {
            let c = completion_of(&all, s);
            (c["rows"].clone(), c["suspended"].clone())
        })
        .collect();
    let total: u64 = parts.iter().filter_map(|(rows, _)| rows.as_u64()).sum();
    assert_eq!(total, 5, "the fetches account for every row: {parts:?}");
    assert_eq!(
        parts.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
        [json!(true), json!(true), Value::Null],
        "{parts:?}"
    );
}

/// A name runs what the server prepared under it: a second Parse of a prepared name is
/// refused as PostgreSQL refuses it, so the Execute after it is recorded as the statement the
/// server runs — never as the text of the refused Parse.
#[tokio::test]
async fn a_second_parse_of_a_prepared_name_cannot_disguise_its_executions() {
    use harness::msg;
    let log = tempfile::tempdir().unwrap();
    let database = harness::fresh_database("auditreparse", false).await;
    let proxy = harness::audited_proxy(log.path(), "").await;
    let mut raw = harness::raw_proxied(&proxy, &database).await;
    raw.send(&msg::batch(&[
        msg::parse("s1", "SELECT 'what really ran' AS first"),
        msg::sync(),
    ]))
    .await;
    raw.until_ready(1).await;
    raw.send(&msg::batch(&[
        msg::parse("s1", "SELECT 'a harmless disguise' AS second"),
        msg::sync(),
        msg::bind("", "s1", &[], false),
        msg::execute("", 0),
        msg::sync(),
    ]))
    .await;
    let replies = raw.until_ready(2).await;
    let errors = harness::error_texts(&replies);
    assert_eq!(errors.len(), 1, "{replies:?}");
    assert!(errors[0].contains("42P05"), "{errors:?}");
    let row = replies
        .iter()
        .find(|(t, _)| *t == b'D')
        .expect("the Execute ran");
    assert!(String::from_utf8_lossy(&row.1).contains("what really ran"));
    // A failed Parse leaves its name free, as in PostgreSQL.
    raw.send(&msg::batch(&[
        msg::parse("s2", "SELECT nonsense FROM"),
        msg::sync(),
    ]))
    .await;
    raw.until_ready(1).await;
    raw.send(&msg::batch(&[msg::parse("s2", "SELECT 2"), msg::sync()]))
        .await;
    let replies = raw.until_ready(1).await;
    assert!(!replies.iter().any(|(t, _)| *t == b'E'), "{replies:?}");
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let executed: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "statement" && r["protocol"] == "extended")
        .filter(|r| r["decision"] != "refused")
        .collect();
    assert!(
        executed
            .iter()
            .any(|r| r["sql"].as_str().unwrap_or("").contains("AS first")),
        "{executed:?}"
    );
    assert!(
        !executed
            .iter()
            .any(|r| r["sql"].as_str().unwrap_or("").contains("AS second")),
        "the Execute was recorded as the refused Parse's text: {executed:?}"
    );
}

/// A `FETCH` on a SQL cursor is recorded with what the cursor's query reads, and an `EXECUTE`
/// of a SQL prepared statement with what that statement touches (their own texts name only the
/// cursor or statement), so an auditor's search for a column finds every fetch and execution
/// of it with its rows; a closed cursor's or deallocated statement's name touches nothing.
#[tokio::test]
async fn every_fetch_and_execute_names_what_its_cursor_or_prepared_statement_reads() {
    let log = tempfile::tempdir().unwrap();
    let (proxy, client) = support_audited(log.path(), "auditcursor").await;
    let visible: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert!(visible >= 2, "the demo tenant has customers to fetch");
    client
        .batch_execute("BEGIN; DECLARE c CURSOR FOR SELECT name FROM customers ORDER BY id")
        .await
        .unwrap();
    // One row by the simple protocol, the rest by the extended one.
    client.simple_query("FETCH 1 FROM c").await.unwrap();
    let rest = client.query("FETCH ALL FROM c", &[]).await.unwrap();
    assert_eq!(rest.len() as i64, visible - 1);
    client.batch_execute("CLOSE c; COMMIT").await.unwrap();
    let closed = client.simple_query("FETCH 1 FROM c").await.unwrap_err();
    assert_eq!(closed.code(), Some(&SqlState::INVALID_CURSOR_NAME));
    client
        .batch_execute("PREPARE q (int) AS SELECT name FROM customers WHERE id > $1")
        .await
        .unwrap();
    let executed = client.simple_query("EXECUTE q(0)").await.unwrap();
    let executed_rows = executed
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(executed_rows as i64, visible);
    client.batch_execute("DEALLOCATE q").await.unwrap();
    let gone = client.simple_query("EXECUTE q(0)").await.unwrap_err();
    assert_eq!(gone.code(), Some(&SqlState::INVALID_SQL_STATEMENT_NAME));
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let fetches: Vec<&Value> = all
        .iter()
        .filter(|r| {
            r["kind"] == "statement" && r["sql"].as_str().unwrap_or("").starts_with("FETCH")
        })
        .collect();
    assert_eq!(fetches.len(), 3, "{fetches:#?}");
    let mut rows = 0;
    for open in &fetches[..2] {
        assert_eq!(open["tables_read"], json!(["public.customers"]), "{open}");
        let named = json!(["customers.name", "customers.id"]);
        assert_eq!(open["columns_read"], named, "{open}");
        rows += completion_of(&all, open)["rows"].as_i64().unwrap();
    }
    assert_eq!(
        rows, visible,
        "the fetches account for every row the cursor returned"
    );
    let after_close = fetches[2];
    assert_eq!(after_close["columns_read"], json!([]), "{after_close}");
    assert_eq!(completion_of(&all, after_close)["sqlstate"], "34000");
    let found = search(log.path(), &["--column", "customers.name"]);
    let found_fetches = found
        .iter()
        .filter(|r| r["sql"].as_str().unwrap_or("").starts_with("FETCH"))
        .count();
    assert_eq!(found_fetches, 2, "{found:#?}");

    let executes: Vec<&Value> = all
        .iter()
        .filter(|r| {
            r["kind"] == "statement" && r["sql"].as_str().unwrap_or("").starts_with("EXECUTE")
        })
        .collect();
    assert_eq!(executes.len(), 2, "{executes:#?}");
    assert_eq!(
        executes[0]["tables_read"],
        json!(["public.customers"]),
        "{}",
        executes[0]
    );
    assert_eq!(
        executes[0]["columns_read"],
        json!(["customers.name", "customers.id"])
    );
    assert_eq!(completion_of(&all, executes[0])["rows"], json!(visible));
    assert_eq!(
        executes[1]["columns_read"],
        json!([]),
        "deallocated: {}",
        executes[1]
    );
}

/// psycopg's server-side cursor (DECLARE, FETCH FORWARD per `itersize`, CLOSE, as the driver
/// sends them) works for a policy-bound service, and each of its fetches is recorded with what
/// the cursor reads and the rows it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psycopg_server_side_cursor_is_recorded_fetch_by_fetch() {
    let log = tempfile::tempdir().unwrap();
    let (proxy, client) = support_audited(log.path(), "auditpsycur").await;
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    drop(client);
    let token = harness::token("support", json!({"tenant_id": 1, "email": "a@b"}));
    let dsn = format!(
        "host=127.0.0.1 port={} user=support dbname={database} password={token} sslmode=disable",
        proxy.addr.port()
    );
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/drivers/psycopg_server_cursor.py");
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| {
        crate::tools::run(
            std::process::Command::new("python3")
                .arg(&script)
                .env("PGWARD_DSN", &dsn),
        )
    });
    assert!(
        ok && stdout.contains("all checks passed"),
        "psycopg's server-side cursor failed:\n{stdout}\n{stderr}"
    );
    let read: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rows read: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;

    let all = records(log.path());
    let fetches: Vec<&Value> = all
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter(|r| {
            r["sql"]
                .as_str()
                .unwrap_or("")
                .to_uppercase()
                .starts_with("FETCH")
        })
        .collect();
    assert!(fetches.len() >= 2, "fetched in chunks of 2: {fetches:#?}");
    let mut rows = 0;
    for fetch in &fetches {
        assert_eq!(
            fetch["columns_read"],
            json!(["customers.name", "customers.id"]),
            "{fetch}"
        );
        rows += completion_of(&all, fetch)["rows"].as_u64().unwrap_or(0);
    }
    assert_eq!(
        rows, read,
        "the fetches' completions account for every row psycopg read"
    );
}

/// With `standard_conforming_strings` off the server reads `'\' …'` as one string where
/// pgward reads a string and more SQL: an unrestricted service could hide a statement inside
/// a "literal" from the audit. Turning it off is refused, and a session the server reports it
/// off for (a database default) has every statement refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_server_reads_sql_differently_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = harness::audited_proxy(dir.path(), "").await;
    let database = harness::fresh_database("scsoff", false).await;
    let app = proxy.connect("app", &database).await;
    for sql in [
        "SET standard_conforming_strings = off",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SET client_encoding = 'SJIS'",
    ] {
        let e = app.simple_query(sql).await.expect_err(sql);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(db.code().code(), "0A000", "{sql}: {db:?}");
    }
    app.simple_query("SET client_encoding = 'UTF8'")
        .await
        .unwrap();
    drop(app);
    harness::direct(&database)
        .await
        .simple_query(&format!(
            "ALTER DATABASE {database} SET standard_conforming_strings = off"
        ))
        .await
        .unwrap();
    let app = proxy.connect("app", &database).await;
    let e = app
        .simple_query("SELECT '\\' AS a, ' ; SELECT 1; SELECT ' AS b")
        .await
        .expect_err("refused");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "0A000", "{db:?}");
    assert!(
        db.message().contains("standard_conforming_strings"),
        "{db:?}"
    );
}

/// A statement prepared and a portal bound through the protocol share their names with SQL's:
/// `EXECUTE` runs the one, `FETCH` reads the other, and their records name what the statement
/// reads (they named nothing, so a search for the column missed them).
#[tokio::test]
async fn an_execute_or_fetch_of_a_protocol_name_names_what_its_statement_reads() {
    use harness::msg;
    let log = tempfile::tempdir().unwrap();
    let (proxy, client) = support_audited(log.path(), "auditprotoname").await;
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    let claims = json!({"tenant_id": 1, "email": "a@b"});
    let mut raw = harness::raw_as(&proxy, "support", &database, claims).await;
    raw.send(&msg::batch(&[
        msg::query("BEGIN"),
        msg::parse("sx", "SELECT name FROM customers ORDER BY id"),
        msg::bind("px", "sx", &[], false),
        msg::sync(),
        msg::query("FETCH ALL FROM px"),
        msg::query("EXECUTE sx"),
        msg::query("COMMIT"),
    ]))
    .await;
    let replies = raw.until_ready(5).await;
    assert!(harness::error_texts(&replies).is_empty(), "{replies:?}");
    drop(raw);
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown().await;
    let all = records(log.path());
    for start in ["FETCH ALL FROM px", "EXECUTE sx"] {
        let record = all
            .iter()
            .find(|r| r["kind"] == "statement" && r["sql"].as_str() == Some(start))
            .unwrap_or_else(|| panic!("no record of {start}"));
        assert_eq!(
            record["tables_read"],
            json!(["public.customers"]),
            "{record}"
        );
        let columns = record["columns_read"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(columns.contains(&json!("customers.name")), "{record}");
    }
}
