//! Moving pages between nodes.
//!
//! [`PageSource`] is the seam between the pager and a wire: TCP today ([`tcp`]), RDMA later.
//! It is the data plane: runs of pages fetched into the caller's buffers and written back,
//! one run or a batch of them with several requests outstanding. [`TransportManager`] holds
//! one such connection per peer node and is what the pager calls on a remote fault. The
//! control plane ([`PeerControl`], [`ControlPlane`]: load, held, release) runs on
//! connections of its own, so that a Load never sits in front of a fault. The wire format is in [`pagemesh_protocol`] and `docs/protocol.md`.
//!
//! # Failures
//!
//! A fetch claims its pages in two phases (the holder keeps them until the fetcher
//! acknowledges them), so it can be repeated. [`TransportManager`] does so: when a request
//! fails in a way a new connection may cure (an I/O error, a closed or damaged connection,
//! a reply out of turn: [`TransportError::is_transient`]), it reconnects and asks again with
//! exponential backoff ([`RetryPolicy`]), and gives up only when the peer has not answered
//! for the policy's `give_up_after` (`--peer-timeout`), with [`TransportError::GaveUp`]
//! naming the node and carrying the last failure.

pub mod compress;
pub mod local;
pub mod rdma;
pub mod tcp;
pub mod tls;

use pagemesh_api::{NodeId, VmId};

pub use pagemesh_protocol::{FrameError, MAX_RUN_PAGES, Status};

/// Errors talking to a peer's page server.
#[derive(thiserror::Error, Debug)]
pub enum TransportError {
    /// The TCP connection could not be made.
    #[error("failed to connect to node {node} at {addr}")]
    Connect {
        /// Peer node.
        node: NodeId,
        /// Its address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the connection failed (peer died, reset, timeout).
    #[error("connection to node {node} failed")]
    Io {
        /// Peer node.
        node: NodeId,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: a certificate that does not chain to the CA, a name that is
    /// not in it, a peer without TLS. Not retried: it will fail the same way.
    #[error(
        "TLS with node {node} at {addr} failed: {reason}; both nodes need certificates of the \
         cluster's CA (--tls-cert, --tls-key, --tls-ca), and the server's must name {addr}'s host"
    )]
    Tls {
        /// Peer node.
        node: NodeId,
        /// The address dialled.
        addr: String,
        /// rustls' reason.
        reason: String,
    },
    /// The peer closed the connection.
    #[error("node {node} closed the connection")]
    Closed {
        /// Peer node.
        node: NodeId,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("node {node} sent a malformed frame")]
    Malformed {
        /// Peer node.
        node: NodeId,
        /// What was wrong.
        #[source]
        source: FrameError,
    },
    /// The peer answered a different request or with a different shape than asked.
    #[error("node {node} answered out of turn: {what}")]
    Unexpected {
        /// Peer node.
        node: NodeId,
        /// What did not match.
        what: &'static str,
    },
    /// The peer's Hello reply names a cluster other than this node's.
    #[error("node {node} is in cluster '{theirs}', not '{ours}'")]
    WrongCluster {
        /// Peer node.
        node: NodeId,
        /// This node's cluster.
        ours: String,
        /// The peer's.
        theirs: String,
    },
    /// A cluster name too long for the Hello ([`pagemesh_protocol::MAX_CLUSTER_LEN`]).
    #[error("cluster name of {0} bytes is over the page protocol's limit of 64")]
    ClusterTooLong(usize),
    /// The peer has a cluster key and this node has none.
    #[error(
        "node {node} requires the cluster key; give this node the cluster's key file \
         (--cluster-key-file)"
    )]
    KeyRequired {
        /// Peer node.
        node: NodeId,
    },
    /// This node has a cluster key and the peer has none, so it cannot prove it belongs.
    #[error(
        "node {node} runs without a cluster key, so it cannot prove it belongs to the \
         cluster; refusing it (start it with --cluster-key-file)"
    )]
    PeerHasNoKey {
        /// Peer node.
        node: NodeId,
    },
    /// The peer's proof was not made with this node's key.
    #[error(
        "node {node} does not hold this node's cluster key (its proof does not match); \
         are the two nodes' key files the same?"
    )]
    BadPeerProof {
        /// Peer node.
        node: NodeId,
    },
    /// The operating system gave no random numbers for the handshake's nonce.
    #[error("the operating system gave no random numbers for the handshake")]
    NoRandom,
    /// A page of the wrong size was handed over.
    #[error("invalid page size: expected 4096, got {0}")]
    InvalidPageSize(usize),
    /// The peer refused the request.
    #[error("node {node} refused: {message} ({status:?})")]
    Remote {
        /// Peer node.
        node: NodeId,
        /// Status code it sent.
        status: Status,
        /// Its explanation.
        message: String,
    },
    /// The endpoint needs a transport this build does not have.
    #[error("cannot reach node {node}: {what} are not supported")]
    Unsupported {
        /// Peer node.
        node: NodeId,
        /// What is missing.
        what: &'static str,
    },
    /// A run of more pages than one request may carry ([`pagemesh_protocol::MAX_RUN_PAGES`]).
    #[error("a run of {0} pages is over the limit of 256 per request; split it")]
    RunTooLong(usize),
    /// No connection to this node.
    #[error("no connection to node {0}; is it registered with the coordinator?")]
    UnknownPeer(NodeId),
    /// Every home of a page failed (with replicas).
    #[error("every home of the page failed (nodes {homes})")]
    NoHomeLeft {
        /// The homes, as `1, 2`.
        homes: String,
        /// The last failure, if one was tried.
        #[source]
        last: Option<Box<TransportError>>,
    },
    /// The peer did not answer for longer than the retry policy allows.
    #[error("node {node} did not answer for {:.1} s ({attempts} reconnection attempts)", after.as_secs_f64())]
    GaveUp {
        /// Peer node.
        node: NodeId,
        /// How long it was tried.
        after: std::time::Duration,
        /// Reconnections tried.
        attempts: u32,
        /// The last failure.
        #[source]
        last: Box<TransportError>,
    },
}

