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
use pagemesh_api::stats as api;
use pagemesh_api::{NodeId, PAGE_SIZE};

/// Counters and histograms of one pager, shared between its handler and readers.
#[derive(Debug)]
pub struct PagerStats {
    remote: AtomicU64,
    local_zero: AtomicU64,
    spurious: AtomicU64,
    staging_hits: AtomicU64,
    write_protect: AtomicU64,
    bytes_fetched: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    /// CPU time of the fault handler threads that have ended, ns.
    handler_cpu_ns: AtomicU64,
    /// What the prefetcher did, when it runs.
    pub prefetch: PrefetchStats,
    /// One lock for every histogram: the handler takes it once per fault.
    hists: Mutex<Hists>,
}

#[derive(Debug, Clone)]
struct Hists {
    all: Histogram<u64>,
    remote: Histogram<u64>,
    /// Time in the install ioctl (UFFDIO_COPY, which also wakes the vCPU).
    install: Histogram<u64>,
    /// Transfer time per peer; a handful of peers, so a linear scan.
    peers: Vec<(NodeId, Histogram<u64>)>,
}

/// A pager's histograms in the API's form ([`PagerStats::histograms`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiHistograms {
    /// Fault latency (event read → install done).
    pub fault: api::Histogram,
    /// Time in the install ioctl.
    pub install: api::Histogram,
    /// Transfer time per peer, by node id.
    pub peers: Vec<api::PeerStats>,
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
    /// Put back from the cache's staging area (no transfer).
    StagingHit,
    /// The first write to a write-protected (clean) page: it became dirty.
    WriteProtect,
    /// A touch of a page the prefetcher was bringing (or had just brought): its install
    /// woke the guest; no fetch of its own.
    InFlight,
}

/// The prefetcher's counters (all zero when prefetch is off).
#[derive(Debug, Default)]
pub struct PrefetchStats {
    on: std::sync::atomic::AtomicBool,
    issued: AtomicU64,
    replayed: AtomicU64,
    used: AtomicU64,
    windows: AtomicU64,
    dropped_hints: AtomicU64,
    failed: AtomicU64,
}

