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

/// Accuracy is inferred from the streams' faults (see `pagemesh_pager::prefetch`): on a
/// busy machine windows come late and streams restart, and the pages of a restarted
/// stream's last window go uncounted (a CI run saw 0.83 on `seq` when only triggers
/// counted, two vCPUs under load 0.92). The bench holds the 0.95 target; the tests hold
/// the inference to most pages, above what a wrong detector gives (0.57-0.66 with one
/// detector per handler).
const MIN_ACCURACY: f64 = 0.8;

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
    assert!(p.accuracy > MIN_ACCURACY, "{p:#?}");
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
    assert!(p.accuracy > MIN_ACCURACY, "{p:#?}");

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

#[test]
fn a_replayed_working_set_is_there_before_the_guest_asks_and_is_right() {
    let mut c = cluster("prefetch-replay");
    let ws = c.dir.join("random.ws.json");
    let ws = ws.to_str().unwrap();
    // The same VM twice: the pattern's seed is given (it comes from the clock otherwise).
    let random = [
        "--mem",
        "32MiB",
        "--seed",
        "11",
        "--workload",
        "random",
        "--access",
        "verify",
    ];
    // The recording run: every page is a demand fault, each written to the file once, in
    // the order the guest asked for it.
    let (status, rec, proc) = c
        .run_compute(
            &[&random[..], &["--record-working-set", ws]].concat(),
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && rec.ok, "{rec:#?}\n{}", proc.log_tail());
    assert_eq!(rec.faults.remote, 8192, "{rec:#?}");
    assert!(
        rec.prefetch.is_none(),
        "recording alone starts no prefetcher"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws).unwrap()).unwrap();
    assert_eq!(file["format"], "pagemesh-working-set/1");
    assert_eq!(
        file["pages"].as_array().unwrap().len(),
        8192,
        "every page once"
    );

    // The replay: the same guest finds most pages there already, fetched in batches ahead
    // of it, and reads every one of them right.
    let (s, p) = run_ok(
        &mut c,
        &[&random[..], &["--replay-working-set", ws]].concat(),
    );
    assert!(
        s.faults.remote < rec.faults.remote / 2,
        "the replay came first for most pages: {} demand faults against {}; {p:#?}",
        s.faults.remote,
        rec.faults.remote
    );
    assert_eq!(p.issued, 0, "no stream prefetch without --prefetch: {p:#?}");
    // Each page crossed the wire once, replayed or demanded.
    assert_eq!(s.faults.remote + p.replayed, 8192, "{s:#?}");
    assert_eq!(s.bytes_fetched, 8192 * 4096, "{s:#?}");
}

#[test]
fn a_working_set_of_another_vm_is_refused_with_what_differs() {
    let mut c = cluster("prefetch-replay-other");
    let ws = c.dir.join("seq.ws.json");
    let ws = ws.to_str().unwrap();
    let (status, rec, proc) = c
        .run_compute(
            &[
                "--mem",
                "16MiB",
                "--seed",
                "5",
                "--workload",
                "seq",
                "--record-working-set",
                ws,
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && rec.ok, "{rec:#?}\n{}", proc.log_tail());
    for (other, says) in [
        (&["--mem", "32MiB", "--seed", "5"][..], "guest pages 4096"),
        (&["--mem", "16MiB", "--seed", "99"][..], "or give --seed 5"),
    ] {
        let (mut proc, _) = c
            .spawn_compute(&[other, &["--workload", "seq", "--replay-working-set", ws]].concat())
            .unwrap();
        let status = proc.wait(RUN_TIMEOUT).unwrap();
        assert!(
            !status.success(),
            "{other:?} ran on another VM's working set"
        );
        let log = proc.log_tail();
        assert!(
            log.contains(says) && log.contains("record one for this VM with --record-working-set"),
            "{other:?}: {log}"
        );
    }
}

#[test]
fn two_vcpus_streams_are_followed_whichever_handler_reads_their_faults() {
    let mut c = cluster("prefetch-two-vcpus");
    // Two vCPUs each verify their half in order: two streams, whose faults the two
    // handlers read as they come; one detector follows both.
    let (s, p) = run_ok(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "seq",
            "--access",
            "verify",
            "--vcpus",
            "2",
            "--prefetch",
        ],
    );
    assert_eq!(s.result.as_ref().unwrap().pages_done, 8192, "{s:#?}");
    assert_eq!(s.faults.remote + p.issued, 8192, "{s:#?}");
    assert!(p.issued > 8192 * 7 / 10, "both streams came ahead: {p:#?}");
    // A detector per handler would see each stream with holes and guess wrong (accuracy
    // 0.57-0.66 when tried).
    assert!(p.accuracy > MIN_ACCURACY, "{p:#?}");
}
