//! Every metric the node exports, named once for both exporters: its Prometheus name
//! (`GET /metrics`, [`super::prometheus_text`]), its OpenTelemetry name and unit (OTLP,
//! `crate::otlp`), its kind, and the help text both carry. `docs/metrics.md` describes each
//! one; [`super::families`] says which series of each a snapshot has.

/// What a metric is, which decides how each exporter writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Only goes up while the node runs: a Prometheus counter, an OTLP monotonic cumulative Sum.
    Counter,
    /// Goes up and down: a Prometheus and OTLP gauge.
    Gauge,
    /// A distribution of durations: a Prometheus histogram, an OTLP cumulative Histogram.
    Histogram,
}

/// One metric as both exporters name it.
#[derive(Debug)]
pub(crate) struct Metric {
    /// Prometheus name (`pagemesh_…`, base units, `_total` for counters), as in the samples.
    pub(crate) prom: &'static str,
    /// OpenTelemetry name (`pagemesh.…`).
    pub(crate) otlp: &'static str,
    /// OpenTelemetry unit (UCUM).
    pub(crate) unit: &'static str,
    /// Counter, gauge or histogram.
    pub(crate) kind: Kind,
    /// Help (Prometheus) and description (OpenTelemetry).
    pub(crate) help: &'static str,
}

pub(crate) const UPTIME: Metric = Metric {
    prom: "pagemesh_uptime_seconds",
    otlp: "pagemesh.uptime",
    unit: "s",
    kind: Kind::Gauge,
    help: "Seconds since the node started.",
};

pub(crate) const PAGES_HELD: Metric = Metric {
    prom: "pagemesh_pages_held",
    otlp: "pagemesh.pages.held",
    unit: "{page}",
    kind: Kind::Gauge,
    help: "Guest pages this node holds for others.",
};

pub(crate) const CAPACITY: Metric = Metric {
    prom: "pagemesh_capacity_pages",
    otlp: "pagemesh.capacity_pages",
    unit: "{page}",
    kind: Kind::Gauge,
    help: "Guest pages this node can hold for others.",
};

pub(crate) const PAGES_SERVED: Metric = Metric {
    prom: "pagemesh_pages_served_total",
    otlp: "pagemesh.pages.served",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages this node's page server sent (claimed: freed here once the fetching node acknowledged them).",
};

pub(crate) const WRITTEN_BACK: Metric = Metric {
    prom: "pagemesh_pages_written_back_total",
    otlp: "pagemesh.pages.written_back",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages received from compute nodes (eviction).",
};

pub(crate) const PAGES_TO_REPAIR: Metric = Metric {
    prom: "pagemesh_pages_under_replicated",
    otlp: "pagemesh.pages.under_replicated",
    unit: "{page}",
    kind: Kind::Gauge,
    help: "Pages of VMs that lost a memory node which this node is to hold a new copy of and has not copied yet.",
};

pub(crate) const PAGES_REPAIRED: Metric = Metric {
    prom: "pagemesh_pages_repaired_total",
    otlp: "pagemesh.pages.repaired",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages this node copied from a surviving home to restore a VM's replicas.",
};

pub(crate) const PACKED_PAGES: Metric = Metric {
    prom: "pagemesh_packed_pages_total",
    otlp: "pagemesh.packed.pages",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages this page server sent or received packed (--compress: LZ4, or a zero page as a length).",
};

pub(crate) const PACKED_BYTES: Metric = Metric {
    prom: "pagemesh_packed_bytes_total",
    otlp: "pagemesh.packed.bytes",
    unit: "By",
    kind: Kind::Counter,
    help: "Bytes those packed pages took on the wire (4096 a page plain).",
};

pub(crate) const ERRORS: Metric = Metric {
    prom: "pagemesh_errors_total",
    otlp: "pagemesh.errors",
    unit: "{error}",
    kind: Kind::Counter,
    help: "Errors by kind: bad_frame (malformed requests to the page server), unauthenticated (peers refused), fault (faults that could not be served), writeback (page cache write-back batches that failed; their pages stayed cached).",
};

pub(crate) const FAULTS: Metric = Metric {
    prom: "pagemesh_faults_total",
    otlp: "pagemesh.faults",
    unit: "{fault}",
    kind: Kind::Counter,
    help: "Guest page faults served, by kind: remote (fetched from another node), local_zero (never-written page zero-filled here), spurious (already present).",
};

pub(crate) const REMOTE_MISS_RATIO: Metric = Metric {
    prom: "pagemesh_remote_miss_ratio",
    otlp: "pagemesh.remote_miss_ratio",
    unit: "1",
    kind: Kind::Gauge,
    help: "Faults served remotely / (remote + local zero-fill).",
};

pub(crate) const BYTES_TRANSFERRED: Metric = Metric {
    prom: "pagemesh_bytes_transferred_total",
    otlp: "pagemesh.bytes_transferred",
    unit: "By",
    kind: Kind::Counter,
    help: "Bytes of page data fetched from other nodes.",
};

