//! What the coordinator knows (clusters, nodes, VMs) and the rules for changing it.
//!
//! [`Registry`] is plain data, and every operation is a function of the registry and the
//! request alone (the clock is an argument), so a store can apply one under a lock, or inside
//! a transaction it retries, and tests need no server. Its serialized form is the state file.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use pagemesh_api::{
    Cluster, Content, CreateCluster, CreateVm, Endpoint, NodeId, NodeInfo, PAGE_SIZE, Placement,
    PlacementError, PlacementRequest, RegisterEndpoint, RepairReport, ReplicaError, Replicas, Role,
    TransportKind, Vm, VmId,
};

/// [`PAGE_SIZE`] for arithmetic on byte counts.
const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Idempotency keys remembered: those of the last this many VMs created with one. A client
/// retries within seconds, so this covers many clients retrying at once.
pub(crate) const KEYS_KEPT: usize = 1024;

/// Why the registry refused a request; the registry is unchanged.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// No cluster of that name.
    #[error("unknown cluster '{0}'")]
    UnknownCluster(String),
    /// A cluster name that cannot appear in a URL path as is.
    #[error("cluster name {0:?} is not valid; use 1 to 63 letters, digits, '-', '_' or '.'")]
    BadClusterName(String),
    /// The cluster exists with other parameters.
    #[error(
        "cluster '{name}' already exists with nodes={nodes} and memory_mb={memory_mb}; \
         pick another name"
    )]
    ClusterExists {
        /// Cluster name.
        name: String,
        /// Its planned node count.
        nodes: u32,
        /// Its planned memory.
        memory_mb: u64,
    },
    /// An RDMA endpoint a peer could not use.
    #[error("bad RDMA endpoint: {0}")]
    BadRdma(#[from] pagemesh_api::rdma::RdmaEndpointError),
    /// An endpoint address that is not `host:port`.
    #[error("address {address:?} is not host:port: {reason}")]
    BadAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The node id is taken by a node at another endpoint.
    #[error(
        "node {node} is already registered at {existing}; stop that node, or register with \
         \"replace\": true to take its place"
    )]
    EndpointConflict {
        /// Node id.
        node: NodeId,
        /// The registered endpoint, as `transport://address`.
        existing: String,
    },
    /// No node with that id has registered.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// Pages placed on a node whose lease has run out.
    #[error(
        "node {node} is down: its lease ran out {ago_ms} ms ago; start it again, or place the \
         pages on other nodes"
    )]
    NodeDown {
        /// Node id.
        node: NodeId,
        /// How long ago the lease ran out.
        ago_ms: u64,
    },
    /// A node leaving from an address its id is no longer registered at: another node took
    /// the id (`replace`), and stays.
    #[error(
        "node {node} is registered at {existing}, not at {given}; another node has taken its place"
    )]
    NotAtAddress {
        /// Node id.
        node: NodeId,
        /// The registered endpoint, as `transport://address`.
        existing: String,
        /// The address the request named.
        given: String,
    },
    /// Pages placed on a node that holds none.
    #[error("node {node} has role {role} and holds no pages; place pages on memory nodes")]
    NotMemoryNode {
        /// Node id.
        node: NodeId,
        /// Its role.
        role: Role,
    },
    /// Pages placed on a node of another cluster than the compute node's.
    #[error(
        "node {node} is in {theirs}, the compute node in {ours}; place pages within one cluster"
    )]
    OtherCluster {
        /// Node id.
        node: NodeId,
        /// Its cluster, described.
        theirs: String,
        /// The compute node's cluster, described.
        ours: String,
    },
    /// A VM run by a node that runs none.
    #[error("node {node} has role {role} and runs no guests; pick a compute node")]
    NotComputeNode {
        /// Node id.
        node: NodeId,
        /// Its role.
        role: Role,
    },
    /// Guest memory that is not whole pages.
    #[error("mem_bytes must be a non-zero multiple of {PAGE_SIZE}, got {0}")]
    BadMemSize(u64),
    /// An image path the memory nodes would resolve against their own working directory.
    #[error("image path {0:?} must be absolute")]
    RelativeImage(String),
    /// The placement cannot be built.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// The replicas cannot be placed.
    #[error(transparent)]
    Replicas(#[from] ReplicaError),
    /// No VM with that id.
    #[error("unknown VM {0}")]
    UnknownVm(VmId),
    /// Ids are never reused, and all 2^32 - 1 have been given out.
    #[error("no VM ids left")]
    VmIdsExhausted,
    /// An idempotency key that is not 1 to 64 visible ASCII characters.
    #[error("idempotency key {0:?} is not valid; use 1 to 64 visible ASCII characters")]
    BadIdempotencyKey(String),
    /// An idempotency key sent again with a request for another VM.
    #[error(
        "idempotency key {key:?} was sent before for another VM ({vm}); send a new key for a \
         new VM"
    )]
    KeyReused {
        /// The key.
        key: String,
        /// The VM it created.
        vm: VmId,
    },
    /// A repair report from a node that is not one of the VM's surviving memory nodes.
    #[error("node {node} holds no copies of VM {vm}: only its surviving memory nodes repair it")]
    NotASurvivor {
        /// The VM.
        vm: VmId,
        /// The node that reported.
        node: NodeId,
    },
    /// A repair report that cannot be right.
    #[error("repair report for VM {vm} does not add up: {why}")]
    BadRepairReport {
        /// The VM.
        vm: VmId,
        /// What is wrong with it.
        why: String,
    },
    /// An idempotency key whose VM has been deleted since.
    #[error("idempotency key {key:?} created VM {vm}, which has been deleted since")]
    KeyOfDeletedVm {
        /// The key.
        key: String,
        /// The VM it created.
        vm: VmId,
    },
}

