//! A page connection cut in the middle of a reply, several times during a run: the compute
//! node reconnects and fetches again, the memory node keeps every page until the compute node
//! has it, and the guest sees all its memory.
//!
//! Memory node 2 is reached only through a [`CuttingProxy`]: it listens on its own address and
//! advertises the proxy's, so the coordinator hands the proxy's address to the compute node.
//! The proxy cuts each connection part-way into a page payload, [`MAX_CUTS`] times in all.

use std::collections::BTreeMap;
use std::time::Duration;

use pagemesh_api::NodeId;
use pagemesh_protocol::HEADER_LEN;
use pagemesh_tests::proxy::{CutPlan, CuttingProxy};
use pagemesh_tests::{Bins, Cluster, MemoryNode, free_loopback_addr, http_json, test_dir};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// 64 MiB of 4 KiB pages.
const GUEST_PAGES: u64 = 16384;

/// Cuts the proxy makes; each one forces a reconnect.
const MAX_CUTS: u32 = 5;

/// A one-page Fetch reply: a header and a 4096-byte page.
const REPLY: u64 = HEADER_LEN as u64 + 4096;

/// Where the proxy cuts: after `k` one-page replies' worth of bytes plus 1000, a different `k`
/// for each cut. A connection's replies start with the Hello reply (one header, no cluster
/// name), so the cut falls `1000 - HEADER_LEN` bytes into the payload of the `k`-th Fetch
/// reply (counting from 0): a page is on the wire when the connection dies, and at least two
/// pages got through on every connection.
fn cut_offsets() -> Vec<u64> {
    [3, 7, 2, 11, 5]
        .into_iter()
        .map(|k| k * REPLY + 1000)
        .collect()
}

fn held(counts: &BTreeMap<NodeId, u64>, node: NodeId) -> u64 {
    *counts
        .get(&node)
        .unwrap_or_else(|| panic!("no held count for node {node}: {counts:?}"))
}

#[test]
fn a_verify_run_survives_connections_cut_in_the_middle_of_replies() {
    let bins = Bins::for_tests().expect("binaries are built");
    // Memory node 1 is reached directly.
    let mut c = Cluster::start(bins, test_dir("peer-recovery"), &[1], "512MiB").unwrap();
    // Memory node 2 behind the proxy: the proxy must point at node 2's listening address
    // before node 2 registers the proxy's address, so node 2's port is picked here.
    let listen = free_loopback_addr().unwrap();
    let plan = CutPlan {
        reply_bytes: cut_offsets(),
        max_cuts: MAX_CUTS,
    };
    let proxy = CuttingProxy::start(listen, plan).unwrap();
    let node2 = MemoryNode::start_at(
        &c.bins,
        &c.dir,
        &c.coordinator.url,
        2,
        "512MiB",
        &listen.to_string(),
        Some(&proxy.addr().to_string()),
    )
    .unwrap();
    // Every page of node 2 crosses the proxy: the node announced, and the coordinator hands
    // out, the proxy's address only.
    assert_eq!(node2.addr, proxy.addr().to_string());
    let endpoints = http_json(&format!("{}/endpoints", c.coordinator.url)).unwrap();
    let ep2 = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node_id"] == json!(2))
        .unwrap_or_else(|| panic!("node 2 is not registered: {endpoints:#}"));
    assert_eq!(ep2["address"], json!(proxy.addr().to_string()));
    c.memory.push(node2);

    // Interleaved one page at a time: node 2 serves every other page, so its connection is
    // busy from the first faults to the last and all the cuts land during the run.
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "64MiB",
                "--placement",
                "interleave",
                "--workload",
                "verify",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();

    // The guest finished and read every word of every page as the pattern says: no page was
    // lost with a cut reply (the guest would have been stopped, or its page zero-filled or
    // stale), none was installed from a partial or mixed-up reply.
    assert!(
        status.success(),
        "{status}: {}\nsummary: {s:#?}",
        proc.log_tail()
    );
    assert!(s.ok, "{s:#?}");
    let result = s
        .result
        .as_ref()
        .expect("a built-in guest reports a result");
    assert_eq!(result.pages_done, GUEST_PAGES, "{s:#?}");
    assert_eq!(result.bad_pages, 0, "{s:#?}");
    assert_eq!(result.first_bad_page, None, "{s:#?}");

    // The run went through every planned cut, each in the middle of a page payload (see
    // `cut_offsets`), each on a fresh connection: the compute node reconnected after each
    // one (a connection opened after the last cut passes through and finished the run). At
    // least 3 is the acceptance criterion; all of them is what the plan makes.
    let cuts = proxy.cuts();
    assert!(
        cuts >= 3,
        "only {cuts} cuts: the run did not exercise recovery"
    );
    assert_eq!(cuts, MAX_CUTS, "the compute node stopped reconnecting");

    // Held counts add up. `held_before` / `held_after` (the summary, per memory node id) are
    // what each node answered to Held before and after the guest ran; `pages_claimed` is each
    // node's own count of pages it freed because a compute node claimed them (`/stats`).
    // - The nodes held the whole guest between them, half each (interleave): nothing was
    //   lost or loaded twice before the run.
    // - For each node, held_before = held_after + claimed: a page leaves a node only by being
    //   claimed, and is counted once however many times its reply was cut and fetched again
    //   (a page freed on a reply that never arrived would show as claimed without reaching
    //   the guest, and the guest would have failed above).
    // - A verify run touches every page, so every page was claimed: held_after is 0, and
    //   nothing the cuts interrupted was left behind on the proxied node.
    assert_eq!(s.guest_pages, GUEST_PAGES, "{s:#?}");
    let mut held_in_all = 0;
    for m in &c.memory {
        let before = held(&s.held_before, m.id);
        let after = held(&s.held_after, m.id);
        let stats = http_json(&format!("{}/stats", m.admin)).unwrap();
        let claimed = stats["server"]["pages_claimed"]
            .as_u64()
            .unwrap_or_else(|| panic!("node {}: no pages_claimed: {stats:#}", m.id));
        assert_eq!(before, GUEST_PAGES / 2, "node {}: {s:#?}", m.id);
        assert_eq!(
            before,
            after + claimed,
            "node {}: held {before} before, {after} after, claimed {claimed}",
            m.id
        );
        assert_eq!(after, 0, "node {}: pages left behind: {s:#?}", m.id);
        held_in_all += before;
    }
    assert_eq!(held_in_all, GUEST_PAGES, "{s:#?}");
}
