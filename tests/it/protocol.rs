//! Protocol fidelity: scripted raw message sequences must get the same responses from
//! PostgreSQL directly and through pgward; real drivers work unchanged.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};

use crate::harness::{self, msg, ProxyOptions, Received};

/// One step of a script: bytes to send, then how much to read back.
enum Step {
    /// Send, then read until this many ReadyForQuery messages.
    UntilReady(Vec<Bytes>, usize),
    /// Send, then read exactly this many messages (for Flush without Sync).
    Messages(Vec<Bytes>, usize),
}

async fn run_script<S>(client: &mut harness::RawClient<S>, script: &[Step]) -> Vec<Received>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let mut out = Vec::new();
    for step in script {
        match step {
            Step::UntilReady(parts, n) => {
                client.send(&msg::batch(parts)).await;
                out.extend(client.until_ready(*n).await);
            }
            Step::Messages(parts, n) => {
                client.send(&msg::batch(parts)).await;
                for _ in 0..*n {
                    let m = client.recv().await.expect("message after flush");
                    out.push((m.tag(), m.body().to_vec()));
                }
            }
        }
    }
    out
}

/// Run a script directly and through pgward; the responses must be identical.
async fn differential(name: &str, script: Vec<Step>) {
    let db = harness::fresh_database("diff", true).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let mut direct = harness::raw_direct(&db).await;
    let mut proxied = harness::raw_proxied(&proxy, &db).await;
    let expected = run_script(&mut direct, &script).await;
    let actual = run_script(&mut proxied, &script).await;
    let show = |r: &[Received]| -> Vec<String> {
        r.iter()
            .map(|(t, b)| format!("{} {}", *t as char, String::from_utf8_lossy(b)))
            .collect()
    };
    assert_eq!(
        show(&actual),
        show(&expected),
        "script {name}: responses differ"
    );
    assert!(!expected.is_empty());
}

#[tokio::test]
async fn failed_parse_does_not_register_the_statement_name() {
    use msg::*;
    differential(
        "failed parse",
        vec![
            Step::UntilReady(vec![parse("s1", "select nonsense from"), sync()], 1),
            Step::UntilReady(
                vec![
                    parse("s1", "select 1 as one"),
                    bind("", "s1", &[], false),
                    execute("", 0),
                    sync(),
                ],
                1,
            ),
            Step::UntilReady(vec![parse("s1", "select 2"), sync()], 1),
        ],
    )
    .await;
}

#[tokio::test]
async fn fast_path_function_calls_for_an_unrestricted_service() {
    use msg::*;
    // 1397 = abs(int4): a value, then NULL (strict: NULL result); an unknown oid is an
    // ErrorResponse followed by one ReadyForQuery; the session goes on.
    differential(
        "function call",
        vec![
            Step::UntilReady(vec![function_call(1397, &[Some("-42")])], 1),
            Step::UntilReady(vec![function_call(1397, &[None])], 1),
            Step::UntilReady(vec![function_call(4_000_000_000, &[])], 1),
            Step::UntilReady(vec![query("select 1")], 1),
        ],
    )
    .await;
}

#[tokio::test]
async fn several_unnamed_statements_in_one_batch() {
    use msg::*;
    differential(
        "unnamed batch",
        vec![Step::UntilReady(
            vec![
                parse("", "select $1::int + 1"),
                bind("", "", &[Some("41")], false),
                execute("", 0),
                parse("", "select 'x'::text || $1"),
                bind("", "", &[Some("y")], false),
                execute("", 0),
                parse("", "select generate_series(1, 5)"),
                bind("", "", &[], true),
                execute("", 2),
                execute("", 0),
                sync(),
            ],
            1,
        )],
    )
    .await;
}

