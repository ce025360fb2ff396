use super::*;
use crate::crypto::config::EncryptColumn;
use crate::crypto::manager::CachePolicy;
use crate::keys::local::LocalProvider;
use crate::keys::SecretKey;
use crate::sql::catalog::Catalog;
use crate::sql::parse::parse_statements;

/// Encryption of the demo's personal columns under a local key (unit tests).
pub(crate) async fn enc() -> SqlEncryption {
    let col = |table: &str, column: &str, ty, searchable| EncryptColumn {
        table: table.into(),
        column: column.into(),
        key: "pii".into(),
        ty,
        searchable,
        context_claim: None,
        bind_primary_key: false,
    };
    let manager = Arc::new(
        KeyManager::new(
            Arc::new(LocalProvider::from_key(SecretKey::from_bytes([3; 32]))),
            None,
            &[
                col("customers", "email", ClientType::Text, true),
                col("customers", "ssn", ClientType::Text, false),
                col("invoices", "card_number", ClientType::Text, true),
                col("users", "email", ClientType::Text, true),
                col("t", "n", ClientType::Int4, true),
            ],
            CachePolicy {
                ttl: std::time::Duration::from_secs(60),
                max_stale: std::time::Duration::from_secs(60),
                blocking_threshold: 1 << 20,
            },
        )
        .unwrap(),
    );
    assert!(manager.prefetch().await.is_empty());
    SqlEncryption::new(manager)
}

pub(super) fn run(enc: &SqlEncryption, sql: &str) -> Result<(String, Outcome), Refused> {
    let mut stmts = parse_statements(sql).unwrap();
    for st in &mut stmts {
        crate::sql::parse::sanitize(st).unwrap();
    }
    let outcome = enc.transform(&mut stmts, None, &crate::crypto::scope::KeyScope::default())?;
    let text = stmts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    for st in text.split("; ") {
        assert!(crate::sql::parse::round_trips(st), "{st}");
    }
    Ok((text, outcome))
}

#[tokio::test]
async fn literals_are_encrypted_and_blind_indexed() {
    let e = enc().await;
    let (sql, out) = run(
        &e,
        "INSERT INTO customers (name, email, ssn) VALUES ('Ann', 'ann@x.example', '123-45-6789')",
    )
    .unwrap();
    assert!(out.touched && out.encrypted_literals && out.params.is_none());
    assert!(!sql.contains("ann@x") && !sql.contains("123-45"), "{sql}");
    assert!(sql.contains("(name, email, ssn, email_bidx)"), "{sql}");
    assert_eq!(sql.matches("::BYTEA").count(), 3, "{sql}");
    // Fresh ciphertext each time: the same text never yields the same statement.
    let (again, _) = run(
        &e,
        "INSERT INTO customers (name, email, ssn) VALUES ('Ann', 'ann@x.example', '123-45-6789')",
    )
    .unwrap();
    assert_ne!(sql, again);
}

#[tokio::test]
async fn parameters_get_a_plan_and_added_blind_index_parameters() {
    let e = enc().await;
    let (sql, out) = run(
        &e,
        "INSERT INTO customers (tenant_id, email) VALUES ($1, $2) ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email",
    )
    .unwrap();
    assert!(!out.encrypted_literals);
    assert!(
        sql.contains("VALUES ($1, CAST($2 AS BYTEA), CAST($3 AS BYTEA))"),
        "{sql}"
    );
    assert!(sql.contains("ON CONFLICT(email_bidx)"), "{sql}");
    assert!(sql.contains("email_bidx = EXCLUDED.email_bidx"), "{sql}");
    let plan = out.params.unwrap();
    assert_eq!(plan.client_count, 2);
    assert_eq!(plan.params[0], (0, ParamUse::Plain));
    assert!(matches!(&plan.params[1], (1, ParamUse::Encrypt(c)) if c.column == "email"));
    assert!(matches!(&plan.params[2], (1, ParamUse::BlindIndex(c)) if c.column == "email"));
    assert_eq!(plan.client_type_oid(1), Some(25));
}

