//! Prometheus metrics with fixed, low-cardinality labels.
//!
//! Counters are plain atomics bumped on the hot path; labels come from fixed `&'static str` sets
//! (never SQL text, never a tenant), so the exposition stays small whatever the traffic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

pub mod histogram;

use histogram::{Buckets, Histogram};

/// The buckets of request latencies (globally and per service).
#[derive(Debug)]
pub struct RequestLatency;

impl Buckets for RequestLatency {
    const BOUNDS: &'static [f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ];
}

/// Finer buckets, for what takes tens of microseconds when all is well: an audit fsync on a
/// disk with power-loss protection, the wait for one.
#[derive(Debug)]
pub struct FlushLatency;

impl Buckets for FlushLatency {
    const BOUNDS: &'static [f64] = &[
        0.000_025, 0.000_05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
    ];
}

/// Series another module keeps and renders itself (the key manager's, the audit log's),
/// rendered into `/metrics` with the others: that module depends on this one, not the reverse.
pub trait MetricSet: Send + Sync + std::fmt::Debug {
    /// Appends the set's series, `# HELP` and `# TYPE` lines included, to `out`.
    fn render(&self, out: &mut String);
}

/// How the policy engine's rewrite cache answered (shared by the engine and `/metrics`).
#[derive(Debug, Default)]
pub struct RewriteCounters {
    /// Same text as a cached statement.
    pub exact_hits: AtomicU64,
    /// Same shape (text up to literals) as a cached statement: the template was filled.
    pub shape_hits: AtomicU64,
    /// Rewritten from scratch.
    pub misses: AtomicU64,
}

/// All of pgward's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub rewrites: std::sync::Arc<RewriteCounters>,
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_rejected_limit: AtomicU64,
    pub sessions_established: AtomicU64,
    pub statements: AtomicU64,
    pub statements_refused: AtomicU64,
    pub cancels_forwarded: AtomicU64,
    pub cancels_dropped: AtomicU64,
    /// Cancels handed to the replica their key names, and acknowledged by it.
    pub peer_cancels_sent: AtomicU64,
    /// Cancels that could not be handed to their replica (unreachable, timed out).
    pub peer_cancels_failed: AtomicU64,
    /// Authenticated cancels received from a peer (then delivered like a client's).
    pub peer_cancels_received: AtomicU64,
    /// Peer cancels refused (bad tag, unknown origin, stale, for another node).
    pub peer_cancels_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub upstream_error_responses: AtomicU64,
    pub policy_reloads: AtomicU64,
    pub audit_write_failures: AtomicU64,
    /// Starts that found the audit log behind its externally anchored checkpoint.
    pub audit_truncations_detected: AtomicU64,
    pub policy_reload_failures: AtomicU64,
    /// The series of the key manager and the audit log, when they run.
    sets: Mutex<Vec<std::sync::Arc<dyn MetricSet>>>,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    latency: Histogram<RequestLatency>,
    /// How long responses were held for audit records to become durable.
    durability_wait: Histogram<FlushLatency>,
    /// Per-service statement series (operations block below).
    services: ServiceTable,
}

