//! The summary of one guest run that a compute node writes with `--json FILE`; xtask, the
//! end-to-end tests and anything else that reads it deserialize this type instead of picking
//! keys out of untyped JSON.
//!
//! ```json
//! {"node": 0, "vm": 1, "guest_pages": 16384,
//!  "faults": {"remote": 16384, "local_zero": 0, "spurious": 0, "errors": 0},
//!  "remote_miss_ratio": 1.0, "fault_p50_us": 31.3, "fault_p90_us": 38.0,
//!  "fault_p99_us": 47.3, "fault_max_us": 210.0, "bytes_fetched": 67108864,
//!  "us_per_page": 60.4, "elapsed_s": 0.99,
//!  "result": {"pages_done": 16384, "checksum": 1234, "first_bad_page": null, "bad_pages": 0},
//!  "expected_checksum": 1234, "held_before": {"1": 8192, "2": 8192},
//!  "held_after": {"1": 0, "2": 0}, "ebpf": null, "ok": true}
//! ```
//!
//! A run that stopped with an error (a memory node died) has `"ok": false` and an `error`;
//! its figures were never measured and are left at their defaults (zero, empty, `null`). A
//! Linux guest has no `result` but a `linux` object. A field missing when read takes its
//! default: a summary without `ok` reads as not ok.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{NodeId, VmId};

/// What a compute node reports about one guest run (`pagemesh-node --json FILE`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct RunSummary {
    /// The compute node.
    pub node: NodeId,
    /// The VM, `None` for a run without a coordinator (`--backing uffd-local` or
    /// `demand-zero`).
    pub vm: Option<VmId>,
    /// Pages of guest RAM.
    pub guest_pages: u64,
    /// Faults the pager served, by kind.
    pub faults: FaultCounts,
    /// remote / (remote + local_zero); 0 when there were neither.
    pub remote_miss_ratio: f64,
    /// Median fault latency in the pager (event read → page installed), µs.
    pub fault_p50_us: f64,
    /// 90th percentile fault latency, µs.
    pub fault_p90_us: f64,
    /// 99th percentile fault latency, µs.
    pub fault_p99_us: f64,
    /// Slowest fault, µs.
    pub fault_max_us: f64,
    /// Median latency of the faults served by a fetch from a memory node alone, µs: under a
    /// local memory budget the fault figures above also count write-protect faults and
    /// staging hits, which need no transfer.
    #[serde(default)]
    pub remote_p50_us: f64,
    /// 99th percentile of those, µs.
    #[serde(default)]
    pub remote_p99_us: f64,
    /// The pager's fault latency at the quantiles 0, 0.01, ..., 1 (the last the slowest
    /// fault), µs: its CDF (`cargo xtask bench --plot` draws it); empty without faults.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fault_cdf_us: Vec<f64>,
    /// CPU time the fault handler threads spent per fault they served, µs (user and system:
    /// what serving a fault costs the node, polling included); 0 without faults.
    #[serde(default)]
    pub handler_cpu_us_per_fault: f64,
    /// Bytes fetched from memory nodes.
    pub bytes_fetched: u64,
    /// Guest wall time per page visited, µs (0 for a Linux guest, which visits no pages).
    pub us_per_page: f64,
    /// Guest wall time, seconds.
    pub elapsed_s: f64,
    /// What the built-in guest reported; `None` for a Linux guest and a failed run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<GuestResult>,
    /// The checksum the built-in guest should have reported, when known in advance.
    pub expected_checksum: Option<u64>,
    /// Memory nodes the compute node lost during the run (with `--replicas`, the guest ran
    /// on their pages' other copies), in the order it lost them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_nodes: Vec<NodeId>,
    /// Pages each memory node held for the VM before the run.
    pub held_before: BTreeMap<NodeId, u64>,
    /// Pages each memory node held for the VM after the run (before it was released).
    pub held_after: BTreeMap<NodeId, u64>,
    /// How a Linux guest's boot went; `None` for the built-in guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxRun>,
    /// The eBPF probes' figures, `None` when they were not loaded.
    pub ebpf: Option<EbpfSummary>,
    /// The page cache's figures, for a run under a local memory budget (`--local-memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSummary>,
    /// What prefetch did, for a run with `--prefetch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<crate::stats::PrefetchStats>,
    /// How remote pages came, for a compute node that reads over RDMA (`--transport`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaSummary>,
    /// Whether the guest saw exactly the memory it should have (and the run did not fail).
    pub ok: bool,
    /// Why the run stopped, for a run that failed before its guest finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a compute node that reads over RDMA got its remote pages.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct RdmaSummary {
    /// Whether the reads were emulated (`--transport rdma-emulated`: no device).
    pub emulated: bool,
    /// Pages read with one-sided RDMA READ (fetched or read), their tags checked.
    pub rdma_pages: u64,
    /// Pages an RDMA connection fetched or read over its TCP side instead: not mapped, a
    /// stale slot, or after its queue pair failed. (Pages of memory nodes reached over TCP
    /// alone, having no RDMA, are in neither count.)
    pub tcp_pages: u64,
    /// Runs whose slot tags did not match the slot map (then fetched over TCP).
    pub stale_runs: u64,
    /// Pages claimed with Claim requests (fetched by RDMA, freed on their home).
    pub claimed_pages: u64,
}

