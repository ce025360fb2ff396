//! Adversarial integration tests of the policy engine against a real PostgreSQL: rewrite
//! with the engine, run the rewritten SQL as the superuser on a fresh database, and check
//! that tenant 1 never sees or changes another tenant's rows.
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pgward::policy::{cli, Catalog, PolicyEngine, PolicyIdentity};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness;

static DB_SEQ: AtomicUsize = AtomicUsize::new(0);

struct Db {
    client: Client,
    engine: PolicyEngine,
    url: String,
}

fn config(pg: &harness::Pg, db: &str) -> tokio_postgres::Config {
    pg.direct(db)
}

/// A fresh database with the demo schema, the pgward helpers and the demo policies
/// (plus extra policy files written into a temp dir when given).
async fn fresh(extra: &[(&str, &str)]) -> Db {
    let pg = harness::postgres();
    let name = format!(
        "policy_{}_{}",
        std::process::id(),
        DB_SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let (admin, conn) = config(&pg, "postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let cfg = config(&pg, &name);
    pgward::pgserver::apply_migrations(&cfg, Path::new("migrations"))
        .await
        .unwrap();
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(harness::PLAINTEXT_DEMO_SQL)
        .await
        .unwrap();
    let catalog = Arc::new(Catalog::load(&client).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir("policies").unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    for (file, text) in extra {
        std::fs::write(dir.path().join(file), text).unwrap();
    }
    let engine = PolicyEngine::load(dir.path(), catalog, &[]).unwrap();
    std::mem::forget(dir); // policies stay readable for reloads during the test
    let url = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname={name}",
        pg.port, pg.password
    );
    Db {
        client,
        engine,
        url,
    }
}

/// A billing-like service without presets, with delete and copy: exercises write checks.
const WRITER: &str = r#"
claim_types = { tenant_id = "bigint" }
[allow]
copy = true
explain = true
[tables.customers]
actions = ["select", "insert", "update", "delete"]
filter = "tenant_id = claim('tenant_id')"
[tables.invoices]
actions = ["select", "insert", "update", "delete"]
filter = "tenant_id = claim('tenant_id')"
"#;

fn claims(t: i64) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("tenant_id".into(), serde_json::json!(t));
    m
}

impl Db {
    fn rewrite(&self, service: &str, tenant: i64, sql: &str) -> Result<String, String> {
        let c = claims(tenant);
        self.engine
            .rewrite(
                &PolicyIdentity {
                    service,
                    claims: &c,
                },
                sql,
            )
            .map(|r| r.sql.clone())
            .map_err(|e| e.message)
    }

    fn must(&self, service: &str, sql: &str) -> String {
        self.rewrite(service, 1, sql)
            .unwrap_or_else(|e| panic!("{sql}: refused: {e}"))
    }

    /// Rows (as text) of the last result set of the rewritten statement(s).
    async fn rows(&self, service: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let rewritten = self.must(service, sql);
        self.raw(&rewritten)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n=> {rewritten}\nfailed: {e:?}"))
    }

    async fn raw(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
        let msgs = self.client.simple_query(sql).await?;
        let mut out = Vec::new();
        for m in msgs {
            match m {
                SimpleQueryMessage::Row(r) => {
                    out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                SimpleQueryMessage::RowDescription(_) => out.clear(),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Some customer id of `tenant` (ids of the seed are not grouped by tenant).
    async fn cid(&self, tenant: i64) -> i64 {
        self.count(&format!(
            "SELECT min(id) FROM customers WHERE tenant_id = {tenant}"
        ))
        .await
    }

    async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn reads_only_reach_own_tenant() {
    let db = fresh(&[]).await;
    let queries = [
        "SELECT tenant_id FROM customers",
        "SELECT c.tenant_id FROM customers AS c",
        "SELECT tenant_id FROM \"customers\"",
        "SELECT tenant_id FROM public.customers",
        "select TENANT_ID from PUBLIC.Customers /* comment */ -- trailing",
        "SELECT tenant_id FROM (SELECT * FROM (SELECT * FROM customers) a) b",
        "SELECT tenant_id FROM customers WHERE id IN (SELECT customer_id FROM invoices WHERE tenant_id = 2)",
        "SELECT tenant_id FROM customers UNION ALL SELECT tenant_id FROM invoices WHERE tenant_id = 2",
        "SELECT i.tenant_id FROM customers c JOIN invoices i ON i.customer_id = c.id",
        "SELECT x.tenant_id FROM customers c, LATERAL (SELECT * FROM invoices i WHERE i.customer_id = c.id OR true) x",
        "WITH customers AS (SELECT * FROM customers WHERE tenant_id = 2) SELECT tenant_id FROM customers",
        "WITH RECURSIVE r AS (SELECT id, tenant_id FROM customers UNION SELECT c.id, c.tenant_id FROM customers c JOIN r ON c.id = r.id + 1) SELECT tenant_id FROM r",
        "SELECT (SELECT max(tenant_id) FROM invoices) FROM customers",
        "SELECT tenant_id FROM invoices WHERE tenant_id = ANY(ARRAY[1, 2, 3])",
        "SELECT coalesce(tenant_id, 0) FROM customers WHERE lower(name) LIKE '%customer%'",
    ];
    for q in queries {
        let rows = db.rows("billing", q).await;
        assert!(
            !rows.is_empty() || q.contains("tenant_id = 2"),
            "{q}: no rows"
        );
        for r in &rows {
            assert_eq!(r[0].as_deref(), Some("1"), "{q}: leaked {r:?}");
        }
    }
    // Aggregates see only the tenant's rows.
    let n = db.rows("billing", "SELECT count(*) FROM customers").await;
    assert_eq!(n[0][0].as_deref(), Some("5"));
    // A CTE named like a table is not filtered wrongly.
    let r = db
        .rows(
            "billing",
            "WITH customers AS (SELECT 99 AS tenant_id) SELECT tenant_id FROM customers",
        )
        .await;
    assert_eq!(r, vec![vec![Some("99".to_string())]]);
    // support sees no ssn column at all.
    let r = db.rows("support", "SELECT * FROM customers").await;
    assert_eq!(r[0].len(), 5);
    assert!(r.iter().all(|row| !row.iter().any(|v| v
        .as_deref()
        .is_some_and(|s| s.contains('-') && s.len() == 11))));
}

#[tokio::test]
async fn predicates_never_run_on_hidden_rows() {
    let db = fresh(&[("writer.toml", WRITER)]).await;
    // Tenant 1's ssns become integers; tenant 2's stay non-numeric, so a cast evaluated on
    // one of their rows would raise an error echoing their ssn.
    db.client
        .batch_execute("UPDATE customers SET ssn = id::text WHERE tenant_id = 1")
        .await
        .unwrap();
    let r = db
        .rows(
            "billing",
            "SELECT id FROM customers WHERE CAST(ssn AS int) > 0",
        )
        .await;
    assert_eq!(r.len(), 5);
    // Division by zero on another tenant's id.
    let other = db.cid(2).await;
    let r = db
        .rows(
            "billing",
            &format!("SELECT id FROM customers WHERE 1 / (id - {other}) IS NOT NULL"),
        )
        .await;
    assert_eq!(r.len(), 5);
    let r = db.rows("billing", &format!("SELECT c.id FROM customers c JOIN invoices i ON 1 / (i.customer_id - {other}) IS NOT NULL AND i.customer_id = c.id")).await;
    assert_eq!(r.len(), 5);
    // Same for UPDATE/DELETE targets.
    let sql = db.must(
        "writer",
        "UPDATE customers SET name = name WHERE CAST(ssn AS int) > 0",
    );
    db.client
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let sql = db.must(
        "writer",
        &format!("DELETE FROM invoices WHERE 1 / (customer_id - {other}) = 42"),
    );
    db.client
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn writes_stay_in_tenant() {
    let db = fresh(&[("writer.toml", WRITER)]).await;
    // UPDATE without WHERE changes only tenant 1.
    let sql = db.must("billing", "UPDATE customers SET name = 'mine'");
    db.client.batch_execute(&sql).await.unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE name = 'mine' AND tenant_id <> 1")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE name = 'mine'")
            .await,
        5
    );
    // INSERT gets the preset tenant.
    let sql = db.must(
        "billing",
        "INSERT INTO customers (name, email) VALUES ('new', 'n@x') RETURNING tenant_id",
    );
    let r = db.raw(&sql).await.unwrap();
    assert_eq!(r[0][0].as_deref(), Some("1"));
    // Preset columns cannot be written at all by billing.
    assert!(db
        .rewrite(
            "billing",
            1,
            "INSERT INTO customers (tenant_id, name) VALUES (2, 'x')"
        )
        .is_err());
    assert!(db
        .rewrite("billing", 1, "UPDATE customers SET tenant_id = 2")
        .is_err());
    // writer has no presets: the database checks the row, also for bound parameters.
    let sql = db.must(
        "writer",
        "INSERT INTO customers (tenant_id, name) VALUES ($1, $2)",
    );
    let err = db
        .client
        .execute(sql.as_str(), &[&2i64, &"evil"])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("may not insert this row into customers"));
    db.client
        .execute(sql.as_str(), &[&1i64, &"fine"])
        .await
        .unwrap();
    let err = db
        .raw(&db.must(
            "writer",
            "INSERT INTO customers (tenant_id, name) SELECT 2, 'x'",
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    // Moving a row to another tenant is refused by the check.
    let mine = db.cid(1).await;
    let other = db.cid(2).await;
    let err = db
        .raw(&db.must(
            "writer",
            &format!("UPDATE customers SET tenant_id = 2 WHERE id = {mine}"),
        ))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    // Updating someone else's row is a no-op.
    let r = db
        .raw(&db.must(
            "writer",
            &format!("UPDATE customers SET name = 'x' WHERE id = {other} RETURNING id"),
        ))
        .await
        .unwrap();
    assert!(r.is_empty());
    // DELETE only reaches own rows.
    db.raw(&db.must("writer", "DELETE FROM invoices"))
        .await
        .unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM invoices WHERE tenant_id = 2")
            .await,
        5
    );
    assert_eq!(
        db.count("SELECT count(*) FROM invoices WHERE tenant_id = 1")
            .await,
        0
    );
    // Writable CTE.
    let r = db.rows("writer", "WITH x AS (UPDATE customers SET email = 'w' RETURNING tenant_id) SELECT count(*), max(tenant_id) FROM x").await;
    assert_eq!(r[0][1].as_deref(), Some("1"));
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE email = 'w' AND tenant_id <> 1")
            .await,
        0
    );
    // UPDATE ... FROM and DELETE ... USING read through barriers.
    db.raw(&db.must(
        "writer",
        "UPDATE customers c SET name = 'joined' FROM invoices i WHERE i.customer_id = c.id OR true",
    ))
    .await
    .unwrap();
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE name = 'joined' AND tenant_id <> 1")
            .await,
        0
    );
}

#[tokio::test]
async fn upsert_cannot_touch_other_tenants() {
    let db = fresh(&[("writer.toml", WRITER)]).await;
    let (mine, other) = (db.cid(1).await, db.cid(2).await);
    let sql = db.must("billing", &format!("INSERT INTO customers (id, name) VALUES ({other}, 'hijack') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"));
    let err = db.raw(&sql).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE name = 'hijack'")
            .await,
        0
    );
    // Own row: fine.
    let sql = db.must("billing", &format!("INSERT INTO customers (id, name) VALUES ({mine}, 'mine') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name"));
    db.raw(&sql).await.unwrap();
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM customers WHERE name = 'mine' AND id = {mine}"
        ))
        .await,
        1
    );
    // Moving the row to another tenant through DO UPDATE fails the check.
    let sql = db.must("writer", &format!("INSERT INTO customers (id, tenant_id, name) VALUES ({mine}, 1, 'x') ON CONFLICT (id) DO UPDATE SET tenant_id = 2"));
    let err = db.raw(&sql).await.unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM customers WHERE id = {mine} AND tenant_id = 1"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn cursors_prepare_explain_params() {
    let db = fresh(&[]).await;
    let declare = db.must(
        "billing",
        "DECLARE c CURSOR FOR SELECT tenant_id FROM invoices",
    );
    let r = db
        .raw(&format!("BEGIN; {declare}; FETCH ALL FROM c; COMMIT"))
        .await
        .unwrap();
    assert!(
        !r.is_empty() && r.iter().all(|row| row[0].as_deref() == Some("1")),
        "{r:?}"
    );
    let prepare = db.must(
        "billing",
        "PREPARE p(bigint) AS SELECT tenant_id FROM customers WHERE id = $1",
    );
    let other = db.cid(2).await;
    let exec = db.must("billing", &format!("EXECUTE p({other})"));
    let r = db.raw(&format!("{prepare}; {exec}")).await.unwrap();
    assert!(r.is_empty(), "{r:?}");
    let r = db
        .rows(
            "billing",
            "EXPLAIN SELECT * FROM customers WHERE 1 / (id - 100000) IS NOT NULL",
        )
        .await;
    assert!(!r.is_empty());
    // ANALYZE would count the rows the filter removes.
    assert!(db
        .rewrite("billing", 1, "EXPLAIN ANALYZE SELECT * FROM customers")
        .is_err());
    // Extended protocol: parameters stay parameters with the right types.
    let sql = db.must("billing", "SELECT tenant_id FROM customers WHERE id = $1");
    assert!(db
        .client
        .query(sql.as_str(), &[&other])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        db.client
            .query(sql.as_str(), &[&db.cid(1).await])
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn point_lookup_keeps_index_scan() {
    let db = fresh(&[]).await;
    db.client
        .batch_execute("INSERT INTO customers (tenant_id, name) SELECT 3, 'bulk' || g FROM generate_series(1, 20000) g; ANALYZE customers;")
        .await
        .unwrap();
    // Filtered in place (a top-level point lookup) and behind the barrier (a predicate that
    // could raise needs it; the leakproof `id = 3` is copied inside): both use the index.
    for lookup in [
        "SELECT name FROM customers WHERE id = 3",
        "SELECT name FROM customers WHERE id = 3 AND 1 / (id - 4) = -1",
    ] {
        let sql = db.must("billing", lookup);
        let plan = db.raw(&format!("EXPLAIN {sql}")).await.unwrap();
        let text: String = plan
            .iter()
            .filter_map(|r| r[0].clone())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("Index Scan using customers_pkey"),
            "{sql}\n{text}"
        );
    }
    // The service's own predicate stays above the barrier: it is a filter of the subquery
    // scan, never of the scan of the base table (where it could see other tenants' rows).
    let sql = db.must(
        "billing",
        "SELECT name FROM customers WHERE 1 / (id - 424242) IS NOT NULL AND name <> 'x'",
    );
    let plan = db.raw(&format!("EXPLAIN {sql}")).await.unwrap();
    let lines: Vec<String> = plan.iter().filter_map(|r| r[0].clone()).collect();
    let base = lines
        .iter()
        .position(|l| {
            l.contains("Scan on customers customers_1")
                || l.contains("Scan using")
                || l.contains("Bitmap Heap Scan")
        })
        .unwrap_or_else(|| panic!("no base scan:\n{}", lines.join("\n")));
    assert!(
        lines[..base]
            .iter()
            .any(|l| l.contains("Subquery Scan on customers")),
        "{}",
        lines.join("\n")
    );
    assert!(
        lines[base..]
            .iter()
            .all(|l| !l.contains("424242") && !l.contains("'x'")),
        "user predicate below the barrier:\n{}",
        lines.join("\n")
    );
}