#[tokio::test]
async fn equality_predicates_use_the_blind_index() {
    let e = enc().await;
    let (sql, out) = run(
        &e,
        "SELECT c.email, ssn AS s FROM customers c WHERE c.email = 'a@b' AND email IN ($1, 'c@d') AND ssn IS NOT NULL",
    )
    .unwrap();
    assert!(!sql.contains("a@b") && !sql.contains("c@d"), "{sql}");
    assert!(sql.contains("c.email_bidx = E'\\\\x"), "{sql}");
    // A parameter is searched under both index roots (pgward adds the second parameter).
    assert!(
        sql.contains("email_bidx IN (CAST($1 AS BYTEA), CAST($2 AS BYTEA), E'"),
        "{sql}"
    );
    assert!(sql.contains("ssn IS NOT NULL"), "{sql}");
    // The index root may rotate before the statement runs again: never cached.
    assert!(out.encrypted_literals);
    let plan = out.params.unwrap();
    assert_eq!(plan.client_count, 1);
    assert!(matches!(&plan.params[0], (0, ParamUse::BlindIndex(c)) if c.column == "email"));
    assert!(matches!(&plan.params[1], (0, ParamUse::PreviousBlindIndex(c)) if c.column == "email"));
    let (sql, _) = run(&e, "SELECT 1 FROM customers WHERE email <> $1").unwrap();
    assert!(
        sql.contains("email_bidx NOT IN (CAST($1 AS BYTEA), CAST($2 AS BYTEA))"),
        "{sql}"
    );
    let (_, out) = run(&e, "SELECT 1 FROM t WHERE n <> -5").unwrap();
    assert!(out.touched);
    let (sql, out) = run(&e, "SELECT id FROM orders WHERE note LIKE 'x%'").unwrap();
    assert!(!out.touched && sql.contains("LIKE 'x%'"));
}

#[tokio::test]
async fn computing_on_ciphertext_is_refused() {
    let e = enc().await;
    for sql in [
        "SELECT * FROM customers WHERE email LIKE 'a%'",
        "SELECT * FROM customers ORDER BY email",
        "SELECT email, count(*) FROM customers GROUP BY email",
        "SELECT DISTINCT email FROM customers",
        "SELECT lower(email) FROM customers",
        "SELECT * FROM customers WHERE ssn = 'x'",
        "SELECT * FROM t WHERE n > 3",
        "SELECT * FROM customers c JOIN invoices i ON c.email = i.card_number",
        "SELECT email FROM customers UNION SELECT card_number FROM invoices",
        "UPDATE customers SET email = lower('X')",
        "UPDATE customers SET (email, name) = ('a', 'b')",
        "INSERT INTO customers (email) SELECT 'x'",
        "INSERT INTO customers (email_bidx) VALUES ('x')",
        "INSERT INTO customers (email, name) VALUES ($1, $1)",
        "COPY customers FROM STDIN",
        "SELECT * FROM customers, users WHERE email = 'x'",
        "INSERT INTO t (n) VALUES ('not a number')",
        "SELECT (SELECT email FROM customers LIMIT 1)",
        "SELECT id FROM invoices WHERE card_number IN (SELECT email FROM customers)",
    ] {
        let r = run(&e, sql).unwrap_err();
        assert!(["0A000", "22P02"].contains(&r.sqlstate), "{sql}: {r:?}");
        assert!(
            !r.message.contains("'x'") && !r.message.contains("not a number"),
            "{sql}: {}",
            r.message
        );
    }
    // Allowed: selection, IS NULL, DDL.
    for sql in [
        "SELECT email AS e, customers.ssn FROM customers WHERE email IS NULL",
        "SELECT * FROM customers c JOIN customers d ON c.email = d.email",
        "ALTER TABLE customers ADD COLUMN x int",
        "DELETE FROM customers WHERE email = $1 RETURNING ssn",
    ] {
        run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
    }
    // Writes nested in a query are encrypted too.
    let (sql, out) = run(
        &e,
        "WITH x AS (INSERT INTO customers (email) VALUES ('cte@x.example') RETURNING id) SELECT id FROM x",
    )
    .unwrap();
    assert!(out.encrypted_literals && !sql.contains("cte@x"), "{sql}");
    let (sql, _) = run(
        &e,
        "WITH x AS (UPDATE customers SET ssn = 'cte-ssn' WHERE email = 'a' RETURNING id) SELECT count(*) FROM x",
    )
    .unwrap();
    assert!(
        !sql.contains("cte-ssn") && sql.contains("email_bidx ="),
        "{sql}"
    );
    for sql in ["SELECT 1", "SELECT email FROM customers WHERE id = 1"] {
        run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
    }
}

