//! [`TcpPeer`]: the page protocol over one blocking TCP connection to a peer's page server.
//!
//! The fetch path makes no heap allocation: the request header is encoded on the stack and
//! sent with one `write`, the reply header is read into a stack array, and the pages are read
//! straight into the caller's buffer, whose CRC32C is then checked in place. Only error paths
//! allocate (the peer's message).
//!
//! Connecting sends a Hello with this node's id, the peer's session id and the cluster name,
//! and checks the answer: the server must be the node asked for, and in the same cluster
//! unless either side has none. The session id is random, chosen once per `TcpPeer`, and kept
//! across [`TcpPeer::reconnect`]: the server lends fetched pages to the session
//! ([`pagemesh_protocol::Op::Fetch`]), and every request carries the acknowledgement of the
//! last Fetch that succeeded, which lets the server free what it lent. A Fetch whose reply
//! is lost is simply asked again after a reconnect: the pages are still there.
//!
//! Where the server has a cluster key (its Hello reply says so), the client proves it holds
//! the same key with an Auth over both sides' fresh nonces, and checks the server's proof in
//! return ([`Credentials`], `pagemesh-auth`); a client with a key refuses a server without
//! one, and a server with a key serves nothing to a client without it.
//!
//! Every read and write has a timeout (5 s by default, [`TcpOptions`]) so that a dead peer
//! turns into an error instead of hanging the pager; [`PeerControl::load`], which may read a
//! whole image on the peer, waits longer.
//!
//! # Poisoning
//!
//! After an I/O error, a close, a malformed reply (a payload failing its checksum included) or
//! a reply out of turn the byte stream can no longer be trusted (a late reply may still be on
//! its way), so the connection is *poisoned*: every later call fails at once with an error of
//! the same kind, without touching the socket, until [`TcpPeer::reconnect`] dials again. So is
//! a connection whose Hello failed (another node, another cluster, a refusal), since it leads
//! to a server this node must not use. Reconnecting is left to the caller (the
//! [`TransportManager`](crate::TransportManager) retries with backoff), which knows whether
//! a request may be repeated: Fetch, Read, Held and Ack may, a WriteBack may (it stores the
//! same bytes again), a Load or a Release should be judged by the caller. A refusal
//! ([`TransportError::Remote`]) of any request but Hello leaves the connection healthy.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};
use pagemesh_auth::{Keyring, Nonce, Transcript};
use pagemesh_protocol::{
    self, AuthScheme, Direction, FEATURE_PACKED, FrameError, HEADER_LEN, HELLO_REQUEST_FIXED,
    Header, MAX_CLUSTER_LEN, MAX_MESSAGE_LEN, MAX_RUN_BYTES, MAX_RUN_PAGES, NONCE_LEN, Op, PACKED,
    PROOF_LEN, SESSION_LEN, Status, packed,
};
use zerocopy::IntoBytes;

use super::{PageSource, PeerControl, Run, TransportError};
use crate::compress::{Chooser, Compression};
use crate::tls::Conn;

/// Default read and write timeout of a connection.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for a peer to answer [`Op::Load`].
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time allowed to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most runs [`TcpPeer`] sends in one batch (one write, then the replies in order); longer
/// batches go out in pieces of this many.
pub const MAX_BATCH: usize = 16;

/// Default time a fetch waits for the reply without sleeping.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Reads what has arrived of the next frame into `buf` without blocking, polling for up to
/// `spin` until something has, and returns the number of bytes read: 0 when nothing came in
/// time, or when the stream ended or failed (the caller's blocking read then waits, or
/// reports the end or the error). Polling keeps this thread's CPU awake: on machines whose
/// idle CPUs halt into a hypervisor, waking one costs more than a round trip on loopback
/// (docs/benchmarks.md). The poll is the read itself, so a frame that is there costs one
/// syscall, not a peek and then a read.
pub fn spin_read(stream: &TcpStream, buf: &mut [u8], spin: Duration) -> usize {
    if spin.is_zero() || buf.is_empty() {
        return 0;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    let start = std::time::Instant::now();
    loop {
        // SAFETY: a non-blocking read of at most `buf.len()` bytes into `buf`, which is
        // exclusively borrowed, from a socket the caller owns.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            // Bytes, or 0 at the end of the stream (the blocking read sees it too).
            return n.unsigned_abs();
        }
        let err = io::Error::last_os_error().kind();
        let waiting = matches!(err, io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
        if !waiting || start.elapsed() >= spin {
            return 0;
        }
        // Poll, but give way: any thread that is ready to run on this CPU (the other
        // memory node's server thread, the vCPU) runs first. A plain busy loop holds the CPU
        // until the scheduler's slice ends, which with two pollers on two cores made
        // remote faults three times slower.
        // SAFETY: sched_yield has no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// Timeouts of a [`TcpPeer`]. All must be non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Time allowed to establish the connection (per resolved address).
    pub connect_timeout: Duration,
    /// Read and write timeout of every request but Load.
    pub io_timeout: Duration,
    /// Time allowed for the peer to answer a Load.
    pub load_timeout: Duration,
    /// Time to wait for a reply awake (polling) before sleeping; zero never polls.
    pub spin: Duration,
    /// Whether runs travel packed (`--compress`), where the server agrees [default: off].
    pub compression: Compression,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io_timeout: DEFAULT_IO_TIMEOUT,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            spin: DEFAULT_SPIN,
            // A library default: the node's `--compress` says `auto` unless told otherwise.
            compression: Compression::Off,
        }
    }
}

/// Who a node says it is when it dials a peer: its cluster (`""`: none) and the cluster key
/// it proves membership with (`None`: it has none, and only keyless servers serve it).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The cluster name sent in Hello.
    pub cluster: String,
    /// The cluster key.
    pub key: Option<Arc<Keyring>>,
    /// TLS for the connection (`None`: plain TCP); see [`crate::tls`].
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Credentials {
    /// Credentials of a node of `cluster` without a key.
    pub fn keyless(cluster: &str) -> Self {
        Credentials {
            cluster: cluster.to_owned(),
            key: None,
            tls: None,
        }
    }

    /// These credentials with `key`.
    #[must_use]
    pub fn with_key(mut self, key: Arc<Keyring>) -> Self {
        self.key = Some(key);
        self
    }

    /// These credentials dialling over TLS with `config` ([`crate::tls::Tls::client`]).
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// A connection to one peer's page server, speaking [`pagemesh_protocol`] over TCP.
#[derive(Debug)]
pub struct TcpPeer {
    local: NodeId,
    credentials: Credentials,
    peer: NodeId,
    addr: String,
    options: TcpOptions,
    stream: Conn,
    next_id: u64,
    poison: Option<Poison>,
    /// The session the server lends fetched pages to; the same across reconnections.
    session: u64,
    /// The id of the last Fetch that succeeded: every request carries it as its `ack`.
    ack: u64,
    /// The highest `ack` the server is known to have received (a reply came back).
    acked: u64,
    /// Set while the server has agreed to packed runs (its Hello reply said so).
    packing: Option<Packing>,
}

/// What a connection that may pack runs keeps: a chooser for the runs it reads and one for
/// those it writes back (timed apart: their costs differ), and buffers allocated once.
#[derive(Debug)]
struct Packing {
    chooser: Chooser,
    writes: Chooser,
    /// Where a packed reply's payload is read before it is unpacked.
    incoming: Box<[u8]>,
    /// A batch of write-backs' packed payloads.
    outgoing: Vec<u8>,
    /// One page's trial compression.
    scratch: Box<[u8]>,
}

impl Packing {
    fn new(mode: Compression) -> Self {
        Packing {
            chooser: Chooser::new(mode),
            writes: Chooser::new(mode),
            incoming: vec![0u8; MAX_RUN_BYTES].into_boxed_slice(),
            outgoing: Vec::new(),
            scratch: vec![0u8; packed::SCRATCH_LEN].into_boxed_slice(),
        }
    }
}

/// A session id no other `TcpPeer` of this or another process is likely to pick: std's
/// per-process random hasher keys, over the process id and the clock.
fn new_session() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::hash::RandomState::new().hash_one((std::process::id(), now)) | 1
}

