//! The page cache: a budget of local memory for a VM whose pages live on memory nodes.
//!
//! With a budget ([`CacheConfig`]) the compute node keeps at most `budget_pages` of the
//! VM's pages: some mapped in guest memory, the rest in the reclaimer's staging area (see
//! [`crate::policy`] for why and in what order). Pages are fetched with `Read`, so their
//! home memory node keeps its copy: a clean page leaves for nothing, a dirty one is written
//! back first. Dirty tracking is userfaultfd write-protection: a page is installed
//! write-protected unless the fault that brought it was a write, and its first write faults
//! once, which marks it dirty in the [`crate::directory`].
//!
//! The fault handler never reclaims: it takes a free frame (the mapped pages are below
//! `budget - staging`), installs, and tells the reclaimer thread what it installed. The
//! reclaimer keeps free frames between two watermarks, staging the oldest mapped pages and
//! dropping or writing back (in batches, several requests outstanding) the oldest staged
//! ones. Only if it falls behind does a fault wait for a frame (counted as `budget_waits`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use pagemesh_api::PAGE_SIZE;
use pagemesh_transport::TransportManager;

use crate::policy::Policy;

/// Pages the reclaimer stages, drops or writes back per round (and per write-back batch).
pub const BATCH_PAGES: usize = 64;

/// The smallest budget: 1 MiB. Below it the watermarks and a write-back batch would not fit
/// beside the pages a vCPU needs at once.
pub const MIN_BUDGET_PAGES: u64 = 256;

/// What [`crate::start_pager`] needs for a budget.
pub struct CacheConfig {
    /// Pages of the VM the node may hold, mapped and staged together.
    pub budget_pages: u64,
    /// Replacement policy.
    pub policy: Policy,
    /// The reclaimer's own connections to the memory nodes, for write-back (the fault
    /// handler's are its alone).
    pub writeback: TransportManager,
    /// How long a fault may wait for a free frame before the VM stops (the peer timeout).
    pub patience: std::time::Duration,
}

/// Errors of a budget that cannot work.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// Below [`MIN_BUDGET_PAGES`].
    #[error(
        "a local memory budget of {pages} pages ({} KiB) is below the minimum of 1 MiB \
         (256 pages); give --local-memory at least 1MiB",
        pages * 4
    )]
    TooSmall {
        /// The budget asked for.
        pages: u64,
    },
    /// The budget needs every page to have a home to write back to.
    #[error(
        "page {page} has no home memory node, so it could not be written back; a local \
         memory budget needs a VM placed on memory nodes"
    )]
    NoHome {
        /// The first page without one.
        page: u64,
    },
    /// Several fault handlers asked for under a budget.
    #[error(
        "under a local memory budget one fault handler serves every fault; give one \
         (--fault-handlers 1)"
    )]
    OneHandler,
}

/// Counters of a cache, shared between the handler, the reclaimer and readers.
#[derive(Debug, Default)]
pub struct CacheStats {
    budget_pages: AtomicU64,
    staging_pages: AtomicU64,
    resident_max: AtomicU64,
    evictions: AtomicU64,
    clean_drops: AtomicU64,
    writeback_pages: AtomicU64,
    dirty_evicted: AtomicU64,
    retained: AtomicU64,
    refaults: AtomicU64,
    staged: AtomicU64,
    staging_hits: AtomicU64,
    wp_faults: AtomicU64,
    budget_waits: AtomicU64,
    writeback_errors: AtomicU64,
    pub(crate) mapped: AtomicU64,
    pub(crate) staged_now: AtomicU64,
}

/// A point-in-time copy of a cache's counters: the run summary's `cache` object.
pub use pagemesh_api::summary::CacheSummary as CacheSnapshot;