pub(crate) const FAULT_DURATION: Metric = Metric {
    prom: "pagemesh_fault_duration_seconds",
    otlp: "pagemesh.fault.duration",
    unit: "s",
    kind: Kind::Histogram,
    help: "Time to serve a fault in the pager: event read to page installed.",
};

pub(crate) const INSTALL_DURATION: Metric = Metric {
    prom: "pagemesh_install_duration_seconds",
    otlp: "pagemesh.install.duration",
    unit: "s",
    kind: Kind::Histogram,
    help: "Time to install a page (UFFDIO_COPY, which also wakes the vCPU); source=pager is measured by the pager, source=ebpf in the kernel.",
};

pub(crate) const TRANSFER_DURATION: Metric = Metric {
    prom: "pagemesh_transfer_duration_seconds",
    otlp: "pagemesh.transfer.duration",
    unit: "s",
    kind: Kind::Histogram,
    help: "Time to fetch a page from a peer: request sent to last byte received.",
};

pub(crate) const VCPU_STALL_DURATION: Metric = Metric {
    prom: "pagemesh_vcpu_stall_duration_seconds",
    otlp: "pagemesh.vcpu_stall.duration",
    unit: "s",
    kind: Kind::Histogram,
    help: "vCPU stall per fault measured in the kernel (eBPF): MMU fault entry to page resolved.",
};

pub(crate) const CACHE_BUDGET: Metric = Metric {
    prom: "pagemesh_cache_budget_pages",
    otlp: "pagemesh.cache.budget",
    unit: "{page}",
    kind: Kind::Gauge,
    help: "The VM's local memory budget (--local-memory), in guest pages; only under a budget.",
};

pub(crate) const CACHE_RESIDENT: Metric = Metric {
    prom: "pagemesh_cache_resident_pages",
    otlp: "pagemesh.cache.resident",
    unit: "{page}",
    kind: Kind::Gauge,
    help: "Guest pages resident on this compute node now (mapped and staged), at most the budget.",
};

pub(crate) const CACHE_EVICTIONS: Metric = Metric {
    prom: "pagemesh_cache_evictions_total",
    otlp: "pagemesh.cache.evictions",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages evicted from the page cache, by kind: clean (dropped without a transfer), dirty (written back first).",
};

pub(crate) const CACHE_WRITEBACKS: Metric = Metric {
    prom: "pagemesh_cache_writeback_pages_total",
    otlp: "pagemesh.cache.writebacks",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Dirty pages the page cache wrote back to their home memory nodes.",
};

pub(crate) const CACHE_REFAULTS: Metric = Metric {
    prom: "pagemesh_cache_refaults_total",
    otlp: "pagemesh.cache.refaults",
    unit: "{fault}",
    kind: Kind::Counter,
    help: "Faults on pages evicted before, by where they came back from: staging (put back without a transfer), home (fetched or zero-filled again).",
};

pub(crate) const PREFETCH_PAGES: Metric = Metric {
    prom: "pagemesh_prefetch_pages_total",
    otlp: "pagemesh.prefetch.pages",
    unit: "{page}",
    kind: Kind::Counter,
    help: "Pages prefetch brought in ahead of the guest (kind issued), of those the pages seen used (kind used, a lower bound; docs/prefetch.md), and pages of a replayed working set (kind replayed).",
};

/// Every metric.
#[cfg(test)]
pub(crate) const ALL: [&Metric; 23] = [
    &UPTIME,
    &PAGES_HELD,
    &CAPACITY,
    &PAGES_SERVED,
    &WRITTEN_BACK,
    &PAGES_TO_REPAIR,
    &PAGES_REPAIRED,
    &PACKED_PAGES,
    &PACKED_BYTES,
    &ERRORS,
    &FAULTS,
    &REMOTE_MISS_RATIO,
    &BYTES_TRANSFERRED,
    &FAULT_DURATION,
    &INSTALL_DURATION,
    &TRANSFER_DURATION,
    &VCPU_STALL_DURATION,
    &CACHE_BUDGET,
    &CACHE_RESIDENT,
    &CACHE_EVICTIONS,
    &CACHE_WRITEBACKS,
    &CACHE_REFAULTS,
    &PREFETCH_PAGES,
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_follow_the_conventions() {
        let prom: HashSet<_> = ALL.iter().map(|m| m.prom).collect();
        let otlp: HashSet<_> = ALL.iter().map(|m| m.otlp).collect();
        assert_eq!((prom.len(), otlp.len()), (ALL.len(), ALL.len()));
        for m in ALL {
            assert!(m.prom.starts_with("pagemesh_"), "{}", m.prom);
            assert!(m.otlp.starts_with("pagemesh."), "{}", m.otlp);
            // Counters end with `_total` (the Prometheus encoder adds it back to the family
            // name), and only counters do.
            assert_eq!(
                m.prom.ends_with("_total"),
                m.kind == Kind::Counter,
                "{}",
                m.prom
            );
            // Durations are in seconds, in both.
            if m.kind == Kind::Histogram {
                assert!(m.prom.ends_with("_seconds") && m.unit == "s", "{}", m.prom);
            }
            assert!(
                m.help.ends_with('.') && !m.help.contains('\n'),
                "{}",
                m.prom
            );
        }
    }
}
