//! Only the cluster's own nodes get its pages, with real processes: memory nodes and a
//! compute node that share a cluster key file, a compute node with another key or none, a
//! raw socket that skips the handshake, and a handshake recorded and played again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pagemesh_auth::{Keyring, Nonce, Transcript};
use pagemesh_protocol::{Direction, HEADER_LEN, Header, NONCE_LEN, Op, PROOF_LEN, Status};
use pagemesh_tests::{Bins, Coordinator, MemoryNode, Proc, http_json, test_dir};

const KEY: &str = "6b1f0c2e9a7d4b5c8e3f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d\n";
const OTHER_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
const CLIENT: u32 = 9;

/// Writes a private key file.
fn key_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A coordinator and memory node 1, keyed with `key`.
struct Keyed {
    dir: PathBuf,
    bins: Bins,
    coordinator: Coordinator,
    memory: MemoryNode,
    runs: u32,
}

impl Keyed {
    /// Memory node 1 keyed, the coordinator too when `keyed_coordinator`.
    fn start(name: &str, keyed_coordinator: bool) -> Self {
        let bins = Bins::for_tests().expect("binaries are built");
        let dir = test_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let key = key_file(&dir, "cluster.key", KEY);
        let args = [std::ffi::OsStr::new("--cluster-key-file"), key.as_os_str()];
        let args: &[&std::ffi::OsStr] = if keyed_coordinator { &args } else { &[] };
        let coordinator = Coordinator::start_with(&bins, &dir, args).unwrap();
        let memory = start_memory(&bins, &dir, &coordinator.url, &key);
        Keyed {
            dir,
            bins,
            coordinator,
            memory,
            runs: 0,
        }
    }

    /// Runs a compute node over a 16 MiB `verify` guest with `args` added; returns its exit
    /// status and log.
    fn compute(&mut self, args: &[&str]) -> (std::process::ExitStatus, String) {
        self.runs += 1;
        let mut proc = Proc::spawn(
            &format!("compute-run{}", self.runs),
            &self.dir,
            Command::new(&self.bins.node)
                .args(["--role", "compute", "--id", "0", "--replace"])
                .args(["--coordinator", &self.coordinator.url])
                .args(["--mem", "16MiB", "--workload", "verify", "--no-ebpf"])
                .args(["--peer-timeout", "2"])
                .env_remove("PAGEMESH_CLUSTER_KEY_FILE")
                .args(args),
        )
        .unwrap();
        let status = proc.wait(Duration::from_secs(300)).unwrap();
        (status, format!("{}{}", proc.output(), proc.log_tail()))
    }

    fn server_stats(&self) -> serde_json::Value {
        http_json(&format!("{}/stats", self.memory.admin)).unwrap()["server"].clone()
    }
}

/// Starts memory node 1 with the cluster key `key`.
fn start_memory(bins: &Bins, dir: &Path, coordinator: &str, key: &Path) -> MemoryNode {
    start_memory_with(bins, dir, coordinator, key, &[])
}

/// Starts memory node 1 with the cluster key `key` and `args`.
fn start_memory_with(
    bins: &Bins,
    dir: &Path,
    coordinator: &str,
    key: &Path,
    args: &[&str],
) -> MemoryNode {
    let mut proc = Proc::spawn(
        "node1",
        dir,
        Command::new(&bins.node)
            .args(["--role", "memory", "--id", "1", "--listen", "127.0.0.1:0"])
            .args(["--coordinator", coordinator, "--capacity", "256MiB"])
            .arg("--cluster-key-file")
            .arg(key)
            .args(args),
    )
    .unwrap();
    let line = proc
        .wait_for_line("serving pages on ", Duration::from_secs(30))
        .unwrap();
    let addr = line
        .split("serving pages on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let admin = proc.admin_url(Duration::from_secs(5)).unwrap();
    MemoryNode {
        proc,
        id: 1,
        addr,
        admin,
    }
}

#[test]
fn only_a_compute_node_with_the_key_gets_pages() {
    let mut c = Keyed::start("security-key", false);
    let other = key_file(&c.dir, "other.key", OTHER_KEY);
    let other = other.to_str().unwrap().to_owned();
    // Another key: refused at the handshake, a clear error, not one page served.
    let (status, log) = c.compute(&["--cluster-key-file", &other]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("cluster key does not match"), "{log}");
    // No key at all.
    let (status, log) = c.compute(&[]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("requires the cluster key"), "{log}");
    let stats = c.server_stats();
    assert_eq!(stats["pages_served"], 0, "{stats}");
    // The wrong proof was refused; the keyless node gave up by itself on reading the Hello
    // reply, having sent nothing to refuse.
    assert_eq!(stats["auth_refusals"], 1, "{stats}");
    let log = std::fs::read_to_string(c.dir.join("node1.log")).unwrap();
    assert!(
        log.contains("proof does not match the cluster key"),
        "the refusal is logged:\n{log}"
    );

    // The same key: the guest runs and sees all its memory.
    let key = c.dir.join("cluster.key");
    let (status, log) = c.compute(&["--cluster-key-file", key.to_str().unwrap()]);
    assert!(status.success(), "{log}");
    assert_eq!(c.server_stats()["pages_served"], 4096);
}

/// Reads one frame (header and payload) from `s`.
fn read_frame(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).unwrap();
    let h = Header::peek(&head).unwrap();
    let mut payload = vec![0u8; h.payload_len() as usize];
    s.read_exact(&mut payload).unwrap();
    let mut whole = head.to_vec();
    whole.extend_from_slice(&payload);
    assert!(pagemesh_protocol::check(&whole, Direction::Response).is_ok());
    (h, payload)
}