/// Why a connection is unusable, kept to fail later calls with the same kind of error.
#[derive(Clone, Debug)]
enum Poison {
    Io(io::ErrorKind),
    Closed,
    Malformed(FrameError),
    Unexpected(&'static str),
    /// The TLS session failed.
    Tls {
        addr: String,
        reason: String,
    },
    /// The server refused the Hello.
    Refused {
        status: Status,
        message: String,
    },
    /// The server is in another cluster.
    WrongCluster {
        ours: String,
        theirs: String,
    },
}

impl Poison {
    /// The poison an error leaves, if it leaves one. A refusal does not, except of a Hello
    /// ([`Poison::of_hello`]).
    fn of(err: &TransportError) -> Option<Poison> {
        match err {
            TransportError::Io { source, .. } => Some(Poison::Io(source.kind())),
            TransportError::Closed { .. } => Some(Poison::Closed),
            TransportError::Malformed { source, .. } => Some(Poison::Malformed(*source)),
            TransportError::Unexpected { what, .. } => Some(Poison::Unexpected(what)),
            TransportError::Tls { addr, reason, .. } => Some(Poison::Tls {
                addr: addr.clone(),
                reason: reason.clone(),
            }),
            TransportError::WrongCluster { ours, theirs, .. } => Some(Poison::WrongCluster {
                ours: ours.clone(),
                theirs: theirs.clone(),
            }),
            _ => None,
        }
    }

    /// The poison a failed Hello leaves: every failure does, since the connection was never
    /// introduced.
    fn of_hello(err: &TransportError) -> Poison {
        match err {
            TransportError::Remote {
                status, message, ..
            } => Poison::Refused {
                status: *status,
                message: message.clone(),
            },
            other => Poison::of(other).unwrap_or(Poison::Unexpected("the hello failed")),
        }
    }

    fn to_error(&self, node: NodeId) -> TransportError {
        match self {
            Poison::Io(kind) => TransportError::Io {
                node,
                source: io::Error::new(*kind, "the connection failed earlier; reconnect"),
            },
            Poison::Closed => TransportError::Closed { node },
            Poison::Malformed(source) => TransportError::Malformed {
                node,
                source: *source,
            },
            Poison::Unexpected(what) => TransportError::Unexpected { node, what },
            Poison::Tls { addr, reason } => TransportError::Tls {
                node,
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Poison::Refused { status, message } => TransportError::Remote {
                node,
                status: *status,
                message: message.clone(),
            },
            Poison::WrongCluster { ours, theirs } => TransportError::WrongCluster {
                node,
                ours: ours.clone(),
                theirs: theirs.clone(),
            },
        }
    }
}

impl TcpPeer {
    /// Connects to `peer`'s page server at `addr` (`host:port`) within `timeout`, with the
    /// default I/O timeouts, and introduces `local_node` of `cluster` to it (`""`: no
    /// cluster).
    ///
    /// Fails with [`TransportError::Unexpected`] if the server there is not node `peer`, with
    /// [`TransportError::WrongCluster`] if it says it is in a cluster other than `cluster`
    /// (when both have one), and with [`TransportError::Remote`] if it refuses the Hello
    /// ([`Status::WrongCluster`] when it finds the clusters differ).
    pub fn connect(
        local_node: NodeId,
        cluster: &str,
        peer: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let options = TcpOptions {
            connect_timeout: timeout,
            ..TcpOptions::default()
        };
        Self::connect_with(
            local_node,
            &Credentials::keyless(cluster),
            peer,
            addr,
            options,
        )
    }

    /// [`TcpPeer::connect`] with credentials (a cluster key) and every timeout given.
    pub fn connect_with(
        local_node: NodeId,
        credentials: &Credentials,
        peer: NodeId,
        addr: &str,
        options: TcpOptions,
    ) -> Result<Self, TransportError> {
        let cluster = &credentials.cluster;
        if cluster.len() > MAX_CLUSTER_LEN {
            return Err(TransportError::ClusterTooLong(cluster.len()));
        }
        let stream = open(peer, addr, &options, credentials)?;
        let mut me = TcpPeer {
            local: local_node,
            credentials: credentials.clone(),
            peer,
            addr: addr.to_owned(),
            options,
            stream,
            next_id: 1,
            poison: None,
            session: new_session(),
            ack: 0,
            acked: 0,
            packing: None,
        };
        match me.hello() {
            Ok(()) => Ok(me),
            Err(e) => Err(refused_after_handshake(e, credentials, peer, addr)),
        }
    }

    /// Drops the connection and dials the peer again (same address and options), clearing
    /// any poison, and says Hello with the same session. Request ids keep increasing across
    /// reconnections, and the next request acknowledges what the old connection fetched.
    pub fn reconnect(&mut self) -> Result<(), TransportError> {
        self.stream = open(self.peer, &self.addr, &self.options, &self.credentials)?;
        self.poison = None;
        // Whether the server saw the last acknowledgement is unknown: send it again.
        self.acked = 0;
        self.hello()
    }

    /// Whether the server agreed to packed runs, and this end packs them now (always with
    /// `--compress on`, where it measured faster with `auto`).
    pub fn packs(&self) -> bool {
        self.packing.as_ref().is_some_and(|p| p.chooser.chosen())
    }

    /// Whether a Fetch has succeeded whose acknowledgement the server has not received yet
    /// (see [`PageSource::acknowledge`]).
    pub fn ack_pending(&self) -> bool {
        self.ack > self.acked
    }

    /// Whether an earlier error left the connection unusable (see the module docs).
    pub fn is_poisoned(&self) -> bool {
        self.poison.is_some()
    }

    /// The address this peer was dialled at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node id this side introduces itself with.
    pub fn local_node(&self) -> NodeId {
        self.local
    }

    /// The cluster name this side introduces itself with (`""`: none).
    pub fn cluster(&self) -> &str {
        &self.credentials.cluster
    }

