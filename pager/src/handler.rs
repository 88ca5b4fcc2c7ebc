//! The fault handler: a thread that reads userfaultfd events and resolves them. Without a
//! budget there may be several, each with its own connections, reading the same
//! userfaultfd: the kernel hands each event to one of them, so the faults of several vCPUs
//! are served at once; whoever moves a remote page to `Fetching` fetches it, and the others'
//! faults on it wait for that install.
//!
//! The hot path, per fault: a blocking `read` of one event, a directory lookup, for a remote
//! page one request/response on an already-connected blocking socket straight into a
//! preallocated buffer, one `UFFDIO_COPY`, a directory store and two counter updates. No
//! async runtime, no allocation, no lock but the (uncontended) histogram's and, with
//! prefetch, the stream detector's.
//!
//! With a budget ([`crate::cache`]) it also: takes a free frame (normally a counter
//! increment), installs read faults write-protected, turns the write-protect fault of a
//! clean page into a dirty page, puts staged pages back from the staging area, and sends the
//! reclaimer the page it installed (a bounded channel with room for every frame, so the send
//! never blocks or allocates). It never reclaims itself.
//!
//! With prefetch on it also runs the stream detector on every fault and sends the prefetch
//! thread (`crate::prefetcher`) the windows it plans (`try_send` on a bounded channel: a
//! full one drops the hint, counted; random access plans nothing and sends nothing). A remote page is
//! fetched by whoever moves it from `Remote` to `Fetching` first; a fault on a page the
//! prefetcher is fetching needs nothing from the handler (the prefetcher's install wakes the
//! guest), so a demand fault never waits behind a prefetch batch it did not ask for.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};
use pagemesh_transport::{Run, TransportManager};

use super::PagerError;
use super::cache::{Counter, Shared};
use super::directory::{PageDirectory, PageOwner, PageState};
use super::prefetch::StreamDetector;
use super::prefetcher::Hint;
use super::stats::{FaultKind, PagerStats};
use super::uffd::{Fault, Installed, Uffd};

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
    pub(crate) cache: Option<CacheSide>,
    /// Prefetch's stream detector and the prefetch thread's ear, when prefetch is on.
    pub(crate) prefetch: Option<PrefetchSide>,
    /// The pages faulted on, in order, when recording.
    pub(crate) record: Option<Record>,
    /// Faults this handler read and served (of every kind).
    pub(crate) served: u64,
    /// Guest RAM is in 2 MiB huge pages: a fault installs the whole huge page.
    pub(crate) huge: bool,
    /// How it waits for faults and wakes the guest.
    pub(crate) fault_path: crate::FaultPath,
}

/// Pages in a 2 MiB huge page.
pub(crate) const HUGE_PAGES: u64 = (2 << 20) / PAGE_SIZE as u64;

/// A 2 MiB buffer, page aligned (allocated when the handler starts, for huge pages only).
fn huge_buffer() -> Box<[PageBuf]> {
    (0..HUGE_PAGES).map(|_| PageBuf([0; PAGE_SIZE])).collect()
}

/// The first faults of a VM's pages over every handler: a bit per page says whether the
/// page has faulted before, a counter orders the first faults.
pub(crate) struct RecordShared {
    seen: Box<[AtomicU64]>,
    next: AtomicU32,
}

impl RecordShared {
    pub(crate) fn new(pages: u64) -> Self {
        RecordShared {
            seen: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU32::new(0),
        }
    }
}

/// One handler's share of the record: (order, page) of the first faults it served, made with
/// room for every page, so recording never allocates on the fault path.
pub(crate) struct Record {
    pub(crate) shared: Arc<RecordShared>,
    pub(crate) firsts: Vec<(u32, u32)>,
}

impl Record {
    pub(crate) fn new(shared: Arc<RecordShared>) -> Self {
        let pages = shared.seen.len() * 64;
        Record {
            shared,
            firsts: Vec::with_capacity(pages),
        }
    }