fn frame(header: Header, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; header.frame_len()];
    pagemesh_protocol::encode_frame(&header, payload, &mut out).unwrap();
    out
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn no_page_bytes_without_the_handshake_and_no_replayed_handshake() {
    let mut c = Keyed::start("security-raw", true);
    // Give the memory node a VM to hold, through a compute node that keeps it loaded.
    let key = c.dir.join("cluster.key");
    let (status, log) = c.compute(&["--cluster-key-file", key.to_str().unwrap(), "--keep-vm"]);
    assert!(status.success(), "{log}");
    let held = c.server_stats()["pages_held"].as_u64().unwrap();
    let served = c.server_stats()["pages_served"].as_u64().unwrap();
    let addr = c.memory.addr.clone();

    // A raw socket that skips the handshake and asks for pages of VM 1 gets an error frame
    // and nothing else, then the node closes.
    let mut s = connect(&addr);
    for op in [Op::Fetch, Op::Read] {
        s.write_all(&frame(Header::request(op, 1, 1, 0, 1), &[]))
            .unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let (h, msg) = pagemesh_protocol::parse(&out, Direction::Response).unwrap();
    assert_eq!(h.status(), Ok(Status::Unauthenticated), "{out:?}");
    assert!(String::from_utf8_lossy(msg).contains("Hello first"));
    assert_eq!(out.len(), h.frame_len(), "one error frame, no page bytes");

    // A handshake done right once, recorded, and played again on a new connection.
    let ring = Keyring::parse(KEY.as_bytes(), &key).unwrap();
    let client_nonce = Nonce([3; NONCE_LEN]);
    let mut hello = 5u64.to_le_bytes().to_vec();
    hello.extend_from_slice(&client_nonce.0);
    let hello = frame(
        Header::request(Op::Hello, 1, 0, u64::from(CLIENT), 0).with_payload_len(hello.len() as u32),
        &hello,
    );
    let mut s = connect(&addr);
    s.write_all(&hello).unwrap();
    let (_, payload) = read_frame(&mut s);
    let server_nonce = Nonce(payload[..NONCE_LEN].try_into().unwrap());
    let transcript = Transcript {
        client: u64::from(CLIENT),
        server: 1,
        session: 5,
        cluster: b"",
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
    };
    let auth = frame(
        Header::request(Op::Auth, 2, 0, 0, 0).with_payload_len(PROOF_LEN as u32),
        &ring.client_proof(&transcript),
    );
    s.write_all(&auth).unwrap();
    let (h, proof) = read_frame(&mut s);
    assert_eq!(h.status(), Ok(Status::Ok));
    assert!(
        ring.check_server(&transcript, &proof),
        "the node proves the key too"
    );
    drop(s);
    let mut s = connect(&addr);
    s.write_all(&hello).unwrap();
    let (_, payload) = read_frame(&mut s);
    assert_ne!(&payload[..NONCE_LEN], &server_nonce.0[..], "a fresh nonce");
    s.write_all(&auth).unwrap();
    s.write_all(&frame(Header::request(Op::Read, 3, 1, 0, 1), &[]))
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let (h, _) = pagemesh_protocol::parse(&out, Direction::Response).unwrap();
    assert_eq!(
        h.status(),
        Ok(Status::Unauthenticated),
        "the replay is refused"
    );
    assert_eq!(out.len(), h.frame_len(), "and nothing else is answered");

    let stats = c.server_stats();
    assert_eq!(stats["pages_served"].as_u64().unwrap(), served, "{stats}");
    assert_eq!(stats["pages_held"].as_u64().unwrap(), held, "{stats}");
    assert!(stats["auth_refusals"].as_u64().unwrap() >= 2, "{stats}");
}

#[test]
fn a_thousand_idle_connections_neither_starve_a_peer_nor_exhaust_the_node() {
    let mut c = Keyed::start("security-idle", true);
    let addr = c.memory.addr.clone();
    let idle: Vec<TcpStream> = (0..1000).map(|_| connect(&addr)).collect();
    // Wait until the node has accepted them all.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let open = loop {
        let stats = c.server_stats();
        if stats["connections"].as_u64().unwrap() >= 1000 {
            break stats["open_connections"].as_u64().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("1000 idle connections accepted, {open} still open");
    // A compute node with the key runs its guest meanwhile.
    let key = c.dir.join("cluster.key");
    let (status, log) = c.compute(&["--cluster-key-file", key.to_str().unwrap()]);
    assert!(status.success(), "{log}");
    assert_eq!(c.server_stats()["pages_served"], 4096);
    // Connections that never said Hello are closed after the handshake's 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = c.server_stats();
        if stats["open_connections"].as_u64().unwrap() == 0 {
            assert_eq!(stats["connections"].as_u64().unwrap(), 1000 + 2, "{stats}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each idle client sees its connection closed, with nothing sent to it.
    for mut s in idle {
        let mut buf = [0u8; 1];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
}

/// `GET url` with `authorization` if given: the status, the `WWW-Authenticate` header and the
/// body.
fn get(url: &str, authorization: Option<&str>) -> (u16, Option<String>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(url);
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let mut response = request.call().unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.body_mut().read_to_string().unwrap();
    (response.status().as_u16(), challenge, body)
}

#[test]
fn a_keyed_coordinator_answers_only_the_cluster() {
    let mut c = Keyed::start("security-coordinator", true);
    let url = c.coordinator.url.clone();
    // The memory node registered, so it sent the token; a stranger gets 401 and a JSON error.
    for route in ["/nodes", "/endpoints", "/vms", "/nodes/1"] {
        let (status, challenge, body) = get(&format!("{url}{route}"), None);
        assert_eq!(status, 401, "{route}: {body}");
        assert!(challenge.unwrap().starts_with("Bearer"), "{route}");
        let error: pagemesh_api::ApiError = serde_json::from_str(&body).unwrap();
        assert!(error.error.contains("Bearer"), "{route}: {}", error.error);
        assert!(
            !body.contains("127.0.0.1"),
            "{route} reveals an endpoint: {body}"
        );
    }
    let (status, _, body) = get(&format!("{url}/nodes"), Some("Bearer 00ff"));
    assert_eq!(status, 401, "{body}");
    // Open routes stay open.
    assert_eq!(get(&format!("{url}/healthz"), None).0, 200);
    let (status, _, doc) = get(&format!("{url}/openapi.json"), None);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]));

    // The token `--print-token` prints opens the API.
    let key = c.dir.join("cluster.key");
    let printed = Command::new(&c.bins.coordinator)
        .arg("--cluster-key-file")
        .arg(&key)
        .arg("--print-token")
        .env_remove("PAGEMESH_CLUSTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let token = String::from_utf8(printed.stdout).unwrap().trim().to_owned();
    assert_eq!(
        token,
        Keyring::parse(KEY.as_bytes(), &key)
            .unwrap()
            .coordinator_token()
    );
    let (status, _, body) = get(&format!("{url}/nodes"), Some(&format!("Bearer {token}")));
    assert_eq!(status, 200, "{body}");
    let nodes: Vec<pagemesh_api::NodeInfo> = serde_json::from_str(&body).unwrap();
    assert_eq!(nodes.iter().map(|n| n.node_id).collect::<Vec<_>>(), [1]);

    // A compute node without the key cannot even learn where the pages are.
    let (status, log) = c.compute(&[]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("401"), "{log}");
    assert!(log.contains("--cluster-key-file"), "{log}");
    assert_eq!(c.server_stats()["pages_served"], 0);
    // With the key, the whole keyed cluster works.
    let (status, log) = c.compute(&["--cluster-key-file", key.to_str().unwrap()]);
    assert!(status.success(), "{log}");
    assert_eq!(c.server_stats()["pages_served"], 4096);
}

/// Defines a VM of one page held by node 1 whose image is `path`; its id.
fn image_vm(coordinator: &str, path: &str) -> u32 {
    let content = serde_json::json!({"kind": "image", "path": path});
    define_vm(coordinator, 4096, content)
}

/// Registers compute node 9 (it runs nothing) for VMs to name.
fn register_compute(coordinator: &str) {
    let compute =
        serde_json::json!({"transport": "tcp", "address": "127.0.0.1:9", "role": "compute"});
    ureq::post(format!("{coordinator}/nodes/9/endpoint"))
        .send_json(&compute)
        .unwrap();
}

/// Defines a VM of `mem_bytes` on compute node 9, all its pages on node 1; its id.
fn define_vm(coordinator: &str, mem_bytes: u64, content: serde_json::Value) -> u32 {
    let body = serde_json::json!({
        "compute_node": 9, "mem_bytes": mem_bytes,
        "placement": {"policy": "interleave", "nodes": [1]},
        "content": content,
    });
    let mut response = ureq::post(format!("{coordinator}/vms"))
        .send_json(&body)
        .unwrap();
    let vm: pagemesh_api::Vm = response.body_mut().read_json().unwrap();
    vm.id
}

#[test]
fn a_memory_node_loads_images_only_from_its_image_dir() {
    let bins = Bins::for_tests().expect("binaries are built");
    // The harness gives memory nodes `--image-dir` = the run folder.
    let mut c =
        pagemesh_tests::Cluster::start(bins, test_dir("security-images"), &[1], "64MiB").unwrap();
    let images = c.dir.clone();
    let outside = test_dir("security-images-outside");
    let secret = outside.join("secret.img");
    std::fs::write(&secret, b"host secret\n".repeat(400)).unwrap();
    std::fs::write(images.join("guest.img"), vec![7u8; 4096]).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("link.img")).unwrap();
    std::os::unix::fs::symlink(&outside, images.join("up")).unwrap();
    register_compute(&c.coordinator.url);

    let mut peer = pagemesh_transport::tcp::TcpPeer::connect(
        CLIENT,
        "",
        1,
        &c.memory[0].addr,
        Duration::from_secs(5),
    )
    .unwrap();
    let images_s = images.display().to_string();
    let outside_name = outside.file_name().unwrap().to_str().unwrap();
    let refused = [
        (secret.display().to_string(), "outside the image directory"),
        (
            format!("{images_s}/../{outside_name}/secret.img"),
            "contains `..`",
        ),
        (format!("{images_s}/link.img"), "through a symlink"),
        (format!("{images_s}/up/secret.img"), "through a symlink"),
        (images_s.clone(), "not a regular file"),
    ];
    use pagemesh_transport::{PageSource, PeerControl};
    let mut page = vec![0u8; 4096];
    for (path, why) in &refused {
        let vm = image_vm(&c.coordinator.url, path);
        let err = peer.load(vm).expect_err(path).to_string();
        assert!(err.contains(why), "{path}: {err}");
        // Nothing of it is held, so nothing can be fetched.
        assert!(peer.fetch(vm, 0, &mut page).is_err(), "{path}");
    }
    // The same peer goes on being served: an image beneath the directory loads.
    let vm = image_vm(&c.coordinator.url, &format!("{images_s}/guest.img"));
    assert_eq!(peer.load(vm).unwrap(), 1);
    peer.fetch(vm, 0, &mut page).unwrap();
    assert_eq!(page, vec![7u8; 4096]);
    let stats = http_json(&format!("{}/stats", c.memory[0].admin)).unwrap();
    assert_eq!(stats["server"]["pages_served"], 1, "{stats}");
    let log = std::fs::read_to_string(c.dir.join("node1.log")).unwrap();
    assert_eq!(
        log.matches("refused an image outside --image-dir").count(),
        5,
        "{log}"
    );
    assert!(!log.contains("host secret"));
    c.stop().unwrap();
    std::fs::remove_dir_all(&outside).unwrap();
}

#[test]
fn idle_connections_are_closed_and_their_clients_come_back() {
    let bins = Bins::for_tests().expect("binaries are built");
    let dir = test_dir("security-idle-timeout");
    let key = key_file(&dir, "cluster.key", KEY);
    let coordinator = Coordinator::start(&bins, &dir).unwrap();
    let mut memory = start_memory_with(
        &bins,
        &dir,
        &coordinator.url,
        &key,
        &["--idle-timeout", "1"],
    );
    register_compute(&coordinator.url);
    let vm = define_vm(
        &coordinator.url,
        1 << 20,
        serde_json::json!({"kind": "pattern", "seed": 3}),
    );
    let credentials = pagemesh_transport::tcp::Credentials::keyless("")
        .with_key(std::sync::Arc::new(Keyring::load(&key).unwrap()));
    let peer = pagemesh_transport::tcp::TcpPeer::connect_with(
        CLIENT,
        &credentials,
        1,
        &memory.addr,
        pagemesh_transport::tcp::TcpOptions::default(),
    )
    .unwrap();
    let mut control = pagemesh_transport::ControlPlane::new(CLIENT, Duration::from_secs(5));
    control.add(Box::new(peer));
    assert_eq!(control.ask(1, |p| p.load(vm)).unwrap(), 256);
    let server = |field: &str| {
        http_json(&format!("{}/stats", memory.admin)).unwrap()["server"][field].clone()
    };
    assert_eq!(server("open_connections"), 1);
    // Silent for over a second: the node closes the authenticated connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server("open_connections") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle connection stayed open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The client finds it closed at its next request, reconnects (the handshake again) and
    // is answered.
    assert_eq!(control.ask(1, |p| p.held(vm)).unwrap(), 256);
    assert_eq!(server("connections"), 2);
    assert_eq!(server("auth_refusals"), 0);
    let log = std::fs::read_to_string(dir.join("node1.log")).unwrap();
    assert!(
        log.contains("closed a page connection idle for 1s"),
        "{log}"
    );
    memory.proc.stop().unwrap();
}

/// Starts a compute node over a 16 MiB `verify` guest of cluster `c` with `args` added and
/// waits for it; its exit status and output.
fn compute_in(
    c: &mut pagemesh_tests::Cluster,
    args: &[String],
) -> (std::process::ExitStatus, String) {
    let mut all: Vec<&str> = vec!["--mem", "16MiB", "--workload", "verify", "--no-ebpf"];
    all.extend(["--peer-timeout", "2"]);
    all.extend(args.iter().map(String::as_str));
    let (mut proc, _) = c.spawn_compute(&all).unwrap();
    let status = proc.wait(Duration::from_secs(300)).unwrap();
    (status, format!("{}{}", proc.output(), proc.log_tail()))
}

#[test]
fn page_traffic_over_tls_needs_a_certificate_of_the_cluster_ca() {
    use pagemesh_tests::pki::Ca;
    let bins = Bins::for_tests().expect("binaries are built");
    let dir = test_dir("security-tls");
    let ca = Ca::new(&dir, "cluster-ca").unwrap();
    let other = Ca::new(&dir, "other-ca").unwrap();
    let node1 = ca.node(&dir, "node1", None).unwrap();
    let mut c =
        pagemesh_tests::Cluster::start_with(bins, dir.clone(), &[1], "256MiB", &node1.args())
            .unwrap();
    let admin = c.memory[0].admin.clone();
    let server =
        |field: &str| http_json(&format!("{admin}/stats")).unwrap()["server"][field].clone();

    // A client whose certificate another CA signed: the server refuses it.
    let stranger = other.node(&dir, "stranger", Some(&ca.cert)).unwrap();
    let (status, log) = compute_in(&mut c, &stranger.args());
    assert!(!status.success(), "{log}");
    assert!(log.contains("TLS with node 1"), "{log}");
    assert!(
        !log.contains("gave up"),
        "a TLS refusal is not retried:\n{log}"
    );
    assert_eq!(server("pages_served"), 0);
    let refusals = server("auth_refusals").as_u64().unwrap();
    assert!(refusals >= 1, "the refusal is counted");
    let memory_log = std::fs::read_to_string(dir.join("node1.log")).unwrap();
    assert!(
        memory_log.contains("refused a TLS page client"),
        "{memory_log}"
    );

    // A client that does not trust the cluster CA refuses the server.
    let doubter = ca.node(&dir, "doubter", Some(&other.cert)).unwrap();
    let (status, log) = compute_in(&mut c, &doubter.args());
    assert!(!status.success(), "{log}");
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert_eq!(server("pages_served"), 0);

    // A client without TLS is told the node requires it.
    let (status, log) = compute_in(&mut c, &[]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("serves pages over TLS only"), "{log}");
    assert_eq!(server("pages_served"), 0);

    // A certificate of the cluster CA: the guest runs and sees all its memory, over TLS.
    let node0 = ca.node(&dir, "node0", None).unwrap();
    let (status, log) = compute_in(&mut c, &node0.args());
    assert!(status.success(), "{log}");
    assert_eq!(server("pages_served"), 4096);
    c.stop().unwrap();
}
