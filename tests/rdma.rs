//! RDMA's data path between real processes, with a real coordinator, real memory nodes and a
//! real KVM guest, where the one-sided reads are emulated (`--transport rdma-emulated`: the
//! compute node reads the memory nodes' registered page stores with `process_vm_readv`,
//! which the memory node takes no part in, as a NIC's READ would be). This host has no RDMA
//! device; everything but the verbs runs as it would over one: the registration of the
//! store's regions with the coordinator, RdmaConnect, slot maps, tag checks, claims over
//! TCP, write-backs remapped, the fallback to TCP for a peer without RDMA.

use std::time::Duration;

use pagemesh_api::summary::RunSummary;
use pagemesh_tests::{Bins, Cluster, MemoryNode, Proc, http_json, test_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const EMULATED: &str = "rdma-emulated";

fn run(c: &mut Cluster, args: &[&str]) -> (RunSummary, Proc) {
    let (status, s, proc) = c.run_compute(args, RUN_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}\n{}", proc.log_tail());
    (s, proc)
}

/// Every page of a guest comes by one-sided read from the two memory nodes, checked by its
/// tag, and is claimed over TCP: the homes hold nothing once the run is over. The memory
/// nodes' endpoints carry their regions.
#[test]
fn a_guest_reads_every_page_one_sided_and_claims_it_over_tcp() {
    let bins = Bins::for_tests().expect("binaries are built");
    let args = ["--transport".to_owned(), EMULATED.to_owned()];
    let mut c = Cluster::start_with(bins, test_dir("rdma-verify"), &[1, 2], "64MiB", &args)
        .expect("cluster starts");
    let endpoints = http_json(&format!("{}/endpoints", c.coordinator.url)).unwrap();
    for e in endpoints.as_array().unwrap() {
        let rdma = &e["rdma"];
        assert_eq!(
            rdma["gid"],
            hex_of(b"pagemesh-emulate"),
            "the emulation says so: {e:#}"
        );
        // 64 MiB of capacity, allocated up front: one region of it all.
        let regions = rdma["regions"].as_array().unwrap();
        assert_eq!(regions.len(), 1, "{e:#}");
        assert_eq!(regions[0]["len"], 64 << 20, "{e:#}");
    }
    let (s, proc) = run(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "verify",
            "--transport",
            EMULATED,
        ],
    );
    let result = s.result.expect("the guest's result");
    assert_eq!((result.pages_done, result.bad_pages), (8192, 0));
    assert_eq!(s.faults.remote, 8192, "{s:#?}");
    let rdma = s.rdma.expect("an RDMA run reports how its pages came");
    assert!(rdma.emulated, "{rdma:?}");
    assert_eq!(
        (rdma.rdma_pages, rdma.tcp_pages, rdma.stale_runs),
        (8192, 0, 0),
        "every page one-sided: {rdma:?}"
    );
    assert_eq!(rdma.claimed_pages, 8192, "{rdma:?}");
    assert_eq!(s.held_after.get(&1), Some(&0), "{s:#?}");
    assert_eq!(s.held_after.get(&2), Some(&0), "{s:#?}");
    assert!(
        proc.output()
            .contains("rdma (emulated): 8192 pages by one-sided READ, 0 over TCP"),
        "{}",
        proc.output()
    );
}

/// Under a budget, pages go out dirty (written back over TCP, their new slots mapped) and
/// come back by one-sided read: the guest's checksum over a skewed read-modify-write sees
/// every write it made.
#[test]
fn pages_written_back_come_back_one_sided_with_every_write() {
    let bins = Bins::for_tests().expect("binaries are built");
    let args = ["--transport".to_owned(), EMULATED.to_owned()];
    let mut c = Cluster::start_with(bins, test_dir("rdma-cache"), &[1, 2], "64MiB", &args)
        .expect("cluster starts");
    let (s, _) = run(
        &mut c,
        &[
            "--mem",
            "32MiB",
            "--workload",
            "zipf:0.99",
            "--access",
            "rmw",
            "--accesses",
            "30000",
            "--local-memory",
            "3280KiB",
            "--transport",
            EMULATED,
        ],
    );
    let cache = s.cache.expect("a budgeted run reports its cache");
    assert!(
        cache.refaults > 500,
        "pages went out and came back: {cache:#?}"
    );
    assert!(cache.dirty_evicted_pages > 0, "{cache:#?}");
    assert_eq!(s.expected_checksum, Some(s.result.unwrap().checksum));
    let rdma = s.rdma.expect("an RDMA run reports how its pages came");
    assert!(
        rdma.rdma_pages > s.faults.remote / 2,
        "refaults of written-back pages came one-sided too: {rdma:?} of {:?}",
        s.faults
    );
}

/// A memory node without RDMA is reached over TCP with a warning naming it, while the other
/// is read one-sided; a compute node that asks for RDMA of memory nodes that have none
/// reads everything over TCP.
#[test]
fn a_memory_node_without_rdma_is_reached_over_tcp() {
    let bins = Bins::for_tests().expect("binaries are built");
    let dir = test_dir("rdma-mixed");
    std::fs::create_dir_all(&dir).unwrap();
    let coordinator = pagemesh_tests::Coordinator::start(&bins, &dir).unwrap();
    let emulated = ["--transport".to_owned(), EMULATED.to_owned()];
    let memory = vec![
        MemoryNode::start_with(
            &bins,
            &dir,
            &coordinator.url,
            1,
            "64MiB",
            "127.0.0.1:0",
            None,
            &emulated,
        )
        .unwrap(),
        MemoryNode::start(&bins, &dir, &coordinator.url, 2, "64MiB").unwrap(),
    ];
    let mut c = Cluster::from_parts(bins, dir, coordinator, memory);
    let (s, proc) = run(
        &mut c,
        &[
            "--mem",
            "16MiB",
            "--workload",
            "verify",
            "--transport",
            EMULATED,
        ],
    );
    assert_eq!(s.result.unwrap().bad_pages, 0);
    let rdma = s.rdma.expect("an RDMA run reports how its pages came");
    // Interleaved: half the pages on each node, node 1's one-sided, node 2's over its
    // plain TCP connection (counted in neither).
    assert_eq!(s.faults.remote, 4096, "{s:#?}");
    assert_eq!((rdma.rdma_pages, rdma.tcp_pages), (2048, 0), "{rdma:?}");
    assert_eq!(s.held_after.get(&1), Some(&0), "{s:#?}");
    assert_eq!(s.held_after.get(&2), Some(&0), "{s:#?}");
    let log = proc.log_tail();
    assert!(
        log.contains("node 2 registered no RDMA endpoint: its pages come over TCP"),
        "{log}"
    );
    assert!(!log.contains("node 1 registered no RDMA endpoint"), "{log}");
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
