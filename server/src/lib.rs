//! The page server of a memory node: its [`PageStore`] behind the page protocol
//! ([`pagemesh_protocol`], `docs/protocol.md`).
//!
//! [`serve`] takes an already-bound listener, so that tests bind `127.0.0.1:0`, and a
//! [`ShutdownSignal`]. It runs an accept loop on its own thread and one thread per
//! connection with blocking I/O; each connection owns one buffer that holds any frame
//! ([`MAX_FRAME_LEN`]), reads requests into it and builds the reply in place, so a Fetch
//! copies its pages once (store → buffer) and leaves in one write.
//!
//! # Bad input
//!
//! Nothing a client sends can stop the server or disturb another connection:
//!
//! - a request that breaks the framing (bad magic, another version, a bad payload length)
//!   gets an error reply (`BadRequest`, or `Unsupported` for a version) and its connection
//!   is closed, since its frame boundaries can no longer be trusted;
//! - a well-framed request the server cannot act on (unknown op, bad count) gets an error
//!   reply, its payload is skipped and the connection stays open;
//! - a request whose payload fails its checksum gets an error reply (`BadRequest`) and is
//!   not acted on (a WriteBack stores nothing); the frame's end was known, so the connection
//!   stays open;
//! - a frame cut short by the client closing is dropped with the connection;
//! - a valid request that cannot be granted (unknown VM, page not held, no room, a Hello
//!   from another cluster) gets an error reply and the connection stays open.
//!
//! Every reply carries the CRC32C of its payload, computed in place over the buffer.

pub mod images;
pub mod store;

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use pagemesh_api::{NodeId, PAGE_SIZE, Vm, VmId};
use pagemesh_auth::{Keyring, Nonce, Transcript};
use tracing::{debug, info, warn};

pub use images::{ImageDir, ImageRefusal};
pub use store::{PageStore, Session, StoreError};

use pagemesh_protocol::{
    AuthScheme, Direction, FEATURE_PACKED, FrameError, HEADER_LEN, Header, MAX_CLUSTER_LEN,
    MAX_FRAME_LEN, MAX_RUN_BYTES, NONCE_LEN, Op, PROOF_LEN, SESSION_LEN, Status, encode_error,
    packed,
};

const _: () =
    assert!(NONCE_LEN == pagemesh_auth::NONCE_LEN && PROOF_LEN == pagemesh_auth::PROOF_LEN);

/// Default of [`ServerContext::with_max_connections`]. Each connection has a thread (and,
/// past its handshake, a 1 MiB buffer); a cluster needs a few per compute node.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How long a new connection has to finish its handshake (Hello, and Auth where a key is
/// set) before it is closed, so that connections that never introduce themselves do not
/// pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`ServerContext::with_idle_timeout`]: an authenticated connection that sends
/// nothing for this long is closed (its client reconnects when it next needs the node), so
/// the connections of clients that vanished without a close do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
use pagemesh_transport::tcp::spin_read;

/// How the server finds a VM's definition when a client asks it to load it (in the node:
/// ask the coordinator). The client is sent the error with its sources.
pub type VmLookup = Box<dyn Fn(VmId) -> Result<Vm, LookupError> + Send + Sync>;

/// Why a [`VmLookup`] failed: whatever error the lookup has (in the node, the coordinator
/// client's).
pub type LookupError = Box<dyn Error + Send + Sync>;

/// How often the accept loop looks at the shutdown signal when no client is connecting.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);

/// Errors starting the page server.
#[derive(thiserror::Error, Debug)]
pub enum ServerError {
    /// The listener could not be set up.
    #[error("cannot set up the page server's listener")]
    Listener(#[source] io::Error),
    /// A thread could not be started.
    #[error("cannot start the page server's accept thread")]
    Spawn(#[source] io::Error),
    /// The cluster name does not fit a Hello reply.
    #[error("cluster name of {0} bytes is over the page protocol's limit of 64")]
    ClusterTooLong(usize),
}

/// Everything the page server's threads share.
pub struct ServerContext {
    /// This node's id, announced in Hello replies and used to pick its share of a VM.
    pub node_id: NodeId,
    /// The pages this node holds.
    pub store: PageStore,
    /// Finds a VM's definition for Load.
    pub vm_lookup: VmLookup,
    /// This node's cluster (`""`: none), announced in Hello replies; a Hello from another
    /// cluster is refused.
    cluster: String,
    /// How long a connection's thread polls for the next request before it sleeps.
    spin: Duration,
    /// The cluster key peers must prove they hold; `None`: anyone who says Hello is served.
    keyring: Option<Keyring>,
    /// Most connections open at once; more are refused at accept.
    max_connections: usize,
    idle_timeout: Option<Duration>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether a client may agree to packed payloads ([`FEATURE_PACKED`]).
    packing: bool,
    /// Connects queue pairs for one-sided reads of `store`; `None`: no RDMA here.
    rdma: Option<Box<dyn RdmaService>>,
    counters: Counters,
}

/// What serves one-sided RDMA reads of this node's page store: the node's RDMA device, with
/// the store's memory registered on it (`pagemesh-node`, feature `rdma`). The page server
/// knows no verbs: it hands an [`Op::RdmaConnect`]'s queue pair here and keeps what comes
/// back for as long as the connection.
pub trait RdmaService: Send + Sync {
    /// A queue pair made for the client whose end is `client` and connected to it: its
    /// own end, and what keeps it alive. Fails with why it cannot (shown to the client).
    fn connect(
        &self,
        client: &pagemesh_protocol::QueuePair,
    ) -> Result<(pagemesh_protocol::QueuePair, Box<dyn Send>), String>;
}

/// Default of [`ServerContext::with_spin`]: covers the gap between two faults of a guest that
/// faults back to back (reply → install → vCPU wakes, runs and faults → the handler wakes and
/// asks: 30-100 µs here, most of it wake-ups). Measured on remote-random, 10 alternating runs
/// each: −20% µs/page with one memory node, −18% with two (docs/benchmarks.md).
pub const DEFAULT_SERVER_SPIN: Duration = Duration::from_micros(200);

#[derive(Default)]
struct Counters {
    pages_served: AtomicU64,
    pages_claimed: AtomicU64,
    pages_written_back: AtomicU64,
    bad_frames: AtomicU64,
    packed_pages: AtomicU64,
    packed_bytes: AtomicU64,
    connections: AtomicU64,
    open_connections: AtomicU64,
    auth_refusals: AtomicU64,
    connections_refused: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of a server's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Pages sent in Fetch and Read replies.
    pub pages_served: u64,
    /// Pages lent by Fetch replies and freed here once the client acknowledged them.
    pub pages_claimed: u64,
    /// Pages received in WriteBack requests.
    pub pages_written_back: u64,
    /// Requests that broke the framing rules, including frames cut short.
    pub bad_frames: u64,
    /// Pages sent or received packed (compressed, or zero pages as a length).
    pub packed_pages: u64,
    /// The packed payloads' bytes, for those pages (`packed_pages * 4096` plain).
    pub packed_bytes: u64,
    /// Connections accepted since start.
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Requests refused because the handshake was skipped or failed (no Hello, no Auth, a
    /// proof made with another key).
    pub auth_refusals: u64,
    /// Connections refused because the limit was reached.
    pub connections_refused: u64,
}

impl ServerContext {
    /// A context for node `node_id`, of no cluster, serving `store`.
    pub fn new(
        node_id: NodeId,
        store: PageStore,
        vm_lookup: impl Fn(VmId) -> Result<Vm, LookupError> + Send + Sync + 'static,
    ) -> Self {
        ServerContext {
            node_id,
            store,
            vm_lookup: Box::new(vm_lookup),
            cluster: String::new(),
            spin: DEFAULT_SERVER_SPIN,
            keyring: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            tls: None,
            packing: true,
            rdma: None,
            counters: Counters::default(),
        }
    }

    /// This context answering [`Op::RdmaConnect`] through `rdma` (without it, the op is
    /// refused as unsupported).
    pub fn with_rdma(mut self, rdma: Box<dyn RdmaService>) -> Self {
        self.rdma = Some(rdma);
        self
    }

    /// This context with connection threads that poll for `spin` after each answer before
    /// sleeping in `read` (zero: never poll).
    pub fn with_spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// This context for a node of `cluster` (`""`: none). Fails if the name is over
    /// [`MAX_CLUSTER_LEN`] bytes.
    pub fn with_cluster(mut self, cluster: String) -> Result<Self, ServerError> {
        if cluster.len() > MAX_CLUSTER_LEN {
            return Err(ServerError::ClusterTooLong(cluster.len()));
        }
        self.cluster = cluster;
        Ok(self)
    }

    /// This context requiring every client to prove it holds a key of `keyring` before
    /// anything but Hello is served.
    pub fn with_keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// This context accepting at most `max` connections at once (at least 1); a client past
    /// that gets a [`Status::NoCapacity`] error frame and is closed.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// This context closing a connection, once its handshake is done, that sends nothing for
    /// `idle` (`None`: never). The client sees the connection closed and reconnects.
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle_timeout = idle.filter(|d| !d.is_zero());
        self
    }

    /// This context serving page connections over TLS only, with `config`
    /// ([`pagemesh_transport::tls::Tls::server`]: a client must show a certificate of the
    /// CA). A plain-TCP client gets one plain error frame saying so, and is closed.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// This context agreeing to packed payloads when a client offers them (the default), or
    /// not (`--compress off`: every run travels plain).
    pub fn with_packing(mut self, packing: bool) -> Self {
        self.packing = packing;
        self
    }

    /// Requests refused because the handshake was skipped or failed.
    pub fn auth_refusals(&self) -> u64 {
        self.counters.auth_refusals.load(Ordering::Relaxed)
    }

    /// This node's cluster (`""`: none).
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Pages sent in Fetch and Read replies.
    pub fn pages_served(&self) -> u64 {
        self.counters.pages_served.load(Ordering::Relaxed)
    }

    /// Pages sent in Fetch replies, and so freed here.
    pub fn pages_claimed(&self) -> u64 {
        self.counters.pages_claimed.load(Ordering::Relaxed)
    }

    /// Pages received in WriteBack requests.
    pub fn pages_written_back(&self) -> u64 {
        self.counters.pages_written_back.load(Ordering::Relaxed)
    }

    /// Requests that broke the framing rules, including frames cut short.
    pub fn bad_frames(&self) -> u64 {
        self.counters.bad_frames.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.counters.open_connections.load(Ordering::Relaxed)
    }

    /// All counters at once (each read on its own; they may be a moment apart).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            pages_served: self.pages_served(),
            pages_claimed: self.pages_claimed(),
            pages_written_back: self.pages_written_back(),
            bad_frames: self.bad_frames(),
            connections: self.connections(),
            open_connections: self.open_connections(),
            auth_refusals: self.auth_refusals(),
            connections_refused: self.counters.connections_refused.load(Ordering::Relaxed),
            packed_pages: self.counters.packed_pages.load(Ordering::Relaxed),
            packed_bytes: self.counters.packed_bytes.load(Ordering::Relaxed),
        }
    }

