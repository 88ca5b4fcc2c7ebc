//! Replicated pages (`--replicas 2`): a memory node killed in the middle of a run, or cut off
//! by its link going down, loses nothing; the guest runs on its pages' other homes and
//! finishes with every page right, reads and write-backs alike.

use std::time::{Duration, Instant};

use pagemesh_tests::netns::Netns;
use pagemesh_tests::{Bins, Cluster, Coordinator, MemoryNode, Proc, read_summary, test_dir};

/// Waits until the guest of `compute` (started with `--log debug`) has reported `pages`
/// pages done.
fn wait_for_pages(compute: &mut Proc, pages: u64) {
    let needle = format!("guest: {pages} pages done");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&compute.stderr).unwrap_or_default();
        if log.contains(&needle) {
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

/// Runs `args` on a compute node over memory nodes 1, 2 and 3 with two replicas, kills node
/// 2 once the guest has done `kill_at` pages, and checks the run ended well without it.
fn run_through_a_kill(
    name: &str,
    args: &[&str],
    kill_at: u64,
) -> pagemesh_api::summary::RunSummary {
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir(name), &[1, 2, 3], "1GiB").unwrap();
    run_through_a_kill_on(&mut c, args, kill_at)
}

/// [`run_through_a_kill`] on the cluster `c`.
fn run_through_a_kill_on(
    c: &mut Cluster,
    args: &[&str],
    kill_at: u64,
) -> pagemesh_api::summary::RunSummary {
    let common = ["--replicas", "2", "--peer-timeout", "1", "--log", "debug"];
    let (mut compute, json_path) = c.spawn_compute(&[args, &common].concat()).unwrap();
    wait_for_pages(&mut compute, kill_at);
    c.memory[1].proc.kill();
    let status = compute.wait(Duration::from_secs(180)).unwrap();
    let log = std::fs::read_to_string(&compute.stderr).unwrap();
    let summary = read_summary(&json_path).unwrap().expect("a summary");
    assert!(
        status.success() && summary.ok,
        "{summary:#?}\n{}",
        compute.log_tail()
    );
    let result = summary.result.as_ref().expect("a result");
    assert_eq!(result.bad_pages, 0, "{summary:#?}");
    assert!(
        log.contains("node 2 is lost"),
        "the failover is logged:\n{}",
        compute.log_tail()
    );
    assert_eq!(
        log.matches("node 2 is lost").count(),
        1,
        "said once, by the first connection set to find it"
    );
    assert_eq!(summary.lost_nodes, [2], "{summary:#?}");
    // The survivors serve on.
    for m in [0, 2] {
        assert!(c.memory[m].proc.try_wait().unwrap().is_none());
    }
    summary
}

#[test]
fn a_guest_verifies_every_page_through_a_memory_nodes_death() {
    let summary = run_through_a_kill(
        "replicas-verify",
        &["--mem", "256MiB", "--workload", "verify"],
        16384,
    );
    // Every page was loaded twice, each copy on a node of its own: 2/3 of the pages on each.
    assert_eq!(
        summary.held_before.values().collect::<Vec<_>>(),
        [&43691, &43691, &43690],
        "{summary:#?}"
    );
    assert_eq!(summary.faults.remote, 65536, "{summary:#?}");
}

