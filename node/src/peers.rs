//! A compute node's connections to the memory nodes of its VM: the pager's (the fault path
//! owns them) and the control connections (load, held, release).

use std::collections::BTreeMap;
use std::sync::Arc;

use pagemesh_api::{NodeId, Vm, error_chain};
use pagemesh_transport::tcp::Credentials;
use pagemesh_transport::{ControlPlane, LostHomes, PeerControl, TransportError, TransportManager};

use crate::config::{ConfigError, Settings};
use crate::coordinator::CoordinatorClient;
use crate::error::NodeError;

/// A compute node's connections for one VM.
pub(crate) struct VmPeers {
    /// The pager's (the fault path owns them).
    pub(crate) transport: TransportManager,
    /// The more fault handlers' (one set each).
    pub(crate) more_handlers: Vec<TransportManager>,
    /// For control requests (load, held, release).
    pub(crate) control: ControlPlane,
    /// The page cache's reclaimer's, for write-back, under a budget.
    pub(crate) writeback: Option<TransportManager>,
    /// The prefetcher's, with `--prefetch` or `--replay-working-set`.
    pub(crate) prefetch: Option<TransportManager>,
    /// The memory nodes all of them have lost (with replicas).
    pub(crate) lost: Arc<LostHomes>,
}

/// Connects to every node holding pages of `vm`: once for the pager, once for control
/// requests, for a VM under a local memory budget once for the reclaimer's write-backs and,
/// with `--prefetch` or `--replay-working-set`, once for the prefetcher, and once more for
/// each of `handlers` fault handlers past the first.
pub(crate) fn connect_vm_peers(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    vm: &Vm,
    handlers: usize,
) -> Result<VmPeers, NodeError> {
    let timeout = settings.compute.peer_timeout;
    let credentials = credentials(settings)?;
    let wanted = vm.placement.nodes();
    let replicas = vm.replicas().map_err(|e| ConfigError::Invalid {
        what: "--replicas",
        why: e.to_string(),
    })?;
    // Every connection knows each page's homes, so that any of them fails over, and they
    // share what they have lost.
    let lost = Arc::new(LostHomes::default());
    // With RDMA, every page connection reads through a queue pair of its own, and they
    // share their slot maps.
    let rdma = crate::rdma::compute_rdma();
    let manager = || {
        let m = TransportManager::new(id, timeout)
            .with_credentials(credentials.clone())
            .with_compression(settings.compress.into())
            .with_replicas(replicas.clone(), lost.clone());
        match &rdma {
            Some((readers, maps)) => m.with_rdma(readers.clone(), maps.clone()),
            None => m,
        }
    };
    let mut transport = manager();
    let mut writeback = vm.local_memory_bytes.map(|_| manager());
    let c = &settings.compute;
    let mut prefetch = (c.prefetch || c.replay_working_set.is_some()).then(manager);
    let mut more_handlers: Vec<_> = (1..handlers).map(|_| manager()).collect();
    let mut control = ControlPlane::new(id, timeout).with_credentials(credentials);
    let connected = discover_and_connect_peers(
        coordinator,
        id,
        &mut transport,
        &mut control,
        &mut [writeback.as_mut(), prefetch.as_mut()]
            .into_iter()
            .chain(more_handlers.iter_mut().map(Some))
            .collect::<Vec<_>>(),
        Some(&wanted),
    )?;
    for &n in &wanted {
        if !connected.contains(&n) {
            return Err(NodeError::Peer {
                node: n,
                what: "be reached for",
                vm: vm.id,
                source: TransportError::UnknownPeer(n),
            });
        }
    }
    Ok(VmPeers {
        transport,
        more_handlers,
        control,
        writeback,
        prefetch,
        lost,
    })
}

/// What this node shows its peers: its cluster, the cluster key and the TLS client
/// certificate it was given.
pub(crate) fn credentials(settings: &Settings) -> Result<Credentials, NodeError> {
    let mut credentials = Credentials::keyless(settings.cluster.as_deref().unwrap_or_default());
    if let Some(keyring) = settings.keyring()? {
        credentials = credentials.with_key(std::sync::Arc::new(keyring));
    }
    if let Some(tls) = settings.tls()? {
        credentials = credentials.with_tls(tls.client);
    }
    Ok(credentials)
}

/// Fetches every endpoint once from the coordinator and connects `transport` (page traffic),
/// `control` and each of `more` that is there (write-back, prefetch) to each peer in `wanted` (all peers when `None`) other
/// than `local`: the design note's flow. Returns the peers connected.
pub(crate) fn discover_and_connect_peers(
    coordinator: &CoordinatorClient,
    local: NodeId,
    transport: &mut TransportManager,
    control: &mut ControlPlane,
    more: &mut [Option<&mut TransportManager>],
    wanted: Option<&[NodeId]>,
) -> Result<Vec<NodeId>, NodeError> {
    let mut connected = Vec::new();
    for ep in coordinator.endpoints()? {
        if ep.node_id == local || wanted.is_some_and(|w| !w.contains(&ep.node_id)) {
            continue;
        }
        let failed = |source| NodeError::Connect {
            node: ep.node_id,
            source,
        };
        transport.connect_peer(ep.node_id, &ep).map_err(failed)?;
        control.connect_peer(ep.node_id, &ep).map_err(failed)?;
        for m in more.iter_mut().flatten() {
            m.connect_peer(ep.node_id, &ep).map_err(failed)?;
        }
        tracing::info!("connected to node {} at {}", ep.node_id, ep.address);
        connected.push(ep.node_id);
    }
    Ok(connected)
}

