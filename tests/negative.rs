//! Bad input to real processes: garbage frames, unknown VMs, an absent coordinator, bad
//! settings. Each gets a clear error, and a node keeps serving its other peers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Cluster, Proc, test_dir};
use pagemesh_transport::tcp::TcpPeer;
use pagemesh_transport::{PageSource, PeerControl, Status, TransportError};

fn cluster(name: &str) -> Cluster {
    let bins = Bins::for_tests().expect("binaries are built");
    Cluster::start(bins, test_dir(name), &[1, 2], "256MiB").expect("cluster starts")
}

/// Sends `bytes` and returns what the server answered before closing (or within 2 s).
fn poke(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn garbage_frames_do_not_disturb_well_behaved_peers() {
    let mut c = cluster("garbage");
    let addr = c.memory[0].addr.clone();
    // A half-sent frame held open for the whole test.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled.write_all(b"PGMS\x04").unwrap();

    let answer = poke(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with(b"PGMS"),
        "the server answers garbage with an error frame or closes"
    );
    // A WriteBack header (48 bytes) whose payload_len says 4 GiB.
    let mut oversized = Vec::from(&b"PGMS\x04\x04\x00\x00"[..]);
    oversized.extend_from_slice(&[0u8; 24]);
    oversized.extend_from_slice(&u32::MAX.to_le_bytes());
    oversized.extend_from_slice(&[0u8; 12]);
    let _ = poke(&addr, &oversized);
    let _ = poke(&addr, &[0xffu8; 7]);

    // The node still serves a whole guest.
    let (status, s, proc) = c
        .run_compute(
            &["--mem", "16MiB", "--workload", "verify"],
            Duration::from_secs(300),
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    assert_eq!(s.faults.remote, 4096);
    // And the stalled connection never got an answer it did not ask for.
    stalled
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(stalled.read(&mut buf), Err(_) | Ok(0)));
}

#[test]
fn unknown_vm_and_unheld_pages_are_refused_with_a_reason() {
    let c = cluster("unknown-vm");
    let m = &c.memory[0];
    let mut peer = TcpPeer::connect(9, "", m.id, &m.addr, Duration::from_secs(5)).unwrap();
    let mut page = vec![0u8; 4096];
    match peer.fetch(999, 0, &mut page) {
        Err(TransportError::Remote {
            status: Status::UnknownVm,
            message,
            ..
        }) => assert!(message.contains("999"), "{message}"),
        other => panic!("expected an unknown-VM refusal, got {other:?}"),
    }
    // The connection stays usable after a refusal.
    match peer.held(999) {
        Err(TransportError::Remote { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Loading a VM the coordinator does not know is refused too.
    match peer.load(4242) {
        Err(TransportError::Remote { message, .. }) => {
            assert!(message.contains("4242"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Talking to node 1 while believing it is node 2 is caught at hello.
    assert!(TcpPeer::connect(9, "", 2, &m.addr, Duration::from_secs(5)).is_err());
}

#[test]
fn a_node_without_its_coordinator_retries_then_fails_naming_the_url() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("no-coordinator");
    // A port that was free a moment ago and has nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let mut p = Proc::spawn(
        "node",
        &dir,
        Command::new(&bins.node).args([
            "--id",
            "1",
            "--role",
            "memory",
            "--coordinator",
            &url,
            "--coordinator-attempts",
            "3",
        ]),
    )
    .unwrap();
    let status = p.wait(Duration::from_secs(30)).unwrap();
    assert!(!status.success());
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "it retried with backoff"
    );
    let log = std::fs::read_to_string(&p.stderr).unwrap();
    assert!(log.contains(&url), "{log}");
    assert!(log.contains("cannot reach the coordinator"), "{log}");
    assert!(log.contains("retrying"), "{log}");
}

#[test]
fn bad_settings_are_explained() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("bad-settings");
    let bad_key = dir.join("bad-key.toml");
    std::fs::write(&bad_key, "id = 1\nidd = 2\n").unwrap();
    let bad_value = dir.join("bad-value.toml");
    std::fs::write(&bad_value, "id = 1\nplacement = \"rings\"\n").unwrap();
    for (args, needle) in [
        (vec!["--id", "0", "--mem", "12parsecs"], "unknown size unit"),
        (vec!["--id", "0", "--vcpus", "0"], "0 is not in 1..=32"),
        (
            vec!["--config", bad_key.to_str().unwrap()],
            "unknown key 'idd'",
        ),
        (
            vec!["--config", bad_value.to_str().unwrap()],
            "bad value for 'placement': 'rings' is not one of interleave, ranges, weighted",
        ),
        (
            vec!["--id", "0", "--workload", "seq", "--range", "256MiB:4KiB"],
            "past the end of guest RAM",
        ),
        (vec!["--role", "memory"], "--id is required"),
        (
            vec![
                "--id",
                "0",
                "--role",
                "compute",
                "--backing",
                "uffd-local",
                "--workload",
                "zigzag",
            ],
            "unknown workload 'zigzag'",
        ),
        (
            vec![
                "--id",
                "0",
                "--role",
                "compute",
                "--backing",
                "uffd-local",
                "--mem",
                "1000",
                "--workload",
                "seq",
            ],
            "multiple of 4 KiB",
        ),
        (
            vec!["--id", "1", "--config", "/nonexistent.toml"],
            "cannot read config file",
        ),
    ] {
        let mut p = Proc::spawn("node", &dir, Command::new(&bins.node).args(&args)).unwrap();
        let status = p.wait(Duration::from_secs(30)).unwrap();
        assert!(!status.success(), "{args:?} should fail");
        let log = std::fs::read_to_string(&p.stderr).unwrap();
        assert!(
            log.contains(needle),
            "{args:?}: expected '{needle}' in:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn without_rdma_auto_goes_over_tcp_saying_why_and_rdma_is_refused_at_start() {
    // What this host has (none here, nor on CI: their kernels have no InfiniBand support);
    // this build has no RDMA transport either way, so the outcome is the same.
    let no_device = pagemesh_transport::rdma::devices().is_empty();
    let mut c = cluster("transport");
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "16MiB",
                "--workload",
                "verify",
                "--transport",
                "auto",
            ],
            Duration::from_secs(300),
        )
        .unwrap();
    assert!(status.success() && s.ok, "{status}: {}", proc.log_tail());
    assert_eq!(s.result.map(|r| r.bad_pages), Some(0));
    let log = std::fs::read_to_string(&proc.stderr).unwrap();
    assert_eq!(
        log.matches(": page traffic goes over TCP").count(),
        1,
        "one warning saying why:\n{log}"
    );
    if no_device {
        assert!(log.contains("this host has no RDMA device"), "{log}");
    }
    let bins = Bins::for_tests().unwrap();
    let mut p = Proc::spawn(
        "node-rdma",
        &c.dir,
        Command::new(&bins.node).args([
            "--id",
            "9",
            "--role",
            "memory",
            "--coordinator",
            &c.coordinator.url,
            "--transport",
            "rdma",
        ]),
    )
    .unwrap();
    let status = p.wait(Duration::from_secs(30)).unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(&p.stderr).unwrap();
    assert!(log.contains("invalid --transport rdma: "), "{log}");
    assert!(log.contains("use --transport tcp or auto"), "{log}");
    if no_device {
        assert!(log.contains("this host has no RDMA device"), "{log}");
    }
    // It never registered: the coordinator lists the memory nodes only.
    let (ids, nodes) = pagemesh_tests::node_ids(&c.coordinator.url).unwrap();
    assert_eq!(ids, [1, 2], "{nodes:#}");
}
