//! Repair: a memory node makes again the copies a dead memory node held.
//!
//! When a memory node's lease runs out, the coordinator *retires* it from every VM that had
//! more than one copy of its pages there (`Vm::retired`). A page's homes are then the first
//! `replicas` live nodes from its copy 0 on, in the placement's order
//! ([`pagemesh_api::Replicas::homes_without`]): each page of the dead node gets a new home,
//! the next survivor after its others. Each survivor follows the VMs (`GET /vms`, every
//! [`Repairer::every`]) and, for a VM that retired a node since it last looked, reads from
//! a surviving old home every page it is now a home of and does not hold, and stores it
//! where it does not hold it already ([`pagemesh_server::PageStore::put_absent`]): a page
//! the compute node wrote back to it meanwhile is newer and stays. It reports its progress
//! (`PUT /vms/{id}/repair`) as it goes; the coordinator's `/metrics`, `GET /vms` and the
//! console show it.
//!
//! A page that its old homes no longer hold was claimed by the compute node (its copy is in
//! the guest) and needs no new copy: it is counted as `claimed`. Nothing here is on the
//! fault path: it runs on a memory node, on a thread of its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagemesh_api::{NodeId, PAGE_SIZE, RepairReport, Replicas, Vm, VmId, error_chain};
use pagemesh_protocol::MAX_RUN_PAGES;
use pagemesh_server::{PageStore, ServerContext};
use pagemesh_transport::compress::Compression;
use pagemesh_transport::tcp::Credentials;
use pagemesh_transport::{Run, TransportError, TransportManager};

use crate::coordinator::CoordinatorClient;

/// Pages read from a survivor in one request.
const RUN_PAGES: u64 = MAX_RUN_PAGES as u64 / 4;
/// How often a repair under way reports.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// A memory node's repair figures, for its `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct RepairFigures {
    pending: AtomicU64,
    copied: AtomicU64,
}

impl RepairFigures {
    /// Pages the repair under way has still to copy (0 when none is).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Pages copied by repairs since the node started.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

/// How a memory node repairs.
#[derive(Clone, Debug)]
pub struct RepairOptions {
    /// What the node shows the survivors it reads from.
    pub credentials: Credentials,
    /// How long a survivor may take to answer.
    pub timeout: Duration,
    /// How often the VMs are looked at ([`Repairer::every`]).
    pub every: Duration,
    /// Most bytes a second copied (`--repair-rate`); `None`: as fast as it goes.
    pub rate: Option<u64>,
    /// Whether runs read from survivors travel packed (`--compress`).
    pub compression: Compression,
}

/// The repairing thread; dropping it stops the thread (between two runs) and waits for it.
pub struct Repairer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the thread works with.
struct Worker {
    me: NodeId,
    coordinator: CoordinatorClient,
    server: Arc<ServerContext>,
    figures: Arc<RepairFigures>,
    credentials: Credentials,
    timeout: Duration,
    /// Pages a second, at most.
    rate: Option<f64>,
    compression: Compression,
    /// `(vm, retired nodes)` repaired already.
    done: BTreeSet<(VmId, usize)>,
    /// VMs this node does not hold (said once).
    absent: BTreeSet<VmId>,
    stopped: mpsc::Receiver<()>,
}

impl Repairer {
    /// How often the VMs are looked at.
    pub fn every(lease_ms: u64) -> Duration {
        Duration::from_millis((lease_ms / 3).clamp(200, 2_000))
    }