#[tokio::test]
async fn computing_on_ciphertext_through_derived_tables_and_ctes_is_refused() {
    let e = enc().await;
    for sql in [
        "SELECT length(x.e) FROM (SELECT email AS e FROM customers) x",
        "SELECT length(e) FROM (SELECT email AS e FROM customers) x",
        "SELECT upper(x.email) FROM (SELECT email FROM customers) x",
        "SELECT length(y.email) FROM (SELECT * FROM customers) y",
        "SELECT length(y.email) FROM (SELECT c.* FROM customers c) y",
        "SELECT length(z.e) FROM (SELECT x.e FROM (SELECT email AS e FROM customers) x) z",
        "WITH x AS (SELECT email AS e FROM customers) SELECT length(e) FROM x",
        "WITH x AS (SELECT email FROM customers) SELECT * FROM x ORDER BY x.email",
        "SELECT * FROM (SELECT email AS e FROM customers) x WHERE x.e LIKE 'a%'",
        "SELECT x.e FROM (SELECT email AS e FROM customers) x WHERE x.e = 'a@b'",
        "SELECT a FROM (SELECT email FROM customers) AS x(a)",
        "SELECT count(DISTINCT x.e) FROM (SELECT email AS e FROM customers) x",
        "SELECT length(l.e) FROM customers c, LATERAL (SELECT c.email AS e) l",
    ] {
        let r = run(&e, sql).unwrap_err();
        assert_eq!(r.sqlstate, "0A000", "{sql}: {r:?}");
        assert!(!r.message.contains("a@b"), "{sql}: {}", r.message);
    }
    // Selecting through them, testing IS NULL, and searching through `*` (the blind
    // index comes along) still work.
    for sql in [
        "SELECT x.e FROM (SELECT email AS e FROM customers) x",
        "SELECT e FROM (SELECT email AS e FROM customers) x WHERE e IS NOT NULL",
        "WITH x AS (SELECT email FROM customers) SELECT email FROM x",
        "SELECT y.email FROM (SELECT * FROM customers) y WHERE y.email = 'a@b'",
        "SELECT n FROM (SELECT length(name) AS n FROM customers) x ORDER BY n",
    ] {
        run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
    }
    let (sql, _) = run(
        &e,
        "SELECT y.email FROM (SELECT * FROM customers) y WHERE y.email = 'a@b'",
    )
    .unwrap();
    assert!(
        sql.contains("y.email_bidx =") && !sql.contains("a@b"),
        "{sql}"
    );
}

/// `customers.ssn` bound to its row's primary key (`id bigint`), with the catalog that says so.
pub(super) async fn bound_enc() -> (SqlEncryption, Catalog) {
    let col = |column: &str, searchable, bind| EncryptColumn {
        table: "customers".into(),
        column: column.into(),
        key: "pii".into(),
        ty: ClientType::Text,
        searchable,
        context_claim: None,
        bind_primary_key: bind,
    };
    let manager = Arc::new(
        KeyManager::new(
            Arc::new(LocalProvider::from_key(SecretKey::from_bytes([4; 32]))),
            None,
            &[col("email", true, false), col("ssn", false, true)],
            CachePolicy {
                ttl: std::time::Duration::from_secs(60),
                max_stale: std::time::Duration::from_secs(60),
                blocking_threshold: 1 << 20,
            },
        )
        .unwrap(),
    );
    assert!(manager.prefetch().await.is_empty());
    let column = |name: &str, ty: &str| crate::sql::ColumnInfo {
        name: name.into(),
        type_name: ty.into(),
        type_oid: 0,
        not_null: false,
    };
    let catalog = Catalog::from_tables(vec![crate::sql::catalog::TableInfo {
        schema: "public".into(),
        name: "customers".into(),
        oid: 1,
        kind: crate::sql::RelKind::Table,
        columns: vec![
            column("id", "bigint"),
            column("name", "text"),
            column("email", "bytea"),
            column("email_bidx", "bytea"),
            column("ssn", "bytea"),
        ],
        primary_key: vec!["id".into()],
    }]);
    (SqlEncryption::new(manager), catalog)
}

