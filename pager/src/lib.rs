//! The pager: serves a guest's page faults from the page directory.
//!
//! [`start_pager`] registers guest RAM with a userfaultfd and spawns the fault handler
//! thread; [`Pager`] is the handle to stop it and read its [`stats`]. A newcomer reads the
//! fault path in this crate from top to bottom: the guest's touch arrives as a userfaultfd
//! event ([`uffd`]), the handler (`handler.rs`) looks the page up in the [`directory`],
//! fetches it through the [`pagemesh_transport`] seam and installs it with `UFFDIO_COPY`.
//!
//! | module | what it is |
//! |---|---|
//! | [`uffd`] | the userfaultfd ioctls the pager uses |
//! | [`directory`] | where each guest page lives, and what the cache knows of it |
//! | `handler` | the fault handler thread |
//! | [`cache`] | a local memory budget: its configuration, counters and staging area |
//! | [`policy`] | which pages leave, and the reference policies (LRU, FIFO, MIN) |
//! | [`prefetch`] | stream detection: which pages a guest touches next |
//! | `prefetcher` | the prefetch thread that brings them in ahead of the guest |
//! | `reclaim` | the reclaimer thread that keeps frames free |
//! | [`stats`] | fault counts and latency histograms |
//! | [`trace`] | the hook that lets outside tracers (the eBPF probes) time a fault, and their clock |
//! | `kick` | interrupting the handler's blocking read |

pub mod cache;
pub mod directory;
mod handler;
mod kick;
pub mod policy;
pub mod prefetch;
mod prefetcher;
mod reclaim;
pub mod stats;
pub mod trace;
pub mod uffd;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};

pub use cache::{BudgetError, CacheConfig, CacheSnapshot, CacheStats};
pub use directory::{DirectoryError, PageDirectory, PageOwner, PageState};

/// Pages in a 2 MiB huge page: the pages per entry of a huge-page RAM's directory.
pub const PAGES_PER_HUGE_PAGE: u64 = handler::HUGE_PAGES;
pub use policy::Policy;
pub use stats::{PagerStats, StatsSnapshot};

use pagemesh_transport::{TransportError, TransportManager};

pub use trace::FaultTrace;

