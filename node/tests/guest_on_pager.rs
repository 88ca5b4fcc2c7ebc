//! A real KVM guest on userfaultfd-served memory, pages from an in-process source.

use std::sync::Arc;

use pagemesh_api::Placement;
use pagemesh_node::compute::{RunOptions, run_guest};
use pagemesh_node::lifecycle::Backing;
use pagemesh_pager::PageDirectory;
use pagemesh_transport::TransportManager;
use pagemesh_transport::local::LocalSource;
use pagemesh_vmm::Workload;
use pagemesh_vmm::guest::Initial;

const PAGES: u64 = 4096;

fn pager_backing(seed: u64) -> Backing {
    let placement = Placement::interleave(vec![1, 2], 1, PAGES).unwrap();
    let directory = Arc::new(PageDirectory::from_placement(&placement).unwrap());
    let mut transport = TransportManager::new(0, pagemesh_transport::DEFAULT_TIMEOUT);
    transport.add_source(Box::new(LocalSource::with_pattern(1, 9, PAGES, seed)));
    transport.add_source(Box::new(LocalSource::with_pattern(2, 9, PAGES, seed)));
    Backing::Pager {
        directory,
        transport,
        more_handlers: Vec::new(),
        cache: None,
        prefetch: None,
        record_working_set: false,
        huge_pages: false,
    }
}

fn opts(workload: &str, access: &str, initial: Initial) -> RunOptions {
    RunOptions {
        vm: 9,
        mem_bytes: PAGES * 4096,
        workload: Workload::parse(workload, access, 0, PAGES, PAGES).unwrap(),
        initial,
        faults: pagemesh_node::lifecycle::FaultSetup::unpinned(),
        dump_ram: None,
        huge_pages: false,
        vcpus: 1,
    }
}

#[test]
fn verify_sees_every_page_from_its_owner() {
    let mut live = None;
    let out = run_guest(
        &opts("verify", "read", Initial::Pattern(77)),
        pager_backing(77),
        None,
        |run| live = Some(run),
    )
    .unwrap();
    let live = live.expect("the pager's live counters were handed out");
    assert_eq!(
        live.pages_done.load(std::sync::atomic::Ordering::Relaxed),
        PAGES
    );
    assert!(!live.running.load(std::sync::atomic::Ordering::Relaxed));
    // Every page was faulted on exactly once and is resident now.
    assert!((0..PAGES).all(|p| live.directory.heat(p) == Ok(1)));
    assert_eq!(live.directory.counts(), (0, PAGES, 0));
    assert_eq!(out.result.pages_done, PAGES);
    assert_eq!(out.result.bad_pages, 0, "{:?}", out.result);
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stats.remote, PAGES);
    assert_eq!(out.stats.local_zero, 0);
}

#[test]
fn verify_catches_the_wrong_pattern() {
    let out = run_guest(
        &opts("verify", "read", Initial::Pattern(1)),
        pager_backing(2),
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.result.bad_pages, PAGES);
    assert_eq!(out.result.first_bad_page, Some(0));
    assert!(!out.ok());
}

#[test]
fn random_rmw_checksums_and_zero_pages_stay_local() {
    let out = run_guest(
        &opts("random", "rmw", Initial::Pattern(5)),
        pager_backing(5),
        None,
        |_| {},
    )
    .unwrap();
    assert!(out.ok(), "{out:?}");
    let zero = Backing::Pager {
        directory: Arc::new(PageDirectory::new(PAGES)),
        transport: TransportManager::new(0, pagemesh_transport::DEFAULT_TIMEOUT),
        more_handlers: Vec::new(),
        cache: None,
        prefetch: None,
        record_working_set: false,
        huge_pages: false,
    };
    let out = run_guest(
        &opts("stride:16", "write", Initial::Zero),
        zero,
        None,
        |_| {},
    )
    .unwrap();
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stats.local_zero, PAGES);
    assert_eq!(out.stats.remote, 0);
    assert_eq!(out.stats.remote_miss_ratio, 0.0);
}

