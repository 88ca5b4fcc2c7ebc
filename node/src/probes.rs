//! Loading the eBPF probes for a node that runs a guest.

use std::sync::Arc;

use pagemesh_api::error_chain;
use pagemesh_probes::Probes;

use crate::admin::{AdminState, KernelProbes};
use crate::config::Settings;

/// Loads the eBPF probes for this process unless `--no-ebpf`, with heat counters for guest
/// frames `0 .. frames`, of which VM page 0 is frame `first_gfn`; a node that cannot load
/// them warns once, saying why, and runs on without them. Their figures go to `/stats`.
pub(crate) fn load_probes(
    settings: &Settings,
    admin: &AdminState,
    first_gfn: u64,
    frames: u64,
) -> Option<Arc<Probes>> {
    if settings.compute.no_ebpf {
        tracing::info!("eBPF probes disabled (--no-ebpf)");
        return None;
    }
    match Probes::load(std::process::id(), frames) {
        Ok(p) => {
            p.set_first_gfn(first_gfn);
            let p = Arc::new(p);
            tracing::info!("eBPF probes attached: {}", p.attached().join(", "));
            *admin.ebpf.lock().unwrap_or_else(|e| e.into_inner()) = Some(KernelProbes {
                probes: p.clone(),
                first_gfn,
            });
            Some(p)
        }
        Err(e) => {
            tracing::warn!(
                "eBPF probes not loaded, running without kernel-side figures: {}",
                error_chain(&e)
            );
            None
        }
    }
}

/// The pager's hooks for the probes: the transfer probe's uprobe sits on
/// [`pagemesh_probes::pagemesh_fetch_done`], which the handler calls after each fetch (a
/// 5-byte `nop` and a `ret` when no probe is attached).
pub fn fault_trace() -> pagemesh_pager::FaultTrace {
    pagemesh_pager::FaultTrace {
        fetch_done: Some(pagemesh_probes::pagemesh_fetch_done),
        served: Some(pagemesh_probes::pagemesh_fault_served),
    }
}
