//! Every metric the node exports, named once for both exporters: its Prometheus name
//! (`GET /metrics`, [`super::prometheus_text`]), its OpenTelemetry name and unit (OTLP,
//! `crate::otlp`), and the help text both carry. `docs/metrics.md` describes each one.

/// One metric as both exporters name it.
pub(crate) struct Metric {
    /// Prometheus name (`pagemesh_…`, base units, `_total` for counters).
    pub(crate) prom: &'static str,
    /// OpenTelemetry name (`pagemesh.…`).
    pub(crate) otlp: &'static str,
    /// OpenTelemetry unit (UCUM).
    pub(crate) unit: &'static str,
    /// Help (Prometheus) and description (OpenTelemetry).
    pub(crate) help: &'static str,
}

pub(crate) const UPTIME: Metric = Metric {
    prom: "pagemesh_uptime_seconds",
    otlp: "pagemesh.uptime",
    unit: "s",
    help: "Seconds since the node started.",
};

pub(crate) const PAGES_HELD: Metric = Metric {
    prom: "pagemesh_pages_held",
    otlp: "pagemesh.pages.held",
    unit: "{page}",
    help: "Guest pages this node holds for others.",
};

pub(crate) const CAPACITY: Metric = Metric {
    prom: "pagemesh_capacity_pages",
    otlp: "pagemesh.capacity_pages",
    unit: "{page}",
    help: "Guest pages this node can hold for others.",
};

pub(crate) const PAGES_SERVED: Metric = Metric {
    prom: "pagemesh_pages_served_total",
    otlp: "pagemesh.pages.served",
    unit: "{page}",
    help: "Pages this node's page server sent (claimed: freed here after sending).",
};

pub(crate) const WRITTEN_BACK: Metric = Metric {
    prom: "pagemesh_pages_written_back_total",
    otlp: "pagemesh.pages.written_back",
    unit: "{page}",
    help: "Pages received from compute nodes (eviction).",
};

pub(crate) const ERRORS: Metric = Metric {
    prom: "pagemesh_errors_total",
    otlp: "pagemesh.errors",
    unit: "{error}",
    help: "Errors by kind: bad_frame (malformed requests to the page server), fault (faults that could not be served).",
};

pub(crate) const FAULTS: Metric = Metric {
    prom: "pagemesh_faults_total",
    otlp: "pagemesh.faults",
    unit: "{fault}",
    help: "Guest page faults served, by kind: remote (fetched from another node), local_zero (never-written page zero-filled here), spurious (already present).",
};

pub(crate) const REMOTE_MISS_RATIO: Metric = Metric {
    prom: "pagemesh_remote_miss_ratio",
    otlp: "pagemesh.remote_miss_ratio",
    unit: "1",
    help: "Faults served remotely / (remote + local zero-fill).",
};

pub(crate) const BYTES_TRANSFERRED: Metric = Metric {
    prom: "pagemesh_bytes_transferred_total",
    otlp: "pagemesh.bytes_transferred",
    unit: "By",
    help: "Bytes of page data fetched from other nodes.",
};

pub(crate) const FAULT_DURATION: Metric = Metric {
    prom: "pagemesh_fault_duration_seconds",
    otlp: "pagemesh.fault.duration",
    unit: "s",
    help: "Time to serve a fault in the pager: event read to page installed.",
};

pub(crate) const INSTALL_DURATION: Metric = Metric {
    prom: "pagemesh_install_duration_seconds",
    otlp: "pagemesh.install.duration",
    unit: "s",
    help: "Time to install a page (UFFDIO_COPY, which also wakes the vCPU); source=pager is measured by the pager, source=ebpf in the kernel.",
};

pub(crate) const TRANSFER_DURATION: Metric = Metric {
    prom: "pagemesh_transfer_duration_seconds",
    otlp: "pagemesh.transfer.duration",
    unit: "s",
    help: "Time to fetch a page from a peer: request sent to last byte received.",
};

pub(crate) const VCPU_STALL_DURATION: Metric = Metric {
    prom: "pagemesh_vcpu_stall_duration_seconds",
    otlp: "pagemesh.vcpu_stall.duration",
    unit: "s",
    help: "vCPU stall per fault measured in the kernel (eBPF): MMU fault entry to page resolved.",
};
