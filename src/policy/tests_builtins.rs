//! Unit tests of what the rewriter accepts from the server's catalog: built-in functions,
//! operators and types classified by `sql::routines`, and syntax sqlparser reads as calls.
use std::path::Path;
use std::sync::Arc;

use super::tests::demo_catalog;
use super::*;
use crate::sql::routines::{ProcRow, Routines, TypeRow};

fn proc(oid: u32, name: &str, vol: char, lang: &str, types: &[&str]) -> ProcRow {
    ProcRow {
        oid,
        name: name.into(),
        kind: 'f',
        volatility: vol,
        language: lang.into(),
        types: types.iter().map(|t| t.to_string()).collect(),
    }
}

/// A small slice of a real `pg_catalog`, enough for the families the corpus met.
fn routines() -> Routines {
    let procs = [
        proc(1, "pi", 'i', "internal", &["float8"]),
        proc(2, "current_user", 's', "internal", &["name"]),
        proc(
            3,
            "text_pattern_lt",
            'i',
            "internal",
            &["text", "text", "bool"],
        ),
        proc(4, "textregexeq", 'i', "internal", &["text", "text", "bool"]),
        proc(5, "query_to_xml", 's', "internal", &["text", "bool"]),
        proc(6, "pg_read_file", 'v', "internal", &["text", "text"]),
        proc(
            7,
            "has_table_privilege",
            's',
            "internal",
            &["text", "text", "bool"],
        ),
        proc(
            8,
            "pg_relation_size",
            'v',
            "internal",
            &["regclass", "int8"],
        ),
        proc(9, "current_setting", 's', "internal", &["text", "text"]),
    ];
    let ops = [
        ("~<~".to_string(), 3),
        ("~".to_string(), 4),
        ("?#".to_string(), 5),
    ];
    let t = |name: &str, kind| TypeRow {
        name: name.into(),
        kind,
    };
    let types = [
        t("inet", 'b'),
        t("point", 'b'),
        t("money", 'b'),
        t("tsvector", 'b'),
        t("int4", 'b'),
        t("timestamp", 'b'),
        t("numeric", 'b'),
        t("interval", 'b'),
        t("time", 'b'),
        t("regclass", 'b'),
        t("regtype", 'b'),
    ];
    Routines::classify(&procs, &ops, &types)
}

fn rw(sql: &str) -> Result<String, PolicyDenied> {
    rw_as("billing", sql)
}

fn rw_as(service: &str, sql: &str) -> Result<String, PolicyDenied> {
    let catalog = demo_catalog().with_routines(routines());
    let e = PolicyEngine::load(Path::new("policies"), Arc::new(catalog), &[]).unwrap();
    let mut c = serde_json::Map::new();
    c.insert("tenant_id".into(), serde_json::json!(1));
    e.rewrite(
        &PolicyIdentity {
            service,
            claims: &c,
        },
        sql,
    )
    .map(|r| r.sql.clone())
}

fn ok(sql: &str) -> String {
    rw(sql).unwrap_or_else(|e| panic!("{sql}: refused: {}", e.message))
}

fn refused(sql: &str) -> String {
    match rw(sql) {
        Ok(s) => panic!("{sql}: should be refused, got {s}"),
        Err(e) => e.message,
    }
}

#[test]
fn catalog_classified_functions_are_callable() {
    ok("SELECT pi(), current_user, pg_catalog.pi() FROM customers");
    ok("SELECT id FROM customers WHERE name = current_user");
    // Settings the service may SHOW are readable the way asyncpg reads them.
    ok("SELECT current_setting('jit'), pg_catalog.current_setting('TimeZone', true)");
    ok("SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new");
    ok("SELECT set_config('jit', $1, false)");
}

#[test]
fn functions_that_read_or_escape_stay_refused() {
    for sql in [
        "SELECT query_to_xml('select * from secrets', true) FROM customers",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT has_table_privilege('secrets', 'select')",
        "SELECT pg_relation_size('customers')",
        "SELECT current_setting('data_directory')",
        "SELECT current_setting('search_path' || '')",
        "SELECT set_config('search_path', 'evil', false)",
        "SELECT set_config('client_encoding', 'SJIS', false)",
        "SELECT set_config('jit', current_setting('data_directory'), false)",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT public.pi() FROM customers",
        "SELECT \"PI\"() FROM customers",
    ] {
        let m = refused(sql);
        assert!(m.contains("may not call function"), "{sql}: {m}");
    }
}