/// The homes lost for one VM, shared by all its connection sets (each fault handler's, the
/// prefetcher's, the write-back thread's): one that finds a node lost spares the others
/// its wait. A generation number changes with the list, so a manager rereads it only then:
/// one atomic load per request.
#[derive(Debug, Default)]
pub struct LostHomes {
    generation: std::sync::atomic::AtomicU64,
    nodes: std::sync::Mutex<Vec<NodeId>>,
}

impl LostHomes {
    /// The lost nodes, in the order they were lost.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<NodeId>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies `change` to the list, and moves the generation on if it changed it.
    fn change(&self, change: impl FnOnce(&mut Vec<NodeId>) -> bool) {
        let mut nodes = self.lock();
        if change(&mut nodes) {
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// The nodes a write-back tried, without allocating: room for two per copy (a home and
/// its replacement); a node past that counts as tried.
#[derive(Default)]
struct Tried {
    nodes: [NodeId; 2 * pagemesh_api::MAX_REPLICAS as usize],
    len: usize,
}

impl Tried {
    /// Whether `node` was not tried yet (it is now).
    fn insert(&mut self, node: NodeId) -> bool {
        if self.nodes[..self.len].contains(&node) || self.len == self.nodes.len() {
            return false;
        }
        self.nodes[self.len] = node;
        self.len += 1;
        true
    }
}

/// `nodes` as `1, 2, 3`.
fn list(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(NodeId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl TransportError {
    /// Whether the peer was silent for a whole timeout: a read, a write or a connection
    /// attempt timed out.
    pub fn is_timeout(&self) -> bool {
        match self {
            TransportError::Io { source, .. } | TransportError::Connect { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                )
            }
            _ => false,
        }
    }

    /// Whether the peer answered that it does not hold the page.
    pub fn is_not_held(&self) -> bool {
        matches!(
            self,
            TransportError::Remote {
                status: Status::NotHeld,
                ..
            }
        )
    }

    /// Whether the failure is the peer's (it died, cannot be reached, refused the page), so
    /// that another home of the page may answer; not a request this side got wrong.
    pub fn is_peers(&self) -> bool {
        !matches!(
            self,
            TransportError::InvalidPageSize(_) | TransportError::UnknownPeer(_)
        )
    }

    /// Whether a new connection may cure the failure, so that an idempotent request is worth
    /// repeating on one: the connection failed, closed, carried a damaged frame or a reply
    /// out of turn, or could not be made. A refusal, another cluster or a request this side
    /// got wrong is not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::Io { .. }
                | TransportError::Closed { .. }
                | TransportError::Malformed { .. }
                | TransportError::Unexpected { .. }
        )
    }
}

/// How [`TransportManager`] repeats a request after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up once the peer has failed for this long (`--peer-timeout`).
    pub give_up_after: std::time::Duration,
    /// The wait before the first reconnection; it doubles after each failed one.
    pub first_backoff: std::time::Duration,
    /// The longest wait between two reconnections.
    pub max_backoff: std::time::Duration,
}

impl RetryPolicy {
    /// Retries for up to `give_up_after`, waiting 1 ms, then 2, 4, ... up to 100 ms between
    /// attempts: a cut connection is usually back within a few milliseconds, and a peer that
    /// restarts is found within 0.1 s of its return.
    pub fn for_timeout(give_up_after: std::time::Duration) -> Self {
        RetryPolicy {
            give_up_after,
            first_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(100),
        }
    }
}

/// A run of pages to fetch: `pages.len() / 4096` consecutive pages from `first`, into
/// `pages`, a caller's buffer (reused from batch to batch: the seam allocates nothing).
#[derive(Debug)]
pub struct Run<'a> {
    /// The run's first page.
    pub first: u64,
    /// Where its pages go; a non-zero multiple of 4096 bytes, at most 256 pages.
    pub pages: &'a mut [u8],
    /// Set by the source when `pages` holds the run's pages. A batch that fails part-way
    /// (one run refused, a connection lost) may still have filled others: a claimed page
    /// that was filled is lent to the caller, which must install it or lose it at the next
    /// acknowledgement, so callers install every filled run whatever the batch returned.
    pub filled: bool,
}

impl<'a> Run<'a> {
    /// A run from `first` into `pages`, not filled yet.
    pub fn new(first: u64, pages: &'a mut [u8]) -> Self {
        Run {
            first,
            pages,
            filled: false,
        }
    }
}

/// Where remote pages come from: one peer node, over one transport.
///
/// Calls block; the pager's fault handler thread makes them directly, with no async runtime
/// in between. Implementations must not allocate per call on `fetch`.
pub trait PageSource: Send {
    /// The peer this source talks to.
    fn peer(&self) -> NodeId;

    /// Fetches `dst.len() / 4096` consecutive pages of `vm` starting at `page` into `dst` and
    /// claims them, in two phases: the peer keeps them until this source acknowledges the
    /// fetch (on its next request, or [`PageSource::acknowledge`]), so a fetch whose reply
    /// was lost can be asked again. Once acknowledged, the peer no longer holds them.
    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError>;

