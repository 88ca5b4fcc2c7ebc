//! Where the registry lives: the [`Store`] seam and its implementations.
//!
//! The seam is at the level of whole operations ("register this endpoint"), not of keys, so
//! that each operation is atomic in every store: the embedded store applies it under a lock,
//! an etcd store will apply it in a transaction.

mod embedded;
mod etcd;

use std::io;
use std::path::PathBuf;

use pagemesh_api::{
    Cluster, CreateCluster, CreateVm, NodeId, NodeInfo, RegisterEndpoint, RepairReport, Vm, VmId,
};

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

use crate::registry::{Lease, RegistryError, Stored};

/// Why a store operation failed.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The request breaks a rule of the registry; nothing changed.
    #[error(transparent)]
    Refused(#[from] RegistryError),
    /// The state file exists but cannot be read.
    #[error("cannot read state file {}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The state file is not coordinator state.
    #[error(
        "state file {} is not valid coordinator state; repair it or move it away",
        path.display()
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What the parser found.
        #[source]
        source: serde_json::Error,
    },
    /// The etcd cluster did not answer a request, or refused it.
    #[error("etcd at {endpoints}: {what}")]
    Etcd {
        /// The endpoints the store was given.
        endpoints: String,
        /// What the store was doing.
        what: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// The value under the registry's key in etcd is not coordinator state.
    #[error(
        "the value of etcd key {key} is not valid coordinator state; repair it or use another --etcd-prefix"
    )]
    CorruptEtcd {
        /// The key.
        key: String,
        /// What the parser found.
        #[source]
        source: serde_json::Error,
    },
    /// Other coordinators changed the registry first, every time; nothing changed.
    #[error("other coordinators changed the registry first {attempts} times in a row; try again")]
    Contended {
        /// Tries made.
        attempts: u32,
    },
    /// The state file cannot be written; the change was not made.
    #[error("cannot write state file {}", path.display())]
    Write {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Keeps the coordinator's records. Each method is one atomic operation.
///
/// The methods are synchronous because the only store today answers from memory (and writes a
/// small file). The etcd store will need them async; they will then return boxed futures, so
/// that `AppState` can keep holding a `dyn Store`.
pub trait Store: Send + Sync {
    /// Creates a cluster, or returns the existing one when its parameters are the same.
    fn create_cluster(&self, req: CreateCluster) -> Result<Stored<Cluster>, StoreError>;

    /// The cluster named `name`.
    fn cluster(&self, name: &str) -> Result<Cluster, StoreError>;

    /// Records node `id`'s endpoint, granting it `lease`; see
    /// [`pagemesh_api::RegisterEndpoint`] for when this is a conflict.
    fn register_endpoint(
        &self,
        id: NodeId,
        req: RegisterEndpoint,
        lease: Lease,
    ) -> Result<Stored<NodeInfo>, StoreError>;

    /// Renews the lease of node `id`, registered at `address`.
    fn renew_lease(&self, id: NodeId, address: &str, lease: Lease) -> Result<NodeInfo, StoreError>;

    /// Forgets the nodes down for at least `after_ms` at `now_ms`, and returns them.
    fn forget_down(&self, now_ms: u64, after_ms: u64) -> Result<Vec<NodeInfo>, StoreError>;

    /// Every registered node, sorted by id.
    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;

    /// Node `id`.
    fn node(&self, id: NodeId) -> Result<NodeInfo, StoreError>;

    /// Forgets node `id`, which left the cluster, and returns what it was; with `address`,
    /// only if the node is still registered at that address.
    fn deregister(&self, id: NodeId, address: Option<&str>) -> Result<NodeInfo, StoreError>;

    /// Defines a VM with the next id and places its pages on nodes that are up at `now_ms`;
    /// or, for an idempotency `key` seen before, returns the VM that key created
    /// (`created: false`).
    fn create_vm(
        &self,
        req: CreateVm,
        key: Option<&str>,
        now_ms: u64,
    ) -> Result<Stored<Vm>, StoreError>;

    /// VM `id`.
    fn vm(&self, id: VmId) -> Result<Vm, StoreError>;

    /// Every VM, sorted by id.
    fn vms(&self) -> Result<Vec<Vm>, StoreError>;

    /// Forgets VM `id` and returns what it was. Its id is not given out again.
    fn delete_vm(&self, id: VmId) -> Result<Vm, StoreError>;

    /// Node `node` is down: the VMs with copies on it retire it (their survivors make its
    /// copies again); returns those VMs.
    fn retire(&self, node: NodeId) -> Result<Vec<Vm>, StoreError>;

    /// Records a memory node's progress in repairing VM `id`.
    fn report_repair(&self, id: VmId, report: RepairReport) -> Result<Vm, StoreError>;
}