    /// Introduces this node and checks who answers. Any failure poisons the connection: the
    /// stream may be fine, but it leads to a server this node must not use.
    fn hello(&mut self) -> Result<(), TransportError> {
        let result = self.try_hello();
        if let Err(e) = &result {
            self.poison = Some(Poison::of_hello(e));
        }
        result
    }

    fn try_hello(&mut self) -> Result<(), TransportError> {
        let node = self.peer;
        // One allocation per connection, so that `exchange` can borrow `self` mutably.
        let ours = self.credentials.cluster.clone();
        let key = self.credentials.key.clone();
        let client_nonce = Nonce::fresh().map_err(|_| TransportError::NoRandom)?;
        // The session id, the nonce, then the cluster name (at most MAX_CLUSTER_LEN, checked
        // by connect_with).
        let mut hello = [0u8; HELLO_REQUEST_FIXED + MAX_CLUSTER_LEN];
        hello[..SESSION_LEN].copy_from_slice(&self.session.to_le_bytes());
        hello[SESSION_LEN..HELLO_REQUEST_FIXED].copy_from_slice(&client_nonce.0);
        hello[HELLO_REQUEST_FIXED..HELLO_REQUEST_FIXED + ours.len()]
            .copy_from_slice(ours.as_bytes());
        let mut theirs = [0u8; NONCE_LEN + MAX_CLUSTER_LEN];
        // The Hello's `vm` carries the features offered.
        let offer = match self.options.compression {
            Compression::Off => 0,
            Compression::On | Compression::Auto => FEATURE_PACKED,
        };
        let reply = self.exchange(
            Op::Hello,
            offer,
            u64::from(self.local),
            0,
            &hello[..HELLO_REQUEST_FIXED + ours.len()],
            &mut theirs,
        )?;
        if reply.features() & !offer != 0 {
            return Err(TransportError::Unexpected {
                node,
                what: "the server accepted a feature this node did not offer",
            });
        }
        match reply.features() & FEATURE_PACKED != 0 {
            true => {
                let mode = self.options.compression;
                self.packing.get_or_insert_with(|| Packing::new(mode));
            }
            false => self.packing = None,
        }
        if reply.page() != u64::from(node) {
            return Err(TransportError::Unexpected {
                node,
                what: "the server there is another node",
            });
        }
        // exchange() checked that the payload fits `theirs`; check() that it holds the nonce
        // and that the scheme is known.
        let (server_nonce, name) = theirs[..reply.payload_len() as usize].split_at(NONCE_LEN);
        let server_nonce = Nonce(server_nonce.try_into().unwrap_or_default());
        let scheme = reply
            .auth_scheme()
            .map_err(|source| TransportError::Malformed { node, source })?;
        let Ok(theirs) = std::str::from_utf8(name) else {
            return Err(TransportError::Unexpected {
                node,
                what: "the server's cluster name is not UTF-8",
            });
        };
        if !ours.is_empty() && !theirs.is_empty() && theirs != ours {
            return Err(TransportError::WrongCluster {
                node,
                ours,
                theirs: theirs.to_owned(),
            });
        }
        match (scheme, key) {
            (AuthScheme::None, None) => Ok(()),
            (AuthScheme::None, Some(_)) => Err(TransportError::PeerHasNoKey { node }),
            (AuthScheme::ClusterKey, None) => Err(TransportError::KeyRequired { node }),
            (AuthScheme::ClusterKey, Some(key)) => {
                let transcript = Transcript {
                    client: u64::from(self.local),
                    server: u64::from(node),
                    session: self.session,
                    cluster: ours.as_bytes(),
                    client_nonce: &client_nonce,
                    server_nonce: &server_nonce,
                };
                let proof = key.client_proof(&transcript);
                let mut theirs = [0u8; PROOF_LEN];
                self.exchange(Op::Auth, 0, 0, 0, &proof, &mut theirs)?;
                if key.check_server(&transcript, &theirs) {
                    Ok(())
                } else {
                    Err(TransportError::BadPeerProof { node })
                }
            }
        }
    }

    /// Sends one request with payload `out` and reads its reply; the reply's payload goes into
    /// `into`, whose length must be the payload an OK reply carries (for Hello: at most).
    /// Poisons the connection on errors that leave the stream out of step.
    fn exchange(
        &mut self,
        op: Op,
        vm: VmId,
        page: u64,
        count: u32,
        out: &[u8],
        into: &mut [u8],
    ) -> Result<Header, TransportError> {
        if let Some(poison) = &self.poison {
            return Err(poison.to_error(self.peer));
        }
        let request_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut request = Header::request(op, request_id, vm, page, count);
        let packed = matches!(op, Op::Fetch | Op::Read) && self.asks_packed();
        if packed {
            request = request.with_packed();
        }
        if matches!(op, Op::Hello | Op::Auth) {
            // The handshake's payloads: at most HELLO_REQUEST_FIXED + MAX_CLUSTER_LEN bytes.
            // No acknowledgement before the handshake is done.
            request = request.with_payload_len(out.len() as u32);
        } else {
            request = request.with_ack(self.ack);
        }
        if op == Op::RdmaConnect {
            request = request.with_payload_len(out.len() as u32);
        }
        debug_assert_eq!(request.payload_len() as usize, out.len());
        let request = request.with_checksum(out);
        // The clock is read only where `--compress auto` may time the request.
        let began = self.packing.is_some().then(Instant::now);
        let result = self.round_trip(&request, out, into);
        if let Some(began) = began
            && result.is_ok()
        {
            self.took(op, packed, into.len() / PAGE_SIZE, began);
        }
        let fetched = (matches!(op, Op::Fetch | Op::Claim) && result.is_ok()).then_some(request_id);
        self.settle(request.ack(), fetched, result.as_ref().err());
        result
    }

    /// Whether the next Fetch or Read asks for a packed reply.
    fn asks_packed(&self) -> bool {
        self.packing.as_ref().is_some_and(|p| p.chooser.packed())
    }

    /// Books what a request of `op` over `pages` begun at `began` took, for `--compress
    /// auto`: reads (Fetch, Read) and write-backs each to their chooser.
    fn took(&mut self, op: Op, packed: bool, pages: usize, began: Instant) {
        let Some(p) = self.packing.as_mut() else {
            return;
        };
        let (chooser, what) = match op {
            Op::Fetch | Op::Read => (&mut p.chooser, "read from"),
            Op::WriteBack => (&mut p.writes, "written back to"),
            _ => return,
        };
        if let Some((packed_ns, plain_ns)) = chooser.took(packed, pages, began.elapsed()) {
            // At most once a trial (every few thousand requests), off the common path.
            tracing::debug!(
                node = self.peer,
                "runs {what} node {} now travel {} (--compress auto: packed {:.1} µs a \
                 page against plain {:.1})",
                self.peer,
                if chooser.chosen() { "packed" } else { "plain" },
                f64::from(packed_ns) / 1000.0,
                f64::from(plain_ns) / 1000.0
            );
        }
    }