#[test]
fn operators_from_the_catalog() {
    ok("SELECT id FROM customers WHERE name ~<~ 'm'");
    ok("SELECT id FROM customers WHERE name OPERATOR(pg_catalog.~) '^a'");
    for sql in [
        "SELECT id FROM customers WHERE name OPERATOR(pg_catalog.?#) 'x'",
        "SELECT id FROM customers WHERE name OPERATOR(public.~) 'x'",
        "SELECT id FROM customers WHERE name ~>=~ 'x'",
    ] {
        let m = refused(sql);
        assert!(m.contains("operator"), "{sql}: {m}");
    }
}

#[test]
fn type_names_resolve_like_the_server() {
    for sql in [
        "SELECT CAST(created_at AS \"timestamp\") FROM customers",
        "SELECT CAST(id AS \"numeric\"), '1 day'::\"interval\", '10:00'::\"time\" FROM customers",
        "SELECT id::pg_catalog.int4, id::int, id::integer, name::varchar(10) FROM customers",
        "SELECT '10.0.0.1'::inet, '(1,2)'::point, '1.50'::money, name::tsvector FROM customers",
        "SELECT '{10.0.0.1}'::inet[], 'int4'::regtype",
    ] {
        ok(sql);
    }
    for sql in [
        "SELECT 'postgres'::regrole",
        "SELECT id::public.int4 FROM customers",
        "SELECT id::\"INT4\" FROM customers",
        "SELECT id::customers FROM customers",
    ] {
        let m = refused(sql);
        assert!(m.contains("cast to"), "{sql}: {m}");
    }
}

#[test]
fn array_subquery_and_row_are_not_calls() {
    let out = ok("SELECT ARRAY(SELECT id FROM customers) AS ids");
    assert!(
        out.contains("OFFSET 0"),
        "ARRAY() subquery not rewritten: {out}"
    );
    ok("SELECT id FROM customers WHERE ROW(id, tenant_id) = ROW(1, 2)");
    // The subquery inside ARRAY() is held to the policy like any other.
    let m = rw_as("support", "SELECT ARRAY(SELECT ssn FROM customers)")
        .expect_err("hidden column inside ARRAY()")
        .message;
    assert!(m.contains("ssn"), "{m}");
    // Quoted names are calls of functions of that name.
    refused("SELECT \"array\"(SELECT id FROM customers)");
    refused("SELECT \"row\"(id) FROM customers");
}

#[test]
fn table_statement_is_read_as_select_star() {
    let out = ok("TABLE customers");
    assert!(out.contains("OFFSET 0") || out.contains("WHERE"), "{out}");
    let m = rw_as("support", "TABLE customers").map(|s| s.contains("ssn"));
    assert_eq!(
        m.ok(),
        Some(false),
        "support's TABLE customers must not show ssn"
    );
}

#[test]
fn unparsable_and_unsupported_constructs_are_named_in_plain_words() {
    for (sql, needle) in [
        (
            "SELECT U&\"d\\0061ta\" FROM customers",
            "Unicode-escaped identifiers",
        ),
        ("MOVE NEXT FROM c", "MOVE"),
        (
            "UPDATE customers SET name = 'x' WHERE CURRENT OF c",
            "WHERE CURRENT OF",
        ),
        (
            "SELECT * FROM ROWS FROM (generate_series(1, 2)) AS x",
            "ROWS FROM",
        ),
        ("SELECT (c).* FROM customers c", "(composite).*"),
        (
            "SELECT id FROM customers TABLESAMPLE BERNOULLI (10)",
            "TABLESAMPLE",
        ),
        ("SELECT id FROM ONLY customers", "FROM ONLY"),
        ("VACUUM customers", "VACUUM statements"),
        ("CREATE EXTENSION dblink", "CREATE EXTENSION statements"),
    ] {
        let m = refused(sql);
        assert!(m.contains(needle), "{sql}: {m}");
        for vague in ["Expected", "found:", "this kind of", "this FROM syntax"] {
            assert!(!m.contains(vague), "{sql}: {m}");
        }
    }
}

#[test]
fn default_for_a_preset_column_in_every_row_is_left_to_the_preset() {
    // Django writes DEFAULT for fields with a database default, the preset tenant_id included.
    let out = ok("INSERT INTO customers (tenant_id, name) VALUES (DEFAULT, 'a'), (DEFAULT, 'b')");
    assert!(out.contains("(1)"), "the preset supplies tenant_id: {out}");
    let m = refused("INSERT INTO customers (tenant_id, name) VALUES (DEFAULT, 'a'), (5, 'b')");
    assert!(m.contains("preset column"), "{m}");
    let m = refused("INSERT INTO customers (tenant_id, name) VALUES (2, 'a')");
    assert!(m.contains("preset column"), "{m}");
}
