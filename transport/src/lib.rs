//! Moving pages between nodes.
//!
//! [`PageSource`] is the seam between the pager and a wire: TCP today ([`tcp`]), RDMA later.
//! [`TransportManager`] holds one connection per peer node and is what the pager calls
//! on a remote fault. The wire format is in [`pagemesh_protocol`] and `docs/protocol.md`.

pub mod local;
pub mod tcp;

use pagemesh_api::{NodeId, VmId};

pub use pagemesh_protocol::{FrameError, Status};

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
}

/// Where remote pages come from: one peer node, over one transport.
///
/// Calls block; the pager's fault handler thread makes them directly, with no async runtime
/// in between. Implementations must not allocate per call on `fetch`.
pub trait PageSource: Send {
    /// The peer this source talks to.
    fn peer(&self) -> NodeId;

    /// Fetches `dst.len() / 4096` consecutive pages of `vm` starting at `page` into `dst` and
    /// claims them: once this returns `Ok`, the peer no longer holds them.
    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError>;

    /// Like [`PageSource::fetch`] but the peer keeps its copy.
    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError>;

    /// Hands `src.len() / 4096` consecutive pages of `vm` starting at `page` to the peer,
    /// which holds them from then on (eviction).
    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError>;

    /// Asks the peer to load its share of `vm` (as placed by the coordinator); returns the
    /// number of pages it then holds for `vm`.
    fn load(&mut self, vm: VmId) -> Result<u64, TransportError>;

    /// Number of pages the peer holds for `vm`.
    fn held(&mut self, vm: VmId) -> Result<u64, TransportError>;

    /// Asks the peer to drop every page of `vm`; returns how many it dropped.
    fn release(&mut self, vm: VmId) -> Result<u64, TransportError>;
}

/// Default time to wait for a peer before declaring it dead.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One connection per peer node; what the pager fetches through.
pub struct TransportManager {
    local: NodeId,
    cluster: String,
    timeout: std::time::Duration,
    peers: std::collections::HashMap<NodeId, Box<dyn PageSource>>,
}

impl TransportManager {
    /// A manager for node `local`, of no cluster, with no peers yet.
    pub fn new(local: NodeId, timeout: std::time::Duration) -> Self {
        Self {
            local,
            cluster: String::new(),
            timeout,
            peers: std::collections::HashMap::new(),
        }
    }

    /// This manager for a node of `cluster` (`""`: none): its connections introduce it as
    /// such and refuse peers of another cluster.
    #[must_use]
    pub fn with_cluster(mut self, cluster: String) -> Self {
        self.cluster = cluster;
        self
    }

    /// Connects to `peer_id` at `endpoint` (TCP; RDMA endpoints are refused until the RDMA
    /// transport exists) and keeps the connection, replacing an older one. A peer of another
    /// cluster is refused ([`TransportError::WrongCluster`], or [`TransportError::Remote`]
    /// when the peer refuses first).
    pub fn connect_peer(
        &mut self,
        peer_id: NodeId,
        endpoint: &pagemesh_api::Endpoint,
    ) -> Result<(), TransportError> {
        let source: Box<dyn PageSource> = match endpoint.transport {
            pagemesh_api::TransportKind::Tcp => Box::new(tcp::TcpPeer::connect(
                self.local,
                &self.cluster,
                peer_id,
                &endpoint.address,
                self.timeout,
            )?),
            pagemesh_api::TransportKind::Rdma => {
                return Err(TransportError::Unsupported {
                    node: peer_id,
                    what: "RDMA endpoints (this build has only the TCP transport)",
                });
            }
        };
        self.peers.insert(peer_id, source);
        Ok(())
    }

    /// Adds an already-built source (tests, the local-copy benchmark).
    pub fn add_source(&mut self, source: Box<dyn PageSource>) {
        self.peers.insert(source.peer(), source);
    }

    /// The connection to `node`.
    pub fn peer(&mut self, node: NodeId) -> Result<&mut dyn PageSource, TransportError> {
        match self.peers.get_mut(&node) {
            Some(p) => Ok(p.as_mut()),
            None => Err(TransportError::UnknownPeer(node)),
        }
    }

    /// Nodes with a connection.
    pub fn peer_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Fetches (and claims) `page` of `vm` from `remote_node` into `dst`, one page.
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
        self.peer(remote_node)?.fetch(vm, page, dst)
    }
}