/// Increment a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Renders `set` with the other series from now on.
    pub fn add_set(&self, set: std::sync::Arc<dyn MetricSet>) {
        self.sets.lock().push(set);
    }

    /// Count a failed authentication under a fixed reason label.
    pub fn auth_failure(&self, reason: &'static str) {
        *self.auth_failures.lock().entry(reason).or_insert(0) += 1;
    }

    /// Failed authentications for one reason (tests and `/metrics`).
    pub fn auth_failures_for(&self, reason: &str) -> u64 {
        self.auth_failures.lock().get(reason).copied().unwrap_or(0)
    }

    /// Record the time from a request batch reaching upstream to its ReadyForQuery.
    pub fn observe_latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed);
    }

    /// Responses were held this long for the audit records of their statements to become
    /// durable (`durability = "before_response"`).
    pub fn observe_durability_wait(&self, elapsed: Duration) {
        self.durability_wait.observe(elapsed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "pgward_audit_write_failures_total",
                "Batches of statement records that could not be made durable.",
                &self.audit_write_failures,
            ),
            (
                "pgward_audit_truncations_detected_total",
                "Starts that found the audit log behind its checkpoint anchored outside the host.",
                &self.audit_truncations_detected,
            ),
            (
                "pgward_policy_reloads_total",
                "Policy sets swapped in (file change, SIGHUP, catalog refresh after DDL).",
                &self.policy_reloads,
            ),
            (
                "pgward_policy_reload_failures_total",
                "Policy reloads rejected as invalid (the previous set stays in force).",
                &self.policy_reload_failures,
            ),
            (
                "pgward_connections_accepted_total",
                "Client connections accepted.",
                &self.connections_accepted,
            ),
            (
                "pgward_connections_rejected_total",
                "Client connections refused by max_client_connections.",
                &self.connections_rejected_limit,
            ),
            (
                "pgward_sessions_established_total",
                "Sessions authenticated and connected upstream.",
                &self.sessions_established,
            ),
            (
                "pgward_statements_total",
                "Statements relayed (simple queries and executes).",
                &self.statements,
            ),
            (
                "pgward_statements_refused_total",
                "Statements refused by pgward.",
                &self.statements_refused,
            ),
            (
                "pgward_cancels_forwarded_total",
                "Cancel requests delivered upstream.",
                &self.cancels_forwarded,
            ),
            (
                "pgward_cancels_dropped_total",
                "Cancel requests dropped (unknown key or query already finished).",
                &self.cancels_dropped,
            ),
            (
                "pgward_protocol_errors_total",
                "Client connections closed for protocol violations.",
                &self.protocol_errors,
            ),
            (
                "pgward_upstream_connect_errors_total",
                "Failed upstream connection attempts.",
                &self.upstream_connect_errors,
            ),
            (
                "pgward_upstream_error_responses_total",
                "ErrorResponses received from upstream.",
                &self.upstream_error_responses,
            ),
        ];
        for (name, help, counter) in counters {
            let value = load(counter);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP pgward_peer_cancels_total Cancel requests between fleet replicas ([cluster]) by outcome.\n# TYPE pgward_peer_cancels_total counter"
        );
        for (outcome, counter) in [
            ("sent", &self.peer_cancels_sent),
            ("failed", &self.peer_cancels_failed),
            ("received", &self.peer_cancels_received),
            ("refused", &self.peer_cancels_refused),
        ] {
            let _ = writeln!(
                out,
                "pgward_peer_cancels_total{{outcome=\"{outcome}\"}} {}",
                load(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pgward_policy_rewrites_total Statements of policy-bound services by how the rewrite cache answered.\n# TYPE pgward_policy_rewrites_total counter"
        );
        for (cache, counter) in [
            ("exact_hit", &self.rewrites.exact_hits),
            ("shape_hit", &self.rewrites.shape_hits),
            ("miss", &self.rewrites.misses),
        ] {
            let _ = writeln!(
                out,
                "pgward_policy_rewrites_total{{cache=\"{cache}\"}} {}",
                load(counter)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pgward_connections_active Client connections open now.\n# TYPE pgward_connections_active gauge\npgward_connections_active {}",
            load(&self.connections_active)
        );
        let _ = writeln!(
            out,
            "# HELP pgward_auth_failures_total Failed client authentications by reason.\n# TYPE pgward_auth_failures_total counter"
        );
        for (reason, count) in self.auth_failures.lock().iter() {
            let _ = writeln!(
                out,
                "pgward_auth_failures_total{{reason=\"{reason}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP pgward_request_duration_seconds Time from a request reaching upstream to its ReadyForQuery.\n# TYPE pgward_request_duration_seconds histogram"
        );
        self.latency
            .render(&mut out, "pgward_request_duration_seconds", "");
        let _ = writeln!(
            out,
            "# HELP pgward_audit_durability_wait_seconds Time responses were held for their statements' audit records to become durable (durability = \"before_response\"), per batch of responses held.\n# TYPE pgward_audit_durability_wait_seconds histogram"
        );
        self.durability_wait
            .render(&mut out, "pgward_audit_durability_wait_seconds", "");
        for set in self.sets.lock().iter() {
            set.render(&mut out);
        }
        self.render_operations(&mut out);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Operations: per-service statement series, build and process information.
// ---------------------------------------------------------------------------------------------

/// At most this many service label values; later ones share the `_other` series (services
/// come from the configuration, so this only bounds a pathological one).
const MAX_SERVICE_SERIES: usize = 256;

/// What pgward did with a statement text (a simple Query or a Parse): the `decision` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementDecision {
    /// Sent upstream as the client wrote it.
    Forwarded,
    /// Sent upstream rewritten (row policy, field encryption).
    Rewritten,
    /// Not run: the client got an error in its place.
    Refused,
}

impl StatementDecision {
    const ALL: [StatementDecision; 3] = [Self::Forwarded, Self::Rewritten, Self::Refused];

    fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Rewritten => "rewritten",
            Self::Refused => "refused",
        }
    }
}

/// One service's statement series; a session holds its service's, so the hot path does no
/// lookup.
#[derive(Debug, Default)]
pub struct ServiceSeries {
    /// Statement texts seen (simple Query, Parse), whatever became of them.
    texts: AtomicU64,
    rewritten: AtomicU64,
    refused: AtomicU64,
    latency: Histogram<RequestLatency>,
    /// Queries run: simple Queries, Executes and function calls (a share of
    /// `pgward_statements_total`).
    queries: AtomicU64,
    /// Transactions ended (a ReadyForQuery with status `I`: explicit or implicit ones).
    transactions: AtomicU64,
    /// Bytes from the service's clients, and to them.
    received: AtomicU64,
    sent: AtomicU64,
    /// Waits for a pooled server connection (transaction mode), and their total length.
    waits: AtomicU64,
    wait_micros: AtomicU64,
}

/// One service's totals, read at once (`SHOW STATS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceTotals {
    pub statement_texts: u64,
    pub rewritten: u64,
    pub refused: u64,
    pub queries: u64,
    pub transactions: u64,
    pub requests: u64,
    pub request_micros: u64,
    pub received: u64,
    pub sent: u64,
    pub waits: u64,
    pub wait_micros: u64,
}

