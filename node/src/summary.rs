//! The run's summary: printed for people and, with `--json`, written for programs.

use std::collections::BTreeMap;

use pagemesh_api::{NodeId, Vm, error_chain};

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
    if let Some(path) = &settings.json {
        let v = serde_json::json!({
            "node": id, "vm": vm.id, "ok": false, "error": error_chain(e),
        });
        std::fs::write(path, v.to_string() + "\n")
            .map_err(|e| NodeError::Summary(path.display().to_string(), e))?;
    }
    Ok(())
}

/// Prints the run's summary, writes it when `--json` asks, and returns whether it was good.
pub(crate) fn report(
    settings: &Settings,
    id: NodeId,
    vm: Option<&Vm>,
    o: &RunOutcome,
    held_before: &BTreeMap<NodeId, u64>,
    held_after: &BTreeMap<NodeId, u64>,
    ebpf: Option<serde_json::Value>,
) -> Result<bool, NodeError> {
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
        "  fault latency: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        s.fault_p50_us, s.fault_p90_us, s.fault_p99_us, s.fault_max_us
    );
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
    if let Some(path) = &settings.json {
        let v = serde_json::json!({
            "node": id,
            "vm": vm.map(|v| v.id),
            "guest_pages": vm.map_or(w.pages_done, |v| v.placement.pages()),
            "faults": {"remote": s.remote, "local_zero": s.local_zero, "spurious": s.spurious, "errors": s.errors},
            "remote_miss_ratio": s.remote_miss_ratio,
            "fault_p50_us": s.fault_p50_us,
            "fault_p90_us": s.fault_p90_us,
            "fault_p99_us": s.fault_p99_us,
            "fault_max_us": s.fault_max_us,
            "bytes_fetched": s.bytes_fetched,
            "us_per_page": o.us_per_page(),
            "elapsed_s": o.elapsed.as_secs_f64(),
            "result": w,
            "expected_checksum": o.expected_checksum,
            "held_before": held_before,
            "held_after": held_after,
            "ebpf": ebpf,
            "ok": ok,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
        .map_err(|e| NodeError::Summary(path.display().to_string(), e))?;
    }
    Ok(ok)
}