    /// Books what requests that carried the acknowledgement `ack_sent` came to: `fetched` is
    /// the id of the last of them that was a Fetch and succeeded, `failure` what stopped
    /// them, if anything. A reply of any status means the server read the requests (and
    /// their acknowledgement), and the succeeded Fetch is acknowledged by the next request;
    /// any other failure may leave the stream out of step, so it poisons the connection.
    fn settle(&mut self, ack_sent: u64, fetched: Option<u64>, failure: Option<&TransportError>) {
        match failure {
            None | Some(TransportError::Remote { .. }) => {
                self.acked = self.acked.max(ack_sent);
                if let Some(id) = fetched {
                    self.ack = self.ack.max(id);
                }
            }
            Some(err) => {
                if let Some(poison) = Poison::of(err) {
                    self.poison = Some(poison);
                }
            }
        }
    }

    fn round_trip(
        &mut self,
        request: &Header,
        out: &[u8],
        into: &mut [u8],
    ) -> Result<Header, TransportError> {
        let sent = if out.is_empty() {
            self.stream.write_all(request.as_bytes())
        } else {
            write_all_vectored(
                &mut self.stream,
                &mut [IoSlice::new(request.as_bytes()), IoSlice::new(out)],
            )
        };
        sent.map_err(|e| self.io_error(e))?;
        self.receive(request, into)
    }

    fn io_error(&self, source: io::Error) -> TransportError {
        stream_error(self.peer, &self.addr, source)
    }

    /// Reads the reply to `request` (sent already; the replies to earlier requests read), its
    /// payload into `into`, whose length must be the payload an OK reply carries (for Hello:
    /// at most).
    fn receive(&mut self, request: &Header, into: &mut [u8]) -> Result<Header, TransportError> {
        let node = self.peer;
        let addr = &self.addr;
        let io_error = |source: io::Error| stream_error(node, addr, source);
        // Wait for the answer awake for a little while before sleeping in read(): on hosts
        // where an idle CPU halts into the outer hypervisor, the wake-up from that sleep
        // costs more than the whole round trip on loopback (docs/benchmarks.md).
        let mut head = [0u8; HEADER_LEN];
        let got = self.stream.spin_read(&mut head, self.options.spin);
        self.stream.read_exact(&mut head[got..]).map_err(io_error)?;
        match pagemesh_protocol::check(&head, Direction::Response) {
            Ok(_) | Err(FrameError::Incomplete) => {}
            Err(source) => return Err(TransportError::Malformed { node, source }),
        }
        let reply: Header = zerocopy::transmute!(head);
        // An error with op 0 and request id 0 answers the connection rather than a request
        // (a server at its connection limit, or one that could not read the header).
        let about_connection =
            reply.op_byte() == 0 && reply.request_id() == 0 && reply.status() != Ok(Status::Ok);
        if !about_connection && reply.op_byte() & !PACKED != request.op_byte() & !PACKED {
            return Err(TransportError::Unexpected {
                node,
                what: "the reply is for another op",
            });
        }
        // Only a Fetch or Read that asked for it may be answered packed (check() allows the
        // bit on their replies only).
        if reply.is_packed() && reply.status() == Ok(Status::Ok) && !request.is_packed() {
            return Err(TransportError::Unexpected {
                node,
                what: "a packed reply to a request that did not ask for one",
            });
        }
        if !about_connection && reply.request_id() != request.request_id() {
            return Err(TransportError::Unexpected {
                node,
                what: "the reply is for another request",
            });
        }
        let len = reply.payload_len() as usize;
        let malformed = |source| TransportError::Malformed { node, source };
        match reply.status() {
            Ok(Status::Ok) if reply.is_packed() => {
                // check() bounded the payload below `count` plain pages; the request asked
                // for `into.len()` of them.
                let Some(incoming) = self.packing.as_mut().map(|p| &mut p.incoming) else {
                    return Err(TransportError::Unexpected {
                        node,
                        what: "a packed reply on a connection that did not agree to them",
                    });
                };
                if len >= into.len() || reply.count() as usize * PAGE_SIZE != into.len() {
                    return Err(TransportError::Unexpected {
                        node,
                        what: "the reply carries a payload of the wrong size",
                    });
                }
                let payload = &mut incoming[..len];
                self.stream.read_exact(payload).map_err(io_error)?;
                reply.verify_checksum(payload).map_err(malformed)?;
                packed::unpack(payload, into).map_err(|e| malformed(FrameError::BadPacked(e)))?;
                Ok(reply)
            }
            Ok(Status::Ok) => {
                // A Hello's cluster name may be shorter than `into`; pages fill it exactly.
                let fits = if request.op() == Ok(Op::Hello) {
                    len <= into.len()
                } else {
                    len == into.len()
                };
                if !fits {
                    return Err(TransportError::Unexpected {
                        node,
                        what: "the reply carries a payload of the wrong size",
                    });
                }
                let payload = &mut into[..len];
                self.stream.read_exact(payload).map_err(io_error)?;
                reply.verify_checksum(payload).map_err(malformed)?;
                Ok(reply)
            }
            Ok(status) => {
                // check() bounded the message by MAX_MESSAGE_LEN.
                let mut message = [0u8; MAX_MESSAGE_LEN];
                let message = &mut message[..len.min(MAX_MESSAGE_LEN)];
                self.stream.read_exact(message).map_err(io_error)?;
                reply.verify_checksum(message).map_err(malformed)?;
                Err(TransportError::Remote {
                    node,
                    status,
                    message: String::from_utf8_lossy(message).into_owned(),
                })
            }
            Err(source) => Err(malformed(source)),
        }
    }