    /// Notes a fault on `page`: listed if it is the page's first, whichever handler served
    /// the others.
    fn note(&mut self, page: u64) {
        let Some(word) = self.shared.seen.get((page / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (page % 64);
        if word.load(Ordering::Relaxed) & bit == 0
            && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
            && self.firsts.len() < self.firsts.capacity()
        {
            let order = self.shared.next.fetch_add(1, Ordering::Relaxed);
            self.firsts.push((order, page as u32));
        }
    }
}

/// The handler's end of the cache.
#[derive(Clone)]
pub(crate) struct CacheSide {
    pub(crate) shared: Arc<Shared>,
    /// Pages installed, to the reclaimer.
    pub(crate) installs: SyncSender<u32>,
    /// Staging slots emptied, to the reclaimer.
    pub(crate) returned: SyncSender<u32>,
    /// How long a fault may wait for a free frame before the pager gives up.
    pub(crate) patience: Duration,
}

/// The handler's end of prefetch: it runs the detector on its faults and sends the prefetch
/// thread what to do. A full channel drops the hint (counted): the fault path never waits
/// for the prefetcher.
pub(crate) struct PrefetchSide {
    /// `None` when only a working set is replayed: the handler then sends nothing, and
    /// its end of the channel only tells the prefetch thread, by hanging up, that the
    /// guest is gone. One detector for every handler: a vCPU's faults go to whichever
    /// handler reads them, so a detector per handler would see each stream with holes.
    /// The lock is held for the detector's few dozen operations (uncontended with one
    /// handler).
    pub(crate) detector: Option<Arc<std::sync::Mutex<StreamDetector>>>,
    pub(crate) hints: SyncSender<Hint>,
}

impl PrefetchSide {
    /// Takes a served fault on `page` into account.
    #[inline]
    fn heard(&mut self, page: u64, kind: FaultKind, stats: &PagerStats) {
        let Some(detector) = &self.detector else {
            return;
        };
        let send = |h: Hint| {
            if self.hints.try_send(h).is_err() {
                stats.prefetch.count_dropped_hint();
            }
        };
        if kind == FaultKind::InFlight {
            // Inside a window already planned: its faults come in the order the window's
            // runs were installed, not the guest's, and would teach the detector a wrong
            // stride.
            send(Hint::Touched(page));
            return;
        }
        let (window, passed) = {
            let mut d = detector.lock().unwrap_or_else(|p| p.into_inner());
            (d.observe(page), d.take_passed())
        };
        if let Some(w) = window {
            send(Hint::Window(w));
        }
        if let Some(span) = passed {
            send(Hint::Passed(span));
        }
    }
}

/// A page-aligned, page-sized buffer (the fetch target and the zero page).
#[repr(C, align(4096))]
pub(crate) struct PageBuf(pub(crate) [u8; PAGE_SIZE]);

/// The bytes of `pages`.
pub(crate) fn bytes_mut(pages: &mut [PageBuf]) -> &mut [u8] {
    const { assert!(size_of::<PageBuf>() == PAGE_SIZE) };
    // SAFETY: `PageBuf` is `repr(C)` over `[u8; PAGE_SIZE]` and exactly that size (checked
    // above), so `pages` is `pages.len() * PAGE_SIZE` initialized, contiguous bytes, borrowed
    // mutably for as long as the result.
    unsafe { std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), size_of_val(pages)) }
}

/// What serving one fault did.
struct Served {
    kind: FaultKind,
    /// Whether the prefetcher hears of this fault (a guest access, not a write-protect
    /// fault or a stale event).
    hint: bool,
    installed: io::Result<Installed>,
    transfer: Option<(NodeId, Duration)>,
    install_start: u64,
    /// Installed without waking the guest ([`crate::FaultPath::wake_separately`]): the
    /// handler wakes it after the fault's bookkeeping.
    wake: bool,
}