/// Errors of the pager.
#[derive(thiserror::Error, Debug)]
pub enum PagerError {
    /// Creating or registering the userfaultfd failed.
    #[error("cannot set up userfaultfd")]
    Uffd(#[from] uffd::UffdError),
    /// Reading fault events failed.
    #[error("cannot read userfaultfd events")]
    Read(#[source] std::io::Error),
    /// Huge-page RAM that is not made of whole, aligned huge pages.
    #[error("guest RAM at {base:#x} of {len} bytes is not whole 2 MiB huge pages")]
    HugeAlignment {
        /// Start of the RAM.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Huge-page RAM with a directory of 4 KiB entries.
    #[error("the page directory of 2 MiB huge pages must have an entry per huge page")]
    HugeDirectory,
    /// A budget or prefetch with huge pages.
    #[error(
        "2 MiB huge pages work without --local-memory, --prefetch and --replay-working-set \
         for now; drop --huge-pages or those"
    )]
    HugeUnsupported,
    /// A fault outside the directory.
    #[error("fault outside guest memory")]
    Directory(#[source] DirectoryError),
    /// Fetching a page from its owner failed.
    #[error("cannot fetch page {page} from node {node}")]
    Fetch {
        /// Guest page.
        page: u64,
        /// Owner node.
        node: NodeId,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// Installing a page failed.
    #[error("cannot install page {page}")]
    Install {
        /// Guest page.
        page: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Installing the signal handler that stops the handler thread failed.
    #[error("cannot install the pager's kick signal handler")]
    Kick(#[source] std::io::Error),
    /// Spawning the handler or reclaimer thread failed.
    #[error("cannot start the pager's threads")]
    Spawn(#[source] std::io::Error),
    /// The budget cannot work.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The staging area could not be mapped.
    #[error("cannot map the page cache's staging area")]
    Staging(#[source] std::io::Error),
    /// No frame came free within the budget.
    #[error(
        "no page of the {budget}-page local memory budget came free in {:.1} s: {why}",
        waited.as_secs_f64()
    )]
    NoFrame {
        /// The budget.
        budget: u64,
        /// How long the fault waited.
        waited: Duration,
        /// The reclaimer's last failure.
        why: String,
    },
    /// The handler thread panicked.
    #[error("the fault handler thread panicked")]
    Panicked,
}

/// Guest RAM the pager serves, borrowed for `'ram`: the mapping stays in place for as long
/// as a [`Pager`] serves it, which the borrow checker holds the owner of the RAM to (a
/// `Pager<'ram>` cannot outlive it).
#[derive(Clone, Copy, Debug)]
pub struct GuestRam<'ram> {
    base: *mut u8,
    len: usize,
    _mapping: std::marker::PhantomData<&'ram [u8]>,
}

impl<'ram> GuestRam<'ram> {
    /// Guest RAM at `base`, `len` bytes.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must be one anonymous private mapping (or several contiguous
    /// ones) that stays mapped, and is not moved or remapped, for `'ram`; `base` and `len`
    /// must be multiples of 4096. The pager installs pages into it with `UFFDIO_COPY` from
    /// its own thread while the guest runs.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        GuestRam {
            base,
            len,
            _mapping: std::marker::PhantomData,
        }
    }
}

/// What [`start_pager`] needs.
pub struct PagerConfig<'ram> {
    /// The VM whose pages are served.
    pub vm: VmId,
    /// Guest RAM (page aligned, a multiple of 4096 bytes).
    pub ram: GuestRam<'ram>,
    /// Owner of every page; one entry per 4096 bytes of `ram`.
    pub directory: Arc<PageDirectory>,
    /// Connections to the nodes holding pages, for the first fault handler.
    pub transport: TransportManager,
    /// More fault handler threads, one on each of these connections, reading the same
    /// userfaultfd: the faults of several vCPUs are then served at once. Empty: one
    /// handler. Not under a budget (`cache`), where one handler serves every fault.
    pub more_handlers: Vec<TransportManager>,
    /// Pin the (first) handler thread to this CPU (same CPU as the vCPU is fastest here).
    pub cpu: Option<usize>,
    /// How the handlers wait for faults and wake the guest.
    pub fault_path: FaultPath,
    /// What the handler tells outside tracers about each fault.
    pub trace: FaultTrace,
    /// Called from a handler thread that stops on an error (e.g. to kick the vCPUs).
    pub on_failure: Box<dyn Fn() + Send + Sync>,
    /// A local memory budget; `None`: unlimited, fetched pages move here for good.
    pub cache: Option<CacheConfig>,
    /// The prefetch thread (stream prefetch, a replayed working set); `None`: off.
    pub prefetch: Option<PrefetchConfig>,
    /// Record the pages the guest faults on, each once, in the order of their first faults
    /// ([`Pager::recorded`]).
    pub record_working_set: bool,
    /// `ram` is a hugetlb mapping of 2 MiB pages (its start and length multiples of 2 MiB):
    /// each fault fetches and installs the whole huge page. The directory must be
    /// [`PageDirectory::coarse`], an entry per huge page. Neither a budget nor prefetch
    /// work in 2 MiB pages yet, and are refused with them.
    pub huge_pages: bool,
}

/// How the fault handlers wait for a fault and wake the guest after it. The default is
/// what measured fastest here (docs/benchmarks.md, "The random-fault path"): a blocking
/// read, and the install's own wake-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPath {
    /// After each fault, poll the userfaultfd for this long (non-blocking reads) before
    /// sleeping until the next; zero sleeps right away.
    pub poll: Duration,
    /// Install a fetched page without waking (`UFFDIO_COPY_MODE_DONTWAKE`) and wake the
    /// guest with `UFFDIO_WAKE` once the fault's bookkeeping is done. Without a budget and
    /// in 4 KiB pages only: elsewhere the install wakes, as by default.
    pub wake_separately: bool,
}

/// What the prefetch thread does.
pub struct PrefetchConfig {
    /// Its connections: its own, apart from the handler's, so demand fetches never queue
    /// behind it.
    pub transport: TransportManager,
    /// Follow the guest's fault streams and fetch ahead of them (`--prefetch`).
    pub streams: bool,
    /// Pages to bring in from the start, in this order, behind demand faults (a working
    /// set an earlier run of the same image recorded); pages outside the VM are ignored.
    pub replay: Vec<u64>,
}

/// The pages a pager's guest faulted on, in order ([`Pager::recorded`]).
pub struct Recording(Arc<std::sync::Mutex<Recorded>>);

