//! Key and Vault metrics, rendered into `/metrics` with the others (a
//! [`crate::metrics::MetricSet`]).
//!
//! Labels are fixed sets (`&'static str`) or configured key names (bounded by the
//! configuration, never by traffic or tenants).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::metrics::histogram::{Buckets, Histogram};
use crate::metrics::MetricSet;

/// The buckets of Vault request latencies.
#[derive(Debug)]
pub struct VaultLatency;

impl Buckets for VaultLatency {
    const BOUNDS: &'static [f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];
}

/// How a Vault request ended (the `outcome` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaultOutcome {
    Ok,
    Unreachable,
    Refused,
    Sealed,
    Error,
}

impl VaultOutcome {
    const ALL: [VaultOutcome; 5] = [
        VaultOutcome::Ok,
        VaultOutcome::Unreachable,
        VaultOutcome::Refused,
        VaultOutcome::Sealed,
        VaultOutcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            VaultOutcome::Ok => "ok",
            VaultOutcome::Unreachable => "unreachable",
            VaultOutcome::Refused => "refused",
            VaultOutcome::Sealed => "sealed",
            VaultOutcome::Error => "error",
        }
    }
}

/// Counters of the key manager and its Vault client (shared through an `Arc`).
#[derive(Debug, Default)]
pub struct KeyMetrics {
    vault_requests: [AtomicU64; 5],
    vault_latency: Histogram<VaultLatency>,
    /// Data-path key lookups answered from memory / that had to fetch.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Values that failed authentication (tampered, moved, wrong key).
    pub integrity_failures: AtomicU64,
    /// Data keys replaced because they reached `keys.dek_max_encryptions`.
    pub usage_rotations: AtomicU64,
    refresh_ok: AtomicU64,
    refresh_failed: AtomicU64,
    /// Unix time of the last successful refresh, per key name.
    last_refresh: Mutex<BTreeMap<String, u64>>,
    /// Key names blocked now (Vault refused or is sealed).
    pub blocked_keys: AtomicU64,
}

impl KeyMetrics {
    /// Count one Vault request and its latency.
    pub fn vault_request(&self, outcome: VaultOutcome, elapsed: Duration) {
        let i = VaultOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0);
        self.vault_requests[i].fetch_add(1, Ordering::Relaxed);
        self.vault_latency.observe(elapsed);
    }

    /// Count a refresh of `key_name` (the poller's access check and rotation detection).
    pub fn refresh(&self, key_name: &str, ok: bool) {
        if ok {
            self.refresh_ok.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_refresh.lock().insert(key_name.to_string(), now);
        } else {
            self.refresh_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests that ended with `outcome` (tests).
    pub fn vault_requests(&self, outcome: VaultOutcome) -> u64 {
        VaultOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.vault_requests[i].load(Ordering::Relaxed))
    }
}

impl MetricSet for KeyMetrics {
    fn render(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP pgward_vault_requests_total Vault requests by outcome (ok, unreachable incl. timeouts, refused, sealed, error).\n# TYPE pgward_vault_requests_total counter");
        for (o, c) in VaultOutcome::ALL.iter().zip(&self.vault_requests) {
            let _ = writeln!(
                out,
                "pgward_vault_requests_total{{outcome=\"{}\"}} {}",
                o.label(),
                load(c)
            );
        }
        let _ = writeln!(out, "# HELP pgward_vault_request_duration_seconds Vault request latency.\n# TYPE pgward_vault_request_duration_seconds histogram");
        self.vault_latency
            .render(out, "pgward_vault_request_duration_seconds", "");
        let _ = writeln!(out, "# HELP pgward_key_refreshes_total Key refreshes (access check, rotation detection) by result.\n# TYPE pgward_key_refreshes_total counter\npgward_key_refreshes_total{{result=\"ok\"}} {}\npgward_key_refreshes_total{{result=\"failed\"}} {}", load(&self.refresh_ok), load(&self.refresh_failed));
        let _ = writeln!(out, "# HELP pgward_key_refresh_last_success_timestamp_seconds Unix time of the last successful refresh of each key name.\n# TYPE pgward_key_refresh_last_success_timestamp_seconds gauge");
        for (key, at) in self.last_refresh.lock().iter() {
            let _ = writeln!(
                out,
                "pgward_key_refresh_last_success_timestamp_seconds{{key=\"{key}\"}} {at}"
            );
        }
        let _ = writeln!(out, "# HELP pgward_key_cache_lookups_total Data-path key lookups: served from memory (hit) or fetched (miss).\n# TYPE pgward_key_cache_lookups_total counter\npgward_key_cache_lookups_total{{result=\"hit\"}} {}\npgward_key_cache_lookups_total{{result=\"miss\"}} {}", load(&self.cache_hits), load(&self.cache_misses));
        let _ = writeln!(out, "# HELP pgward_integrity_failures_total Encrypted values that failed their integrity check.\n# TYPE pgward_integrity_failures_total counter\npgward_integrity_failures_total {}", load(&self.integrity_failures));
        let _ = writeln!(out, "# HELP pgward_dek_usage_rotations_total Data keys replaced on reaching keys.dek_max_encryptions.\n# TYPE pgward_dek_usage_rotations_total counter\npgward_dek_usage_rotations_total {}", load(&self.usage_rotations));
        let _ = writeln!(out, "# HELP pgward_keys_blocked Key names refused by Vault (or sealed) now.\n# TYPE pgward_keys_blocked gauge\npgward_keys_blocked {}", load(&self.blocked_keys));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fixed_series() {
        let m = KeyMetrics::default();
        m.vault_request(VaultOutcome::Ok, Duration::from_millis(2));
        m.vault_request(VaultOutcome::Sealed, Duration::from_millis(20));
        m.refresh("pii", true);
        m.cache_hits.fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        MetricSet::render(&m, &mut out);
        assert!(out.contains("pgward_vault_requests_total{outcome=\"sealed\"} 1"));
        assert!(out.contains("pgward_vault_request_duration_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(out.contains("pgward_vault_request_duration_seconds_count 2"));
        assert!(out.contains("pgward_key_refresh_last_success_timestamp_seconds{key=\"pii\"} "));
        assert!(out.contains("pgward_key_cache_lookups_total{result=\"hit\"} 3"));
    }
}
