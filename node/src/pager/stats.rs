//! Pager statistics: fault counts by kind, the remote-miss ratio and a fault latency
//! histogram.
//!
//! Fault latency is measured by the handler, from the moment it has read the fault event to
//! the moment the install ioctl has returned (the guest is woken by then). It therefore
//! excludes the kernel's delivery of the event to the handler (about 16 µs here, see
//! `docs/benchmarks.md`); the benchmark's µs-per-page includes everything.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Counters and histograms of one pager, shared between its handler and readers.
#[derive(Debug)]
pub struct PagerStats {
    remote: AtomicU64,
    local_zero: AtomicU64,
    spurious: AtomicU64,
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    remote_latency: Mutex<Histogram<u64>>,
}

/// The kind of a served fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Fetched from another node.
    Remote,
    /// Zero-filled locally.
    LocalZero,
    /// The page was already present (raced with another install).
    Spurious,
}

/// A point-in-time copy of the stats.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Faults served by fetching from another node.
    pub remote: u64,
    /// Faults served by zero-filling locally.
    pub local_zero: u64,
    /// Faults on pages already present.
    pub spurious: u64,
    /// Bytes fetched from other nodes.
    pub bytes_fetched: u64,
    /// Faults that could not be served.
    pub errors: u64,
    /// remote / (remote + local_zero).
    pub remote_miss_ratio: f64,
    /// Median fault latency, µs.
    pub fault_p50_us: f64,
    /// 90th percentile, µs.
    pub fault_p90_us: f64,
    /// 99th percentile, µs.
    pub fault_p99_us: f64,
    /// Slowest fault, µs.
    pub fault_max_us: f64,
    /// Median latency of remote faults only, µs.
    pub remote_p50_us: f64,
    /// 99th percentile of remote faults only, µs.
    pub remote_p99_us: f64,
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 3 significant figures: fixed size, so recording never allocates.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds are valid")
}

impl Default for PagerStats {
    fn default() -> Self {
        Self {
            remote: AtomicU64::new(0),
            local_zero: AtomicU64::new(0),
            spurious: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Mutex::new(histogram()),
            remote_latency: Mutex::new(histogram()),
        }
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

impl PagerStats {
    /// Records one served fault.
    #[inline]
    pub fn record(&self, kind: FaultKind, latency: Duration, bytes: u64) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        match kind {
            FaultKind::Remote => {
                self.remote.fetch_add(1, Ordering::Relaxed);
                self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
                lock(&self.remote_latency).saturating_record(ns);
            }
            FaultKind::LocalZero => {
                self.local_zero.fetch_add(1, Ordering::Relaxed);
            }
            FaultKind::Spurious => {
                self.spurious.fetch_add(1, Ordering::Relaxed);
            }
        }
        lock(&self.latency).saturating_record(ns);
    }

    /// Records a fault that could not be served.
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Faults served remotely.
    pub fn remote_faults(&self) -> u64 {
        self.remote.load(Ordering::Relaxed)
    }

    /// Faults zero-filled locally.
    pub fn local_faults(&self) -> u64 {
        self.local_zero.load(Ordering::Relaxed)
    }

    /// Fraction of faults that went to another node (0 when there were none).
    pub fn remote_miss_ratio(&self) -> f64 {
        let r = self.remote_faults();
        let total = r + self.local_faults();
        if total == 0 {
            0.0
        } else {
            r as f64 / total as f64
        }
    }

    /// Median fault latency.
    pub fn median_latency(&self) -> Duration {
        Duration::from_nanos(lock(&self.latency).value_at_quantile(0.5))
    }

    /// 99th-percentile fault latency.
    pub fn p99_latency(&self) -> Duration {
        Duration::from_nanos(lock(&self.latency).value_at_quantile(0.99))
    }

    /// Copies everything out.
    pub fn snapshot(&self) -> StatsSnapshot {
        let lat = lock(&self.latency).clone();
        let rlat = lock(&self.remote_latency).clone();
        StatsSnapshot {
            remote: self.remote_faults(),
            local_zero: self.local_faults(),
            spurious: self.spurious.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            remote_miss_ratio: self.remote_miss_ratio(),
            fault_p50_us: us(&lat, 0.5),
            fault_p90_us: us(&lat, 0.9),
            fault_p99_us: us(&lat, 0.99),
            fault_max_us: if lat.is_empty() {
                0.0
            } else {
                lat.max() as f64 / 1000.0
            },
            remote_p50_us: us(&rlat, 0.5),
            remote_p99_us: us(&rlat, 0.99),
        }
    }
}

fn lock(m: &Mutex<Histogram<u64>>) -> std::sync::MutexGuard<'_, Histogram<u64>> {
    // A panic while holding the lock leaves a histogram that is still valid data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pager_stats_default() {
        let s = PagerStats::default();
        assert_eq!(s.snapshot(), StatsSnapshot::default());
        assert_eq!(s.remote_miss_ratio(), 0.0);
    }

    #[test]
    fn test_pager_stats_remote_miss_ratio() {
        let s = PagerStats::default();
        for _ in 0..3 {
            s.record(FaultKind::Remote, Duration::from_micros(50), 4096);
        }
        s.record(FaultKind::LocalZero, Duration::from_micros(10), 0);
        s.record(FaultKind::Spurious, Duration::from_micros(1), 0);
        assert_eq!(s.remote_miss_ratio(), 0.75);
        let snap = s.snapshot();
        assert_eq!((snap.remote, snap.local_zero, snap.spurious), (3, 1, 1));
        assert_eq!(snap.bytes_fetched, 3 * 4096);
    }

    #[test]
    fn test_pager_stats_percentiles() {
        let s = PagerStats::default();
        for i in 1..=100u64 {
            s.record(FaultKind::Remote, Duration::from_micros(i), 4096);
        }
        let snap = s.snapshot();
        assert!(
            (snap.fault_p50_us - 50.0).abs() < 0.1,
            "{}",
            snap.fault_p50_us
        );
        assert!(
            (snap.fault_p99_us - 99.0).abs() < 0.1,
            "{}",
            snap.fault_p99_us
        );
        assert!((snap.fault_max_us - 100.0).abs() < 0.1);
        let median = s.median_latency().as_nanos();
        assert!((49_900..=50_100).contains(&median), "{median}");
    }
}
