//! Reads that would hand a client ciphertext, a blind index or something computed from them
//! without naming an encrypted column in a refused position: whole-row references, set
//! operation branches in parentheses, join aliases, array subqueries, sorting and grouping by
//! position or output name, and pgward's own blind-index columns.
use super::tests::{bound_enc, enc, run, run_bound};

/// Each statement is refused with 0A000, and the message names `column`.
async fn refused(cases: &[(&str, &str)]) {
    let e = enc().await;
    for (sql, column) in cases {
        match run(&e, sql) {
            Ok((text, _)) => panic!("not refused: {sql}\n  became: {text}"),
            Err(r) => {
                assert_eq!(r.sqlstate, "0A000", "{sql}: {r:?}");
                assert!(r.message.contains(column), "{sql}: {}", r.message);
                assert!(!r.message.contains("a@b"), "{sql}: {}", r.message);
            }
        }
    }
}

async fn allowed(cases: &[&str]) {
    let e = enc().await;
    for sql in cases {
        run(&e, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
    }
}

#[tokio::test]
async fn whole_row_references_to_relations_with_encrypted_columns_are_refused() {
    refused(&[
        ("SELECT c FROM customers c", "customers.email"),
        ("SELECT c::text FROM customers c", "customers.email"),
        ("SELECT row_to_json(c) FROM customers c", "customers.email"),
        ("SELECT to_jsonb(customers) FROM customers", "customers.email"),
        ("SELECT array_agg(c) FROM customers c", "customers.email"),
        ("SELECT json_agg(c) FROM customers c", "customers.email"),
        ("SELECT md5(c::text) FROM customers c", "customers.email"),
        ("SELECT id FROM customers ORDER BY customers", "customers.email"),
        ("SELECT id FROM customers c WHERE c IS NOT NULL", "customers.email"),
        ("SELECT x FROM (SELECT email FROM customers) x", "customers.email"),
        (
            "SELECT id, length(to_jsonb(c)->>'email') FROM customers c",
            "customers.email",
        ),
        ("SELECT row_to_json(c.*) FROM customers c", "customers.email"),
        ("SELECT ROW(c.*) FROM customers c", "customers.email"),
        ("SELECT (c).email FROM customers c", "customers.email"),
        ("SELECT length((c).email) FROM customers c", "customers.email"),
        (
            "WITH x AS (SELECT email FROM customers) SELECT x FROM x",
            "customers.email",
        ),
        (
            "SELECT i FROM invoices i JOIN customers c ON c.id = i.customer_id",
            "invoices.card_number",
        ),
        (
            "SELECT c FROM orders c WHERE EXISTS (SELECT 1 FROM customers c)",
            "customers.email",
        ),
        (
            "SELECT c FROM customers c WHERE EXISTS (SELECT 1 FROM orders c)",
            "customers.email",
        ),
        (
            "WITH x AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT x FROM x",
            "customers.email",
        ),
        (
            "WITH x AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT length(x.email) FROM x",
            "customers.email",
        ),
    ])
    .await;
    allowed(&[
        "SELECT c.id FROM customers c",
        "SELECT c.* FROM customers c",
        "SELECT count(*) FROM customers",
        "SELECT o FROM orders o JOIN customers c ON c.id = o.customer_id",
        "SELECT row_to_json(o) FROM orders o, customers c WHERE o.customer_id = c.id",
        // A column named like the relation is the column, as in PostgreSQL.
        "SELECT x FROM (SELECT email AS x FROM customers) x",
        "SELECT x.e FROM (SELECT email AS e FROM customers) x",
    ])
    .await;
}

#[tokio::test]
async fn parenthesised_and_wildcard_set_operation_branches_are_refused() {
    refused(&[
        (
            "SELECT length(x.e), x.e FROM ((SELECT email AS e FROM customers WHERE id=4) UNION ALL (SELECT email FROM customers WHERE id=7)) x",
            "customers.email",
        ),
        (
            "(SELECT email FROM customers) UNION ALL (SELECT email FROM customers)",
            "customers.email",
        ),
        (
            "((SELECT email FROM customers)) UNION (SELECT card_number FROM invoices)",
            "customers.email",
        ),
        (
            "SELECT * FROM customers UNION ALL SELECT * FROM customers",
            "customers.email",
        ),
        (
            "SELECT c.* FROM customers c UNION ALL SELECT c.* FROM customers c",
            "customers.email",
        ),
        (
            "SELECT * FROM (SELECT email FROM customers) a UNION ALL SELECT * FROM (SELECT email FROM customers) b",
            "customers.email",
        ),
        (
            "SELECT id, email FROM customers EXCEPT (SELECT id, email FROM customers WHERE id = 1)",
            "customers.email",
        ),
        ("SELECT DISTINCT * FROM customers", "customers.email"),
    ])
    .await;
    allowed(&[
        "(SELECT email FROM customers WHERE id = 1)",
        "(SELECT id FROM customers) UNION ALL (SELECT id FROM invoices)",
        "SELECT e FROM ((SELECT email AS e FROM customers)) x",
    ])
    .await;
}

#[tokio::test]
async fn join_aliases_resolve_and_unresolvable_qualifiers_are_refused() {
    refused(&[
        (
            "SELECT octet_length(j.email), j.email FROM (customers CROSS JOIN (SELECT 1 AS one) o) AS j",
            "customers.email",
        ),
        (
            "SELECT j FROM (customers CROSS JOIN (SELECT 1 AS one) o) AS j",
            "customers.email",
        ),
        (
            "SELECT length(d.email) FROM (SELECT * FROM (customers CROSS JOIN orders)) d",
            "customers.email",
        ),
        (
            "SELECT length(d.email) FROM (SELECT j.* FROM (customers CROSS JOIN orders) AS j) d",
            "customers.email",
        ),
        // The qualifier is not a relation of the statement.
        ("SELECT length(z.email) FROM customers c", "z.email"),
        ("SELECT z.* FROM customers c", "z"),
        // An alias reused in a subquery still names the encrypted table.
        (
            "SELECT length(c.email) FROM customers c WHERE EXISTS (SELECT 1 FROM orders c)",
            "customers.email",
        ),
        // A derived table whose column comes from a derived table visited after it.
        (
            "SELECT (SELECT length(d.q) FROM (SELECT a.x AS q) d) FROM (SELECT email AS x FROM customers) a",
            "customers.email",
        ),
    ])
    .await;
    allowed(&[
        "SELECT j.email, j.one FROM (customers CROSS JOIN (SELECT 1 AS one) o) AS j",
        "SELECT j.name FROM (customers CROSS JOIN (SELECT 1 AS one) o) AS j WHERE j.email = 'a@b'",
        "SELECT c.email, g.x FROM customers c, generate_series(1, 3) AS g(x)",
        "SELECT c.email, u.v FROM customers c, unnest(ARRAY[1, 2]) AS u(v)",
        "SELECT public.customers.email FROM public.customers",
        "INSERT INTO customers (email) VALUES ('a@b') ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email",
    ])
    .await;
}

#[tokio::test]
async fn array_and_other_value_subqueries_are_refused() {
    refused(&[
        (
            "SELECT length(array_to_string(ARRAY(SELECT email FROM customers WHERE id=4),''))",
            "customers.email",
        ),
        (
            "SELECT ARRAY(SELECT email FROM customers)",
            "customers.email",
        ),
        (
            "SELECT ARRAY(SELECT * FROM (SELECT email FROM customers) d)",
            "customers.email",
        ),
        (
            "SELECT (SELECT * FROM (SELECT email FROM customers LIMIT 1) d)",
            "customers.email",
        ),
        (
            "SELECT id FROM customers WHERE email = ANY (SELECT email FROM customers)",
            "customers.email",
        ),
        (
            "INSERT INTO orders (note) SELECT email FROM customers",
            "customers.email",
        ),
        ("SELECT email INTO copied FROM customers", "customers.email"),
    ])
    .await;
    allowed(&[
        "SELECT id FROM customers c WHERE EXISTS (SELECT email FROM customers d WHERE d.id = c.id)",
        "SELECT ARRAY(SELECT id FROM customers)",
    ])
    .await;
}

#[tokio::test]
async fn sorting_and_grouping_by_position_or_output_name_are_refused() {
    refused(&[
        (
            "SELECT id, email FROM customers ORDER BY 2",
            "customers.email",
        ),
        (
            "SELECT email, count(*) FROM customers GROUP BY 1",
            "customers.email",
        ),
        (
            "SELECT email AS e FROM customers ORDER BY e",
            "customers.email",
        ),
        (
            "SELECT email AS name FROM customers ORDER BY name",
            "customers.email",
        ),
        ("SELECT ssn FROM customers ORDER BY 1", "customers.ssn"),
        (
            "SELECT ssn FROM customers ORDER BY (1) DESC",
            "customers.ssn",
        ),
        (
            "SELECT c.ssn AS s FROM customers c ORDER BY s",
            "customers.ssn",
        ),
        (
            "SELECT email AS e, count(*) FROM customers GROUP BY e",
            "customers.email",
        ),
        (
            "SELECT email, count(*) FROM customers GROUP BY ROLLUP (1)",
            "customers.email",
        ),
        ("SELECT * FROM customers ORDER BY 1", "customers"),
        (
            "(SELECT email AS e FROM customers) ORDER BY e",
            "customers.email",
        ),
        (
            "SELECT x.e FROM (SELECT email AS e FROM customers ORDER BY 1) x",
            "customers.email",
        ),
        (
            "SELECT e FROM (SELECT email AS e FROM customers) x ORDER BY 1",
            "customers.email",
        ),
    ])
    .await;
    allowed(&[
        "SELECT id, email FROM customers ORDER BY 1",
        "SELECT id, * FROM customers ORDER BY 1",
        "SELECT email, name AS n FROM customers ORDER BY n, 2",
        "SELECT name, count(*) FROM customers GROUP BY 1",
        "SELECT email FROM customers ORDER BY id",
        "SELECT email, row_number() OVER (ORDER BY 1) FROM customers",
    ])
    .await;
}

#[tokio::test]
async fn naming_a_blind_index_column_is_refused() {
    refused(&[
        ("SELECT email_bidx FROM customers", "blind index"),
        ("SELECT encode(email_bidx, 'hex') FROM customers", "customers.email"),
        ("SELECT email_bidx::text FROM customers", "customers.email"),
        ("SELECT count(DISTINCT email_bidx) FROM customers", "customers.email"),
        (
            "SELECT count(*) FROM customers GROUP BY email_bidx HAVING count(*) > 1",
            "customers.email",
        ),
        ("SELECT id FROM customers ORDER BY email_bidx", "customers.email"),
        (
            "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM customers d WHERE d.email_bidx = c.email_bidx AND d.id <> c.id)",
            "customers.email",
        ),
        (
            "SELECT x.card_number_bidx FROM (SELECT * FROM invoices) x",
            "invoices.card_number",
        ),
        (
            "SELECT c.id FROM customers c JOIN customers d USING (email_bidx)",
            "customers.email",
        ),
        (
            "SELECT id FROM customers WHERE email_bidx IS NULL",
            "customers.email",
        ),
    ])
    .await;
    // pgward's own rewrites name it.
    let e = enc().await;
    let (sql, _) = run(&e, "SELECT id FROM customers WHERE email = 'a@b'").unwrap();
    assert!(sql.contains("email_bidx"), "{sql}");
    let (sql, _) = run(
        &e,
        "INSERT INTO customers (email) VALUES ('a@b') ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email",
    )
    .unwrap();
    assert!(sql.contains("EXCLUDED.email_bidx"), "{sql}");
}

#[tokio::test]
async fn a_function_of_a_whole_row_written_as_a_column_is_refused() {
    // Without a catalog: the built-in functions that take any row.
    refused(&[
        ("SELECT c.to_jsonb FROM customers c", "to_jsonb(c)"),
        ("SELECT c.record_send FROM customers c", "customers.email"),
        (
            "SELECT customers.row_to_json FROM customers",
            "customers.email",
        ),
        ("SELECT c.array_agg FROM customers c", "customers.email"),
        (
            "SELECT c.pg_column_size FROM customers c",
            "customers.email",
        ),
        (
            "SELECT public.customers.to_json FROM public.customers",
            "customers.email",
        ),
        (
            "SELECT id FROM customers c ORDER BY c.hash_record",
            "customers.email",
        ),
        (
            "SELECT d.to_jsonb FROM (SELECT email FROM customers) d",
            "customers.email",
        ),
        (
            "SELECT length(c.e) FROM customers AS c(i, t, n, e)",
            "customers.email",
        ),
    ])
    .await;
    allowed(&[
        "SELECT c.id, c.name FROM customers c",
        "SELECT o.to_jsonb FROM orders o",
    ])
    .await;
    // With one, any name that is not a column.
    let (e, catalog) = bound_enc().await;
    for sql in [
        "SELECT c.summary FROM customers c",
        "SELECT d.other FROM (SELECT email FROM customers) d",
        "SELECT j.summary FROM (customers c CROSS JOIN (SELECT 1 AS one) o) AS j",
        "WITH x AS (SELECT * FROM customers) SELECT x.summary FROM x",
    ] {
        let r = run_bound(&e, &catalog, sql).unwrap_err();
        assert_eq!(r.sqlstate, "0A000", "{sql}: {r:?}");
        assert!(
            r.message.contains("customers.email"),
            "{sql}: {}",
            r.message
        );
    }
    for sql in [
        "SELECT c.name, c.id FROM customers c",
        "SELECT d.n, d.lower, d.email FROM (SELECT email, length(name) AS n, lower(name) FROM customers) d",
        "SELECT j.name, j.one FROM (customers c CROSS JOIN (SELECT 1 AS one) o) AS j",
        "SELECT y.name FROM (SELECT * FROM customers) y WHERE y.email = 'a@b'",
        "WITH x AS (SELECT * FROM customers) SELECT x.name FROM x",
        "SELECT c.email, c.xmin FROM customers c WHERE c.id = 1",
    ] {
        run_bound(&e, &catalog, sql).unwrap_or_else(|r| panic!("{sql}: {r:?}"));
    }
}
