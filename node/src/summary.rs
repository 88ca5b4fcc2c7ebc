//! The run's summary: printed for people and, with `--json`, written for programs.

use std::collections::BTreeMap;

use pagemesh_api::summary::{CacheSummary, EbpfSummary, FaultCounts, GuestResult, RunSummary};
use pagemesh_api::{NodeId, Vm, error_chain};
use pagemesh_pager::StatsSnapshot;
use pagemesh_vmm::WorkloadResult;

use crate::compute::RunOutcome;
use crate::config::Settings;
use crate::error::NodeError;
use crate::lifecycle::ComputeError;

/// Writes the summary of a run that failed, when `--json` asks for one.
pub(crate) fn write_failure(
    settings: &Settings,
    id: NodeId,
    vm: &Vm,
    e: &ComputeError,
) -> Result<(), NodeError> {
    write(
        settings,
        &RunSummary::failed(id, Some(vm.id), error_chain(e)),
    )
}

/// Writes `summary` to the `--json` file, if there is one.
pub(crate) fn write(settings: &Settings, summary: &RunSummary) -> Result<(), NodeError> {
    let Some(path) = &settings.compute.json else {
        return Ok(());
    };
    // Plain data with string map keys: serializing it cannot fail.
    let text = serde_json::to_string_pretty(summary).expect("a run summary serializes");
    std::fs::write(path, text + "\n").map_err(|e| NodeError::Summary(path.display().to_string(), e))
}

/// The pager's fault counters as the summary reports them.
pub(crate) fn faults(s: &StatsSnapshot) -> FaultCounts {
    FaultCounts {
        remote: s.remote,
        local_zero: s.local_zero,
        spurious: s.spurious,
        errors: s.errors,
    }
}

/// The fault handlers' CPU time per fault they served, µs.
pub(crate) fn handler_cpu_us_per_fault(s: &StatsSnapshot) -> f64 {
    let served = s.remote + s.local_zero + s.spurious + s.staging_hits + s.write_protect;
    match served {
        0 => 0.0,
        n => s.handler_cpu_ns as f64 / 1000.0 / n as f64,
    }
}

/// The page cache's lines of a run summary.
pub(crate) fn print_cache(c: &CacheSummary) {
    println!(
        "  cache: budget {} pages ({} staging), resident at most {}; {} evicted ({} clean \
         drops, {} dirty written back), {} refaults, {} staging hits, {} pages written back",
        c.budget_pages,
        c.staging_pages,
        c.resident_max_pages,
        c.evictions,
        c.clean_drops,
        c.dirty_evicted_pages,
        c.refaults,
        c.staging_hits,
        c.writeback_pages
    );
    if c.budget_waits > 0 || c.writeback_errors > 0 {
        println!(
            "  cache: {} faults waited for a free page, {} write-backs failed",
            c.budget_waits, c.writeback_errors
        );
    }
}

/// The RDMA line of a run summary.
pub(crate) fn print_rdma(r: &pagemesh_api::summary::RdmaSummary) {
    println!(
        "  rdma{}: {} pages by one-sided READ, {} over TCP, {} stale runs, {} pages claimed",
        if r.emulated { " (emulated)" } else { "" },
        r.rdma_pages,
        r.tcp_pages,
        r.stale_runs,
        r.claimed_pages
    );
}

/// The prefetch line of a run summary.
pub(crate) fn print_prefetch(p: &pagemesh_api::stats::PrefetchStats) {
    println!(
        "  prefetch: {} pages in {} windows, {} seen used (accuracy {:.3}, coverage {:.3}), \
         {} touched in flight, {} batches failed, {} hints dropped",
        p.issued, p.windows, p.used, p.accuracy, p.coverage, p.in_flight, p.failed, p.dropped_hints
    );
    if p.replayed > 0 {
        println!(
            "  replay: {} pages of a working set brought in ahead",
            p.replayed
        );
    }
}

fn guest_result(w: &WorkloadResult) -> GuestResult {
    GuestResult {
        pages_done: w.pages_done,
        checksum: w.checksum,
        first_bad_page: w.first_bad_page,
        bad_pages: w.bad_pages,
    }
}

