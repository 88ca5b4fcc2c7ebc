//! The page cache over real userfaultfd and real memory: threads of this process play the
//! guest (the KVM guests are in the node's and the cluster's tests), the pages' home is a
//! buffer in this process shared by the handler's and the reclaimer's connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagemesh_api::{NodeId, PAGE_SIZE, Placement, VmId, pattern};
use pagemesh_pager::{
    CacheConfig, CacheSnapshot, FaultTrace, GuestRam, PageDirectory, PagerConfig, Policy,
    start_pager,
};
use pagemesh_transport::local::LocalSource;
use pagemesh_transport::{PageSource, TransportError, TransportManager};

const VM: VmId = 5;
const HOME: NodeId = 1;
const SEED: u64 = 0xC0FFEE;

/// One home buffer, reached through several connections.
#[derive(Clone)]
struct Shared(Arc<Mutex<LocalSource>>);

impl PageSource for Shared {
    fn peer(&self) -> NodeId {
        HOME
    }
    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        self.0.lock().unwrap().fetch(vm, page, dst)
    }
    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        self.0.lock().unwrap().read(vm, page, dst)
    }
    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError> {
        self.0.lock().unwrap().write_back(vm, page, src)
    }
}

/// Anonymous memory for the "guest".
struct Ram {
    base: *mut u8,
    len: usize,
}

impl Ram {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh anonymous private mapping; checked below.
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
        assert_ne!(base, libc::MAP_FAILED);
        Ram {
            base: base.cast(),
            len,
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our mapping; the pager using it has stopped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// What the "guest" does to a page.
#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Rmw,
}

/// Runs `threads` threads doing `accesses` accesses each over `pages` pages (thread `t` owns
/// pages `p % threads == t`), skewed so that some pages come back, under a `budget`; checks
/// every word read against the pattern plus what that thread added, and returns the cache's
/// figures.
fn run(
    pages: u64,
    budget: u64,
    policy: Policy,
    op: Op,
    threads: u64,
    accesses: u64,
) -> CacheSnapshot {
    let ram = Ram::new(pages as usize);
    let home = Shared(Arc::new(Mutex::new(LocalSource::with_pattern(
        HOME, VM, pages, SEED,
    ))));
    let placement = Placement::interleave(vec![HOME], 1, pages).unwrap();
    let directory = Arc::new(PageDirectory::from_placement(&placement).unwrap());
    let mut transport = TransportManager::new(0, Duration::from_secs(5));
    transport.add_source(Box::new(home.clone()));
    let mut writeback = TransportManager::new(0, Duration::from_secs(5));
    writeback.add_source(Box::new(home.clone()));
    let failed = Arc::new(AtomicBool::new(false));
    let on_failure = {
        let failed = failed.clone();
        Box::new(move || failed.store(true, Ordering::Release))
    };
    // SAFETY: `ram` is one anonymous mapping that outlives the pager (dropped after it).
    let guest = unsafe { GuestRam::new(ram.base, ram.len) };
    let pager = start_pager(PagerConfig {
        vm: VM,
        ram: guest,
        directory,
        transport,
        more_handlers: Vec::new(),
        cpu: None,
        fault_path: Default::default(),
        trace: FaultTrace::default(),
        on_failure,
        prefetch: None,
        record_working_set: false,
        huge_pages: false,
        cache: Some(CacheConfig {
            budget_pages: budget,
            policy,
            writeback,
            patience: Duration::from_secs(5),
        }),
    })
    .unwrap();
    let base = ram.base as usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mine: Vec<u64> = (0..pages).filter(|p| p % threads == t).collect();
                let mut added = vec![0u64; mine.len()];
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                for _ in 0..accesses {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Half the accesses to the first eighth of the pages: they come back.
                    let n = mine.len() as u64;
                    let i = if x & 1 == 0 {
                        (x >> 1) % n.div_ceil(8)
                    } else {
                        (x >> 1) % n
                    } as usize;
                    let page = mine[i];
                    let at = (base + page as usize * PAGE_SIZE) as *mut u64;
                    // SAFETY: inside the mapping the pager serves; a fault blocks until the
                    // page is installed.
                    let first = unsafe { std::ptr::read_volatile(at) };
                    assert_eq!(
                        first,
                        pattern::first_word(SEED, page).wrapping_add(added[i]),
                        "page {page}: first word"
                    );
                    // SAFETY: the same page's last word.
                    let last = unsafe { std::ptr::read_volatile(at.add(511)) };
                    assert_eq!(
                        last,
                        pattern::word(SEED, page, 511),
                        "page {page}: last word"
                    );
                    if op == Op::Rmw {
                        // SAFETY: as above; a write to a clean page faults (write-protect).
                        unsafe { std::ptr::write_volatile(at, first.wrapping_add(1)) };
                        added[i] += 1;
                    }
                }
            });
        }
    });
    // Read the counters once the reclaimer has ended: a write-back counts its pages before
    // it counts each one evicted or retained, so a snapshot taken while one is in flight can
    // be a batch apart.
    let cache = pager.cache().unwrap().clone();
    let stats = pager.stats().clone();
    pager.stop().unwrap();
    let cache = cache.snapshot();
    let stats = stats.snapshot();
    assert!(!failed.load(Ordering::Acquire));
    assert_eq!(stats.errors, 0);
    assert!(cache.resident_max_pages <= budget, "{cache:?}");
    cache
}