pub(super) fn run_bound(
    enc: &SqlEncryption,
    catalog: &Catalog,
    sql: &str,
) -> Result<(String, Outcome), Refused> {
    let mut stmts = parse_statements(sql).unwrap();
    let outcome = enc.transform(
        &mut stmts,
        Some(catalog),
        &crate::crypto::scope::KeyScope::default(),
    )?;
    let text = stmts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    assert!(crate::sql::parse::round_trips(&text), "{text}");
    Ok((text, outcome))
}

/// The ciphertexts embedded in a rewritten statement, in order.
fn embedded(text: &str) -> Vec<Vec<u8>> {
    text.split("E'\\\\x")
        .skip(1)
        .filter_map(|rest| hex::decode(&rest[..rest.find('\'')?]).ok())
        .collect()
}

#[tokio::test]
async fn literal_writes_are_bound_to_the_primary_key_they_supply() {
    let (enc, catalog) = bound_enc().await;
    let scope = crate::crypto::scope::KeyScope::default();
    let (text, _) = run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, name, ssn) VALUES (05, 'a', '123-45')",
    )
    .unwrap();
    let ct = embedded(&text).pop().unwrap();
    assert_eq!(ct[0], crate::crypto::envelope::FORMAT_ROW_BOUND);
    let m = &enc.manager;
    // `05` is bound as PostgreSQL prints it: `5`.
    assert_eq!(
        m.decrypt_row("customers", "ssn", &scope, Some("5"), &ct)
            .await
            .unwrap(),
        b"123-45"
    );
    assert!(matches!(
        m.decrypt_row("customers", "ssn", &scope, Some("6"), &ct)
            .await,
        Err(CryptoError::Integrity { .. })
    ));
    // Without the key (a serial default) the value is sealed unbound, as documented.
    let (text, _) = run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (name, ssn) VALUES ('a', '1')",
    )
    .unwrap();
    assert_eq!(embedded(&text)[0][0], crate::crypto::envelope::FORMAT_V1);
    // Unbound columns of the same table stay unbound.
    let (text, _) = run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, email) VALUES (7, 'e')",
    )
    .unwrap();
    assert_eq!(embedded(&text)[0][0], crate::crypto::envelope::FORMAT_V1);
    // UPDATE … WHERE id = v binds; another predicate does not; a new key is refused.
    let (text, _) = run_bound(
        &enc,
        &catalog,
        "UPDATE customers SET ssn = '9' WHERE id = 7 AND name = 'a'",
    )
    .unwrap();
    let ct = embedded(&text).pop().unwrap();
    assert!(m
        .decrypt_row("customers", "ssn", &scope, Some("7"), &ct)
        .await
        .is_ok());
    let (text, _) = run_bound(
        &enc,
        &catalog,
        "UPDATE customers SET ssn = '9' WHERE name = 'a'",
    )
    .unwrap();
    assert_eq!(embedded(&text)[0][0], crate::crypto::envelope::FORMAT_V1);
    let refused =
        run_bound(&enc, &catalog, "UPDATE customers SET id = 8 WHERE id = 7").unwrap_err();
    assert!(
        refused.message.contains("cannot be changed"),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn parameter_writes_name_the_parameter_holding_the_key() {
    let (enc, catalog) = bound_enc().await;
    let (_, out) = run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, ssn, email) VALUES ($1, $2, $3)",
    )
    .unwrap();
    let plan = out.params.unwrap();
    assert_eq!(
        plan.row_keys,
        vec![(
            1,
            RowKey::Param {
                index: 0,
                ty: PkType::Int
            }
        )]
    );
    let (_, out) = run_bound(
        &enc,
        &catalog,
        "UPDATE customers SET ssn = $1 WHERE customers.id = '12'",
    )
    .unwrap();
    assert_eq!(
        out.params.unwrap().row_keys,
        vec![(0, RowKey::Literal("12".into()))]
    );
    // A literal value for a parameter key cannot be sealed here.
    assert!(run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, ssn) VALUES ($1, 'x')"
    )
    .is_err());
    // ON CONFLICT on another column must not copy a value bound to the inserted row.
    let refused = run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, email, ssn) VALUES (1, 'e', 's') ON CONFLICT (email) DO UPDATE SET ssn = EXCLUDED.ssn",
    )
    .unwrap_err();
    assert!(
        refused.message.contains("EXCLUDED.ssn"),
        "{}",
        refused.message
    );
    assert!(run_bound(
        &enc,
        &catalog,
        "INSERT INTO customers (id, ssn) VALUES (1, 's') ON CONFLICT (id) DO UPDATE SET ssn = EXCLUDED.ssn",
    )
    .is_ok());
}