impl Handler {
    /// Serves faults until `stop` is set (and the thread is kicked) or a fault cannot be
    /// served. On a stop it first delivers the acknowledgements of its last fetches, so that
    /// the memory nodes free what they lent.
    pub(crate) fn run(&mut self) -> Result<(), PagerError> {
        let mut buf = Box::new(PageBuf([0; PAGE_SIZE]));
        let zero = Box::new(PageBuf([0; PAGE_SIZE]));
        let mut huge = self.huge.then(|| (huge_buffer(), huge_buffer()));
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
            let next = match self.fault_path.poll.is_zero() {
                true => self.uffd.read_fault(),
                // Spins from the end of the last fault: polling stops when faults do.
                false => self
                    .uffd
                    .poll_fault(Instant::now() + self.fault_path.poll, &self.stop),
            };
            let fault = match next {
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
            let served = if let Some((buf, zero)) = &mut huge {
                self.serve_huge(page, buf, zero, start)?
            } else if self.cache.is_some() {
                self.serve_cached(&fault, addr, page, &mut buf.0, &zero.0, start)?
            } else {
                self.serve(addr, page, &mut buf.0, &zero.0, start)?
            };
            let done = crate::trace::monotonic_ns();
            let latency = since(start, done);
            self.served += 1;
            if served.hint {
                if let Some(p) = &mut self.prefetch {
                    p.heard(page, served.kind, &self.stats);
                }
                if let Some(r) = &mut self.record {
                    r.note(page);
                }
            }
            match served.installed {
                Ok(Installed::Done | Installed::AlreadyPresent)
                    if served.kind == FaultKind::InFlight =>
                {
                    self.stats.record(served.kind, latency, None, None);
                }
                Ok(Installed::Done) if served.kind != FaultKind::Spurious => {
                    if let Some(hook) = self.trace.served {
                        hook(page, start, served.install_start, done);
                    }
                    let install = since(served.install_start, done);
                    self.stats
                        .record(served.kind, latency, served.transfer, Some(install));
                }
                Ok(_) => {
                    if self.cache.is_none() {
                        // Already present: another path installed it. It is resident, so
                        // the directory must say so; no fault was served, so no heat.
                        let _ = self.directory.set_owner(page, PageOwner::Local);
                    }
                    self.stats.record(FaultKind::Spurious, latency, None, None);
                }
                Err(e) => {
                    self.stats.record_error();
                    return Err(PagerError::Install { page, source: e });
                }
            }
            if served.wake {
                // Installed without waking: the guest goes on now that nothing is left.
                self.uffd
                    .wake(addr, PAGE_SIZE as u64)
                    .map_err(|source| PagerError::Install { page, source })?;
            }
        }
    }

