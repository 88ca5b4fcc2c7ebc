//! This node's RDMA device, when `--transport` comes to RDMA (a build with the cargo
//! feature `rdma`, a host with a device): opened once at start and kept for the life of
//! the process.
//!
//! - A memory node allocates its page store up front, registers it readable by peers as
//!   one region ([`NodeRdma::register_store`]), puts it in its endpoint registration,
//!   and makes a queue pair for each compute node's connection that asks (RdmaConnect,
//!   [`NodeRdma::service`]).
//! - A compute node reads pages through queue pairs of its own, one per connection to a
//!   memory node ([`NodeRdma::readers`], [`compute_rdma`]).
//!
//! Without the feature no device opens (`RDMA_BUILT` is false). Any build has the hidden
//! `--transport rdma-emulated`: the same data path, with one-sided reads of the memory
//! node's process on this host standing in for the device
//! (`pagemesh_transport::rdma::emulated`), for tests.

use std::sync::{Arc, OnceLock};

use pagemesh_api::rdma::{RdmaEndpoint, RdmaRegion};
use pagemesh_protocol::QueuePair;
use pagemesh_server::RdmaService;
use pagemesh_server::store::PageStore;
use pagemesh_transport::rdma::emulated::{EMULATED_GID, ProcessReaders, responder_end};
use pagemesh_transport::rdma::source::{Readers, SlotMaps};

/// What a compute node's page connections read through, once the device is open: its
/// queue pairs, the slot maps they share, and whether the reads are emulated.
static COMPUTE: OnceLock<(Arc<dyn Readers>, SlotMaps, bool)> = OnceLock::new();

/// The queue pairs and the slot maps a compute node's page connections use, if this node
/// reads over RDMA.
pub(crate) fn compute_rdma() -> Option<(Arc<dyn Readers>, SlotMaps)> {
    COMPUTE.get().map(|(r, m, _)| (Arc::clone(r), m.clone()))
}

/// Makes this node's page connections read over RDMA through `rdma`'s device.
pub(crate) fn read_through(rdma: &NodeRdma) {
    let emulated = matches!(rdma, NodeRdma::Emulated);
    let _ = COMPUTE.set((rdma.readers(), SlotMaps::default(), emulated));
}

/// How this node's remote pages came so far, if it reads over RDMA.
pub(crate) fn summary() -> Option<pagemesh_api::summary::RdmaSummary> {
    use std::sync::atomic::Ordering::Relaxed;
    let (_, maps, emulated) = COMPUTE.get()?;
    let s = maps.stats();
    Some(pagemesh_api::summary::RdmaSummary {
        emulated: *emulated,
        rdma_pages: s.rdma_pages.load(Relaxed),
        tcp_pages: s.tcp_pages.load(Relaxed),
        stale_runs: s.stale_runs.load(Relaxed),
        claimed_pages: s.claimed_pages.load(Relaxed),
    })
}

#[cfg(feature = "rdma")]
mod device {
    use std::sync::{Arc, Mutex};

    use pagemesh_api::rdma::tags_len;
    use pagemesh_api::rdma::{RdmaEndpoint, RdmaRegion};
    use pagemesh_protocol::QueuePair;
    use pagemesh_server::RdmaService;
    use pagemesh_server::store::PageStore;
    use pagemesh_transport::rdma::source::Readers;
    use pagemesh_transport::rdma::verbs::{
        Device, ProtectionDomain, Region, VerbsReaders, endpoint_of, queue_pair_of,
    };

    /// The open device and its protection domain.
    pub(crate) struct DeviceRdma {
        device: &'static Device,
        pd: &'static ProtectionDomain<'static>,
        name: String,
        /// The page store's registrations, kept while the node runs.
        registered: Mutex<Vec<Region<'static>>>,
    }

    impl DeviceRdma {
        /// Opens the first RDMA device and a protection domain, for the life of the process
        /// (leaked on purpose: regions and queue pairs borrow them until the node exits,
        /// and the kernel releases them then).
        pub(crate) fn open() -> Result<DeviceRdma, String> {
            let device = Device::open(None).map_err(|e| pagemesh_api::error_chain(&e))?;
            let name = device.name().to_owned();
            let device: &'static Device = Box::leak(Box::new(device));
            let pd = device
                .protection_domain()
                .map_err(|e| pagemesh_api::error_chain(&e))?;
            let pd: &'static ProtectionDomain<'static> = Box::leak(Box::new(pd));
            tracing::info!("RDMA device {name} open: page traffic may use one-sided reads");
            Ok(DeviceRdma {
                device,
                pd,
                name,
                registered: Mutex::new(Vec::new()),
            })
        }