#[tokio::test]
async fn copy_out_is_filtered() {
    let db = fresh(&[("writer.toml", WRITER)]).await;
    let sql = db.must("writer", "COPY customers (id, tenant_id) TO STDOUT");
    assert!(sql.starts_with("COPY (SELECT"), "{sql}");
    // The inner query is the rewritten one: run it directly.
    let inner = sql
        .trim_start_matches("COPY (")
        .rsplit_once(") TO STDOUT")
        .unwrap()
        .0;
    let r = db.raw(inner).await.unwrap();
    assert!(!r.is_empty() && r.iter().all(|row| row[1].as_deref() == Some("1")));
    let copy_in = db.must(
        "writer",
        "COPY customers (tenant_id, name) FROM STDIN WITH (FORMAT csv)",
    );
    assert!(copy_in.contains("WHERE pgward.assert_row"), "{copy_in}");
    // The server accepts the statement (enters COPY IN); dropping the sink aborts it.
    let sink = db
        .client
        .copy_in::<_, bytes::Bytes>(copy_in.as_str())
        .await
        .unwrap_or_else(|e| panic!("{copy_in}: {e:?}"));
    drop(sink);
    assert!(
        db.rewrite("billing", 1, "COPY customers TO STDOUT")
            .is_err(),
        "copy needs allow.copy"
    );
}