    /// Repairs, as node `me`, the VMs of `coordinator` that retire a node, until dropped.
    /// `server` is this node's page server, whose store takes the copies; `figures` count
    /// what it does.
    pub fn start(
        me: NodeId,
        coordinator: &CoordinatorClient,
        server: Arc<ServerContext>,
        figures: Arc<RepairFigures>,
        options: RepairOptions,
    ) -> Self {
        let RepairOptions {
            credentials,
            timeout,
            every,
            rate,
            compression,
        } = options;
        let (stop, stopped) = mpsc::channel();
        let mut worker = Worker {
            me,
            coordinator: coordinator.clone().with_patience(1, every.max(timeout)),
            server,
            figures,
            credentials,
            timeout,
            rate: rate.map(|bytes| bytes as f64 / PAGE_SIZE as f64),
            compression,
            done: BTreeSet::new(),
            absent: BTreeSet::new(),
            stopped,
        };
        let thread = std::thread::Builder::new()
            .name("repair".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = worker.stopped.recv_timeout(every) {
                    worker.look();
                }
            })
            .map_err(|e| tracing::warn!("cannot start the repair thread: {e}; no repairs here"))
            .ok();
        Repairer {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Repairer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why one repair stopped; it is tried again at the next look.
#[derive(thiserror::Error, Debug)]
enum RepairError {
    #[error("cannot reach node {node}")]
    Peer {
        node: NodeId,
        #[source]
        source: TransportError,
    },
    #[error("no surviving home of page {page} is up")]
    NoSource { page: u64 },
    #[error("cannot store page {page}")]
    Store {
        page: u64,
        #[source]
        source: pagemesh_server::StoreError,
    },
    #[error("told to stop")]
    Stopped,
}

impl Worker {
    fn store(&self) -> &PageStore {
        &self.server.store
    }

    /// Looks at the VMs once, and repairs those that need it of this node.
    fn look(&mut self) {
        let vms = match self.coordinator.vms() {
            Ok(vms) => vms,
            Err(e) => {
                tracing::debug!("cannot list the VMs to repair: {}", error_chain(&e));
                return;
            }
        };
        self.done
            .retain(|(id, _)| vms.iter().any(|vm| vm.id == *id));
        for vm in vms {
            if vm.retired.is_empty()
                || vm.replicas < 2
                || !vm.survivors().contains(&self.me)
                || self.done.contains(&(vm.id, vm.retired.len()))
            {
                continue;
            }
            if self.store().held(vm.id).is_err() {
                if self.absent.insert(vm.id) {
                    tracing::warn!(
                        vm = vm.id,
                        "VM retired node(s) {:?}, but this node holds none of its pages (it \
                         was restarted?): it cannot repair it",
                        vm.retired
                    );
                }
                continue;
            }
            let began = Instant::now();
            tracing::info!(
                vm = vm.id,
                retired = ?vm.retired,
                "repairing: copying the pages this node is a new home of"
            );
            match self.repair(&vm) {
                Ok(r) => {
                    tracing::info!(
                        vm = vm.id,
                        copied = r.copied,
                        claimed = r.claimed,
                        "repaired in {:.2} s",
                        began.elapsed().as_secs_f64()
                    );
                    self.done.insert((vm.id, vm.retired.len()));
                }
                Err(RepairError::Stopped) => return,
                Err(e) => tracing::warn!(
                    vm = vm.id,
                    "repair stopped, to be tried again: {}",
                    error_chain(&e)
                ),
            }
        }
    }

    /// Copies the pages of `vm` this node is a new home of and does not hold: first finds
    /// them (and reports how many), then copies them in runs of consecutive pages with the
    /// same source.
    fn repair(&mut self, vm: &Vm) -> Result<RepairReport, RepairError> {
        let replicas = vm.replicas().expect("the coordinator checked the replicas");
        let needed = self.needed(vm, &replicas)?;
        let mut transport = TransportManager::new(self.me, self.timeout)
            .with_credentials(self.credentials.clone())
            .with_compression(self.compression);
        let mut connected = Vec::new();
        if let Ok(endpoints) = self.coordinator.endpoints() {
            for ep in endpoints {
                if ep.node_id != self.me
                    && vm.survivors().contains(&ep.node_id)
                    && transport.connect_peer(ep.node_id, &ep).is_ok()
                {
                    connected.push(ep.node_id);
                }
            }
        }
        let mut report = RepairReport {
            node: self.me,
            retired: vm.retired.len(),
            needed: needed.len() as u64,
            copied: 0,
            claimed: 0,
            done: false,
        };
        self.figures.pending.store(report.needed, Ordering::Relaxed);
        self.report(vm.id, &report);
        let mut buf = vec![0u8; RUN_PAGES as usize * PAGE_SIZE];
        let began = Instant::now();
        let mut reported = began;
        let mut at = 0;
        while at < needed.len() {
            let page = needed[at];
            let source = self.source_of(vm, &replicas, page, &connected)?;
            let mut len = 1;
            while at + len < needed.len()
                && (len as u64) < RUN_PAGES
                && needed[at + len] == page + len as u64
                && self.source_of(vm, &replicas, page + len as u64, &connected)? == source
            {
                len += 1;
            }
            let bytes = &mut buf[..len * PAGE_SIZE];
            let before = report.copied + report.claimed;
            self.copy_run(&mut transport, vm.id, source, page, bytes, &mut report)?;
            let settled = report.copied + report.claimed - before;
            self.figures.pending.fetch_sub(settled, Ordering::Relaxed);
            at += len;
            self.pace(began, report.copied + report.claimed)?;
            if reported.elapsed() >= REPORT_EVERY {
                if self.stopped.try_recv().is_ok() {
                    return Err(RepairError::Stopped);
                }
                self.report(vm.id, &report);
                reported = Instant::now();
            }
        }
        report.done = true;
        self.report(vm.id, &report);
        self.figures.pending.store(0, Ordering::Relaxed);
        let _ = transport.acknowledge_all();
        Ok(report)
    }

    /// With `--repair-rate`, waits until `settled` pages since `began` are within it; a stop
    /// ends the wait.
    fn pace(&self, began: Instant, settled: u64) -> Result<(), RepairError> {
        let Some(wait) = self
            .rate
            .and_then(|rate| wait_for_rate(began.elapsed(), settled, rate))
        else {
            return Ok(());
        };
        match self.stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => Err(RepairError::Stopped),
        }
    }

    /// The pages of `vm` this node is a new home of and does not hold, in order.
    fn needed(&self, vm: &Vm, replicas: &Replicas) -> Result<Vec<u64>, RepairError> {
        let pages = vm.placement.pages();
        let mut held = Vec::with_capacity(RUN_PAGES as usize);
        let mut needed = Vec::new();
        let mut first = 0;
        while first < pages {
            let count = RUN_PAGES.min(pages - first);
            self.store()
                .holding(vm.id, first, count, &mut held)
                .map_err(|source| RepairError::Store {
                    page: first,
                    source,
                })?;
            needed.extend(
                (first..first + count)
                    .zip(&held)
                    .filter(|&(p, &h)| !h && self.new_home_of(vm, replicas, p))
                    .map(|(p, _)| p),
            );
            first += count;
        }
        Ok(needed)
    }

    /// Whether this node is a home of `page` now and was not before any node retired.
    fn new_home_of(&self, vm: &Vm, replicas: &Replicas, page: u64) -> bool {
        vm.placement.owner(page).is_some_and(|copy0| {
            !replicas.homes(copy0).contains(&self.me)
                && replicas
                    .homes_without(copy0, &vm.retired)
                    .contains(&self.me)
        })
    }

    /// Where page `page` is copied from: its first surviving old home that is connected.
    fn source_of(
        &self,
        vm: &Vm,
        replicas: &Replicas,
        page: u64,
        connected: &[NodeId],
    ) -> Result<NodeId, RepairError> {
        vm.placement
            .owner(page)
            .and_then(|copy0| {
                replicas
                    .homes(copy0)
                    .iter()
                    .copied()
                    .find(|n| !vm.retired.contains(n) && connected.contains(n))
            })
            .ok_or(RepairError::NoSource { page })
    }

    /// Reads the run at `first` from `source` and stores what this node lacks; a run the
    /// source no longer holds whole is copied page by page, its missing pages `claimed`.
    fn copy_run(
        &self,
        transport: &mut TransportManager,
        vm: VmId,
        source: NodeId,
        first: u64,
        bytes: &mut [u8],
        report: &mut RepairReport,
    ) -> Result<(), RepairError> {
        let failed = |source_error| RepairError::Peer {
            node: source,
            source: source_error,
        };
        let mut runs = [Run::new(first, bytes)];
        match transport.read_runs(vm, source, &mut runs) {
            Ok(()) => return self.put(vm, first, runs[0].pages, report),
            Err(e) if e.is_not_held() => {}
            Err(e) => return Err(failed(e)),
        }
        for (page, dst) in (first..).zip(bytes.chunks_exact_mut(PAGE_SIZE)) {
            match transport.read_page(vm, page, source, dst) {
                Ok(()) => self.put(vm, page, dst, report)?,
                Err(e) if e.is_not_held() => {
                    report.needed -= 1;
                    report.claimed += 1;
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(())
    }

    /// Stores the pages of `bytes` from `first` on that this node does not hold.
    fn put(
        &self,
        vm: VmId,
        first: u64,
        bytes: &[u8],
        report: &mut RepairReport,
    ) -> Result<(), RepairError> {
        self.store()
            .put_absent(vm, first, bytes)
            .map_err(|source| RepairError::Store {
                page: first,
                source,
            })?;
        // Pages written back meanwhile were there already: they count as copied too.
        let pages = (bytes.len() / PAGE_SIZE) as u64;
        report.copied += pages;
        self.figures.copied.fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }

    fn report(&self, vm: VmId, report: &RepairReport) {
        if let Err(e) = self.coordinator.report_repair(vm, report) {
            tracing::debug!(
                vm,
                "cannot report the repair's progress: {}",
                error_chain(&e)
            );
        }
    }
}

/// How long to wait, `elapsed` into a repair that has settled `pages`, for it to be within
/// `rate` pages a second; `None` when it is.
fn wait_for_rate(elapsed: Duration, pages: u64, rate: f64) -> Option<Duration> {
    Duration::from_secs_f64(pages as f64 / rate)
        .checked_sub(elapsed)
        .filter(|w| !w.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_repair_waits_until_its_pages_are_within_the_rate() {
        // 1,000 pages a second: 64 pages are due at 64 ms.
        let ms = Duration::from_millis;
        assert_eq!(wait_for_rate(ms(10), 64, 1000.0), Some(ms(54)));
        assert_eq!(wait_for_rate(ms(64), 64, 1000.0), None);
        assert_eq!(wait_for_rate(ms(500), 64, 1000.0), None);
        assert_eq!(wait_for_rate(Duration::ZERO, 0, 1000.0), None);
    }
}
