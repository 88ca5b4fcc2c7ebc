//! Fixed stats of a three-node cluster for the rendering and state tests: compute node 0
//! runs a 64 MiB guest whose pages live on memory nodes 1 (first half) and 2 (second half),
//! with the last 1 MiB never written. Twenty snapshots 200 ms apart, so rates, their history
//! and "faulting now" are known.

use std::time::Duration;

use pagemesh_api::stats::{
    Bucket, EbpfStats, Heat, HeatCell, Histogram, NodeStats, PagerStats, PeerStats, ServerStats,
};
use pagemesh_api::{Endpoint, NodeId, NodeInfo, Role, TransportKind};

use crate::app::App;
use crate::event::Event;
use crate::poll::Update;

const GUEST_PAGES: u64 = 16384;
const PAGES_PER_CELL: u64 = 64;
const CELLS: u64 = GUEST_PAGES / PAGES_PER_CELL;
/// Cells from here on were never written.
const ZERO_FROM: u64 = 240;

fn info(id: NodeId, role: Role) -> NodeInfo {
    NodeInfo {
        node_id: id,
        role,
        capacity_bytes: if role.serves_memory() { 512 << 20 } else { 0 },
        cluster: None,
        endpoint: Endpoint {
            node_id: id,
            transport: TransportKind::Tcp,
            address: format!("127.0.0.1:{}", 9000 + id),
            rdma: None,
        },
        registered_at_ms: 1_700_000_000_000,
        admin: Some(format!("127.0.0.1:{}", 9100 + id)),
        lease_ms: 10_000,
        lease_expires_ms: 1_700_000_010_000,
        up: true,
    }
}

/// The coordinator's node list.
pub(crate) fn nodes() -> Vec<NodeInfo> {
    vec![
        info(0, Role::Compute),
        info(1, Role::Memory),
        info(2, Role::Memory),
    ]
}

/// A histogram from per-bucket (not cumulative) counts and the percentiles to report.
pub(crate) fn histogram(buckets: &[(f64, u64)], p: [f64; 4]) -> Histogram {
    let mut total = 0;
    let mut sum = 0.0;
    let buckets = buckets
        .iter()
        .map(|&(le_us, n)| {
            total += n;
            sum += le_us * 0.75 * n as f64;
            Bucket {
                le_us,
                count: total,
            }
        })
        .collect();
    Histogram {
        count: total,
        p50_us: p[0],
        p90_us: p[1],
        p99_us: p[2],
        max_us: p[3],
        sum_us: sum,
        buckets,
    }
}

fn powers(counts: &[u64]) -> Vec<(f64, u64)> {
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| (f64::from(1u32 << i), n))
        .collect()
}

fn fault_latency(scale: u64) -> Histogram {
    let counts: Vec<u64> = [0, 0, 12, 140, 2100, 2900, 700, 210, 60, 15, 6, 1]
        .iter()
        .map(|n| n * scale / 100)
        .collect();
    histogram(&powers(&counts), [29.0, 58.0, 180.0, 1900.0])
}

fn install_latency(scale: u64) -> Histogram {
    let counts: Vec<u64> = [0, 20, 3900, 1900, 250, 40, 6]
        .iter()
        .map(|n| n * scale / 100)
        .collect();
    histogram(&powers(&counts), [3.2, 6.0, 14.0, 40.0])
}

fn transfer(shift: usize) -> Histogram {
    let mut counts = vec![0; shift];
    counts.extend([40, 1200, 1500, 230, 25, 5]);
    histogram(&powers(&counts), [12.0, 24.0, 60.0, 140.0])
}

fn heat(touched: u64) -> Heat {
    let cells = (0..CELLS)
        .map(|i| {
            let done = touched
                .saturating_sub(i * PAGES_PER_CELL)
                .min(PAGES_PER_CELL);
            if i >= ZERO_FROM {
                return HeatCell {
                    faults: done,
                    local: done,
                    zero: PAGES_PER_CELL - done,
                    owner: None,
                    remote: 0,
                    evicted: 0,
                    stalls: None,
                };
            }
            let remote = PAGES_PER_CELL - done;
            HeatCell {
                faults: done,
                local: done,
                zero: 0,
                owner: (remote > 0).then_some(if i < CELLS / 2 { 1 } else { 2 }),
                remote,
                evicted: 0,
                stalls: None,
            }
        })
        .collect();
    Heat {
        pages_per_cell: PAGES_PER_CELL,
        cells,
    }
}

