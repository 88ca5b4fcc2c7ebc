//! What a `pagemesh-node` process does, role by role.
//!
//! Every role starts the page server and registers it with the coordinator (the flow of the
//! original design note: register, discover, connect). A memory node then serves until it
//! is told to stop. A compute node defines a VM, has its memory nodes load their pages, runs
//! the guest workload on userfaultfd-served memory and reports.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pagemesh_api::{
    Content, CreateVm, NodeId, PAGE_SIZE, PageRange, PlacementRequest, RegisterEndpoint, Role,
    TransportKind, Vm,
};

use crate::admin::{self, AdminState, KernelProbes};
use crate::compute::{Backing, ComputeError, RunOptions, RunOutcome, run_guest};
use crate::config::{BackingArg, ConfigError, PlacementArg, RoleArg, Settings, parse_size};
use crate::coordinator::{CoordinatorClient, CoordinatorError};
use crate::pager::PageDirectory;
use crate::pager::directory::MAX_NODE_ID;
use crate::server::{self, PageStore, ServerContext, ShutdownSignal};
use crate::transport::local::LocalSource;
use crate::transport::{TransportError, TransportManager};
use crate::vm::Workload;
use crate::vm::guest::{Initial, WorkloadError};
use crate::vm::memory::RAM_BASE;

