//! `GET /stats` of a node's admin endpoint: one JSON snapshot of everything the node
//! measures. The console and tools read it; the node writes it.

use serde::{Deserialize, Serialize};

use crate::{NodeId, Role, VmId};

/// A node's statistics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NodeStats {
    /// Node id.
    pub node_id: NodeId,
    /// Role (`None` only in default values).
    pub role: Option<Role>,
    /// Seconds since the node started.
    pub uptime_s: f64,
    /// The page server (every node runs one; compute-only nodes hold nothing).
    pub server: ServerStats,
    /// The pager of the VM this node runs, if any.
    pub pager: Option<PagerStats>,
    /// Kernel-side figures from the eBPF probes, when they are loaded.
    pub ebpf: Option<EbpfStats>,
}

/// What a pager's prefetcher did (`--prefetch`). Prefetched pages count as transfers
/// wherever transfers are counted (bytes fetched, a peer's pages, the memory node's pages
/// served), not as faults.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(default)]
pub struct PrefetchStats {
    /// Pages prefetched: fetched and installed ahead of the guest.
    pub issued: u64,
    /// Of those, pages seen used: touched while on their way, or gone past by the stream
    /// that brought them (docs/prefetch.md says why this is a lower bound).
    pub used: u64,
    /// used / issued; 0 when nothing was issued.
    pub accuracy: f64,
    /// Faults avoided / faults there would have been without prefetch: (used - in_flight)
    /// / (used + remote faults); 0 when there were none.
    pub coverage: f64,
    /// Faults on pages prefetch was bringing: the guest waited for the prefetch, not for a
    /// fetch of its own.
    pub in_flight: u64,
    /// Pages of a recorded working set brought in from the start (`--replay-working-set`),
    /// not counted in `issued`.
    pub replayed: u64,
    /// Windows planned.
    pub windows: u64,
    /// Hints the fault handler could not send the prefetcher (its queue was full).
    pub dropped_hints: u64,
    /// Prefetch batches that failed; their pages were left to demand faults.
    pub failed: u64,
}

/// A latency distribution.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Histogram {
    /// Samples.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
    /// Sum of all samples, µs (for averages and Prometheus `_sum`).
    pub sum_us: f64,
    /// Cumulative buckets: samples at most `le_us` µs, increasing `le_us`; the last bucket
    /// holds every sample.
    pub buckets: Vec<Bucket>,
}

/// One cumulative histogram bucket.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct Bucket {
    /// Upper bound, µs; `null` in JSON for the last, unbounded bucket (JSON has no infinity).
    #[serde(deserialize_with = "null_is_infinite")]
    pub le_us: f64,
    /// Samples at most `le_us`.
    pub count: u64,
}

/// The page server's counters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ServerStats {
    /// Pages held now, all VMs.
    pub pages_held: u64,
    /// Pages this node can hold.
    pub capacity_pages: u64,
    /// Pages sent in Fetch and Read replies.
    pub pages_served: u64,
    /// Pages lent by Fetch replies and freed here once the fetching node acknowledged them
    /// (each page once, however many times its reply had to be sent).
    pub pages_claimed: u64,
    /// Pages received in WriteBack requests.
    pub pages_written_back: u64,
    /// Requests that broke the framing rules.
    pub bad_frames: u64,
    /// Connections accepted since start.
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Requests refused because the peer skipped or failed the handshake (no Hello, no
    /// Auth, a proof made with another cluster key).
    #[serde(default)]
    pub auth_refusals: u64,
    /// Pages of VMs that lost a memory node that this node is a new home of and has not
    /// copied yet: its share of the pages under-replicated (docs/replication.md, "Repair").
    #[serde(default)]
    pub pages_to_repair: u64,
    /// Pages this node has copied in repairs since it started.
    #[serde(default)]
    pub pages_repaired: u64,
    /// Pages sent or received packed (`--compress`: compressed, or zero pages as a length).
    #[serde(default)]
    pub packed_pages: u64,
    /// Bytes those packed pages took on the wire (against `packed_pages * 4096` plain).
    #[serde(default)]
    pub packed_bytes: u64,
}