/// What the handlers recorded: each adds its first faults as it ends.
#[derive(Default)]
struct Recorded {
    /// Handlers that have not ended yet.
    running: usize,
    /// (order, page) of every first fault; `None` once taken.
    firsts: Option<Vec<(u32, u32)>>,
}

impl Recording {
    /// The pages, each once, in the order of their first faults, once every handler has
    /// stopped; `None` before, or after the first call.
    pub fn take(&self) -> Option<Vec<u32>> {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if r.running > 0 {
            return None;
        }
        let mut firsts = r.firsts.take()?;
        firsts.sort_unstable();
        Some(firsts.into_iter().map(|(_, page)| page).collect())
    }
}

/// A running pager.
pub struct Pager<'ram> {
    stats: Arc<PagerStats>,
    cache: Option<Arc<CacheStats>>,
    reclaimer: Option<JoinHandle<()>>,
    prefetcher: Option<JoinHandle<()>>,
    recorded: Arc<std::sync::Mutex<Recorded>>,
    recording: bool,
    directory: Arc<PageDirectory>,
    stop: Arc<AtomicBool>,
    /// The fault handler threads; empty once stopped.
    threads: Vec<JoinHandle<Result<(), PagerError>>>,
    /// Keeps the userfaultfd (and thus the registration) alive as long as the pager.
    _uffd: Arc<uffd::Uffd>,
    /// The RAM it serves, which must stay mapped while it does.
    _ram: GuestRam<'ram>,
}

