//! Node liveness: every node renews a lease with the coordinator; one that stops renewing is
//! down (left out of `GET /endpoints`, `"up": false` in `GET /nodes`) within its lease, is up
//! again when it renews, may come back at another address without `--replace`, and is
//! forgotten after `--forget-after-secs` down.

use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Coordinator, MemoryNode, http_json, test_dir};

/// The ids `GET /endpoints` lists.
fn endpoints(coordinator: &str) -> Vec<u64> {
    let list = http_json(&format!("{coordinator}/endpoints")).unwrap();
    let list = list.as_array().expect("a list of endpoints");
    list.iter()
        .map(|e| e["node_id"].as_u64().unwrap())
        .collect()
}

/// Node `id` as `GET /nodes` lists it, if it does.
fn node(coordinator: &str, id: u64) -> Option<serde_json::Value> {
    let list = http_json(&format!("{coordinator}/nodes")).unwrap();
    list.as_array()
        .expect("a list of nodes")
        .iter()
        .find(|n| n["node_id"].as_u64() == Some(id))
        .cloned()
}

/// Polls until `ok` holds, for at most `limit`.
fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_that_stops_renewing_is_down_within_its_lease_and_up_when_it_renews() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("liveness");
    // Two seconds: renewals every 0.67 s, each allowed as long, so that a busy machine does
    // not miss three in a row.
    let lease = Duration::from_secs(2);
    let coordinator = Coordinator::start_with(
        &bins,
        &dir,
        &[
            "--lease-secs".as_ref(),
            "2".as_ref(),
            "--forget-after-secs".as_ref(),
            "3".as_ref(),
        ],
    )
    .unwrap();
    let url = coordinator.url.clone();
    let _one = MemoryNode::start(&bins, &dir, &url, 1, "64MiB").unwrap();
    let two = MemoryNode::start(&bins, &dir, &url, 2, "64MiB").unwrap();
    assert_eq!(endpoints(&url), [1, 2]);
    assert_eq!(node(&url, 2).unwrap()["lease_ms"], 2000);
    // Two leases long: the renewals keep both up.
    std::thread::sleep(2 * lease);
    assert_eq!(endpoints(&url), [1, 2]);
    assert_eq!(node(&url, 2).unwrap()["up"], true);

    // Node 2 stops (SIGSTOP: it is alive but silent, like a node behind a cut link). It
    // renewed at the latest when it stopped, so its lease has run out a lease later.
    two.proc.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    std::thread::sleep((lease + Duration::from_millis(200)).saturating_sub(stopped.elapsed()));
    assert_eq!(endpoints(&url), [1], "down within its lease");
    assert_eq!(node(&url, 2).unwrap()["up"], false, "listed, as down");
    assert_eq!(node(&url, 1).unwrap()["up"], true);

    // Down for a lease more (the coordinator looks every quarter of a lease), then it goes
    // on: its next renewal brings it back.
    std::thread::sleep(lease);
    two.proc.signal(libc::SIGCONT);
    wait_until(3 * lease, "node 2 up again", || endpoints(&url) == [1, 2]);
    let log = || std::fs::read_to_string(&coordinator.proc.stderr).unwrap_or_default();
    wait_until(
        Duration::from_secs(5),
        "the coordinator logging both",
        || {
            let log = log();
            log.contains("node is down: its lease ran out") && log.contains("node is up again")
        },
    );

    // Killed, it is down; started again on another port, it registers without --replace
    // (the id's holder is down: this is that node back).
    let mut two = two;
    two.proc.kill();
    wait_until(3 * lease, "killed node 2 down", || endpoints(&url) == [1]);
    let back = MemoryNode::start(&bins, &dir, &url, 2, "64MiB").unwrap();
    assert_ne!(back.addr, two.addr, "a new port");
    assert_eq!(endpoints(&url), [1, 2]);
    assert_eq!(
        node(&url, 2).unwrap()["endpoint"]["address"],
        back.addr.as_str()
    );

    // Killed for good: listed as down, then forgotten after --forget-after-secs 3.
    let mut back = back;
    back.proc.kill();
    let killed = Instant::now();
    wait_until(3 * lease, "node 2 down", || {
        node(&url, 2).is_some_and(|n| n["up"] == false)
    });
    wait_until(Duration::from_secs(12), "node 2 forgotten", || {
        node(&url, 2).is_none()
    });
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "not before --forget-after-secs"
    );
    assert_eq!(endpoints(&url), [1]);
}