/// What the page cache did in a run under a local memory budget.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct CacheSummary {
    /// The budget, in pages (mapped and staged together).
    pub budget_pages: u64,
    /// Of it, the staging area's slots.
    pub staging_pages: u64,
    /// The most pages resident (mapped and staged) at once.
    pub resident_max_pages: u64,
    /// Resident at the end.
    pub resident_pages: u64,
    /// Pages that left this node (dropped, after a write-back if dirty).
    pub evictions: u64,
    /// Of those, pages that were clean: dropped without any transfer.
    pub clean_drops: u64,
    /// Pages written back to their homes.
    pub writeback_pages: u64,
    /// Evicted pages that were dirty (written back, then dropped).
    pub dirty_evicted_pages: u64,
    /// Pages written back that the guest took back from staging while their write-back
    /// was on the wire, so they stayed: `writeback_pages` is `dirty_evicted_pages` plus
    /// these, exactly.
    pub writeback_retained_pages: u64,
    /// Faults on pages that had been evicted before (fetched or zero-filled again).
    pub refaults: u64,
    /// Pages moved from guest memory to the staging area.
    pub staged: u64,
    /// Faults on staged pages, put back from the staging area without a transfer.
    pub staging_hits: u64,
    /// First writes to write-protected (clean) pages.
    pub write_protect_faults: u64,
    /// Faults that had to wait for the reclaimer to free a frame.
    pub budget_waits: u64,
    /// Write-back batches that failed (their pages stayed cached).
    pub writeback_errors: u64,
}

impl RunSummary {
    /// The summary of a run that stopped with `error` before its guest finished.
    pub fn failed(node: NodeId, vm: Option<VmId>, error: String) -> Self {
        Self {
            node,
            vm,
            ok: false,
            error: Some(error),
            ..Self::default()
        }
    }

    /// Pages the built-in guest visited (0 without a `result`).
    pub fn pages_done(&self) -> u64 {
        self.result.map_or(0, |r| r.pages_done)
    }

    /// Pages whose content differed from the pattern (0 without a `result`).
    pub fn bad_pages(&self) -> u64 {
        self.result.map_or(0, |r| r.bad_pages)
    }
}

/// Faults the pager served, by kind.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(default)]
pub struct FaultCounts {
    /// Served by fetching the page from a memory node.
    pub remote: u64,
    /// Served by zero-filling a never-written page locally.
    pub local_zero: u64,
    /// On pages already present (another thread's fault installed them first).
    pub spurious: u64,
    /// Faults that could not be served.
    pub errors: u64,
}

impl std::ops::AddAssign for FaultCounts {
    fn add_assign(&mut self, o: Self) {
        self.remote += o.remote;
        self.local_zero += o.local_zero;
        self.spurious += o.spurious;
        self.errors += o.errors;
    }
}

/// What the built-in guest reported at the end of its workload (the node's
/// `pagemesh_vmm::WorkloadResult`, which this crate cannot name).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(default)]
pub struct GuestResult {
    /// Pages visited.
    pub pages_done: u64,
    /// Sum of the first words read (or written).
    pub checksum: u64,
    /// First page (of RAM) whose content differed from the pattern (`verify` only).
    pub first_bad_page: Option<u64>,
    /// Pages whose content differed (`verify` only).
    pub bad_pages: u64,
}

/// How a Linux guest's boot went.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default)]
pub struct LinuxRun {
    /// How it ended, in words (`"stopped by signal"`, `"the guest reset the machine …"`).
    pub exit: String,
    /// Lines the serial console printed.
    pub console_lines: u64,
    /// Instructions the VMM emulated for the guest.
    pub fixups: u64,
    /// Whether the console printed the kernel's banner (`Linux version`).
    pub reached_linux_version: bool,
    /// Whether it printed the memory line (`Memory:`).
    pub reached_memory: bool,
    /// Whether the initramfs's init ran (`pagemesh-init`).
    pub reached_init: bool,
    /// Seconds after boot at which each milestone first appeared.
    pub milestones_s: BTreeMap<String, f64>,
    /// The last console lines.
    pub console_tail: Vec<String>,
}

