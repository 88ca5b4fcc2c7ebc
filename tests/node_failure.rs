//! A memory node dies in the middle of a run: the compute node stops the guest with an
//! error naming the node and the page, and does not hang. And a compute node told to stop
//! in the middle of a run stops its guest at once.

use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Cluster, Proc, read_summary, test_dir};

/// Waits until the guest of `compute` (started with `--log debug`) has reported 8192 pages
/// done, so that a 512 MiB run is well under way and far from its end.
fn wait_until_the_guest_is_going(compute: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&compute.stderr).unwrap_or_default();
        if log.contains("guest: 8192 pages done") {
            return;
        }
        assert!(
            compute.try_wait().unwrap().is_none(),
            "compute node ended early:\n{}",
            compute.log_tail()
        );
        assert!(Instant::now() < deadline, "the guest never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_a_memory_node_mid_run_stops_the_guest_with_a_clear_error() {
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("node-failure"), &[1, 2], "1GiB").unwrap();
    // Big enough that the run is still going when node 2 dies.
    let (mut compute, json_path) = c
        .spawn_compute(&["--mem", "512MiB", "--workload", "verify", "--log", "debug"])
        .unwrap();
    wait_until_the_guest_is_going(&mut compute);
    c.memory[1].proc.kill();
    let killed = Instant::now();
    let status = compute.wait(Duration::from_secs(60)).unwrap();
    assert!(!status.success());
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {:?} to notice",
        killed.elapsed()
    );
    let log = std::fs::read_to_string(&compute.stderr).unwrap();
    assert!(log.contains("from node 2"), "{log}");
    assert!(log.contains("cannot fetch page"), "{log}");
    let summary = read_summary(&json_path)
        .unwrap()
        .expect("a failure summary");
    assert!(!summary.ok);
    assert!(
        summary
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("node 2"),
        "{summary:#?}"
    );
    // The surviving memory node is unharmed.
    assert!(c.memory[0].proc.try_wait().unwrap().is_none());
}

#[test]
fn sigterm_in_the_middle_of_a_run_stops_the_guest_and_the_node() {
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("sigterm-mid-run"), &[1, 2], "1GiB").unwrap();
    let (mut compute, json_path) = c
        .spawn_compute(&["--mem", "512MiB", "--workload", "verify", "--log", "debug"])
        .unwrap();
    wait_until_the_guest_is_going(&mut compute);
    compute.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = compute.wait(Duration::from_secs(60)).unwrap();
    // The guest was stopped where it was, not run to its end (131072 pages at tens of µs
    // each would take seconds) and not left hanging.
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "took {:?} to stop",
        signalled.elapsed()
    );
    assert!(!status.success(), "a stopped guest is not a good run");
    let log = std::fs::read_to_string(&compute.stderr).unwrap();
    assert!(log.contains("stopping the guest"), "{log}");
    assert!(log.contains("left the cluster"), "{log}");
    let summary = read_summary(&json_path)
        .unwrap()
        .expect("a failure summary");
    assert!(!summary.ok);
    assert!(
        summary
            .error
            .as_deref()
            .is_some_and(|e| e.contains("stopped")),
        "{summary:#?}"
    );
    // The memory nodes lost nothing and serve on.
    for m in &mut c.memory {
        assert!(m.proc.try_wait().unwrap().is_none());
    }
}
