//! The audit log's two speeds that matter:
//! * append: N concurrent appenders, each awaiting durability (write + fdatasync,
//!   group-committed) before its next append — the proxy's hot path. Files go to a temp dir
//!   on the machine's real disk.
//! * search: `pgward audit search` filters over a log of a million records (the auditor's
//!   "fast on millions of records").
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgward::audit::{
    search::{search, SearchArgs},
    AuditConfig, AuditEvent, AuditLog, Decision, Protocol, SessionInfo, SqlText, StatementRecord,
};

const PER_ITER: u64 = 800;

fn event(s: &Arc<SessionInfo>, i: u64) -> AuditEvent {
    let mut st = StatementRecord::new(
        s.clone(),
        Protocol::Extended,
        SqlText::new(
            &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}"),
            false,
        ),
    );
    st.touched_mut().tables_read = vec!["pgbench_accounts".into()];
    st.touched_mut().columns_read = vec![
        "pgbench_accounts.abalance".into(),
        "pgbench_accounts.aid".into(),
    ];
    AuditEvent::Statement(Box::new(st))
}

fn bench_append(c: &mut Criterion) {
    #[allow(clippy::expect_used)]
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("audit_append");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(PER_ITER));
    for appenders in [1u64, 8, 64] {
        #[allow(clippy::expect_used)]
        let dir = tempfile::tempdir().expect("tempdir");
        #[allow(clippy::expect_used)]
        let (log, handle) = rt
            .block_on(AuditLog::open(AuditConfig::new(dir.path())))
            .expect("open");
        group.bench_function(format!("{appenders}_concurrent"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for t in 0..appenders {
                        let h = handle.clone();
                        tasks.push(tokio::spawn(async move {
                            let s = Arc::new(SessionInfo {
                                session_id: t,
                                service: "pgbench".into(),
                                database: "bench".into(),
                                client_addr: "127.0.0.1:5000".into(),
                                ..SessionInfo::default()
                            });
                            for i in 0..iters * PER_ITER / appenders {
                                let _ = h.append(event(&s, i)).await;
                            }
                        }));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                    start.elapsed()
                })
            })
        });
        let stats = handle.stats();
        eprintln!(
            "{appenders} appenders: {} records, {} fsyncs, {:.1} records/fsync",
            stats.records,
            stats.fsyncs,
            stats.records as f64 / stats.fsyncs.max(1) as f64
        );
        let _ = rt.block_on(log.shutdown());
    }
    group.finish();
}

/// The statement's own cost of auditing: building and serialising an Execute's record (session
/// with claims, two bound parameters) and handing it to the writer (`append_nowait`, what the
/// completion path does), and the same record written to the log as a statement's record is
/// before the statement is forwarded (`fsync = false`: serialise, chain, one write), and one
/// transaction's records as the proxy makes them (that record with the session's fields
/// serialised once, and its completion queued).
fn bench_serialise(c: &mut Criterion) {
    #[allow(clippy::expect_used)]
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    #[allow(clippy::expect_used)]
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = AuditConfig::new(dir.path());
    config.fsync = false;
    #[allow(clippy::expect_used)]
    let (log, handle) = rt.block_on(AuditLog::open(config)).expect("open");
    let mut claims = serde_json::Map::new();
    claims.insert("tenant_id".into(), serde_json::json!(42));
    claims.insert("region".into(), serde_json::json!("eu-west"));
    let session = Arc::new(SessionInfo {
        session_id: 1,
        service: "billing".into(),
        database: "shop".into(),
        client_addr: "10.1.2.3:50000".into(),
        token_id: Some("0b9f7a52-5d35-4c5e-9d7e-3f0e4d0c8a11".into()),
        claims_used: claims,
        upstream_role: Some("billing_rw".into()),
        backend_pid: Some(4242),
        application_name: Some("billing-api".into()),
        ..SessionInfo::default()
    });
    let text = SqlText::new(
        "SELECT id, total FROM invoices WHERE customer_id = $1 AND status = $2",
        false,
    );
    let fingerprint: Arc<str> = pgward::sql::fingerprint::fingerprint(text.redacted()).into();
    // What the statement touches: built once per prepared statement and shared by the
    // records of its executions, as the proxy does.
    let mut touched = pgward::audit::Touched::default();
    touched.tables_read = vec!["public.invoices".into()];
    touched.columns_read = vec!["invoices.id".into(), "invoices.total".into()];
    touched.command_class = vec!["READ"];
    let touched = Arc::new(touched);
    const N: u64 = 1000;
    let mut group = c.benchmark_group("audit_serialise");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(N));
    // An Execute's record as the proxy builds it from its prepared statement's entry.
    let execute_record = || {
        let mut st = StatementRecord::with_fingerprint(
            session.clone(),
            Protocol::Extended,
            text.clone(),
            fingerprint.clone(),
        );
        st.touched = touched.clone();
        st.params = vec![
            pgward::audit::BoundParam::plain(23, Some(b"1234")),
            pgward::audit::BoundParam::plain(25, Some(b"open")),
        ];
        AuditEvent::Statement(Box::new(st))
    };
    group.bench_function("execute_record", |b| {
        b.iter(|| {
            for _ in 0..N {
                handle.append_nowait(execute_record());
            }
        })
    });
    // The statement record on the proxy's path with `fsync = false`: serialised, framed into
    // the chain and written to the file before the statement may be forwarded.
    group.bench_function("statement_written", |b| {
        b.iter(|| {
            rt.block_on(async {
                for _ in 0..N {
                    let _ = handle.append_staged(vec![execute_record()], false).await;
                }
            })
        })
    });
    // One transaction's records as the proxy makes them: the session's fields serialised once
    // per session, the statement's record written before it is forwarded, and its completion
    // queued with the server's answer (written with the next statement's record).
    #[allow(clippy::expect_used)]
    let session_json = pgward::audit::statement_session_json(&session).expect("session json");
    let proxied_record = || {
        let mut event = execute_record();
        if let AuditEvent::Statement(st) = &mut event {
            st.session_json = Some(session_json.clone());
        }
        event
    };
    let service: Arc<str> = session.service.as_str().into();
    group.bench_function("transaction_records", |b| {
        b.iter(|| {
            rt.block_on(async {
                for _ in 0..N {
                    let seq = match handle.append_staged(vec![proxied_record()], false).await {
                        Ok((seqs, _)) => seqs.first().copied().unwrap_or(0),
                        Err(_) => 0,
                    };
                    handle.append_nowait(AuditEvent::StatementCompleted {
                        session_id: session.session_id,
                        service: service.clone(),
                        statement_seq: seq,
                        rows: Some(1),
                        command: Some("SELECT".into()),
                        duration: Duration::from_micros(180),
                        sqlstate: None,
                        skipped: false,
                        suspended: false,
                    });
                }
            })
        })
    });
    group.finish();
    let _ = rt.block_on(log.shutdown());
}