/// The eBPF probes' figures for a run, measured in the kernel. A figure with no samples is 0
/// (`transfer_p50_us` when every fault was a local zero-fill). The node's `/stats` carries
/// the full histograms ([`crate::stats::EbpfStats`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(default)]
pub struct EbpfSummary {
    /// vCPU stalls measured (the pager's faults plus the guest's first touches of its system
    /// region).
    pub faults: u64,
    /// Median vCPU stall, µs.
    pub stall_p50_us: f64,
    /// 99th percentile vCPU stall, µs.
    pub stall_p99_us: f64,
    /// Median `UFFDIO_COPY` install time, µs.
    pub install_p50_us: f64,
    /// Median page transfer time over all peers, µs.
    pub transfer_p50_us: f64,
    /// The probes' own kernel time per stall: every program's run time (the kernel's BPF
    /// statistics) summed, over `faults`, ns. 0 when the statistics could not be turned on.
    pub cost_ns_per_fault: f64,
    /// Program runs per stall (every program, every tracepoint hit of the node's threads).
    pub runs_per_fault: f64,
    /// Where the sampled stalls' time went; `None` when no sample could be matched with the
    /// fault handler's record of its fault.
    pub breakdown: Option<StallBreakdown>,
}

/// A vCPU stall cut in four at the fault handler's clock readings, for the sampled stalls
/// (`StallSample`s) matched with the handler's record of the same fault: **delivery** (the
/// stall's start in KVM's MMU to the handler's `read` of the event returning), **fetch**
/// (then to the install ioctl's start: the transfer, 0 for a zero-fill), **install** (the
/// `UFFDIO_COPY`), **resume** (the install's end to the page resolved in KVM: the vCPU woken
/// and back in its fault). The four means add up to `stall_us` exactly; `stall_all_us` is the
/// mean of every sampled stall, matched or not, which they are held to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(default)]
pub struct StallBreakdown {
    /// Sampled stalls matched with a handler record.
    pub samples: u64,
    /// Sampled stalls in all.
    pub of_samples: u64,
    /// Mean delivery, µs.
    pub delivery_us: f64,
    /// Mean fetch, µs.
    pub fetch_us: f64,
    /// Mean install, µs.
    pub install_us: f64,
    /// Mean resume, µs.
    pub resume_us: f64,
    /// Mean stall of the matched samples, µs (the four means' sum).
    pub stall_us: f64,
    /// Mean stall of every sample, µs.
    pub stall_all_us: f64,
    /// Median delivery, µs.
    pub delivery_p50_us: f64,
    /// Median fetch, µs.
    pub fetch_p50_us: f64,
    /// Median install, µs.
    pub install_p50_us: f64,
    /// Median resume, µs.
    pub resume_p50_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunSummary {
        RunSummary {
            node: 0,
            vm: Some(3),
            guest_pages: 16384,
            faults: FaultCounts {
                remote: 16384,
                local_zero: 0,
                spurious: 1,
                errors: 0,
            },
            remote_miss_ratio: 1.0,
            fault_p50_us: 31.25,
            fault_p90_us: 38.5,
            fault_p99_us: 47.25,
            fault_max_us: 210.0,
            // Not in summaries written before it existed.
            remote_p50_us: 0.0,
            remote_p99_us: 0.0,
            fault_cdf_us: Vec::new(),
            handler_cpu_us_per_fault: 0.0,
            bytes_fetched: 16384 * 4096,
            us_per_page: 60.5,
            elapsed_s: 0.991,
            result: Some(GuestResult {
                pages_done: 16384,
                checksum: 0xdead_beef,
                first_bad_page: None,
                bad_pages: 0,
            }),
            expected_checksum: Some(0xdead_beef),
            lost_nodes: Vec::new(),
            held_before: BTreeMap::from([(1, 8192), (2, 8192)]),
            held_after: BTreeMap::from([(1, 0), (2, 0)]),
            linux: None,
            ebpf: Some(EbpfSummary {
                faults: 16387,
                stall_p50_us: 49.5,
                stall_p99_us: 114.25,
                install_p50_us: 3.25,
                transfer_p50_us: 25.5,
                // Not in summaries written before they existed.
                cost_ns_per_fault: 0.0,
                runs_per_fault: 0.0,
                breakdown: None,
            }),
            ok: true,
            error: None,
            cache: None,
            prefetch: None,
            rdma: None,
        }
    }