/// The pager of one VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PagerStats {
    /// The VM.
    pub vm: VmId,
    /// Pages of guest RAM.
    pub guest_pages: u64,
    /// Whether the guest is still running.
    pub running: bool,
    /// Pages the guest has reported done.
    pub guest_pages_done: u64,
    /// Faults served by fetching from another node.
    pub faults_remote: u64,
    /// Faults served by zero-filling locally.
    pub faults_local_zero: u64,
    /// Faults on pages already present.
    pub faults_spurious: u64,
    /// Faults that could not be served.
    pub fault_errors: u64,
    /// remote / (remote + local zero-fill).
    pub remote_miss_ratio: f64,
    /// Bytes fetched from other nodes.
    pub bytes_fetched: u64,
    /// Fault service time (event read to page installed), all faults.
    pub fault_latency: Histogram,
    /// Time in the install ioctl (`UFFDIO_COPY`, which maps the page and wakes the vCPU),
    /// measured by the pager.
    #[serde(default)]
    pub install_latency: Histogram,
    /// Transfer time per peer (request sent to last byte received).
    pub peers: Vec<PeerStats>,
    /// Memory nodes lost so far (with `--replicas`: their pages come from other copies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_nodes: Vec<NodeId>,
    /// Guest memory as a coarse map of heat and owners.
    pub heat: Heat,
    /// The page cache, when the VM runs under a local memory budget (`--local-memory`):
    /// the same figures as the run summary's `cache` object, as they are now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::summary::CacheSummary>,
    /// What prefetch did, when it is on (`--prefetch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchStats>,
}

/// Transfers from one peer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct PeerStats {
    /// The peer.
    pub node_id: NodeId,
    /// Pages fetched from it.
    pub pages: u64,
    /// Transfer time.
    pub transfer: Histogram,
}

/// Guest memory downsampled into `cells.len()` equal regions of `pages_per_cell` pages
/// (the last may be shorter).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Heat {
    /// Pages per cell.
    pub pages_per_cell: u64,
    /// The cells, in guest-physical order.
    pub cells: Vec<HeatCell>,
}

/// One region of guest memory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct HeatCell {
    /// Faults taken on pages of this region since the VM started.
    pub faults: u64,
    /// Pages resident on the compute node.
    pub local: u64,
    /// Pages never written (no owner).
    pub zero: u64,
    /// The node holding most of the region's non-resident pages, if any.
    pub owner: Option<NodeId>,
    /// Pages held by other nodes.
    pub remote: u64,
    /// Of the pages not resident (`remote` and `zero`), those that were resident before and
    /// were evicted (under a local memory budget; 0 without one).
    #[serde(default)]
    pub evicted: u64,
    /// vCPU stalls on the region's pages as the eBPF probes counted them in the kernel:
    /// exact (`faults` saturates at 63 per page), and including faults KVM resolved without
    /// the pager. Absent when the probes are not loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<u64>,
}

/// Kernel-side figures from the eBPF probes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct EbpfStats {
    /// vCPU stalls measured (faults entering the MMU and resolved).
    pub faults: u64,
    /// vCPU stall per fault.
    pub stall: Histogram,
    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` time.
    pub install: Histogram,
    /// Transfer time per peer.
    pub transfer: Vec<PeerStats>,
    /// The probes' own cost, per program, from the kernel's BPF statistics; empty when they
    /// could not be turned on.
    #[serde(default)]
    pub programs: Vec<ProgramCost>,
    /// Where the sampled stalls' time went (see the type); `None` before any match.
    #[serde(default)]
    pub breakdown: Option<crate::summary::StallBreakdown>,
}

/// What one eBPF program cost since the probes were loaded, as the kernel measures it
/// (`BPF_ENABLE_STATS`: the program's own run time, not the trap or tracepoint around it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ProgramCost {
    /// The program's name.
    pub name: String,
    /// Times it ran.
    pub runs: u64,
    /// Time it ran in all, ns.
    pub run_time_ns: u64,
}

fn null_is_infinite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unbounded_bucket_survives_json() {
        let h = Histogram {
            count: 3,
            buckets: vec![
                Bucket {
                    le_us: 10.0,
                    count: 1,
                },
                Bucket {
                    le_us: f64::INFINITY,
                    count: 3,
                },
            ],
            ..Histogram::default()
        };
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains(r#"{"le_us":null,"count":3}"#), "{json}");
        assert_eq!(serde_json::from_str::<Histogram>(&json).unwrap(), h);
    }
}