/// The time of a request and the lease it grants, on the coordinator's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// Length of a node's lease, in milliseconds.
    pub ttl_ms: u64,
}

impl Lease {
    fn expires_ms(self) -> u64 {
        self.now_ms.saturating_add(self.ttl_ms)
    }
}

/// A record written by a create-or-update operation, and whether it is new.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored<T> {
    /// The record as now stored.
    pub value: T,
    /// `true` when the record did not exist before.
    pub created: bool,
}

/// Everything the coordinator knows.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(into = "StateFile", try_from = "StateFile")]
pub(crate) struct Registry {
    clusters: BTreeMap<String, Cluster>,
    nodes: BTreeMap<NodeId, NodeInfo>,
    vms: BTreeMap<VmId, Vm>,
    /// The last VM id given out (0: none yet). Ids are not reused after a delete, so a
    /// stale id held by a node or a script never names another VM.
    last_vm_id: VmId,
    /// The idempotency keys of the last [`KEYS_KEPT`] VMs created with one, oldest first.
    /// Searched from the newest: a retry follows its first try closely.
    keys: VecDeque<KeyRecord>,
}

/// An idempotency key and the VM it created.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    key: String,
    vm: VmId,
}

impl Registry {
    /// Creates a cluster; creating it again with the same parameters is not an error.
    pub(crate) fn create_cluster(
        &mut self,
        req: CreateCluster,
    ) -> Result<Stored<Cluster>, RegistryError> {
        check_cluster_name(&req.name)?;
        if let Some(existing) = self.clusters.get(&req.name) {
            if existing.nodes != req.nodes || existing.memory_mb != req.memory_mb {
                return Err(RegistryError::ClusterExists {
                    name: existing.name.clone(),
                    nodes: existing.nodes,
                    memory_mb: existing.memory_mb,
                });
            }
            return Ok(Stored {
                value: existing.clone(),
                created: false,
            });
        }
        let cluster = Cluster {
            name: req.name,
            nodes: req.nodes,
            memory_mb: req.memory_mb,
            registered: Vec::new(),
        };
        self.clusters.insert(cluster.name.clone(), cluster.clone());
        Ok(Stored {
            value: cluster,
            created: true,
        })
    }

    /// The cluster named `name`.
    pub(crate) fn cluster(&self, name: &str) -> Result<&Cluster, RegistryError> {
        self.clusters
            .get(name)
            .ok_or_else(|| RegistryError::UnknownCluster(name.to_owned()))
    }

    /// Records where node `id`'s page server listens, granting it `lease`.
    ///
    /// The same endpoint again is a node restarting: its role, capacity, cluster and time are
    /// refreshed. Another endpoint for a registered id is refused unless `req.replace`, or
    /// the registered node is down (its lease ran out): then this is that node back.
    pub(crate) fn register(
        &mut self,
        id: NodeId,
        req: RegisterEndpoint,
        lease: Lease,
    ) -> Result<Stored<NodeInfo>, RegistryError> {
        let now_ms = lease.now_ms;
        check_address(&req.address)?;
        if let Some(r) = &req.rdma {
            r.check()?;
        }
        if let Some(admin) = &req.admin {
            check_address(admin)?;
        }
        if let Some(name) = &req.cluster {
            self.cluster(name)?;
        }
        let previous = self.nodes.get(&id);
        if let Some(old) = previous {
            let same =
                old.endpoint.transport == req.transport && old.endpoint.address == req.address;
            if !same && !req.replace && old.lease_current(now_ms) {
                return Err(RegistryError::EndpointConflict {
                    node: id,
                    existing: format!(
                        "{}://{}",
                        scheme(old.endpoint.transport),
                        old.endpoint.address
                    ),
                });
            }
        }
        let created = previous.is_none();
        if let Some(name) = previous.and_then(|old| old.cluster.as_ref())
            && let Some(cluster) = self.clusters.get_mut(name)
        {
            cluster.registered.retain(|&n| n != id);
        }
        if let Some(cluster) = req.cluster.as_ref().and_then(|n| self.clusters.get_mut(n)) {
            // Kept sorted, like every list the API answers with.
            if let Err(at) = cluster.registered.binary_search(&id) {
                cluster.registered.insert(at, id);
            }
        }
        let info = NodeInfo {
            node_id: id,
            role: req.role,
            capacity_bytes: req.capacity_bytes,
            cluster: req.cluster,
            endpoint: Endpoint {
                node_id: id,
                transport: req.transport,
                address: req.address,
                rdma: req.rdma,
            },
            registered_at_ms: now_ms,
            admin: req.admin,
            lease_ms: lease.ttl_ms,
            lease_expires_ms: lease.expires_ms(),
            up: true,
        };
        self.nodes.insert(id, info.clone());
        Ok(Stored {
            value: info,
            created,
        })
    }

