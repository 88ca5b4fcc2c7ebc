//! What a `pagemesh-node` process does, role by role.
//!
//! Every role starts the page server and registers it with the coordinator (the flow of the
//! original design note: register, discover, connect). A memory node then serves until it
//! is told to stop. A compute node defines a VM, has its memory nodes load their pages, runs
//! the guest workload on userfaultfd-served memory and reports. When its work is over (a
//! compute-only node's run, well or not; otherwise a stop signal) every node leaves the
//! cluster: it deregisters, so that the coordinator no longer lists it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use pagemesh_api::{
    Content, CreateVm, NodeId, PAGE_SIZE, Placement, RegisterEndpoint, Role, TransportKind,
    error_chain,
};
use pagemesh_pager::directory::MAX_NODE_ID;
use pagemesh_pager::{CacheConfig, PageDirectory, PageState};
use pagemesh_server::{ImageDir, PageStore, ServerContext, ShutdownSignal};
use pagemesh_transport::TransportManager;
use pagemesh_transport::local::LocalSource;
use pagemesh_vmm::VcpuError;
use pagemesh_vmm::guest::Initial;
use pagemesh_vmm::memory::RAM_BASE;

use crate::admin::{self, AdminState, LiveRun};
use crate::compute::{RunOptions, run_guest};
use crate::config::values::{
    AdminArg, BackingArg, ByteSize, CompressArg, RDMA_BUILT, TransportChoice,
};
use crate::config::{ConfigError, Settings};
use crate::coordinator::CoordinatorClient;
use crate::define::{content, placement_request, seed, workload};
use crate::error::NodeError;
use crate::lease::LeaseKeeper;
use crate::lifecycle::{Backing, ComputeError, FaultSetup};
use crate::peers::{VmPeers, connect_vm_peers, forget_vm, held, load_vm};
use crate::probes::load_probes;
use crate::rdma::NodeRdma;
use crate::repair::{RepairOptions, Repairer};
use crate::signals::{StopSignals, block_stop_signals, wait_for_stop_signal};
use crate::summary::{MemoryNodes, report, write_failure};
use crate::working_set::{self, VmIdentity};

