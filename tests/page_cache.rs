//! A compute node under a local memory budget (`--local-memory`): real coordinator, real
//! memory nodes, a real KVM guest whose pages are evicted, written back and fetched again
//! while it runs.

use std::time::Duration;

use pagemesh_api::summary::RunSummary;
use pagemesh_tests::{Bins, Cluster, test_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn cluster(name: &str, capacity: &str) -> Cluster {
    let bins = Bins::for_tests().expect("binaries are built");
    Cluster::start(bins, test_dir(name), &[1, 2], capacity).expect("cluster starts")
}

/// Runs a compute node with `args` to its end and returns its summary, checked to be a
/// success within its budget.
fn run_ok(c: &mut Cluster, args: &[&str]) -> RunSummary {
    let (status, s, proc) = c.run_compute(args, RUN_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}\n{}", proc.log_tail());
    let cache = s.cache.expect("a budgeted run reports its cache");
    assert!(
        cache.resident_max_pages <= cache.budget_pages,
        "the budget was kept: {cache:#?}"
    );
    assert_eq!(s.faults.errors, 0, "{s:#?}");
    s
}

#[test]
fn a_guest_writes_through_a_budget_of_a_tenth_of_its_memory() {
    let mut c = cluster("cache-rmw", "512MiB");
    // 64 MiB of pattern pages, every one read-modify-written once in a random order, through
    // 6.4 MiB: the cache turns over ten times, every page goes out dirty.
    let s = run_ok(
        &mut c,
        &[
            "--mem",
            "64MiB",
            "--workload",
            "random",
            "--access",
            "rmw",
            "--local-memory",
            "6600KiB",
            "--keep-vm",
        ],
    );
    let cache = s.cache.unwrap();
    assert_eq!(cache.budget_pages, 1650);
    assert!(cache.evictions >= 16384 - 1650, "{cache:#?}");
    assert!(cache.dirty_evicted_pages > 0, "{cache:#?}");
    assert_eq!(
        cache.clean_drops, 0,
        "every evicted page had been written: {cache:#?}"
    );
    assert_eq!(
        cache.writeback_pages,
        cache.dirty_evicted_pages + cache.writeback_retained_pages,
        "no clean page written back, no dirty page dropped: {cache:#?}"
    );
    // Homes keep their copies: nothing was claimed away.
    assert_eq!(s.held_after.get(&1), Some(&8192), "{s:#?}");
    assert_eq!(s.held_after.get(&2), Some(&8192), "{s:#?}");
    // And what they hold now is what the guest wrote: a verify of the same VM's pages would
    // see every first word incremented, so check the checksum the guest computed instead
    // (each page read once, before its increment) and the evictions' write-backs above.
    assert_eq!(s.result.unwrap().bad_pages, 0);
}

#[test]
fn a_guest_keeps_writing_pages_that_are_being_evicted_and_loses_no_write() {
    let mut c = cluster("cache-zipf", "512MiB");
    // A skewed read-modify-write over 32 MiB through a budget of a tenth of it: hot pages
    // are written again and again while the reclaimer stages, writes back and drops them.
    // Every access adds the first word it reads to the checksum, so one lost or stale write
    // would change the sum the guest reports.
    let s = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "zipf:0.99",
            "--access",
            "rmw",
            "--accesses",
            "60000",
            "--local-memory",
            "3280KiB",
        ],
    );
    let cache = s.cache.unwrap();
    assert_eq!(s.result.unwrap().pages_done, 60000);
    assert!(cache.evictions > 2000, "{cache:#?}");
    assert!(
        cache.refaults > 1000,
        "pages went out and came back: {cache:#?}"
    );
    assert!(cache.staging_hits > 0, "{cache:#?}");
    assert!(cache.dirty_evicted_pages > 0, "{cache:#?}");
    assert_eq!(
        cache.writeback_pages,
        cache.dirty_evicted_pages + cache.writeback_retained_pages,
        "{cache:#?}"
    );
    assert_eq!(s.expected_checksum, Some(s.result.unwrap().checksum));

    // The same pages verified word by word while they come and go (hotset: 10% of the pages
    // take 90% of the accesses).
    let s = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "hotset:10:90",
            "--access",
            "verify",
            "--accesses",
            "40000",
            "--local-memory",
            "1MiB",
        ],
    );
    let cache = s.cache.unwrap();
    assert!(cache.refaults > 1000, "{cache:#?}");
    assert_eq!(s.result.unwrap().bad_pages, 0, "{s:#?}");
    assert_eq!(cache.writeback_pages, 0, "{cache:#?}");
}