    /// Renews the lease of node `id`, registered at `address`, for `lease`. A node whose
    /// lease had run out is up again (it was only unreachable for a while).
    pub(crate) fn renew(
        &mut self,
        id: NodeId,
        address: &str,
        lease: Lease,
    ) -> Result<NodeInfo, RegistryError> {
        self.check_at(id, address)?;
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(RegistryError::UnknownNode(id))?;
        node.lease_ms = lease.ttl_ms;
        node.lease_expires_ms = lease.expires_ms();
        node.up = true;
        Ok(node.clone())
    }

    /// Forgets the nodes whose lease ran out at least `after_ms` before `now_ms` (they
    /// crashed, or were stopped without leaving), and returns them.
    pub(crate) fn forget_down(&mut self, now_ms: u64, after_ms: u64) -> Vec<NodeInfo> {
        let gone: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.lease_expires_ms.saturating_add(after_ms) <= now_ms)
            .map(|n| n.node_id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.deregister(id, None).ok())
            .collect()
    }

    /// An error unless node `id` is registered at `address`.
    fn check_at(&self, id: NodeId, address: &str) -> Result<(), RegistryError> {
        let node = self.node(id)?;
        if node.endpoint.address != address {
            return Err(RegistryError::NotAtAddress {
                node: id,
                existing: format!(
                    "{}://{}",
                    scheme(node.endpoint.transport),
                    node.endpoint.address
                ),
                given: address.to_owned(),
            });
        }
        Ok(())
    }

    /// Every registered node, sorted by id.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// Node `id`.
    pub(crate) fn node(&self, id: NodeId) -> Result<&NodeInfo, RegistryError> {
        self.nodes.get(&id).ok_or(RegistryError::UnknownNode(id))
    }

    /// Forgets node `id`, which has left the cluster, and returns what it was. With
    /// `address`, only if the node is still registered there: a node that another has
    /// replaced (`replace`) must not remove its successor when it stops.
    ///
    /// VMs the node runs or holds pages of are kept: they are deleted on their own.
    pub(crate) fn deregister(
        &mut self,
        id: NodeId,
        address: Option<&str>,
    ) -> Result<NodeInfo, RegistryError> {
        match address {
            Some(given) => self.check_at(id, given)?,
            None => {
                self.node(id)?;
            }
        }
        let node = self
            .nodes
            .remove(&id)
            .ok_or(RegistryError::UnknownNode(id))?;
        if let Some(cluster) = node.cluster.as_ref().and_then(|n| self.clusters.get_mut(n)) {
            cluster.registered.retain(|&n| n != id);
        }
        Ok(node)
    }

    /// Defines a VM, resolving its placement over the registered memory nodes.
    ///
    /// With an idempotency `key` this registry has seen, nothing is created: the answer is
    /// the VM that key created (`created: false`), provided the request is for the same
    /// compute node, size and content. A client whose answer was lost can so retry safely.
    pub(crate) fn create_vm(
        &mut self,
        req: CreateVm,
        key: Option<&str>,
        now_ms: u64,
    ) -> Result<Stored<Vm>, RegistryError> {
        if let Some(key) = key {
            check_key(key)?;
            if let Some(vm) = self.replay(key, &req)? {
                return Ok(Stored {
                    value: vm.clone(),
                    created: false,
                });
            }
        }
        if req.mem_bytes == 0 || !req.mem_bytes.is_multiple_of(PAGE_BYTES) {
            return Err(RegistryError::BadMemSize(req.mem_bytes));
        }
        let pages = req.mem_bytes / PAGE_BYTES;
        let compute = self.node(req.compute_node)?;
        if !compute.role.computes() {
            return Err(RegistryError::NotComputeNode {
                node: compute.node_id,
                role: compute.role,
            });
        }
        if let Content::Image { path } = &req.content
            && !path.starts_with('/')
        {
            return Err(RegistryError::RelativeImage(path.clone()));
        }
        let scope = Scope {
            cluster: compute.cluster.clone(),
            compute: compute.node_id,
            now_ms,
        };
        let placement = self.place(req.placement, pages, &scope)?;
        Replicas::new(&placement, req.replicas)?;
        self.warn_if_short(
            &placement,
            req.mem_bytes.saturating_mul(u64::from(req.replicas)),
        );
        let id = self
            .last_vm_id
            .checked_add(1)
            .ok_or(RegistryError::VmIdsExhausted)?;
        self.last_vm_id = id;
        let vm = Vm {
            id,
            compute_node: req.compute_node,
            mem_bytes: req.mem_bytes,
            placement,
            content: req.content,
            local_memory_bytes: req.local_memory_bytes,
            replicas: req.replicas,
            retired: Vec::new(),
            repairs: Vec::new(),
        };
        self.vms.insert(id, vm.clone());
        if let Some(key) = key {
            if self.keys.len() >= KEYS_KEPT {
                self.keys.pop_front();
            }
            self.keys.push_back(KeyRecord {
                key: key.to_owned(),
                vm: id,
            });
        }
        Ok(Stored {
            value: vm,
            created: true,
        })
    }

    /// The VM that idempotency `key` created, if the key is known; an error if that VM is
    /// gone or `req` asks for another one.
    fn replay(&self, key: &str, req: &CreateVm) -> Result<Option<&Vm>, RegistryError> {
        let Some(record) = self.keys.iter().rev().find(|r| r.key == key) else {
            return Ok(None);
        };
        let Some(vm) = self.vms.get(&record.vm) else {
            return Err(RegistryError::KeyOfDeletedVm {
                key: key.to_owned(),
                vm: record.vm,
            });
        };
        // The placement is not compared: the request's form (nodes left out, a policy) and
        // the resolved one differ, and the nodes may have changed since.
        if vm.compute_node != req.compute_node
            || vm.mem_bytes != req.mem_bytes
            || vm.content != req.content
            || vm.local_memory_bytes != req.local_memory_bytes
            || vm.replicas != req.replicas
        {
            return Err(RegistryError::KeyReused {
                key: key.to_owned(),
                vm: vm.id,
            });
        }
        Ok(Some(vm))
    }

    /// Resolves a placement request for a VM of `pages` pages run by `scope.compute`.
    fn place(
        &self,
        req: PlacementRequest,
        pages: u64,
        scope: &Scope,
    ) -> Result<Placement, RegistryError> {
        match req {
            PlacementRequest::Interleave {
                nodes,
                granule_pages,
            } => {
                let nodes = self.memory_nodes(nodes, scope)?;
                let ids = nodes.iter().map(|n| n.node_id).collect();
                Ok(Placement::interleave(ids, granule_pages, pages)?)
            }
            PlacementRequest::Weighted { nodes } => {
                let weights: Vec<(NodeId, u64)> = self
                    .memory_nodes(nodes, scope)?
                    .iter()
                    .map(|n| (n.node_id, n.capacity_bytes))
                    .collect();
                Ok(Placement::weighted(&weights, pages)?)
            }
            PlacementRequest::Ranges { ranges } => {
                for range in &ranges {
                    scope.check(self.memory_node(range.node)?)?;
                }
                Ok(Placement::ranges(ranges, pages)?)
            }
        }
    }

    /// The memory nodes `ids`, in that order, or, when `ids` is empty, every registered
    /// memory node of the compute node's cluster but the compute node itself, by id.
    fn memory_nodes(
        &self,
        ids: Vec<NodeId>,
        scope: &Scope,
    ) -> Result<Vec<&NodeInfo>, RegistryError> {
        if ids.is_empty() {
            return Ok(self
                .nodes()
                .filter(|n| {
                    n.role.serves_memory()
                        && n.cluster == scope.cluster
                        && n.node_id != scope.compute
                        && n.lease_current(scope.now_ms)
                })
                .collect());
        }
        let mut seen = BTreeSet::new();
        ids.into_iter()
            .map(|id| {
                if !seen.insert(id) {
                    return Err(PlacementError::DuplicateNode(id).into());
                }
                scope.check(self.memory_node(id)?)
            })
            .collect()
    }

    /// Node `id`, which must hold pages.
    ///
    /// (Cluster membership is checked by [`Scope::check`].)
    fn memory_node(&self, id: NodeId) -> Result<&NodeInfo, RegistryError> {
        let node = self.node(id)?;
        if !node.role.serves_memory() {
            return Err(RegistryError::NotMemoryNode {
                node: id,
                role: node.role,
            });
        }
        Ok(node)
    }

    /// Logs a warning when the nodes of `placement` together offer less than `mem_bytes`.
    ///
    /// Only a warning: capacities are what nodes announced, memory nodes enforce their own
    /// limit when they load pages, and the demo runs with capacity left at 0.
    fn warn_if_short(&self, placement: &Placement, mem_bytes: u64) {
        let nodes = placement.nodes();
        let offered: u64 = nodes
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.capacity_bytes)
            .fold(0, u64::saturating_add);
        if offered < mem_bytes {
            tracing::warn!(
                ?nodes,
                offered_bytes = offered,
                mem_bytes,
                "the memory nodes of this VM offer less capacity than its memory"
            );
        }
    }

    /// VM `id`.
    pub(crate) fn vm(&self, id: VmId) -> Result<&Vm, RegistryError> {
        self.vms.get(&id).ok_or(RegistryError::UnknownVm(id))
    }

    /// Every VM, sorted by id.
    pub(crate) fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }

    /// Forgets VM `id`.
    pub(crate) fn delete_vm(&mut self, id: VmId) -> Result<Vm, RegistryError> {
        self.vms.remove(&id).ok_or(RegistryError::UnknownVm(id))
    }

    /// Whether [`Registry::retire`] of `node` would change a VM.
    pub(crate) fn would_retire(&self, node: NodeId) -> bool {
        self.vms.values().any(|vm| retires(vm, node))
    }

    /// Whether a node is down for at least `after_ms` at `now_ms`: what
    /// [`Registry::forget_down`] would forget.
    pub(crate) fn any_down_for(&self, now_ms: u64, after_ms: u64) -> bool {
        self.nodes()
            .any(|n| n.lease_expires_ms.saturating_add(after_ms) <= now_ms)
    }

    /// Node `node` is down: every VM with more than one copy of its pages and copies on it
    /// retires it, so that the survivors make its copies again. Returns the VMs that did,
    /// as they are now. A VM left with fewer memory nodes than copies retires it all the
    /// same (its survivors make what copies they can).
    pub(crate) fn retire(&mut self, node: NodeId) -> Vec<Vm> {
        let mut changed = Vec::new();
        for vm in self.vms.values_mut() {
            if retires(vm, node) {
                vm.retired.push(node);
                changed.push(vm.clone());
            }
        }
        changed
    }

    /// Records memory node `report.node`'s repair progress for VM `id`.
    pub(crate) fn report_repair(
        &mut self,
        id: VmId,
        report: RepairReport,
    ) -> Result<Vm, RegistryError> {
        let vm = self.vms.get_mut(&id).ok_or(RegistryError::UnknownVm(id))?;
        if !vm.survivors().contains(&report.node) {
            return Err(RegistryError::NotASurvivor {
                vm: id,
                node: report.node,
            });
        }
        if report.retired > vm.retired.len() || report.copied > report.needed {
            return Err(RegistryError::BadRepairReport {
                vm: id,
                why: format!(
                    "{} retired nodes reported, {} known; {} of {} pages copied",
                    report.retired,
                    vm.retired.len(),
                    report.copied,
                    report.needed
                ),
            });
        }
        match vm.repairs.iter_mut().find(|r| r.node == report.node) {
            Some(r) => *r = report,
            None => vm.repairs.push(report),
        }
        Ok(vm.clone())
    }
}