/// Whether a client message carries a statement text pgward judges.
fn is_statement_text(tag: u8) -> bool {
    use crate::protocol::frontend::{PARSE, QUERY};
    tag == QUERY || tag == PARSE
}

impl ServiceSeries {
    /// Count a client message as it passes (every message, on every path, including the
    /// pass-through one that does not judge).
    pub fn seen(&self, tag: u8) {
        if is_statement_text(tag) {
            inc(&self.texts);
        }
    }

    /// Record what pgward decided about a judged message; `forwarded` is what remains of
    /// [`ServiceSeries::seen`].
    pub fn judged(&self, tag: u8, decision: StatementDecision) {
        if !is_statement_text(tag) {
            return;
        }
        match decision {
            StatementDecision::Forwarded => {}
            StatementDecision::Rewritten => inc(&self.rewritten),
            StatementDecision::Refused => inc(&self.refused),
        }
    }

    /// A client batch of `bytes` carrying `queries` queries (Query, Execute, FunctionCall).
    pub fn client_batch(&self, bytes: usize, queries: u64) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        if queries > 0 {
            self.queries.fetch_add(queries, Ordering::Relaxed);
        }
    }

    /// Bytes written to a client of this service.
    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A ReadyForQuery with status `I`: a transaction (explicit or implicit) ended.
    pub fn transaction_ended(&self) {
        inc(&self.transactions);
    }

    /// A client waited this long for a pooled server connection.
    pub fn waited(&self, elapsed: Duration) {
        inc(&self.waits);
        self.wait_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Every total of this service.
    pub fn totals(&self) -> ServiceTotals {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServiceTotals {
            statement_texts: load(&self.texts),
            rewritten: load(&self.rewritten),
            refused: load(&self.refused),
            queries: load(&self.queries),
            transactions: load(&self.transactions),
            requests: self.latency.count(),
            request_micros: self.latency.sum_micros(),
            received: load(&self.received),
            sent: load(&self.sent),
            waits: load(&self.waits),
            wait_micros: load(&self.wait_micros),
        }
    }

    /// Statement texts of this service with this decision (tests and `/metrics`).
    pub fn decisions(&self, decision: StatementDecision) -> u64 {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        match decision {
            StatementDecision::Rewritten => load(&self.rewritten),
            StatementDecision::Refused => load(&self.refused),
            StatementDecision::Forwarded => load(&self.texts)
                .saturating_sub(load(&self.rewritten))
                .saturating_sub(load(&self.refused)),
        }
    }
}