impl PrefetchStats {
    /// Marks prefetch as running (its figures appear in snapshots).
    pub(crate) fn enable(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    pub(crate) fn count_dropped_hint(&self) {
        self.dropped_hints.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_used(&self, pages: u64) {
        self.used.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn count_window(&self) {
        self.windows.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
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
    /// Faults on pages in the cache's staging area, put back without a transfer.
    pub staging_hits: u64,
    /// First writes to write-protected pages (the cache's dirty tracking).
    pub write_protect: u64,
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
    /// The prefetcher's figures, when it runs.
    pub prefetch: Option<api::PrefetchStats>,
    /// Fault latency at the quantiles 0, 1/[`CDF_STEPS`], ..., 1 (the last the slowest
    /// fault), µs: the distribution's CDF; empty without faults.
    pub fault_cdf_us: Vec<f64>,
    /// CPU time the fault handler threads spent, ns: counted as each ends, so zero while
    /// they run (what polling costs, [`crate::FaultPath::poll`]).
    pub handler_cpu_ns: u64,
}

/// The calling thread's CPU time so far (user and system), ns.
pub(crate) fn thread_cpu() -> u64 {
    crate::trace::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

impl PagerStats {
    /// Adds an ended handler thread's CPU time.
    pub(crate) fn add_handler_cpu(&self, ns: u64) {
        self.handler_cpu_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Steps of [`StatsSnapshot::fault_cdf_us`] (one point more than steps).
pub const CDF_STEPS: usize = 100;

fn histogram() -> Histogram<u64> {
    // 1 ns .. 100 s at 2 significant figures (a value is known to within 1%): fixed size, so
    // recording never allocates, and 30 KB, so that a reader's copy, made under the lock the
    // handler takes on every fault, is short (3 figures would make it 220 KB).
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("static bounds are valid")
}

impl Default for PagerStats {
    fn default() -> Self {
        Self {
            remote: AtomicU64::new(0),
            local_zero: AtomicU64::new(0),
            spurious: AtomicU64::new(0),
            staging_hits: AtomicU64::new(0),
            write_protect: AtomicU64::new(0),
            bytes_fetched: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            handler_cpu_ns: AtomicU64::new(0),
            prefetch: PrefetchStats::default(),
            hists: Mutex::new(Hists {
                all: histogram(),
                remote: histogram(),
                install: histogram(),
                peers: Vec::new(),
            }),
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

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Upper bounds (µs) of the buckets exported to `/stats` and `/metrics`.
pub const BUCKETS_US: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 75.0, 100.0, 150.0, 200.0,
    300.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 100000.0,
];

/// Converts an HDR histogram of nanoseconds to the API's form.
pub fn to_api(h: &Histogram<u64>) -> api::Histogram {
    let mut buckets: Vec<api::Bucket> = BUCKETS_US
        .iter()
        .map(|&le_us| api::Bucket {
            le_us,
            count: if h.is_empty() {
                0
            } else {
                h.count_between(0, (le_us * 1000.0) as u64)
            },
        })
        .collect();
    buckets.push(api::Bucket {
        le_us: f64::INFINITY,
        count: h.len(),
    });
    api::Histogram {
        count: h.len(),
        p50_us: us(h, 0.5),
        p90_us: us(h, 0.9),
        p99_us: us(h, 0.99),
        max_us: if h.is_empty() {
            0.0
        } else {
            h.max() as f64 / 1000.0
        },
        sum_us: h.mean() * h.len() as f64 / 1000.0,
        buckets,
    }
}

impl PagerStats {
    /// Records one served fault; `transfer` is the peer and the time its fetch took,
    /// `install` the time the install ioctl took.
    #[inline]
    pub fn record(
        &self,
        kind: FaultKind,
        latency: Duration,
        transfer: Option<(NodeId, Duration)>,
        install: Option<Duration>,
    ) {
        let latency = ns(latency);
        match kind {
            FaultKind::Remote => {
                self.remote.fetch_add(1, Ordering::Relaxed);
                self.bytes_fetched
                    .fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
            }
            FaultKind::LocalZero => {
                self.local_zero.fetch_add(1, Ordering::Relaxed);
            }
            FaultKind::Spurious => {
                self.spurious.fetch_add(1, Ordering::Relaxed);
            }
            FaultKind::StagingHit => {
                self.staging_hits.fetch_add(1, Ordering::Relaxed);
            }
            FaultKind::WriteProtect => {
                self.write_protect.fetch_add(1, Ordering::Relaxed);
            }
            FaultKind::InFlight => {
                self.in_flight.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut h = lock(&self.hists);
        h.all.saturating_record(latency);
        if kind == FaultKind::Remote {
            h.remote.saturating_record(latency);
        }
        if let Some(t) = install {
            h.install.saturating_record(ns(t));
        }
        if let Some((node, t)) = transfer {
            let i = match h.peers.iter().position(|(n, _)| *n == node) {
                Some(i) => i,
                None => {
                    // Once per peer, not per fault.
                    h.peers.push((node, histogram()));
                    h.peers.len() - 1
                }
            };
            h.peers[i].1.saturating_record(ns(t));
        }
    }

    /// Counts `pages` more pages fetched by a fault already recorded (a huge page's: one
    /// fault, 512 pages on the wire).
    pub(crate) fn add_fetched(&self, pages: u64) {
        self.bytes_fetched
            .fetch_add(pages * PAGE_SIZE as u64, Ordering::Relaxed);
    }

    /// Records `pages` pages the prefetcher fetched from `node` in `transfer` (a batch's
    /// time) and installed: they count as transfers from that node (bytes fetched, the
    /// peer's pages and transfer times), not as faults.
    pub(crate) fn record_prefetch(
        &self,
        node: NodeId,
        pages: u64,
        transfer: Duration,
        replay: bool,
    ) {
        let counter = if replay {
            &self.prefetch.replayed
        } else {
            &self.prefetch.issued
        };
        counter.fetch_add(pages, Ordering::Relaxed);
        self.bytes_fetched
            .fetch_add(pages * PAGE_SIZE as u64, Ordering::Relaxed);
        let mut h = lock(&self.hists);
        let i = match h.peers.iter().position(|(n, _)| *n == node) {
            Some(i) => i,
            None => {
                h.peers.push((node, histogram()));
                h.peers.len() - 1
            }
        };
        h.peers[i].1.saturating_record_n(ns(transfer), pages);
    }

    /// The prefetcher's figures, if it runs.
    pub fn prefetch_snapshot(&self) -> Option<api::PrefetchStats> {
        let p = &self.prefetch;
        if !p.on.load(Ordering::Relaxed) {
            return None;
        }
        let issued = p.issued.load(Ordering::Relaxed);
        let used = p.used.load(Ordering::Relaxed);
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let remote = self.remote_faults();
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Some(api::PrefetchStats {
            issued,
            used,
            in_flight,
            replayed: p.replayed.load(Ordering::Relaxed),
            windows: p.windows.load(Ordering::Relaxed),
            dropped_hints: p.dropped_hints.load(Ordering::Relaxed),
            failed: p.failed.load(Ordering::Relaxed),
            accuracy: ratio(used, issued),
            coverage: ratio(used.saturating_sub(in_flight), used + remote),
        })
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
        Duration::from_nanos(lock(&self.hists).all.value_at_quantile(0.5))
    }

    /// 99th-percentile fault latency.
    pub fn p99_latency(&self) -> Duration {
        Duration::from_nanos(lock(&self.hists).all.value_at_quantile(0.99))
    }

    /// Copies everything out.
    pub fn snapshot(&self) -> StatsSnapshot {
        // Copy what is needed under the lock, and work on it after.
        let (all, remote) = {
            let h = lock(&self.hists);
            (h.all.clone(), h.remote.clone())
        };
        StatsSnapshot {
            remote: self.remote_faults(),
            local_zero: self.local_faults(),
            spurious: self.spurious.load(Ordering::Relaxed),
            staging_hits: self.staging_hits.load(Ordering::Relaxed),
            write_protect: self.write_protect.load(Ordering::Relaxed),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            remote_miss_ratio: self.remote_miss_ratio(),
            fault_p50_us: us(&all, 0.5),
            fault_p90_us: us(&all, 0.9),
            fault_p99_us: us(&all, 0.99),
            fault_max_us: if all.is_empty() {
                0.0
            } else {
                all.max() as f64 / 1000.0
            },
            remote_p50_us: us(&remote, 0.5),
            remote_p99_us: us(&remote, 0.99),
            handler_cpu_ns: self.handler_cpu_ns.load(Ordering::Relaxed),
            prefetch: self.prefetch_snapshot(),
            fault_cdf_us: if all.is_empty() {
                Vec::new()
            } else {
                (0..=CDF_STEPS)
                    .map(|i| us(&all, i as f64 / CDF_STEPS as f64))
                    .collect()
            },
        }
    }

    /// The fault-latency, install-ioctl and per-peer transfer histograms, in the API's form,
    /// from one copy taken under the lock.
    pub fn histograms(&self) -> ApiHistograms {
        let (all, install, peers) = {
            let h = lock(&self.hists);
            (h.all.clone(), h.install.clone(), h.peers.clone())
        };
        let mut peers: Vec<api::PeerStats> = peers
            .iter()
            .map(|(node, hist)| api::PeerStats {
                node_id: *node,
                pages: hist.len(),
                transfer: to_api(hist),
            })
            .collect();
        peers.sort_by_key(|p| p.node_id);
        ApiHistograms {
            fault: to_api(&all),
            install: to_api(&install),
            peers,
        }
    }

    /// Counts in the API's form (histograms and heat are filled by the caller).
    pub fn counters(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.remote_faults(),
            self.local_faults(),
            self.spurious.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.bytes_fetched.load(Ordering::Relaxed),
        )
    }
}

fn lock(m: &Mutex<Hists>) -> std::sync::MutexGuard<'_, Hists> {
    // A panic while holding the lock leaves histograms that are still valid data.
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
            s.record(
                FaultKind::Remote,
                Duration::from_micros(50),
                Some((1, Duration::from_micros(20))),
                Some(Duration::from_micros(5)),
            );
        }
        s.record(FaultKind::LocalZero, Duration::from_micros(10), None, None);
        s.record(FaultKind::Spurious, Duration::from_micros(1), None, None);
        assert_eq!(s.remote_miss_ratio(), 0.75);
        let snap = s.snapshot();
        assert_eq!((snap.remote, snap.local_zero, snap.spurious), (3, 1, 1));
        assert_eq!(snap.bytes_fetched, 3 * 4096);
        let ApiHistograms {
            fault: all,
            install,
            peers,
        } = s.histograms();
        assert_eq!(all.count, 5);
        assert_eq!(all.buckets.last().unwrap().count, 5);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].node_id, 1);
        assert_eq!(peers[0].pages, 3);
        assert_eq!(install.count, 3);
        // Two significant figures: within 1%.
        assert!((install.p50_us - 5.0).abs() < 0.05, "{}", install.p50_us);
        assert!(
            (peers[0].transfer.p50_us - 20.0).abs() < 0.2,
            "{}",
            peers[0].transfer.p50_us
        );
        // Buckets are cumulative.
        assert!(all.buckets.windows(2).all(|w| w[0].count <= w[1].count));
        let le_10 = all.buckets.iter().find(|b| b.le_us == 10.0).unwrap();
        assert_eq!(le_10.count, 2, "the 1 µs and 10 µs faults");
    }

    #[test]
    fn test_pager_stats_percentiles() {
        let s = PagerStats::default();
        for i in 1..=100u64 {
            s.record(FaultKind::Remote, Duration::from_micros(i), None, None);
        }
        let snap = s.snapshot();
        // Two significant figures: each within 1%.
        assert!(
            (snap.fault_p50_us - 50.0).abs() < 0.5,
            "{}",
            snap.fault_p50_us
        );
        assert!(
            (snap.fault_p99_us - 99.0).abs() < 1.0,
            "{}",
            snap.fault_p99_us
        );
        assert!((snap.fault_max_us - 100.0).abs() < 1.0);
        let median = s.median_latency().as_nanos();
        assert!((49_500..=50_500).contains(&median), "{median}");
    }
}