    /// Looks `vm` up and loads this node's share of it.
    fn load(&self, vm: VmId) -> Result<u64, Refusal> {
        let spec = (self.vm_lookup)(vm).map_err(|source| Refusal::Lookup { vm, source })?;
        if spec.id != vm {
            return Err(Refusal::WrongVm { vm, got: spec.id });
        }
        Ok(self.store.load(&spec, self.node_id)?)
    }

    /// Judges the cluster name of a client's Hello: accepted if either side has none or both
    /// have the same.
    fn hello(&self, theirs: &[u8]) -> Result<(), Refusal> {
        let theirs = std::str::from_utf8(theirs).map_err(|_| Refusal::ClusterNotUtf8)?;
        if !theirs.is_empty() && !self.cluster.is_empty() && theirs != self.cluster {
            return Err(Refusal::WrongCluster {
                node: self.node_id,
                ours: self.cluster.clone(),
                theirs: theirs.to_owned(),
            });
        }
        Ok(())
    }
}

impl fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerContext")
            .field("node_id", &self.node_id)
            .field("cluster", &self.cluster)
            .field("store", &self.store)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Tells a running server to stop. Cloning shares the signal.
#[derive(Clone, Debug, Default)]
pub struct ShutdownSignal(Arc<AtomicBool>);

impl ShutdownSignal {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop: it stops accepting within 50 ms, closes every
    /// connection (a request being served finishes first) and its thread ends.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`ShutdownSignal::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves `listener` until `shutdown` is triggered. Returns the accept thread's handle,
/// which ends once every connection thread has ended: join it after triggering.
pub fn serve(
    listener: TcpListener,
    ctx: Arc<ServerContext>,
    shutdown: ShutdownSignal,
) -> Result<JoinHandle<()>, ServerError> {
    // Non-blocking, so that an accept after poll() said "ready" cannot block if the client
    // gave up in between.
    listener
        .set_nonblocking(true)
        .map_err(ServerError::Listener)?;
    thread::Builder::new()
        .name("page-accept".into())
        .spawn(move || accept_loop(&listener, &ctx, &shutdown))
        .map_err(ServerError::Spawn)
}

/// Open connections, so that shutdown can close them under their threads' feet.
type Registry = Arc<Mutex<HashMap<u64, TcpStream>>>;

fn accept_loop(listener: &TcpListener, ctx: &Arc<ServerContext>, shutdown: &ShutdownSignal) {
    let local = listener.local_addr().ok();
    debug!(?local, "page server listening");
    let registry: Registry = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    while !shutdown.is_triggered() {
        match wait_readable(listener.as_fd(), SHUTDOWN_POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!(error = %e, "page server cannot wait for connections");
                thread::sleep(SHUTDOWN_POLL);
                continue;
            }
        }
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            Err(e) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                warn!(error = %e, "page server cannot accept a connection");
                thread::sleep(SHUTDOWN_POLL);
                continue;
            }
        };
        // Reap the threads of closed connections.
        for done in threads.extract_if(.., |t| t.is_finished()) {
            let _ = done.join();
        }
        let open = registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if open >= ctx.max_connections {
            refuse_connection(stream, peer, ctx);
            continue;
        }
        next_id += 1;
        match start_connection(stream, peer, next_id, ctx, &registry) {
            Ok(handle) => threads.push(handle),
            Err(e) => warn!(%peer, error = %e, "cannot start a connection thread"),
        }
    }
    debug!(?local, open = threads.len(), "page server stopping");
    for (_, stream) in registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
    {
        let _ = stream.shutdown(Shutdown::Both);
    }
    for handle in threads {
        let _ = handle.join();
    }
}

/// Tells a client past the connection limit so, without reading anything, and closes.
fn refuse_connection(mut stream: TcpStream, peer: SocketAddr, ctx: &ServerContext) {
    Counters::add(&ctx.counters.connections_refused, 1);
    debug!(%peer, limit = ctx.max_connections, "page connection refused: at the limit");
    let mut buf = [0u8; HEADER_LEN + 128];
    let n = encode_error(
        &mut buf,
        0,
        0,
        Status::NoCapacity,
        format_args!(
            "node {} has its limit of {} connections open; try again later",
            ctx.node_id, ctx.max_connections
        ),
    );
    // Best effort: the accept loop must not wait on a client that does not read.
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&buf[..n]);
}

fn start_connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    ctx: &Arc<ServerContext>,
    registry: &Registry,
) -> io::Result<JoinHandle<()>> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let handle = stream.try_clone()?;
    registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, handle);
    let ctx = Arc::clone(ctx);
    let registry_for_thread = Arc::clone(registry);
    let spawned = thread::Builder::new()
        .name(format!("page-conn-{id}"))
        .spawn(move || {
            match &ctx.tls {
                None => serve_connection(stream, peer, &ctx),
                Some(config) => serve_tls(stream, Arc::clone(config), peer, &ctx),
            }
            registry_for_thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    if spawned.is_err() {
        registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
    spawned
}

/// Serves a connection of a TLS-only server: refuses a plain page client with a plain error
/// frame, runs the TLS handshake (within [`HANDSHAKE_TIMEOUT`]; a client without a
/// certificate of the CA is refused, counted and logged), then serves the connection inside
/// the TLS session.
fn serve_tls(
    mut stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    ctx: &ServerContext,
) {
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut first = [0u8; 4];
    let n = stream.peek(&mut first).unwrap_or(0);
    if n > 0 && first[..n] == pagemesh_protocol::MAGIC[..n] {
        Counters::add(&ctx.counters.auth_refusals, 1);
        warn!(%peer, "refused a page client without TLS: this node requires it");
        let mut buf = [0u8; 256];
        let n = encode_error(
            &mut buf,
            0,
            0,
            Status::Unauthenticated,
            format_args!(
                "node {} serves pages over TLS only; give the client --tls-cert, --tls-key \
                 and --tls-ca",
                ctx.node_id
            ),
        );
        let _ = stream.write_all(&buf[..n]);
        return;
    }
    let conn = match rustls::ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, "cannot start a TLS session: {e}");
            return;
        }
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    if let Err(e) = pagemesh_transport::tls::handshake(&mut tls) {
        Counters::add(&ctx.counters.auth_refusals, 1);
        match pagemesh_transport::tls::tls_cause(&e) {
            Some(cause) => warn!(%peer, "refused a TLS page client: {cause}"),
            None => debug!(%peer, error = %e, "TLS handshake did not finish"),
        }
        return;
    }
    serve_connection(tls, peer, ctx);
}

impl PageStream for pagemesh_transport::tls::TlsStream<rustls::ServerConnection> {
    fn spin_read(&mut self, buf: &mut [u8], spin: Duration) -> usize {
        pagemesh_transport::tls::spin_read_tls(self, buf, spin)
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }
}

/// Waits up to `timeout` for `fd` to become readable (for a listener: a connection to
/// accept). `Ok(false)` on timeout or signal.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfd` is one valid, exclusively borrowed pollfd for the whole call, and its
    // descriptor stays open because `fd` borrows it.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(ready > 0)
}

/// How far a connection's handshake has come.
enum Stage {
    /// No Hello yet.
    New,
    /// Hello accepted, Auth due: what the proofs are bound to.
    Introduced {
        client: u64,
        session: u64,
        client_nonce: Nonce,
        server_nonce: Nonce,
        cluster: [u8; MAX_CLUSTER_LEN],
        cluster_len: usize,
    },
    /// Handshake done: every op is served.
    Ready,
}

/// Why a connection ended.
enum End {
    /// The client closed between frames.
    Closed,
    /// The client closed in the middle of a frame.
    Truncated { got: usize, wanted: usize },
    /// Nothing came within the read timeout, between two frames: the handshake's before it
    /// is done, the idle timeout after.
    Idle,
    /// Reading or writing failed (including the shutdown closing the socket).
    Io(io::Error),
    /// The client broke the framing; it was told why.
    Framing(FrameError),
    /// The client skipped or failed the handshake; it was told why.
    Unauthenticated,
}

/// What a page connection runs over: a TCP socket here; bytes in memory for the fuzz targets
/// (`fuzz/`) and tests. The connection loop is generic over it, so nothing on the fault path
/// goes through a virtual call.
pub trait PageStream: Read + Write {
    /// Reads what has arrived without blocking, polling for up to `spin` until something
    /// has; the bytes read, 0 when nothing came (see [`spin_read`]). A stream that cannot
    /// poll returns 0 and its blocking read does the work.
    fn spin_read(&mut self, _buf: &mut [u8], _spin: Duration) -> usize {
        0
    }