/// Prints the run's summary, writes it when `--json` asks, and returns whether it was good.
/// What the memory nodes of a run held and which were lost, for its summary.
#[derive(Default)]
pub(crate) struct MemoryNodes {
    /// Pages each held for the VM before the run.
    pub(crate) held_before: BTreeMap<NodeId, u64>,
    /// And after it.
    pub(crate) held_after: BTreeMap<NodeId, u64>,
    /// Those the compute node lost (with replicas).
    pub(crate) lost: Vec<NodeId>,
}

pub(crate) fn report(
    settings: &Settings,
    id: NodeId,
    vm: Option<&Vm>,
    o: &RunOutcome,
    memory: &MemoryNodes,
    ebpf: Option<EbpfSummary>,
) -> Result<bool, NodeError> {
    let MemoryNodes {
        held_before,
        held_after,
        lost,
    } = memory;
    let ok = o.ok();
    let w = &o.result;
    let s = &o.stats;
    println!(
        "vm {}: {} pages in {:.3} s ({:.2} µs/page)",
        vm.map_or(0, |v| v.id),
        w.pages_done,
        o.elapsed.as_secs_f64(),
        o.us_per_page()
    );
    println!(
        "  faults: {} remote, {} local zero-fill, {} spurious (remote-miss ratio {:.3})",
        s.remote, s.local_zero, s.spurious, s.remote_miss_ratio
    );
    println!(
        "  fault latency: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs; fault \
         handlers' CPU {:.1} µs per fault",
        s.fault_p50_us,
        s.fault_p90_us,
        s.fault_p99_us,
        s.fault_max_us,
        handler_cpu_us_per_fault(s)
    );
    if let Some(c) = &o.cache {
        print_cache(c);
    }
    if !lost.is_empty() {
        let nodes: Vec<String> = lost.iter().map(NodeId::to_string).collect();
        println!(
            "  replicas: lost node {}; the guest ran on the other copies",
            nodes.join(", ")
        );
    }
    if let Some(p) = &s.prefetch {
        print_prefetch(p);
    }
    if let Some(r) = crate::rdma::summary() {
        print_rdma(&r);
    }
    if let Some(e) = &ebpf {
        println!(
            "  eBPF: {} vCPU stalls, p50 {:.1} µs, p99 {:.1} µs; the probes' own kernel time \
             {:.0} ns per stall ({:.1} program runs)",
            e.faults, e.stall_p50_us, e.stall_p99_us, e.cost_ns_per_fault, e.runs_per_fault
        );
    }
    for (n, before) in held_before {
        println!(
            "  node {n}: held {before} pages before, {} after",
            held_after.get(n).copied().unwrap_or(0)
        );
    }
    match (w.first_bad_page, o.expected_checksum) {
        (Some(p), _) => println!(
            "  verification FAILED: {} bad pages, first bad page {p}",
            w.bad_pages
        ),
        (None, Some(c)) if c != w.checksum => println!(
            "  checksum MISMATCH: guest {:#x}, expected {c:#x}",
            w.checksum
        ),
        (None, Some(_)) => println!("  content: all {} pages as expected", w.pages_done),
        (None, None) => println!("  content: not checked (unknown in advance)"),
    }
    println!("  result: {}", if ok { "OK" } else { "FAILED" });
    write(
        settings,
        &RunSummary {
            node: id,
            vm: vm.map(|v| v.id),
            guest_pages: vm.map_or(w.pages_done, |v| v.placement.pages()),
            faults: faults(s),
            remote_miss_ratio: s.remote_miss_ratio,
            fault_p50_us: s.fault_p50_us,
            fault_p90_us: s.fault_p90_us,
            fault_p99_us: s.fault_p99_us,
            fault_max_us: s.fault_max_us,
            remote_p50_us: s.remote_p50_us,
            remote_p99_us: s.remote_p99_us,
            fault_cdf_us: s.fault_cdf_us.clone(),
            handler_cpu_us_per_fault: handler_cpu_us_per_fault(s),
            bytes_fetched: s.bytes_fetched,
            us_per_page: o.us_per_page(),
            elapsed_s: o.elapsed.as_secs_f64(),
            result: Some(guest_result(w)),
            expected_checksum: o.expected_checksum,
            lost_nodes: lost.clone(),
            held_before: held_before.clone(),
            held_after: held_after.clone(),
            linux: None,
            ebpf,
            cache: o.cache,
            prefetch: s.prefetch,
            rdma: crate::rdma::summary(),
            ok,
            error: None,
        },
    )?;
    Ok(ok)
}
