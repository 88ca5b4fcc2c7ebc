//! JSON types of the pagemesh coordinator API.
//!
//! Three programs read these documents: the coordinator serves them, nodes register and
//! discover through them, and tools (xtask, tests, later the console) display them. They are
//! defined once, here, so that the three cannot drift.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /clusters` | [`CreateCluster`] | [`Cluster`] (201) |
//! | `GET /clusters/{name}` | | [`Cluster`] |
//! | `POST /nodes/{node_id}/endpoint` | [`RegisterEndpoint`] | [`NodeInfo`] (200, or 201 when new) |
//! | `GET /endpoints` | | `Vec<`[`Endpoint`]`>` |
//! | `GET /nodes` | | `Vec<`[`NodeInfo`]`>` |
//! | `GET /nodes/{node_id}` | | [`NodeInfo`] |
//! | `DELETE /nodes/{node_id}` | | 204: the node left the cluster |
//! | `POST /vms` | [`CreateVm`], header [`IDEMPOTENCY_KEY`] | [`Vm`] (201, or 200 for a key seen before) |
//! | `GET /vms/{vm_id}` | | [`Vm`] |
//! | `GET /vms` | | `Vec<`[`Vm`]`>` |
//! | `DELETE /vms/{vm_id}` | | 204 |
//! | `GET /healthz` | | `ok` |
//! | `GET /openapi.json` | | the OpenAPI document of all of these |
//!
//! Every error is an [`ApiError`] body with a non-2xx status.
//!
//! [`stats`] is the JSON of a node's `GET /stats`; [`summary`] the run summary a compute node
//! writes with `--json`.
//!
//! [`placement`] holds the page-placement arithmetic that the coordinator validates, memory
//! nodes load by, and compute nodes build their page directory from.
//!
//! [`pattern`] is the page content memory nodes load and test guests check.
//!
//! With the `openapi` feature (only the coordinator enables it) the API types derive
//! `utoipa::ToSchema`, from which the coordinator generates its `GET /openapi.json`.

pub mod pattern;
pub mod placement;
pub mod rdma;
pub mod stats;
pub mod summary;
pub mod trace;

use serde::{Deserialize, Serialize};

pub use placement::{
    Homes, MAX_REPLICAS, PageRange, Placement, PlacementError, ReplicaError, Replicas,
};

/// A node's identifier within a cluster.
pub type NodeId = u32;
/// A VM's identifier, assigned by the coordinator.
pub type VmId = u32;

/// Bytes in one guest page.
pub const PAGE_SIZE: usize = 4096;

/// What a node does in the cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs vCPUs; fetches the pages its guests fault on.
    Compute,
    /// Holds pages for other nodes and serves them.
    Memory,
    /// Both of the above.
    Both,
}

impl Role {
    /// Whether this node holds pages for others.
    pub fn serves_memory(self) -> bool {
        matches!(self, Role::Memory | Role::Both)
    }

    /// Whether this node runs guests.
    pub fn computes(self) -> bool {
        matches!(self, Role::Compute | Role::Both)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Compute => "compute",
            Role::Memory => "memory",
            Role::Both => "both",
        })
    }
}

/// How a node's page server is reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The binary page protocol over TCP (`docs/protocol.md`).
    Tcp,
    /// RDMA (not available yet).
    Rdma,
}

/// `POST /clusters`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateCluster {
    /// Cluster name, unique on this coordinator.
    pub name: String,
    /// Number of nodes the cluster is planned for.
    pub nodes: u32,
    /// Total memory the cluster is planned for, in MiB.
    pub memory_mb: u64,
}

/// A cluster as the coordinator knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Number of nodes the cluster is planned for.
    pub nodes: u32,
    /// Total memory the cluster is planned for, in MiB.
    pub memory_mb: u64,
    /// Nodes registered in this cluster so far.
    pub registered: Vec<NodeId>,
}