/// Whether `vm` has more than one copy of each page and copies on `node`, not retired yet.
fn retires(vm: &Vm, node: NodeId) -> bool {
    vm.replicas > 1 && !vm.retired.contains(&node) && vm.placement.nodes().contains(&node)
}

/// Cluster names appear in URL paths, so they are kept to characters that need no escaping.
fn check_cluster_name(name: &str) -> Result<(), RegistryError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadClusterName(name.to_owned()))
    }
}

/// Idempotency keys travel in a header and appear in messages: 1 to 64 visible ASCII
/// characters.
fn check_key(key: &str) -> Result<(), RegistryError> {
    if (1..=64).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(RegistryError::BadIdempotencyKey(key.to_owned()))
    }
}

/// Accepts what a peer can connect to: `ip:port`, `[ipv6]:port` or `hostname:port`, with a
/// non-zero port.
fn check_address(address: &str) -> Result<(), RegistryError> {
    let bad = |reason| RegistryError::BadAddress {
        address: address.to_owned(),
        reason,
    };
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err(bad("port 0 cannot be connected to")),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(bad("the port is missing"));
    };
    match port.parse::<u16>() {
        Ok(0) => return Err(bad("port 0 cannot be connected to")),
        Ok(_) => {}
        Err(_) => return Err(bad("the port must be a number from 1 to 65535")),
    }
    // An IP address that failed to parse with its port is malformed (or IPv6 without
    // brackets), so only host names remain: RFC 1123 labels.
    let is_label = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // A numeric last label would make "300.1.1.1" a host name.
    let numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    if host.len() <= 253 && host.split('.').all(is_label) && !numeric {
        Ok(())
    } else {
        Err(bad(
            "the host must be an IP address, [IPv6] address or host name",
        ))
    }
}

