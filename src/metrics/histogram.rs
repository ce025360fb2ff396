//! Duration histograms in Prometheus' text format: fixed bucket bounds chosen per series (a
//! marker type implementing [`Buckets`]), atomics bumped on the hot path, rendered as the
//! `_bucket`/`_sum`/`_count` series. The one histogram every module that reports durations
//! uses (requests, Vault calls, audit fsyncs).
use std::fmt::Write as _;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The upper bounds, in seconds and ascending, of one kind of histogram's buckets.
pub trait Buckets {
    const BOUNDS: &'static [f64];
}

/// Observations counted per bucket (not cumulative: rendering adds them up), their number and
/// their sum in microseconds.
pub struct Histogram<B: Buckets> {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
    bounds: PhantomData<B>,
}

impl<B: Buckets> Default for Histogram<B> {
    fn default() -> Self {
        Self {
            buckets: B::BOUNDS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            bounds: PhantomData,
        }
    }
}

impl<B: Buckets> std::fmt::Debug for Histogram<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .field("sum_micros", &self.sum_micros())
            .finish()
    }
}

impl<B: Buckets> Histogram<B> {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = B::BOUNDS.iter().position(|&le| secs <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Their total, in microseconds.
    pub fn sum_micros(&self) -> u64 {
        self.sum_micros.load(Ordering::Relaxed)
    }

    /// Appends the series of `name` (its `# HELP`/`# TYPE` lines are the caller's), with
    /// `labels` (`key="value",…`, or empty) on each.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (le, bucket) in B::BOUNDS.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let sum = self.sum_micros() as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{labels} {sum}\n{name}_count{labels} {count}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Millis;
    impl Buckets for Millis {
        const BOUNDS: &'static [f64] = &[0.001, 0.01];
    }

    #[test]
    fn buckets_are_cumulative_and_series_carry_their_labels_or_none() {
        let h = Histogram::<Millis>::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut bare = String::new();
        h.render(&mut bare, "x_seconds", "");
        assert_eq!(
            bare,
            "x_seconds_bucket{le=\"0.001\"} 1\nx_seconds_bucket{le=\"0.01\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 1.0055\nx_seconds_count 3\n"
        );
        let mut labelled = String::new();
        h.render(&mut labelled, "x_seconds", "service=\"billing\"");
        assert!(labelled.contains("x_seconds_bucket{service=\"billing\",le=\"0.01\"} 2\n"));
        assert!(labelled.contains("x_seconds_sum{service=\"billing\"} 1.0055\n"));
        assert!(labelled.contains("x_seconds_count{service=\"billing\"} 3\n"));
        assert_eq!((h.count(), h.sum_micros()), (3, 1_005_500));
    }
}