/// Compute node 0's stats after the fixed rounds, for tests that change one figure.
pub(crate) fn last_compute(ebpf: Option<EbpfStats>) -> NodeStats {
    compute(6000, 23.0, ebpf)
}

fn compute(remote: u64, uptime_s: f64, ebpf: Option<EbpfStats>) -> NodeStats {
    let zero = 144;
    let touched = remote + zero;
    NodeStats {
        node_id: 0,
        role: Some(Role::Compute),
        uptime_s,
        server: ServerStats::default(),
        pager: Some(PagerStats {
            vm: 1,
            guest_pages: GUEST_PAGES,
            running: true,
            guest_pages_done: touched,
            faults_remote: remote,
            faults_local_zero: zero,
            faults_spurious: 0,
            fault_errors: 0,
            remote_miss_ratio: remote as f64 / touched as f64,
            bytes_fetched: remote * 4096,
            fault_latency: fault_latency(touched * 100 / 6144),
            install_latency: install_latency(touched * 100 / 6144),
            lost_nodes: Vec::new(),
            peers: vec![
                PeerStats {
                    node_id: 1,
                    pages: remote / 2,
                    transfer: transfer(2),
                },
                PeerStats {
                    node_id: 2,
                    pages: remote / 2,
                    transfer: transfer(3),
                },
            ],
            heat: heat(touched),
            cache: None,
            prefetch: None,
        }),
        ebpf,
    }
}

pub(crate) fn memory(id: NodeId, served: u64, uptime_s: f64) -> NodeStats {
    NodeStats {
        node_id: id,
        role: Some(Role::Memory),
        uptime_s,
        server: ServerStats {
            pages_held: 8192 - served,
            capacity_pages: 131_072,
            pages_served: served,
            pages_claimed: served,
            pages_written_back: 0,
            bad_frames: 0,
            connections: 1,
            open_connections: 1,
            auth_refusals: 0,
            pages_to_repair: 0,
            pages_repaired: 0,
            packed_pages: 0,
            packed_bytes: 0,
        },
        pager: None,
        ebpf: None,
    }
}

/// eBPF figures for the compute node.
pub(crate) fn ebpf() -> EbpfStats {
    EbpfStats {
        faults: 6000,
        stall: histogram(
            &powers(&[0, 0, 0, 20, 1500, 3600, 700, 150, 25, 5]),
            [33.0, 61.0, 190.0, 700.0],
        ),
        install: histogram(&powers(&[30, 4800, 1100, 60, 10]), [1.6, 3.1, 7.5, 16.0]),
        transfer: vec![
            PeerStats {
                node_id: 1,
                pages: 3000,
                transfer: transfer(2),
            },
            PeerStats {
                node_id: 2,
                pages: 3000,
                transfer: transfer(3),
            },
        ],
        programs: Vec::new(),
        breakdown: None,
    }
}

/// Pages the guest touched in each 200 ms round (scaled to 6000 remote faults in all).
const ROUNDS: [u64; 20] = [
    120, 160, 200, 260, 320, 380, 420, 400, 360, 300, 260, 240, 280, 340, 400, 440, 420, 380, 320,
    300,
];

/// The console after the node list (at 0.1 s) and twenty rounds of stats, 200 ms apart
/// (the last at 4.0 s).
pub(crate) fn app(width: u16, height: u16, ebpf: Option<EbpfStats>) -> App {
    let mut app = App::new("http://127.0.0.1:7070", width, height);
    let ms = Duration::from_millis;
    app.handle(Event::Update(Update::Nodes {
        at: ms(100),
        result: Ok(nodes()),
    }));
    let total: u64 = ROUNDS.iter().sum();
    let mut done = 0;
    for (round, step) in (1..).zip(ROUNDS) {
        done += step;
        let remote = 6000 * done / total;
        let at = 200 * round;
        let uptime = at as f64 / 1000.0 + 3.0;
        for (node, stats) in [
            (0, compute(remote, uptime, ebpf.clone())),
            (1, memory(1, remote / 2, uptime)),
            (2, memory(2, (remote / 2).saturating_sub(40), uptime)),
        ] {
            app.handle(Event::Update(Update::Stats {
                at: ms(at),
                node,
                result: Ok(Box::new(stats)),
            }));
        }
    }
    app
}