#[test]
fn rmw_through_a_small_budget_loses_no_write() {
    let c = run(2048, 256, Policy::Clock, Op::Rmw, 2, 20_000);
    assert!(c.evictions > 1000, "several eviction cycles: {c:?}");
    assert!(c.dirty_evicted_pages > 0, "{c:?}");
    assert_eq!(
        c.writeback_pages,
        c.dirty_evicted_pages + c.writeback_retained_pages,
        "{c:?}"
    );
    assert!(c.staging_hits > 0 && c.refaults > 0, "{c:?}");
    assert!(c.write_protect_faults > 0, "{c:?}");
}

#[test]
fn a_read_only_run_writes_nothing_back() {
    for policy in [Policy::Clock, Policy::Fifo] {
        let c = run(2048, 256, policy, Op::Read, 2, 20_000);
        assert!(c.evictions > 1000, "{c:?}");
        assert_eq!(c.writeback_pages, 0, "{c:?}");
        assert_eq!(c.clean_drops, c.evictions, "{c:?}");
        assert_eq!(c.write_protect_faults, 0, "{c:?}");
    }
}

#[test]
fn fifo_keeps_the_budget_too() {
    let c = run(1024, 300, Policy::Fifo, Op::Rmw, 1, 10_000);
    assert!(c.evictions > 0 && c.dirty_evicted_pages > 0, "{c:?}");
}

#[test]
fn a_budget_below_the_minimum_is_refused() {
    let ram = Ram::new(512);
    let placement = Placement::interleave(vec![HOME], 1, 512).unwrap();
    // SAFETY: as in `run`.
    let guest = unsafe { GuestRam::new(ram.base, ram.len) };
    let err = start_pager(PagerConfig {
        vm: VM,
        ram: guest,
        directory: Arc::new(PageDirectory::from_placement(&placement).unwrap()),
        transport: TransportManager::new(0, Duration::from_secs(1)),
        more_handlers: Vec::new(),
        cpu: None,
        fault_path: Default::default(),
        trace: FaultTrace::default(),
        on_failure: Box::new(|| {}),
        prefetch: None,
        record_working_set: false,
        huge_pages: false,
        cache: Some(CacheConfig {
            budget_pages: 100,
            policy: Policy::Clock,
            writeback: TransportManager::new(0, Duration::from_secs(1)),
            patience: Duration::from_secs(1),
        }),
    })
    .err()
    .expect("refused");
    assert_eq!(
        err.to_string(),
        "a local memory budget of 100 pages (400 KiB) is below the minimum of 1 MiB (256 \
         pages); give --local-memory at least 1MiB"
    );
}