        /// Registers `store`'s memory (allocated up front, one region:
        /// [`PageStore::with_memory_up_front`]) readable by peers, and returns the endpoint
        /// to register with the coordinator: the port's GID and LID and the regions in slot
        /// order. Its queue pair number is 0: every compute node's connection gets one of
        /// its own (RdmaConnect).
        pub(crate) fn register_store(&self, store: &PageStore) -> Result<RdmaEndpoint, String> {
            let mut regions = Vec::new();
            // Kept only once all are registered: a failure part-way deregisters them (the
            // caller then drops the store).
            let mut done = Vec::new();
            for (addr, len) in store.regions() {
                let bytes = (len + tags_len(len)) as usize;
                // SAFETY: the region (its slots and then their tags) is allocated up front
                // and never freed or moved while the store lives; the node never drops a
                // registered store (its server context is kept to the end of the process),
                // and a failure here deregisters before the caller drops it. Its key is
                // published in the node's registration: what keeps strangers out is that a
                // queue pair connects only through an authenticated RdmaConnect.
                let region =
                    unsafe { self.pd.register(addr as *mut u8, bytes, true) }.map_err(|e| {
                        format!(
                            "cannot register the page store with RDMA device {}: {}",
                            self.name,
                            pagemesh_api::error_chain(&e)
                        )
                    })?;
                let rkey = region.remote().rkey;
                regions.push(RdmaRegion { addr, len, rkey });
                done.push(region);
            }
            let (gid, lid) = self.device.address();
            let endpoint = RdmaEndpoint {
                gid,
                lid,
                qpn: 0,
                psn: 0,
                regions,
            };
            self.registered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(done);
            tracing::info!(
                "registered the page store with RDMA device {} ({} MiB in {} region)",
                self.name,
                endpoint.regions.iter().map(|r| r.len).sum::<u64>() >> 20,
                endpoint.regions.len()
            );
            Ok(endpoint)
        }

        /// What answers RdmaConnect: a responder queue pair per connection.
        pub(crate) fn service(&self) -> Box<dyn RdmaService> {
            Box::new(Responders { pd: self.pd })
        }

        /// What a compute node's connections read through.
        pub(crate) fn readers(&self) -> Arc<dyn Readers> {
            Arc::new(VerbsReaders::new(self.pd))
        }
    }

    struct Responders {
        pd: &'static ProtectionDomain<'static>,
    }

    impl RdmaService for Responders {
        fn connect(&self, client: &QueuePair) -> Result<(QueuePair, Box<dyn Send>), String> {
            let mut qp = self
                .pd
                .responder()
                .map_err(|e| pagemesh_api::error_chain(&e))?;
            let psn = client.psn ^ 0x5a_5a5a;
            qp.connect(&endpoint_of(client), psn)
                .map_err(|e| pagemesh_api::error_chain(&e))?;
            Ok((queue_pair_of(&qp.endpoint(psn)), Box::new(qp)))
        }
    }
}

/// This node's RDMA: a device, or the emulation.
pub(crate) enum NodeRdma {
    /// An RDMA device (a build with the feature).
    #[cfg(feature = "rdma")]
    Device(device::DeviceRdma),
    /// One-sided reads of another process (`--transport rdma-emulated`).
    Emulated,
}

impl NodeRdma {
    /// Opens the first RDMA device.
    pub(crate) fn open() -> Result<NodeRdma, String> {
        #[cfg(feature = "rdma")]
        return device::DeviceRdma::open().map(NodeRdma::Device);
        #[cfg(not(feature = "rdma"))]
        Err(
            "this build of pagemesh-node has no RDMA transport (build it with --features rdma)"
                .into(),
        )
    }

    /// Makes `store` readable by peers and returns the endpoint to register (see
    /// `DeviceRdma::register_store`; emulated: the store's memory with no keys, and the
    /// GID that says so).
    pub(crate) fn register_store(&self, store: &PageStore) -> Result<RdmaEndpoint, String> {
        match self {
            #[cfg(feature = "rdma")]
            NodeRdma::Device(d) => d.register_store(store),
            NodeRdma::Emulated => {
                let regions = store
                    .regions()
                    .into_iter()
                    .map(|(addr, len)| RdmaRegion { addr, len, rkey: 0 })
                    .collect::<Vec<_>>();
                tracing::warn!(
                    "RDMA EMULATED (--transport rdma-emulated): compute nodes on this host \
                     read this node's page store ({} MiB) through the kernel; for tests only",
                    regions.iter().map(|r| r.len).sum::<u64>() >> 20
                );
                Ok(RdmaEndpoint {
                    gid: EMULATED_GID,
                    lid: 0,
                    qpn: 0,
                    psn: 0,
                    regions,
                })
            }
        }
    }

    /// What answers RdmaConnect.
    pub(crate) fn service(&self) -> Box<dyn RdmaService> {
        match self {
            #[cfg(feature = "rdma")]
            NodeRdma::Device(d) => d.service(),
            NodeRdma::Emulated => Box::new(EmulatedResponder),
        }
    }

    /// What a compute node's connections read through.
    pub(crate) fn readers(&self) -> Arc<dyn Readers> {
        match self {
            #[cfg(feature = "rdma")]
            NodeRdma::Device(d) => d.readers(),
            NodeRdma::Emulated => Arc::new(ProcessReaders),
        }
    }
}

/// The memory node's end of an emulated queue pair: its process.
struct EmulatedResponder;

impl RdmaService for EmulatedResponder {
    fn connect(&self, _client: &QueuePair) -> Result<(QueuePair, Box<dyn Send>), String> {
        Ok((responder_end(), Box::new(())))
    }
}