    /// Sends one request per run (`op` Fetch, Read or WriteBack, with `out[i]` as run `i`'s
    /// pages for a WriteBack) in one write, then reads the replies in order, each Fetch's or
    /// Read's pages into `into[i]`, setting `filled[i]` when they arrived. Every request carries the same acknowledgement; the replies to the
    /// Fetches that succeed are acknowledged by the next request. A refusal of one run
    /// ([`TransportError::Remote`]) does not stop the others; the first one is returned
    /// after every reply is read, and the connection stays usable. Any other failure
    /// poisons it (the caller reconnects and sends the batch again: both ops may be
    /// repeated).
    fn batch(
        &mut self,
        op: Op,
        vm: VmId,
        firsts: &[u64],
        out: &[&[u8]],
        into: &mut [&mut [u8]],
        filled: &mut [bool; MAX_BATCH],
    ) -> Result<(), TransportError> {
        *filled = [false; MAX_BATCH];
        if let Some(poison) = &self.poison {
            return Err(poison.to_error(self.peer));
        }
        let n = firsts.len();
        debug_assert!(n <= MAX_BATCH);
        let first_id = self.next_id;
        let mut headers = [Header::request(op, 0, 0, 0, 0); MAX_BATCH];
        // A Fetch or Read asks for packed replies, and write-backs are packed (below), as
        // their choosers say.
        let ask_packed = op != Op::WriteBack && self.asks_packed();
        let pack_writes =
            op == Op::WriteBack && self.packing.as_ref().is_some_and(|p| p.writes.packed());
        let mut pages = 0;
        for (i, &first) in firsts.iter().enumerate() {
            let len = if op == Op::WriteBack {
                out[i].len()
            } else {
                into[i].len()
            };
            let count = run_pages(len)?;
            pages += count as usize;
            let payload: &[u8] = if op == Op::WriteBack { out[i] } else { &[] };
            headers[i] = Header::request(op, first_id + i as u64, vm, first, count)
                .with_ack(self.ack)
                .with_checksum(payload);
            if ask_packed {
                headers[i] = headers[i].with_packed();
            }
        }
        // Packed write-backs: each run that shrinks goes out packed, from a buffer the
        // connection keeps (taken out of `self` while the batch is sent).
        let mut outgoing = Vec::new();
        let mut packed_out: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        let out = if pack_writes && let Some(p) = self.packing.as_mut() {
            outgoing = std::mem::take(&mut p.outgoing);
            let total: usize = out.iter().map(|o| o.len()).sum();
            if outgoing.len() < total {
                outgoing.resize(total, 0);
            }
            // Where each run's packed form is in `outgoing`; a run that does not shrink goes
            // as it is.
            let mut spans = [None; MAX_BATCH];
            let mut at = 0;
            for (i, run) in out.iter().enumerate() {
                let dst = &mut outgoing[at..at + run.len()];
                if let Some(len) = packed::pack(run, dst, &mut p.scratch) {
                    spans[i] = Some((at, len));
                    at += len;
                }
            }
            for (i, span) in spans[..n].iter().enumerate() {
                packed_out[i] = match *span {
                    Some((at, len)) => {
                        let payload = &outgoing[at..at + len];
                        headers[i] = headers[i]
                            .with_packed()
                            .with_payload_len(len as u32)
                            .with_checksum(payload);
                        payload
                    }
                    None => out[i],
                };
            }
            &packed_out[..n]
        } else {
            out
        };
        self.next_id = self.next_id.wrapping_add(n as u64);
        let ack_sent = self.ack;
        let began = self.packing.is_some().then(Instant::now);
        let result = self.send_and_receive_batch(op, &headers[..n], out, into, filled);
        if let Some(p) = self.packing.as_mut()
            && op == Op::WriteBack
            && outgoing.capacity() > 0
        {
            p.outgoing = outgoing;
        }
        match result {
            Ok(fetched) => {
                if let Some(began) = began {
                    self.took(op, ask_packed || pack_writes, pages, began);
                }
                self.settle(ack_sent, fetched, None);
                Ok(())
            }
            Err((fetched, e)) => {
                self.settle(ack_sent, fetched, Some(&e));
                Err(e)
            }
        }
    }

    /// The wire part of [`TcpPeer::batch`]; returns the id of the last Fetch that succeeded
    /// (with the error, when one stopped it).
    #[allow(
        clippy::type_complexity,
        reason = "the error side carries what succeeded before it"
    )]
    fn send_and_receive_batch(
        &mut self,
        op: Op,
        headers: &[Header],
        out: &[&[u8]],
        into: &mut [&mut [u8]],
        filled: &mut [bool; MAX_BATCH],
    ) -> Result<Option<u64>, (Option<u64>, TransportError)> {
        let sent = if op == Op::WriteBack {
            let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
            for (i, h) in headers.iter().enumerate() {
                slices[2 * i] = IoSlice::new(h.as_bytes());
                slices[2 * i + 1] = IoSlice::new(out[i]);
            }
            write_all_vectored(&mut self.stream, &mut slices[..2 * headers.len()])
        } else {
            self.stream.write_all(headers.as_bytes())
        };
        sent.map_err(|e| (None, self.io_error(e)))?;
        let mut last_ok = None;
        let mut refused = None;
        for (i, h) in headers.iter().enumerate() {
            let into: &mut [u8] = if matches!(op, Op::WriteBack | Op::Claim) {
                &mut []
            } else {
                &mut *into[i]
            };
            match self.receive(h, into) {
                Ok(_) => {
                    filled[i] = true;
                    if matches!(op, Op::Fetch | Op::Claim) {
                        last_ok = Some(h.request_id());
                    }
                }
                Err(e @ TransportError::Remote { .. }) => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err((last_ok, e)),
            }
        }
        match refused {
            Some(e) => Err((last_ok, e)),
            None => Ok(last_ok),
        }
    }
}

/// What a failed read or write of the connection to `node` at `addr` means: the end of the
/// stream, a TLS failure (the server refused our certificate after the handshake: TLS 1.3
/// servers check it then), or an I/O error.
fn stream_error(node: NodeId, addr: &str, source: io::Error) -> TransportError {
    if let Some(cause) = crate::tls::tls_cause(&source) {
        return TransportError::Tls {
            node,
            addr: addr.to_owned(),
            reason: cause.to_string(),
        };
    }
    match source.kind() {
        io::ErrorKind::UnexpectedEof => TransportError::Closed { node },
        _ => TransportError::Io { node, source },
    }
}

/// Dials `addr` and, with TLS in `credentials`, runs the TLS handshake over the socket,
/// checking the server's certificate against the host of `addr`.
fn open(
    peer: NodeId,
    addr: &str,
    options: &TcpOptions,
    credentials: &Credentials,
) -> Result<Conn, TransportError> {
    let stream = dial(peer, addr, options)?;
    let Some(config) = &credentials.tls else {
        return Ok(Conn::Plain(stream));
    };
    let failed = |reason: String| TransportError::Tls {
        node: peer,
        addr: addr.to_owned(),
        reason,
    };
    // The host part of `host:port` (an IPv6 address in brackets loses them).
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| failed(format!("{host:?} is not a host name or address: {e}")))?;
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| failed(e.to_string()))?;
    let mut tls = Box::new(rustls::StreamOwned::new(conn, stream));
    match crate::tls::handshake(&mut *tls) {
        Ok(()) => Ok(Conn::Tls(tls)),
        Err(e) => match crate::tls::tls_cause(&e) {
            Some(cause) => Err(failed(cause.to_string())),
            // The peer closed or reset during the handshake: most often a server that
            // refused our certificate (its alert may not reach us) or speaks no TLS.
            None if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
            ) =>
            {
                Err(failed(format!(
                    "the server closed the connection during the handshake ({e})"
                )))
            }
            None => Err(TransportError::Io {
                node: peer,
                source: e,
            }),
        },
    }
}

