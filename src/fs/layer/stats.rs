//! Per-layer counters: plain atomics, read with [`LayerStats::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (milliseconds) of the fetch latency histogram buckets; the
/// last bucket counts everything slower.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000];

/// Where a prefetch stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum PrefetchState {
    /// No prefetch for this layer (disabled, landmark says none, size 0).
    None,
    Running,
    Done,
    Failed(String),
}

/// Live counters of one layer.
#[derive(Debug, Default)]
pub struct LayerStats {
    pub blob_size: AtomicU64,
    /// Compressed bytes received from the registry.
    pub bytes_fetched: AtomicU64,
    /// Fetcher calls (each one request, possibly multi-range).
    pub fetches: AtomicU64,
    /// Ranges requested over all fetches.
    pub ranges: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub fetch_latency_us_sum: AtomicU64,
    pub fetch_latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub chunks_from_memory: AtomicU64,
    pub chunks_from_disk: AtomicU64,
    pub chunks_from_network: AtomicU64,
    /// Chunks fetched ahead of demand (read-ahead, not yet requested).
    pub chunks_read_ahead: AtomicU64,
    pub chunks_prefetched: AtomicU64,
    pub chunks_background: AtomicU64,
    /// Chunks decoded from the tail read at open (no request of their own).
    pub chunks_from_tail: AtomicU64,
    pub verification_failures: AtomicU64,
    pub disk_write_errors: AtomicU64,
    /// Bytes returned to readers.
    pub bytes_served: AtomicU64,
}

/// A copy of [`LayerStats`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub blob_size: u64,
    pub bytes_fetched: u64,
    pub fetches: u64,
    pub ranges: u64,
    pub fetch_errors: u64,
    pub fetch_latency_us_sum: u64,
    /// Counts per bucket of [`LATENCY_BUCKETS_MS`], plus one overflow.
    pub fetch_latency_buckets: Vec<u64>,
    pub chunks_from_memory: u64,
    pub chunks_from_disk: u64,
    pub chunks_from_network: u64,
    pub chunks_read_ahead: u64,
    pub chunks_prefetched: u64,
    pub chunks_background: u64,
    pub chunks_from_tail: u64,
    pub verification_failures: u64,
    pub disk_write_errors: u64,
    pub bytes_served: u64,
    pub prefetch: PrefetchState,
}

impl StatsSnapshot {
    /// Approximate latency quantile (`q` in 0..=1) as a bucket's upper bound
    /// in milliseconds; `None` before any fetch or in the overflow bucket.
    pub fn latency_quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.fetch_latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.fetch_latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return LATENCY_BUCKETS_MS.get(i).copied();
            }
        }
        None
    }
}

impl LayerStats {
    pub(crate) fn record_fetch(&self, ranges: usize, bytes: u64, took: Duration) {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.ranges.fetch_add(ranges as u64, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.fetch_latency_us_sum.fetch_add(us, Ordering::Relaxed);
        let ms = us / 1000;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms < b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.fetch_latency_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, prefetch: PrefetchState) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            blob_size: g(&self.blob_size),
            bytes_fetched: g(&self.bytes_fetched),
            fetches: g(&self.fetches),
            ranges: g(&self.ranges),
            fetch_errors: g(&self.fetch_errors),
            fetch_latency_us_sum: g(&self.fetch_latency_us_sum),
            fetch_latency_buckets: self.fetch_latency_buckets.iter().map(g).collect(),
            chunks_from_memory: g(&self.chunks_from_memory),
            chunks_from_disk: g(&self.chunks_from_disk),
            chunks_from_network: g(&self.chunks_from_network),
            chunks_read_ahead: g(&self.chunks_read_ahead),
            chunks_prefetched: g(&self.chunks_prefetched),
            chunks_background: g(&self.chunks_background),
            chunks_from_tail: g(&self.chunks_from_tail),
            verification_failures: g(&self.verification_failures),
            disk_write_errors: g(&self.disk_write_errors),
            bytes_served: g(&self.bytes_served),
            prefetch,
        }
    }
}

/// Lets through at most one log line per `every` per limiter; counts the
/// rest, reported with the next line that gets through.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// `Some(suppressed since the last line)` when a line may be logged now.
    pub(crate) fn allow(&self, now_ms: u64, every_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if (last == 0 || now_ms.saturating_sub(last) >= every_ms)
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_and_rate_limit() {
        let s = LayerStats::default();
        s.record_fetch(1, 10, Duration::from_micros(500));
        s.record_fetch(2, 10, Duration::from_millis(30));
        s.record_fetch(1, 10, Duration::from_secs(10));
        let snap = s.snapshot(PrefetchState::None);
        assert_eq!(snap.fetches, 3);
        assert_eq!(snap.ranges, 4);
        assert_eq!(snap.latency_quantile_ms(0.3), Some(1));
        assert_eq!(snap.latency_quantile_ms(0.5), Some(50));
        assert_eq!(snap.latency_quantile_ms(0.99), None);
        let r = RateLimit::default();
        assert_eq!(r.allow(1000, 1000), Some(0));
        assert_eq!(r.allow(1500, 1000), None);
        assert_eq!(r.allow(1600, 1000), None);
        assert_eq!(r.allow(2000, 1000), Some(2));
    }
}