    /// A fault without a budget: fetched pages move here for good (their holder frees them).
    fn serve(
        &mut self,
        addr: u64,
        page: u64,
        buf: &mut [u8; PAGE_SIZE],
        zero: &[u8; PAGE_SIZE],
        start: u64,
    ) -> Result<Served, PagerError> {
        let mut served = Served {
            hint: true,
            kind: FaultKind::Spurious,
            installed: Ok(Installed::AlreadyPresent),
            transfer: None,
            install_start: start,
            wake: false,
        };
        let entry = loop {
            let entry = self.directory.entry(page).map_err(PagerError::Directory)?;
            // A remote page is ours to fetch once we move it to Fetching (the prefetcher
            // may take it first).
            if entry.state != PageState::Remote
                || self
                    .directory
                    .transition(page, PageState::Remote, PageState::Fetching)
                    .is_ok()
            {
                break entry;
            }
        };
        match entry.owner() {
            _ if entry.state == PageState::Fetching || entry.prefetched => {
                // The prefetcher is installing it, or just did: its install wakes the
                // guest (a failed prefetch wakes it to fault again). Nothing to do.
                served.kind = FaultKind::InFlight;
                return Ok(served);
            }
            PageOwner::Remote(node) => {
                if let Err(e) = self.fetch(page, node, buf, start, false) {
                    let _ = self
                        .directory
                        .transition(page, PageState::Fetching, PageState::Remote);
                    self.stats.record_error();
                    return Err(e);
                }
                served.install_start = crate::trace::monotonic_ns();
                served.transfer = Some((node, since(start, served.install_start)));
                let (src, len) = (buf.as_ptr(), PAGE_SIZE as u64);
                // SAFETY: `buf` is one readable page; `addr` is a page-aligned address
                // inside the registered range (it came from a fault on it).
                served.installed = unsafe {
                    match self.fault_path.wake_separately {
                        false => self.uffd.copy(addr, src, len),
                        true => self.uffd.copy_without_waking(addr, src, len),
                    }
                };
                served.wake = self.fault_path.wake_separately
                    && matches!(served.installed, Ok(Installed::Done));
                served.kind = FaultKind::Remote;
            }
            PageOwner::Zero => {
                // SAFETY: as above, with the zero page as the source. UFFDIO_COPY of
                // zeros rather than UFFDIO_ZEROPAGE: the guest usually writes next, and
                // a copied page takes the write without a second (COW) fault.
                served.installed = unsafe { self.uffd.copy(addr, zero.as_ptr(), PAGE_SIZE as u64) };
                served.kind = FaultKind::LocalZero;
            }
            PageOwner::Local => {
                served.hint = false;
                served.installed = self
                    .uffd
                    .wake(addr, PAGE_SIZE as u64)
                    .map(|()| Installed::AlreadyPresent);
            }
        }
        if matches!(served.installed, Ok(Installed::Done)) {
            // The page is ours now (a fetched page was freed by its holder).
            let _ = self.directory.claim(page);
        }
        Ok(served)
    }

    /// A fault in a RAM of 2 MiB huge pages, whose directory has an entry per huge page
    /// ([`PageDirectory::coarse`]): the whole huge page around `page` is fetched (in runs of
    /// [`pagemesh_transport::MAX_RUN_PAGES`]; pages past the loaded ones zeroed) into `buf`
    /// and installed with one `UFFDIO_COPY`. Whoever moves its entry to Fetching fetches it;
    /// another handler's fault on it waits for that install.
    fn serve_huge(
        &mut self,
        page: u64,
        buf: &mut [PageBuf],
        zero: &[PageBuf],
        start: u64,
    ) -> Result<Served, PagerError> {
        let first = page - page % HUGE_PAGES;
        let addr = self.base + first * PAGE_SIZE as u64;
        let len = HUGE_PAGES * PAGE_SIZE as u64;
        let mut served = Served {
            hint: true,
            kind: FaultKind::Spurious,
            installed: Ok(Installed::AlreadyPresent),
            transfer: None,
            install_start: start,
            wake: false,
        };
        let e = self.directory.entry(first).map_err(PagerError::Directory)?;
        let src = match (e.state, e.home) {
            (PageState::Remote, Some(node)) => {
                if self
                    .directory
                    .transition(first, PageState::Remote, PageState::Fetching)
                    .is_err()
                {
                    served.kind = FaultKind::InFlight;
                    return Ok(served);
                }
                let loaded = self.directory.loaded_end().clamp(first, first + HUGE_PAGES) - first;
                if let Err(e) =
                    self.fetch_huge(node, first, &mut buf[..loaded as usize], start, &mut served)
                {
                    self.unclaim(first);
                    self.stats.record_error();
                    return Err(e);
                }
                buf[loaded as usize..].iter_mut().for_each(|b| b.0.fill(0));
                // One fault, `loaded` pages on the wire: the fault's record counts one.
                self.stats.add_fetched(loaded.saturating_sub(1));
                served.kind = FaultKind::Remote;
                buf.as_ptr().cast::<u8>()
            }
            (PageState::Fetching, _) => {
                served.kind = FaultKind::InFlight;
                return Ok(served);
            }
            (PageState::Zero | PageState::Remote, _) => {
                served.kind = FaultKind::LocalZero;
                zero.as_ptr().cast::<u8>()
            }
            _ => {
                // Installed already (by another handler's fault): make sure nobody sleeps
                // on it.
                served.hint = false;
                served.installed = self
                    .uffd
                    .wake(addr, len)
                    .map(|()| Installed::AlreadyPresent);
                return Ok(served);
            }
        };
        served.install_start = crate::trace::monotonic_ns();
        // SAFETY: `src` is one of the handler's 2 MiB buffers (readable, `len` bytes);
        // `addr` is the huge-page-aligned start of the huge page the fault is in, inside
        // the registered range.
        served.installed = unsafe { self.uffd.copy(addr, src, len) };
        match served.installed {
            Ok(_) => {
                let _ = self.directory.claim(first);
            }
            Err(_) => self.unclaim(first),
        }
        Ok(served)
    }