/// Series per service, created on first use (bounded by [`MAX_SERVICE_SERIES`]).
#[derive(Debug, Default)]
pub struct ServiceTable {
    series: Mutex<BTreeMap<String, std::sync::Arc<ServiceSeries>>>,
}

impl Metrics {
    /// The series of `service` (a session takes it once, at its start).
    pub fn service_series(&self, service: &str) -> std::sync::Arc<ServiceSeries> {
        let mut table = self.services.series.lock();
        let key = if table.contains_key(service) || table.len() < MAX_SERVICE_SERIES {
            service
        } else {
            "_other"
        };
        table.entry(key.to_string()).or_default().clone()
    }

    /// Each service's totals, by service name (`SHOW STATS`).
    pub fn service_totals(&self) -> Vec<(String, ServiceTotals)> {
        self.services
            .series
            .lock()
            .iter()
            .map(|(name, series)| (name.clone(), series.totals()))
            .collect()
    }

    /// A request's latency, globally and in its service's histogram.
    pub fn observe_statement(&self, series: &ServiceSeries, elapsed: Duration) {
        self.observe_latency(elapsed);
        series.latency.observe(elapsed);
    }

    fn render_operations(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP pgward_build_info pgward's version.\n# TYPE pgward_build_info gauge\npgward_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        process::render(out);
        let table = self.services.series.lock();
        let _ = writeln!(
            out,
            "# HELP pgward_service_statements_total Statement texts (simple Query, Parse) by service and what pgward did with them.\n# TYPE pgward_service_statements_total counter"
        );
        for (service, series) in table.iter() {
            for decision in StatementDecision::ALL {
                let _ = writeln!(
                    out,
                    "pgward_service_statements_total{{service=\"{}\",decision=\"{}\"}} {}",
                    label_value(service),
                    decision.label(),
                    series.decisions(decision)
                );
            }
        }
        type Read = fn(&ServiceTotals) -> u64;
        let counters: [(&str, &str, Read); 6] = [
            (
                "pgward_service_queries_total",
                "Queries run (simple Queries, Executes, function calls) by service.",
                |t| t.queries,
            ),
            (
                "pgward_service_transactions_total",
                "Transactions ended (explicit or implicit: ReadyForQuery with status I) by service.",
                |t| t.transactions,
            ),
            (
                "pgward_service_received_bytes_total",
                "Bytes received from the service's clients.",
                |t| t.received,
            ),
            (
                "pgward_service_sent_bytes_total",
                "Bytes sent to the service's clients.",
                |t| t.sent,
            ),
            (
                "pgward_service_pool_waits_total",
                "Times a client of the service waited for a pooled server connection.",
                |t| t.waits,
            ),
            (
                "pgward_service_pool_wait_seconds_total",
                "Time the service's clients spent waiting for a pooled server connection.",
                |t| t.wait_micros,
            ),
        ];
        for (name, help, read) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (service, series) in table.iter() {
                let value = read(&series.totals());
                let service = label_value(service);
                if name.ends_with("_seconds_total") {
                    let seconds = value as f64 / 1e6;
                    let _ = writeln!(out, "{name}{{service=\"{service}\"}} {seconds}");
                } else {
                    let _ = writeln!(out, "{name}{{service=\"{service}\"}} {value}");
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP pgward_service_request_duration_seconds Time from a request reaching upstream to its ReadyForQuery, by service.\n# TYPE pgward_service_request_duration_seconds histogram"
        );
        for (service, series) in table.iter() {
            let labels = format!("service=\"{}\"", label_value(service));
            series
                .latency
                .render(out, "pgward_service_request_duration_seconds", &labels);
        }
    }
}

/// A label value escaped as the exposition format requires.
pub(crate) fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The standard `process_*` series, read from /proc (Linux); absent elsewhere.
mod process {
    use std::fmt::Write as _;

