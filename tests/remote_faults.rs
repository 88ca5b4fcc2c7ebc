//! A guest whose memory lives on two other node processes: real coordinator, real memory
//! nodes, real KVM guest and userfaultfd, real sockets.

use std::time::Duration;

use pagemesh_tests::{Bins, Cluster, test_dir};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn cluster(name: &str) -> Cluster {
    let bins = Bins::for_tests().expect("binaries are built");
    Cluster::start(bins, test_dir(name), &[1, 2], "512MiB").expect("cluster starts")
}

#[test]
fn guest_verifies_64mib_living_on_two_memory_nodes() {
    let mut c = cluster("verify");
    let (status, s, proc) = c
        .run_compute(&["--mem", "64MiB", "--workload", "verify"], RUN_TIMEOUT)
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    let result = s.result.expect("the guest's result");
    assert_eq!(result.pages_done, 16384);
    assert_eq!(result.bad_pages, 0);
    assert_eq!(result.first_bad_page, None);
    // Every page lived on a memory node: every fault was remote.
    assert_eq!(s.faults.remote, 16384, "{s:#?}");
    assert_eq!(s.faults.local_zero, 0);
    assert_eq!(s.remote_miss_ratio, 1.0);
    assert!(s.fault_p50_us > 0.0);
    // Interleaved: half on each node, all claimed by the run.
    assert_eq!(s.held_before.get(&1), Some(&8192));
    assert_eq!(s.held_before.get(&2), Some(&8192));
    assert_eq!(s.held_after.get(&1), Some(&0));
    assert_eq!(s.held_after.get(&2), Some(&0));
    // Its run over, the compute node left the cluster: only the memory nodes are listed.
    let (ids, nodes) = pagemesh_tests::node_ids(&c.coordinator.url).unwrap();
    assert_eq!(ids, [1, 2], "{nodes:#}");
    assert!(
        proc.log_tail().contains("node 0 left the cluster"),
        "{}",
        proc.log_tail()
    );
    // And its VM is gone from the coordinator, its pages released.
    let vms = pagemesh_tests::http_json(&format!("{}/vms", c.coordinator.url)).unwrap();
    assert_eq!(vms, json!([]), "{vms:#}");
}

#[test]
fn each_page_is_fetched_once_and_freed_by_its_holder() {
    let mut c = cluster("claim");
    // Touch the first 16 MiB of a 64 MiB VM, read-modify-write in a stride order, and keep
    // the VM so the memory nodes' counts can be read afterwards.
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "64MiB",
                "--workload",
                "stride:7",
                "--access",
                "rmw",
                "--range",
                "0:16MiB",
                "--keep-vm",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    assert_eq!(s.faults.remote, 4096, "one fetch per touched page: {s:#?}");
    assert_eq!(s.faults.spurious, 0);
    assert_eq!(s.held_after.get(&1), Some(&(8192 - 2048)));
    assert_eq!(s.held_after.get(&2), Some(&(8192 - 2048)));
    // --keep-vm keeps its definition too.
    let vms = pagemesh_tests::http_json(&format!("{}/vms", c.coordinator.url)).unwrap();
    assert_eq!(vms.as_array().map(Vec::len), Some(1), "{vms:#}");
}

#[test]
fn never_written_pages_are_zero_filled_without_the_network() {
    let mut c = cluster("zero");
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "32MiB",
                "--content",
                "zero",
                "--placement",
                "ranges",
                "--workload",
                "random",
                "--access",
                "write",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    assert_eq!(s.faults.remote, 0);
    assert_eq!(s.faults.local_zero, 8192);
    assert_eq!(s.bytes_fetched, 0);
    assert_eq!(s.remote_miss_ratio, 0.0);
}