#[tokio::test]
async fn driver_catalog_queries_work() {
    let db = fresh(&[]).await;
    // tokio-postgres' own type lookup query.
    let sql = db.must(
        "support",
        "SELECT t.typname, t.typtype, t.typelem, r.rngsubtype, t.typbasetype, n.nspname, t.typrelid FROM pg_catalog.pg_type t \
         LEFT OUTER JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid INNER JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid WHERE t.oid = $1",
    );
    let rows = db.client.query(sql.as_str(), &[&20u32]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "int8");
    let sql = db.must("support", "SELECT attname, atttypid FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND NOT attisdropped AND attnum > 0 ORDER BY attnum");
    db.client.query(sql.as_str(), &[&1259u32]).await.unwrap();
    for q in [
        "SELECT 1",
        "SELECT version()",
        "SET extra_float_digits = 3",
        "SHOW server_version",
        "SELECT relname FROM pg_class WHERE relkind = 'r'",
    ] {
        db.rows("support", q).await;
    }
    assert!(db
        .rewrite("support", 1, "SELECT reltuples FROM pg_class")
        .is_err());
    assert!(db.rewrite("support", 1, "SELECT * FROM pg_stats").is_err());
    assert!(db
        .rewrite("support", 1, "SELECT last_value FROM customers_id_seq")
        .is_err());
}

