//! Prefetch (`--prefetch`): real coordinator, real memory nodes, a real KVM guest whose
//! fault streams are followed and fetched ahead on the prefetcher's own connections, with
//! the guest's content verified page by page.

use std::time::Duration;

use pagemesh_api::stats::PrefetchStats;
use pagemesh_api::summary::RunSummary;
use pagemesh_tests::{Bins, Cluster, test_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn cluster(name: &str) -> Cluster {
    let bins = Bins::for_tests().expect("binaries are built");
    Cluster::start(bins, test_dir(name), &[1, 2], "256MiB").expect("cluster starts")
}

/// Runs a compute node with `args` to its end; its summary, checked to be a success with
/// every page as expected and prefetch figures that add up.
fn run_ok(c: &mut Cluster, args: &[&str]) -> (RunSummary, PrefetchStats) {
    let (status, s, proc) = c.run_compute(args, RUN_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}\n{}", proc.log_tail());
    assert_eq!(s.faults.errors, 0, "{s:#?}");
    assert_eq!(s.result.as_ref().unwrap().bad_pages, 0, "{s:#?}");
    let p = s.prefetch.expect("a run with --prefetch reports it");
    eprintln!(
        "{args:?}: {} remote faults, prefetch {p:?}",
        s.faults.remote
    );
    assert!(p.used <= p.issued, "{p:#?}");
    (s, p)
}

#[test]
fn a_sequential_guest_is_served_ahead_and_reads_every_page_right() {
    let mut c = cluster("prefetch-seq");
    // 32 MiB of pattern pages interleaved over two memory nodes, verified in order.
    let (s, p) = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "seq",
            "--access",
            "verify",
            "--prefetch",
        ],
    );
    let pages = 8192;
    // Every page crossed the wire once, demanded or prefetched: prefetched pages are
    // transfers like the others.
    assert_eq!(s.faults.remote + p.issued, pages, "{s:#?}");
    assert_eq!(s.bytes_fetched, pages * 4096, "{s:#?}");
    assert!(
        p.issued > pages * 9 / 10,
        "most pages came ahead of the guest: {p:#?}"
    );
    assert!(p.accuracy > 0.9, "{p:#?}");
    // The homes lent every page away, to the prefetcher's connections or the handler's.
    assert_eq!(s.held_after.values().sum::<u64>(), 0, "{s:#?}");
}

#[test]
fn a_strided_guest_is_followed_and_a_random_one_is_not() {
    let mut c = cluster("prefetch-stride");
    let (s, p) = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "stride:4",
            "--access",
            "read",
            "--prefetch",
        ],
    );
    assert!(p.issued > 8192 * 8 / 10, "{p:#?} {s:#?}");
    assert!(p.accuracy > 0.9, "{p:#?}");

    let (s, p) = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "random",
            "--access",
            "verify",
            "--prefetch",
        ],
    );
    assert!(
        p.issued < 8192 / 100,
        "random access prefetches (almost) nothing: {p:#?}"
    );
    assert_eq!(s.faults.remote + p.issued, 8192, "{s:#?}");
}

#[test]
fn prefetch_under_a_budget_keeps_it_and_loses_no_write() {
    let mut c = cluster("prefetch-cache");
    // A sequential read-modify-write of 32 MiB through 4 MiB: prefetched pages come in
    // clean, become dirty on their first write, and are written back when evicted.
    let (s, p) = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "seq",
            "--access",
            "rmw",
            "--local-memory",
            "4MiB",
            "--prefetch",
            "--keep-vm",
        ],
    );
    let cache = s.cache.expect("a budgeted run reports its cache");
    assert!(
        cache.resident_max_pages <= cache.budget_pages,
        "the budget was kept: {cache:#?}"
    );
    // Prefetch only takes frames above the low watermark, which write-backs free slowly.
    assert!(p.issued > 8192 / 10, "{p:#?}");
    assert!(cache.dirty_evicted_pages > 0, "{cache:#?}");
    // Homes keep their copies under a budget (reads, not claims), prefetched or not.
    assert_eq!(s.held_after.values().sum::<u64>(), 8192, "{s:#?}");
}
