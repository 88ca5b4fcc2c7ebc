//! The coordinator on etcd (`--store etcd`): a real three-member etcd cluster on loopback,
//! two coordinator processes sharing it, real memory nodes and KVM guests. What one
//! coordinator records, the other serves; a guest is placed and run through one on nodes
//! that registered through the other; an etcd member killed, and then a coordinator
//! killed, take nothing from the one left.

use std::time::{Duration, Instant};

use pagemesh_tests::etcd::EtcdCluster;
use pagemesh_tests::{Bins, Cluster, Coordinator, MemoryNode, http_get, test_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The ids in `GET {url}/endpoints`.
fn endpoints(url: &str) -> Vec<u64> {
    let list: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{url}/endpoints")).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["node_id"].as_u64().unwrap())
        .collect()
}

fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_verify(c: &mut Cluster, memory_nodes: usize) {
    let (status, s, proc) = c
        .run_compute(&["--mem", "16MiB", "--workload", "verify"], RUN_TIMEOUT)
        .unwrap();
    assert!(status.success() && s.ok, "{s:#?}\n{}", proc.log_tail());
    assert_eq!(s.result.as_ref().unwrap().bad_pages, 0, "{s:#?}");
    assert_eq!(
        s.held_before.len(),
        memory_nodes,
        "placed on every memory node: {s:#?}"
    );
}

#[test]
fn two_coordinators_on_etcd_serve_one_cluster_through_a_lost_member_and_a_lost_coordinator() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("etcd-store");
    let etcd = EtcdCluster::start(&dir, 3).unwrap();
    // 2 s leases: renewals every 0.67 s, each a compare-and-swap in etcd.
    let store = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoints(),
        "--lease-secs",
        "2",
    ];
    let store: Vec<&std::ffi::OsStr> = store.iter().map(|s| s.as_ref()).collect();
    let mut a =
        Coordinator::start_named("coordinator-a", &bins, &dir, "127.0.0.1:0", &store).unwrap();
    let b = Coordinator::start_named("coordinator-b", &bins, &dir, "127.0.0.1:0", &store).unwrap();

    // Memory nodes are given both coordinators; they register (and renew their leases)
    // through A, the first; B lists them.
    let both = format!("{},{}", a.url, b.url);
    let memory = [1, 2]
        .map(|id| MemoryNode::start(&bins, &dir, &both, id, "256MiB").unwrap())
        .into();
    wait_until(
        Duration::from_secs(10),
        "B sees the nodes A registered",
        || endpoints(&b.url) == [1, 2],
    );
    // A guest defined and placed through B, on the nodes A registered, runs well.
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let mut c = Cluster::from_parts(bins.clone(), dir.clone(), b, memory);
    run_verify(&mut c, 2);
    let a_log = std::fs::read_to_string(&a.proc.stderr).unwrap();
    assert!(
        !a_log.contains("created VM"),
        "the VM was created through B, not A"
    );

    // One of three etcd members dies: registration, leases and VM definitions go on.
    let mut etcd = etcd;
    etcd.members[0].kill();
    let _three = MemoryNode::start(&bins, &dir, &b_url, 3, "256MiB").unwrap();
    wait_until(Duration::from_secs(10), "A sees node 3", || {
        endpoints(&a_url) == [1, 2, 3]
    });
    run_verify(&mut c, 3);

    // A guest runs with both coordinators given, through A; A dies in the middle.
    c.coordinator.url = both.clone();
    let (mut compute, json) = c
        .spawn_compute(&["--mem", "256MiB", "--workload", "verify", "--log", "debug"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&compute.stderr)
        .unwrap_or_default()
        .contains("guest: 16384 pages done")
    {
        assert!(
            compute.try_wait().unwrap().is_none(),
            "{}",
            compute.log_tail()
        );
        assert!(Instant::now() < deadline, "the guest never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    a.proc.kill();
    // The running guest is unaffected: it finishes, every page right.
    let status = compute.wait(RUN_TIMEOUT).unwrap();
    let s = pagemesh_tests::read_summary(&json)
        .unwrap()
        .expect("a summary");
    assert!(status.success() && s.ok, "{s:#?}\n{}", compute.log_tail());
    assert_eq!(s.result.as_ref().unwrap().bad_pages, 0, "{s:#?}");
    // Its VM was deleted through B at the end.
    let vms = http_get(&format!("{b_url}/vms")).unwrap();
    assert_eq!(vms.trim(), "[]", "{}", compute.log_tail());
    // The memory nodes renew through B now: two leases on, they are up.
    std::thread::sleep(Duration::from_secs(5));
    let node: serde_json::Value =
        serde_json::from_str(&http_get(&format!("{b_url}/nodes/1")).unwrap()).unwrap();
    assert_eq!(node["up"], true, "{node}");
    let log = std::fs::read_to_string(&c.memory[0].proc.stderr).unwrap();
    assert!(
        log.contains(&format!("coordinator at {b_url} answers; using it")),
        "{log}"
    );
    // A new node registers through B, and the console, given both, shows the cluster.
    let _four = MemoryNode::start(&bins, &dir, &both, 4, "256MiB").unwrap();
    wait_until(Duration::from_secs(10), "node 4 listed", || {
        endpoints(&b_url).contains(&4)
    });
    let console = bins.node.with_file_name("pagemesh-console");
    let out = std::process::Command::new(&console)
        .args(["--coordinator", &both, "--once"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in 1..=4 {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{id} "))),
            "node {id} in the console:\n{text}"
        );
    }
    let log = std::fs::read_to_string(&c.coordinator.proc.stderr).unwrap();
    assert!(
        log.contains("etcd at "),
        "B says where its state is:\n{log}"
    );
}

#[test]
fn a_coordinator_without_etcd_says_so_and_exits() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("etcd-missing");
    let dead = pagemesh_tests::free_loopback_addr().unwrap();
    let out = std::process::Command::new(&bins.coordinator)
        .args(["--listen", "127.0.0.1:0", "--store", "etcd"])
        .args(["--etcd-endpoints", &format!("http://{dead}")])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("etcd at http://{dead}")), "{err}");
    let out = std::process::Command::new(&bins.coordinator)
        .args(["--store", "etcd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--store etcd needs --etcd-endpoints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