impl CacheStats {
    /// The counters now.
    pub fn snapshot(&self) -> CacheSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheSnapshot {
            budget_pages: get(&self.budget_pages),
            staging_pages: get(&self.staging_pages),
            resident_max_pages: get(&self.resident_max),
            resident_pages: get(&self.mapped) + get(&self.staged_now),
            evictions: get(&self.evictions),
            clean_drops: get(&self.clean_drops),
            writeback_pages: get(&self.writeback_pages),
            dirty_evicted_pages: get(&self.dirty_evicted),
            writeback_retained_pages: get(&self.retained),
            refaults: get(&self.refaults),
            staged: get(&self.staged),
            staging_hits: get(&self.staging_hits),
            write_protect_faults: get(&self.wp_faults),
            budget_waits: get(&self.budget_waits),
            writeback_errors: get(&self.writeback_errors),
        }
    }

    pub(crate) fn count(&self, what: Counter, n: u64) {
        let c = match what {
            Counter::Evicted { dirty: false } => {
                self.clean_drops.fetch_add(n, Ordering::Relaxed);
                &self.evictions
            }
            Counter::Evicted { dirty: true } => {
                self.dirty_evicted.fetch_add(n, Ordering::Relaxed);
                &self.evictions
            }
            Counter::WrittenBack => &self.writeback_pages,
            Counter::Retained => &self.retained,
            Counter::Refault => &self.refaults,
            Counter::Staged => &self.staged,
            Counter::StagingHit => &self.staging_hits,
            Counter::WriteProtectFault => &self.wp_faults,
            Counter::BudgetWait => &self.budget_waits,
            Counter::WritebackError => &self.writeback_errors,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn note_resident(&self) {
        let now = self.mapped.load(Ordering::Relaxed) + self.staged_now.load(Ordering::Relaxed);
        self.resident_max.fetch_max(now, Ordering::Relaxed);
    }
}

/// What a [`CacheStats`] counter counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    Evicted { dirty: bool },
    WrittenBack,
    Retained,
    Refault,
    Staged,
    StagingHit,
    WriteProtectFault,
    BudgetWait,
    WritebackError,
}

/// The staging area: `slots` pages in an anonymous mapping of their own, outside guest
/// memory (and outside the userfaultfd's range).
#[derive(Debug)]
pub(crate) struct Staging {
    base: *mut u8,
    slots: u32,
}

// SAFETY: the mapping is plain memory; who may touch which slot is decided by the page
// directory's states (a slot belongs to the reclaimer while it fills it, and is read by the
// handler only once a page's state names it, and freed only once neither uses it).
unsafe impl Send for Staging {}
// SAFETY: as above.
unsafe impl Sync for Staging {}

impl Staging {
    pub(crate) fn new(slots: u32) -> std::io::Result<Self> {
        let len = (slots as usize).max(1) * PAGE_SIZE;
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Staging {
            base: base.cast(),
            slots,
        })
    }

    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    /// The address of `slot`'s page.
    pub(crate) fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "staging slot {slot} of {}", self.slots);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.add(slot as usize * PAGE_SIZE) }
    }

    /// Gives `slot`'s memory back to the kernel (it reads as zeros until written again).
    pub(crate) fn release(&self, slot: u32) {
        // SAFETY: one page of our own mapping that nobody uses any more (the caller freed it).
        let rc =
            unsafe { libc::madvise(self.slot_ptr(slot).cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        debug_assert_eq!(rc, 0);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; the pager and its reclaimer are stopped.
        unsafe { libc::munmap(self.base.cast(), (self.slots as usize).max(1) * PAGE_SIZE) };
    }
}

/// The state the handler and the reclaimer share.
pub(crate) struct Shared {
    /// Pages that may be mapped in guest memory: the budget less the staging slots.
    pub(crate) frames: u64,
    /// The reclaimer starts when fewer frames than this are free...
    pub(crate) low: u64,
    /// ...and stops when this many are.
    pub(crate) high: u64,
    pub(crate) staging: Staging,
    pub(crate) stats: std::sync::Arc<CacheStats>,
    pub(crate) reclaimer: OnceLock<Thread>,
    /// Why the reclaimer stopped, if it failed.
    pub(crate) failure: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new(
        config: &CacheConfig,
        stats: std::sync::Arc<CacheStats>,
    ) -> std::io::Result<Self> {
        let staging = crate::policy::staging_slots(config.policy, config.budget_pages);
        let frames = config.budget_pages - staging;
        let low = (frames / 64).clamp(8, BATCH_PAGES as u64);
        stats
            .budget_pages
            .store(config.budget_pages, Ordering::Relaxed);
        stats.staging_pages.store(staging, Ordering::Relaxed);
        Ok(Shared {
            frames,
            low,
            high: 2 * low,
            staging: Staging::new(u32::try_from(staging).unwrap_or(u32::MAX))?,
            stats,
            reclaimer: OnceLock::new(),
            failure: Mutex::new(None),
        })
    }

    /// Frames free now.
    pub(crate) fn free_frames(&self) -> u64 {
        self.frames
            .saturating_sub(self.stats.mapped.load(Ordering::Acquire))
    }

    pub(crate) fn wake_reclaimer(&self) {
        if let Some(t) = self.reclaimer.get() {
            t.unpark();
        }
    }
}