/// The URL scheme naming a transport, for messages.
fn scheme(transport: TransportKind) -> &'static str {
    match transport {
        TransportKind::Tcp => "tcp",
        TransportKind::Rdma => "rdma",
    }
}

/// The state file: the registry as lists, which read better than maps keyed by their own ids.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    /// Bumped when the layout changes incompatibly.
    format: u32,
    last_vm_id: VmId,
    clusters: Vec<Cluster>,
    nodes: Vec<NodeInfo>,
    vms: Vec<Vm>,
    /// Left out when empty, so that a file without keys is the same as before they existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    idempotency_keys: Vec<KeyRecord>,
}

/// The only [`StateFile::format`] this coordinator reads and writes.
const STATE_FORMAT: u32 = 1;

impl From<Registry> for StateFile {
    fn from(r: Registry) -> Self {
        StateFile {
            format: STATE_FORMAT,
            last_vm_id: r.last_vm_id,
            clusters: r.clusters.into_values().collect(),
            nodes: r.nodes.into_values().collect(),
            vms: r.vms.into_values().collect(),
            idempotency_keys: r.keys.into(),
        }
    }
}

impl TryFrom<StateFile> for Registry {
    type Error = String;

    fn try_from(f: StateFile) -> Result<Self, String> {
        if f.format != STATE_FORMAT {
            return Err(format!(
                "format {} is not the supported format {STATE_FORMAT}",
                f.format
            ));
        }
        let mut r = Registry {
            last_vm_id: f.last_vm_id,
            ..Registry::default()
        };
        for c in f.clusters {
            if let Some(c) = r.clusters.insert(c.name.clone(), c) {
                return Err(format!("cluster '{}' appears twice", c.name));
            }
        }
        for n in f.nodes {
            if n.endpoint.node_id != n.node_id {
                return Err(format!(
                    "node {} has the endpoint of another node",
                    n.node_id
                ));
            }
            if let Some(n) = r.nodes.insert(n.node_id, n) {
                return Err(format!("node {} appears twice", n.node_id));
            }
        }
        for vm in f.vms {
            if vm.id == 0 || vm.id > r.last_vm_id {
                return Err(format!(
                    "VM {} was never given out (last_vm_id is {})",
                    vm.id, r.last_vm_id
                ));
            }
            if let Some(vm) = r.vms.insert(vm.id, vm) {
                return Err(format!("VM {} appears twice", vm.id));
            }
        }
        let skip = f.idempotency_keys.len().saturating_sub(KEYS_KEPT);
        for k in f.idempotency_keys.into_iter().skip(skip) {
            if check_key(&k.key).is_err() || k.vm == 0 || k.vm > r.last_vm_id {
                return Err(format!(
                    "idempotency key {:?} is not valid or names a VM never given out",
                    k.key
                ));
            }
            if r.keys.iter().any(|o| o.key == k.key) {
                return Err(format!("idempotency key {:?} appears twice", k.key));
            }
            r.keys.push_back(k);
        }
        Ok(r)
    }
}