    /// Fetches the first `buf.len()` pages of the huge page from `first` from `node`, a run
    /// of at most [`pagemesh_transport::MAX_RUN_PAGES`] at a time.
    fn fetch_huge(
        &mut self,
        node: NodeId,
        first: u64,
        buf: &mut [PageBuf],
        began: u64,
        served: &mut Served,
    ) -> Result<(), PagerError> {
        for (i, chunk) in buf
            .chunks_mut(pagemesh_transport::MAX_RUN_PAGES as usize)
            .enumerate()
        {
            let p = first + (i * pagemesh_transport::MAX_RUN_PAGES as usize) as u64;
            let mut runs = [Run::new(p, bytes_mut(chunk))];
            let fetched = self.transport.fetch_runs(self.vm, node, &mut runs);
            if let Some(fetch_done) = self.trace.fetch_done {
                fetch_done(node, p, began);
            }
            fetched.map_err(|source| PagerError::Fetch {
                page: p,
                node,
                source,
            })?;
            if !runs[0].filled {
                return Err(PagerError::Fetch {
                    page: p,
                    node,
                    source: pagemesh_transport::TransportError::UnknownPeer(node),
                });
            }
            if served.transfer.is_none() {
                served.transfer = Some((node, since(began, crate::trace::monotonic_ns())));
            }
        }
        Ok(())
    }

    /// Gives back a huge page whose fetch or install failed: it is remote again.
    fn unclaim(&self, first: u64) {
        let _ = self
            .directory
            .transition(first, PageState::Fetching, PageState::Remote);
    }