#[test]
fn a_guest_on_2mib_pages_faults_once_per_huge_page_and_reads_every_page_right() {
    let huge = 2 << 20;
    let _pool = pagemesh_vmm::memory::HugePool::reserve(PAGES * 4096 / huge + 1).unwrap();
    // Two homes, 2 MiB (512 pages) each in turn: each huge page comes from one of them.
    let placement = Placement::interleave(vec![1, 2], 512, PAGES).unwrap();
    let mut transport = TransportManager::new(0, pagemesh_transport::DEFAULT_TIMEOUT);
    transport.add_source(Box::new(LocalSource::with_pattern(1, 9, PAGES, 21)));
    transport.add_source(Box::new(LocalSource::with_pattern(2, 9, PAGES, 21)));
    let per = pagemesh_pager::PAGES_PER_HUGE_PAGE;
    // An entry per huge page; a 4 KiB directory is refused with huge pages.
    let coarse = |loaded: u64| {
        let mut d = PageDirectory::coarse(&placement, per).unwrap();
        d.never_written_from(loaded);
        Arc::new(d)
    };
    let huge_backing = |directory, transport| Backing::Pager {
        directory,
        transport,
        more_handlers: Vec::new(),
        cache: None,
        prefetch: None,
        record_working_set: false,
        huge_pages: true,
    };
    let sources = || {
        let mut transport = TransportManager::new(0, pagemesh_transport::DEFAULT_TIMEOUT);
        transport.add_source(Box::new(LocalSource::with_pattern(1, 9, PAGES, 21)));
        transport.add_source(Box::new(LocalSource::with_pattern(2, 9, PAGES, 21)));
        transport
    };
    let mut o = opts("verify", "verify", Initial::Pattern(21));
    o.huge_pages = true;
    let out = run_guest(&o, huge_backing(coarse(PAGES), transport), None, |_| {}).unwrap();
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.result.bad_pages, 0);
    // 4096 pages, 8 huge pages: one fault each, every byte fetched.
    assert_eq!(out.stats.remote, PAGES * 4096 / huge, "{:?}", out.stats);
    assert_eq!(out.stats.bytes_fetched, PAGES * 4096);

    let fine = Arc::new(PageDirectory::from_placement(&placement).unwrap());
    let refused = run_guest(&o, huge_backing(fine, sources()), None, |_| {}).unwrap_err();
    assert!(
        format!("{:#}", anyhow::Error::from(refused)).contains("an entry per huge page"),
        "a directory of 4 KiB entries is refused"
    );

    // An image that ends 100 pages before the VM does: the last huge page is fetched up to
    // there and the rest of it is zero (the verifying guest finds exactly those 100 pages
    // without their pattern).
    let out = run_guest(
        &o,
        huge_backing(coarse(PAGES - 100), sources()),
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(out.result.bad_pages, 100, "{out:?}");
    assert_eq!(out.result.first_bad_page, Some(PAGES - 100));
    assert_eq!(out.stats.remote, PAGES * 4096 / huge);
    assert_eq!(out.stats.bytes_fetched, (PAGES - 100) * 4096);

    // Never-written memory in huge pages: zero-filled locally, one fault per huge page.
    let zero = Backing::Pager {
        directory: coarse(0),
        transport: TransportManager::new(0, pagemesh_transport::DEFAULT_TIMEOUT),
        more_handlers: Vec::new(),
        cache: None,
        prefetch: None,
        record_working_set: false,
        huge_pages: true,
    };
    let mut o = opts("random", "rmw", Initial::Zero);
    o.huge_pages = true;
    let out = run_guest(&o, zero, None, |_| {}).unwrap();
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stats.local_zero, PAGES * 4096 / huge);
    assert_eq!(out.stats.remote, 0);
}