// ------------------------------------------------------------------ differential vs RLS

/// Tiny deterministic generator of SELECTs over the demo schema.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }

    fn query(&mut self) -> String {
        let filters = [
            "c.id > 3",
            "i.amount_cents < 9000",
            "i.status = 'paid'",
            "c.name LIKE 'Customer 1%'",
            "i.tenant_id = 2",
            "c.tenant_id IN (1, 2)",
            "i.customer_id IN (SELECT id FROM customers WHERE id % 2 = 0)",
            "EXISTS (SELECT 1 FROM invoices x WHERE x.customer_id = c.id AND x.status = 'open')",
            "true",
        ];
        let shape = self.next() % 4;
        let f1 = self.pick(&filters);
        let f2 = self.pick(&filters);
        match shape {
            0 => {
                let cols = self.pick(&["c.id, c.name", "c.tenant_id, c.email", "c.*", "c.ssn", "c.id, i.id, i.amount_cents"]);
                format!("SELECT {cols} FROM customers c JOIN invoices i ON i.customer_id = c.id WHERE {f1} AND {f2}")
            }
            1 => {
                let agg = self.pick(&["count(*)", "sum(i.amount_cents)", "max(c.name)", "count(DISTINCT c.tenant_id)"]);
                let g = self.pick(&["i.status", "c.tenant_id", "i.tenant_id"]);
                format!("SELECT {g}, {agg} FROM customers c LEFT JOIN invoices i ON i.customer_id = c.id WHERE {f1} GROUP BY {g}")
            }
            2 => {
                let cols = self.pick(&["i.id, i.status", "i.card_number", "i.*", "i.tenant_id, i.amount_cents"]);
                format!("SELECT {cols} FROM invoices i LEFT JOIN customers c ON c.id = i.customer_id WHERE {f1} OR {f2}")
            }
            _ => format!("SELECT c.id FROM customers c WHERE {f1} UNION SELECT i.customer_id FROM invoices i JOIN customers c ON c.id = i.customer_id WHERE {f2}"),
        }
    }
}