#[tokio::test]
async fn describe_statement_on_its_own_and_flush_without_sync() {
    use msg::*;
    differential(
        "describe + flush",
        vec![
            Step::UntilReady(
                vec![
                    parse("d1", "select $1::int4 as a, now() as b"),
                    describe_statement("d1"),
                    sync(),
                ],
                1,
            ),
            // postgres.js describeFirst: Parse/Describe/Flush must be answered at once.
            Step::Messages(
                vec![
                    parse("d2", "select $1::text"),
                    describe_statement("d2"),
                    flush(),
                ],
                3,
            ),
            Step::UntilReady(vec![sync()], 1),
            Step::UntilReady(
                vec![
                    bind("p", "d2", &[Some("v")], false),
                    describe_portal("p"),
                    execute("p", 0),
                    close_statement("d2"),
                    sync(),
                ],
                1,
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn error_mid_pipeline_then_exactly_one_ready_for_query() {
    use msg::*;
    differential(
        "error mid-pipeline",
        vec![
            Step::UntilReady(
                vec![
                    parse("", "select 1"),
                    bind("", "", &[], false),
                    execute("", 0),
                    parse("", "select 1/0"),
                    bind("", "", &[], false),
                    execute("", 0),
                    parse("", "select 3"),
                    bind("", "", &[], false),
                    execute("", 0),
                    sync(),
                ],
                1,
            ),
            Step::UntilReady(vec![query("select 'still alive'")], 1),
        ],
    )
    .await;
}

#[tokio::test]
async fn extended_protocol_inside_an_explicit_transaction_keeps_status_bytes() {
    use msg::*;
    differential(
        "transaction status",
        vec![
            Step::UntilReady(vec![query("begin; create temp table tx(a int)")], 1),
            Step::UntilReady(
                vec![
                    parse("", "insert into tx values ($1)"),
                    bind("", "", &[Some("1")], false),
                    execute("", 0),
                    sync(),
                ],
                1,
            ),
            Step::UntilReady(
                vec![
                    parse("", "insert into tx values ('bad')"),
                    bind("", "", &[], false),
                    execute("", 0),
                    sync(),
                ],
                1,
            ),
            Step::UntilReady(vec![query("select 1")], 1),
            Step::UntilReady(vec![query("rollback")], 1),
            Step::UntilReady(vec![query("select 1; select 2; select 1/0; select 4")], 1),
        ],
    )
    .await;
}

#[tokio::test]
async fn copy_from_stdin_through_the_extended_protocol_and_copy_fail() {
    use msg::*;
    differential(
        "extended copy",
        vec![
            Step::UntilReady(vec![query("create temp table c(a int, b text)")], 1),
            // The Sync sent during COPY gets no ReadyForQuery until CopyDone.
            Step::Messages(
                vec![
                    parse("", "copy c from stdin"),
                    bind("", "", &[], false),
                    execute("", 0),
                    sync(),
                ],
                3,
            ),
            Step::UntilReady(vec![copy_data(b"1\tone\n2\ttwo\n"), copy_done(), sync()], 1),
            Step::Messages(vec![query("copy c from stdin")], 1),
            Step::UntilReady(
                vec![copy_data(b"3\tthree\n"), copy_fail("client gave up")],
                1,
            ),
            // Expressions, so RowDescription carries no table OID (the two temp tables differ).
            Step::UntilReady(vec![query("select a + 0, b || '' from c order by a")], 1),
            Step::UntilReady(
                vec![query("copy (select * from c order by a) to stdout")],
                1,
            ),
        ],
    )
    .await;
}

/// The SQL suite: same status, column names, types and rows, text and binary formats.
const SQL_SUITE: &[&str] = &[
    "select 1 as one, 'two'::text as two, 3.5::numeric as three, null::int as nothing",
    "select * from customers order by id",
    "select c.name, sum(i.amount_cents) from customers c join invoices i on i.customer_id = c.id group by c.name order by 1",
    "select now()::date = current_date, interval '1 day', '{1,2,3}'::int[], '{\"a\":1}'::jsonb, 'abc'::bytea, true, 1.5::float8",
    "with t as (select generate_series(1, 100) as n) select n, n * n from t where n % 7 = 0",
    "select tenant_id, count(*) from invoices group by 1 order by 1",
    "update invoices set status = status where id < 0",
    "select '2026-01-01 12:00:00+00'::timestamptz, 'x' || repeat('y', 10000)",
    "select pg_typeof(1), current_setting('DateStyle')",
];

#[tokio::test]
async fn sql_suite_is_identical_in_text_and_binary_formats() {
    use msg::*;
    let mut script = Vec::new();
    for sql in SQL_SUITE {
        script.push(Step::UntilReady(vec![query(sql)], 1));
        for binary in [false, true] {
            script.push(Step::UntilReady(
                vec![
                    parse("", sql),
                    describe_statement(""),
                    bind("", "", &[], binary),
                    execute("", 0),
                    sync(),
                ],
                1,
            ));
        }
    }
    differential("sql suite", script).await;
}

#[tokio::test]
async fn tokio_postgres_simple_extended_prepared_and_pipelined() {
    let db = harness::fresh_database("drv", true).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let client = proxy.connect("app", &db).await;
    let messages = client.simple_query("select 1; select 2").await.unwrap();
    let rows = messages
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    let completions = messages
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(
        (rows, completions),
        (2, 2),
        "two rows and two command completions"
    );
    let statement = client
        .prepare("select name from customers where tenant_id = $1 order by id")
        .await
        .unwrap();
    for _ in 0..10 {
        let rows = client.query(&statement, &[&2i64]).await.unwrap();
        assert_eq!(rows.len(), 5);
    }
    // Pipelining: many queries in flight at once on one connection.
    let futures = (0..50i32).map(|i| {
        let client = &client;
        async move {
            client
                .query_one("select $1::int4 * 2", &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::try_join_all(futures).await.unwrap();
    assert_eq!(results, (0..50).map(|i| i * 2).collect::<Vec<_>>());
    let err = client.query("select 1/0", &[]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    assert_eq!(
        client
            .query_one("select 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
}

#[tokio::test]
async fn copy_100_mb_in_and_out_with_backpressure() {
    let db = harness::fresh_database("copy", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let client = proxy.connect("app", &db).await;
    client
        .batch_execute("create table big(line text)")
        .await
        .unwrap();
    let line = format!("{}\n", "x".repeat(1023));
    let lines = 100 * 1024;
    let sink = client.copy_in("copy big from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let chunk = Bytes::from(line.repeat(64));
    for _ in 0..lines / 64 {
        sink.send(chunk.clone()).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, lines as u64);
    let stream = client.copy_out("copy big to stdout").await.unwrap();
    let total: usize = stream
        .map_ok(|b| b.len())
        .try_fold(0, |acc, n| async move { Ok(acc + n) })
        .await
        .unwrap();
    assert_eq!(total, lines * 1024, "100 MiB back out");
}

#[tokio::test]
async fn cancel_reaches_only_the_running_query_of_its_own_session() {
    let db = harness::fresh_database("cancel", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let victim = proxy.connect("app", &db).await;
    let bystander = proxy.connect("app", &db).await;
    let token = victim.cancel_token();
    let slow = tokio::spawn(async move {
        let r = victim.simple_query("select pg_sleep(20)").await;
        (victim, r)
    });
    let other = tokio::spawn(async move {
        let r = bystander
            .simple_query("select pg_sleep(1.5), 'bystander done'")
            .await;
        (bystander, r)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (victim, result) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .unwrap()
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    let (_, other_result) = other.await.unwrap();
    assert!(
        other_result.is_ok(),
        "the other session's query must not be cancelled"
    );
    // A cancel sent while nothing runs must not hit the next query.
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = victim
        .simple_query("select pg_sleep(0.3), 'later query survives'")
        .await;
    assert!(r.is_ok(), "{r:?}");
    // A forged key cancels nothing.
    let forged = harness::raw_tcp(proxy.addr).await;
    drop(forged);
    assert!(
        proxy
            .metrics
            .cancels_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn notify_and_listen_are_relayed() {
    let db = harness::fresh_database("notify", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let (listener, mut connection) = proxy
        .client_config("app", &db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
            let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
        }
        futures_util::future::ready(())
    }));
    listener
        .batch_execute("listen pgward_events")
        .await
        .unwrap();
    let notifier = proxy.connect("app", &db).await;
    notifier
        .batch_execute("notify pgward_events, 'hello'")
        .await
        .unwrap();
    let (channel, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (channel.as_str(), payload.as_str()),
        ("pgward_events", "hello")
    );
}

#[tokio::test]
async fn startup_parameters_reach_upstream_and_identity_changes_are_refused() {
    let db = harness::fresh_database("params", false).await;
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let mut config = proxy.client_config("app", &db);
    config
        .application_name("billing-worker")
        .options("-c DateStyle=German -c extra_float_digits=1");
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client
        .simple_query("select current_setting('application_name'), current_setting('DateStyle'), current_setting('extra_float_digits')")
        .await
        .unwrap();
    let Some(tokio_postgres::SimpleQueryMessage::Row(row)) = rows
        .iter()
        .find(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    else {
        panic!("no row")
    };
    assert_eq!(row.get(0), Some("billing-worker"));
    assert_eq!(row.get(1), Some("German, DMY"));
    assert_eq!(row.get(2), Some("1"));
    // (search_path is refused for policy-bound services only: see policy_proxy.)
    for options in [
        "-c role=pg_read_all_data",
        "--session_authorization=postgres",
    ] {
        let mut config = proxy.client_config("app", &db);
        config.options(options);
        let err = config
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{options}"
        );
    }
}

#[tokio::test]
async fn upstream_login_with_scram_md5_password_and_trust() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    for (service, role) in [
        ("app", "postgres"),
        ("md5svc", harness::MD5_ROLE),
        ("passwordsvc", harness::PASSWORD_ROLE),
        ("trustsvc", harness::TRUST_ROLE),
    ] {
        let client = proxy.connect(service, "postgres").await;
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), role, "service {service}");
    }
}

#[tokio::test]
async fn upstream_errors_at_connect_reach_the_client_unchanged() {
    let proxy = harness::start_proxy(ProxyOptions::default()).await;
    let err = proxy
        .client_config("app", "no_such_database")
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
    );
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("no_such_database"));
}