/// `POST /nodes/{node_id}/endpoint`: a node announces where its page server listens.
///
/// Registering the same node again with the same transport and address is accepted (a node
/// restarting); a different endpoint for a node id that is already registered is a conflict
/// (409) unless `replace` is set or the node's lease has run out (it is down: whoever
/// registers it now is that node back).
///
/// The registration grants a lease of [`NodeInfo::lease_ms`]; the node keeps it with
/// `PUT /nodes/{node_id}/lease` ([`RenewLease`]) before it runs out, or is down.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterEndpoint {
    /// Transport of the page server.
    pub transport: TransportKind,
    /// `host:port` of the page server.
    pub address: String,
    /// The node's role.
    pub role: Role,
    /// Bytes of guest memory this node offers to hold (memory role), 0 otherwise.
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Cluster to join; it must exist. `None` joins no named cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Replace an existing, different endpoint for this node id.
    #[serde(default)]
    pub replace: bool,
    /// `host:port` of the node's admin HTTP endpoint (`/stats`, `/metrics`), if it has one.
    #[serde(default)]
    pub admin: Option<String>,
    /// The node's RDMA queue pair and readable memory, for a node whose page traffic may go
    /// over RDMA (checked: [`rdma::RdmaEndpoint::check`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<rdma::RdmaEndpoint>,
}

/// `GET /endpoints` element: how to reach one node's page server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Endpoint {
    /// Node id.
    pub node_id: NodeId,
    /// Transport of the page server.
    pub transport: TransportKind,
    /// `host:port` of the page server.
    pub address: String,
    /// Its RDMA queue pair and readable memory, when it registered them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<rdma::RdmaEndpoint>,
}

/// `GET /nodes` element.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeInfo {
    /// Node id.
    pub node_id: NodeId,
    /// The node's role.
    pub role: Role,
    /// Bytes of guest memory the node offers to hold.
    pub capacity_bytes: u64,
    /// Cluster the node joined, if any.
    pub cluster: Option<String>,
    /// Its page server.
    pub endpoint: Endpoint,
    /// Milliseconds since the Unix epoch of the last registration.
    pub registered_at_ms: u64,
    /// `host:port` of the node's admin HTTP endpoint, if it has one.
    #[serde(default)]
    pub admin: Option<String>,
    /// Length of the node's lease, in milliseconds: it renews it well within that.
    #[serde(default)]
    pub lease_ms: u64,
    /// Milliseconds since the Unix epoch (on the coordinator's clock) when the lease runs
    /// out unless renewed.
    #[serde(default)]
    pub lease_expires_ms: u64,
    /// Whether the lease was current when the coordinator answered; a node whose lease ran
    /// out is down: `GET /endpoints` leaves it out and no new VM is placed on it.
    #[serde(default)]
    pub up: bool,
}

impl NodeInfo {
    /// Whether the node's lease is current at `now_ms`.
    pub fn lease_current(&self, now_ms: u64) -> bool {
        self.lease_expires_ms > now_ms
    }
}

/// `PUT /nodes/{node_id}/lease`: the node is alive and still at `address`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewLease {
    /// `host:port` of the node's page server, as registered: a node another process has
    /// replaced (`replace`) cannot keep its successor's lease.
    pub address: String,
}

/// Where a VM's pages come from when memory nodes load them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Content {
    /// Nothing is loaded: every page starts never-written and is zero-filled on first touch.
    #[default]
    Zero,
    /// Each page carries a deterministic pattern derived from its index and `seed`
    /// (tests and the demo; the guest's `verify` workload checks it).
    Pattern {
        /// Mixed into every word so pages of different VMs differ.
        seed: u64,
    },
    /// A guest memory image: page `i` is the 4 KiB at offset `i * 4096` of the file. The path
    /// must be readable by every memory node holding pages of the VM; a short file leaves the
    /// remaining pages never-written.
    Image {
        /// Absolute path of the image on the memory nodes.
        path: String,
    },
}

/// The placement policy requested for a new VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "policy")]
pub enum PlacementRequest {
    /// Round-robin over `nodes` (all memory nodes when empty), `granule_pages` pages at a time.
    Interleave {
        /// Memory nodes to spread over; empty means every registered memory-role node.
        #[serde(default)]
        nodes: Vec<NodeId>,
        /// Consecutive pages placed on one node before moving to the next (default 1).
        #[serde(default = "one")]
        granule_pages: u32,
    },
    /// Contiguous runs of pages assigned to one node each; together they must cover the VM.
    Ranges {
        /// The runs, in any order.
        ranges: Vec<PageRange>,
    },
    /// Contiguous shares proportional to each memory node's registered capacity.
    Weighted {
        /// Memory nodes to spread over; empty means every registered memory-role node.
        #[serde(default)]
        nodes: Vec<NodeId>,
    },
}

