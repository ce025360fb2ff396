//! Prometheus metrics with fixed, low-cardinality labels.
//!
//! Counters are plain atomics bumped on the hot path; labels come from fixed `&'static str` sets
//! (never SQL text, never a tenant), so the exposition stays small whatever the traffic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Upper bounds (seconds) of the statement latency histogram buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

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
    pub protocol_errors: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub upstream_error_responses: AtomicU64,
    pub policy_reloads: AtomicU64,
    pub audit_write_failures: AtomicU64,
    /// Starts that found the audit log behind its externally anchored checkpoint.
    pub audit_truncations_detected: AtomicU64,
    pub policy_reload_failures: AtomicU64,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

/// Increment a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
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
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| secs <= le) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
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
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
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
        let mut cumulative = 0;
        for (le, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += load(bucket);
            let _ = writeln!(
                out,
                "pgward_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(
            out,
            "pgward_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "pgward_request_duration_seconds_sum {}\npgward_request_duration_seconds_count {count}",
            load(&self.latency_sum_micros) as f64 / 1e6
        );
        out
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
}