/// The first Hello's error `e`, read as a TLS refusal when it can only be one: a TLS 1.3
/// server checks the client's certificate after the client's handshake has finished, so a
/// refusal reaches the client as the server closing before its first reply, and its alert
/// is often lost to the reset. Only for the first connection: on a reconnection the same
/// close is more likely a server that died, which is worth retrying.
fn refused_after_handshake(
    e: TransportError,
    credentials: &Credentials,
    peer: NodeId,
    addr: &str,
) -> TransportError {
    let closed = match &e {
        TransportError::Closed { .. } => true,
        TransportError::Io { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    if credentials.tls.is_none() || !closed {
        return e;
    }
    let detail = match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    TransportError::Tls {
        node: peer,
        addr: addr.to_owned(),
        reason: format!(
            "the server closed the connection right after the handshake, most often because \
             it refused our certificate ({detail})"
        ),
    }
}

/// Connects to the first address `addr` resolves to that answers, and sets the socket up.
fn dial(peer: NodeId, addr: &str, options: &TcpOptions) -> Result<TcpStream, TransportError> {
    let failed = |source: io::Error| TransportError::Connect {
        node: peer,
        addr: addr.to_owned(),
        source,
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for sock in addr.to_socket_addrs().map_err(failed)? {
        match TcpStream::connect_timeout(&sock, options.connect_timeout) {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(failed)?;
                stream
                    .set_read_timeout(Some(options.io_timeout))
                    .map_err(failed)?;
                stream
                    .set_write_timeout(Some(options.io_timeout))
                    .map_err(failed)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(failed(last))
}

/// Pages in a run of `len` bytes, if `len` is a valid run length.
pub(crate) fn run_pages(len: usize) -> Result<u32, TransportError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(TransportError::InvalidPageSize(len));
    }
    let pages = len / PAGE_SIZE;
    match u32::try_from(pages) {
        Ok(p) if p <= MAX_RUN_PAGES => Ok(p),
        _ => Err(TransportError::RunTooLong(pages)),
    }
}

/// `write_all` over several buffers, so that a header and its payload leave in one system
/// call when the socket takes them (std's `write_all_vectored` is unstable).
pub(crate) fn write_all_vectored(
    w: &mut impl Write,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl PageSource for TcpPeer {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        let count = run_pages(dst.len())?;
        self.exchange(Op::Fetch, vm, page, count, &[], dst)
            .map(drop)
    }

    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        let count = run_pages(dst.len())?;
        self.exchange(Op::Read, vm, page, count, &[], dst).map(drop)
    }

    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError> {
        // A batch of one, which packs it where the connection packs.
        self.write_back_runs(vm, &[(page, src)])
    }

    fn fetch_runs(&mut self, vm: VmId, runs: &mut [Run<'_>]) -> Result<(), TransportError> {
        self.runs(Op::Fetch, vm, runs)
    }

    fn read_runs(&mut self, vm: VmId, runs: &mut [Run<'_>]) -> Result<(), TransportError> {
        self.runs(Op::Read, vm, runs)
    }

    fn write_back_runs(&mut self, vm: VmId, runs: &[(u64, &[u8])]) -> Result<(), TransportError> {
        for chunk in runs.chunks(MAX_BATCH) {
            let mut firsts = [0u64; MAX_BATCH];
            let mut out: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            for (i, &(first, pages)) in chunk.iter().enumerate() {
                firsts[i] = first;
                out[i] = pages;
            }
            let n = chunk.len();
            let mut unused = [false; MAX_BATCH];
            self.batch(
                Op::WriteBack,
                vm,
                &firsts[..n],
                &out[..n],
                &mut [],
                &mut unused,
            )?;
        }
        Ok(())
    }

    fn acknowledge(&mut self) -> Result<(), TransportError> {
        if !self.ack_pending() {
            return Ok(());
        }
        self.exchange(Op::Ack, 0, 0, 0, &[], &mut []).map(drop)
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        TcpPeer::reconnect(self)
    }
}

impl TcpPeer {
    /// Claims the runs `(first page, pages)` of `vm` without receiving them ([`Op::Claim`]:
    /// pages this node read itself, with one-sided RDMA), in two phases like a fetch: they
    /// are acknowledged by the next request. Sends up to [`MAX_BATCH`] requests in one write
    /// and then reads their replies. A refusal of one run does not stop the others; the
    /// first is returned at the end.
    pub fn claim_runs(&mut self, vm: VmId, runs: &[(u64, u32)]) -> Result<(), TransportError> {
        let mut first_refusal = Ok(());
        for chunk in runs.chunks(MAX_BATCH) {
            if let Some(poison) = &self.poison {
                return Err(poison.to_error(self.peer));
            }
            let n = chunk.len();
            let first_id = self.next_id;
            let mut headers = [Header::request(Op::Claim, 0, 0, 0, 0); MAX_BATCH];
            for (i, &(first, count)) in chunk.iter().enumerate() {
                if !(1..=pagemesh_protocol::MAX_RUN_PAGES).contains(&count) {
                    return Err(TransportError::InvalidPageSize(count as usize * PAGE_SIZE));
                }
                headers[i] = Header::request(Op::Claim, first_id + i as u64, vm, first, count)
                    .with_ack(self.ack)
                    .with_checksum(&[]);
            }
            self.next_id = self.next_id.wrapping_add(n as u64);
            let ack_sent = self.ack;
            let mut filled = [false; MAX_BATCH];
            match self.send_and_receive_batch(Op::Claim, &headers[..n], &[], &mut [], &mut filled) {
                Ok(claimed) => self.settle(ack_sent, claimed, None),
                Err((claimed, e)) => {
                    self.settle(ack_sent, claimed, Some(&e));
                    match e {
                        TransportError::Remote { .. } => {
                            first_refusal = first_refusal.and(Err(e));
                        }
                        e => return Err(e),
                    }
                }
            }
        }
        first_refusal
    }

    /// Connects a queue pair for one-sided reads ([`Op::RdmaConnect`]): sends this node's
    /// end and returns the one the peer made for it, which lives as long as this connection.
    /// A peer without RDMA refuses ([`TransportError::Remote`], `Unsupported`).
    pub fn rdma_connect(
        &mut self,
        ours: &pagemesh_protocol::QueuePair,
    ) -> Result<pagemesh_protocol::QueuePair, TransportError> {
        let mut theirs = [0u8; pagemesh_protocol::QUEUE_PAIR_LEN];
        self.exchange(Op::RdmaConnect, 0, 0, 0, &ours.to_bytes(), &mut theirs)?;
        pagemesh_protocol::QueuePair::from_bytes(&theirs).map_err(|source| {
            TransportError::Malformed {
                node: self.peer,
                source,
            }
        })
    }

    /// Where `count` pages of `vm` from `first` on are in the peer's page store: a slot per
    /// page, [`pagemesh_protocol::NO_SLOT`] for a page it does not hold ([`Op::Slots`]; what
    /// an RDMA reader addresses pages by, `crate::rdma::plan`). Asks in requests of at most
    /// [`pagemesh_protocol::MAX_SLOTS`] pages. Not on the fault path: it allocates.
    pub fn slots(&mut self, vm: VmId, first: u64, count: u64) -> Result<Vec<u32>, TransportError> {
        let mut slots = Vec::with_capacity(count.min(1 << 24) as usize);
        let mut bytes = Vec::new();
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(u64::from(pagemesh_protocol::MAX_SLOTS)) as u32;
            bytes.resize(n as usize * pagemesh_protocol::SLOT_BYTES as usize, 0);
            self.exchange(Op::Slots, vm, first + done, n, &[], &mut bytes)?;
            slots.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            done += u64::from(n);
        }
        Ok(slots)
    }

    /// Fetches or reads `runs` in batches of [`MAX_BATCH`], marking the runs filled; the
    /// first refusal is returned once every batch is done, any other failure at once.
    fn runs(&mut self, op: Op, vm: VmId, runs: &mut [Run<'_>]) -> Result<(), TransportError> {
        let mut first_refusal = Ok(());
        for chunk in runs.chunks_mut(MAX_BATCH) {
            let mut firsts = [0u64; MAX_BATCH];
            let mut into: [&mut [u8]; MAX_BATCH] = Default::default();
            let mut filled = [false; MAX_BATCH];
            let n = chunk.len();
            for (i, run) in chunk.iter_mut().enumerate() {
                firsts[i] = run.first;
                into[i] = &mut *run.pages;
            }
            let r = self.batch(op, vm, &firsts[..n], &[], &mut into[..n], &mut filled);
            for (run, filled) in chunk.iter_mut().zip(filled) {
                run.filled = filled;
            }
            match r {
                Err(e @ TransportError::Remote { .. }) => {
                    if first_refusal.is_ok() {
                        first_refusal = Err(e);
                    }
                }
                other => other?,
            }
        }
        first_refusal
    }
}

impl PeerControl for TcpPeer {
    fn peer(&self) -> NodeId {
        self.peer
    }

    fn load(&mut self, vm: VmId) -> Result<u64, TransportError> {
        if let Some(poison) = &self.poison {
            return Err(poison.to_error(self.peer));
        }
        let node = self.peer;
        let set = |stream: &TcpStream, t| {
            stream
                .set_read_timeout(Some(t))
                .map_err(|source| TransportError::Io { node, source })
        };
        if let Err(e) = set(self.stream.socket(), self.options.load_timeout) {
            self.poison = Poison::of(&e);
            return Err(e);
        }
        let reply = self.exchange(Op::Load, vm, 0, 0, &[], &mut []);
        if let Err(e) = set(self.stream.socket(), self.options.io_timeout) {
            self.poison = Poison::of(&e);
            return Err(e);
        }
        reply.map(|h| h.page())
    }

    fn held(&mut self, vm: VmId) -> Result<u64, TransportError> {
        self.exchange(Op::Held, vm, 0, 0, &[], &mut [])
            .map(|h| h.page())
    }

    fn release(&mut self, vm: VmId) -> Result<u64, TransportError> {
        self.exchange(Op::Release, vm, 0, 0, &[], &mut [])
            .map(|h| h.page())
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        TcpPeer::reconnect(self)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::net::TcpListener;
    use std::thread;

    use super::*;
    use pagemesh_protocol::{MAX_FRAME_LEN, encode_error, encode_frame};

    /// A one-connection fake server: answers Hello as node `id` of `cluster`, then runs
    /// `script` on each later request header (the script reads the payload, if any).
    fn fake_server(
        id: NodeId,
        cluster: &'static str,
        script: impl Fn(&Header, &mut TcpStream) + Send + 'static,
    ) -> (String, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = [0u8; HEADER_LEN];
            s.read_exact(&mut head).unwrap();
            let hello = Header::peek(&head).unwrap();
            let mut theirs = vec![0u8; hello.payload_len() as usize];
            s.read_exact(&mut theirs).unwrap();
            assert_eq!(hello.verify_checksum(&theirs), Ok(()));
            let mut payload = vec![0x5A; NONCE_LEN];
            payload.extend_from_slice(cluster.as_bytes());
            let reply = hello
                .reply(Status::Ok)
                .with_auth_scheme(AuthScheme::None)
                .with_page(id.into())
                .with_payload_len(payload.len() as u32);
            let mut frame = vec![0u8; reply.frame_len()];
            encode_frame(&reply, &payload, &mut frame).unwrap();
            s.write_all(&frame).unwrap();
            while s.read_exact(&mut head).is_ok() {
                let h = Header::peek(&head).unwrap();
                script(&h, &mut s);
            }
        });
        (addr, handle)
    }

    fn connect(cluster: &str, peer: NodeId, addr: &str) -> Result<TcpPeer, TransportError> {
        TcpPeer::connect(1, cluster, peer, addr, Duration::from_secs(2))
    }

    #[test]
    fn rejects_runs_before_sending() {
        let (addr, server) = fake_server(2, "", |_, _| panic!("nothing should be sent"));
        let mut peer = connect("", 2, &addr).unwrap();
        let mut small = [0u8; 100];
        assert!(matches!(
            peer.fetch(1, 0, &mut small),
            Err(TransportError::InvalidPageSize(100))
        ));
        assert!(matches!(
            peer.read(1, 0, &mut []),
            Err(TransportError::InvalidPageSize(0))
        ));
        let big = vec![0u8; (MAX_RUN_PAGES as usize + 1) * PAGE_SIZE];
        assert!(matches!(
            peer.write_back(1, 0, &big),
            Err(TransportError::RunTooLong(257))
        ));
        assert!(!peer.is_poisoned());
        drop(peer);
        server.join().unwrap();
    }

    #[test]
    fn wrong_node_is_unexpected() {
        let (addr, server) = fake_server(9, "", |_, _| {});
        let err = connect("", 2, &addr).unwrap_err();
        assert!(
            matches!(err, TransportError::Unexpected { node: 2, .. }),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_server_of_another_cluster_is_refused() {
        let (addr, server) = fake_server(2, "b", |_, _| {});
        let err = connect("a", 2, &addr).unwrap_err();
        assert_eq!(err.to_string(), "node 2 is in cluster 'b', not 'a'");
        assert!(matches!(
            err,
            TransportError::WrongCluster { node: 2, ref ours, ref theirs } if ours == "a" && theirs == "b"
        ));
        server.join().unwrap();
    }

    #[test]
    fn the_same_cluster_or_none_is_accepted() {
        for (ours, theirs) in [("a", "a"), ("", "b"), ("a", ""), ("", "")] {
            let (addr, server) = fake_server(2, theirs, |h, s| {
                s.write_all(h.reply(Status::Ok).with_page(3).as_bytes())
                    .unwrap();
            });
            let mut peer = connect(ours, 2, &addr).unwrap();
            assert_eq!(peer.cluster(), ours);
            assert_eq!(peer.held(1).unwrap(), 3, "{ours:?} with {theirs:?}");
            drop(peer);
            server.join().unwrap();
        }
        let long = "x".repeat(MAX_CLUSTER_LEN + 1);
        let err = connect(&long, 2, "127.0.0.1:1").unwrap_err();
        assert!(matches!(err, TransportError::ClusterTooLong(65)), "{err}");
    }

    /// Answers Reads with a page, anything else with an error reply, and damages one byte of
    /// the payload after computing its checksum.
    fn damaged_replies(h: &Header, s: &mut TcpStream) {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let n = if h.op() == Ok(Op::Read) {
            let page = [0x5Au8; PAGE_SIZE];
            let reply = h.reply(Status::Ok).with_payload_len(PAGE_SIZE as u32);
            encode_frame(&reply, &page, &mut buf).unwrap()
        } else {
            encode_error(
                &mut buf,
                h.op_byte(),
                h.request_id(),
                Status::UnknownVm,
                format_args!("VM {} is not loaded", h.vm()),
            )
        };
        buf[HEADER_LEN + 1] ^= 0x10;
        let _ = s.write_all(&buf[..n]);
    }

    /// Answers a packed Read with a packed page whose LZ4 block is garbage (its checksum
    /// computed over the garbage, so only the unpacking can tell).
    fn garbled_packed_replies(h: &Header, s: &mut TcpStream) {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert!(h.is_packed(), "the client asks for packed replies");
        let mut payload = 100u16.to_le_bytes().to_vec();
        payload.extend([0xFFu8; 100]);
        let reply = h.reply(Status::Ok).with_payload_len(payload.len() as u32);
        let n = encode_frame(&reply, &payload, &mut buf).unwrap();
        let _ = s.write_all(&buf[..n]);
    }

    #[test]
    fn a_packed_reply_that_does_not_unpack_is_an_error_not_a_page() {
        let (addr, server) = fake_server(2, "", garbled_packed_replies);
        let options = TcpOptions {
            compression: Compression::On,
            ..TcpOptions::default()
        };
        let mut peer =
            TcpPeer::connect_with(1, &Credentials::keyless(""), 2, &addr, options).unwrap();
        assert!(peer.packs());
        let mut page = vec![0u8; PAGE_SIZE];
        let err = peer.read(5, 0, &mut page).unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Malformed {
                    node: 2,
                    source: FrameError::BadPacked(packed::PackedError::Corrupt { index: 0 })
                }
            ),
            "{err:?}"
        );
        assert!(
            err.is_transient(),
            "another connection may do better: {err}"
        );
        drop(peer);
        server.join().unwrap();
    }

    #[test]
    fn a_corrupted_reply_payload_is_malformed_and_poisons() {
        for op in [Op::Read, Op::Held] {
            let (addr, server) = fake_server(2, "", damaged_replies);
            let mut peer = connect("", 2, &addr).unwrap();
            let mut page = vec![0u8; PAGE_SIZE];
            let err = match op {
                Op::Read => peer.read(5, 0, &mut page).unwrap_err(),
                _ => peer.held(5).map(drop).unwrap_err(),
            };
            assert!(
                matches!(
                    err,
                    TransportError::Malformed {
                        node: 2,
                        source: FrameError::BadChecksum { expected, actual }
                    } if expected != actual
                ),
                "{op}: {err:?}"
            );
            assert!(
                err.source()
                    .unwrap()
                    .to_string()
                    .starts_with("payload checksum mismatch")
            );
            assert!(peer.is_poisoned());
            // Later calls fail at once with the same kind of error.
            assert!(matches!(
                peer.read(5, 0, &mut page),
                Err(TransportError::Malformed {
                    source: FrameError::BadChecksum { .. },
                    ..
                })
            ));
            drop(peer);
            server.join().unwrap();
        }
    }

    #[test]
    fn connect_failure_names_the_address() {
        // Bind then drop to get a port nobody listens on.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let err = connect("", 2, &addr).unwrap_err();
        assert!(matches!(err, TransportError::Connect { node: 2, .. }));
        assert!(err.to_string().contains(&addr));
    }

    #[test]
    fn remote_refusal_keeps_the_connection_and_garbage_poisons_it() {
        let (addr, server) = fake_server(2, "", |h, s| {
            if h.op() == Ok(Op::Held) {
                let mut buf = vec![0u8; MAX_FRAME_LEN];
                let n = encode_error(
                    &mut buf,
                    h.op_byte(),
                    h.request_id(),
                    Status::UnknownVm,
                    format_args!("VM {} is not loaded", h.vm()),
                );
                s.write_all(&buf[..n]).unwrap();
            } else {
                s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n.....................")
                    .unwrap();
            }
        });
        let mut peer = connect("", 2, &addr).unwrap();
        for _ in 0..2 {
            match peer.held(5) {
                Err(TransportError::Remote {
                    node: 2,
                    status: Status::UnknownVm,
                    message,
                }) => assert_eq!(message, "VM 5 is not loaded"),
                other => panic!("{other:?}"),
            }
        }
        assert!(!peer.is_poisoned());
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(matches!(
            peer.fetch(5, 0, &mut page),
            Err(TransportError::Malformed {
                source: FrameError::BadMagic,
                ..
            })
        ));
        assert!(peer.is_poisoned());
        // Fails fast, with the same kind of error, without a round trip.
        assert!(matches!(
            peer.held(5),
            Err(TransportError::Malformed {
                source: FrameError::BadMagic,
                ..
            })
        ));
        drop(peer);
        server.join().unwrap();
    }

    #[test]
    fn a_silent_peer_times_out() {
        // Reads requests and never answers.
        let (addr, server) = fake_server(2, "", |_, _| {});
        let options = TcpOptions {
            io_timeout: Duration::from_millis(100),
            ..TcpOptions::default()
        };
        let mut peer =
            TcpPeer::connect_with(1, &Credentials::default(), 2, &addr, options).unwrap();
        let err = peer.held(1).unwrap_err();
        assert!(matches!(err, TransportError::Io { node: 2, .. }), "{err}");
        assert!(peer.is_poisoned());
        drop(peer);
        server.join().unwrap();
    }

    #[test]
    fn spin_read_reads_what_arrived_and_gives_up_in_time() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        let mut buf = [0u8; 40];
        // Nothing sent: it polls for `spin`, then leaves the waiting to the caller.
        let t = std::time::Instant::now();
        assert_eq!(spin_read(&reader, &mut buf, Duration::from_millis(20)), 0);
        assert!(t.elapsed() >= Duration::from_millis(20));
        // No polling asked for: nothing is read, even with bytes waiting.
        writer.write_all(b"0123456789").unwrap();
        assert_eq!(spin_read(&reader, &mut buf, Duration::ZERO), 0);
        // Bytes there: one read takes what has arrived, and no more than `buf` holds.
        let n = spin_read(&reader, &mut buf, Duration::from_secs(5));
        assert_eq!(&buf[..n], &b"0123456789"[..n]);
        let mut rest = vec![0u8; 10 - n];
        (&reader).read_exact(&mut rest).unwrap();
        assert_eq!([&buf[..n], &rest[..]].concat(), b"0123456789");
        writer.write_all(&[7u8; 64]).unwrap();
        let mut small = [0u8; 8];
        let t = std::time::Instant::now();
        while spin_read(&reader, &mut small, Duration::from_secs(5)) == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "the bytes never came");
        }
        assert_eq!(small, [7u8; 8]);
        let mut rest = [0u8; 56];
        (&reader).read_exact(&mut rest).unwrap();
        // The end of the stream: 0 at once, for the caller's blocking read to report.
        drop(writer);
        let t = std::time::Instant::now();
        assert_eq!(spin_read(&reader, &mut buf, Duration::from_secs(5)), 0);
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