fn one() -> u32 {
    1
}

/// `POST /vms`: define a VM and place its pages.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateVm {
    /// The node that runs the VM's vCPUs.
    pub compute_node: NodeId,
    /// Guest RAM in bytes; a multiple of 4096.
    pub mem_bytes: u64,
    /// How to spread pages over memory nodes.
    pub placement: PlacementRequest,
    /// What the memory nodes load.
    #[serde(default)]
    pub content: Content,
    /// The compute node's local memory budget for the VM (`--local-memory`), bytes; `None`:
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_memory_bytes: Option<u64>,
    /// Copies of each page, on distinct memory nodes (`--replicas`, 1 to
    /// [`MAX_REPLICAS`]; [`Replicas`] says where).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[cfg_attr(feature = "openapi", schema(default = 1, minimum = 1, maximum = 4))]
    pub replicas: u32,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if takes a reference"
)]
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The request header of `POST /vms` that makes it safe to retry: the coordinator answers a
/// key it has seen with the VM that key created, rather than creating another. 1 to 64
/// visible ASCII characters; nodes send 32 random hex digits.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A VM as the coordinator knows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Vm {
    /// Id assigned by the coordinator.
    pub id: VmId,
    /// The node that runs the VM's vCPUs.
    pub compute_node: NodeId,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Resolved placement: who initially holds each page.
    pub placement: Placement,
    /// What the memory nodes load.
    pub content: Content,
    /// The compute node's local memory budget for the VM, bytes; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_memory_bytes: Option<u64>,
    /// Copies of each page, on distinct memory nodes ([`Vm::replicas`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[cfg_attr(feature = "openapi", schema(default = 1, minimum = 1, maximum = 4))]
    pub replicas: u32,
    /// Memory nodes of the placement declared dead while the VM had copies on them, in the
    /// order they died: their copies are made again on the next live nodes
    /// ([`Replicas::homes_without`]); docs/replication.md, "Repair".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<NodeId>,
    /// Each surviving memory node's progress in making those copies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repairs: Vec<RepairReport>,
}

impl Vm {
    /// Where the copies of the VM's pages are.
    pub fn replicas(&self) -> Result<Replicas, ReplicaError> {
        Replicas::new(&self.placement, self.replicas)
    }

    /// The memory nodes that are to hold copies: the placement's, less the retired ones.
    pub fn survivors(&self) -> Vec<NodeId> {
        let mut nodes = self.placement.nodes();
        nodes.retain(|n| !self.retired.contains(n));
        nodes
    }

    /// Pages that still have fewer copies than [`Vm::replicas`] as far as the survivors
    /// have said: each survivor's pages still to copy, and a survivor that has not said yet
    /// counts as unknown (`None`). `Some(0)` for a VM that lost nothing.
    pub fn under_replicated(&self) -> Option<u64> {
        if self.retired.is_empty() {
            return Some(0);
        }
        self.survivors()
            .iter()
            .map(|&n| {
                self.repairs
                    .iter()
                    .find(|r| r.node == n && r.retired == self.retired.len())
                    .map(|r| r.needed - r.copied.min(r.needed))
            })
            .sum()
    }

    /// Whether every survivor has made its copies since the last node was retired.
    pub fn repaired(&self) -> bool {
        self.retired.is_empty()
            || self.survivors().iter().all(|&n| {
                self.repairs
                    .iter()
                    .any(|r| r.node == n && r.retired == self.retired.len() && r.done)
            })
    }
}

/// One memory node's progress in restoring a VM's copies (`PUT /vms/{id}/repair`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RepairReport {
    /// The memory node making copies.
    pub node: NodeId,
    /// How many of the VM's nodes were retired when it started (its `retired` list's
    /// length): a report for an older list is stale.
    pub retired: usize,
    /// Pages it is a new home of and did not hold.
    pub needed: u64,
    /// Of those, pages it holds now.
    pub copied: u64,
    /// Pages a survivor no longer held (a compute node claimed them: their only copy that
    /// matters is in the guest).
    #[serde(default)]
    pub claimed: u64,
    /// Whether it has gone through every page.
    pub done: bool,
}

/// The body of every error answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
}

/// `e` and its sources, joined by ": ": how every pagemesh program prints an error (messages
/// never repeat their source, so the chain reads as one sentence).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