    /// Fetches several runs of `vm` (see [`PageSource::fetch`]), each into its own buffer.
    /// A source that can does so with several requests outstanding at once (TCP: one write
    /// for every request of a batch, then the replies in order). A refusal of one run
    /// (e.g. [`Status::NotHeld`]) does not stop the others; the first is returned once all
    /// are done. By default, one [`PageSource::fetch`] after another.
    fn fetch_runs(&mut self, vm: VmId, runs: &mut [Run<'_>]) -> Result<(), TransportError> {
        one_run_after_another(runs, |run| self.fetch(vm, run.first, run.pages))
    }

    /// Reads several runs of `vm` (see [`PageSource::read`]: the peer keeps its copies),
    /// like [`PageSource::fetch_runs`]. By default, one [`PageSource::read`] after another.
    fn read_runs(&mut self, vm: VmId, runs: &mut [Run<'_>]) -> Result<(), TransportError> {
        one_run_after_another(runs, |run| self.read(vm, run.first, run.pages))
    }

    /// Hands several runs of `vm` to the peer (see [`PageSource::write_back`]), `(first
    /// page, pages)` each, with several requests outstanding where the source can. By
    /// default, one [`PageSource::write_back`] after another.
    fn write_back_runs(&mut self, vm: VmId, runs: &[(u64, &[u8])]) -> Result<(), TransportError> {
        let mut first_refusal = Ok(());
        for &(first, pages) in runs {
            match self.write_back(vm, first, pages) {
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

    /// Like [`PageSource::fetch`] but the peer keeps its copy.
    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError>;

    /// Hands `src.len() / 4096` consecutive pages of `vm` starting at `page` to the peer,
    /// which holds them from then on (eviction).
    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError>;

    /// Delivers the acknowledgement of the fetches that succeeded, if the peer may not have
    /// it yet, so that it frees the pages. Sources that claim in one step have nothing to do.
    fn acknowledge(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Drops the connection, if any, and makes a new one to the same peer. Sources without
    /// a connection have nothing to do.
    fn reconnect(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Runs `op` on every run, marking those it filled; a refusal does not stop the others
/// and the first is returned at the end; any other error stops the batch.
fn one_run_after_another(
    runs: &mut [Run<'_>],
    mut op: impl FnMut(&mut Run<'_>) -> Result<(), TransportError>,
) -> Result<(), TransportError> {
    let mut first_refusal = Ok(());
    for run in runs {
        run.filled = false;
        match op(run) {
            Ok(()) => run.filled = true,
            Err(e @ TransportError::Remote { .. }) => {
                if first_refusal.is_ok() {
                    first_refusal = Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    first_refusal
}

/// The control plane of one peer: what a compute node asks of a memory node about a whole
/// VM, on connections of its own, apart from the page traffic of [`PageSource`].
pub trait PeerControl: Send {
    /// The peer.
    fn peer(&self) -> NodeId;

    /// Asks the peer to load its share of `vm` (as placed by the coordinator); returns the
    /// number of pages it then holds for `vm`.
    fn load(&mut self, vm: VmId) -> Result<u64, TransportError>;

    /// Number of pages the peer holds for `vm` (lent pages included).
    fn held(&mut self, vm: VmId) -> Result<u64, TransportError>;

    /// Asks the peer to drop every page of `vm`; returns how many it dropped.
    fn release(&mut self, vm: VmId) -> Result<u64, TransportError>;

    /// Drops the connection, if any, and makes a new one to the same peer (see
    /// [`PageSource::reconnect`]).
    fn reconnect(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// The control connections of a node, one per peer (load, held, release).
pub struct ControlPlane {
    dialer: Dialer,
    peers: Peers<dyn PeerControl>,
}

impl ControlPlane {
    /// A control plane for node `local`, of no cluster, with no peers yet, whose connections
    /// time out after `timeout`.
    pub fn new(local: NodeId, timeout: std::time::Duration) -> Self {
        Self {
            dialer: Dialer::new(local, timeout),
            peers: Peers::default(),
        }
    }

    /// This control plane for a node with `credentials` (see
    /// [`TransportManager::with_credentials`]).
    #[must_use]
    pub fn with_credentials(mut self, credentials: tcp::Credentials) -> Self {
        self.dialer.credentials = credentials;
        self
    }

    /// Connects to `peer_id` at `endpoint` (see [`TransportManager::connect_peer`]).
    pub fn connect_peer(
        &mut self,
        peer_id: NodeId,
        endpoint: &pagemesh_api::Endpoint,
    ) -> Result<(), TransportError> {
        let peer = self.dialer.dial(peer_id, endpoint)?;
        self.peers.insert(peer_id, Box::new(peer));
        Ok(())
    }

    /// Adds an already-built peer (tests).
    pub fn add(&mut self, peer: Box<dyn PeerControl>) {
        self.peers.insert(peer.peer(), peer);
    }

    /// The control connection to `node`.
    pub fn peer(
        &mut self,
        node: NodeId,
    ) -> Result<&mut (dyn PeerControl + 'static), TransportError> {
        self.peers.get(node)
    }

    /// Nodes with a connection.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers.ids()
    }

    /// Runs `op` on the control connection to `node`; if the connection turns out to be
    /// gone (a transient failure: most often the memory node closed it after its idle
    /// timeout, or restarted), reconnects once and runs it again. Control requests are
    /// whole-VM requests that may be repeated (Load replaces what it loaded, Held reads,
    /// Release of released pages drops nothing); a peer that stays down is the error.
    pub fn ask<T>(
        &mut self,
        node: NodeId,
        mut op: impl FnMut(&mut dyn PeerControl) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let peer = self.peers.get(node)?;
        match op(peer) {
            Err(e) if e.is_transient() => {
                tracing::info!(
                    "node {node}: {}; reconnecting the control connection",
                    pagemesh_api::error_chain(&e)
                );
                peer.reconnect()?;
                op(peer)
            }
            done => done,
        }
    }
}

/// One connection per peer node, of either plane.
struct Peers<T: ?Sized>(std::collections::HashMap<NodeId, Box<T>>);

impl<T: ?Sized> Default for Peers<T> {
    fn default() -> Self {
        Peers(std::collections::HashMap::new())
    }
}

impl<T: ?Sized> Peers<T> {
    /// Keeps `peer` as the connection to `node`, replacing an older one.
    fn insert(&mut self, node: NodeId, peer: Box<T>) {
        self.0.insert(node, peer);
    }

    fn get(&mut self, node: NodeId) -> Result<&mut T, TransportError> {
        match self.0.get_mut(&node) {
            Some(p) => Ok(p.as_mut()),
            None => Err(TransportError::UnknownPeer(node)),
        }
    }

    fn ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.0.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

/// Who this node is when it connects: its id, its cluster and key, and its connections'
/// timeout.
struct Dialer {
    local: NodeId,
    credentials: tcp::Credentials,
    timeout: std::time::Duration,
    compression: compress::Compression,
    /// This node's RDMA queue pairs and slot maps, when its page traffic may use RDMA.
    rdma: Option<(
        std::sync::Arc<dyn rdma::source::Readers>,
        rdma::source::SlotMaps,
    )>,
}

impl Dialer {
    fn new(local: NodeId, timeout: std::time::Duration) -> Self {
        Dialer {
            local,
            credentials: tcp::Credentials::default(),
            timeout,
            // Control connections carry no runs; data connections say what they want
            // (`TransportManager::with_compression`).
            compression: compress::Compression::Off,
            rdma: None,
        }
    }

    /// A page source for `peer_id` at `endpoint`: over RDMA where this node and the peer
    /// both have it (the TCP connection carrying the rest), over TCP otherwise, with a
    /// warning saying why when this node has RDMA and the peer's could not be used.
    fn dial_source(
        &self,
        peer_id: NodeId,
        endpoint: &pagemesh_api::Endpoint,
    ) -> Result<Box<dyn PageSource>, TransportError> {
        let tcp = self.dial(peer_id, endpoint)?;
        let Some((readers, maps)) = &self.rdma else {
            return Ok(Box::new(tcp));
        };
        let Some(remote) = &endpoint.rdma else {
            tracing::warn!(
                node = peer_id,
                "node {peer_id} registered no RDMA endpoint: its pages come over TCP"
            );
            return Ok(Box::new(tcp));
        };
        let reader = match readers.reader() {
            Ok(r) => r,
            Err(why) => {
                tracing::warn!(
                    node = peer_id,
                    "no RDMA queue pair for node {peer_id} ({why}): its pages come over TCP"
                );
                return Ok(Box::new(tcp));
            }
        };
        match rdma::source::RdmaSource::connect(tcp, reader, remote, maps.clone(), self.timeout) {
            Ok(source) => {
                tracing::debug!(node = peer_id, "pages of node {peer_id} come over RDMA");
                Ok(Box::new(source))
            }
            Err(refused) => {
                let (tcp, why) = *refused;
                tracing::warn!(
                    node = peer_id,
                    "RDMA with node {peer_id} failed ({why}): its pages come over TCP"
                );
                Ok(Box::new(tcp))
            }
        }
    }

    /// Connects to `peer_id` at `endpoint` as this node, with every timeout of the
    /// connection `timeout` (but Load's). An endpoint of transport `rdma` is refused: even a
    /// node that reads over RDMA registers the TCP address its claims and control go to.
    fn dial(
        &self,
        peer_id: NodeId,
        endpoint: &pagemesh_api::Endpoint,
    ) -> Result<tcp::TcpPeer, TransportError> {
        match endpoint.transport {
            pagemesh_api::TransportKind::Tcp => tcp::TcpPeer::connect_with(
                self.local,
                &self.credentials,
                peer_id,
                &endpoint.address,
                tcp::TcpOptions {
                    connect_timeout: self.timeout,
                    io_timeout: self.timeout,
                    compression: self.compression,
                    ..tcp::TcpOptions::default()
                },
            ),
            pagemesh_api::TransportKind::Rdma => Err(TransportError::Unsupported {
                node: peer_id,
                what: "RDMA-only endpoints (a node reading over RDMA registers transport tcp, with an rdma field)",
            }),
        }
    }
}

/// Default time to wait for a peer before declaring it dead.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One connection per peer node; what the pager fetches through.
///
/// With [`TransportManager::with_replicas`], every page has several homes, and the node a
/// request names is the page's first home: a read or fetch goes to the next home when one
/// fails for good (after its retries, or refusing the page), and a write-back goes to every
/// home that is alive. A home that failed is left out of later requests (it is *lost*),
/// unless every other home of a page has failed too: then it is asked again, as the last
/// chance. With one copy per page, a failure is the caller's at once, as before.
pub struct TransportManager {
    dialer: Dialer,
    retry: RetryPolicy,
    reconnects: u64,
    peers: Peers<dyn PageSource>,
    replicas: Option<pagemesh_api::Replicas>,
    /// Homes that failed for good, in the order they did: this manager's copy of `shared`.
    lost: Vec<NodeId>,
    /// The VM's lost homes, and the generation of it `lost` is a copy of.
    shared: Option<(std::sync::Arc<LostHomes>, u64)>,
}

impl TransportManager {
    /// A manager for node `local`, of no cluster, with no peers yet, whose connections time
    /// out after `timeout` (to connect, and waiting for a reply) and which retries a failing
    /// peer for as long ([`RetryPolicy::for_timeout`]).
    pub fn new(local: NodeId, timeout: std::time::Duration) -> Self {
        Self {
            dialer: Dialer::new(local, timeout),
            retry: RetryPolicy::for_timeout(timeout),
            reconnects: 0,
            peers: Peers::default(),
            replicas: None,
            lost: Vec::new(),
            shared: None,
        }
    }

    /// This manager for a VM whose pages have the homes `replicas` gives them (see the
    /// type's docs), sharing its lost homes with the VM's other managers through `lost`;
    /// with one copy, nothing changes.
    #[must_use]
    pub fn with_replicas(
        mut self,
        replicas: pagemesh_api::Replicas,
        lost: std::sync::Arc<LostHomes>,
    ) -> Self {
        if replicas.copies() > 1 {
            self.replicas = Some(replicas);
            self.shared = Some((lost, 0));
        }
        self
    }

    /// Catches up with the homes the VM's other managers lost or found again.
    #[inline]
    fn sync_lost(&mut self) {
        if let Some((shared, seen)) = &mut self.shared {
            let now = shared.generation();
            if now != *seen {
                self.lost.clone_from(&shared.lock());
                *seen = now;
            }
        }
    }

    /// The homes that failed for good, in the order they did.
    pub fn lost(&self) -> &[NodeId] {
        &self.lost
    }

    /// Reconnections that succeeded since the manager was made.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// This manager for a node with `credentials`: its connections introduce it as a node
    /// of their cluster (`""`: none), refuse peers of another cluster and, with a key, prove
    /// it and demand the peer's proof.
    #[must_use]
    pub fn with_credentials(mut self, credentials: tcp::Credentials) -> Self {
        self.dialer.credentials = credentials;
        self
    }

    /// This manager's connections packing runs as `compression` says (`--compress`; the
    /// default is off), where the peer agrees.
    #[must_use]
    pub fn with_compression(mut self, compression: compress::Compression) -> Self {
        self.dialer.compression = compression;
        self
    }

    /// Connects to `peer_id` at `endpoint` for page traffic and keeps the connection,
    /// replacing an older one: TCP, and with [`TransportManager::with_rdma`] one-sided RDMA
    /// reads where the peer registered an RDMA endpoint. An endpoint whose transport is
    /// `rdma` (no TCP address at all) is refused.
    /// A peer of another cluster is refused ([`TransportError::WrongCluster`], or [`TransportError::Remote`]
    /// when the peer refuses first).
    pub fn connect_peer(
        &mut self,
        peer_id: NodeId,
        endpoint: &pagemesh_api::Endpoint,
    ) -> Result<(), TransportError> {
        let source = self.dialer.dial_source(peer_id, endpoint)?;
        self.peers.insert(peer_id, source);
        Ok(())
    }

    /// This manager reading pages with one-sided RDMA from every peer that registered an
    /// RDMA endpoint, through queue pairs from `readers`, sharing `maps` with the node's
    /// other managers ([`rdma::source::RdmaSource`]); peers without one are reached over
    /// TCP, with a warning.
    #[must_use]
    pub fn with_rdma(
        mut self,
        readers: std::sync::Arc<dyn rdma::source::Readers>,
        maps: rdma::source::SlotMaps,
    ) -> Self {
        self.dialer.rdma = Some((readers, maps));
        self
    }

    /// Adds an already-built source (tests, the local-copy benchmark).
    pub fn add_source(&mut self, source: Box<dyn PageSource>) {
        self.peers.insert(source.peer(), source);
    }

    /// The connection to `node`.
    pub fn peer(
        &mut self,
        node: NodeId,
    ) -> Result<&mut (dyn PageSource + 'static), TransportError> {
        self.peers.get(node)
    }

    /// Nodes with a connection.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        self.peers.ids()
    }

    /// Fetches (and claims) `page` of `vm` from `remote_node` into `dst`, one page,
    /// reconnecting and asking again after a transient failure (see the module docs).
    #[inline]
    pub fn fetch_page(
        &mut self,
        vm: VmId,
        page: u64,
        remote_node: NodeId,
        dst: &mut [u8],
    ) -> Result<(), TransportError> {
        if dst.len() != pagemesh_api::PAGE_SIZE {
            return Err(TransportError::InvalidPageSize(dst.len()));
        }
        self.on_homes(remote_node, |p| p.fetch(vm, page, dst))
    }

    /// Reads `page` of `vm` from `remote_node` into `dst`, one page; the node keeps its copy
    /// (it is the page's home). Retried like [`TransportManager::fetch_page`].
    #[inline]
    pub fn read_page(
        &mut self,
        vm: VmId,
        page: u64,
        remote_node: NodeId,
        dst: &mut [u8],
    ) -> Result<(), TransportError> {
        if dst.len() != pagemesh_api::PAGE_SIZE {
            return Err(TransportError::InvalidPageSize(dst.len()));
        }
        self.on_homes(remote_node, |p| p.read(vm, page, dst))
    }

    /// Fetches (and claims) several runs of `vm` from `remote_node`, each into its own
    /// buffer, with the requests of a batch outstanding together; retried like
    /// [`TransportManager::fetch_page`] (the whole batch again: fetching is idempotent).
    pub fn fetch_runs(
        &mut self,
        vm: VmId,
        remote_node: NodeId,
        runs: &mut [Run<'_>],
    ) -> Result<(), TransportError> {
        self.on_homes(remote_node, |p| p.fetch_runs(vm, runs))
    }

    /// Reads several runs of `vm` from `remote_node` (it keeps its copies), each into its
    /// own buffer, as a batch; retried like [`TransportManager::fetch_page`].
    pub fn read_runs(
        &mut self,
        vm: VmId,
        remote_node: NodeId,
        runs: &mut [Run<'_>],
    ) -> Result<(), TransportError> {
        self.on_homes(remote_node, |p| p.read_runs(vm, runs))
    }

    /// Writes several runs of `vm` back to `remote_node`, `(first page, pages)` each, with
    /// the requests of a batch outstanding together; retried like
    /// [`TransportManager::fetch_page`] (a write-back stores the same bytes again). With
    /// replicas, to every home of the runs that is alive: `Ok` means each of those has them
    /// (a home that failed is lost, and no longer counts).
    pub fn write_back_runs(
        &mut self,
        vm: VmId,
        remote_node: NodeId,
        runs: &[(u64, &[u8])],
    ) -> Result<(), TransportError> {
        let Some(replicas) = &self.replicas else {
            return self.with_retries(remote_node, |p| p.write_back_runs(vm, runs));
        };
        let homes = replicas.homes(remote_node);
        self.sync_lost();
        let mut last = None;
        let mut wrote = false;
        // Nodes tried, whatever came of it: each at most once (no allocation: a home and
        // a replacement for each copy at most).
        let mut tried = Tried::default();
        // Every live home, and in place of each lost one the next live node, which takes
        // the lost node's copies when the coordinator repairs the VM (docs/replication.md,
        // "Repair"): written to from now on, so that its copy is never older than the
        // survivors'. Again while a write loses a home, whose replacement is then new.
        loop {
            let lost_before = self.lost.len();
            let now = self
                .replicas
                .as_ref()
                .map_or(homes, |r| r.homes_without(remote_node, &self.lost));
            for &home in now.iter() {
                if !tried.insert(home) {
                    continue;
                }
                match self.with_retries(home, |p| p.write_back_runs(vm, runs)) {
                    Ok(()) => wrote = true,
                    Err(e) if !e.is_peers() => return Err(e),
                    Err(e) => {
                        self.lose(home, &e);
                        last = Some(e);
                    }
                }
            }
            if self.lost.len() == lost_before {
                break;
            }
        }
        // Only when no live node took it, the lost homes, as the last chance.
        for &home in homes.iter() {
            if wrote || !tried.insert(home) {
                continue;
            }
            match self.with_retries(home, |p| p.write_back_runs(vm, runs)) {
                Ok(()) => {
                    wrote = true;
                    self.found(home);
                }
                Err(e) if !e.is_peers() => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        match (wrote, last) {
            (true, _) => Ok(()),
            (false, last) => Err(TransportError::NoHomeLeft {
                homes: list(&homes),
                last: last.map(Box::new),
            }),
        }
    }

    /// Runs `op` on the page's first home, `first`; with replicas, on the next homes in
    /// turn after it failed for good (see the type's docs).
    #[inline]
    fn on_homes<T>(
        &mut self,
        first: NodeId,
        mut op: impl FnMut(&mut dyn PageSource) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        if self.replicas.is_none() {
            return self.with_retries(first, op);
        }
        self.sync_lost();
        let tried_first = !self.lost.contains(&first);
        if tried_first {
            match self.with_retries(first, &mut op) {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_peers() => return Err(e),
                Err(e) => self.lose(first, &e),
            }
        }
        self.fail_over(first, tried_first, &mut op)
    }

    /// Tries the homes of the page whose first home is `first` (tried already if
    /// `tried_first`): first those not lost, in order, then, as the last chance, the lost
    /// ones; each once.
    #[cold]
    fn fail_over<T>(
        &mut self,
        first: NodeId,
        tried_first: bool,
        op: &mut dyn FnMut(&mut dyn PageSource) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let homes = self
            .replicas
            .as_ref()
            .map_or(pagemesh_api::Homes::only(first), |r| r.homes(first));
        let mut tried = [false; pagemesh_api::MAX_REPLICAS as usize];
        tried[0] = tried_first;
        let mut last = None;
        for last_chance in [false, true] {
            for (i, &home) in homes.iter().enumerate() {
                if tried[i] || self.lost.contains(&home) != last_chance {
                    continue;
                }
                tried[i] = true;
                match self.with_retries(home, &mut *op) {
                    Ok(v) => {
                        self.found(home);
                        return Ok(v);
                    }
                    Err(e) if !e.is_peers() => return Err(e),
                    Err(e) => {
                        self.lose(home, &e);
                        last = Some(e);
                    }
                }
            }
            if last_chance {
                break;
            }
            // Before the lost homes' last chance: the nodes that took their copies when the
            // VM was repaired (written to since the loss, see `write_back_runs`). One that
            // does not hold the page (not repaired yet) is not lost for it.
            let now = self
                .replicas
                .as_ref()
                .map_or(homes, |r| r.homes_without(first, &self.lost));
            for &node in now.iter().filter(|n| !homes.contains(n)) {
                match self.with_retries(node, &mut *op) {
                    Ok(v) => return Ok(v),
                    Err(e) if !e.is_peers() => return Err(e),
                    Err(e) if e.is_not_held() => last = Some(e),
                    Err(e) => {
                        self.lose(node, &e);
                        last = Some(e);
                    }
                }
            }
        }
        Err(TransportError::NoHomeLeft {
            homes: list(&homes),
            last: last.map(Box::new),
        })
    }

    /// Records that `node` answered: it is not lost (any more).
    fn found(&mut self, node: NodeId) {
        if let Some(at) = self.lost.iter().position(|&n| n == node) {
            tracing::info!("node {node} answers again");
            self.lost.remove(at);
            if let Some((shared, _)) = &self.shared {
                shared.change(|nodes| {
                    let before = nodes.len();
                    nodes.retain(|&n| n != node);
                    nodes.len() != before
                });
            }
        }
    }

    /// Records that `node` failed for good with `e`.
    #[cold]
    fn lose(&mut self, node: NodeId, e: &TransportError) {
        if !self.lost.contains(&node) {
            self.lost.push(node);
            let mut first = true;
            if let Some((shared, _)) = &self.shared {
                shared.change(|nodes| {
                    first = !nodes.contains(&node);
                    if first {
                        nodes.push(node);
                    }
                    first
                });
            }
            // Said once per VM, by the first of its connection sets to find it.
            if first {
                tracing::warn!(
                    "node {node} is lost ({}); its pages come from their other homes",
                    pagemesh_api::error_chain(e)
                );
            }
        }
    }

    /// Delivers every peer's pending acknowledgement (see [`PageSource::acknowledge`]), with
    /// retries; returns the first failure after trying them all. Lost homes are left out:
    /// what they lent died with them.
    pub fn acknowledge_all(&mut self) -> Result<(), TransportError> {
        let mut first = Ok(());
        self.sync_lost();
        for node in self.peer_ids() {
            if self.lost.contains(&node) {
                continue;
            }
            let r = self.with_retries(node, |p| p.acknowledge());
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Runs `op` on the connection to `node`; after a transient failure, reconnects with
    /// backoff and runs it again, until it succeeds, fails for good, or the policy gives up.
    /// The first attempt costs nothing more than the call: the retry loop is out of line.
    #[inline]
    pub fn with_retries<T>(
        &mut self,
        node: NodeId,
        mut op: impl FnMut(&mut dyn PageSource) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        match op(self.peer(node)?) {
            Err(e) if e.is_transient() => self.retry_after(node, e, &mut op),
            done => done,
        }
    }

    #[cold]
    fn retry_after<T>(
        &mut self,
        node: NodeId,
        first: TransportError,
        op: &mut dyn FnMut(&mut dyn PageSource) -> Result<T, TransportError>,
    ) -> Result<T, TransportError> {
        let policy = self.retry;
        if self.replicas.is_some() && first.is_timeout() {
            // Silent for a whole timeout already: with other homes to ask, it is dead now,
            // not after another timeout of reconnecting (a cut link fails over within
            // --peer-timeout).
            return Err(TransportError::GaveUp {
                node,
                after: policy.give_up_after,
                attempts: 0,
                last: Box::new(first),
            });
        }
        let started = std::time::Instant::now();
        let mut delay = policy.first_backoff;
        let mut last = first;
        let mut attempts = 0u32;
        if matches!(last, TransportError::Closed { .. }) {
            // A clean close, most often the server's idle timeout: reconnect at once, quietly.
            tracing::info!("node {node} closed the connection; reconnecting");
            attempts += 1;
            let peer = self.peer(node)?;
            match peer.reconnect().and_then(|()| op(peer)) {
                Ok(v) => {
                    self.reconnects += 1;
                    return Ok(v);
                }
                Err(e) if e.is_transient() => last = e,
                Err(e) => return Err(e),
            }
        }
        tracing::warn!(
            "node {node}: {}; reconnecting",
            pagemesh_api::error_chain(&last)
        );
        loop {
            let left = policy.give_up_after.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(TransportError::GaveUp {
                    node,
                    after: started.elapsed(),
                    attempts,
                    last: Box::new(last),
                });
            }
            std::thread::sleep(delay.min(left));
            delay = (delay * 2).min(policy.max_backoff);
            attempts += 1;
            let peer = self.peer(node)?;
            match peer.reconnect().and_then(|()| op(peer)) {
                Ok(v) => {
                    self.reconnects += 1;
                    tracing::info!("node {node}: reconnected after {attempts} attempts");
                    return Ok(v);
                }
                Err(e) if e.is_transient() => last = e,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A source whose connection fails `failures` times (each call after a failure fails
    /// until it reconnects, like a poisoned TcpPeer), then works.
    struct Flaky {
        failures: u32,
        broken: bool,
        fetches: u32,
        reconnects: u32,
    }

    impl PageSource for Flaky {
        fn peer(&self) -> NodeId {
            3
        }

        fn fetch(&mut self, _: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
            self.fetches += 1;
            if self.broken || self.failures > 0 {
                self.failures = self.failures.saturating_sub(1);
                self.broken = true;
                return Err(TransportError::Closed { node: 3 });
            }
            if page == 99 {
                return Err(TransportError::Remote {
                    node: 3,
                    status: Status::NotHeld,
                    message: "page 99 is not held".into(),
                });
            }
            dst.fill(7);
            Ok(())
        }

        fn read(&mut self, _: VmId, _: u64, _: &mut [u8]) -> Result<(), TransportError> {
            unimplemented!("not used here")
        }

        fn write_back(&mut self, _: VmId, _: u64, _: &[u8]) -> Result<(), TransportError> {
            unimplemented!("not used here")
        }

        fn reconnect(&mut self) -> Result<(), TransportError> {
            self.reconnects += 1;
            self.broken = false;
            Ok(())
        }
    }

    /// A peer that is gone: every request and reconnection fails, counted.
    struct Gone {
        node: NodeId,
        calls: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl Gone {
        fn fail(&self) -> Result<(), TransportError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(TransportError::Io {
                node: self.node,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            })
        }
    }

    impl PageSource for Gone {
        fn peer(&self) -> NodeId {
            self.node
        }

        fn fetch(&mut self, _: VmId, _: u64, _: &mut [u8]) -> Result<(), TransportError> {
            self.fail()
        }

        fn read(&mut self, _: VmId, _: u64, _: &mut [u8]) -> Result<(), TransportError> {
            self.fail()
        }

        fn write_back(&mut self, _: VmId, _: u64, _: &[u8]) -> Result<(), TransportError> {
            self.fail()
        }

        fn reconnect(&mut self) -> Result<(), TransportError> {
            self.fail()
        }
    }

    #[test]
    fn with_replicas_a_lost_home_is_passed_over_and_the_others_answer() {
        let placement = pagemesh_api::Placement::interleave(vec![1, 2, 3], 1, 6).unwrap();
        let replicas = pagemesh_api::Replicas::new(&placement, 2).unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut m = TransportManager::new(0, Duration::from_millis(30))
            .with_replicas(replicas, Default::default());
        m.add_source(Box::new(Gone {
            node: 1,
            calls: calls.clone(),
        }));
        m.add_source(Box::new(local::LocalSource::with_pattern(2, 9, 6, 5)));
        m.add_source(Box::new(local::LocalSource::with_pattern(3, 9, 6, 5)));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        // Page 0's homes are 1 and 2: node 1 is tried for its timeout, lost, and node 2
        // answers.
        m.read_page(9, 0, 1, &mut page).unwrap();
        assert_eq!(m.lost(), [1]);
        let mut want = vec![0u8; pagemesh_api::PAGE_SIZE];
        pagemesh_api::pattern::fill_page(5, 0, &mut want);
        assert_eq!(page, want);
        // Lost, it is not asked again while another home answers.
        let before = calls.load(std::sync::atomic::Ordering::Relaxed);
        m.read_page(9, 3, 1, &mut page).unwrap();
        m.write_back_runs(9, 1, &[(3, &want)]).unwrap();
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "node 1 left alone"
        );
        // Page 2's homes are 3 and 1: node 3 answers first, node 1 is not needed.
        m.read_page(9, 2, 3, &mut page).unwrap();
        assert_eq!(m.lost(), [1]);
        // A write-back of page 3 (homes 1 and 2) goes to node 2 and, in node 1's place,
        // to node 3, its home once the VM is repaired.
        let newer = vec![0x5au8; pagemesh_api::PAGE_SIZE];
        m.write_back_runs(9, 1, &[(3, &newer)]).unwrap();
        for node in [2, 3] {
            page.fill(0);
            m.read_page(9, 3, node, &mut page).unwrap();
            assert_eq!(page, newer, "node {node} has the written page");
        }
    }

    #[test]
    fn when_both_homes_are_lost_the_node_that_took_their_copies_answers() {
        let placement = pagemesh_api::Placement::interleave(vec![1, 2, 3], 1, 6).unwrap();
        let replicas = pagemesh_api::Replicas::new(&placement, 2).unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut m = TransportManager::new(0, Duration::from_millis(30))
            .with_replicas(replicas, Default::default());
        for node in [1, 2] {
            m.add_source(Box::new(Gone {
                node,
                calls: calls.clone(),
            }));
        }
        m.add_source(Box::new(local::LocalSource::with_pattern(3, 9, 6, 5)));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        // Page 0's homes are 1 and 2, both gone: node 3, their replacement once the VM is
        // repaired, answers.
        m.read_page(9, 0, 1, &mut page).unwrap();
        let mut want = vec![0u8; pagemesh_api::PAGE_SIZE];
        pagemesh_api::pattern::fill_page(5, 0, &mut want);
        assert_eq!(page, want);
        assert_eq!(m.lost(), [1, 2]);
    }

    #[test]
    fn a_home_one_manager_lost_is_passed_over_by_the_others_of_its_vm() {
        let placement = pagemesh_api::Placement::interleave(vec![1, 2], 1, 4).unwrap();
        let replicas = pagemesh_api::Replicas::new(&placement, 2).unwrap();
        let lost = std::sync::Arc::new(LostHomes::default());
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let manager = || {
            let mut m = TransportManager::new(0, Duration::from_millis(30))
                .with_replicas(replicas.clone(), lost.clone());
            m.add_source(Box::new(Gone {
                node: 1,
                calls: calls.clone(),
            }));
            m.add_source(Box::new(local::LocalSource::with_pattern(2, 9, 4, 5)));
            m
        };
        let (mut a, mut b) = (manager(), manager());
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        a.read_page(9, 0, 1, &mut page).unwrap();
        assert_eq!(lost.nodes(), [1]);
        let before = calls.load(std::sync::atomic::Ordering::Relaxed);
        b.read_page(9, 0, 1, &mut page).unwrap();
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "b knew node 1 was lost without asking it"
        );
        assert_eq!(b.lost(), [1]);
    }

    #[test]
    fn with_replicas_a_page_whose_homes_all_fail_is_an_error_naming_them() {
        let placement = pagemesh_api::Placement::interleave(vec![1, 2], 1, 4).unwrap();
        let replicas = pagemesh_api::Replicas::new(&placement, 2).unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut m = TransportManager::new(0, Duration::from_millis(20))
            .with_replicas(replicas, Default::default());
        for node in [1, 2] {
            m.add_source(Box::new(Gone {
                node,
                calls: calls.clone(),
            }));
        }
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        let e = m.fetch_page(9, 0, 1, &mut page).unwrap_err();
        assert!(matches!(e, TransportError::NoHomeLeft { .. }), "{e:?}");
        assert!(
            pagemesh_api::error_chain(&e)
                .starts_with("every home of the page failed (nodes 1, 2): node 2 did not answer"),
            "{}",
            pagemesh_api::error_chain(&e)
        );
        assert_eq!(m.lost(), [1, 2]);
        // Both lost: each is asked again, as the last chance, before the next page fails.
        let before = calls.load(std::sync::atomic::Ordering::Relaxed);
        assert!(m.write_back_runs(9, 2, &[(1, &page)]).is_err());
        assert!(calls.load(std::sync::atomic::Ordering::Relaxed) > before);
    }

    fn manager(failures: u32, give_up_after: Duration) -> TransportManager {
        let mut m = TransportManager::new(0, give_up_after);
        m.add_source(Box::new(Flaky {
            failures,
            broken: false,
            fetches: 0,
            reconnects: 0,
        }));
        m
    }

    #[test]
    fn transient_failures_are_retried_on_a_new_connection() {
        let mut m = manager(3, Duration::from_secs(5));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        m.fetch_page(1, 5, 3, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 7));
        // Three failures: the first call and two retries; the third reconnection worked.
        assert_eq!(m.reconnects(), 1);
    }

    #[test]
    fn a_refusal_is_not_retried() {
        let mut m = manager(0, Duration::from_secs(5));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        let err = m.fetch_page(1, 99, 3, &mut page).unwrap_err();
        assert!(matches!(err, TransportError::Remote { .. }), "{err:?}");
        assert_eq!(m.reconnects(), 0);
    }

    #[test]
    fn a_peer_failing_for_longer_than_the_timeout_is_given_up_naming_it() {
        let mut m = manager(u32::MAX, Duration::from_millis(50));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        let started = std::time::Instant::now();
        let err = m.fetch_page(1, 5, 3, &mut page).unwrap_err();
        let took = started.elapsed();
        let TransportError::GaveUp {
            node,
            attempts,
            ref last,
            ..
        } = err
        else {
            panic!("{err:?}");
        };
        assert_eq!(node, 3);
        assert!(attempts >= 2, "{attempts} attempts");
        assert!(matches!(**last, TransportError::Closed { node: 3 }));
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(
            pagemesh_api::error_chain(&err).starts_with("node 3 did not answer for"),
            "{}",
            pagemesh_api::error_chain(&err)
        );
    }

    #[test]
    fn an_unknown_peer_is_an_error_at_once() {
        let mut m = manager(0, Duration::from_secs(5));
        let mut page = vec![0u8; pagemesh_api::PAGE_SIZE];
        assert!(matches!(
            m.fetch_page(1, 5, 4, &mut page),
            Err(TransportError::UnknownPeer(4))
        ));
    }
}