#[test]
fn a_read_only_guest_under_a_budget_writes_nothing_back() {
    let mut c = cluster("cache-read", "512MiB");
    for eviction in ["clock", "fifo"] {
        let s = run_ok(
            &mut c,
            &[
                "--mem",
                "64MiB",
                "--workload",
                "verify",
                "--local-memory",
                "4MiB",
                "--eviction",
                eviction,
            ],
        );
        let cache = s.cache.unwrap();
        assert!(cache.evictions >= 16384 - 1024, "{eviction}: {cache:#?}");
        assert_eq!(cache.writeback_pages, 0, "{eviction}: {cache:#?}");
        assert_eq!(cache.dirty_evicted_pages, 0, "{eviction}: {cache:#?}");
        assert_eq!(cache.clean_drops, cache.evictions, "{eviction}: {cache:#?}");
        assert_eq!(cache.write_protect_faults, 0, "{eviction}: {cache:#?}");
        assert_eq!(s.result.unwrap().bad_pages, 0);
    }
}

#[test]
fn a_budget_below_the_minimum_is_refused_at_start() {
    let mut c = cluster("cache-min", "64MiB");
    let (status, _, proc) = c
        .spawn_compute(&["--mem", "64MiB", "--local-memory", "512KiB"])
        .map(|(mut p, j)| (p.wait(RUN_TIMEOUT).unwrap(), j, p))
        .unwrap();
    assert_eq!(status.code(), Some(2), "a usage error");
    let out = proc.log_tail();
    assert!(
        out.contains("--local-memory must be a multiple of 4 KiB and at least 1 MiB"),
        "{out}"
    );
}

#[test]
fn a_full_memory_node_refuses_write_backs_and_the_vm_stops_saying_so() {
    // Memory nodes of 2 MiB each under a 16 MiB VM of zero pages: they load nothing, so the
    // VM starts; every page the guest writes must go home when evicted, and after 512 pages
    // a home is full.
    let mut c = cluster("cache-full", "2MiB");
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "16MiB",
                "--content",
                "zero",
                "--workload",
                "seq",
                "--access",
                "write",
                "--local-memory",
                "1MiB",
                "--peer-timeout",
                "2",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    let log = proc.log_tail();
    assert!(!status.success(), "{log}");
    assert!(!s.ok, "{s:#?}");
    // The refused pages stayed cached (the reclaimer says so) until no frame came free.
    assert!(log.contains("they stay cached"), "{log}");
    let error = s.error.as_deref().unwrap_or_default();
    assert!(error.contains("local memory budget came free"), "{error}");
    assert!(error.contains("no room"), "{error}");
    assert!(error.contains("back to node"), "{error}");
    // The memory nodes are fine and took what they had room for.
    for m in &mut c.memory {
        assert!(
            m.proc.try_wait().unwrap().is_none(),
            "{}",
            m.proc.log_tail()
        );
    }
    let held: u64 = s.held_after.values().sum();
    assert!(held <= 1024, "{s:#?}");
}

#[test]
fn a_memory_node_killed_while_holding_written_back_pages_stops_the_vm_naming_it() {
    let mut c = cluster("cache-kill", "512MiB");
    // A long skewed read-modify-write through a small budget: pages keep going home dirty
    // and coming back.
    let (mut compute, json) = c
        .spawn_compute(&[
            "--mem",
            "64MiB",
            "--workload",
            "zipf:0.99",
            "--access",
            "rmw",
            "--accesses",
            "4000000",
            "--local-memory",
            "4MiB",
            "--peer-timeout",
            "2",
        ])
        .unwrap();
    let admin = compute.admin_url(Duration::from_secs(60)).unwrap();
    // Once node 2 holds pages the guest wrote (written back), kill it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let stats = pagemesh_tests::http_json(&format!("{admin}/stats")).unwrap();
        let written = stats["pager"]["cache"]["writeback_pages"].as_u64();
        if written.is_some_and(|w| w > 2000) {
            break;
        }
        assert!(
            compute.try_wait().unwrap().is_none(),
            "the run ended before node 2 was killed: {}",
            compute.log_tail()
        );
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.memory[1].proc.kill();
    let killed = std::time::Instant::now();
    let status = compute.wait(Duration::from_secs(60)).unwrap();
    assert!(!status.success());
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {:?} to stop",
        killed.elapsed()
    );
    let s = pagemesh_tests::read_summary(&json)
        .unwrap()
        .expect("a failure summary");
    assert!(!s.ok);
    let error = s.error.as_deref().unwrap_or_default();
    assert!(error.contains("node 2"), "{error}");
    assert!(error.contains("page"), "{error}");
    // Node 1 keeps serving.
    assert!(c.memory[0].proc.try_wait().unwrap().is_none());
}