/// Asks every node holding pages of `vm` to drop them; one that cannot is logged (the run's
/// result stands either way).
/// Releases `vm`'s pages on its memory nodes, then deletes its definition: a run's VM is
/// not kept on the coordinator after the run (a soak of hundreds of runs would otherwise
/// grow it by every VM). Best effort, with warnings.
pub(crate) fn forget_vm(control: &mut ControlPlane, coordinator: &CoordinatorClient, vm: &Vm) {
    release_vm(control, vm);
    if let Err(e) = coordinator.delete_vm(vm.id) {
        tracing::warn!(
            "VM {} could not be deleted; the coordinator still lists it: {}",
            vm.id,
            error_chain(&e)
        );
    }
}

pub(crate) fn release_vm(control: &mut ControlPlane, vm: &Vm) {
    for n in vm.placement.nodes() {
        if let Err(e) = control.ask(n, |p| p.release(vm.id)) {
            tracing::warn!(
                "node {n} could not release VM {}: {}",
                vm.id,
                error_chain(&e)
            );
        }
    }
}

/// Has every node holding pages of `vm` load its share.
pub(crate) fn load_vm(control: &mut ControlPlane, vm: &Vm) -> Result<(), NodeError> {
    for (n, loaded) in ask_each(control, vm, "load", |p| p.load(vm.id))? {
        tracing::info!("node {n} loaded {loaded} pages of VM {}", vm.id);
    }
    Ok(())
}

/// Pages each node holding pages of `vm` holds now. With replicas, a node that cannot say
/// (it died, and the guest ran on its pages' other homes) is left out, with a warning.
pub(crate) fn held(
    control: &mut ControlPlane,
    vm: &Vm,
) -> Result<BTreeMap<NodeId, u64>, NodeError> {
    if vm.replicas <= 1 {
        return ask_each(control, vm, "report the pages it holds of", |p| {
            p.held(vm.id)
        });
    }
    let mut out = BTreeMap::new();
    for n in vm.placement.nodes() {
        match control.ask(n, |p| p.held(vm.id)) {
            Ok(held) => {
                out.insert(n, held);
            }
            Err(e) => tracing::warn!(
                "node {n} cannot say what it holds of VM {} (left out): {}",
                vm.id,
                error_chain(&e)
            ),
        }
    }
    Ok(out)
}

/// Asks every node holding pages of `vm` the same thing, in turn; the first that cannot
/// answer is the error, saying it could not do `what`.
fn ask_each(
    control: &mut ControlPlane,
    vm: &Vm,
    what: &'static str,
    mut ask: impl FnMut(&mut dyn PeerControl) -> Result<u64, TransportError>,
) -> Result<BTreeMap<NodeId, u64>, NodeError> {
    let mut out = BTreeMap::new();
    for n in vm.placement.nodes() {
        let answer = control.ask(n, &mut ask).map_err(|source| NodeError::Peer {
            node: n,
            what,
            vm: vm.id,
            source,
        })?;
        out.insert(n, answer);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pagemesh_api::{Content, Placement};
    use pagemesh_transport::local::LocalSource;

    use super::*;

    const PAGES: u64 = 64;

    fn vm_on(nodes: Vec<NodeId>) -> Vm {
        Vm {
            id: 9,
            compute_node: 0,
            mem_bytes: PAGES * 4096,
            placement: Placement::interleave(nodes, 1, PAGES).unwrap(),
            content: Content::Pattern { seed: 1 },
            local_memory_bytes: None,
            replicas: 1,
            retired: Vec::new(),
            repairs: Vec::new(),
        }
    }

    fn control_with(nodes: &[NodeId]) -> ControlPlane {
        let mut control = ControlPlane::new(0, Duration::from_secs(1));
        for &n in nodes {
            control.add(Box::new(LocalSource::with_pattern(n, 9, PAGES / 2, 1)));
        }
        control
    }

    #[test]
    fn load_held_and_release_ask_every_node_of_the_vm() {
        let vm = vm_on(vec![1, 2]);
        let mut control = control_with(&[1, 2]);
        load_vm(&mut control, &vm).unwrap();
        let held_now = held(&mut control, &vm).unwrap();
        assert_eq!(held_now, BTreeMap::from([(1, PAGES / 2), (2, PAGES / 2)]));
        release_vm(&mut control, &vm);
        let held_now = held(&mut control, &vm).unwrap();
        assert_eq!(held_now, BTreeMap::from([(1, 0), (2, 0)]));
    }

    #[test]
    fn a_node_without_a_connection_is_named_in_the_error() {
        let vm = vm_on(vec![1, 2]);
        let mut control = control_with(&[1]);
        let err = held(&mut control, &vm).unwrap_err();
        assert!(
            matches!(err, NodeError::Peer { node: 2, vm: 9, .. }),
            "{err:?}"
        );
        assert_eq!(
            error_chain(&err),
            "memory node 2 could not report the pages it holds of VM 9: \
             no connection to node 2; is it registered with the coordinator?"
        );
        // Releasing is best effort: the node that is there still drops its pages.
        release_vm(&mut control, &vm);
        assert_eq!(control.peer(1).unwrap().held(9).unwrap(), 0);
    }
}
