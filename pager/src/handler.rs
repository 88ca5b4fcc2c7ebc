//! The fault handler: one thread that reads userfaultfd events and resolves them.
//!
//! The hot path, per fault: a blocking `read` of one event, a directory lookup, for a remote
//! page one request/response on an already-connected blocking socket straight into a
//! preallocated buffer, one `UFFDIO_COPY`, a directory store and two counter updates. No
//! async runtime, no allocation, no lock but the (uncontended) histogram's.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};
use pagemesh_transport::TransportManager;

use super::PagerError;
use super::directory::{PageDirectory, PageOwner};
use super::stats::{FaultKind, PagerStats};
use super::uffd::{Installed, Uffd};

/// Everything the handler thread owns.
pub(crate) struct Handler {
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) base: u64,
    pub(crate) vm: VmId,
    pub(crate) directory: Arc<PageDirectory>,
    pub(crate) stats: Arc<PagerStats>,
    pub(crate) transport: TransportManager,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) trace: crate::FaultTrace,
}

/// A page-aligned, page-sized buffer (the fetch target and the zero page).
#[repr(C, align(4096))]
struct PageBuf([u8; PAGE_SIZE]);

impl Handler {
    /// Serves faults until `stop` is set (and the thread is kicked) or a fault cannot be
    /// served. On a stop it first delivers the acknowledgements of its last fetches, so that
    /// the memory nodes free what they lent.
    pub(crate) fn run(mut self) -> Result<(), PagerError> {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        let zero = Box::new(PageBuf([0; PAGE_SIZE]));
        loop {
            if self.stop.load(Ordering::Acquire) {
                if let Err(e) = self.transport.acknowledge_all() {
                    // The pages stay held on the peer (nothing is lost), counted as held.
                    tracing::warn!(
                        "cannot acknowledge the last fetches: {}",
                        pagemesh_api::error_chain(&e)
                    );
                }
                return Ok(());
            }
            let fault = match self.uffd.read_fault() {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PagerError::Read(e)),
            };
            // Three clock readings per fault (start, fetch done = install start, install
            // done), on CLOCK_MONOTONIC, the eBPF probes' clock, so the transfer marker can
            // take `start` as the fetch's beginning.
            let start = crate::trace::monotonic_ns();
            let addr = fault.address & !(PAGE_SIZE as u64 - 1);
            let page = (addr - self.base) / PAGE_SIZE as u64;
            let owner = self.directory.owner(page).map_err(PagerError::Directory)?;
            let mut transfer = None;
            let mut install_start = start;
            let (kind, installed) = match owner {
                PageOwner::Remote(node) => {
                    if let Err(e) = self.fetch_remote_page(page, node, &mut buf.0, start) {
                        self.stats.record_error();
                        return Err(e);
                    }
                    install_start = crate::trace::monotonic_ns();
                    transfer = Some((node, since(start, install_start)));
                    // SAFETY: `buf` is one readable page; `addr` is a page-aligned address
                    // inside the registered range (it came from a fault on it).
                    let r = unsafe { self.uffd.copy(addr, buf.0.as_ptr(), PAGE_SIZE as u64) };
                    (FaultKind::Remote, r)
                }
                PageOwner::Zero => {
                    // SAFETY: as above, with the zero page as the source. UFFDIO_COPY of
                    // zeros rather than UFFDIO_ZEROPAGE: the guest usually writes next, and
                    // a copied page takes the write without a second (COW) fault.
                    let r = unsafe { self.uffd.copy(addr, zero.0.as_ptr(), PAGE_SIZE as u64) };
                    (FaultKind::LocalZero, r)
                }
                PageOwner::Local => (
                    FaultKind::Spurious,
                    self.uffd
                        .wake(addr, 4096)
                        .map(|()| Installed::AlreadyPresent),
                ),
            };
            let done = crate::trace::monotonic_ns();
            let latency = since(start, done);
            match installed {
                Ok(Installed::Done) if kind != FaultKind::Spurious => {
                    // The page is ours now (a fetched page was freed by its holder).
                    let _ = self.directory.claim(page);
                    let install = since(install_start, done);
                    self.stats.record(kind, latency, transfer, Some(install));
                }
                Ok(_) => {
                    // Already present: another path installed it. It is resident, so the
                    // directory must say so; no fault was served, so no heat.
                    let _ = self.directory.set_owner(page, PageOwner::Local);
                    self.stats.record(FaultKind::Spurious, latency, None, None);
                }
                Err(e) => {
                    self.stats.record_error();
                    return Err(PagerError::Install { page, source: e });
                }
            }
        }
    }

    /// Fetches `page` from `node` into `dst`, claiming it (the holder frees it when the next
    /// request acknowledges the fetch), reconnecting and asking again while the node fails
    /// for less than the peer timeout. Once installed it is recorded as ours. `began` ([`crate::trace::monotonic_ns`]) is when the
    /// handler took the fault on, for the transfer marker.
    fn fetch_remote_page(
        &mut self,
        page: u64,
        node: NodeId,
        dst: &mut [u8],
        began: u64,
    ) -> Result<(), PagerError> {
        let r = self.transport.fetch_page(self.vm, page, node, dst);
        // The marker for the eBPF transfer probe (a uprobe on a 5-byte nop; see the probes
        // crate).
        if let Some(fetch_done) = self.trace.fetch_done {
            fetch_done(node, page, began);
        }
        r.map_err(|source| PagerError::Fetch { page, node, source })
    }
}

/// The time from `from` to `to`, two [`crate::trace::monotonic_ns`] readings.
fn since(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}
