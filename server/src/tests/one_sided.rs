//! The RDMA page source against a real page server and its real page store, with the
//! memory of this process standing in for the memory node's as a NIC would see it: the
//! READs of [`LoopbackNic`] copy from the store's registered memory, and refuse, as a
//! device does, what lies outside a region or names another key. No RDMA device is needed
//! (this project's hosts have none); what is tested is everything above the verbs: the
//! queue pair exchange, slot maps, read plans, tag checks, claims, fallback to TCP.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use pagemesh_api::rdma::{RdmaEndpoint, RdmaRegion};
use pagemesh_protocol::QueuePair;
use pagemesh_transport::rdma::plan::ReadOp;
use pagemesh_transport::rdma::source::{BUFFER_LEN, OneSided, RdmaSource, SlotMaps};

use super::*;

const RKEY: u32 = 0x77;

/// The memory node's side of RdmaConnect: a queue pair number for each client, and a
/// count of the queue pairs alive (the server keeps one per connection).
struct FakeDevice {
    alive: Arc<AtomicUsize>,
    clients: Arc<Mutex<Vec<QueuePair>>>,
}

struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RdmaService for FakeDevice {
    fn connect(&self, client: &QueuePair) -> Result<(QueuePair, Box<dyn Send>), String> {
        self.clients.lock().unwrap().push(*client);
        let n = self.alive.fetch_add(1, Ordering::SeqCst);
        let ours = QueuePair {
            gid: [0xfe; 16],
            lid: 9,
            qpn: 0x100 + n as u32,
            psn: 0x200,
        };
        Ok((ours, Box::new(Alive(Arc::clone(&self.alive)))))
    }
}

/// One-sided reads of this process's memory, inside the regions registered with `RKEY`.
struct LoopbackNic {
    regions: Vec<(u64, u64)>,
    buffer: Box<[u8]>,
    connected_to: Option<QueuePair>,
    /// Makes the next reads fail as a broken queue pair would.
    failures: u32,
}

impl OneSided for LoopbackNic {
    fn end(&self) -> QueuePair {
        QueuePair {
            gid: [1; 16],
            lid: 3,
            qpn: 0x55,
            psn: 0x66,
        }
    }

    fn connect(&mut self, peer: &QueuePair) -> Result<(), String> {
        self.connected_to = Some(*peer);
        Ok(())
    }

    fn read(&mut self, pages: &[ReadOp], tags: &[ReadOp], _: Duration) -> Result<(), String> {
        if self.connected_to.is_none() {
            return Err("the queue pair is not connected".into());
        }
        if self.failures > 0 {
            self.failures -= 1;
            return Err("completion status 12 (transport retry counter exceeded)".into());
        }
        for r in pages.iter().chain(tags) {
            let len = u64::from(r.len);
            let inside = self
                .regions
                .iter()
                .any(|&(addr, bytes)| r.remote_addr >= addr && r.remote_addr + len <= addr + bytes);
            if r.rkey != RKEY || !inside || r.local_offset + r.len as usize > BUFFER_LEN {
                return Err(format!("remote access error at {:#x}", r.remote_addr));
            }
            // SAFETY: the source range lies inside a chunk of the running server's store,
            // allocated up front and never freed while the server lives (it outlives this
            // NIC); the destination is inside `buffer`, checked above. The server writes
            // its chunks only while answering a request, and these tests send none while
            // a read runs.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    r.remote_addr as *const u8,
                    self.buffer.as_mut_ptr().add(r.local_offset),
                    r.len as usize,
                );
            }
        }
        Ok(())
    }

    fn buffer(&self) -> &[u8] {
        &self.buffer
    }
}

struct Setup {
    server: Running,
    alive: Arc<AtomicUsize>,
    clients: Arc<Mutex<Vec<QueuePair>>>,
    endpoint: RdmaEndpoint,
}

/// A server for VM 7 whose store has its memory up front and "registered" with `RKEY`.
fn setup() -> Setup {
    setup_with(None)
}