/// Where a VM's pages may go: memory nodes of the compute node's cluster that are up.
struct Scope {
    cluster: Option<String>,
    compute: NodeId,
    now_ms: u64,
}

impl Scope {
    fn check<'a>(&self, node: &'a NodeInfo) -> Result<&'a NodeInfo, RegistryError> {
        if node.cluster == self.cluster {
            if !node.lease_current(self.now_ms) {
                return Err(RegistryError::NodeDown {
                    node: node.node_id,
                    ago_ms: self.now_ms - node.lease_expires_ms,
                });
            }
            return Ok(node);
        }
        let describe = |c: &Option<String>| match c {
            Some(name) => format!("cluster '{name}'"),
            None => "no cluster".to_owned(),
        };
        Err(RegistryError::OtherCluster {
            node: node.node_id,
            theirs: describe(&node.cluster),
            ours: describe(&self.cluster),
        })
    }
}

#[cfg(test)]
mod tests {
    use pagemesh_api::PageRange;

    use super::*;

    /// A request at `now_ms` granting a lease of ten seconds.
    fn at(now_ms: u64) -> Lease {
        Lease {
            now_ms,
            ttl_ms: 10_000,
        }
    }

    fn endpoint(address: &str, role: Role, capacity_bytes: u64) -> RegisterEndpoint {
        RegisterEndpoint {
            admin: None,
            transport: TransportKind::Tcp,
            address: address.to_owned(),
            role,
            capacity_bytes,
            cluster: None,
            replace: false,
            rdma: None,
        }
    }