    /// A fault under a budget (see the module docs and [`crate::cache`]).
    fn serve_cached(
        &mut self,
        fault: &Fault,
        addr: u64,
        page: u64,
        buf: &mut [u8; PAGE_SIZE],
        zero: &[u8; PAGE_SIZE],
        start: u64,
    ) -> Result<Served, PagerError> {
        let mut served = Served {
            hint: false,
            kind: FaultKind::Spurious,
            installed: Ok(Installed::AlreadyPresent),
            transfer: None,
            install_start: start,
            wake: false,
        };
        let write = fault.is_write();
        loop {
            let entry = self.directory.entry(page).map_err(PagerError::Directory)?;
            if fault.is_write_protect() {
                match entry.state {
                    PageState::Clean | PageState::ZeroClean => {
                        if self
                            .directory
                            .transition(page, entry.state, PageState::Dirty)
                            .is_err()
                        {
                            continue;
                        }
                        self.cache_side()
                            .shared
                            .stats
                            .count(Counter::WriteProtectFault, 1);
                        served.kind = FaultKind::WriteProtect;
                        served.installed = self
                            .uffd
                            .write_protect(addr, PAGE_SIZE as u64, false)
                            .map(|()| Installed::Done);
                    }
                    PageState::Evicting => {
                        std::thread::yield_now();
                        continue;
                    }
                    // Dirty already (a second vCPU's write), or it left guest memory: the
                    // writer retries and faults again if it must.
                    PageState::Dirty | PageState::Local => {
                        served.installed = self
                            .uffd
                            .write_protect(addr, PAGE_SIZE as u64, false)
                            .map(|()| Installed::AlreadyPresent);
                    }
                    _ => {
                        served.installed = self
                            .uffd
                            .wake(addr, PAGE_SIZE as u64)
                            .map(|()| Installed::AlreadyPresent);
                    }
                }
                return Ok(served);
            }
            match entry.state {
                PageState::Evicting => {
                    // The reclaimer is taking it out (a copy and a madvise): wait for it.
                    std::thread::yield_now();
                    continue;
                }
                PageState::Fetching => {
                    // The prefetcher is installing it: see `serve`.
                    served.kind = FaultKind::InFlight;
                    served.hint = true;
                    return Ok(served);
                }
                PageState::Local | PageState::Clean | PageState::ZeroClean | PageState::Dirty => {
                    if entry.prefetched {
                        served.kind = FaultKind::InFlight;
                        served.hint = true;
                    }
                    served.installed = self
                        .uffd
                        .wake(addr, PAGE_SIZE as u64)
                        .map(|()| Installed::AlreadyPresent);
                    return Ok(served);
                }
                PageState::StagedClean | PageState::StagedDirty | PageState::WritingBack => {
                    let to = if entry.state == PageState::StagedClean && !write {
                        PageState::Clean
                    } else {
                        PageState::Dirty
                    };
                    self.take_frame()?;
                    if self.directory.installed(page, entry.state, to).is_err() {
                        // The reclaimer moved it on (dropped or started its write-back).
                        self.give_frame_back();
                        continue;
                    }
                    served.hint = true;
                    let side = self.cache_side();
                    let src = side.shared.staging.slot_ptr(entry.slot);
                    served.install_start = crate::trace::monotonic_ns();
                    // SAFETY: the slot holds the page's bytes and is ours to read until we
                    // return it (our compare-and-swap took the page from the staged
                    // state); `addr` is a registered, aligned page (it faulted).
                    served.installed = unsafe { self.install(addr, src, to) };
                    let side = self.cache_side();
                    let _ = side.returned.try_send(entry.slot);
                    side.shared.stats.count(Counter::StagingHit, 1);
                    served.kind = FaultKind::StagingHit;
                    self.installed(page);
                    return Ok(served);
                }
                PageState::Zero | PageState::Remote => {
                    // Ours to fetch once it is Fetching (the prefetcher may take it first).
                    let from = if entry.state == PageState::Remote {
                        if self
                            .directory
                            .transition(page, PageState::Remote, PageState::Fetching)
                            .is_err()
                        {
                            continue;
                        }
                        PageState::Fetching
                    } else {
                        PageState::Zero
                    };
                    served.hint = true;
                    if let Err(e) = self.take_frame() {
                        let _ = self.directory.transition(page, from, entry.state);
                        return Err(e);
                    }
                    let to = if write {
                        PageState::Dirty
                    } else {
                        PageState::Clean
                    };
                    let src = if entry.state == PageState::Remote {
                        let node = entry.home.unwrap_or_default();
                        if let Err(e) = self.fetch(page, node, buf, start, true) {
                            let _ = self.directory.transition(page, from, entry.state);
                            self.stats.record_error();
                            return Err(e);
                        }
                        served.install_start = crate::trace::monotonic_ns();
                        served.transfer = Some((node, since(start, served.install_start)));
                        served.kind = FaultKind::Remote;
                        buf.as_ptr()
                    } else {
                        served.kind = FaultKind::LocalZero;
                        zero.as_ptr()
                    };
                    let to = match (entry.state, to) {
                        (PageState::Zero, PageState::Clean) => PageState::ZeroClean,
                        (_, to) => to,
                    };
                    if entry.heat > 0 {
                        self.cache_side().shared.stats.count(Counter::Refault, 1);
                    }
                    // Nobody else moves a Fetching or Zero page (the prefetcher takes only
                    // Remote ones, the reclaimer only mapped or staged ones).
                    let _ = self.directory.installed(page, from, to);
                    // SAFETY: `src` is one readable page (the fetch buffer or the zero
                    // page); `addr` is a registered, aligned page.
                    served.installed = unsafe { self.install(addr, src, to) };
                    self.installed(page);
                    return Ok(served);
                }
            }
        }
    }