/// Runs the node as configured; returns whether the run was good (exit code 0).
pub fn run(settings: Settings) -> Result<bool, NodeError> {
    let id = settings.id.ok_or(ConfigError::Missing("--id"))?;
    // Settings::load checked these; `run` may be given settings made otherwise.
    settings.check()?;
    if id > MAX_NODE_ID {
        return Err(ConfigError::Invalid {
            what: "--id",
            why: format!("{id} is larger than {MAX_NODE_ID}"),
        }
        .into());
    }
    let role: Role = settings.role().into();
    let backing = settings.compute.backing;
    if role.computes() && backing != BackingArg::Remote {
        // Benchmark floors: no cluster at all.
        return run_local(id, &settings, backing);
    }
    let signals = block_stop_signals().map_err(NodeError::Signals)?;

    let coordinator_url = settings
        .coordinator
        .clone()
        .ok_or(ConfigError::Missing("--coordinator"))?;
    let keyring = settings.keyring()?;
    let mut coordinator = CoordinatorClient::new(&coordinator_url, settings.coordinator_attempts);
    if let Some(keyring) = &keyring {
        coordinator = coordinator.with_keyring(keyring);
    }

    let refused = |why| ConfigError::Invalid {
        what: "--transport rdma",
        why,
    };
    // Without RDMA where it was to be had: `auto` goes on over TCP with one warning saying
    // why, `rdma` stops.
    let without_rdma = |choice: TransportChoice| {
        if let TransportChoice::TcpInstead(why) = choice {
            tracing::warn!("{why}");
        }
    };
    let choice = settings
        .transport
        .resolve(&pagemesh_transport::rdma::devices(), RDMA_BUILT)
        .map_err(refused)?;
    // The device opens here, before anything registers: a node asked for RDMA that cannot
    // have it fails at start.
    let rdma = match choice {
        TransportChoice::Emulated => Some(NodeRdma::Emulated),
        TransportChoice::Rdma => match NodeRdma::open() {
            Ok(rdma) => Some(rdma),
            Err(why) => {
                without_rdma(settings.transport.unavailable(why).map_err(refused)?);
                None
            }
        },
        tcp => {
            without_rdma(tcp);
            None
        }
    };
    let capacity = if role.serves_memory() {
        settings.memory.capacity
    } else {
        ByteSize(0)
    };
    let capacity_pages = u32::try_from(capacity.pages()).map_err(|_| ConfigError::Invalid {
        what: "--capacity",
        why: "less than 16 TiB".into(),
    })?;
    let listen = settings.listen.clone();
    let listener = TcpListener::bind(&listen).map_err(|e| NodeError::Listen(listen.clone(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NodeError::Listen(listen.clone(), e))?;
    let advertise = settings
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());

    let lookup_client = coordinator.clone();
    let mut store = PageStore::new(capacity_pages);
    // Memory a device reads must stay where it is: the whole store is allocated now, and
    // registered with the device.
    let mut rdma_endpoint = None;
    if let Some(rdma) = rdma.as_ref().filter(|_| role.serves_memory()) {
        store = store.with_memory_up_front();
        match rdma.register_store(&store) {
            Ok(endpoint) => rdma_endpoint = Some(endpoint),
            Err(why) => {
                // Served over TCP, from memory taken as pages come.
                without_rdma(settings.transport.unavailable(why).map_err(refused)?);
                store = PageStore::new(capacity_pages);
            }
        }
    }
    let rdma_store = rdma_endpoint.is_some();
    match &settings.image_dir {
        Some(dir) if role.serves_memory() => {
            let images = ImageDir::open(dir).map_err(|e| NodeError::ImageDir(dir.clone(), e))?;
            tracing::info!("loads VM images only from {}", images.path().display());
            store = store.with_image_dir(images);
        }
        Some(_) => {}
        None if role.serves_memory() => tracing::info!("loads no VM images (no --image-dir)"),
        None => {}
    }
    let mut ctx = ServerContext::new(id, store, move |vm| {
        lookup_client.vm(vm).map_err(Into::into)
    });
    if let Some(rdma) = &rdma {
        if rdma_store {
            ctx = ctx.with_rdma(rdma.service());
        }
        if role.computes() {
            crate::rdma::read_through(rdma);
        }
    }
    let spin = Duration::from_micros(settings.memory.serve_spin_us);
    let mut ctx = ctx
        .with_cluster(settings.cluster.clone().unwrap_or_default())?
        .with_spin(spin)
        .with_max_connections(settings.memory.max_connections)
        .with_idle_timeout(Some(Duration::from_secs(settings.memory.idle_timeout)))
        .with_packing(settings.compress != CompressArg::Off);
    match keyring {
        Some(keyring) => {
            tracing::info!(
                "page server requires the cluster key (key {}, {} accepted)",
                keyring.fingerprint(),
                keyring.len()
            );
            ctx = ctx.with_keyring(keyring);
        }
        None => tracing::warn!(
            "NO CLUSTER KEY: this node serves guest memory to anyone who can reach {bound}; \
             give it --cluster-key-file (fine only for a loopback demo; see docs/security.md)"
        ),
    }
    match settings.tls()? {
        Some(tls) => {
            tracing::info!("page server speaks TLS only, to clients of the cluster's CA");
            ctx = ctx.with_tls(tls.server);
        }
        None => tracing::info!("page traffic is not encrypted (no --tls-cert)"),
    }
    let ctx = Arc::new(ctx);
    if rdma_store {
        // The registered store must outlive its registration, which lasts until the
        // process exits (the device is never closed): the context is never dropped.
        std::mem::forget(Arc::clone(&ctx));
    }
    let shutdown = ShutdownSignal::new();
    let server_thread = pagemesh_server::serve(listener, ctx.clone(), shutdown.clone())?;

    let admin_state = Arc::new(AdminState::new(id, role, ctx.clone()));
    // Exports over OTLP when asked to; the last export goes out when `_otlp` is dropped.
    let _otlp = crate::otlp::start(&settings, admin_state.clone())?;
    let admin_addr = match &settings.admin {
        AdminArg::Off => None,
        AdminArg::Listen(addr) => {
            let bound = admin::start(addr, admin_state.clone())?;
            tracing::info!("admin endpoint on http://{bound} (/stats, /metrics, /healthz)");
            Some(bound.to_string())
        }
    };

    let registration = RegisterEndpoint {
        transport: TransportKind::Tcp,
        address: advertise.clone(),
        role,
        capacity_bytes: capacity.bytes(),
        cluster: settings.cluster.clone(),
        replace: settings.replace,
        admin: admin_addr.clone(),
        // The page store's registered regions, with RDMA (the TCP address above stays the
        // one claims, write-backs and control go to).
        rdma: rdma_endpoint,
    };
    let info = coordinator.register_with_coordinator(id, &registration)?;
    let lease = LeaseKeeper::start(&coordinator, &info, registration);
    // A memory node makes again the copies of memory nodes that died (docs/replication.md).
    let repairer = if role.serves_memory() {
        Some(Repairer::start(
            id,
            &coordinator,
            ctx.clone(),
            admin_state.repair.clone(),
            RepairOptions {
                credentials: crate::peers::credentials(&settings)?,
                timeout: settings.compute.peer_timeout,
                every: Repairer::every(info.lease_ms),
                rate: settings.memory.repair_rate.map(|r| r.0),
                compression: settings.compress.into(),
            },
        ))
    } else {
        None
    };
    tracing::info!(
        "registered node {id} ({role}) at {advertise} with {}",
        coordinator.url()
    );
    println!("pagemesh-node {id} ({role}) serving pages on {advertise}");
    if let Some(a) = &admin_addr {
        println!("pagemesh-node {id} admin on http://{a}");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    debug_assert_eq!(info.node_id, id);

    let outcome = if role.computes() && settings.linux.kernel.is_some() {
        crate::linux_guest::run_linux(id, &settings, &coordinator, &admin_state, &signals)
    } else if role.computes() && settings.compute.workload.is_some() {
        let ok = run_compute(id, &settings, &coordinator, &admin_state, &signals);
        // A stop signal during the run stopped the guest; it stops the node too.
        let signalled = matches!(
            &ok,
            Err(NodeError::Compute(ComputeError::Vcpu(VcpuError::Stopped)))
        );
        if (role.serves_memory() || settings.compute.hold) && !signalled {
            tracing::info!("run finished; staying up until stopped (Ctrl-C or SIGTERM)");
            wait_for_stop_signal(&signals)
                .map_err(NodeError::Signals)
                .and(ok)
        } else {
            ok
        }
    } else {
        tracing::info!("serving pages until stopped (Ctrl-C or SIGTERM)");
        wait_for_stop_signal(&signals)
            .map(|()| true)
            .map_err(NodeError::Signals)
    };
    // The lease first (a renewal after leaving would register the node again), then
    // before the page server stops, so that no peer is sent to a closed port.
    drop(repairer);
    drop(lease);
    leave(&coordinator, id, &advertise);
    shutdown.trigger();
    let _ = server_thread.join();
    let s = ctx.stats();
    tracing::info!(
        "stopped: served {} pages ({} claimed), {} written back, {} bad frames, {} connections",
        s.pages_served,
        s.pages_claimed,
        s.pages_written_back,
        s.bad_frames,
        s.connections
    );
    outcome
}

/// Tells the coordinator that node `id`, whose pages were at `address`, has left the
/// cluster, whether its run went well or not: it is no longer listed, so the console logs
/// it as gone rather than down, and no new VM places pages on it. Best effort: a node that
/// cannot tell the coordinator stops all the same.
fn leave(coordinator: &CoordinatorClient, id: NodeId, address: &str) {
    match coordinator.deregister(id, address) {
        Ok(()) => tracing::info!("node {id} left the cluster at {}", coordinator.url()),
        Err(e) => tracing::warn!(
            "node {id} could not leave the cluster; the coordinator may still list it: {}",
            error_chain(&e)
        ),
    }
}

fn run_compute(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    admin: &AdminState,
    signals: &StopSignals,
) -> Result<bool, NodeError> {
    let c = &settings.compute;
    let mem = c.mem().bytes();
    let pages = c.mem().pages();
    let content = content(c)?;
    let workload = workload(c)?;
    let identity = VmIdentity::new(pages, content.clone());
    let replay = working_set::to_replay(settings, &identity)?;
    // The vCPUs share the workload out: refused now if they cannot.
    let vcpus = settings.linux.vcpus;
    workload.split(u64::from(vcpus))?;
    let handlers = fault_handlers(settings, usize::from(vcpus))?;
    let vm = coordinator.create_vm(&CreateVm {
        compute_node: id,
        mem_bytes: mem,
        placement: placement_request(settings, coordinator, pages)?,
        content: content.clone(),
        local_memory_bytes: c.local_memory.map(|b| b.bytes()),
        replicas: c.replicas,
    })?;
    tracing::info!(
        "created VM {} ({} pages) placed on nodes {:?}",
        vm.id,
        pages,
        vm.placement.nodes()
    );
    let budgeted = vm.local_memory_bytes.is_some();
    let VmPeers {
        transport,
        more_handlers,
        mut control,
        writeback,
        prefetch,
        lost,
    } = connect_vm_peers(id, settings, coordinator, &vm, handlers)?;

    let directory = match &content {
        // Under a budget every page needs a home to write back to, which must know the VM.
        Content::Zero if budgeted => {
            load_vm(&mut control, &vm)?;
            PageDirectory::homed(&vm.placement, PageState::Zero).map_err(|e| {
                ConfigError::Invalid {
                    what: "placement",
                    why: e.to_string(),
                }
            })?
        }
        Content::Zero => PageDirectory::new(pages),
        Content::Pattern { .. } | Content::Image { .. } => {
            load_vm(&mut control, &vm)?;
            let mut dir = directory_of(&vm.placement, settings.compute.huge_pages)?;
            if let Content::Image { path } = &content
                && let Ok(meta) = std::fs::metadata(path)
            {
                // Pages past the end of the image were not loaded: they are never-written.
                dir.never_written_from(meta.len().div_ceil(PAGE_SIZE as u64));
            }
            dir
        }
    };
    // With zero content nothing was loaded (unless under a budget), so there is nothing to
    // count or release.
    let loaded = budgeted || !matches!(content, Content::Zero);
    let held_before = if loaded {
        held(&mut control, &vm)?
    } else {
        BTreeMap::new()
    };
    let initial = match content {
        Content::Pattern { seed } => Initial::Pattern(seed),
        Content::Zero => Initial::Zero,
        Content::Image { .. } => Initial::Unknown,
    };
    let opts = RunOptions {
        vm: vm.id,
        mem_bytes: mem,
        workload,
        initial,
        faults: FaultSetup::of(c),
        huge_pages: c.huge_pages,
        vcpus: settings.linux.vcpus,
        dump_ram: c.dump_ram.clone(),
    };
    let probes = load_probes(
        settings,
        admin,
        RAM_BASE / PAGE_SIZE as u64,
        (RAM_BASE + mem) / PAGE_SIZE as u64,
    );
    tracing::info!("running {workload} on VM {}", vm.id);
    let outcome = run_guest(
        &opts,
        Backing::Pager {
            directory: Arc::new(directory),
            transport,
            more_handlers,
            cache: cache_config(settings, &vm, writeback),
            prefetch: working_set::prefetch_config(settings, prefetch, replay),
            record_working_set: c.record_working_set.is_some(),
            huge_pages: c.huge_pages,
        },
        Some(signals),
        |live| {
            *admin.run.lock().unwrap_or_else(|p| p.into_inner()) = Some(LiveRun {
                lost: Some(lost.clone()),
                ..live
            });
        },
    );
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            write_failure(settings, id, &vm, &e)?;
            return Err(e.into());
        }
    };
    working_set::record(settings, &identity, outcome.working_set.as_deref())?;
    let held_after = if loaded {
        held(&mut control, &vm)?
    } else {
        BTreeMap::new()
    };
    if !c.keep_vm {
        if loaded {
            forget_vm(&mut control, coordinator, &vm);
        } else if let Err(e) = coordinator.delete_vm(vm.id) {
            tracing::warn!("VM {} could not be deleted: {}", vm.id, error_chain(&e));
        }
    }
    let ebpf = probes.as_ref().map(|p| p.summary());
    report(
        settings,
        id,
        Some(&vm),
        &outcome,
        &MemoryNodes {
            held_before,
            held_after,
            lost: lost.nodes(),
        },
        ebpf,
    )
}

