//! Real client programs through pgward: psql scripts, pgbench, and psycopg 3 (a non-Rust driver
//! that uses the extended protocol by default).

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{self, ProxyOptions};

fn server_binary(name: &str) -> PathBuf {
    pgward::pgserver::find_bindir()
        .expect("PostgreSQL binaries")
        .join(name)
}

pub(crate) fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const PSQL_SCRIPT: &str = r#"
\set ON_ERROR_STOP 0
\pset pager off
create temp table t(a int primary key, b text);
insert into t select g, 'row ' || g from generate_series(1, 20) g;
select count(*), min(b), max(a) from t;
select a, b from t where a % 5 = 0 order by a;
select 1/0;
select 'after error' as status;
begin;
update t set b = upper(b) where a <= 3 returning a, b;
rollback;
\copy t from stdin
100	hundred
101	hundred and one
\.
select * from t where a >= 100 order by a;
select 1 as one \gset
\echo one is :one
select 'multi' as x; select 'statement' as y;
\d t
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_output_is_identical_direct_and_through_pgward() {
    let db = harness::fresh_database("psql", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let pg = harness::postgres();
    let psql = server_binary("psql");
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), PSQL_SCRIPT).unwrap();
    let run_psql = |host: String, port: u16, user: &str, password: Option<String>| {
        let mut cmd = Command::new(&psql);
        cmd.args([
            "-X",
            "-q",
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            &db,
            "-f",
        ])
        .arg(script.path())
        .env("PGSSLMODE", "prefer");
        if let Some(password) = password {
            cmd.env("PGPASSWORD", password);
        }
        run(&mut cmd)
    };
    let (_, direct_out, direct_err) = run_psql(
        pg.socket_dir.display().to_string(),
        pg.port,
        "postgres",
        None,
    );
    let proxy_port = proxy.addr.port();
    let token = harness::token("app", serde_json::json!({}));
    let (_, proxied_out, proxied_err) = tokio::task::block_in_place(|| {
        run_psql("127.0.0.1".into(), proxy_port, "app", Some(token))
    });
    assert!(
        direct_out.contains("one is 1") && direct_out.contains("hundred and one"),
        "{direct_out}"
    );
    // A temp schema is named after the backend's slot (`pg_temp_4`), which depends on how
    // many other sessions the shared server has at that moment: not part of the comparison.
    assert_eq!(
        without_temp_schema(&proxied_out),
        without_temp_schema(&direct_out)
    );
    // Error lines name the script line; both runs produced the same ones.
    assert_eq!(proxied_err, direct_err);
}

/// `pg_temp_<n>` → `pg_temp_N`, and a line naming one loses its leading spaces: psql centres a
/// table's title (`Table "pg_temp_4.t"`), so its padding depends on the number's width too.
fn without_temp_schema(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|line| match line.contains("pg_temp_") {
            true => temp_schema_numbers_erased(line.trim_start()),
            false => line.to_owned(),
        })
        .collect()
}

fn temp_schema_numbers_erased(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("pg_temp_") {
        out.push_str(&rest[..at]);
        out.push_str("pg_temp_N");
        rest = rest[at + "pg_temp_".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

#[test]
fn temp_schema_titles_compare_equal_whatever_the_backend_slot() {
    let narrow = "   Table \"pg_temp_4.t\"\n a | b\n";
    let wide = "    Table \"pg_temp_12.t\"\n a | b\n";
    assert_eq!(without_temp_schema(narrow), without_temp_schema(wide));
    assert_ne!(
        without_temp_schema(narrow),
        without_temp_schema("Table \"s.t\"\n a | b\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_simple_extended_and_prepared_modes() {
    let db = harness::fresh_database("bench", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let pgbench = server_binary("pgbench");
    let token = harness::token("app", serde_json::json!({}));
    let port = proxy.addr.port().to_string();
    let base = |args: &[&str]| {
        let mut cmd = Command::new(&pgbench);
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "app"])
            .args(args)
            .arg(&db)
            .env("PGPASSWORD", &token);
        cmd
    };
    let (ok, _, err) = tokio::task::block_in_place(|| run(&mut base(&["-i", "-s", "1", "-q"])));
    assert!(ok, "pgbench -i through pgward: {err}");
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out, err) = tokio::task::block_in_place(|| {
            run(&mut base(&[
                "-S", "-c", "4", "-j", "2", "-t", "200", "-M", mode,
            ]))
        });
        assert!(ok, "pgbench -M {mode}: {err}");
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "{mode}: {out}"
        );
    }
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(&mut base(&[
            "-c", "4", "-j", "2", "-t", "50", "-M", "prepared",
        ]))
    });
    assert!(
        ok && out.contains("200/200"),
        "read-write pgbench: {out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_extended_protocol_pipeline_copy_and_errors() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let token = harness::token("app", serde_json::json!({}));
    let dsn = format!(
        "host=127.0.0.1 port={} user=app dbname=postgres password={token} sslmode=disable",
        proxy.addr.port()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/psycopg_smoke.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3").arg(&script).env("PGWARD_DSN", &dsn))
    });
    assert!(
        ok,
        "psycopg checks failed (install with `pip install 'psycopg[binary]'`):\n{out}\n{err}"
    );
    assert!(out.contains("all checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_binary_extended_protocol_over_tls() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let database = harness::fresh_database("asyncpg", false).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/asyncpg_smoke.py");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("python3")
            .arg(&script)
            .env("PGWARD_PORT", proxy.addr.port().to_string())
            .env("PGWARD_TOKEN", harness::token("app", serde_json::json!({})))
            .env("PGWARD_DATABASE", &database))
    });
    assert!(
        ok,
        "asyncpg checks failed (install with `pip install asyncpg`):\n{out}\n{err}"
    );
    assert!(out.contains("all checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_simple_extended_prepared_and_pooled_over_tls() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let database = harness::fresh_database("nodepg", false).await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/node");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(Command::new("node")
            .arg(dir.join("pg_smoke.js"))
            .current_dir(&dir)
            .env("PGWARD_PORT", proxy.addr.port().to_string())
            .env("PGWARD_TOKEN", harness::token("app", serde_json::json!({})))
            .env("PGWARD_DATABASE", &database))
    });
    assert!(
        ok,
        "node-postgres checks failed (scripts/test.sh runs `npm install` in tests/drivers/node):\n{out}\n{err}"
    );
    assert!(out.contains("all checks passed"));
}