#[tokio::test]
async fn reads_of_bound_columns_carry_the_row_key() {
    let (enc, catalog) = bound_enc().await;
    let check = |sql: &str, needles: &[&str], keys: usize| {
        let (text, out) = run_bound(&enc, &catalog, sql).unwrap();
        for n in needles {
            assert!(text.contains(n), "{n} not in {text}");
        }
        assert_eq!(out.params.map_or(0, |p| p.result_keys), keys, "{text}");
    };
    check(
        "SELECT name, ssn FROM customers WHERE id = 1",
        &[r#"SELECT name, ssn, "customers"."id"::TEXT AS "pgward_rk:ssn" FROM"#],
        1,
    );
    check(
        "SELECT c.ssn AS s, * FROM customers c",
        &[r#""c"."id"::TEXT AS "pgward_rk:s", "c"."id"::TEXT AS "pgward_rk:ssn""#],
        2,
    );
    check(
        "SELECT x.s FROM (SELECT ssn AS s FROM customers) AS x",
        &[
            r#"SELECT ssn AS s, "customers"."id"::TEXT AS "pgward_dk:s" FROM customers"#,
            r#"SELECT x.s, "x"."pgward_dk:s" AS "pgward_rk:s" FROM"#,
        ],
        1,
    );
    check(
        "WITH c AS (SELECT * FROM customers) SELECT ssn FROM c",
        &[
            r#"SELECT *, "customers"."id"::TEXT AS "pgward_dk:ssn" FROM customers"#,
            r#"SELECT ssn, "c"."pgward_dk:ssn" AS "pgward_rk:ssn" FROM c"#,
        ],
        1,
    );
    check(
        "INSERT INTO customers (id, ssn) VALUES (1, 'x') RETURNING id, ssn",
        &[r#"RETURNING id, ssn, "customers"."id"::TEXT AS "pgward_rk:ssn""#],
        1,
    );
    check(
        "SELECT email FROM customers",
        &["SELECT email FROM customers"],
        0,
    );
}

#[tokio::test]
async fn a_three_part_name_is_the_table_it_names() {
    let e = enc().await;
    let (sql, out) = run(
        &e,
        "INSERT INTO app.public.customers (name, email) VALUES ('Ann', 'three-part@x.example')",
    )
    .unwrap();
    assert!(out.touched && out.encrypted_literals, "{sql}");
    assert!(!sql.contains("three-part@x"), "{sql}");
    let refused = run(&e, "SELECT length(email) FROM app.public.customers");
    assert!(
        refused.is_err(),
        "a computation on it is refused as on customers"
    );
}

#[tokio::test]
async fn a_cursors_query_gets_the_transform_a_select_gets() {
    let e = enc().await;
    // A search through a cursor compares blind indexes, as the SELECT would.
    let (sql, out) = run(
        &e,
        "DECLARE c CURSOR WITH HOLD FOR SELECT id, email FROM customers WHERE email = 'ann@x.example'",
    )
    .unwrap();
    assert!(out.touched, "{sql}");
    assert!(!sql.contains("ann@x"), "no plaintext upstream: {sql}");
    assert!(
        sql.starts_with("DECLARE c CURSOR WITH HOLD FOR SELECT id, email FROM customers WHERE email_bidx = E'\\\\x"),
        "{sql}"
    );
    assert_eq!(out.accessed, vec![vec!["customers.email".to_string()]]);
    // A parameter searched through a cursor (psycopg's server-side cursors) is planned.
    let (sql, out) = run(
        &e,
        "DECLARE c CURSOR FOR SELECT email FROM customers WHERE email = $1",
    )
    .unwrap();
    assert!(sql.contains("email_bidx IN (CAST($1 AS BYTEA)"), "{sql}");
    assert!(out.params.is_some(), "{sql}");
    // Computations on ciphertext are refused in a cursor as in a SELECT.
    for refused in [
        "DECLARE c CURSOR FOR SELECT length(email) FROM customers",
        "DECLARE c BINARY CURSOR FOR SELECT id FROM customers ORDER BY ssn",
        "DECLARE c CURSOR FOR SELECT email_bidx FROM customers",
    ] {
        assert!(run(&e, refused).is_err(), "{refused}");
    }
}
