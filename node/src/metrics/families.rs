//! One reading of a node's snapshot for both exporters: which series each metric of the
//! [`catalog`] has, with which labels and values. `GET /metrics` ([`super::prometheus_text`])
//! and OTLP (`crate::otlp`) only encode what [`families`] returns, so the two cannot disagree
//! on a label, a value or a series that one of them has and the other not.
//!
//! The node's `node` label is not here: Prometheus gets it as a label on every series, OTLP
//! as the resource's `service.instance.id`.

use pagemesh_api::stats::{self, NodeStats};

use super::catalog::{self, Metric};

/// One metric and its series in a snapshot.
#[derive(Debug)]
pub(crate) struct Family {
    /// What the metric is and how it is named.
    pub(crate) metric: &'static Metric,
    /// Its series; never empty (a metric without series is left out).
    pub(crate) points: Vec<Point>,
}

/// One series: its labels (in the order Prometheus writes them) and its value.
#[derive(Debug)]
pub(crate) struct Point {
    /// Label names and values.
    pub(crate) labels: Vec<(&'static str, String)>,
    /// The value.
    pub(crate) value: Value,
}

/// The value of a series.
#[derive(Debug)]
pub(crate) enum Value {
    /// A whole number: a counter, or a gauge that counts.
    Int(u64),
    /// A gauge that does not count (a ratio, seconds).
    Float(f64),
    /// A histogram of durations.
    Histogram(Buckets),
}

/// A `/stats` histogram as both exporters want it: bounds in seconds and the count of each
/// bucket (not the count up to its bound), the last bucket being the one above the last bound.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Buckets {
    /// Upper bounds, seconds, increasing; without `+Inf`.
    pub(crate) bounds_s: Vec<f64>,
    /// Samples in each bucket: one per bound, then the overflow; they add up to `count`.
    pub(crate) counts: Vec<u64>,
    /// Samples.
    pub(crate) count: u64,
    /// Sum of the samples, seconds.
    pub(crate) sum_s: f64,
    /// Largest sample, seconds; none without samples.
    pub(crate) max_s: Option<f64>,
}

impl Buckets {
    /// From the cumulative buckets of `h` (µs). A `/stats` histogram is consistent, but one read
    /// while samples arrived may have buckets that count more than its `count`: the count is
    /// then the largest bucket's, so that the buckets still add up to it.
    pub(crate) fn from_stats(h: &stats::Histogram) -> Self {
        let mut bounds_s = Vec::with_capacity(h.buckets.len());
        let mut counts = Vec::with_capacity(h.buckets.len() + 1);
        let mut below = 0u64;
        for b in h.buckets.iter().filter(|b| b.le_us.is_finite()) {
            bounds_s.push(b.le_us / 1e6);
            counts.push(b.count.saturating_sub(below));
            below = below.max(b.count);
        }
        let count = h.count.max(below);
        counts.push(count - below);
        Self {
            bounds_s,
            counts,
            count,
            sum_s: h.sum_us / 1e6,
            max_s: (count > 0).then_some(h.max_us / 1e6),
        }
    }
}

/// Collects the series of one metric.
fn family(metric: &'static Metric, points: Vec<Point>) -> Option<Family> {
    (!points.is_empty()).then_some(Family { metric, points })
}