/// Registers guest RAM with userfaultfd and starts serving its faults.
///
/// Every page of the RAM must be unpopulated: pages already present never fault, so they
/// would never be fetched.
pub fn start_pager(config: PagerConfig<'_>) -> Result<Pager<'_>, PagerError> {
    let ram = config.ram;
    debug_assert_eq!(ram.base as usize % PAGE_SIZE, 0);
    debug_assert_eq!(ram.len as u64, config.directory.len() * PAGE_SIZE as u64);
    if config.huge_pages {
        let huge = handler::HUGE_PAGES * PAGE_SIZE as u64;
        if !(ram.base as u64).is_multiple_of(huge) || !(ram.len as u64).is_multiple_of(huge) {
            return Err(PagerError::HugeAlignment {
                base: ram.base as u64,
                len: ram.len as u64,
            });
        }
        if config.cache.is_some() || config.prefetch.is_some() {
            return Err(PagerError::HugeUnsupported);
        }
        if config.directory.pages_per_entry() != handler::HUGE_PAGES {
            return Err(PagerError::HugeDirectory);
        }
    }
    if let Some(c) = &config.cache {
        check_budget(c, &config.directory)?;
        if !config.more_handlers.is_empty() {
            return Err(BudgetError::OneHandler.into());
        }
    }
    kick::install().map_err(PagerError::Kick)?;
    let uffd = Arc::new(uffd::Uffd::new()?);
    if config.cache.is_some() {
        uffd.register_missing_and_wp(ram.base as u64, ram.len as u64)?;
    } else {
        uffd.register_missing(ram.base as u64, ram.len as u64)?;
    }
    if !config.fault_path.poll.is_zero() {
        uffd.set_nonblocking().map_err(PagerError::Read)?;
        tracing::info!(
            "fault handlers poll the userfaultfd for {:?} after each fault",
            config.fault_path.poll
        );
    }
    let stats = Arc::new(PagerStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut cache_stats = None;
    let mut cache_side = None;
    let mut reclaimer = None;
    let mut prefetch_cache = None;
    if let Some(c) = config.cache {
        let cstats = Arc::new(CacheStats::default());
        let shared = Arc::new(cache::Shared::new(&c, cstats.clone()).map_err(PagerError::Staging)?);
        // Room for every frame and every slot: a send never blocks (see the handler).
        let (installs, installed) = std::sync::mpsc::sync_channel(shared.frames as usize + 1);
        let (returned, returns) =
            std::sync::mpsc::sync_channel(shared.staging.slots() as usize + 1);
        let patience = c.patience;
        let r = reclaim::Reclaimer {
            shared: shared.clone(),
            directory: config.directory.clone(),
            uffd: uffd.clone(),
            base: ram.base as u64,
            vm: config.vm,
            writeback: c.writeback,
            stop: stop.clone(),
            installs: installed,
            returned: returns,
        };
        let thread = std::thread::Builder::new()
            .name(format!("reclaim-vm{}", config.vm))
            .spawn(move || r.run())
            .map_err(PagerError::Spawn)?;
        let _ = shared.reclaimer.set(thread.thread().clone());
        tracing::info!(
            "page cache: a budget of {} pages ({} MiB), {} of them staging, {} eviction",
            c.budget_pages,
            (c.budget_pages * PAGE_SIZE as u64) >> 20,
            shared.staging.slots(),
            c.policy
        );
        reclaimer = Some(thread);
        cache_stats = Some(cstats);
        prefetch_cache = Some((shared.clone(), installs.clone()));
        cache_side = Some(handler::CacheSide {
            shared,
            installs,
            returned,
            patience,
        });
    }
    let mut prefetch_side = None;
    let mut prefetcher = None;
    if let Some(PrefetchConfig {
        transport,
        streams,
        replay,
    }) = config.prefetch
    {
        let (tell, heard) = std::sync::mpsc::sync_channel(prefetcher::HINTS);
        let p = prefetcher::Prefetcher {
            uffd: uffd.clone(),
            base: ram.base as u64,
            vm: config.vm,
            directory: config.directory.clone(),
            stats: stats.clone(),
            transport,
            hints: heard,
            cache: prefetch_cache,
            replay,
        };
        let thread = std::thread::Builder::new()
            .name(format!("prefetch-vm{}", config.vm))
            .spawn(move || p.run())
            .map_err(PagerError::Spawn)?;
        if streams {
            tracing::info!(
                "prefetch on: streams of faults are fetched ahead on their own connections"
            );
        }
        prefetch_side = Some(handler::PrefetchSide {
            detector: streams.then(|| {
                Arc::new(std::sync::Mutex::new(prefetch::StreamDetector::new(
                    config.directory.len(),
                )))
            }),
            hints: tell,
        });
        prefetcher = Some(thread);
    }
    let handlers = 1 + config.more_handlers.len();
    let record = config
        .record_working_set
        .then(|| Arc::new(handler::RecordShared::new(config.directory.len())));
    let recorded = Arc::new(std::sync::Mutex::new(Recorded {
        running: handlers,
        firsts: Some(Vec::new()),
    }));
    let on_failure: Arc<dyn Fn() + Send + Sync> = Arc::from(config.on_failure);
    let mut threads = Vec::with_capacity(handlers);
    let transports = std::iter::once(config.transport).chain(config.more_handlers);
    for (i, transport) in transports.enumerate() {
        let mut handler = handler::Handler {
            uffd: uffd.clone(),
            base: ram.base as u64,
            vm: config.vm,
            directory: config.directory.clone(),
            stats: stats.clone(),
            transport,
            stop: stop.clone(),
            trace: config.trace,
            cache: cache_side.clone(),
            prefetch: prefetch_side.as_ref().map(|p| handler::PrefetchSide {
                detector: p.detector.clone(),
                hints: p.hints.clone(),
            }),
            record: record.clone().map(handler::Record::new),
            served: 0,
            huge: config.huge_pages,
            fault_path: config.fault_path,
        };
        let (cpu, on_failure, record_to) = (
            config.cpu.filter(|_| i == 0),
            on_failure.clone(),
            recorded.clone(),
        );
        let name = match i {
            0 => format!("pager-vm{}", config.vm),
            i => format!("pager-vm{}-{i}", config.vm),
        };
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            let result = handler.run();
            handler.stats.add_handler_cpu(stats::thread_cpu());
            if handlers > 1 {
                tracing::info!("fault handler {i} served {} faults", handler.served);
            }
            {
                let mut r = record_to.lock().unwrap_or_else(|p| p.into_inner());
                r.running -= 1;
                if let (Some(mine), Some(all)) = (handler.record.take(), r.firsts.as_mut()) {
                    all.extend(mine.firsts);
                }
            }
            // Hangs up on the prefetcher, which ends after its current batch once every
            // handler has.
            drop(handler);
            if let Err(e) = &result {
                tracing::error!("pager stopped: {}", pagemesh_api::error_chain(e));
                on_failure();
            }
            result
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The spawn's error is the one to report; the others have served nothing.
                let _ = stop_handlers(&stop, &mut threads);
                return Err(PagerError::Spawn(e));
            }
        }
    }
    // The template the handlers' prefetch sides were made from: its sender must go, or the
    // prefetcher would never hear that they ended.
    drop(prefetch_side);
    if handlers > 1 {
        tracing::info!("{handlers} fault handler threads, each on its own connections");
    }
    Ok(Pager {
        stats,
        cache: cache_stats,
        reclaimer,
        prefetcher,
        recorded,
        recording: config.record_working_set,
        directory: config.directory,
        stop,
        threads,
        _uffd: uffd,
        _ram: ram,
    })
}