/// How many fault handlers serve a VM of `vcpus` vCPUs: `--fault-handlers`, else one per
/// vCPU; one under a budget (`--local-memory`), where more are refused. Checked before the
/// VM is defined, so that a refusal leaves nothing loaded.
pub(crate) fn fault_handlers(settings: &Settings, vcpus: usize) -> Result<usize, ConfigError> {
    let budgeted = settings.compute.local_memory.is_some();
    match settings.compute.fault_handlers {
        Some(n) if budgeted && n > 1 => Err(ConfigError::Invalid {
            what: "--fault-handlers",
            why: pagemesh_pager::BudgetError::OneHandler.to_string(),
        }),
        Some(n) => Ok(usize::from(n)),
        None if budgeted && vcpus > 1 => {
            tracing::info!(
                "under --local-memory one fault handler serves all {vcpus} vCPUs (the page \
                 cache's fault path is not concurrent yet)"
            );
            Ok(1)
        }
        None => Ok(vcpus),
    }
}

/// The page directory of a VM whose pages are where `placement` put them: an entry per
/// 2 MiB huge page with `huge` (each fault resolves a whole one), per 4 KiB page otherwise.
pub(crate) fn directory_of(
    placement: &Placement,
    huge: bool,
) -> Result<PageDirectory, ConfigError> {
    if huge {
        PageDirectory::coarse(placement, pagemesh_pager::PAGES_PER_HUGE_PAGE)
    } else {
        PageDirectory::from_placement(placement)
    }
    .map_err(|e| ConfigError::Invalid {
        what: "placement",
        why: e.to_string(),
    })
}

