//! The JSON a node takes from the coordinator (a `Vm` with its placement, node lists) and
//! the coordinator from its clients: decoding any bytes either fails or gives values whose
//! placement arithmetic (what memory nodes load by and compute nodes build their page
//! directory from) neither panics nor overflows.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pagemesh_api::{CreateVm, Endpoint, NodeInfo, RegisterEndpoint, Vm};

fuzz_target!(|data: &[u8]| {
    if let Ok(vm) = serde_json::from_slice::<Vm>(data) {
        let p = &vm.placement;
        let pages = p.pages();
        for node in p.nodes() {
            let count = p.count_of(node);
            // The iterator agrees with the count, on a bounded prefix.
            let listed = p.pages_of(node).take(4096).count() as u64;
            assert_eq!(listed, count.min(4096), "{p:?}");
        }
        for page in [0, 1, pages / 2, pages.saturating_sub(1), pages, u64::MAX] {
            let _ = p.owner(page);
        }
    }
    let _ = serde_json::from_slice::<CreateVm>(data);
    let _ = serde_json::from_slice::<RegisterEndpoint>(data);
    let _ = serde_json::from_slice::<Vec<NodeInfo>>(data);
    let _ = serde_json::from_slice::<Vec<Endpoint>>(data);
});
