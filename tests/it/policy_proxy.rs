//! Row policies enforced by the running proxy: the demo policies, real tokens, real drivers,
//! both protocols. Tenant 1's services must never see or change another tenant's rows, every
//! refusal is a clean 42501 in its place in the response stream, and the policy set follows
//! its files and the schema while sessions run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{self, msg, ProxyOptions, TestProxy};

/// A proxy bound to a fresh demo database with the policies of `dir`.
pub(crate) async fn policy_proxy(dir: &Path, extra: &str) -> (TestProxy, String) {
    let database = harness::fresh_plaintext_demo("pol").await;
    let extra_toml = format!(
        r#"
[policy]
dir = {dir:?}
database = "{database}"
catalog_service = "app"
watch_interval = "100ms"
catalog_refresh_interval = "300ms"
{services}
{extra}
"#,
        services = ["billing", "support", "analytics", "nopolicy"]
            .map(harness::superuser_service)
            .concat()
    );
    let proxy = harness::start_proxy(ProxyOptions {
        extra_toml,
        ..ProxyOptions::default()
    })
    .await;
    (proxy, database)
}

pub(crate) fn demo_policies() -> PathBuf {
    std::fs::canonicalize("policies").expect("policies dir")
}

pub(crate) fn config(
    proxy: &TestProxy,
    service: &str,
    database: &str,
    claims: serde_json::Value,
) -> tokio_postgres::Config {
    let mut config = proxy.client_config(service, database);
    config.password(harness::token(service, claims));
    config
}

pub(crate) async fn connect_as(
    proxy: &TestProxy,
    service: &str,
    database: &str,
    tenant: i64,
) -> Client {
    let (client, conn) = config(proxy, service, database, json!({ "tenant_id": tenant }))
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through pgward");
    tokio::spawn(conn);
    client
}

/// The direct (superuser) view of the database, for checking what really happened.
pub(crate) async fn direct(database: &str) -> Client {
    let (client, conn) = harness::postgres()
        .direct(database)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("direct connect");
    tokio::spawn(conn);
    client
}

pub(crate) fn assert_refused(error: &tokio_postgres::Error, needle: &str) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"));
    assert_eq!(
        db.code(),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "{}",
        db.message()
    );
    assert!(
        db.message().contains(needle),
        "message {:?} lacks {needle:?}",
        db.message()
    );
}

/// A refusal, or an error computed on tenant 1's own data (its ssns start with `101-`): a
/// predicate must never run on, and an error never echo, another tenant's row.
fn assert_refused_or_own_data_error(error: &tokio_postgres::Error) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"));
    if db.code() == &SqlState::INVALID_TEXT_REPRESENTATION {
        assert!(db.message().contains("\"101-"), "{}", db.message());
    } else {
        assert_refused(error, "billing");
    }
}

