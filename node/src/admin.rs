//! The node's admin HTTP endpoint: `GET /stats` (JSON, [`pagemesh_api::stats::NodeStats`]),
//! `GET /metrics` (Prometheus text, [`crate::metrics`]), `GET /healthz`.
//!
//! It runs on its own thread with a single-threaded tokio runtime: it reads the atomics and
//! histograms the pager and page server keep, and never touches the fault path.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use pagemesh_api::stats::{Heat, HeatCell, NodeStats, PagerStats as ApiPagerStats, ServerStats};
use pagemesh_api::{NodeId, Role, VmId};
use pagemesh_pager::{CacheStats, PageDirectory, PageOwner, PagerStats};
use pagemesh_server::ServerContext;

/// Errors starting the admin endpoint.
#[derive(thiserror::Error, Debug)]
pub enum AdminError {
    /// Binding failed.
    #[error("cannot listen on {0} for the admin endpoint")]
    Bind(String, #[source] std::io::Error),
    /// The runtime or thread could not start.
    #[error("cannot start the admin endpoint")]
    Start(#[source] std::io::Error),
}

/// A guest run, as the admin endpoint sees it.
pub struct LiveRun {
    /// The VM.
    pub vm: VmId,
    /// Pages of guest RAM.
    pub guest_pages: u64,
    /// The pager's counters.
    pub stats: Arc<PagerStats>,
    /// The page directory.
    pub directory: Arc<PageDirectory>,
    /// Pages the guest reported done.
    pub pages_done: Arc<AtomicU64>,
    /// Whether the guest runs.
    pub running: Arc<AtomicBool>,
    /// The page cache's counters, when the VM runs under a local memory budget.
    pub cache: Option<Arc<CacheStats>>,
    /// The memory nodes its connections have lost (with replicas).
    pub lost: Option<Arc<pagemesh_transport::LostHomes>>,
}

/// What the endpoint reports on.
pub struct AdminState {
    /// This node.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    started: Instant,
    /// Its page server.
    pub server: Arc<ServerContext>,
    /// The current (or last) guest run.
    pub run: Mutex<Option<LiveRun>>,
    /// The eBPF probes, when loaded.
    pub ebpf: Mutex<Option<KernelProbes>>,
    /// The repairs this node makes, as a memory node (docs/replication.md, "Repair").
    pub repair: Arc<crate::repair::RepairFigures>,
}

/// The eBPF probes of the current run, as the endpoint reads them.
pub struct KernelProbes {
    /// The probes.
    pub probes: Arc<pagemesh_probes::Probes>,
    /// Guest frame number of the VM's page 0 (the probes count by guest frame).
    pub first_gfn: u64,
}

impl AdminState {
    /// State for node `node_id`.
    pub fn new(node_id: NodeId, role: Role, server: Arc<ServerContext>) -> Self {
        Self {
            node_id,
            role,
            started: Instant::now(),
            server,
            repair: Arc::default(),
            run: Mutex::new(None),
            ebpf: Mutex::new(None),
        }
    }

    /// Everything, as `GET /stats` answers it, with guest memory in at most `cells` cells.
    pub fn snapshot(&self, cells: usize) -> NodeStats {
        self.build(Some(cells))
    }

    /// Everything but the heat map (left empty): what `/metrics` and the OTLP exporter use,
    /// without walking the page directory and the eBPF heat array on every scrape.
    pub fn figures(&self) -> NodeStats {
        self.build(None)
    }

    /// Time since the node started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The snapshot, with the heat map in at most `cells` cells, or none.
    fn build(&self, cells: Option<usize>) -> NodeStats {
        let s = self.server.stats();
        let server = ServerStats {
            pages_held: self.server.store.total_held(),
            capacity_pages: self.server.store.capacity(),
            pages_served: s.pages_served,
            pages_claimed: s.pages_claimed,
            pages_written_back: s.pages_written_back,
            bad_frames: s.bad_frames,
            connections: s.connections,
            open_connections: s.open_connections,
            auth_refusals: s.auth_refusals,
            pages_to_repair: self.repair.pending(),
            pages_repaired: self.repair.copied(),
            packed_pages: s.packed_pages,
            packed_bytes: s.packed_bytes,
        };
        let pager = lock(&self.run).as_ref().map(|run| {
            let (remote, local_zero, spurious, errors, bytes) = run.stats.counters();
            let hists = run.stats.histograms();
            ApiPagerStats {
                vm: run.vm,
                guest_pages: run.guest_pages,
                running: run.running.load(Ordering::Relaxed),
                guest_pages_done: run.pages_done.load(Ordering::Relaxed),
                faults_remote: remote,
                faults_local_zero: local_zero,
                faults_spurious: spurious,
                fault_errors: errors,
                remote_miss_ratio: run.stats.remote_miss_ratio(),
                bytes_fetched: bytes,
                fault_latency: hists.fault,
                install_latency: hists.install,
                peers: hists.peers,
                lost_nodes: run.lost.as_ref().map(|l| l.nodes()).unwrap_or_default(),
                heat: cells.map_or_else(Heat::default, |n| heat(&run.directory, n)),
                cache: run.cache.as_ref().map(|c| c.snapshot()),
                prefetch: run.stats.prefetch_snapshot(),
            }
        });
        let probes = lock(&self.ebpf);
        let ebpf = probes.as_ref().map(|k| k.probes.snapshot());
        let pager = match (pager, probes.as_ref()) {
            (Some(mut p), Some(k)) if cells.is_some() => {
                add_stalls(&mut p.heat, &k.probes.heat(), k.first_gfn);
                Some(p)
            }
            (p, _) => p,
        };
        NodeStats {
            node_id: self.node_id,
            role: Some(self.role),
            uptime_s: self.uptime().as_secs_f64(),
            server,
            pager,
            ebpf,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Downsamples the directory into at most `cells` regions.
pub fn heat(directory: &PageDirectory, cells: usize) -> Heat {
    let pages = directory.len();
    let cells = (cells.max(1) as u64).min(pages.max(1));
    let per = pages.div_ceil(cells).max(1);
    let mut out: Vec<HeatCell> = Vec::with_capacity(cells as usize);
    let mut owners: Vec<(NodeId, u64)> = Vec::new();
    let mut cell = HeatCell::default();
    let finish = |cell: &mut HeatCell, owners: &mut Vec<(NodeId, u64)>, out: &mut Vec<HeatCell>| {
        cell.owner = owners.iter().max_by_key(|(_, c)| *c).map(|(n, _)| *n);
        out.push(std::mem::take(cell));
        owners.clear();
    };
    for (i, entry) in directory.entries().enumerate() {
        cell.faults += u64::from(entry.heat);
        let owner = entry.owner();
        // Served before and not resident now: it was evicted (only a budget does that).
        if owner != PageOwner::Local && entry.heat > 0 {
            cell.evicted += 1;
        }
        match owner {
            PageOwner::Zero => cell.zero += 1,
            PageOwner::Local => cell.local += 1,
            PageOwner::Remote(n) => {
                cell.remote += 1;
                match owners.iter_mut().find(|(o, _)| *o == n) {
                    Some(e) => e.1 += 1,
                    None => owners.push((n, 1)),
                }
            }
        }
        if (i as u64 + 1).is_multiple_of(per) {
            finish(&mut cell, &mut owners, &mut out);
        }
    }
    if !pages.is_multiple_of(per) {
        finish(&mut cell, &mut owners, &mut out);
    }
    Heat {
        pages_per_cell: per,
        cells: out,
    }
}

/// Adds the probes' per-frame stall counts (`(gfn, stalls)`) to the cells of `heat`, whose
/// page 0 is frame `first_gfn`. Frames outside the VM's pages (the built-in guest's system
/// region) are left out.
fn add_stalls(heat: &mut Heat, frames: &[(u64, u64)], first_gfn: u64) {
    for cell in &mut heat.cells {
        cell.stalls = Some(0);
    }
    let per = heat.pages_per_cell.max(1);
    for &(gfn, n) in frames {
        let Some(page) = gfn.checked_sub(first_gfn) else {
            continue;
        };
        if let Some(cell) = usize::try_from(page / per)
            .ok()
            .and_then(|i| heat.cells.get_mut(i))
        {
            *cell.stalls.get_or_insert(0) += n;
        }
    }
}

#[derive(serde::Deserialize)]
struct StatsQuery {
    cells: Option<usize>,
}

async fn stats(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<StatsQuery>,
) -> impl IntoResponse {
    let cells = q.cells.unwrap_or(1024).clamp(1, 65536);
    axum::Json(state.snapshot(cells))
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::prometheus_text(&state.figures()),
    )
}

/// The admin routes.
pub fn app(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Binds `addr` and serves the admin endpoint on a new thread; returns the bound address.
pub fn start(addr: &str, state: Arc<AdminState>) -> Result<std::net::SocketAddr, AdminError> {
    let listener = TcpListener::bind(addr).map_err(|e| AdminError::Bind(addr.to_owned(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| AdminError::Bind(addr.to_owned(), e))?;
    listener.set_nonblocking(true).map_err(AdminError::Start)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AdminError::Start)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app(state)).await {
                            tracing::error!("admin endpoint stopped: {e}");
                        }
                    }
                    Err(e) => tracing::error!("admin endpoint cannot start: {e}"),
                }
            });
        })
        .map_err(AdminError::Start)?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_downsamples_owners_and_faults() {
        let d = PageDirectory::new(10);
        for p in 0..5 {
            d.set_owner(p, PageOwner::Remote(1)).unwrap();
        }
        d.set_owner(5, PageOwner::Remote(2)).unwrap();
        d.claim(0).unwrap();
        d.claim(0).unwrap();
        d.claim(7).unwrap();
        let h = heat(&d, 3);
        assert_eq!(h.pages_per_cell, 4);
        assert_eq!(h.cells.len(), 3);
        assert_eq!(h.cells[0].faults, 2);
        assert_eq!(h.cells[0].local, 1);
        assert_eq!(h.cells[0].remote, 3);
        assert_eq!(h.cells[0].owner, Some(1));
        assert_eq!(
            (h.cells[1].remote, h.cells[1].local, h.cells[1].zero),
            (2, 1, 1)
        );
        assert_eq!(h.cells[2].zero, 2);
        assert_eq!(h.cells[2].owner, None);
        let total: u64 = h.cells.iter().map(|c| c.local + c.zero + c.remote).sum();
        assert_eq!(total, 10);
        assert_eq!(heat(&d, 100).cells.len(), 10);
    }

    #[test]
    fn stalls_land_in_the_cells_of_their_pages() {
        let d = PageDirectory::new(10);
        let mut h = heat(&d, 3);
        // Page 0 is frame 100; frames 3 and 99 are outside the VM, 120 past its end.
        let frames = [
            (3, 5),
            (99, 1),
            (100, 2),
            (103, 1),
            (104, 7),
            (109, 1),
            (120, 4),
        ];
        add_stalls(&mut h, &frames, 100);
        let stalls: Vec<Option<u64>> = h.cells.iter().map(|c| c.stalls).collect();
        assert_eq!(stalls, [Some(3), Some(7), Some(1)]);
        // No stalls at all still says "measured, none" rather than "not measured".
        let mut h = heat(&d, 2);
        add_stalls(&mut h, &[], 0);
        assert!(h.cells.iter().all(|c| c.stalls == Some(0)));
    }
}