/// Refuses a budget below the minimum, or over pages without a home to write back to.
fn check_budget(c: &CacheConfig, directory: &PageDirectory) -> Result<(), BudgetError> {
    if c.budget_pages < cache::MIN_BUDGET_PAGES {
        return Err(BudgetError::TooSmall {
            pages: c.budget_pages,
        });
    }
    if let Some(page) = directory.entries().position(|e| e.home.is_none()) {
        return Err(BudgetError::NoHome { page: page as u64 });
    }
    Ok(())
}

impl Pager<'_> {
    /// The pager's statistics.
    pub fn stats(&self) -> &Arc<PagerStats> {
        &self.stats
    }

    /// The page cache's counters, with a budget.
    pub fn cache(&self) -> Option<&Arc<CacheStats>> {
        self.cache.as_ref()
    }

    /// The page directory.
    pub fn directory(&self) -> &Arc<PageDirectory> {
        &self.directory
    }

    /// Where the pages the guest faults on are recorded, if the pager was asked to
    /// ([`PagerConfig::record_working_set`]): readable once the pager has stopped.
    pub fn recorded(&self) -> Option<Recording> {
        self.recording.then(|| Recording(self.recorded.clone()))
    }

    /// Writes the whole of guest RAM to `to`, in order, and returns the bytes written: the
    /// pages that are here as they are, every other page brought in the way a guest's fault
    /// on it would be (fetched, zero-filled), by the handlers, which count those faults as
    /// theirs. For a stopped guest (a RAM image of where it got to): whatever runs on the
    /// guest's memory meanwhile may change it under the copy. Refused once a handler has
    /// ended, since a page nobody serves would wait forever.
    pub fn write_ram(&self, to: &mut dyn std::io::Write) -> std::io::Result<u64> {
        if self.threads.iter().any(|t| t.is_finished()) {
            return Err(std::io::Error::other(
                "a fault handler has stopped: pages not here cannot be brought in",
            ));
        }
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0;
        while done < self._ram.len {
            let n = CHUNK.min(self._ram.len - done);
            // SAFETY: `done + n <= len`, inside the mapping `GuestRam::new`'s caller keeps in
            // place for 'ram, which this pager borrows. Reading a missing page blocks until a
            // handler installs it; the kernel writes a page only while it is missing, before
            // the read of it returns, and the caller has stopped the guest, so nothing else
            // writes it during the copy. `buf` is a separate allocation of at least `n` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(self._ram.base.add(done), buf.as_mut_ptr(), n);
            }
            to.write_all(&buf[..n])?;
            done += n;
        }
        Ok(done as u64)
    }

    /// Stops the handler thread and returns how it ended.
    pub fn stop(mut self) -> Result<(), PagerError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), PagerError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        let ended = stop_handlers(&self.stop, &mut self.threads);
        // The handler has hung up on the prefetcher, which ends after its current batch.
        if let Some(p) = self.prefetcher.take()
            && p.join().is_err()
        {
            tracing::error!("the prefetch thread panicked");
        }
        if let Some(r) = self.reclaimer.take() {
            r.thread().unpark();
            if r.join().is_err() {
                tracing::error!("the reclaimer thread panicked");
            }
        }
        ended
    }
}

/// Stops the fault handler `threads` and joins them; the first error one ended with.
fn stop_handlers(
    stop: &AtomicBool,
    threads: &mut Vec<JoinHandle<Result<(), PagerError>>>,
) -> Result<(), PagerError> {
    stop.store(true, Ordering::Release);
    let mut ended = Ok(());
    for thread in threads.drain(..) {
        while !thread.is_finished() {
            kick::kick(&thread);
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = thread
            .join()
            .map_err(|_| PagerError::Panicked)
            .and_then(|r| r);
        if ended.is_ok() {
            ended = result;
        }
    }
    ended
}

impl Drop for Pager<'_> {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Pins the calling thread to `cpu`; failure only costs speed, so it is logged.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is reduced modulo the set size, so the bit index is in range.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: pid 0 means the calling thread; `set` is a valid cpu_set_t.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::warn!(
            "cannot pin thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