    #[test]
    fn addresses() {
        for good in [
            "127.0.0.1:7000",
            "[::1]:7000",
            "node-a:1",
            "node-a.example.com:65535",
            "localhost:7001",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "::1:7000",
            ":7000",
            "host name:7000",
            "-host:7000",
            "a..b:7000",
            "300.1.1.1:7000",
            "http://x:7000",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_names() {
        assert_eq!(check_cluster_name("demo-1_a.b"), Ok(()));
        for bad in ["", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(check_cluster_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reregistering_moves_a_node_between_clusters() {
        let mut r = Registry::default();
        for name in ["a", "b"] {
            let req = CreateCluster {
                name: name.to_owned(),
                nodes: 2,
                memory_mb: 64,
            };
            r.create_cluster(req).unwrap();
        }
        let mut req = endpoint("127.0.0.1:7001", Role::Memory, 0);
        req.cluster = Some("a".to_owned());
        r.register(1, req.clone(), at(1)).unwrap();
        assert_eq!(r.cluster("a").unwrap().registered, [1]);
        req.cluster = Some("b".to_owned());
        r.register(1, req, at(2)).unwrap();
        assert_eq!(r.cluster("a").unwrap().registered, [] as [NodeId; 0]);
        assert_eq!(r.cluster("b").unwrap().registered, [1]);
    }

    #[test]
    fn placement_uses_memory_nodes_in_id_order_and_their_capacity() {
        let mut r = Registry::default();
        r.register(3, endpoint("h:3", Role::Memory, 3 << 20), at(0))
            .unwrap();
        r.register(1, endpoint("h:1", Role::Both, 1 << 20), at(0))
            .unwrap();
        r.register(2, endpoint("h:2", Role::Compute, 0), at(0))
            .unwrap();
        let interleave = r
            .place(
                PlacementRequest::Interleave {
                    nodes: vec![],
                    granule_pages: 2,
                },
                8,
                &COMPUTE_2,
            )
            .unwrap();
        assert_eq!(interleave, Placement::interleave(vec![1, 3], 2, 8).unwrap());
        let weighted = r
            .place(PlacementRequest::Weighted { nodes: vec![] }, 8, &COMPUTE_2)
            .unwrap();
        assert_eq!(weighted.count_of(1), 2);
        assert_eq!(weighted.count_of(3), 6);
        let ranges = PlacementRequest::Ranges {
            ranges: vec![PageRange {
                start: 0,
                pages: 8,
                node: 2,
            }],
        };
        assert_eq!(
            r.place(ranges, 8, &COMPUTE_2),
            Err(RegistryError::NotMemoryNode {
                node: 2,
                role: Role::Compute
            })
        );
        let twice = PlacementRequest::Weighted { nodes: vec![1, 1] };
        assert_eq!(
            r.place(twice, 8, &COMPUTE_2),
            Err(PlacementError::DuplicateNode(1).into())
        );
    }

    const COMPUTE_2: Scope = Scope {
        cluster: None,
        compute: 2,
        now_ms: 0,
    };

    #[test]
    fn placement_stays_within_the_compute_nodes_cluster() {
        let mut r = Registry::default();
        for name in ["a", "b"] {
            r.create_cluster(CreateCluster {
                name: name.into(),
                nodes: 3,
                memory_mb: 1024,
            })
            .unwrap();
        }
        let mut join = |id: NodeId, role: Role, cluster: &str| {
            let mut e = endpoint(&format!("h:{}", id + 1), role, 1 << 20);
            e.cluster = Some(cluster.into());
            r.register(id, e, at(0)).unwrap();
        };
        join(1, Role::Memory, "a");
        join(2, Role::Memory, "b");
        join(3, Role::Both, "a");
        join(4, Role::Memory, "a");
        let in_a = Scope {
            cluster: Some("a".into()),
            compute: 3,
            now_ms: 0,
        };
        let p = r
            .place(
                PlacementRequest::Interleave {
                    nodes: vec![],
                    granule_pages: 1,
                },
                8,
                &in_a,
            )
            .unwrap();
        assert_eq!(p.nodes(), vec![1, 4], "not node 2 (cluster b), not itself");
        let err = r
            .place(PlacementRequest::Weighted { nodes: vec![1, 2] }, 8, &in_a)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node 2 is in cluster 'b', the compute node in cluster 'a'; place pages within one cluster"
        );
    }

    fn small_vm() -> CreateVm {
        CreateVm {
            compute_node: 1,
            mem_bytes: 4096,
            placement: PlacementRequest::Interleave {
                nodes: vec![],
                granule_pages: 1,
            },
            content: Content::Zero,
            local_memory_bytes: None,
            replicas: 1,
        }
    }

    #[test]
    fn a_node_whose_lease_runs_out_is_down_until_it_renews_or_comes_back() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Compute, 0), at(0))
            .unwrap();
        r.register(2, endpoint("h:2", Role::Memory, 1 << 20), at(0))
            .unwrap();
        r.register(3, endpoint("h:3", Role::Memory, 1 << 20), at(5_000))
            .unwrap();
        assert_eq!(r.node(2).unwrap().lease_expires_ms, 10_000);
        // At 12 s node 2's lease (to 10 s) has run out, node 3's (to 15 s) has not: new VMs
        // go to node 3 only, and naming node 2 is refused.
        let vm = r.create_vm(small_vm(), None, 12_000).unwrap().value;
        assert_eq!(vm.placement.nodes(), [3]);
        let mut req = small_vm();
        req.placement = PlacementRequest::Interleave {
            nodes: vec![2],
            granule_pages: 1,
        };
        assert_eq!(
            r.create_vm(req, None, 12_000).unwrap_err(),
            RegistryError::NodeDown {
                node: 2,
                ago_ms: 2_000
            }
        );
        // A down node's id is free for that node back at another address; a live one's is
        // not.
        r.register(2, endpoint("h:22", Role::Memory, 1 << 20), at(12_000))
            .unwrap();
        assert!(matches!(
            r.register(3, endpoint("h:33", Role::Memory, 0), at(12_000)),
            Err(RegistryError::EndpointConflict { node: 3, .. })
        ));
        // Renewing: only at the registered address, only a known node.
        assert!(matches!(
            r.renew(3, "h:33", at(14_000)),
            Err(RegistryError::NotAtAddress { node: 3, .. })
        ));
        assert_eq!(
            r.renew(9, "h:9", at(14_000)),
            Err(RegistryError::UnknownNode(9))
        );
        assert_eq!(
            r.renew(3, "h:3", at(14_000)).unwrap().lease_expires_ms,
            24_000
        );
        // Node 1 has been down for 30 s: forgotten after 20 s down; the others stay.
        let gone = r.forget_down(40_000, 20_000);
        assert_eq!(gone.iter().map(|n| n.node_id).collect::<Vec<_>>(), [1]);
        assert_eq!(r.nodes().map(|n| n.node_id).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn replicas_need_as_many_memory_nodes() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Both, 1 << 20), at(0))
            .unwrap();
        for id in [2, 3] {
            r.register(
                id,
                endpoint(&format!("h:{id}"), Role::Memory, 1 << 20),
                at(0),
            )
            .unwrap();
        }
        let mut req = small_vm();
        req.replicas = 2;
        let vm = r.create_vm(req.clone(), None, 0).unwrap().value;
        assert_eq!((vm.replicas, vm.placement.nodes()), (2, vec![2, 3]));
        req.replicas = 3;
        assert_eq!(
            r.create_vm(req, None, 0).unwrap_err(),
            RegistryError::Replicas(ReplicaError::TooFewNodes {
                replicas: 3,
                nodes: 2
            })
        );
    }

