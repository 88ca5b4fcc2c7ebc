//! A compute node's connections to the memory nodes of its VM: the pager's (the fault path
//! owns them) and the control connections (load, held, release).

use std::collections::BTreeMap;

use pagemesh_api::{NodeId, Vm, error_chain};
use pagemesh_transport::{TransportError, TransportManager};

use crate::config::Settings;
use crate::coordinator::CoordinatorClient;
use crate::error::NodeError;

/// Connects to every node holding pages of `vm`, twice: once for the pager (the fault path
/// owns those connections) and once for control requests (load, held, release).
pub(crate) fn connect_vm_peers(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    vm: &Vm,
) -> Result<(TransportManager, TransportManager), NodeError> {
    let timeout = settings.compute.peer_timeout;
    let cluster = settings.cluster.clone().unwrap_or_default();
    let wanted = vm.placement.nodes();
    let mut transport = TransportManager::new(id, timeout).with_cluster(cluster.clone());
    let mut control = TransportManager::new(id, timeout).with_cluster(cluster);
    coordinator.discover_and_connect_peers(
        id,
        &mut [&mut transport, &mut control],
        Some(&wanted),
    )?;
    for &n in &wanted {
        if !control.peer_ids().contains(&n) {
            return Err(NodeError::Peer {
                node: n,
                what: "be reached for",
                vm: vm.id,
                source: TransportError::UnknownPeer(n),
            });
        }
    }
    Ok((transport, control))
}

/// Asks every node holding pages of `vm` to drop them; one that cannot is logged (the run's
/// result stands either way).
pub(crate) fn release_vm(control: &mut TransportManager, vm: &Vm) {
    for n in vm.placement.nodes() {
        if let Err(e) = control.peer(n).and_then(|p| p.release(vm.id)) {
            tracing::warn!(
                "node {n} could not release VM {}: {}",
                vm.id,
                error_chain(&e)
            );
        }
    }
}

/// Has every node holding pages of `vm` load its share.
pub(crate) fn load_vm(control: &mut TransportManager, vm: &Vm) -> Result<(), NodeError> {
    for n in vm.placement.nodes() {
        let loaded = control
            .peer(n)
            .and_then(|p| p.load(vm.id))
            .map_err(|source| NodeError::Peer {
                node: n,
                what: "load",
                vm: vm.id,
                source,
            })?;
        tracing::info!("node {n} loaded {loaded} pages of VM {}", vm.id);
    }
    Ok(())
}

/// Pages each node holding pages of `vm` holds now.
pub(crate) fn held(
    control: &mut TransportManager,
    vm: &Vm,
) -> Result<BTreeMap<NodeId, u64>, NodeError> {
    let mut out = BTreeMap::new();
    for n in vm.placement.nodes() {
        let count = control
            .peer(n)
            .and_then(|p| p.held(vm.id))
            .map_err(|source| NodeError::Peer {
                node: n,
                what: "report the pages it holds of",
                vm: vm.id,
                source,
            })?;
        out.insert(n, count);
    }
    Ok(out)
}