/// [`setup`], the server closing connections idle for `idle`.
fn setup_with(idle: Option<Duration>) -> Setup {
    let alive = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(Mutex::new(Vec::new()));
    let store = PageStore::new(512).with_memory_up_front();
    let regions: Vec<RdmaRegion> = store
        .regions()
        .into_iter()
        .map(|(addr, len)| RdmaRegion {
            addr,
            len,
            rkey: RKEY,
        })
        .collect();
    let ctx = ServerContext::new(ME, store, |vm| match vm {
        7 => Ok(vm7()),
        _ => Err(format!("no VM {vm}").into()),
    })
    .with_cluster(CLUSTER.to_owned())
    .unwrap()
    .with_rdma(Box::new(FakeDevice {
        alive: Arc::clone(&alive),
        clients: Arc::clone(&clients),
    }));
    let ctx = match idle {
        Some(idle) => ctx.with_idle_timeout(Some(idle)),
        None => ctx,
    };
    let server = Running::serving(ctx);
    let endpoint = RdmaEndpoint {
        gid: [0xfe; 16],
        lid: 9,
        qpn: 0,
        psn: 0,
        regions,
    };
    Setup {
        server,
        alive,
        clients,
        endpoint,
    }
}

fn nic(endpoint: &RdmaEndpoint) -> Box<LoopbackNic> {
    Box::new(LoopbackNic {
        regions: endpoint
            .regions
            .iter()
            .map(|r| (r.addr, r.len + pagemesh_api::rdma::tags_len(r.len)))
            .collect(),
        buffer: vec![0u8; BUFFER_LEN].into_boxed_slice(),
        connected_to: None,
        failures: 0,
    })
}

fn rdma_source(s: &Setup, maps: &SlotMaps) -> RdmaSource {
    rdma_source_through(s, maps, nic(&s.endpoint))
}

/// A source of `s`'s server reading through `nic`.
fn rdma_source_through(s: &Setup, maps: &SlotMaps, nic: Box<LoopbackNic>) -> RdmaSource {
    RdmaSource::connect(
        s.server.peer(),
        nic,
        &s.endpoint,
        maps.clone(),
        Duration::from_secs(5),
    )
    .map_err(|refused| refused.1)
    .unwrap()
}