    pub(super) fn render(out: &mut String) {
        let Some(stat) = read_stat() else {
            return;
        };
        // SAFETY: sysconf only reads a constant of the running system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}"
        );
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            stat.rss_pages * page
        );
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let _ = writeln!(
                out,
                "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}",
                fds.count()
            );
        }
        if let Some(boot) = boot_time() {
            let start = boot as f64 + stat.start_ticks as f64 / ticks;
            let _ = writeln!(
                out,
                "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {start}"
            );
        }
    }

    pub(super) struct Stat {
        pub(super) utime: u64,
        pub(super) stime: u64,
        pub(super) start_ticks: u64,
        pub(super) rss_pages: u64,
    }

    /// Fields of /proc/self/stat after the `(comm)` field, which may itself hold spaces.
    fn read_stat() -> Option<Stat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        parse_stat(&text)
    }

    pub(super) fn parse_stat(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After comm: state is field 3 (index 0 here); utime 14, stime 15, starttime 22, rss 24.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            start_ticks: field(22)?,
            rss_pages: field(24)?,
        })
    }

    fn boot_time() -> Option<u64> {
        std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_labels_and_cumulative_buckets() {
        let m = Metrics::default();
        inc(&m.statements);
        m.auth_failure("expired");
        m.auth_failure("expired");
        m.observe_latency(Duration::from_micros(50));
        m.observe_latency(Duration::from_millis(2));
        let text = m.render();
        assert!(text.contains("pgward_statements_total 1"));
        assert!(text.contains("pgward_auth_failures_total{reason=\"expired\"} 2"));
        assert!(text.contains("pgward_request_duration_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(text.contains("pgward_request_duration_seconds_bucket{le=\"0.0025\"} 2"));
        assert!(text.contains("pgward_request_duration_seconds_count 2"));
    }

    #[test]
    fn service_series_count_decisions_and_latency() {
        use crate::protocol::frontend::{BIND, EXECUTE, PARSE, QUERY};
        let m = Metrics::default();
        let billing = m.service_series("billing");
        for tag in [QUERY, PARSE, PARSE, BIND, EXECUTE] {
            billing.seen(tag);
        }
        billing.judged(QUERY, StatementDecision::Rewritten);
        billing.judged(PARSE, StatementDecision::Refused);
        billing.judged(BIND, StatementDecision::Refused);
        billing.judged(EXECUTE, StatementDecision::Forwarded);
        m.observe_statement(&billing, Duration::from_millis(2));
        assert!(std::sync::Arc::ptr_eq(
            &billing,
            &m.service_series("billing")
        ));
        let text = m.render();
        for line in [
            "pgward_service_statements_total{service=\"billing\",decision=\"rewritten\"} 1",
            "pgward_service_statements_total{service=\"billing\",decision=\"refused\"} 1",
            "pgward_service_statements_total{service=\"billing\",decision=\"forwarded\"} 1",
            "pgward_service_request_duration_seconds_bucket{service=\"billing\",le=\"0.0025\"} 1",
            "pgward_service_request_duration_seconds_count{service=\"billing\"} 1",
            "pgward_request_duration_seconds_count 1",
            "pgward_build_info{version=",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }

    #[test]
    fn proc_stat_fields_are_read_after_the_command_name() {
        let line =
            "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0 12345 1000 250 rest";
        let stat = process::parse_stat(line).unwrap();
        assert_eq!(
            (stat.utime, stat.stime, stat.start_ticks, stat.rss_pages),
            (7, 3, 12345, 250)
        );
    }
}