/// Errors of a node run.
#[derive(thiserror::Error, Debug)]
pub enum NodeError {
    /// Bad settings.
    #[error("bad configuration")]
    Config(#[from] ConfigError),
    /// Bad workload.
    #[error("bad workload")]
    Workload(#[from] WorkloadError),
    /// The page server could not listen.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The page server could not start.
    #[error("cannot start the page server")]
    Server(#[from] server::ServerError),
    /// The coordinator could not be used.
    #[error(transparent)]
    Coordinator(#[from] CoordinatorError),
    /// A memory node could not load or report the VM's pages.
    #[error("memory node {node} could not {what} VM {vm}")]
    Peer {
        /// Node.
        node: NodeId,
        /// What.
        what: &'static str,
        /// VM.
        vm: u32,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// The Linux guest's VM failed.
    #[error("the Linux guest failed")]
    Linux(#[from] crate::vm::vcpu::VcpuError),
    /// The guest run failed.
    #[error("guest run failed")]
    Compute(#[from] ComputeError),
    /// Writing the summary failed.
    #[error("cannot write the summary to {0}")]
    Summary(String, #[source] std::io::Error),
    /// The admin endpoint could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// Waiting for a stop signal failed.
    #[error("cannot wait for signals")]
    Signals(#[source] std::io::Error),
}

/// Runs the node as configured; returns whether the run was good (exit code 0).
pub fn run(settings: Settings) -> Result<bool, NodeError> {
    let id = settings.id.ok_or(ConfigError::Missing("--id"))?;
    if id > MAX_NODE_ID {
        return Err(ConfigError::Invalid {
            what: "--id",
            why: format!("{id} is larger than {MAX_NODE_ID}"),
        }
        .into());
    }
    let role = settings.role.unwrap_or(
        if settings.workload.is_some() || settings.kernel.is_some() {
            RoleArg::Compute
        } else {
            RoleArg::Memory
        },
    );
    let role: Role = role.into();
    let backing = settings.backing.unwrap_or(BackingArg::Remote);
    if role.computes() && backing != BackingArg::Remote {
        // Benchmark floors: no cluster at all.
        return run_local(id, &settings, backing);
    }
    let signals = block_stop_signals().map_err(NodeError::Signals)?;

    let coordinator_url = settings
        .coordinator
        .clone()
        .ok_or(ConfigError::Missing("--coordinator"))?;
    let coordinator =
        CoordinatorClient::new(&coordinator_url, settings.coordinator_attempts.unwrap_or(5));

    let capacity = if role.serves_memory() {
        settings.capacity.unwrap_or(1 << 30)
    } else {
        0
    };
    let capacity_pages =
        u32::try_from(capacity / PAGE_SIZE as u64).map_err(|_| ConfigError::Invalid {
            what: "--capacity",
            why: "at most 16 TiB".into(),
        })?;
    let listen = settings
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = TcpListener::bind(&listen).map_err(|e| NodeError::Listen(listen.clone(), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| NodeError::Listen(listen.clone(), e))?;
    let advertise = settings
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());

    let lookup_client = coordinator.clone();
    let ctx = ServerContext::new(id, PageStore::new(capacity_pages), move |vm| {
        lookup_client.vm(vm).map_err(|e| error_chain(&e))
    });
    let spin = settings
        .serve_spin_us
        .map_or(server::DEFAULT_SERVER_SPIN, Duration::from_micros);
    let ctx = Arc::new(
        ctx.with_cluster(settings.cluster.clone().unwrap_or_default())?
            .with_spin(spin),
    );
    let shutdown = ShutdownSignal::new();
    let server_thread = server::serve(listener, ctx.clone(), shutdown.clone())?;

    let admin_state = Arc::new(AdminState::new(id, role, ctx.clone()));
    // Exports over OTLP when asked to; the last export goes out when `_otlp` is dropped.
    let _otlp = crate::otlp::start(&settings, admin_state.clone())?;
    let admin_addr = match settings.admin.as_deref().unwrap_or("127.0.0.1:0") {
        "off" | "none" => None,
        addr => {
            let bound = admin::start(addr, admin_state.clone())?;
            tracing::info!("admin endpoint on http://{bound} (/stats, /metrics, /healthz)");
            Some(bound.to_string())
        }
    };

    let info = coordinator.register_with_coordinator(
        id,
        &RegisterEndpoint {
            transport: TransportKind::Tcp,
            address: advertise.clone(),
            role,
            capacity_bytes: capacity,
            cluster: settings.cluster.clone(),
            replace: settings.replace,
            admin: admin_addr.clone(),
        },
    )?;
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

    let ok = if role.computes() && settings.kernel.is_some() {
        crate::linux_guest::run_linux(id, &settings, &coordinator, &admin_state, &signals)?
    } else if role.computes() && settings.workload.is_some() {
        let ok = run_compute(id, &settings, &coordinator, &admin_state);
        if role.serves_memory() || settings.hold {
            tracing::info!("run finished; staying up until stopped (Ctrl-C or SIGTERM)");
            wait_for_stop_signal(&signals)?;
        }
        ok?
    } else {
        tracing::info!("serving pages until stopped (Ctrl-C or SIGTERM)");
        wait_for_stop_signal(&signals)?;
        true
    };
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
    Ok(ok)
}

/// Loads the eBPF probes for this process unless `--no-ebpf`, with heat counters for guest
/// frames `0 .. frames`, of which VM page 0 is frame `first_gfn`; a node that cannot load
/// them warns once, saying why, and runs on without them. Their figures go to `/stats`.
pub(crate) fn load_probes(
    settings: &Settings,
    admin: &AdminState,
    first_gfn: u64,
    frames: u64,
) -> Option<Arc<crate::ebpf::Probes>> {
    if settings.no_ebpf {
        tracing::info!("eBPF probes disabled (--no-ebpf)");
        return None;
    }
    match crate::ebpf::Probes::load(std::process::id(), frames) {
        Ok(p) => {
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

/// Connects to every node holding pages of `vm`, twice: once for the pager (the fault path
/// owns those connections) and once for control requests (load, held, release).
pub(crate) fn connect_vm_peers(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    vm: &Vm,
) -> Result<(TransportManager, TransportManager), NodeError> {
    let timeout = Duration::from_secs_f64(settings.peer_timeout.unwrap_or(5.0).max(0.001));
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

/// Seeds differ per run so that a page left over from another VM fails verification.
fn default_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

pub(crate) fn guest_mem(settings: &Settings, default: u64) -> Result<u64, NodeError> {
    let mem = settings.mem.unwrap_or(default);
    if mem == 0 || !mem.is_multiple_of(PAGE_SIZE as u64) || mem > crate::vm::memory::MAX_RAM {
        return Err(ConfigError::Invalid {
            what: "--mem",
            why: format!(
                "guest memory must be a non-zero multiple of 4 KiB and at most 63 GiB, got {mem} bytes"
            ),
        }
        .into());
    }
    Ok(mem)
}

fn workload(settings: &Settings, ram_pages: u64) -> Result<Workload, NodeError> {
    let (first, pages) = match &settings.range {
        None => (0, ram_pages),
        Some(r) => {
            let (off, len) = r.split_once(':').ok_or_else(|| ConfigError::Invalid {
                what: "--range",
                why: format!("'{r}' is not OFFSET:LENGTH"),
            })?;
            let bad = |why: String| ConfigError::Invalid {
                what: "--range",
                why,
            };
            let off = parse_size(off).map_err(bad)?;
            let len = parse_size(len).map_err(bad)?;
            (off / PAGE_SIZE as u64, len.div_ceil(PAGE_SIZE as u64))
        }
    };
    Ok(Workload::parse(
        settings.workload.as_deref().unwrap_or("verify"),
        settings.access.as_deref().unwrap_or("read"),
        first,
        pages,
        ram_pages,
    )?)
}

fn content(settings: &Settings) -> Result<Content, NodeError> {
    if let Some(image) = &settings.image {
        let path = std::fs::canonicalize(image).map_err(|e| ConfigError::Invalid {
            what: "--image",
            why: format!("{}: {e}", image.display()),
        })?;
        return Ok(Content::Image {
            path: path.display().to_string(),
        });
    }
    match settings.content.as_deref().unwrap_or("pattern") {
        "pattern" => Ok(Content::Pattern {
            seed: settings.seed.unwrap_or_else(default_seed),
        }),
        "zero" => Ok(Content::Zero),
        "image" => Err(ConfigError::Missing("--image (for --content image)").into()),
        other => Err(ConfigError::Invalid {
            what: "--content",
            why: format!("'{other}'; expected pattern, zero or image"),
        }
        .into()),
    }
}

pub(crate) fn placement_request(
    settings: &Settings,
    coordinator: &CoordinatorClient,
    pages: u64,
) -> Result<PlacementRequest, NodeError> {
    let nodes = settings.memory_nodes.clone().unwrap_or_default();
    Ok(
        match settings.placement.unwrap_or(PlacementArg::Interleave) {
            PlacementArg::Interleave => PlacementRequest::Interleave {
                nodes,
                granule_pages: 1,
            },
            PlacementArg::Weighted => PlacementRequest::Weighted { nodes },
            PlacementArg::Ranges => {
                let nodes = if nodes.is_empty() {
                    coordinator
                        .nodes()?
                        .into_iter()
                        .filter(|n| n.role.serves_memory())
                        .map(|n| n.node_id)
                        .collect()
                } else {
                    nodes
                };
                let k = nodes.len().max(1) as u64;
                let ranges = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &node)| {
                        let i = i as u64;
                        let start = pages * i / k;
                        PageRange {
                            start,
                            pages: pages * (i + 1) / k - start,
                            node,
                        }
                    })
                    .collect();
                PlacementRequest::Ranges { ranges }
            }
        },
    )
}

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

fn run_compute(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    admin: &AdminState,
) -> Result<bool, NodeError> {
    let mem = guest_mem(settings, 256 << 20)?;
    let pages = mem / PAGE_SIZE as u64;
    let content = content(settings)?;
    let workload = workload(settings, pages)?;
    let vm = coordinator.create_vm(&CreateVm {
        compute_node: id,
        mem_bytes: mem,
        placement: placement_request(settings, coordinator, pages)?,
        content: content.clone(),
    })?;
    tracing::info!(
        "created VM {} ({} pages) placed on nodes {:?}",
        vm.id,
        pages,
        vm.placement.nodes()
    );
    let (transport, mut control) = connect_vm_peers(id, settings, coordinator, &vm)?;

    let directory = match &content {
        Content::Zero => PageDirectory::new(pages),
        Content::Pattern { .. } | Content::Image { .. } => {
            load_vm(&mut control, &vm)?;
            let dir =
                PageDirectory::from_placement(&vm.placement).map_err(|e| ConfigError::Invalid {
                    what: "placement",
                    why: e.to_string(),
                })?;
            if let Content::Image { path } = &content
                && let Ok(meta) = std::fs::metadata(path)
            {
                // Pages past the end of the image were not loaded: they are never-written.
                for p in meta.len().div_ceil(PAGE_SIZE as u64)..pages {
                    let _ = dir.set_owner(p, crate::pager::PageOwner::Zero);
                }
            }
            dir
        }
    };
    // With zero content nothing was loaded, so there is nothing to count or release.
    let loaded = !matches!(content, Content::Zero);
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
        cpu: settings.pin_cpu,
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
        },
        |done| tracing::debug!("guest: {done} pages done"),
        |live| *admin.run.lock().unwrap_or_else(|p| p.into_inner()) = Some(live),
    );
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            write_failure(settings, id, &vm, &e)?;
            return Err(e.into());
        }
    };
    let held_after = if loaded {
        held(&mut control, &vm)?
    } else {
        BTreeMap::new()
    };
    if loaded && !settings.keep_vm {
        release_vm(&mut control, &vm);
    }
    let ebpf = probes.as_ref().map(|p| p.ebpf_summary_json());
    report(
        settings,
        id,
        Some(&vm),
        &outcome,
        &held_before,
        &held_after,
        ebpf,
    )
}

fn run_local(id: NodeId, settings: &Settings, backing: BackingArg) -> Result<bool, NodeError> {
    let mem = guest_mem(settings, 64 << 20)?;
    let pages = mem / PAGE_SIZE as u64;
    let workload = workload(settings, pages)?;
    let seed = settings.seed.unwrap_or_else(default_seed);
    let (backing, initial) = match backing {
        BackingArg::DemandZero => (Backing::DemandZero, Initial::Zero),
        BackingArg::UffdLocal | BackingArg::Remote => {
            let mut transport = TransportManager::new(id, crate::transport::DEFAULT_TIMEOUT);
            transport.add_source(Box::new(LocalSource::with_pattern(1, 0, pages, seed)));
            let placement = pagemesh_api::Placement::interleave(vec![1], 1, pages)
                .expect("one node, one-page granule, non-empty VM");
            let directory = PageDirectory::from_placement(&placement)
                .expect("node 1 fits in a directory entry");
            (
                Backing::Pager {
                    directory: Arc::new(directory),
                    transport,
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
        cpu: settings.pin_cpu,
    };
    let outcome = run_guest(&opts, backing, |_| {}, |_| {})?;
    report(
        settings,
        id,
        None,
        &outcome,
        &BTreeMap::new(),
        &BTreeMap::new(),
        None,
    )
}

fn write_failure(
    settings: &Settings,
    id: NodeId,
    vm: &Vm,
    e: &ComputeError,
) -> Result<(), NodeError> {
    if let Some(path) = &settings.json {
        let v = serde_json::json!({
            "node": id, "vm": vm.id, "ok": false, "error": error_chain(e),
        });
        std::fs::write(path, v.to_string() + "\n")
            .map_err(|e| NodeError::Summary(path.display().to_string(), e))?;
    }
    Ok(())
}

fn report(
    settings: &Settings,
    id: NodeId,
    vm: Option<&Vm>,
    o: &RunOutcome,
    held_before: &BTreeMap<NodeId, u64>,
    held_after: &BTreeMap<NodeId, u64>,
    ebpf: Option<serde_json::Value>,
) -> Result<bool, NodeError> {
    let ok = o.ok();
    let w = &o.result;
    let s = &o.stats;
    println!(
        "vm {}: {} pages in {:.3} s ({:.2} µs/page)",
        vm.map_or(0, |v| v.id),
        w.pages_done,
        o.elapsed.as_secs_f64(),
        o.us_per_page()
    );
    println!(
        "  faults: {} remote, {} local zero-fill, {} spurious (remote-miss ratio {:.3})",
        s.remote, s.local_zero, s.spurious, s.remote_miss_ratio
    );
    println!(
        "  fault latency: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        s.fault_p50_us, s.fault_p90_us, s.fault_p99_us, s.fault_max_us
    );
    for (n, before) in held_before {
        println!(
            "  node {n}: held {before} pages before, {} after",
            held_after.get(n).copied().unwrap_or(0)
        );
    }
    match (w.first_bad_page, o.expected_checksum) {
        (Some(p), _) => println!(
            "  verification FAILED: {} bad pages, first bad page {p}",
            w.bad_pages
        ),
        (None, Some(c)) if c != w.checksum => println!(
            "  checksum MISMATCH: guest {:#x}, expected {c:#x}",
            w.checksum
        ),
        (None, Some(_)) => println!("  content: all {} pages as expected", w.pages_done),
        (None, None) => println!("  content: not checked (unknown in advance)"),
    }
    println!("  result: {}", if ok { "OK" } else { "FAILED" });
    if let Some(path) = &settings.json {
        let v = serde_json::json!({
            "node": id,
            "vm": vm.map(|v| v.id),
            "guest_pages": vm.map_or(w.pages_done, |v| v.placement.pages()),
            "faults": {"remote": s.remote, "local_zero": s.local_zero, "spurious": s.spurious, "errors": s.errors},
            "remote_miss_ratio": s.remote_miss_ratio,
            "fault_p50_us": s.fault_p50_us,
            "fault_p90_us": s.fault_p90_us,
            "fault_p99_us": s.fault_p99_us,
            "fault_max_us": s.fault_max_us,
            "bytes_fetched": s.bytes_fetched,
            "us_per_page": o.us_per_page(),
            "elapsed_s": o.elapsed.as_secs_f64(),
            "result": w,
            "expected_checksum": o.expected_checksum,
            "held_before": held_before,
            "held_after": held_after,
            "ebpf": ebpf,
            "ok": ok,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
        .map_err(|e| NodeError::Summary(path.display().to_string(), e))?;
    }
    Ok(ok)
}

pub use pagemesh_api::error_chain;

/// SIGINT and SIGTERM, blocked in every thread so that the main thread can wait for them.
pub struct StopSignals(libc::sigset_t);

fn block_stop_signals() -> std::io::Result<StopSignals> {
    // SAFETY: sigemptyset/sigaddset initialise and modify a local sigset_t;
    // pthread_sigmask blocks them for this thread and the threads it spawns later.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // SIGUSR2: "the guest has finished", sent by the vCPU thread to the main thread.
        libc::sigaddset(&mut set, libc::SIGUSR2);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals(set))
    }
}

/// Waits for SIGINT or SIGTERM.
pub(crate) fn wait_for_stop_signal(signals: &StopSignals) -> Result<(), NodeError> {
    loop {
        let sig = wait_signal(signals)?;
        if sig != libc::SIGUSR2 {
            tracing::info!("signal {sig} received; shutting down");
            return Ok(());
        }
    }
}

/// Like [`wait_signal`], giving up after `timeout` (`None`).
pub(crate) fn wait_signal_for(
    signals: &StopSignals,
    timeout: std::time::Duration,
) -> Result<Option<i32>, NodeError> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: sigtimedwait on a set of signals this thread has blocked; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(&signals.0, std::ptr::null_mut(), &ts) };
    if sig >= 0 {
        return Ok(Some(sig));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(NodeError::Signals(e)),
    }
}

/// Waits for any of the blocked signals (SIGINT, SIGTERM, or SIGUSR2 from the vCPU thread).
pub(crate) fn wait_signal(signals: &StopSignals) -> Result<i32, NodeError> {
    let mut sig = 0;
    // SAFETY: sigwait on a set of signals this thread has blocked.
    let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
    if rc != 0 {
        return Err(NodeError::Signals(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(sig)
}