#[tokio::test]
async fn differential_against_postgres_rls() {
    let db = fresh(&[]).await;
    let rls = cli::export_rls(&db.engine);
    db.client
        .batch_execute("CREATE ROLE billing NOLOGIN; CREATE ROLE support NOLOGIN; CREATE ROLE analytics NOLOGIN;")
        .await
        .ok(); // roles are cluster-wide: may exist from another test database
    db.client
        .batch_execute(&rls)
        .await
        .unwrap_or_else(|e| panic!("{rls}\n{e}"));
    let mut gen = Gen(0x9e3779b97f4a7c15);
    let mut compared = 0;
    for _ in 0..150 {
        let q = gen.query();
        for (service, tenant) in [("billing", 1), ("support", 2), ("analytics", 0)] {
            let Ok(sql) = db.rewrite(service, tenant, &q) else {
                continue;
            }; // refusing is always acceptable
            let mine = db.raw(&sql).await;
            let theirs = db
                .raw(&format!(
                    "SET ROLE {service}; SET app.tenant_id = '{tenant}'; {q}; "
                ))
                .await;
            db.raw("RESET ROLE").await.unwrap();
            let (mine, mut theirs) = match (mine, theirs) {
                (Ok(m), Ok(t)) => (m, t),
                (Err(_), Err(_)) => continue, // an invalid generated query fails both ways
                (Err(e), Ok(_)) => {
                    panic!("pgward's rewrite failed where RLS ran: {service}: {q}\n=> {sql}\n{e:?}")
                }
                // pgward expands `*` to the visible columns; RLS + column GRANTs refuse it.
                (Ok(_), Err(e))
                    if q.contains(".*") && e.code().is_some_and(|c| c.code() == "42501") =>
                {
                    continue
                }
                (Ok(_), Err(e)) => {
                    panic!("RLS failed where pgward allowed: {service}: {q}\n=> {sql}\n{e:?}")
                }
            };
            let mut mine = mine;
            mine.sort();
            theirs.sort();
            assert_eq!(mine, theirs, "{service} tenant {tenant}: {q}");
            compared += 1;
        }
    }
    assert!(compared > 100, "only {compared} comparisons");
}