#[test]
fn a_memory_image_is_split_over_the_memory_nodes() {
    let mut c = cluster("image");
    // 8 MiB image of the pattern with seed 42, guest of 16 MiB: the second half was never
    // written and reads as zero, locally.
    let image = c.dir.join("guest.img");
    let mut bytes = vec![0u8; 8 << 20];
    for (p, page) in bytes.chunks_exact_mut(4096).enumerate() {
        pagemesh_api::pattern::fill_page(42, p as u64, page);
    }
    std::fs::write(&image, &bytes).unwrap();
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "16MiB",
                "--image",
                image.to_str().unwrap(),
                "--placement",
                "weighted",
                "--workload",
                "seq",
                "--access",
                "read",
                "--range",
                "0:8MiB",
                "--keep-vm",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert_eq!(s.faults.remote, 2048, "{s:#?}");
    // The checksum of the pattern's first words proves the bytes came from the image.
    let expected = (0..2048u64).fold(0u64, |a, p| {
        a.wrapping_add(pagemesh_api::pattern::first_word(42, p))
    });
    assert_eq!(s.result.map(|r| r.checksum), Some(expected));
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "16MiB",
                "--image",
                image.to_str().unwrap(),
                "--workload",
                "seq",
                "--access",
                "read",
                "--range",
                "8MiB:8MiB",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert_eq!(s.faults.local_zero, 2048, "{s:#?}");
    assert_eq!(s.result.map(|r| r.checksum), Some(0));
}

#[test]
fn the_admin_endpoint_reports_the_run_and_the_coordinator_lists_it() {
    let mut c = cluster("admin");
    // The node holds after its guest is done, so its final figures can be read.
    let (mut compute, admin, _) = c
        .run_compute_held(
            &["--mem", "16MiB", "--workload", "random", "--access", "read"],
            RUN_TIMEOUT,
        )
        .unwrap();
    let stats = pagemesh_tests::http_json(&format!("{admin}/stats?cells=64")).unwrap();
    let pager = &stats["pager"];
    assert_eq!(pager["faults_remote"], json!(4096), "{stats:#}");
    assert_eq!(pager["running"], json!(false));
    assert_eq!(pager["guest_pages_done"], json!(4096));
    assert_eq!(pager["fault_latency"]["count"], json!(4096));
    let peers = pager["peers"].as_array().unwrap();
    assert_eq!(
        peers.len(),
        2,
        "transfers from both memory nodes: {stats:#}"
    );
    assert_eq!(
        peers[0]["pages"].as_u64().unwrap() + peers[1]["pages"].as_u64().unwrap(),
        4096
    );
    let cells = pager["heat"]["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 64);
    let faults: u64 = cells.iter().map(|c| c["faults"].as_u64().unwrap()).sum();
    assert_eq!(faults, 4096, "every page faulted once");
    assert!(cells.iter().all(|c| c["local"] == json!(64)));

    let metrics = pagemesh_tests::http_get(&format!("{admin}/metrics")).unwrap();
    assert!(
        metrics.contains("pagemesh_faults_total{node=\"0\",kind=\"remote\",vm=\"1\"} 4096"),
        "{metrics}"
    );
    assert!(metrics.contains("pagemesh_fault_duration_seconds_count{node=\"0\",vm=\"1\"} 4096"));
    let memory = pagemesh_tests::http_json(&format!("{}/stats", c.memory[0].admin)).unwrap();
    assert_eq!(memory["server"]["pages_claimed"], json!(2048), "{memory:#}");
    assert_eq!(
        pagemesh_tests::http_get(&format!("{admin}/healthz")).unwrap(),
        "ok"
    );

    let nodes = pagemesh_tests::http_json(&format!("{}/nodes", c.coordinator.url)).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["admin"].is_string()), "{nodes:?}");

    let status = compute.stop().unwrap();
    assert!(status.success(), "a held node exits 0 on SIGTERM");
}