/// Every `tenant_id` a simple query returned in its first column.
pub(crate) fn first_column(messages: &[SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

/// Queries that try to reach other tenants' rows; each must be refused or return tenant 1 only.
const ATTACKS: &[&str] = &[
    "SELECT tenant_id FROM customers",
    "SELECT tenant_id FROM public.customers",
    "SELECT tenant_id FROM \"customers\" c WHERE c.tenant_id <> 1 OR true",
    "select TENANT_ID from CUSTOMERS /* comment */ -- trailing",
    "SELECT tenant_id FROM (SELECT * FROM (SELECT * FROM customers) a) b",
    "SELECT tenant_id FROM customers UNION ALL SELECT tenant_id FROM invoices",
    "WITH customers AS (SELECT * FROM invoices) SELECT tenant_id FROM customers",
    "WITH x AS (SELECT tenant_id FROM customers) SELECT tenant_id FROM x",
    "WITH RECURSIVE r(t) AS (SELECT tenant_id FROM customers UNION SELECT t FROM r) SELECT t FROM r",
    "SELECT c.tenant_id FROM tenants t JOIN customers c ON true",
    "SELECT tenant_id FROM customers WHERE id IN (SELECT customer_id FROM invoices)",
    "SELECT x.tenant_id FROM tenants t, LATERAL (SELECT tenant_id FROM customers WHERE tenant_id = t.id) x",
    "SELECT (SELECT max(tenant_id) FROM customers WHERE tenant_id = 2)",
    "SELECT tenant_id FROM customers WHERE 1/(tenant_id - 2) IS NOT NULL",
    "SELECT tenant_id FROM customers WHERE CAST(ssn AS int) = 1",
    "SELECT tenant_id FROM pg_catalog.pg_stats",
    "SELECT n_live_tup FROM pg_stat_user_tables",
    "SELECT tenant_id FROM customers FOR UPDATE",
    "SELECT query_to_xml('select * from customers', true, true, '')",
    "SELECT tenant_id FROM customers; SELECT tenant_id FROM invoices",
];

#[tokio::test]
async fn a_tenant_sees_only_its_rows_whatever_it_sends() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = connect_as(&proxy, "billing", &database, 1).await;
    for sql in ATTACKS {
        // Simple protocol.
        match billing.simple_query(sql).await {
            Ok(messages) => {
                let seen = first_column(&messages);
                assert!(
                    seen.iter().all(|t| t == "1" || t == "NULL"),
                    "{sql} returned {seen:?}"
                );
            }
            Err(e) => assert_refused_or_own_data_error(&e),
        }
        // Extended protocol (one statement per Parse).
        let first = sql.split(';').next().unwrap_or(sql);
        match billing.query(first, &[]).await {
            Ok(rows) => {
                for row in rows {
                    let value: Option<i64> = row.try_get(0).ok();
                    assert!(
                        value.is_none_or(|v| v == 1),
                        "{first} returned tenant {value:?}"
                    );
                }
            }
            Err(e) => assert_refused_or_own_data_error(&e),
        }
    }
    // Cursors and SQL-level prepared statements go through the same rewrite.
    for sql in [
        "BEGIN; DECLARE c CURSOR FOR SELECT tenant_id FROM customers; FETCH ALL FROM c; COMMIT",
        "PREPARE p AS SELECT tenant_id FROM customers WHERE id > $1; EXECUTE p(0); DEALLOCATE p",
    ] {
        let seen = first_column(&billing.simple_query(sql).await.unwrap());
        assert_eq!(seen.len(), 5, "{sql}: {seen:?}");
        assert!(seen.iter().all(|t| t == "1"), "{sql} returned {seen:?}");
    }
    // The filter is applied, not merely an empty result: tenant 1 has its 5 customers.
    let rows = billing
        .query("SELECT count(*) FROM customers", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 5);
    // Parameters work and are checked against the filter (tenant 2's ids give nothing).
    let ids: Vec<i64> = direct(&database)
        .await
        .query("SELECT id FROM customers WHERE tenant_id = 2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in ids {
        let rows = billing
            .query("SELECT name FROM customers WHERE id = $1", &[&id])
            .await
            .unwrap();
        assert!(rows.is_empty(), "customer {id} of tenant 2 visible");
    }
    assert!(
        proxy
            .metrics
            .statements_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// The simple protocol sends every value as a literal, so each statement text is new: they
/// share one rewrite per shape (`shape.rs`), and that must never loosen the filter.
#[tokio::test]
async fn statements_differing_only_in_literals_share_a_rewrite_and_stay_filtered() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let all = demo_customers(&database).await;
    for tenant in [1i64, 2] {
        let client = connect_as(&proxy, "billing", &database, tenant).await;
        let mut seen = 0;
        for (id, owner, name) in &all {
            let quoted = name.replace('\'', "''");
            for sql in [
                format!("SELECT tenant_id, name FROM customers WHERE id = {id}"),
                format!("SELECT tenant_id, name FROM customers WHERE name = '{quoted}' AND id = {id}"),
                format!("SELECT tenant_id, name FROM customers WHERE id = {id} AND 1/(tenant_id - {tenant} + 1) = 1"),
            ] {
                let rows = first_column(&client.simple_query(&sql).await.unwrap());
                let expected = if *owner == tenant { vec![tenant.to_string()] } else { vec![] };
                assert_eq!(rows, expected, "tenant {tenant}: {sql}");
                seen += rows.len();
            }
            // Writes through a template are filtered like any other.
            client
                .simple_query(&format!(
                    "UPDATE customers SET email = 'shape-{tenant}' WHERE id = {id}"
                ))
                .await
                .unwrap();
        }
        assert_eq!(
            seen,
            3 * all.iter().filter(|(_, o, _)| *o == tenant).count()
        );
    }
    let leaked: i64 = direct(&database)
        .await
        .query_one(
            "SELECT count(*) FROM customers WHERE email LIKE 'shape-%' AND email <> 'shape-' || tenant_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "an UPDATE reached another tenant's row");
    let hits = proxy
        .metrics
        .rewrites
        .shape_hits
        .load(std::sync::atomic::Ordering::Relaxed);
    // Four shapes per tenant, each learned once; every other statement filled its template.
    assert!(
        hits >= (2 * 4 * all.len() - 2 * 4) as u64,
        "only {hits} shape hits"
    );
}

/// The demo's customers as stored: (id, tenant, name), read directly.
pub(crate) async fn demo_customers(database: &str) -> Vec<(i64, i64, String)> {
    direct(database)
        .await
        .query("SELECT id, tenant_id, name FROM customers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn writes_stay_inside_the_tenant() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = connect_as(&proxy, "billing", &database, 1).await;
    let db = direct(&database).await;
    let before: i64 = db
        .query_one("SELECT count(*) FROM customers WHERE tenant_id = 2", &[])
        .await
        .unwrap()
        .get(0);

    // Preset: tenant_id is forced from the token; writing it is refused.
    billing
        .execute(
            "INSERT INTO customers (name, email) VALUES ($1, $2)",
            &[&"New", &"new@t1"],
        )
        .await
        .unwrap();
    let err = billing
        .simple_query("INSERT INTO customers (tenant_id, name) VALUES (2, 'Intruder')")
        .await
        .unwrap_err();
    assert_refused(&err, "tenant_id");
    let tenant: i64 = db
        .query_one("SELECT tenant_id FROM customers WHERE name = 'New'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenant, 1);

    // UPDATE and upsert reach no other tenant's rows.
    let n = billing
        .execute(
            "UPDATE customers SET name = 'hijacked' WHERE tenant_id = 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
    let n = billing
        .execute("UPDATE customers SET name = name || '!'", &[])
        .await
        .unwrap();
    assert_eq!(n, 6);
    let hijacked: i64 = db
        .query_one("SELECT count(*) FROM customers WHERE tenant_id <> 1 AND (name = 'hijacked' OR name LIKE '%!')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(hijacked, 0);

    // No delete right; no COPY; no DO blocks; no role games.
    for (sql, needle) in [
        ("DELETE FROM customers", "delete"),
        ("COPY customers TO STDOUT", "COPY"),
        ("DO $$ BEGIN PERFORM 1; END $$", "billing"),
        ("SET ROLE postgres", "billing"),
        (
            "SELECT set_config('search_path', 'evil', false)",
            "set_config",
        ),
    ] {
        let err = billing.simple_query(sql).await.unwrap_err();
        assert_refused(&err, needle);
    }
    let after: i64 = db
        .query_one("SELECT count(*) FROM customers WHERE tenant_id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after);
}

#[tokio::test]
async fn a_reference_names_only_a_row_the_service_can_see() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = connect_as(&proxy, "billing", &database, 1).await;
    let db = direct(&database).await;
    let customer_of = |tenant: i64| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT min(id) FROM customers WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    let (own, other) = (customer_of(1).await, customer_of(2).await);
    let missing = 1_000_000i64;
    let lock_holder = direct(&database).await;
    // Another tenant's customer and one that does not exist get the same refusal: no answer
    // tells whether the hidden row exists, and no foreign-key check locks it.
    for id in [other, missing] {
        let err = billing
            .query(
                "INSERT INTO invoices (customer_id, amount_cents, status) VALUES ($1, 1, 'open')",
                &[&id],
            )
            .await
            .unwrap_err();
        assert_refused(&err, "a reference must name a row of customers it can see");
        let err = billing
            .simple_query(&format!(
                "UPDATE invoices SET customer_id = {id} WHERE customer_id = {own}"
            ))
            .await
            .unwrap_err();
        assert_refused(&err, "invoices.(customer_id)");
        let err = billing
            .simple_query(&format!(
                "INSERT INTO invoices (id, customer_id, amount_cents, status) VALUES (1, {own}, 1, 'open') \
                 ON CONFLICT (id) DO UPDATE SET customer_id = {id}"
            ))
            .await
            .unwrap_err();
        assert_refused(&err, "customers it can see");
    }
    // The other tenant's row was never locked: it can be changed at once.
    lock_holder
        .batch_execute("SET lock_timeout = '1s'")
        .await
        .unwrap();
    lock_holder
        .execute("UPDATE customers SET id = id WHERE id = $1", &[&other])
        .await
        .unwrap();
    // Its own customers, and no customer at all, are references it may write.
    billing
        .execute(
            "INSERT INTO invoices (customer_id, amount_cents, status) VALUES ($1, 2, 'open'), (NULL, 3, 'open')",
            &[&own],
        )
        .await
        .unwrap();
    let n = billing
        .execute(
            "UPDATE invoices SET customer_id = $1 WHERE amount_cents = 3",
            &[&own],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let crossed: i64 = db
        .query_one(
            "SELECT count(*) FROM invoices i JOIN customers c ON c.id = i.customer_id WHERE i.tenant_id <> c.tenant_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        crossed, 0,
        "an invoice references another tenant's customer"
    );
}

#[tokio::test]
async fn refusals_keep_their_place_in_transactions_and_pipelines() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let support = connect_as(&proxy, "support", &database, 1).await;

    // Hidden column: a precise message naming the rule.
    let err = support
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    assert_refused(&err, "ssn");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("support.toml"),
        "{err}"
    );
    // SELECT * expands to the visible columns.
    let row = support
        .query_one("SELECT * FROM customers LIMIT 1", &[])
        .await
        .unwrap();
    assert!(row.columns().iter().all(|c| c.name() != "ssn"));
    assert!(row.columns().iter().any(|c| c.name() == "email"));

    // A refusal inside a transaction aborts it, as a server error would.
    support.batch_execute("BEGIN").await.unwrap();
    support
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap_err();
    let err = support.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    support.batch_execute("ROLLBACK").await.unwrap();

    // Pipelined: the refused statement fails alone, the others answer in order.
    let (a, b, c) = tokio::join!(
        support.query("SELECT count(*) FROM customers", &[]),
        support.query("SELECT card_number FROM invoices", &[]),
        support.query("SELECT count(*) FROM invoices", &[]),
    );
    assert_eq!(a.unwrap()[0].get::<_, i64>(0), 5);
    assert_refused(&b.unwrap_err(), "card_number");
    assert!(c.unwrap()[0].get::<_, i64>(0) > 0);

    // Simple-protocol multi-statement string with a refused part: nothing of it runs.
    let err = support
        .simple_query("SELECT 1; SELECT ssn FROM customers")
        .await
        .unwrap_err();
    assert_refused(&err, "ssn");

    // Fast-path FunctionCall bypasses SQL: refused, and the session keeps working.
    let mut raw = harness::raw_as(&proxy, "support", &database, json!({"tenant_id": 1})).await;
    raw.send(&msg::function_call(1299, &[])).await; // 1299 = now()
    let got = raw.until_ready(1).await;
    let error = got.iter().find(|m| m.0 == b'E').expect("an error");
    let text = String::from_utf8_lossy(&error.1);
    assert!(
        text.contains("42501") && text.contains("fast-path"),
        "{text}"
    );
    raw.send(&msg::query("SELECT 1")).await;
    assert!(raw.until_ready(1).await.iter().any(|m| m.0 == b'D'));
}

#[tokio::test]
async fn sessions_are_admitted_only_with_policy_claims_and_database() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let cases = [
        (
            "billing",
            database.as_str(),
            json!({}),
            "28000",
            "tenant_id",
        ),
        (
            "nopolicy",
            database.as_str(),
            json!({"tenant_id": 1}),
            "42501",
            "no policy",
        ),
        (
            "billing",
            "postgres",
            json!({"tenant_id": 1}),
            "42501",
            "written for database",
        ),
    ];
    for (service, db, claims, code, needle) in cases {
        let err = config(&proxy, service, db, claims)
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{service} on {db} was admitted"));
        let dberr = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(dberr.code().code(), code, "{}", dberr.message());
        assert!(dberr.message().contains(needle), "{}", dberr.message());
    }
    // A bound service may not shadow tables through search_path at startup, nor change how
    // the server reads the rewritten text's quoting, nor set what its SET statements may not.
    for options in [
        "-c search_path=evil,public",
        "-c standard_conforming_strings=off",
        "-c client_encoding=SJIS",
        "-c row_security=off",
    ] {
        let mut startup = config(&proxy, "billing", &database, json!({"tenant_id": 1}));
        startup.options(options);
        let err = startup
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{options} was admitted"));
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{options}"
        );
    }
    // What drivers send at connect still works.
    let mut usual = config(&proxy, "billing", &database, json!({"tenant_id": 1}));
    usual.options("-c DateStyle=ISO -c extra_float_digits=3 -c client_encoding=UTF8");
    let (usual, connection) = usual
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admitted");
    tokio::spawn(connection);
    usual.simple_query("SELECT 1").await.expect("usable");
    // analytics needs no claim and sees every tenant, without personal columns.
    let analytics = connect_as(&proxy, "analytics", &database, 0).await;
    let tenants = analytics
        .query("SELECT DISTINCT tenant_id FROM customers ORDER BY 1", &[])
        .await
        .unwrap();
    assert_eq!(tenants.len(), 3);
    assert_refused(
        &analytics
            .query("SELECT email FROM customers", &[])
            .await
            .unwrap_err(),
        "email",
    );
    assert_refused(
        &analytics
            .query("UPDATE tenants SET name = 'x'", &[])
            .await
            .unwrap_err(),
        "analytics",
    );
}

#[tokio::test]
async fn policy_files_are_reloaded_when_they_change_and_kept_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["billing.toml", "support.toml", "analytics.toml"] {
        std::fs::copy(demo_policies().join(f), dir.path().join(f)).unwrap();
    }
    let (proxy, database) = policy_proxy(dir.path(), "").await;
    let support = connect_as(&proxy, "support", &database, 1).await;
    assert_refused(
        &support
            .query("SELECT ssn FROM customers", &[])
            .await
            .unwrap_err(),
        "ssn",
    );

    // Grant ssn: the running session picks it up for its next statement.
    let path = dir.path().join("support.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("except_columns = [\"ssn\"]", "except_columns = []", 1),
    )
    .unwrap();
    let mut granted = false;
    for _ in 0..50 {
        if support
            .query("SELECT ssn FROM customers", &[])
            .await
            .is_ok()
        {
            granted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(granted, "policy change not picked up");
    assert!(
        proxy
            .metrics
            .policy_reloads
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // An invalid set (unknown column) is rejected as a whole; the last valid one stays.
    std::fs::write(
        &path,
        text.replacen(
            "except_columns = [\"ssn\"]",
            "except_columns = [\"no_such_column\"]",
            1,
        ),
    )
    .unwrap();
    let mut rejected = false;
    for _ in 0..50 {
        if proxy
            .metrics
            .policy_reload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            rejected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rejected, "invalid policy not noticed");
    support
        .query("SELECT ssn FROM customers", &[])
        .await
        .unwrap();
    let rows = support
        .query("SELECT tenant_id FROM customers", &[])
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.get::<_, i64>(0) == 1));

    // Revoke ssn again: statements this session already ran (and its memo of rewrites holds,
    // by text and by shape) are refused from the next reload on.
    support
        .simple_query("SELECT ssn FROM customers WHERE id = 1")
        .await
        .unwrap();
    std::fs::write(&path, &text).unwrap();
    let mut revoked = false;
    for _ in 0..50 {
        if support
            .query("SELECT ssn FROM customers", &[])
            .await
            .is_err()
        {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked, "revocation not picked up by the running session");
    assert_refused(
        &support
            .simple_query("SELECT ssn FROM customers WHERE id = 2")
            .await
            .unwrap_err(),
        "ssn",
    );
}

#[tokio::test]
async fn ddl_refreshes_the_catalog_policies_are_checked_against() {
    let (proxy, database) = policy_proxy(&demo_policies(), "").await;
    let billing = connect_as(&proxy, "billing", &database, 1).await;
    let columns = |row: &tokio_postgres::Row| {
        row.columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect::<Vec<_>>()
    };
    let before = billing
        .query_one("SELECT * FROM customers LIMIT 1", &[])
        .await
        .unwrap();
    assert!(!columns(&before).contains(&"notes".to_string()));

    // A migration by an unrestricted service through pgward.
    let (app, conn) = config(&proxy, "app", &database, json!({}))
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    app.batch_execute("ALTER TABLE customers ADD COLUMN notes text")
        .await
        .unwrap();
    // The refresh happens before that session's next statement.
    app.batch_execute("SELECT 1").await.unwrap();

    let after = billing
        .query_one("SELECT * FROM customers LIMIT 1", &[])
        .await
        .unwrap();
    assert!(
        columns(&after).contains(&"notes".to_string()),
        "{:?}",
        columns(&after)
    );
    let rows = billing
        .query("SELECT notes, tenant_id FROM customers", &[])
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.get::<_, i64>(1) == 1));
    // DDL made around pgward (directly on the database) is noticed by the periodic refresh.
    direct(&database)
        .await
        .batch_execute("ALTER TABLE customers ADD COLUMN region text")
        .await
        .unwrap();
    let mut seen = false;
    for _ in 0..50 {
        let row = billing
            .query_one("SELECT * FROM customers LIMIT 1", &[])
            .await
            .unwrap();
        if columns(&row).contains(&"region".to_string()) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen,
        "the periodic catalog refresh did not notice the new column"
    );
}