fn stat(v: &std::sync::atomic::AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// Pages come by RDMA, checked by their tags, and are claimed over TCP; the memory node
/// keeps its end of the queue pair exactly as long as the connection.
#[test]
fn pages_read_one_sided_are_right_and_claimed_over_tcp() {
    let s = setup();
    let maps = SlotMaps::default();
    let mut source = rdma_source(&s, &maps);
    assert_eq!(s.alive.load(Ordering::SeqCst), 1);
    assert_eq!(s.clients.lock().unwrap()[0].qpn, 0x55);
    let mut control = s.server.peer();
    assert_eq!(control.load(7).unwrap(), 32);

    let mut run = vec![0u8; 8 * PAGE_SIZE];
    source.fetch(7, 4, &mut run).unwrap();
    assert_pattern(4, &run);
    let mut one = vec![0u8; PAGE_SIZE];
    source.read(7, 30, &mut one).unwrap();
    assert_pattern(30, &one);
    let stats = source.stats();
    assert_eq!((stat(&stats.rdma_pages), stat(&stats.tcp_pages)), (9, 0));
    // Not claimed yet: the memory node still holds the fetched run.
    assert_eq!(control.held(7).unwrap(), 32);
    source.acknowledge().unwrap();
    assert_eq!(stat(&stats.claimed_pages), 8);
    assert_eq!(
        control.held(7).unwrap(),
        24,
        "the 8 fetched pages are freed, the read one kept"
    );
    // A page of the other node's share is not here: an error, as over TCP.
    let (status, message) = remote_status(source.fetch(7, 40, &mut one));
    assert_eq!(status, Status::NotHeld, "{message}");

    drop(source);
    // The server notices the closed connection and drops its queue pair.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.alive.load(Ordering::SeqCst) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue pair outlived its connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A slot map gone stale (the pages claimed through another connection, their slots
/// reused for other pages) is caught by the tags: the fetch goes over TCP and is right, or
/// refused, never a wrong page. A write-back through the source maps its new slots.
#[test]
fn a_stale_slot_is_caught_by_its_tag_and_write_backs_map_their_slots() {
    let s = setup();
    let maps = SlotMaps::default();
    let mut source = rdma_source(&s, &maps);
    let mut other = s.server.peer();
    assert_eq!(other.load(7).unwrap(), 32);
    let mut one = vec![0u8; PAGE_SIZE];
    // Maps the window.
    source.read(7, 0, &mut one).unwrap();
    assert_pattern(0, &one);

    // Another client claims pages 10..14, and its write-back of 40..44 takes their slots.
    let mut run = vec![0u8; 4 * PAGE_SIZE];
    other.fetch(7, 10, &mut run).unwrap();
    other.acknowledge().unwrap();
    let written = vec![0xabu8; 4 * PAGE_SIZE];
    other.write_back(7, 40, &written).unwrap();

    let stats = source.stats();
    let (status, message) = remote_status(source.fetch(7, 10, &mut one));
    assert_eq!(status, Status::NotHeld, "{message}");
    assert_eq!(stat(&stats.stale_runs), 1);
    // Page 40 was not held when the window was mapped: over TCP, with the new bytes.
    source.read(7, 41, &mut one).unwrap();
    assert!(one.iter().all(|&b| b == 0xab));
    assert_eq!(stat(&stats.tcp_pages), 1);

    // Fetched (claimed), written back through the source, fetched again: by RDMA.
    source.fetch(7, 20, &mut one).unwrap();
    assert_pattern(20, &one);
    one.fill(0x5a);
    source.write_back(7, 20, &one).unwrap();
    let rdma_before = stat(&stats.rdma_pages);
    let mut back = vec![0u8; PAGE_SIZE];
    source.fetch(7, 20, &mut back).unwrap();
    assert_eq!(back, one);
    assert_eq!(stat(&stats.rdma_pages), rdma_before + 1);
    source.acknowledge().unwrap();
    assert_eq!(
        other.held(7).unwrap(),
        32 - 4 + 4 - 1,
        "claimed: 10..14 and 20"
    );

    // A second source of this node shares the map: no Slots request of its own needed,
    // and it sees what the first one forgot.
    let mut second = rdma_source(&s, &maps);
    let before = stat(&stats.rdma_pages);
    second.read(7, 21, &mut one).unwrap();
    assert_pattern(21, &one);
    assert_eq!(
        stat(&second.stats().rdma_pages),
        before + 1,
        "counted together"
    );
}

/// A READ that fails once is tried again on a queue pair connected anew, and works.
#[test]
fn a_broken_queue_pair_falls_back_to_tcp_until_a_reconnection() {
    let s = setup();
    let mut nic = nic(&s.endpoint);
    nic.failures = 1;
    let mut source = rdma_source_through(&s, &SlotMaps::default(), nic);
    let mut control = s.server.peer();
    control.load(7).unwrap();
    let mut one = vec![0u8; PAGE_SIZE];
    let stats = source.stats();
    // One failed READ: tried again at once on a queue pair connected anew.
    source.fetch(7, 2, &mut one).unwrap();
    assert_pattern(2, &one);
    assert_eq!(source.broken(), None);
    assert_eq!((stat(&stats.rdma_pages), stat(&stats.tcp_pages)), (1, 0));
    assert_eq!(s.clients.lock().unwrap().len(), 2, "RdmaConnect again");
    source.acknowledge().unwrap();
    assert_eq!(
        s.alive.load(Ordering::SeqCst),
        1,
        "the server replaced its queue pair"
    );
}

/// A queue pair that fails twice sends everything over TCP, and a reconnection brings RDMA
/// back; a memory node without RDMA refuses RdmaConnect saying why, and the dialer's
/// fallback then is plain TCP.
#[test]
fn a_queue_pair_that_keeps_failing_falls_back_to_tcp_until_a_reconnection() {
    let s = setup();
    let mut nic = nic(&s.endpoint);
    nic.failures = 2;
    let mut source = rdma_source_through(&s, &SlotMaps::default(), nic);
    let mut control = s.server.peer();
    control.load(7).unwrap();
    let mut one = vec![0u8; PAGE_SIZE];
    source.fetch(7, 3, &mut one).unwrap();
    assert_pattern(3, &one);
    assert!(
        source.broken().unwrap().contains("retry counter"),
        "{:?}",
        source.broken()
    );
    source.fetch(7, 4, &mut one).unwrap();
    assert_pattern(4, &one);
    let stats = source.stats();
    assert_eq!((stat(&stats.rdma_pages), stat(&stats.tcp_pages)), (0, 2));
    source.reconnect().unwrap();
    assert_eq!(source.broken(), None);
    source.fetch(7, 5, &mut one).unwrap();
    assert_pattern(5, &one);
    assert_eq!(stat(&stats.rdma_pages), 1);
    assert_eq!(
        s.clients.lock().unwrap().len(),
        3,
        "a queue pair per connection, and one for the retry"
    );

    // A server without RDMA.
    let plain = Running::start(100);
    let (status, message) = remote_status(plain.peer().rdma_connect(&QueuePair::default()));
    assert_eq!(status, Status::Unsupported, "{message}");
    assert!(message.contains("serves no RDMA"), "{message}");
    match RdmaSource::connect(
        plain.peer(),
        self::nic(&s.endpoint),
        &s.endpoint,
        SlotMaps::default(),
        Duration::from_secs(5),
    ) {
        Err(refused) => {
            let (mut tcp, why) = *refused;
            assert!(why.contains("serves no RDMA"), "{why}");
            assert_eq!(
                tcp.load(7).unwrap(),
                32,
                "the TCP connection handed back still works"
            );
        }
        Ok(_) => panic!("RDMA with a node that has none"),
    }
}

/// Claims that cannot be sent (the server closed the idle connection) stay queued, 16 of
/// them, and go first after the reconnection, before the next one-sided fetch adds its
/// own: nothing overflows, every fetched page is freed.
#[test]
fn claims_survive_a_lost_connection_and_go_before_the_next() {
    let idle = Duration::from_millis(300);
    let s = setup_with(Some(idle));
    let maps = SlotMaps::default();
    let mut source = rdma_source(&s, &maps);
    let mut control = s.server.peer();
    assert_eq!(control.load(7).unwrap(), 32);
    let mut one = vec![0u8; PAGE_SIZE];
    // Every other page: no run merges with the one before. 15 runs wait.
    for page in (0..30).step_by(2) {
        source.fetch(7, page, &mut one).unwrap();
        assert_pattern(page, &one);
    }
    assert_eq!(control.held(7).unwrap(), 32, "15 runs wait");
    std::thread::sleep(idle * 3);
    // The 16th is read, but the claims cannot go: an error, the 16 runs still queued.
    assert!(source.fetch(7, 30, &mut one).is_err());
    // (The control connection was idle too.)
    let mut control = s.server.peer();
    assert_eq!(control.held(7).unwrap(), 32);
    assert_eq!(stat(&source.stats().claimed_pages), 0);
    source.reconnect().unwrap();
    // Still mapped: one-sided, and the full queue goes before its claim is queued.
    source.fetch(7, 1, &mut one).unwrap();
    assert_pattern(1, &one);
    assert_eq!(stat(&source.stats().claimed_pages), 16);
    source.acknowledge().unwrap();
    assert_eq!(
        control.held(7).unwrap(),
        32 - 17,
        "every page fetched is claimed"
    );
    assert_eq!(stat(&source.stats().rdma_pages), 17);
}