    /// Installs the page at `src` at `addr`, write-protected unless it is to be `Dirty`.
    ///
    /// # Safety
    /// `src` must be valid for reads of a page; `addr` a registered, aligned guest page.
    unsafe fn install(&self, addr: u64, src: *const u8, to: PageState) -> io::Result<Installed> {
        // SAFETY: the caller's guarantees.
        unsafe {
            if to == PageState::Dirty {
                self.uffd.copy(addr, src, PAGE_SIZE as u64)
            } else {
                self.uffd.copy_protected(addr, src, PAGE_SIZE as u64)
            }
        }
    }

    fn cache_side(&self) -> &CacheSide {
        self.cache.as_ref().expect("called on the cached path only")
    }

    /// Takes a free frame: normally a counter increment; when there is none, waits for the
    /// reclaimer (counted) up to the patience, then fails the VM with the reclaimer's last
    /// failure, if it had one.
    #[inline]
    fn take_frame(&self) -> Result<(), PagerError> {
        let side = self.cache_side();
        let shared = &side.shared;
        if shared.free_frames() == 0 {
            self.wait_for_frame()?;
        }
        let mapped = shared.stats.mapped.fetch_add(1, Ordering::AcqRel) + 1;
        if shared.frames.saturating_sub(mapped) < shared.low {
            shared.wake_reclaimer();
        }
        shared.stats.note_resident();
        Ok(())
    }

    #[cold]
    fn wait_for_frame(&self) -> Result<(), PagerError> {
        let side = self.cache_side();
        let shared = &side.shared;
        shared.stats.count(Counter::BudgetWait, 1);
        let began = Instant::now();
        while shared.free_frames() == 0 {
            shared.wake_reclaimer();
            if began.elapsed() > side.patience {
                let why = shared
                    .failure
                    .lock()
                    .ok()
                    .and_then(|f| f.clone())
                    .unwrap_or_else(|| "the reclaimer freed nothing".to_owned());
                return Err(PagerError::NoFrame {
                    budget: shared.stats.snapshot().budget_pages,
                    waited: began.elapsed(),
                    why,
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    fn give_frame_back(&self) {
        self.cache_side()
            .shared
            .stats
            .mapped
            .fetch_sub(1, Ordering::AcqRel);
    }

    /// Tells the reclaimer `page` is mapped now.
    #[inline]
    fn installed(&self, page: u64) {
        // Room for every frame: a page is sent once per install, and only after the
        // reclaimer took the last one out.
        let _ = self.cache_side().installs.try_send(page as u32);
    }

    /// Fetches `page` from `node` into `dst`: claiming it (the holder frees it when the next
    /// request acknowledges the fetch), or, with `keep`, reading it (the holder keeps its
    /// copy: it is the page's home). Reconnects and asks again while the node fails for less
    /// than the peer timeout. `began` ([`crate::trace::monotonic_ns`]) is when the handler took
    /// the fault on, for the transfer marker.
    fn fetch(
        &mut self,
        page: u64,
        node: NodeId,
        dst: &mut [u8],
        began: u64,
        keep: bool,
    ) -> Result<(), PagerError> {
        let r = if keep {
            self.transport.read_page(self.vm, page, node, dst)
        } else {
            self.transport.fetch_page(self.vm, page, node, dst)
        };
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