    #[test]
    fn idempotency_keys_are_kept_for_the_last_vms() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Both, 0), at(0))
            .unwrap();
        r.register(2, endpoint("h:2", Role::Memory, 0), at(0))
            .unwrap();
        let first = r.create_vm(small_vm(), Some("key-0"), 0).unwrap();
        assert!(first.created);
        let again = r.create_vm(small_vm(), Some("key-0"), 0).unwrap();
        assert_eq!((again.value.id, again.created), (1, false));
        for i in 1..KEYS_KEPT {
            r.create_vm(small_vm(), Some(&format!("key-{i}")), 0)
                .unwrap();
        }
        assert_eq!(r.keys.len(), KEYS_KEPT);
        assert!(!r.create_vm(small_vm(), Some("key-0"), 0).unwrap().created);
        // One more: the oldest key is forgotten, so it creates a VM again.
        let id = r.create_vm(small_vm(), Some("new"), 0).unwrap().value.id;
        assert_eq!(r.keys.len(), KEYS_KEPT);
        let forgotten = r.create_vm(small_vm(), Some("key-0"), 0).unwrap();
        assert!(forgotten.created);
        assert_eq!(forgotten.value.id, id + 1);
    }

    #[test]
    fn a_dead_memory_node_is_retired_by_the_vms_with_copies_on_it_and_repair_is_reported() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Compute, 0), at(0))
            .unwrap();
        for id in [2, 3, 4] {
            r.register(
                id,
                endpoint(&format!("h:{id}"), Role::Memory, 1 << 20),
                at(0),
            )
            .unwrap();
        }
        let two = r
            .create_vm(
                CreateVm {
                    mem_bytes: 3 * 4096,
                    replicas: 2,
                    ..small_vm()
                },
                None,
                0,
            )
            .unwrap()
            .value;
        let one = r.create_vm(small_vm(), None, 0).unwrap().value;
        let retired = r.retire(3);
        assert_eq!(retired.len(), 1, "one copy: nothing to repair: {retired:?}");
        assert_eq!(retired[0].retired, [3]);
        assert!(r.retire(3).is_empty(), "retired once");
        assert!(r.vm(one.id).unwrap().retired.is_empty());
        let vm = r.vm(two.id).unwrap();
        assert_eq!(vm.survivors(), [2, 4]);
        assert!(!vm.repaired());
        assert_eq!(vm.under_replicated(), None, "nobody has said yet");
        let report = |node, copied, done| RepairReport {
            node,
            retired: 1,
            needed: 2,
            copied,
            claimed: 0,
            done,
        };
        r.report_repair(two.id, report(2, 1, false)).unwrap();
        let vm = r.report_repair(two.id, report(4, 0, false)).unwrap();
        assert_eq!(vm.under_replicated(), Some(3));
        r.report_repair(two.id, report(2, 2, true)).unwrap();
        let vm = r.report_repair(two.id, report(4, 2, true)).unwrap();
        assert!(vm.repaired());
        assert_eq!(vm.under_replicated(), Some(0));
        let err = r.report_repair(two.id, report(3, 2, true)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node 3 holds no copies of VM 1: only its surviving memory nodes repair it"
        );
        let err = r.report_repair(two.id, report(2, 3, true)).unwrap_err();
        assert!(
            matches!(err, RegistryError::BadRepairReport { .. }),
            "{err}"
        );
        // The definition carries both, and one without them still reads.
        let json = serde_json::to_value(r.vm(two.id).unwrap()).unwrap();
        assert_eq!(json["retired"], serde_json::json!([3]));
        assert_eq!(json["repairs"].as_array().unwrap().len(), 2);
        assert!(serde_json::to_value(&one).unwrap().get("retired").is_none());
    }

    #[test]
    fn a_refused_request_records_no_key() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Compute, 0), at(0))
            .unwrap();
        let err = r.create_vm(small_vm(), Some("k"), 0).unwrap_err();
        assert!(matches!(err, RegistryError::Placement(_)), "{err:?}");
        r.register(2, endpoint("h:2", Role::Memory, 0), at(0))
            .unwrap();
        assert!(r.create_vm(small_vm(), Some("k"), 0).unwrap().created);
    }

    #[test]
    fn state_file_round_trip_and_checks() {
        let mut r = Registry::default();
        r.register(1, endpoint("h:1", Role::Both, 0), at(5))
            .unwrap();
        r.register(2, endpoint("h:2", Role::Memory, 0), at(5))
            .unwrap();
        let vm = CreateVm {
            compute_node: 1,
            mem_bytes: 8192,
            placement: PlacementRequest::Interleave {
                nodes: vec![],
                granule_pages: 1,
            },
            content: Content::Zero,
            local_memory_bytes: None,
            replicas: 1,
        };
        r.create_vm(vm, Some("k"), 0).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""idempotency_keys":[{"key":"k","vm":1}]"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Registry>(&json).unwrap(), r);
        let no_keys = json.replace(r#","idempotency_keys":[{"key":"k","vm":1}]"#, "");
        assert!(serde_json::from_str::<Registry>(&no_keys).is_ok());
        let bad_key = json.replace(r#""vm":1}]"#, r#""vm":2}]"#);
        assert!(serde_json::from_str::<Registry>(&bad_key).is_err());

        let stale = json.replace(r#""last_vm_id":1"#, r#""last_vm_id":0"#);
        let err = serde_json::from_str::<Registry>(&stale).unwrap_err();
        assert!(
            err.to_string().contains("VM 1 was never given out"),
            "{err}"
        );
        let future = json.replace(r#""format":1"#, r#""format":2"#);
        assert!(serde_json::from_str::<Registry>(&future).is_err());
    }
}