#[tokio::test]
async fn orm_and_driver_shapes_run() {
    let db = fresh(&[]).await;
    let mine = db.cid(1).await;
    let other = db.cid(2).await;
    // Row locks through the barrier.
    let sql = db.must(
        "billing",
        "SELECT id FROM customers WHERE id = $1 FOR UPDATE",
    );
    assert_eq!(
        db.client.query(sql.as_str(), &[&mine]).await.unwrap().len(),
        1
    );
    assert!(db
        .client
        .query(sql.as_str(), &[&other])
        .await
        .unwrap()
        .is_empty());
    // DEFAULT columns dropped, RETURNING works.
    let sql = db.must(
        "billing",
        "INSERT INTO customers (id, name, email) VALUES (DEFAULT, $1, $2) RETURNING id, tenant_id",
    );
    let row = db
        .client
        .query_one(sql.as_str(), &[&"orm", &"orm@x"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(1), 1);
    // pgjdbc's type lookup.
    let sql = db.must(
        "support",
        "SELECT typinput='pg_catalog.array_in'::regproc as is_array, typtype, typname, pg_type.oid FROM pg_catalog.pg_type \
         LEFT JOIN (select ns.oid as nspoid, ns.nspname, r.r from pg_namespace as ns join ( select s.r, (current_schemas(false))[s.r] as nspname \
         from generate_series(1, array_upper(current_schemas(false), 1)) as s(r) ) as r using ( nspname ) ) as sp ON sp.nspoid = typnamespace \
         WHERE typname = $1 ORDER BY sp.r, pg_type.oid DESC LIMIT 1",
    );
    let row = db.client.query_one(sql.as_str(), &[&"int4"]).await.unwrap();
    assert_eq!(row.get::<_, String>(2), "int4");
    // Refusals carry SQLSTATE 42501 and the rule.
    let c = claims(1);
    let denied = db
        .engine
        .rewrite(
            &PolicyIdentity {
                service: "support",
                claims: &c,
            },
            "SELECT ssn FROM customers",
        )
        .unwrap_err();
    assert_eq!(denied.sqlstate, "42501");
    assert!(
        denied
            .message
            .starts_with("pgward: service \"support\" may not read column customers.ssn ("),
        "{}",
        denied.message
    );
}

#[tokio::test]
async fn cli_tools_work_against_a_database() {
    let db = fresh(&[]).await;
    let dir = std::path::PathBuf::from("policies");
    let out = cli::run_check(&cli::CheckArgs {
        dir: dir.clone(),
        database_url: db.url.clone(),
    })
    .await
    .unwrap();
    assert!(out.contains("analytics, billing, support"), "{out}");
    let out = cli::run_explain(&cli::ExplainArgs {
        dir: dir.clone(),
        database_url: db.url.clone(),
        service: "support".into(),
        claims: vec!["tenant_id=2".into()],
        sql: "SELECT ssn FROM customers".into(),
    })
    .await
    .unwrap();
    assert!(
        out.starts_with("REFUSED (42501)") && out.contains("rule: support.toml:"),
        "{out}"
    );
    let out = cli::run_test(&cli::TestArgs {
        dir: dir.clone(),
        tests: dir.join("tests"),
        database_url: db.url.clone(),
    })
    .await
    .unwrap();
    assert!(out.lines().all(|l| l.starts_with("ok")), "{out}");
    let rls = cli::run_export_rls(&cli::ExportRlsArgs {
        dir,
        database_url: db.url.clone(),
    })
    .await
    .unwrap();
    assert!(rls.contains("ENABLE ROW LEVEL SECURITY"));
    // A broken policy directory is reported with file and line.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("x.toml"),
        "[tables.customers]\nactions = [\"select\"]\ncolumns = [\"nope\"]\n",
    )
    .unwrap();
    let err = cli::run_check(&cli::CheckArgs {
        dir: bad.path().to_path_buf(),
        database_url: db.url.clone(),
    })
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("x.toml:3: unknown column customers.nope"),
        "{err}"
    );
}