fn point(labels: &[(&'static str, &str)], value: Value) -> Point {
    Point {
        labels: labels.iter().map(|&(k, v)| (k, v.to_owned())).collect(),
        value,
    }
}

fn histogram(labels: &[(&'static str, &str)], h: &stats::Histogram) -> Point {
    point(labels, Value::Histogram(Buckets::from_stats(h)))
}

/// The series of snapshot `s`, metric by metric.
pub(crate) fn families(s: &NodeStats) -> Vec<Family> {
    use Value::{Float, Int};
    let server = &s.server;
    let pager = s.pager.as_ref();
    let vm = pager.map(|p| p.vm.to_string());
    let vm = vm.as_deref().unwrap_or_default();
    let cache = pager.and_then(|p| p.cache.as_ref());
    let mut out = vec![
        family(&catalog::UPTIME, vec![point(&[], Float(s.uptime_s))]),
        family(
            &catalog::PAGES_HELD,
            vec![point(&[], Int(server.pages_held))],
        ),
        family(
            &catalog::CAPACITY,
            vec![point(&[], Int(server.capacity_pages))],
        ),
        family(
            &catalog::PAGES_SERVED,
            vec![
                point(&[("claimed", "true")], Int(server.pages_claimed)),
                point(
                    &[("claimed", "false")],
                    Int(server.pages_served.saturating_sub(server.pages_claimed)),
                ),
            ],
        ),
        family(
            &catalog::WRITTEN_BACK,
            vec![point(&[], Int(server.pages_written_back))],
        ),
        family(
            &catalog::PAGES_TO_REPAIR,
            vec![point(&[], Int(server.pages_to_repair))],
        ),
        family(
            &catalog::PAGES_REPAIRED,
            vec![point(&[], Int(server.pages_repaired))],
        ),
        family(
            &catalog::PACKED_PAGES,
            vec![point(&[], Int(server.packed_pages))],
        ),
        family(
            &catalog::PACKED_BYTES,
            vec![point(&[], Int(server.packed_bytes))],
        ),
        family(
            &catalog::ERRORS,
            vec![
                point(&[("kind", "bad_frame")], Int(server.bad_frames)),
                point(&[("kind", "unauthenticated")], Int(server.auth_refusals)),
                point(
                    &[("kind", "fault")],
                    Int(pager.map_or(0, |p| p.fault_errors)),
                ),
            ]
            .into_iter()
            .chain(cache.map(|c| point(&[("kind", "writeback")], Int(c.writeback_errors))))
            .collect(),
        ),
    ];
    if let Some(p) = pager {
        out.extend([
            family(
                &catalog::FAULTS,
                [
                    ("remote", p.faults_remote),
                    ("local_zero", p.faults_local_zero),
                    ("spurious", p.faults_spurious),
                ]
                .into_iter()
                .map(|(kind, n)| point(&[("kind", kind), ("vm", vm)], Int(n)))
                .collect(),
            ),
            family(
                &catalog::REMOTE_MISS_RATIO,
                vec![point(&[("vm", vm)], Float(p.remote_miss_ratio))],
            ),
            family(
                &catalog::BYTES_TRANSFERRED,
                vec![point(
                    &[("direction", "in"), ("vm", vm)],
                    Int(p.bytes_fetched),
                )],
            ),
            family(
                &catalog::FAULT_DURATION,
                vec![histogram(&[("vm", vm)], &p.fault_latency)],
            ),
            family(
                &catalog::TRANSFER_DURATION,
                p.peers
                    .iter()
                    .map(|peer| {
                        let id = peer.node_id.to_string();
                        histogram(&[("peer", &id), ("vm", vm)], &peer.transfer)
                    })
                    .collect(),
            ),
        ]);
    }
    if let Some(c) = cache {
        let vm_only = [("vm", vm)];
        out.extend([
            family(
                &catalog::CACHE_BUDGET,
                vec![point(&vm_only, Int(c.budget_pages))],
            ),
            family(
                &catalog::CACHE_RESIDENT,
                vec![point(&vm_only, Int(c.resident_pages))],
            ),
            family(
                &catalog::CACHE_EVICTIONS,
                vec![
                    point(&[("kind", "clean"), ("vm", vm)], Int(c.clean_drops)),
                    point(&[("kind", "dirty"), ("vm", vm)], Int(c.dirty_evicted_pages)),
                ],
            ),
            family(
                &catalog::CACHE_WRITEBACKS,
                vec![point(&vm_only, Int(c.writeback_pages))],
            ),
            family(
                &catalog::CACHE_REFAULTS,
                vec![
                    point(&[("source", "home"), ("vm", vm)], Int(c.refaults)),
                    point(&[("source", "staging"), ("vm", vm)], Int(c.staging_hits)),
                ],
            ),
        ]);
    }
    if let Some(f) = pager.and_then(|p| p.prefetch.as_ref()) {
        out.push(family(
            &catalog::PREFETCH_PAGES,
            vec![
                point(&[("kind", "issued"), ("vm", vm)], Int(f.issued)),
                point(&[("kind", "used"), ("vm", vm)], Int(f.used)),
                point(&[("kind", "replayed"), ("vm", vm)], Int(f.replayed)),
            ],
        ));
    }
    if let Some(e) = &s.ebpf {
        out.push(family(
            &catalog::VCPU_STALL_DURATION,
            vec![histogram(&[], &e.stall)],
        ));
    }
    // One metric, a series per source: the pager's own timing and the kernel's.
    let mut install = Vec::new();
    if let Some(p) = pager {
        install.push(histogram(
            &[("source", "pager"), ("vm", vm)],
            &p.install_latency,
        ));
    }
    if let Some(e) = &s.ebpf {
        install.push(histogram(&[("source", "ebpf")], &e.install));
    }
    out.push(family(&catalog::INSTALL_DURATION, install));
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use pagemesh_api::stats::{Bucket, EbpfStats, PagerStats, PeerStats};
    use pagemesh_api::summary::CacheSummary;

    use super::*;

    fn hist(buckets: &[(f64, u64)], count: u64, sum_us: f64, max_us: f64) -> stats::Histogram {
        stats::Histogram {
            count,
            sum_us,
            max_us,
            buckets: buckets
                .iter()
                .map(|&(le_us, count)| Bucket { le_us, count })
                .collect(),
            ..stats::Histogram::default()
        }
    }

    #[test]
    fn cumulative_buckets_become_per_bucket_counts_in_seconds() {
        let h = hist(
            &[(1.0, 2), (10.0, 2), (100.0, 7), (f64::INFINITY, 9)],
            9,
            450.0,
            250.0,
        );
        let b = Buckets::from_stats(&h);
        assert_eq!(b.bounds_s, [1e-6, 1e-5, 1e-4]);
        assert_eq!(b.counts, [2, 0, 5, 2]);
        assert_eq!(b.count, 9);
        assert_eq!(b.counts.iter().sum::<u64>(), b.count);
        assert_eq!(b.sum_s, 450e-6);
        assert_eq!(b.max_s, Some(250e-6));
    }

    #[test]
    fn empty_and_torn_histograms_stay_consistent() {
        let empty = Buckets::from_stats(&stats::Histogram::default());
        assert!(empty.bounds_s.is_empty());
        assert_eq!(empty.counts, [0]);
        assert_eq!(empty.max_s, None);
        // Buckets read after more samples arrived than `count` says.
        let torn = Buckets::from_stats(&hist(&[(5.0, 4), (f64::INFINITY, 3)], 3, 1.0, 1.0));
        assert_eq!(torn.count, 4);
        assert_eq!(torn.counts, [4, 0]);
        // The pager's real bucket bounds.
        let real = pagemesh_pager::stats::BUCKETS_US;
        let mut buckets: Vec<(f64, u64)> = real.iter().map(|&b| (b, 1)).collect();
        buckets.push((f64::INFINITY, 1));
        let b = Buckets::from_stats(&hist(&buckets, 1, 0.5, 0.5));
        assert_eq!(b.bounds_s.len(), real.len());
        assert_eq!(b.counts.len(), real.len() + 1);
        assert_eq!(b.counts[0], 1);
        assert_eq!(b.bounds_s.last(), Some(&0.1));
    }

    fn labels(p: &Point) -> Vec<(&str, &str)> {
        p.labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn a_memory_node_has_no_guest_series() {
        let f = families(&NodeStats::default());
        let names: Vec<&str> = f.iter().map(|f| f.metric.prom).collect();
        assert_eq!(
            names,
            [
                "pagemesh_uptime_seconds",
                "pagemesh_pages_held",
                "pagemesh_capacity_pages",
                "pagemesh_pages_served_total",
                "pagemesh_pages_written_back_total",
                "pagemesh_pages_under_replicated",
                "pagemesh_pages_repaired_total",
                "pagemesh_packed_pages_total",
                "pagemesh_packed_bytes_total",
                "pagemesh_errors_total",
            ]
        );
        assert!(f.iter().all(|f| !f.points.is_empty()));
    }

    #[test]
    fn a_compute_node_with_probes_has_every_metric_once() {
        let h = hist(&[(10.0, 3), (f64::INFINITY, 5)], 5, 100.0, 40.0);
        let s = NodeStats {
            pager: Some(PagerStats {
                vm: 7,
                faults_remote: 5,
                fault_latency: h.clone(),
                install_latency: h.clone(),
                lost_nodes: Vec::new(),
                peers: vec![PeerStats {
                    node_id: 1,
                    pages: 5,
                    transfer: h.clone(),
                }],
                cache: Some(CacheSummary {
                    budget_pages: 256,
                    clean_drops: 3,
                    dirty_evicted_pages: 4,
                    ..CacheSummary::default()
                }),
                prefetch: Some(pagemesh_api::stats::PrefetchStats::default()),
                ..PagerStats::default()
            }),
            ebpf: Some(EbpfStats {
                stall: h.clone(),
                install: h,
                ..EbpfStats::default()
            }),
            ..NodeStats::default()
        };
        let f = families(&s);
        assert_eq!(f.len(), catalog::ALL.len());
        for m in catalog::ALL {
            assert_eq!(f.iter().filter(|f| f.metric.prom == m.prom).count(), 1);
        }
        let install = f
            .iter()
            .find(|f| f.metric.prom == catalog::INSTALL_DURATION.prom)
            .unwrap();
        let sources: Vec<_> = install.points.iter().map(labels).collect();
        assert_eq!(
            sources,
            [
                vec![("source", "pager"), ("vm", "7")],
                vec![("source", "ebpf")]
            ]
        );
        let faults = f
            .iter()
            .find(|f| f.metric.prom == catalog::FAULTS.prom)
            .unwrap();
        assert_eq!(labels(&faults.points[0]), [("kind", "remote"), ("vm", "7")]);
        assert!(matches!(faults.points[0].value, Value::Int(5)));
        let evictions = f
            .iter()
            .find(|f| f.metric.prom == catalog::CACHE_EVICTIONS.prom)
            .unwrap();
        let kinds: Vec<_> = evictions.points.iter().map(labels).collect();
        assert_eq!(
            kinds,
            [
                vec![("kind", "clean"), ("vm", "7")],
                vec![("kind", "dirty"), ("vm", "7")]
            ]
        );
        assert!(matches!(evictions.points[1].value, Value::Int(4)));
        let errors = f
            .iter()
            .find(|f| f.metric.prom == catalog::ERRORS.prom)
            .unwrap();
        assert_eq!(
            labels(errors.points.last().unwrap()),
            [("kind", "writeback")]
        );
    }

    #[test]
    fn a_compute_node_without_a_budget_has_no_cache_series() {
        let s = NodeStats {
            pager: Some(PagerStats::default()),
            ..NodeStats::default()
        };
        let f = families(&s);
        assert!(
            f.iter()
                .all(|f| !f.metric.prom.starts_with("pagemesh_cache_"))
        );
        let errors = f
            .iter()
            .find(|f| f.metric.prom == catalog::ERRORS.prom)
            .unwrap();
        assert_eq!(errors.points.len(), 3);
    }
}