    /// Sets how long a blocking read may wait (`None`: for ever); the handshake's deadline.
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

impl PageStream for TcpStream {
    fn spin_read(&mut self, buf: &mut [u8], spin: Duration) -> usize {
        spin_read(self, buf, spin)
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

/// A [`PageStream`] that reads a fixed script of bytes and keeps what is written: a client
/// that sends `input` and then closes. For the fuzz targets and tests of
/// [`serve_stream`].
#[derive(Debug, Default)]
pub struct ScriptedStream<'a> {
    input: &'a [u8],
    /// Everything the server wrote.
    pub output: Vec<u8>,
}

impl<'a> ScriptedStream<'a> {
    /// A client that sends `input`, then closes its side.
    pub fn new(input: &'a [u8]) -> Self {
        ScriptedStream {
            input,
            output: Vec::new(),
        }
    }
}

impl Read for ScriptedStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for ScriptedStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded, so that a fuzz input cannot make the server write without end.
        if self.output.len() > 64 << 20 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PageStream for ScriptedStream<'_> {}

impl<S: PageStream + ?Sized> PageStream for &mut S {
    fn spin_read(&mut self, buf: &mut [u8], spin: Duration) -> usize {
        (**self).spin_read(buf, spin)
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
}

/// Serves one page connection over `stream` until it ends, as the server does each accepted
/// socket (the handshake first, then requests); for tests and fuzzing over streams that are
/// not sockets. `peer` is only for the logs.
pub fn serve_stream<S: PageStream>(stream: S, peer: SocketAddr, ctx: &ServerContext) {
    serve_connection(stream, peer, ctx);
}

fn serve_connection<S: PageStream>(mut stream: S, peer: SocketAddr, ctx: &ServerContext) {
    let serial = ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
    Counters::add(&ctx.counters.open_connections, 1);
    debug!(%peer, "page connection opened");
    // Until the handshake is done only Hello and Auth are read, whose frames are small: the
    // buffer that holds any frame is only allocated for a client that passed it.
    let mut small = [0u8; HANDSHAKE_FRAME_LEN];
    let mut big: Option<Box<[u8]>> = None;
    // Until the client says Hello with its session, what it is lent is the connection's own.
    let mut session = Session {
        client: Session::ANONYMOUS,
        id: serial,
    };
    let mut stage = Stage::New;
    let mut packing = None;
    let mut queue_pair = None;
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let end = loop {
        let ready = matches!(stage, Stage::Ready);
        let buf: &mut [u8] = match &mut big {
            Some(b) => b,
            None if ready => {
                let _ = stream.set_read_timeout(ctx.idle_timeout);
                big.insert(vec![0u8; MAX_FRAME_LEN].into_boxed_slice())
            }
            None => &mut small,
        };
        let conn = Conn {
            session: &mut session,
            stage: &mut stage,
            packing: &mut packing,
            queue_pair: &mut queue_pair,
        };
        if let Err(end) = serve_request(&mut stream, buf, peer, ctx, conn) {
            break end;
        }
    };
    match end {
        End::Closed => debug!(%peer, "page connection closed by the client"),
        End::Truncated { got, wanted } => {
            Counters::add(&ctx.counters.bad_frames, 1);
            warn!(%peer, got, wanted, "client closed in the middle of a frame");
        }
        End::Idle if matches!(stage, Stage::Ready) => info!(
            %peer,
            "closed a page connection idle for {:?}",
            ctx.idle_timeout.unwrap_or_default()
        ),
        End::Idle => debug!(
            %peer,
            "page connection closed: no handshake within {HANDSHAKE_TIMEOUT:?}"
        ),
        End::Io(e) => debug!(%peer, error = %e, "page connection failed"),
        End::Framing(e) => debug!(%peer, error = %e, "page connection closed after a bad frame"),
        End::Unauthenticated => {
            debug!(%peer, "page connection closed: handshake skipped or failed")
        }
    }
    ctx.counters
        .open_connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// What a connection knows of its client.
struct Conn<'a> {
    session: &'a mut Session,
    stage: &'a mut Stage,
    /// Set once the client's Hello agreed to packed payloads.
    packing: &'a mut Option<Packing>,
    /// The queue pair an RdmaConnect made for this connection, kept while it lasts.
    queue_pair: &'a mut Option<Box<dyn Send>>,
}

/// The buffers a connection packs and unpacks runs with, allocated once, when its Hello
/// agreed to packed payloads.
struct Packing {
    /// A reply's packed run before it goes over the pages, or a write-back's unpacked pages.
    plain: Box<[u8]>,
    /// One page's trial compression.
    scratch: Box<[u8]>,
}

impl Packing {
    fn new() -> Self {
        Packing {
            plain: vec![0u8; MAX_RUN_BYTES].into_boxed_slice(),
            scratch: vec![0u8; packed::SCRATCH_LEN].into_boxed_slice(),
        }
    }
}

/// Reads one request and answers it.
fn serve_request<S: PageStream>(
    stream: &mut S,
    buf: &mut [u8],
    peer: SocketAddr,
    ctx: &ServerContext,
    conn: Conn<'_>,
) -> Result<(), End> {
    let Conn {
        session,
        stage,
        packing,
        queue_pair,
    } = conn;
    let mut head = [0u8; HEADER_LEN];
    let got = stream.spin_read(&mut head, ctx.spin);
    read_frame_part(stream, &mut head, got, true)?;
    let request: Header = zerocopy::transmute!(head);
    let len = match request.validate(Direction::Request) {
        Ok(len) => len,
        Err(e) => {
            refuse_frame(stream, buf, peer, ctx, &request, e)?;
            if e.is_fatal() {
                return Err(End::Framing(e));
            }
            // Non-fatal errors are only reported once payload_len is known to be within the
            // limit.
            let skip = request.frame_len().min(buf.len());
            return read_frame_part(stream, &mut buf[HEADER_LEN..skip], 0, false);
        }
    };
    // Before the handshake is done nothing but Hello and Auth is read any further.
    if let Err(why) = gate(stage, &request) {
        return refuse_unauthenticated(stream, buf, peer, ctx, &request, why);
    }
    read_frame_part(stream, &mut buf[HEADER_LEN..len], 0, false)?;
    // The whole frame is in, so the next one starts right after it: a damaged payload is
    // refused without acting on it, and the connection kept.
    if let Err(e) = request.verify_checksum(&buf[HEADER_LEN..len]) {
        return refuse_frame(stream, buf, peer, ctx, &request, e);
    }
    if request.op() == Ok(Op::Auth) {
        return authenticate(stream, buf, peer, ctx, &request, session, stage);
    }
    let conn = Conn {
        session,
        stage,
        packing,
        queue_pair,
    };
    let reply_len = dispatch(ctx, &request, buf, peer, conn);
    stream.write_all(&buf[..reply_len]).map_err(End::Io)
}

/// Bytes of the largest frame a client may send before its handshake is done (a Hello with
/// the longest cluster name; an Auth is shorter).
const HANDSHAKE_FRAME_LEN: usize =
    HEADER_LEN + pagemesh_protocol::HELLO_REQUEST_FIXED + MAX_CLUSTER_LEN;

/// Whether `request` may be served at this stage of the handshake; if not, why.
fn gate(stage: &Stage, request: &Header) -> Result<(), &'static str> {
    match (stage, request.op()) {
        (Stage::Ready, _) => Ok(()),
        (Stage::New, Ok(Op::Hello)) | (Stage::Introduced { .. }, Ok(Op::Auth | Op::Hello)) => {
            Ok(())
        }
        (Stage::New, _) => Err("say Hello first: nothing is served before the handshake"),
        (Stage::Introduced { .. }, _) => {
            Err("this node requires the cluster key: prove it with Auth first")
        }
    }
}

/// Refuses a request of a client that skipped or failed the handshake, counts and logs it;
/// the connection is then closed.
fn refuse_unauthenticated<S: PageStream>(
    stream: &mut S,
    buf: &mut [u8],
    peer: SocketAddr,
    ctx: &ServerContext,
    request: &Header,
    why: &str,
) -> Result<(), End> {
    Counters::add(&ctx.counters.auth_refusals, 1);
    warn!(%peer, op = request.op_byte(), "refused an unauthenticated page client: {why}");
    let n = encode_error(
        buf,
        request.op_byte(),
        request.request_id(),
        Status::Unauthenticated,
        format_args!("node {} refuses: {why}", ctx.node_id),
    );
    stream.write_all(&buf[..n]).map_err(End::Io)?;
    Err(End::Unauthenticated)
}

/// Checks an Auth request's proof against the transcript of this connection's Hello: right,
/// and the reply carries the server's proof and the connection is ready; wrong, and it is
/// refused and closed.
fn authenticate<S: PageStream>(
    stream: &mut S,
    buf: &mut [u8],
    peer: SocketAddr,
    ctx: &ServerContext,
    request: &Header,
    session: &mut Session,
    stage: &mut Stage,
) -> Result<(), End> {
    let (
        Some(keyring),
        Stage::Introduced {
            client,
            session: id,
            client_nonce,
            server_nonce,
            cluster,
            cluster_len,
        },
    ) = (&ctx.keyring, &*stage)
    else {
        // gate() let an Auth through only after a Hello; without a key the Hello finished the
        // handshake.
        return refuse_unauthenticated(stream, buf, peer, ctx, request, "no Auth is due");
    };
    let transcript = Transcript {
        client: *client,
        server: u64::from(ctx.node_id),
        session: *id,
        cluster: &cluster[..*cluster_len],
        client_nonce,
        server_nonce,
    };
    let proof = &buf[HEADER_LEN..HEADER_LEN + PROOF_LEN];
    let Some(index) = keyring.check_client(&transcript, proof) else {
        let claimed = *client;
        warn!(%peer, client = claimed, "page client's proof does not match the cluster key");
        return refuse_unauthenticated(
            stream,
            buf,
            peer,
            ctx,
            request,
            "the cluster key does not match (the proof was made with another key, or none)",
        );
    };
    let ours = keyring.server_proof(index, &transcript);
    *session = Session {
        client: *client,
        id: *id,
    };
    debug!(%peer, client = *client, session = *id, "page client authenticated");
    *stage = Stage::Ready;
    let reply = request
        .reply(Status::Ok)
        .with_payload_len(PROOF_LEN as u32)
        .with_checksum(&ours);
    buf[..HEADER_LEN].copy_from_slice(&reply.to_bytes());
    buf[HEADER_LEN..HEADER_LEN + PROOF_LEN].copy_from_slice(&ours);
    stream
        .write_all(&buf[..HEADER_LEN + PROOF_LEN])
        .map_err(End::Io)
}

/// Answers a request that broke the rules (the caller then skips its payload or ends the
/// connection).
fn refuse_frame<S: PageStream>(
    stream: &mut S,
    buf: &mut [u8],
    peer: SocketAddr,
    ctx: &ServerContext,
    request: &Header,
    err: FrameError,
) -> Result<(), End> {
    Counters::add(&ctx.counters.bad_frames, 1);
    warn!(%peer, error = %err, "malformed page request");
    let status = match err {
        FrameError::BadVersion(_) | FrameError::UnknownOp(_) => Status::Unsupported,
        _ => Status::BadRequest,
    };
    // Past bad magic nothing in the header means anything; otherwise echo what we can.
    let (op, request_id) = match err {
        FrameError::BadMagic => (0, 0),
        _ => (request.op_byte(), request.request_id()),
    };
    let n = encode_error(buf, op, request_id, status, format_args!("{err}"));
    stream.write_all(&buf[..n]).map_err(End::Io)
}

/// Fills `dst` from the stream, past the `got` bytes already read into it. An end of stream
/// before the first byte of a frame (`at_frame_start`) is a clean close; anywhere else it is
/// a truncated frame.
fn read_frame_part<S: PageStream>(
    stream: &mut S,
    dst: &mut [u8],
    mut got: usize,
    at_frame_start: bool,
) -> Result<(), End> {
    while got < dst.len() {
        match stream.read(&mut dst[got..]) {
            Ok(0) if got == 0 && at_frame_start => return Err(End::Closed),
            Ok(0) => {
                let base = if at_frame_start { 0 } else { HEADER_LEN };
                return Err(End::Truncated {
                    got: base + got,
                    wanted: base + dst.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A read timeout (SO_RCVTIMEO reports EAGAIN) between frames.
            Err(e)
                if got == 0
                    && at_frame_start
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Err(End::Idle);
            }
            Err(e) => return Err(End::Io(e)),
        }
    }
    Ok(())
}

/// Answers a Hello whose payload is in `body` (session id, nonce, cluster name; validate()
/// checked the lengths): moves the connection on to Auth (with a key) or to Ready, and
/// writes the reply's payload (this node's nonce and cluster name) into `body`; returns its
/// length.
fn hello(
    ctx: &ServerContext,
    request: &Header,
    body: &mut [u8],
    peer: SocketAddr,
    session: &mut Session,
    stage: &mut Stage,
) -> Result<u32, Refusal> {
    if matches!(stage, Stage::Ready) {
        return Err(Refusal::HelloAgain);
    }
    let payload = &body[..request.payload_len() as usize];
    let (id, rest) = payload.split_at(SESSION_LEN);
    let (nonce, theirs) = rest.split_at(NONCE_LEN);
    let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
    let client_nonce = Nonce(nonce.try_into().unwrap_or_default());
    let client = request.page();
    debug!(%peer, client, session = id, cluster = %String::from_utf8_lossy(theirs), "page client said hello");
    ctx.hello(theirs)?;
    let server_nonce = Nonce::fresh().map_err(|_| Refusal::NoRandom)?;
    if ctx.keyring.is_some() {
        let mut cluster = [0u8; MAX_CLUSTER_LEN];
        cluster[..theirs.len()].copy_from_slice(theirs);
        *stage = Stage::Introduced {
            client,
            session: id,
            client_nonce,
            server_nonce,
            cluster,
            cluster_len: theirs.len(),
        };
    } else {
        *session = Session { client, id };
        *stage = Stage::Ready;
    }
    let ours = ctx.cluster.as_bytes();
    body[..NONCE_LEN].copy_from_slice(&server_nonce.0);
    body[NONCE_LEN..NONCE_LEN + ours.len()].copy_from_slice(ours);
    // with_cluster() bounded the name by MAX_CLUSTER_LEN.
    Ok((NONCE_LEN + ours.len()) as u32)
}

/// Why a valid request was refused.
#[derive(thiserror::Error, Debug)]
enum Refusal {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot look up VM {vm}")]
    Lookup {
        vm: VmId,
        #[source]
        source: LookupError,
    },
    #[error("cannot look up VM {vm}: the lookup returned VM {got}")]
    WrongVm { vm: VmId, got: VmId },
    #[error("the cluster name is not UTF-8")]
    ClusterNotUtf8,
    #[error("this connection has said Hello already")]
    HelloAgain,
    #[error("no Auth is due: this node has no cluster key, or the handshake is done")]
    NoAuthDue,
    #[error("the operating system gave no random numbers for the handshake")]
    NoRandom,
    #[error("the packed pages do not unpack; nothing was stored")]
    BadPacked(#[source] packed::PackedError),
    #[error("node {node} is in cluster '{ours}', not '{theirs}'")]
    WrongCluster {
        node: NodeId,
        ours: String,
        theirs: String,
    },
    #[error(
        "this memory node serves no RDMA (it runs with --transport tcp, has no RDMA device, \
         or was built without the rdma feature): fetch over TCP"
    )]
    NoRdma,
    #[error("cannot connect a queue pair: {0}")]
    Rdma(String),
}

impl Refusal {
    fn status(&self) -> Status {
        match self {
            Refusal::Store(e) => match e {
                StoreError::UnknownVm(_) => Status::UnknownVm,
                StoreError::NotHeld { .. } => Status::NotHeld,
                StoreError::NoCapacity { .. } => Status::NoCapacity,
                StoreError::BadRunLength(_) | StoreError::OutOfRange { .. } => Status::BadRequest,
                StoreError::Image { .. }
                | StoreError::ImageRefused { .. }
                | StoreError::Replicas { .. }
                | StoreError::NoImageDir { .. } => Status::LoadFailed,
            },
            Refusal::Lookup { .. } | Refusal::WrongVm { .. } => Status::LoadFailed,
            Refusal::ClusterNotUtf8
            | Refusal::HelloAgain
            | Refusal::NoAuthDue
            | Refusal::BadPacked(_) => Status::BadRequest,
            Refusal::NoRandom | Refusal::NoRdma | Refusal::Rdma(_) => Status::Unsupported,
            Refusal::WrongCluster { .. } => Status::WrongCluster,
        }
    }
}

/// Refuses a packed run on a connection whose Hello did not agree to packed payloads.
fn refuse_packed(buf: &mut [u8], request: &Header, peer: SocketAddr) -> usize {
    debug!(%peer, "packed run refused: not agreed in the Hello");
    encode_error(
        buf,
        request.op_byte(),
        request.request_id(),
        Status::BadRequest,
        format_args!("packed payloads were not agreed in this connection's Hello"),
    )
}

/// Prints an error and its sources, `: `-separated (the client sees only this message).
struct Chain<'a>(&'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Carries out a valid request whose payload is in `buf[HEADER_LEN..]` (its checksum
/// verified), and writes the reply into `buf`; returns the reply's length. The request's
/// acknowledgement takes effect first, whatever the request asks.
fn dispatch(
    ctx: &ServerContext,
    request: &Header,
    buf: &mut [u8],
    peer: SocketAddr,
    conn: Conn<'_>,
) -> usize {
    let Conn {
        session,
        stage,
        packing,
        queue_pair,
    } = conn;
    if request.ack() != 0 && request.op() != Ok(Op::Hello) {
        let freed = ctx.store.acknowledge(*session, request.ack());
        Counters::add(&ctx.counters.pages_claimed, freed);
    }
    let vm = request.vm();
    let page = request.page();
    // validate() bounded count by MAX_RUN_PAGES, so the run fits the buffer and a u32.
    let run_bytes = request.count().saturating_mul(PAGE_SIZE as u32);
    let run = run_bytes as usize;
    let ok = request.reply(Status::Ok);
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let result: Result<Header, Refusal> = match request.op() {
        Ok(Op::Hello) => hello(ctx, request, body, peer, session, stage).map(|len| {
            let scheme = if ctx.keyring.is_some() {
                AuthScheme::ClusterKey
            } else {
                AuthScheme::None
            };
            let accepted = match ctx.packing {
                true => request.features() & FEATURE_PACKED,
                false => 0,
            };
            if accepted & FEATURE_PACKED != 0 {
                packing.get_or_insert_with(Packing::new);
            }
            ok.with_auth_scheme(scheme)
                .with_page(ctx.node_id.into())
                .with_payload_len(len)
                .with_features(accepted)
        }),
        Ok(Op::Auth) => Err(Refusal::NoAuthDue),
        Ok(op @ (Op::Fetch | Op::Read)) => {
            let id = request.request_id();
            let copy_out = |dst: &mut [u8]| match op {
                Op::Fetch => ctx.store.lend(vm, page, dst, *session, id),
                _ => ctx.store.read(vm, page, dst),
            };
            let sent = match (request.is_packed(), packing.as_mut()) {
                (false, _) => copy_out(&mut body[..run]).map(|()| ok.with_payload_len(run_bytes)),
                (true, Some(p)) => copy_out(&mut body[..run]).map(|()| {
                    // Packed aside, and over the pages only when it shrank.
                    match packed::pack(&body[..run], &mut p.plain[..run], &mut p.scratch) {
                        Some(len) => {
                            body[..len].copy_from_slice(&p.plain[..len]);
                            Counters::add(&ctx.counters.packed_pages, u64::from(request.count()));
                            Counters::add(&ctx.counters.packed_bytes, len as u64);
                            ok.with_payload_len(len as u32)
                        }
                        // It would not shrink: the pages as they are.
                        None => ok.without_packed().with_payload_len(run_bytes),
                    }
                }),
                (true, None) => {
                    return refuse_packed(buf, request, peer);
                }
            };
            sent.inspect(|_| {
                Counters::add(&ctx.counters.pages_served, u64::from(request.count()));
            })
            .map_err(Refusal::from)
        }
        Ok(Op::Ack) => Ok(ok),
        Ok(Op::Claim) => ctx
            .store
            .claim(
                vm,
                page,
                u64::from(request.count()),
                *session,
                request.request_id(),
            )
            .map(|()| ok)
            .map_err(Refusal::from),
        Ok(Op::RdmaConnect) => {
            let serve = |rdma: &dyn RdmaService| {
                let client = pagemesh_protocol::QueuePair::from_bytes(
                    &body[..pagemesh_protocol::QUEUE_PAIR_LEN],
                )
                .map_err(|e| e.to_string())?;
                let (ours, keep) = rdma.connect(&client)?;
                info!(
                    %peer,
                    qpn = ours.qpn,
                    client_qpn = client.qpn,
                    "connected a queue pair for one-sided reads"
                );
                Ok::<_, String>((ours, keep))
            };
            match ctx.rdma.as_deref().map(serve) {
                None => Err(Refusal::NoRdma),
                Some(Err(why)) => Err(Refusal::Rdma(why)),
                Some(Ok((ours, keep))) => {
                    // A second RdmaConnect replaces the first queue pair.
                    *queue_pair = Some(keep);
                    body[..pagemesh_protocol::QUEUE_PAIR_LEN].copy_from_slice(&ours.to_bytes());
                    Ok(ok.with_payload_len(pagemesh_protocol::QUEUE_PAIR_LEN as u32))
                }
            }
        }
        Ok(Op::WriteBack) => {
            let pages: Result<&[u8], Refusal> = match (request.is_packed(), packing.as_mut()) {
                (false, _) => Ok(&body[..run]),
                (true, Some(p)) => {
                    let len = request.payload_len() as usize;
                    match packed::unpack(&body[..len], &mut p.plain[..run]) {
                        Ok(()) => {
                            Counters::add(&ctx.counters.packed_pages, u64::from(request.count()));
                            Counters::add(&ctx.counters.packed_bytes, len as u64);
                            Ok(&p.plain[..run])
                        }
                        Err(e) => Err(Refusal::BadPacked(e)),
                    }
                }
                (true, None) => return refuse_packed(buf, request, peer),
            };
            pages
                .and_then(|pages| ctx.store.put(vm, page, pages).map_err(Refusal::from))
                .map(|()| {
                    Counters::add(&ctx.counters.pages_written_back, u64::from(request.count()));
                    // The reply carries no pages.
                    ok.without_packed()
                })
        }
        Ok(Op::Load) => ctx.load(vm).map(|held| {
            debug!(%peer, vm, held, "loaded VM pages");
            ok.with_page(held)
        }),
        Ok(Op::Slots) => {
            let len = request.count() * pagemesh_protocol::SLOT_BYTES;
            ctx.store
                .slots(vm, page, &mut body[..len as usize])
                .map(|()| ok.with_payload_len(len))
                .map_err(Refusal::from)
        }
        Ok(Op::Held) => ctx
            .store
            .held(vm)
            .map(|n| ok.with_page(n))
            .map_err(Refusal::from),
        Ok(Op::Release) => ctx
            .store
            .release(vm)
            .map(|n| {
                debug!(%peer, vm, dropped = n, "released VM pages");
                ok.with_page(n)
            })
            .map_err(Refusal::from),
        // validate() accepted the op, so this cannot happen; answer rather than panic.
        Err(e) => {
            let status = Status::Unsupported;
            return encode_error(
                buf,
                request.op_byte(),
                request.request_id(),
                status,
                format_args!("{e}"),
            );
        }
    };
    match result {
        Ok(reply) => {
            let reply = reply.with_checksum(&body[..reply.payload_len() as usize]);
            head.copy_from_slice(&reply.to_bytes());
            reply.frame_len()
        }
        Err(refusal) => {
            debug!(%peer, vm, error = %refusal, "page request refused");
            encode_error(
                buf,
                request.op_byte(),
                request.request_id(),
                refusal.status(),
                format_args!("{}", Chain(&refusal)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pagemesh_api::{Content, PageRange, Placement};
    use zerocopy::IntoBytes;

    use super::*;
    use pagemesh_api::pattern;
    use pagemesh_protocol::{self, MAX_MESSAGE_LEN};
    use pagemesh_transport::compress::Compression;
    use pagemesh_transport::tcp::{Credentials, TcpOptions, TcpPeer};
    use pagemesh_transport::{PageSource, PeerControl, Run, TransportError};

    mod one_sided;

    const ME: NodeId = 2;
    const CLIENT: NodeId = 1;
    const SEED: u64 = 0x5EED;
    /// The cluster of the servers and clients of these tests, unless a test says otherwise.
    const CLUSTER: &str = "lab";

    /// VM 7: 64 pages, 0..32 on this node (2), 32..64 on node 3.
    fn vm7() -> Vm {
        let placement = Placement::ranges(
            vec![
                PageRange {
                    start: 0,
                    pages: 32,
                    node: ME,
                },
                PageRange {
                    start: 32,
                    pages: 32,
                    node: 3,
                },
            ],
            64,
        )
        .unwrap();
        Vm {
            id: 7,
            compute_node: CLIENT,
            mem_bytes: 64 * PAGE_SIZE as u64,
            placement,
            content: Content::Pattern { seed: SEED },
            local_memory_bytes: None,
            replicas: 1,
            retired: Vec::new(),
            repairs: Vec::new(),
        }
    }

    struct Running {
        addr: String,
        ctx: Arc<ServerContext>,
        shutdown: ShutdownSignal,
        thread: Option<JoinHandle<()>>,
    }

    impl Running {
        fn start(capacity: u32) -> Self {
            Self::start_in(CLUSTER, capacity)
        }

        fn start_in(cluster: &str, capacity: u32) -> Self {
            Self::start_with(cluster, None, capacity)
        }

        fn start_with(cluster: &str, key: Option<&[u8]>, capacity: u32) -> Self {
            let ctx = ServerContext::new(ME, PageStore::new(capacity), |vm| {
                if vm == 7 {
                    Ok(vm7())
                } else {
                    Err(format!("the coordinator knows no VM {vm}").into())
                }
            });
            let mut ctx = ctx.with_cluster(cluster.to_owned()).unwrap();
            if let Some(key) = key {
                ctx = ctx.with_keyring(Keyring::from_secret(key));
            }
            Self::serving(ctx)
        }

        fn serving(ctx: ServerContext) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let ctx = Arc::new(ctx);
            let shutdown = ShutdownSignal::new();
            let thread = serve(listener, Arc::clone(&ctx), shutdown.clone()).unwrap();
            Running {
                addr,
                ctx,
                shutdown,
                thread: Some(thread),
            }
        }

        fn peer(&self) -> TcpPeer {
            self.connect(CLUSTER).unwrap()
        }

        fn connect(&self, cluster: &str) -> Result<TcpPeer, TransportError> {
            TcpPeer::connect(CLIENT, cluster, ME, &self.addr, Duration::from_secs(5))
        }

        /// A client with `--compress compression`.
        fn compressing_peer(&self, compression: Compression) -> TcpPeer {
            let options = TcpOptions {
                compression,
                ..TcpOptions::default()
            };
            let credentials = Credentials::keyless(CLUSTER);
            TcpPeer::connect_with(CLIENT, &credentials, ME, &self.addr, options).unwrap()
        }

        /// A client that packs every run (`--compress on`).
        fn packing_peer(&self) -> TcpPeer {
            self.compressing_peer(Compression::On)
        }

        fn stop(&mut self) {
            self.shutdown.trigger();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn assert_pattern(first: u64, pages: &[u8]) {
        for (p, page) in (first..).zip(pages.chunks_exact(PAGE_SIZE)) {
            assert_eq!(pattern::first_mismatch(SEED, p, page), None, "page {p}");
        }
    }

    fn remote_status(r: Result<impl fmt::Debug, TransportError>) -> (Status, String) {
        match r {
            Err(TransportError::Remote {
                node: ME,
                status,
                message,
            }) => (status, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn fetch_claims_pattern_pages() {
        let server = Running::start(100);
        let mut peer = server.peer();
        assert_eq!(peer.load(7).unwrap(), 32);
        let mut run = vec![0u8; 4 * PAGE_SIZE];
        peer.fetch(7, 10, &mut run).unwrap();
        assert_pattern(10, &run);
        assert_eq!(peer.held(7).unwrap(), 28);
        // Claimed pages are gone: fetching again is refused and claims nothing.
        let (status, message) = remote_status(peer.fetch(7, 12, &mut run));
        assert_eq!(status, Status::NotHeld);
        assert!(message.contains("page 12 of VM 7"), "{message}");
        assert_eq!(peer.held(7).unwrap(), 28);
        // A run with one page missing is all-or-nothing.
        let (status, _) = remote_status(peer.fetch(7, 8, &mut run));
        assert_eq!(status, Status::NotHeld);
        assert_eq!(peer.held(7).unwrap(), 28);
        // The largest run.
        let mut all = vec![0u8; pagemesh_protocol::MAX_RUN_PAGES as usize * PAGE_SIZE];
        let (status, _) = remote_status(peer.fetch(7, 0, &mut all));
        assert_eq!(
            status,
            Status::BadRequest,
            "256 pages reach past the VM's 64"
        );
        assert_eq!(peer.release(7).unwrap(), 28);
        assert_eq!(server.ctx.pages_claimed(), 4);
        assert_eq!(server.ctx.pages_served(), 4);
        assert_eq!(server.ctx.store.total_held(), 0);
    }

    /// Slots name where held pages are (distinct, inside the store), pages not held have
    /// none, a claimed page loses its slot and a written-back one gets one again.
    #[test]
    fn slots_say_where_held_pages_are_and_follow_claims_and_write_backs() {
        use pagemesh_protocol::NO_SLOT;
        let server = Running::start(100);
        let mut peer = server.peer();
        assert_eq!(peer.load(7).unwrap(), 32);
        let slots = peer.slots(7, 0, 64).unwrap();
        assert_eq!(slots.len(), 64);
        let held: std::collections::BTreeSet<u32> = slots[..32].iter().copied().collect();
        assert_eq!(held.len(), 32, "distinct slots: {slots:?}");
        assert!(held.iter().all(|&s| s < 100), "{slots:?}");
        assert!(slots[32..].iter().all(|&s| s == NO_SLOT), "{slots:?}");
        // Claimed (fetched and acknowledged): no slot any more.
        let mut run = vec![0u8; 4 * PAGE_SIZE];
        peer.fetch(7, 10, &mut run).unwrap();
        assert_eq!(peer.held(7).unwrap(), 28);
        let after = peer.slots(7, 8, 8).unwrap();
        assert_eq!(after[..2], slots[8..10]);
        assert_eq!(after[2..6], [NO_SLOT; 4]);
        assert_eq!(after[6..], slots[14..16]);
        // Written back: held again, in a slot no other page has.
        peer.write_back(7, 11, &run[..PAGE_SIZE]).unwrap();
        let back = peer.slots(7, 11, 1).unwrap()[0];
        assert_ne!(back, NO_SLOT);
        let now = peer.slots(7, 0, 32).unwrap();
        assert_eq!(now.iter().filter(|&&s| s == back).count(), 1, "{now:?}");
        // A VM the store does not know is an error, not a list of no slots.
        let (status, message) = remote_status(peer.slots(9, 0, 1).map(drop));
        assert_eq!(status, Status::UnknownVm, "{message}");
        assert!(message.contains("VM 9"), "{message}");
    }

    #[test]
    fn batches_fetch_and_write_back_many_runs_with_one_write() {
        let server = Running::start(100);
        let mut peer = server.peer();
        peer.load(7).unwrap();
        // 20 one-page runs, pages 0..20 backwards: more than one batch of MAX_BATCH.
        let mut bufs = vec![vec![0u8; PAGE_SIZE]; 20];
        let mut runs: Vec<Run<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Run::new(19 - i as u64, b))
            .collect();
        peer.fetch_runs(7, &mut runs).unwrap();
        for run in &runs {
            assert_pattern(run.first, run.pages);
        }
        peer.acknowledge().unwrap();
        assert_eq!(server.ctx.store.held(7).unwrap(), 12);
        assert_eq!(server.ctx.pages_claimed(), 20);

        // A refused run (page 0 is gone) does not stop the others, nor the connection.
        let mut a = vec![0u8; 2 * PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        let mut c = vec![0u8; PAGE_SIZE];
        let mut runs = [
            Run::new(20, &mut a),
            Run::new(0, &mut b),
            Run::new(25, &mut c),
        ];
        let (status, message) = remote_status(peer.fetch_runs(7, &mut runs));
        assert_eq!(status, Status::NotHeld, "{message}");
        assert_pattern(20, runs[0].pages);
        assert_pattern(25, runs[2].pages);
        let filled: Vec<bool> = runs.iter().map(|r| r.filled).collect();
        assert_eq!(
            filled,
            [true, false, true],
            "the caller knows which runs it was lent"
        );
        assert!(!peer.is_poisoned());
        peer.acknowledge().unwrap();
        assert_eq!(server.ctx.store.held(7).unwrap(), 9);

        // Reads in one batch: the server keeps its copies; a refusal is marked the same way.
        let mut a = vec![0u8; 3 * PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        let mut runs = [Run::new(26, &mut a), Run::new(1, &mut b)];
        let (status, _) = remote_status(peer.read_runs(7, &mut runs));
        assert_eq!(status, Status::NotHeld);
        assert_pattern(26, runs[0].pages);
        assert_eq!((runs[0].filled, runs[1].filled), (true, false));
        peer.acknowledge().unwrap();
        assert_eq!(server.ctx.store.held(7).unwrap(), 9, "reads keep the pages");

        // Write-backs in one batch, read back.
        let ones = vec![1u8; 2 * PAGE_SIZE];
        let twos = vec![2u8; PAGE_SIZE];
        peer.write_back_runs(7, &[(0, &ones), (10, &twos)]).unwrap();
        assert_eq!(server.ctx.pages_written_back(), 3);
        assert_eq!(server.ctx.store.held(7).unwrap(), 12);
        let mut back = vec![0u8; PAGE_SIZE];
        peer.read(7, 1, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 1));
        peer.read(7, 10, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 2));
    }

    #[test]
    fn read_keeps_pages_and_write_back_replaces_them() {
        let server = Running::start(100);
        let mut peer = server.peer();
        peer.load(7).unwrap();
        let mut run = vec![0u8; 2 * PAGE_SIZE];
        for _ in 0..2 {
            peer.read(7, 30, &mut run).unwrap();
            assert_pattern(30, &run);
        }
        assert_eq!(peer.held(7).unwrap(), 32);

        // Write back over held pages and onto pages this node never held.
        let mut written = vec![0u8; 3 * PAGE_SIZE];
        for (i, b) in written.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        peer.write_back(7, 31, &written).unwrap();
        assert_eq!(peer.held(7).unwrap(), 34);
        let mut back = vec![0u8; 3 * PAGE_SIZE];
        peer.read(7, 31, &mut back).unwrap();
        assert_eq!(back, written);
        peer.fetch(7, 31, &mut back).unwrap();
        assert_eq!(back, written);
        assert_eq!(peer.held(7).unwrap(), 31);
        assert_eq!(server.ctx.pages_written_back(), 3);
        assert_eq!(server.ctx.pages_served(), 4 + 3 + 3);
    }

    /// Pages of text (which LZ4 shrinks) and zero pages, alternating.
    fn compressible(pages: usize) -> Vec<u8> {
        (0..pages)
            .flat_map(|i| match i % 2 {
                0 => b"a page of text, packed "
                    .iter()
                    .cycle()
                    .take(PAGE_SIZE)
                    .map(|&b| b ^ i as u8)
                    .collect::<Vec<_>>(),
                _ => vec![0u8; PAGE_SIZE],
            })
            .collect()
    }

    #[test]
    fn packed_runs_come_back_as_they_went_and_pattern_pages_travel_plain() {
        let server = Running::start(100);
        let mut peer = server.packing_peer();
        assert!(peer.packs(), "the server agreed to packed runs");
        peer.load(7).unwrap();
        // Pattern pages do not shrink: asked packed, they come back plain, and right.
        let mut run = vec![0u8; 4 * PAGE_SIZE];
        peer.read(7, 2, &mut run).unwrap();
        assert_pattern(2, &run);
        assert_eq!(server.ctx.stats().packed_pages, 0);
        // Text and zero pages are written back packed and read back packed.
        let written = compressible(8);
        peer.write_back(7, 10, &written).unwrap();
        let mut back = vec![0xEEu8; 8 * PAGE_SIZE];
        peer.read(7, 10, &mut back).unwrap();
        assert_eq!(back, written);
        let mut runs = [Run::new(10, &mut back[..4 * PAGE_SIZE])];
        peer.fetch_runs(7, &mut runs).unwrap();
        assert!(runs[0].filled);
        assert_eq!(&back[..4 * PAGE_SIZE], &written[..4 * PAGE_SIZE]);
        let stats = server.ctx.stats();
        assert_eq!(stats.packed_pages, 8 + 8 + 4);
        assert!(
            stats.packed_bytes < 20 * PAGE_SIZE as u64 / 10,
            "a tenth or less of the plain bytes: {stats:?}"
        );
        // A client that does not pack still gets plain pages from the same server.
        let mut plain = server.peer();
        assert!(!plain.packs());
        let mut other = vec![0u8; 8 * PAGE_SIZE];
        plain.read(7, 10, &mut other).unwrap();
        assert_eq!(other, written);
        assert_eq!(server.ctx.stats().packed_pages, 20);
    }

    #[test]
    fn an_auto_client_tries_packed_write_backs_and_every_page_lands_right() {
        let server = Running::start(200);
        let mut peer = server.compressing_peer(Compression::Auto);
        peer.load(7).unwrap();
        // A trial's write-backs alternate packed and plain, packed first.
        let written = compressible(2);
        for first in (0..40).step_by(2) {
            peer.write_back(7, first, &written).unwrap();
        }
        let packed = server.ctx.stats().packed_pages;
        assert!(packed > 0 && packed < 40, "about half packed: {packed}");
        let mut back = vec![0u8; 2 * PAGE_SIZE];
        for first in (0..40).step_by(2) {
            peer.read(7, first, &mut back).unwrap();
            assert_eq!(back, written, "pages {first}..");
        }
    }

    #[test]
    fn a_server_with_packing_off_agrees_to_none() {
        let ctx = ServerContext::new(ME, PageStore::new(100), |_| Ok(vm7()))
            .with_cluster(CLUSTER.to_owned())
            .unwrap()
            .with_packing(false);
        let server = Running::serving(ctx);
        let mut peer = server.packing_peer();
        assert!(!peer.packs());
        peer.load(7).unwrap();
        let written = compressible(4);
        peer.write_back(7, 10, &written).unwrap();
        let mut back = vec![0u8; 4 * PAGE_SIZE];
        peer.read(7, 10, &mut back).unwrap();
        assert_eq!(back, written);
        assert_eq!(server.ctx.stats().packed_pages, 0);
    }

    #[test]
    fn packed_runs_not_agreed_or_not_unpacking_are_refused_and_store_nothing() {
        let server = Running::start(100);
        let mut peer = server.peer();
        peer.load(7).unwrap();
        let pages = compressible(2);
        let mut packed = vec![0u8; pages.len()];
        let mut scratch = vec![0u8; packed::SCRATCH_LEN];
        let len = packed::pack(&pages, &mut packed, &mut scratch).unwrap();
        let packed = &packed[..len];
        let write = |id, payload: &[u8]| {
            let h = Header::request(Op::WriteBack, id, 7, 0, 2)
                .with_packed()
                .with_payload_len(payload.len() as u32);
            frame(h, payload)
        };
        // Without FEATURE_PACKED in the Hello: refused, and so is asking for a packed reply.
        let frames = [
            hello_frame(1, 5, b""),
            write(2, packed),
            frame(Header::request(Op::Read, 3, 7, 0, 1).with_packed(), &[]),
        ];
        let replies = replies_on_one_connection(&server.addr, &frames);
        for (h, msg) in &replies[1..] {
            let msg = std::str::from_utf8(msg).unwrap();
            assert_eq!(h.status(), Ok(Status::BadRequest), "{msg}");
            assert_eq!(
                msg,
                "packed payloads were not agreed in this connection's Hello"
            );
        }
        // Agreed, but the first page's block garbled (its checksum made over the garbage):
        // refused, nothing stored, the connection kept.
        let hello = frame(
            Header::request(Op::Hello, 1, 0, u64::from(CLIENT), 0)
                .with_features(FEATURE_PACKED)
                .with_payload_len((SESSION_LEN + NONCE_LEN) as u32),
            &[0x22; SESSION_LEN + NONCE_LEN],
        );
        let mut garbled = packed.to_vec();
        for b in &mut garbled[4..16] {
            *b = 0xFF;
        }
        let frames = [
            hello,
            write(2, &garbled),
            frame(Header::request(Op::Held, 3, 7, 0, 0), &[]),
        ];
        let replies = replies_on_one_connection(&server.addr, &frames);
        assert_eq!(replies[0].0.features(), FEATURE_PACKED);
        let (h, msg) = &replies[1];
        let msg = std::str::from_utf8(msg).unwrap();
        assert_eq!(h.status(), Ok(Status::BadRequest), "{msg}");
        assert!(
            msg.starts_with("the packed pages do not unpack; nothing was stored"),
            "{msg}"
        );
        assert_eq!(replies[2].0.page(), 32, "nothing was stored");
        assert_eq!(server.ctx.pages_written_back(), 0);
        let mut back = vec![0u8; 2 * PAGE_SIZE];
        peer.read(7, 0, &mut back).unwrap();
        assert_pattern(0, &back);
    }

    #[test]
    fn refusals_keep_the_connection_open() {
        let server = Running::start(40);
        let mut peer = server.peer();
        let mut page = vec![0u8; PAGE_SIZE];
        assert_eq!(
            remote_status(peer.fetch(9, 0, &mut page)).0,
            Status::UnknownVm
        );
        assert_eq!(remote_status(peer.held(9)).0, Status::UnknownVm);
        assert_eq!(
            remote_status(peer.write_back(9, 0, &page)).0,
            Status::UnknownVm
        );
        let (status, message) = remote_status(peer.load(9));
        assert_eq!(status, Status::LoadFailed);
        assert_eq!(
            message,
            "cannot look up VM 9: the coordinator knows no VM 9"
        );
        peer.load(7).unwrap();
        // 40 pages of room, 32 used: 9 more do not fit.
        let nine = vec![1u8; 9 * PAGE_SIZE];
        let (status, message) = remote_status(peer.write_back(7, 40, &nine));
        assert_eq!(status, Status::NoCapacity);
        assert!(message.contains("9 more pages"), "{message}");
        assert!(!peer.is_poisoned());
        peer.read(7, 0, &mut page).unwrap();
        assert_pattern(0, &page);
        assert_eq!(server.ctx.bad_frames(), 0);
    }

    /// Writes `bytes` on a fresh connection and returns everything the server sends until
    /// it closes, or `None` if it is still open after `wait`.
    fn raw_exchange(addr: &str, bytes: &[u8], close_after: bool) -> Option<Vec<u8>> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        if close_after {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => Some(out),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Some(out),
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }

    fn error_reply(bytes: &[u8]) -> (Header, String) {
        let (h, msg) = pagemesh_protocol::parse(bytes, Direction::Response).unwrap();
        assert!(msg.len() <= MAX_MESSAGE_LEN);
        (h, String::from_utf8(msg.to_vec()).unwrap())
    }

    #[test]
    fn bad_input_never_disturbs_other_connections() {
        let server = Running::start(100);
        let mut good = server.peer();
        good.load(7).unwrap();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut next = 0u64;
        let mut check_good = |good: &mut TcpPeer| {
            good.read(7, next % 32, &mut page).unwrap();
            assert_pattern(next % 32, &page);
            next += 1;
        };
        check_good(&mut good);

        // Random garbage of header size and more: BadRequest, request id 0, then closed.
        let mut garbage = [0u8; 300];
        for (i, b) in garbage.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(97).wrapping_add(13);
        }
        let out = raw_exchange(&server.addr, &garbage, false).unwrap();
        let (h, msg) = error_reply(&out);
        assert_eq!(h.status(), Ok(Status::BadRequest));
        assert_eq!(h.request_id(), 0);
        assert!(msg.contains("magic"), "{msg}");
        assert_eq!(out.len(), h.frame_len(), "one reply, then close");
        check_good(&mut good);

        // A valid header with the wrong magic.
        let mut wrong = Header::request(Op::Held, 5, 7, 0, 0).to_bytes();
        wrong[..4].copy_from_slice(b"HTTP");
        let (h, _) = error_reply(&raw_exchange(&server.addr, &wrong, false).unwrap());
        assert_eq!(h.status(), Ok(Status::BadRequest));
        check_good(&mut good);

        // A version 1 client: Unsupported, echoing the request id, then closed.
        let mut v1 = Header::request(Op::Held, 6, 7, 0, 0).to_bytes();
        v1[4] = 1;
        let (h, msg) = error_reply(&raw_exchange(&server.addr, &v1, false).unwrap());
        assert_eq!((h.status(), h.request_id()), (Ok(Status::Unsupported), 6));
        assert!(msg.contains("version 1"), "{msg}");
        check_good(&mut good);

        // A truncated frame after a Hello, then close: nothing to answer but the Hello.
        let fetch = Header::request(Op::WriteBack, 7, 7, 0, 2);
        let hello = hello_frame(1, 9, b"");
        let mut cut = hello.clone();
        cut.extend_from_slice(&fetch.to_bytes());
        cut.extend_from_slice(&[0u8; 5000]);
        let out = raw_exchange(&server.addr, &cut, true).unwrap();
        let (h, _) = pagemesh_protocol::parse(&out, Direction::Response).unwrap();
        assert_eq!((h.op(), h.status()), (Ok(Op::Hello), Ok(Status::Ok)));
        assert_eq!(out.len(), h.frame_len(), "nothing after the Hello's reply");
        // The same WriteBack without a Hello is refused at its header, and closed.
        let (h, msg) = error_reply(&raw_exchange(&server.addr, &cut[hello.len()..], true).unwrap());
        assert_eq!(h.status(), Ok(Status::Unauthenticated), "{msg}");
        assert_eq!(
            raw_exchange(&server.addr, &cut[..20], true).unwrap(),
            Vec::<u8>::new()
        );
        check_good(&mut good);

        // An oversized payload length: refused before anything is read, then closed.
        let huge = Header::request(Op::WriteBack, 8, 7, 0, 1).with_payload_len(u32::MAX);
        let (h, msg) = error_reply(&raw_exchange(&server.addr, huge.as_bytes(), false).unwrap());
        assert_eq!((h.status(), h.request_id()), (Ok(Status::BadRequest), 8));
        assert!(msg.contains("limit"), "{msg}");
        check_good(&mut good);

        // A payload length that does not match the count: refused, then closed.
        let mismatch = Header::request(Op::Fetch, 9, 7, 0, 1).with_payload_len(4096);
        let mut frame = mismatch.to_bytes().to_vec();
        frame.extend_from_slice(&[0u8; 4096]);
        let (h, _) = error_reply(&raw_exchange(&server.addr, &frame, false).unwrap());
        assert_eq!((h.status(), h.request_id()), (Ok(Status::BadRequest), 9));
        check_good(&mut good);

        assert_eq!(server.ctx.bad_frames(), 7);
        assert_eq!(server.ctx.auth_refusals(), 1);
        assert_eq!(server.ctx.store.held(7).unwrap(), 32);
    }

    /// Sends each frame on one connection and reads one reply per frame; panics if the
    /// server closes first.
    fn replies_on_one_connection(addr: &str, frames: &[Vec<u8>]) -> Vec<(Header, Vec<u8>)> {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut replies = Vec::new();
        for frame in frames {
            s.write_all(frame).unwrap();
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let h = Header::peek(&head).unwrap();
            let mut payload = vec![0u8; h.payload_len() as usize];
            s.read_exact(&mut payload).unwrap();
            let mut whole = head.to_vec();
            whole.extend_from_slice(&payload);
            assert_eq!(
                pagemesh_protocol::check(&whole, Direction::Response),
                Ok(whole.len())
            );
            replies.push((h, payload));
        }
        replies
    }

    /// A keyless Hello frame of session `session` and `cluster`, as node CLIENT.
    fn hello_frame(id: u64, session: u64, cluster: &[u8]) -> Vec<u8> {
        let mut payload = session.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0x11; NONCE_LEN]);
        payload.extend_from_slice(cluster);
        let h = Header::request(Op::Hello, id, 0, u64::from(CLIENT), 0)
            .with_payload_len(payload.len() as u32);
        frame(h, &payload)
    }

    /// A frame of `header` and `payload`, checksum included.
    fn frame(header: Header, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; header.frame_len()];
        pagemesh_protocol::encode_frame(&header, payload, &mut out).unwrap();
        out
    }

    #[test]
    fn a_write_back_with_a_bad_checksum_stores_nothing() {
        let server = Running::start(100);
        let mut peer = server.peer();
        peer.load(7).unwrap();
        let pages = [0xC3u8; 2 * PAGE_SIZE];
        // Over held pages (0, 1) and onto pages not held (40, 41); one bit of the payload
        // flipped after the checksum was computed.
        let mut frames = vec![hello_frame(10, 5, b"")];
        for (id, first) in [(1, 0), (2, 40)] {
            let mut f = frame(Header::request(Op::WriteBack, id, 7, first, 2), &pages);
            f[HEADER_LEN + PAGE_SIZE + 17] ^= 0x04;
            frames.push(f);
        }
        // And a good checksum with the payload intact but the checksum field damaged.
        let mut f = frame(Header::request(Op::WriteBack, 3, 7, 40, 2), &pages);
        f[38] ^= 0x80;
        frames.push(f);
        // The connection is still usable: the next request is answered.
        frames.push(frame(Header::request(Op::Held, 4, 7, 0, 0), &[]));
        let mut replies = replies_on_one_connection(&server.addr, &frames);
        assert_eq!(replies.remove(0).0.status(), Ok(Status::Ok));
        for (h, msg) in &replies[..3] {
            let msg = std::str::from_utf8(msg).unwrap();
            assert_eq!(h.status(), Ok(Status::BadRequest), "{msg}");
            assert_eq!(h.op(), Ok(Op::WriteBack));
            assert!(msg.starts_with("payload checksum mismatch"), "{msg}");
        }
        assert_eq!(
            replies
                .iter()
                .map(|(h, _)| h.request_id())
                .collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(replies[3].0.status(), Ok(Status::Ok));
        assert_eq!(replies[3].0.page(), 32, "nothing was stored");
        assert_eq!(server.ctx.pages_written_back(), 0);
        assert_eq!(server.ctx.bad_frames(), 3);
        let mut back = vec![0u8; 2 * PAGE_SIZE];
        peer.read(7, 0, &mut back).unwrap();
        assert_pattern(0, &back);
        assert_eq!(peer.held(7).unwrap(), 32);
    }

    #[test]
    fn a_hello_from_another_cluster_is_refused() {
        let server = Running::start_in("a", 100);
        let err = server.connect("b").unwrap_err();
        let (status, message) = remote_status(Err::<(), _>(err));
        assert_eq!(status, Status::WrongCluster);
        assert_eq!(message, "node 2 is in cluster 'a', not 'b'");

        // The same cluster, or none on either side, is accepted.
        let (status, _) = remote_status(server.connect("a").unwrap().held(7));
        assert_eq!(status, Status::UnknownVm, "a usable connection");
        server.connect("").unwrap();
        let open = Running::start_in("", 100);
        open.connect("b").unwrap();
        open.connect("").unwrap();

        // On the wire: the reply carries the server's name; a refusal keeps the connection,
        // a name that is not UTF-8 is a bad request, and one over 64 bytes closes it.
        let hello = |id, cluster: &[u8]| hello_frame(id, 77, cluster);
        let replies = replies_on_one_connection(
            &server.addr,
            &[
                hello(1, b"b"),
                hello(2, b"\xff\xfe"),
                hello(3, b"a"),
                hello(4, b""),
            ],
        );
        assert_eq!(replies[0].0.status(), Ok(Status::WrongCluster));
        assert_eq!(replies[1].0.status(), Ok(Status::BadRequest));
        assert_eq!(replies[1].1, b"the cluster name is not UTF-8");
        let (h, payload) = &replies[2];
        assert_eq!((h.status(), h.page()), (Ok(Status::Ok), u64::from(ME)));
        assert_eq!(&payload[NONCE_LEN..], b"a");
        // Once introduced, a connection cannot say Hello again.
        assert_eq!(replies[3].0.status(), Ok(Status::BadRequest));
        assert_eq!(replies[3].1, b"this connection has said Hello already");
        let long = hello(5, &[b'x'; 65]);
        let (h, msg) = error_reply(&raw_exchange(&server.addr, &long, false).unwrap());
        assert_eq!(h.status(), Ok(Status::BadRequest));
        assert!(msg.contains("at most 64"), "{msg}");
        assert_eq!(server.ctx.bad_frames(), 1);

        let long = ServerContext::new(ME, PageStore::new(1), |_| Err("no VMs".into()))
            .with_cluster("x".repeat(65));
        assert!(matches!(long, Err(ServerError::ClusterTooLong(65))));
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER_KEY: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn keyed(key: Option<&[u8]>) -> Credentials {
        let c = Credentials::keyless(CLUSTER);
        match key {
            Some(k) => c.with_key(Arc::new(Keyring::from_secret(k))),
            None => c,
        }
    }

    fn connect_keyed(server: &Running, key: Option<&[u8]>) -> Result<TcpPeer, TransportError> {
        TcpPeer::connect_with(CLIENT, &keyed(key), ME, &server.addr, TcpOptions::default())
    }

    #[test]
    fn only_a_client_with_the_key_is_served() {
        let server = Running::start_with(CLUSTER, Some(KEY), 100);
        let mut good = connect_keyed(&server, Some(KEY)).unwrap();
        assert_eq!(good.load(7).unwrap(), 32);
        let mut page = vec![0u8; PAGE_SIZE];
        good.read(7, 3, &mut page).unwrap();
        assert_pattern(3, &page);
        let served = server.ctx.pages_served();

        // No key, another key: refused at the handshake, nothing served.
        let err = connect_keyed(&server, None).unwrap_err();
        assert!(
            matches!(err, TransportError::KeyRequired { node: ME }),
            "{err}"
        );
        let err = connect_keyed(&server, Some(OTHER_KEY)).unwrap_err();
        let (status, message) = remote_status(Err::<(), _>(err));
        assert_eq!(status, Status::Unauthenticated);
        assert!(message.contains("cluster key does not match"), "{message}");
        // A client with a key refuses a server without one.
        let open = Running::start_in(CLUSTER, 100);
        let err = connect_keyed(&open, Some(KEY)).unwrap_err();
        assert!(
            matches!(err, TransportError::PeerHasNoKey { node: ME }),
            "{err}"
        );

        // Skipping Auth after the Hello: refused, no page bytes, closed.
        let fetch = frame(Header::request(Op::Read, 2, 7, 0, 1), &[]);
        let mut bytes = hello_frame(1, 5, CLUSTER.as_bytes());
        bytes.extend_from_slice(&fetch);
        let out = raw_exchange(&server.addr, &bytes, false).unwrap();
        let (h, _) = pagemesh_protocol::parse(&out, Direction::Response).unwrap();
        assert_eq!(
            h.auth_scheme(),
            Ok(pagemesh_protocol::AuthScheme::ClusterKey)
        );
        let (h, msg) = error_reply(&out[h.frame_len()..]);
        assert_eq!(
            (h.op(), h.status()),
            (Ok(Op::Read), Ok(Status::Unauthenticated))
        );
        assert!(msg.contains("Auth first"), "{msg}");
        assert_eq!(
            out.len(),
            2 * HEADER_LEN + NONCE_LEN + CLUSTER.len() + msg.len()
        );
        // And without even a Hello.
        let (h, msg) = error_reply(&raw_exchange(&server.addr, &fetch, false).unwrap());
        assert_eq!(h.status(), Ok(Status::Unauthenticated));
        assert!(msg.contains("Hello first"), "{msg}");
        assert_eq!(server.ctx.pages_served(), served);
        assert_eq!(server.ctx.auth_refusals(), 3);
        // The good client was never disturbed.
        good.read(7, 4, &mut page).unwrap();
        assert_pattern(4, &page);
    }

    #[test]
    fn a_replayed_handshake_is_refused() {
        let server = Running::start_with(CLUSTER, Some(KEY), 100);
        let ring = Keyring::from_secret(KEY);
        // Record a good handshake by hand: the client's Hello and Auth.
        let client_nonce = Nonce([7; NONCE_LEN]);
        let hello = |nonce: &Nonce| {
            let mut payload = 42u64.to_le_bytes().to_vec();
            payload.extend_from_slice(&nonce.0);
            payload.extend_from_slice(CLUSTER.as_bytes());
            let h = Header::request(Op::Hello, 1, 0, u64::from(CLIENT), 0)
                .with_payload_len(payload.len() as u32);
            frame(h, &payload)
        };
        let auth = |proof: &[u8]| {
            frame(
                Header::request(Op::Auth, 2, 0, 0, 0).with_payload_len(PROOF_LEN as u32),
                proof,
            )
        };
        let handshake = |s: &mut TcpStream| -> (Header, Vec<u8>) {
            s.write_all(&hello(&client_nonce)).unwrap();
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let h = Header::peek(&head).unwrap();
            let mut payload = vec![0u8; h.payload_len() as usize];
            s.read_exact(&mut payload).unwrap();
            (h, payload)
        };
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (_, payload) = handshake(&mut s);
        let server_nonce = Nonce(payload[..NONCE_LEN].try_into().unwrap());
        let transcript = Transcript {
            client: u64::from(CLIENT),
            server: u64::from(ME),
            session: 42,
            cluster: CLUSTER.as_bytes(),
            client_nonce: &client_nonce,
            server_nonce: &server_nonce,
        };
        let recorded = auth(&ring.client_proof(&transcript));
        let replies = {
            s.write_all(&recorded).unwrap();
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            Header::peek(&head).unwrap()
        };
        assert_eq!(replies.status(), Ok(Status::Ok), "the original handshake");
        drop(s);
        // Replayed on a new connection: the server's nonce is new, so the proof is wrong.
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (_, payload) = handshake(&mut s);
        assert_ne!(&payload[..NONCE_LEN], &server_nonce.0, "a fresh nonce");
        s.write_all(&recorded).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let (h, msg) = error_reply(&out);
        assert_eq!(h.status(), Ok(Status::Unauthenticated), "{msg}");
        assert_eq!(out.len(), h.frame_len(), "refused, then closed");
        assert_eq!(server.ctx.auth_refusals(), 1);
    }

    #[test]
    fn an_unknown_op_is_refused_and_skipped() {
        let server = Running::start(100);
        let mut s = TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Op 99 with a 10-byte payload, then a zero-count Fetch, then a valid Hello.
        let mut unknown = Header::request(Op::Held, 1, 7, 0, 0)
            .with_payload_len(10)
            .to_bytes();
        unknown[5] = 99;
        let zero = Header::request(Op::Fetch, 2, 7, 0, 0);
        let mut out = unknown.to_vec();
        out.extend_from_slice(&[0xEE; 10]);
        out.extend_from_slice(zero.as_bytes());
        out.extend_from_slice(&hello_frame(3, 5, b""));
        s.write_all(&out).unwrap();

        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        let mut replies = Vec::new();
        while replies.len() < 3 {
            let n = s.read(&mut buf[have..]).unwrap();
            assert_ne!(n, 0, "the server closed the connection");
            have += n;
            while let Ok(len) = pagemesh_protocol::check(&buf[..have], Direction::Response) {
                replies.push(Header::peek(&buf).unwrap());
                buf.copy_within(len..have, 0);
                have -= len;
            }
        }
        assert_eq!(
            (replies[0].op_byte(), replies[0].status()),
            (99, Ok(Status::Unsupported))
        );
        assert_eq!(
            (replies[1].request_id(), replies[1].status()),
            (2, Ok(Status::BadRequest))
        );
        assert_eq!(
            (replies[2].request_id(), replies[2].status()),
            (3, Ok(Status::Ok))
        );
        assert_eq!(replies[2].page(), u64::from(ME));
        assert_eq!(server.ctx.bad_frames(), 2);
    }

    #[test]
    fn connections_past_the_limit_are_refused_with_a_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ctx = ServerContext::new(ME, PageStore::new(1), |_| Err("no VMs".into()))
            .with_max_connections(2);
        let ctx = Arc::new(ctx);
        let shutdown = ShutdownSignal::new();
        let thread = serve(listener, Arc::clone(&ctx), shutdown.clone()).unwrap();
        let peer = || TcpPeer::connect(CLIENT, "", ME, &addr, Duration::from_secs(5));
        let (a, b) = (peer().unwrap(), peer().unwrap());
        let (status, message) = remote_status(peer().map(|_| ()));
        assert_eq!(status, Status::NoCapacity);
        assert!(message.contains("limit of 2 connections"), "{message}");
        assert_eq!(ctx.stats().connections_refused, 1);
        // A slot freed is a slot again.
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ctx.open_connections() > 1 {
            assert!(std::time::Instant::now() < deadline);
            thread::sleep(Duration::from_millis(10));
        }
        peer().unwrap();
        drop(b);
        shutdown.trigger();
        thread.join().unwrap();
    }

    #[test]
    fn shutdown_closes_connections_and_joins() {
        let mut server = Running::start(100);
        let mut idle = server.peer();
        let mut busy = server.peer();
        busy.load(7).unwrap();
        assert_eq!(server.ctx.open_connections(), 2);
        server.stop();
        assert_eq!(server.ctx.open_connections(), 0);
        assert_eq!(server.ctx.connections(), 2);
        assert!(idle.held(7).is_err());
        assert!(busy.held(7).is_err());
        assert!(server.connect(CLUSTER).is_err());
    }

    #[test]
    fn many_clients_fetch_disjoint_pages() {
        let server = Running::start(100);
        server.peer().load(7).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let mut peer = server.peer();
                thread::spawn(move || {
                    let mut page = vec![0u8; PAGE_SIZE];
                    for p in (t * 8)..(t * 8 + 8) {
                        peer.fetch(7, p, &mut page).unwrap();
                        assert_pattern(p, &page);
                    }
                    // Each fetch acknowledged the one before; the last needs its own.
                    assert!(peer.ack_pending());
                    peer.acknowledge().unwrap();
                    assert!(!peer.ack_pending());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(server.ctx.store.held(7).unwrap(), 0);
        assert_eq!(server.ctx.pages_claimed(), 32);
    }

    /// The frames in `bytes`, split and checked as replies.
    fn split_replies(mut bytes: &[u8]) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = pagemesh_protocol::check(bytes, Direction::Response).unwrap();
            let h = Header::peek(bytes).unwrap();
            out.push((h, bytes[HEADER_LEN..len].to_vec()));
            bytes = &bytes[len..];
        }
        out
    }

    #[test]
    fn idle_connections_are_closed_and_the_client_comes_back() {
        let ctx = ServerContext::new(ME, PageStore::new(100), |_| Ok(vm7()))
            .with_cluster(CLUSTER.to_owned())
            .unwrap()
            .with_idle_timeout(Some(Duration::from_millis(200)));
        let server = Running::serving(ctx);
        let mut control = pagemesh_transport::ControlPlane::new(CLIENT, Duration::from_secs(5));
        control.add(Box::new(server.peer()));
        assert_eq!(control.ask(ME, |p| p.load(7)).unwrap(), 32);
        assert_eq!(server.ctx.open_connections(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.ctx.open_connections() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle connection stayed open"
            );
            thread::sleep(Duration::from_millis(20));
        }
        // The next request finds the connection closed, reconnects and is answered.
        assert_eq!(control.ask(ME, |p| p.held(7)).unwrap(), 32);
        assert_eq!(server.ctx.connections(), 2);
    }

    #[test]
    fn a_connection_is_served_over_any_stream() {
        let ctx = ServerContext::new(ME, PageStore::new(100), |_| Ok(vm7()))
            .with_cluster(CLUSTER.to_owned())
            .unwrap();
        let mut script = hello_frame(1, 5, CLUSTER.as_bytes());
        script.extend(frame(Header::request(Op::Load, 2, 7, 0, 0), &[]));
        script.extend(frame(Header::request(Op::Fetch, 3, 7, 4, 2), &[]));
        let mut stream = ScriptedStream::new(&script);
        serve_connection(&mut stream, "127.0.0.1:9".parse().unwrap(), &ctx);
        let replies = split_replies(&stream.output);
        assert_eq!(replies.len(), 3);
        assert!(replies.iter().all(|(h, _)| h.status() == Ok(Status::Ok)));
        assert_eq!(replies[1].0.page(), 32);
        assert_pattern(4, &replies[2].1);
        assert_eq!(ctx.pages_served(), 2);
        // Keyed, the same script gets its Hello answered and its Load refused, unread.
        let keyed = ServerContext::new(ME, PageStore::new(100), |_| Ok(vm7()))
            .with_cluster(CLUSTER.to_owned())
            .unwrap()
            .with_keyring(Keyring::from_secret(&[7; 32]));
        let mut stream = ScriptedStream::new(&script);
        serve_stream(&mut stream, "127.0.0.1:9".parse().unwrap(), &keyed);
        let replies = split_replies(&stream.output);
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].0.status(), Ok(Status::Unauthenticated));
        assert_eq!(keyed.pages_served(), 0);
        assert_eq!(keyed.auth_refusals(), 1);
    }

    #[test]
    fn a_fetch_lends_until_acknowledged_and_can_be_asked_again() {
        let server = Running::start(100);
        server.peer().load(7).unwrap();
        let hello = |id| hello_frame(id, 0xABCD, b"");
        let fetch = |id, page, ack| {
            frame(
                Header::request(Op::Fetch, id, 7, page, 1).with_ack(ack),
                &[],
            )
        };
        let ack = |id, ack| frame(Header::request(Op::Ack, id, 0, 0, 0).with_ack(ack), &[]);
        // A Fetch whose reply the client never uses (as if it were lost): lent, not freed.
        let replies = replies_on_one_connection(&server.addr, &[hello(1), fetch(2, 3, 0)]);
        assert_eq!(replies[1].0.status(), Ok(Status::Ok));
        assert_eq!(server.ctx.store.held(7).unwrap(), 32);
        assert_eq!(server.ctx.pages_claimed(), 0);
        // The same session, on a new connection, asks again and gets the page; its next
        // request acknowledges both loans, which free the page once.
        let replies = replies_on_one_connection(
            &server.addr,
            &[hello(3), fetch(4, 3, 0), fetch(5, 4, 4), ack(6, 5)],
        );
        assert!(replies.iter().all(|(h, _)| h.status() == Ok(Status::Ok)));
        assert_pattern(3, &replies[1].1);
        assert_eq!(server.ctx.store.held(7).unwrap(), 30);
        assert_eq!(server.ctx.pages_claimed(), 2);
        // Another session's acknowledgement frees nothing of this one's.
        let mut peer = server.peer();
        let mut page = vec![0u8; PAGE_SIZE];
        peer.fetch(7, 6, &mut page).unwrap();
        let replies = replies_on_one_connection(&server.addr, &[hello(7), ack(8, 100)]);
        assert_eq!(replies[1].0.status(), Ok(Status::Ok));
        assert_eq!(server.ctx.store.held(7).unwrap(), 30);
        peer.acknowledge().unwrap();
        assert_eq!(server.ctx.store.held(7).unwrap(), 29);
        // Releasing the VM drops its loans with its pages.
        peer.fetch(7, 8, &mut page).unwrap();
        assert_eq!(server.peer().release(7).unwrap(), 29);
        assert_eq!(server.ctx.store.lent(), 0);
    }
}