#[test]
fn two_fault_handlers_share_the_faults_and_every_page_is_right() {
    let mut c = cluster("two-handlers");
    let ws = c.dir.join("two-handlers.ws.json");
    let ws = ws.to_str().unwrap();
    // Two handler threads read the one userfaultfd, each on its own connections; the
    // guest checks every word of every page, and its working set is recorded across both.
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "32MiB",
                "--seed",
                "3",
                "--workload",
                "random",
                "--access",
                "verify",
                "--fault-handlers",
                "2",
                "--record-working-set",
                ws,
                "--log",
                "info",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && s.ok, "{s:#?}\n{}", proc.log_tail());
    assert_eq!(s.result.as_ref().unwrap().bad_pages, 0, "{s:#?}");
    assert_eq!(s.faults.remote, 8192, "{s:#?}");
    assert_eq!(
        s.held_after.values().sum::<u64>(),
        0,
        "every page claimed: {s:#?}"
    );
    let log = std::fs::read_to_string(&proc.stderr).unwrap();
    assert!(log.contains("2 fault handler threads"), "{log}");
    let served: u64 = log
        .lines()
        .filter_map(|l| l.split("fault handler ").nth(1))
        .filter_map(|l| l.split(" served ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        served >= 8192,
        "the handlers served {served} faults in all:\n{log}"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws).unwrap()).unwrap();
    let mut pages: Vec<u64> = file["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    pages.sort_unstable();
    assert_eq!(pages, (0..8192).collect::<Vec<_>>(), "each page once");

    // Under a budget one handler serves every fault: asking for two is refused, saying so.
    let (mut proc, _) = c
        .spawn_compute(&[
            "--mem",
            "32MiB",
            "--workload",
            "seq",
            "--local-memory",
            "4MiB",
            "--fault-handlers",
            "2",
        ])
        .unwrap();
    assert!(!proc.wait(RUN_TIMEOUT).unwrap().success());
    assert!(
        proc.log_tail().contains("--fault-handlers 1"),
        "{}",
        proc.log_tail()
    );
}

#[test]
fn a_guest_on_2mib_pages_gets_each_huge_page_in_one_fault_from_its_home() {
    let _pool = pagemesh_vmm::memory::HugePool::reserve(40).expect("root sizes the pool");
    let mut c = cluster("huge-pages");
    let (status, s, proc) = c
        .run_compute(
            &["--mem", "64MiB", "--workload", "verify", "--huge-pages"],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && s.ok, "{s:#?}\n{}", proc.log_tail());
    assert_eq!(s.result.as_ref().unwrap().bad_pages, 0, "{s:#?}");
    // 32 huge pages, one fault and 512 pages on the wire each, 2 MiB at a time from each
    // home in turn.
    assert_eq!(s.faults.remote, 32, "{s:#?}");
    assert_eq!(s.bytes_fetched, 64 << 20, "{s:#?}");
    assert_eq!(s.held_before.get(&1), Some(&8192), "{s:#?}");
    assert_eq!(s.held_after.values().sum::<u64>(), 0, "{s:#?}");

    // What does not work with huge pages yet is refused before anything starts.
    for (flags, says) in [
        (&["--mem", "64MiB", "--prefetch"][..], "--prefetch"),
        (&["--mem", "63MiB"][..], "multiple of 2MiB"),
        (
            &["--mem", "64MiB", "--placement", "ranges"][..],
            "placed whole, by --placement interleave",
        ),
    ] {
        let (mut proc, _) = c
            .spawn_compute(&[flags, &["--workload", "seq", "--huge-pages"]].concat())
            .unwrap();
        assert!(!proc.wait(RUN_TIMEOUT).unwrap().success(), "{flags:?}");
        assert!(
            proc.log_tail().contains(says),
            "{flags:?}: {}",
            proc.log_tail()
        );
    }
}

#[test]
fn two_vcpus_fault_at_once_on_two_handlers_and_every_page_is_right() {
    let mut c = cluster("two-vcpus");
    // Two vCPUs each verify half of the VM in random order; a fault handler each.
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "32MiB",
                "--workload",
                "random",
                "--access",
                "verify",
                "--vcpus",
                "2",
                "--log",
                "info",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && s.ok, "{s:#?}\n{}", proc.log_tail());
    let result = s.result.as_ref().unwrap();
    assert_eq!((result.pages_done, result.bad_pages), (8192, 0), "{s:#?}");
    assert_eq!(s.faults.remote, 8192, "{s:#?}");
    let log = std::fs::read_to_string(&proc.stderr).unwrap();
    assert!(log.contains("2 fault handler threads"), "{log}");

    // A trace order cannot be shared out: refused before anything starts.
    let (mut proc, _) = c
        .spawn_compute(&["--mem", "32MiB", "--workload", "zipf:0.99", "--vcpus", "2"])
        .unwrap();
    assert!(!proc.wait(RUN_TIMEOUT).unwrap().success());
    assert!(
        proc.log_tail().contains("share a workload's pages"),
        "{}",
        proc.log_tail()
    );
}