/// Records in the searched log: a million under `cargo bench`; a few thousand when
/// `cargo test --all-targets` runs the benchmarks once as a smoke test (debug build).
fn search_records() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        5_000
    }
}

/// A log of `search_records()` statement records from 50 services, 1% refused, written with
/// the real writer (without fsync: only the content matters here).
fn write_search_log(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let mut config = AuditConfig::new(dir);
    config.fsync = false;
    #[allow(clippy::expect_used)]
    let (log, handle) = rt.block_on(AuditLog::open(config)).expect("open");
    let sessions: Vec<Arc<SessionInfo>> = (0..50)
        .map(|s| {
            Arc::new(SessionInfo {
                session_id: s,
                service: format!("service-{s}"),
                database: "app".into(),
                client_addr: "10.0.0.1:5000".into(),
                ..SessionInfo::default()
            })
        })
        .collect();
    rt.block_on(async {
        for chunk in 0..search_records() / 1000 {
            let events = (0..1000)
                .map(|i| {
                    let n = chunk * 1000 + i;
                    let AuditEvent::Statement(mut st) = event(&sessions[(n % 50) as usize], n)
                    else {
                        unreachable!()
                    };
                    if n % 100 == 0 {
                        st.decision = Decision::Refused;
                        st.rule = Some("policies/s.toml:3".into());
                    }
                    AuditEvent::Statement(st)
                })
                .collect();
            let _ = handle.append_all(events).await;
        }
    });
    let _ = rt.block_on(log.shutdown());
}

/// Whether a name filter on the command line (`cargo bench --bench audit -- audit_serialise`)
/// excludes every benchmark of `group`: then its setup (a million-record log) is skipped too.
fn filtered_out(group: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-') && !a.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .collect();
    !filters.is_empty()
        && !filters
            .iter()
            .any(|f| group.contains(f.as_str()) || f.contains(group))
}

fn bench_search(c: &mut Criterion) {
    if filtered_out("audit_search_1M") {
        return;
    }
    #[allow(clippy::expect_used)]
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    #[allow(clippy::expect_used)]
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    write_search_log(&rt, dir.path());
    eprintln!(
        "wrote {} records in {:.1?}",
        search_records(),
        started.elapsed()
    );
    let mut group = c.benchmark_group("audit_search_1M");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(search_records()));
    let base = SearchArgs {
        paths: vec![dir.path().to_path_buf()],
        ..SearchArgs::default()
    };
    let filters: [(&str, SearchArgs); 4] = [
        (
            "service",
            SearchArgs {
                service: Some("service-7".into()),
                ..base.clone()
            },
        ),
        (
            "refused",
            SearchArgs {
                decision: Some("refused".into()),
                ..base.clone()
            },
        ),
        (
            "table",
            SearchArgs {
                table: Some("pgbench_accounts".into()),
                limit: 0,
                ..base.clone()
            },
        ),
        (
            "text",
            SearchArgs {
                text: Some("aid = ?".into()),
                service: Some("service-3".into()),
                ..base.clone()
            },
        ),
    ];
    for (name, args) in filters {
        group.bench_function(name, |b| b.iter(|| search(&args, &mut std::io::sink())));
    }
    group.finish();
}

criterion_group!(benches, bench_serialise, bench_append, bench_search);
criterion_main!(benches);