#[test]
fn a_guest_writing_through_a_budget_loses_no_write_through_a_death_a_repair_and_a_second_death() {
    // Read-modify-writes over 256 MiB through a 64 MiB budget, half the accesses to a tenth
    // of the pages: dirty pages are written back to both homes and fetched again. Node 2 is
    // killed; with 2 s leases the coordinator retires it and the survivors repair while the
    // guest runs; then node 1 is killed too, and the pages whose homes were 1 and 2 come
    // from their repaired copies on node 3. The checksum of every value read is the test.
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("replicas-rmw");
    std::fs::create_dir_all(&dir).unwrap();
    let coordinator =
        Coordinator::start_with(&bins, &dir, &["--lease-secs".as_ref(), "2".as_ref()]).unwrap();
    let url = coordinator.url.clone();
    let memory = [1, 2, 3]
        .map(|id| MemoryNode::start(&bins, &dir, &url, id, "1GiB").unwrap())
        .into();
    let mut c = Cluster::from_parts(bins, dir, coordinator, memory);
    let pages = 65536u64;
    let (mut compute, json_path) = c
        .spawn_compute(&[
            "--mem",
            "256MiB",
            "--local-memory",
            "64MiB",
            "--workload",
            "hotset:10:50",
            // Six per page: long enough for a lease to run out and the repair to end before
            // the second kill.
            "--accesses",
            "393216",
            "--access",
            "rmw",
            "--replicas",
            "2",
            "--peer-timeout",
            "1",
            "--log",
            "debug",
            // The VM stays defined for the repair to be read.
            "--keep-vm",
        ])
        .unwrap();
    wait_for_pages(&mut compute, 32768);
    c.memory[1].proc.kill();
    // Repair: the survivors copy node 2's pages, each to the node after its other home,
    // until every page has two copies again (under a budget nothing is claimed: the homes
    // keep every page).
    let deadline = Instant::now() + Duration::from_secs(120);
    let vm = loop {
        let vms: Vec<pagemesh_api::Vm> =
            serde_json::from_str(&pagemesh_tests::http_get(&format!("{url}/vms")).unwrap())
                .unwrap();
        if let Some(vm) = vms
            .into_iter()
            .find(|vm| vm.repaired() && !vm.retired.is_empty())
        {
            break vm;
        }
        assert!(
            compute.try_wait().unwrap().is_none(),
            "the guest ended before the repair; make it longer:\n{}",
            compute.log_tail()
        );
        assert!(Instant::now() < deadline, "never repaired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(vm.retired, [2], "{vm:#?}");
    assert_eq!(vm.under_replicated(), Some(0), "{vm:#?}");
    let copied: u64 = vm.repairs.iter().map(|r| r.copied).sum();
    // Node 2 held 2/3 of the pages (43,691): a new copy of each, on node 1 or node 3, made
    // by the repair or, for a page written back since node 2 was lost, by the write-back
    // (it writes to the page's new home too).
    assert!(copied > 0 && copied <= 43691, "{vm:#?}");
    for m in [0, 2] {
        let stats: serde_json::Value = serde_json::from_str(
            &pagemesh_tests::http_get(&format!("{}/stats", c.memory[m].admin)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            stats["server"]["pages_held"], pages,
            "node {} holds a copy of every page: {stats}",
            c.memory[m].id
        );
    }
    let log = std::fs::read_to_string(&c.coordinator.proc.stderr).unwrap();
    assert!(log.contains("VM repaired"), "{log}");

    // The second death: node 3 alone holds every page now.
    assert!(
        compute.try_wait().unwrap().is_none(),
        "the guest ended before the second kill; make it longer:\n{}",
        compute.log_tail()
    );
    c.memory[0].proc.kill();
    let status = compute.wait(Duration::from_secs(180)).unwrap();
    let summary = read_summary(&json_path).unwrap().expect("a summary");
    assert!(
        status.success() && summary.ok,
        "{summary:#?}\n{}",
        compute.log_tail()
    );
    assert_eq!(
        summary.result.as_ref().unwrap().bad_pages,
        0,
        "{summary:#?}"
    );
    assert_eq!(summary.lost_nodes, [2, 1], "{summary:#?}");
}

#[test]
fn a_cut_link_to_a_memory_node_fails_over_within_the_peer_timeout() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("replicas-cut");
    // Memory node 2 lives in a network namespace of its own, reached over a veth pair; the
    // others, the coordinator and the compute node on this host's loopback.
    let netns = Netns::create().unwrap();
    let mut coordinator = Coordinator::start_on(&bins, &dir, "0.0.0.0:0", &[]).unwrap();
    let port = coordinator.url.rsplit(':').next().unwrap().to_owned();
    coordinator.url = format!("http://127.0.0.1:{port}");
    let from_netns = format!("http://{}:{port}", netns.host_ip);
    let url = coordinator.url.clone();
    let memory = vec![
        MemoryNode::start(&bins, &dir, &url, 1, "1GiB").unwrap(),
        MemoryNode::start_in(&netns, &bins, &dir, &from_netns, 2, "1GiB", &[]).unwrap(),
        MemoryNode::start(&bins, &dir, &url, 3, "1GiB").unwrap(),
    ];
    assert!(
        memory[1].addr.starts_with(&netns.ns_ip),
        "{}",
        memory[1].addr
    );
    let mut c = Cluster::from_parts(bins, dir, coordinator, memory);
    let (mut compute, json_path) = c
        .spawn_compute(&[
            "--mem",
            "256MiB",
            "--workload",
            "verify",
            "--replicas",
            "2",
            "--peer-timeout",
            "1",
            "--log",
            "debug",
        ])
        .unwrap();
    wait_for_pages(&mut compute, 16384);
    // The link goes down: node 2 is alive but nothing reaches it, nor does it answer.
    netns.cut().unwrap();
    let status = compute.wait(Duration::from_secs(180)).unwrap();
    let log = std::fs::read_to_string(&compute.stderr).unwrap();
    let summary = read_summary(&json_path).unwrap().expect("a summary");
    assert!(
        status.success() && summary.ok,
        "{summary:#?}\n{}",
        compute.log_tail()
    );
    assert_eq!(
        summary.result.as_ref().unwrap().bad_pages,
        0,
        "{summary:#?}"
    );
    assert!(log.contains("node 2 is lost"), "{}", compute.log_tail());
    assert_eq!(summary.lost_nodes, [2], "{summary:#?}");
    // The fault that met the cut waited one --peer-timeout (the reply's), not one more of
    // reconnecting: no fault took as long as two.
    assert!(
        summary.fault_max_us < 2e6,
        "slowest fault {} us with --peer-timeout 1",
        summary.fault_max_us
    );
    assert!(
        c.memory[1].proc.try_wait().unwrap().is_none(),
        "node 2 lives on"
    );
    netns.mend().unwrap();
}