    #[test]
    fn a_summary_round_trips() {
        let s = sample();
        let text = serde_json::to_string_pretty(&s).unwrap();
        assert_eq!(serde_json::from_str::<RunSummary>(&text).unwrap(), s);
        // Node ids are map keys: strings in JSON, as before.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["held_before"]["1"], 8192);
        assert!(v.get("error").is_none() && v.get("linux").is_none());

        let linux = RunSummary {
            result: None,
            linux: Some(LinuxRun {
                exit: "stopped by signal".into(),
                console_lines: 120,
                fixups: 7,
                reached_linux_version: true,
                reached_memory: true,
                reached_init: false,
                milestones_s: BTreeMap::from([("Linux version".into(), 95.5)]),
                console_tail: vec!["[    0.000000] Memory: 240000K".into()],
            }),
            ebpf: None,
            ..sample()
        };
        let text = serde_json::to_string(&linux).unwrap();
        assert_eq!(serde_json::from_str::<RunSummary>(&text).unwrap(), linux);

        let failed = RunSummary::failed(0, Some(3), "cannot fetch page 9 from node 2".into());
        let text = serde_json::to_string(&failed).unwrap();
        assert_eq!(serde_json::from_str::<RunSummary>(&text).unwrap(), failed);
    }

    /// A summary as the node wrote it with `serde_json::json!`, before this type existed.
    #[test]
    fn a_summary_written_the_old_way_parses() {
        let old = r#"{
          "node": 0,
          "vm": 3,
          "guest_pages": 16384,
          "faults": {"remote": 16384, "local_zero": 0, "spurious": 1, "errors": 0},
          "remote_miss_ratio": 1.0,
          "fault_p50_us": 31.25,
          "fault_p90_us": 38.5,
          "fault_p99_us": 47.25,
          "fault_max_us": 210.0,
          "bytes_fetched": 67108864,
          "us_per_page": 60.5,
          "elapsed_s": 0.991,
          "result": {"pages_done": 16384, "checksum": 3735928559, "first_bad_page": null, "bad_pages": 0},
          "expected_checksum": 3735928559,
          "held_before": {"1": 8192, "2": 8192},
          "held_after": {"1": 0, "2": 0},
          "ebpf": {"faults": 16387, "stall_p50_us": 49.5, "stall_p99_us": 114.25,
                   "install_p50_us": 3.25, "transfer_p50_us": 25.5},
          "ok": true
        }"#;
        assert_eq!(serde_json::from_str::<RunSummary>(old).unwrap(), sample());

        // The failure summary: four fields, the rest defaults.
        let old = r#"{"node":0,"vm":3,"ok":false,"error":"cannot fetch page 9 from node 2"}"#;
        let s: RunSummary = serde_json::from_str(old).unwrap();
        assert_eq!(
            s,
            RunSummary::failed(0, Some(3), "cannot fetch page 9 from node 2".into())
        );
        assert_eq!((s.faults.remote, s.pages_done(), s.ebpf), (0, 0, None));

        // A local run (no VM, no probes) and the Linux guest's summary, which had neither
        // `result` nor `us_per_page`.
        let old = r#"{"node":0,"vm":null,"faults":{"remote":0,"local_zero":0,"spurious":0,"errors":0},
                      "result":{"pages_done":4,"checksum":0,"first_bad_page":null,"bad_pages":0},
                      "expected_checksum":null,"held_before":{},"held_after":{},"ebpf":null,"ok":true}"#;
        let s: RunSummary = serde_json::from_str(old).unwrap();
        assert_eq!((s.vm, s.pages_done(), s.ok), (None, 4, true));
        let old = r#"{"node":0,"vm":1,"guest_pages":65536,
                      "faults":{"remote":12000,"local_zero":3,"spurious":0,"errors":0},
                      "remote_miss_ratio":0.99,"fault_p50_us":40.0,"fault_p99_us":90.0,"elapsed_s":130.5,
                      "linux":{"exit":"stopped by signal","console_lines":120,"fixups":7,
                               "reached_linux_version":true,"reached_memory":true,"reached_init":false,
                               "milestones_s":{"Linux version":95.5},"console_tail":["a","b"]},
                      "held_before":{"1":32768,"2":32768},"held_after":{"1":26000,"2":26000},
                      "ebpf":null,"ok":true}"#;
        let s: RunSummary = serde_json::from_str(old).unwrap();
        let linux = s.linux.as_ref().unwrap();
        assert!(linux.reached_memory && !linux.reached_init);
        assert_eq!((s.result, s.held_after[&2]), (None, 26000));
    }
}