/// The page cache of `vm`, if it has a local memory budget.
pub(crate) fn cache_config(
    settings: &Settings,
    vm: &pagemesh_api::Vm,
    writeback: Option<TransportManager>,
) -> Option<CacheConfig> {
    let budget = vm.local_memory_bytes?;
    Some(CacheConfig {
        budget_pages: budget / PAGE_SIZE as u64,
        policy: settings.compute.eviction.into(),
        writeback: writeback?,
        patience: settings.compute.peer_timeout,
    })
}

fn run_local(id: NodeId, settings: &Settings, backing: BackingArg) -> Result<bool, NodeError> {
    let c = &settings.compute;
    if c.record_working_set.is_some() || c.replay_working_set.is_some() {
        return Err(ConfigError::Invalid {
            what: "--record-working-set/--replay-working-set",
            why: "a working set is recorded and replayed on a VM of the cluster: drop --backing, \
                  or give --backing remote"
                .into(),
        }
        .into());
    }
    let mem = c.mem().bytes();
    let pages = c.mem().pages();
    let workload = workload(c)?;
    workload.split(u64::from(settings.linux.vcpus))?;
    let seed = seed(c);
    let (backing, initial) = match backing {
        BackingArg::DemandZero => (Backing::DemandZero, Initial::Zero),
        BackingArg::UffdLocal | BackingArg::Remote => {
            let mut transport = TransportManager::new(id, pagemesh_transport::DEFAULT_TIMEOUT);
            transport.add_source(Box::new(LocalSource::with_pattern(1, 0, pages, seed)));
            let placement = pagemesh_api::Placement::interleave(vec![1], 1, pages)
                .expect("one node, one-page granule, non-empty VM");
            let directory = directory_of(&placement, c.huge_pages)?;
            (
                Backing::Pager {
                    directory: Arc::new(directory),
                    transport,
                    more_handlers: Vec::new(),
                    cache: None,
                    prefetch: None,
                    record_working_set: false,
                    huge_pages: c.huge_pages,
                },
                Initial::Pattern(seed),
            )
        }
    };
    let opts = RunOptions {
        vm: 0,
        mem_bytes: mem,
        workload,
        initial,
        faults: FaultSetup::of(c),
        huge_pages: c.huge_pages,
        vcpus: settings.linux.vcpus,
        dump_ram: c.dump_ram.clone(),
    };
    let outcome = run_guest(&opts, backing, None, |_| {})?;
    report(settings, id, None, &outcome, &MemoryNodes::default(), None)
}