/// Every way of waiting for faults and waking the guest serves every page right: the
/// default (vCPU 0 and its handler pinned to one CPU), both left to the scheduler, the
/// handler on the other CPU polling the userfaultfd, and the wake-up after the bookkeeping;
/// each run says what its handlers' CPU cost per fault.
#[test]
fn every_fault_path_serves_every_page_right() {
    let mut c = cluster("fault-paths");
    for (extra, says) in [
        (&[][..], Some("its fault handler on CPU")),
        (&["--pin-cpu", "none"][..], None),
        (
            &[
                "--pin-cpu",
                "0",
                "--handler-cpu",
                "1",
                "--fault-poll-us",
                "50",
            ][..],
            Some("fault handlers poll the userfaultfd for 50µs after each fault"),
        ),
        (&["--wake-separately"][..], None),
    ] {
        let mut args = vec!["--mem", "16MiB", "--workload", "verify"];
        args.extend_from_slice(extra);
        let (status, s, proc) = c.run_compute(&args, RUN_TIMEOUT).unwrap();
        let log = proc.log_tail();
        assert!(status.success(), "{extra:?}: {status}: {log}");
        assert!(s.ok, "{extra:?}: {s:#?}");
        let result = s.result.expect("the guest's result");
        assert_eq!(
            (result.pages_done, result.bad_pages),
            (4096, 0),
            "{extra:?}"
        );
        assert_eq!(s.faults.remote, 4096, "{extra:?}: {s:#?}");
        assert!(s.handler_cpu_us_per_fault > 0.0, "{extra:?}: {s:#?}");
        if let Some(says) = says {
            assert!(log.contains(says), "{extra:?}: no '{says}' in:\n{log}");
        }
        if extra.is_empty() {
            // Auto: one CPU for both, the one the VM started on.
            let line = log
                .lines()
                .find(|l| l.contains("vCPU 0 on CPU"))
                .expect("the pinning is logged");
            let cpus: Vec<&str> = line.split(" on CPU ").skip(1).collect();
            assert_eq!(cpus.len(), 2, "{line}");
            assert_eq!(cpus[0].split(',').next(), Some(cpus[1].trim()), "{line}");
        }
        if extra.first() == Some(&"--pin-cpu") && extra.get(1) == Some(&"none") {
            assert!(!log.contains("vCPU 0 on CPU"), "{log}");
        }
    }
}

/// `--dump-ram` writes the guest's whole RAM when it stops: the pages it touched and, fetched
/// for the dump through the still-running pager, the ones it never did; every page is the
/// memory node's pattern.
#[test]
fn the_dumped_ram_is_every_page_of_the_guest_touched_or_not() {
    let mut c = cluster("dump-ram");
    let file = c.dir.join("ram.img");
    let path = file.display().to_string();
    let args = [
        "--mem",
        "16MiB",
        "--workload",
        "verify",
        "--range",
        "0:8MiB",
        "--seed",
        "5",
        "--dump-ram",
        &path,
    ];
    let (status, s, proc) = c.run_compute(&args, RUN_TIMEOUT).unwrap();
    let log = proc.log_tail();
    assert!(status.success(), "{status}: {log}");
    assert!(s.ok, "{s:#?}");
    assert!(log.contains("guest RAM written to"), "{log}");
    let ram = std::fs::read(&file).unwrap();
    assert_eq!(ram.len(), 16 << 20);
    for (page, bytes) in ram.chunks_exact(4096).enumerate() {
        assert_eq!(
            pagemesh_api::pattern::first_mismatch(5, page as u64, bytes),
            None,
            "page {page} of the dump"
        );
    }
    // The guest touched half; the dump brought in the other half.
    assert_eq!(s.faults.remote, 4096, "{s:#?}");
}
