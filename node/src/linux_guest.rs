//! A compute node booting a Linux kernel whose memory lives on the memory nodes.
//!
//! 1. Lay out guest RAM (kernel, initrd, command line, boot parameters, page tables) in an
//!    image ([`pagemesh_vmm::boot`]) and write it to a file.
//! 2. Define the VM with that image as its content; the memory nodes load their share.
//! 3. Start the VM on empty, userfaultfd-registered RAM: every page the kernel touches,
//!    its own text included, is fetched from its memory node on first touch.
//! 4. Run until the guest resets (e.g. `poweroff` with `reboot=k`) or the node is told to
//!    stop (SIGTERM, Ctrl-C); then tear the VM down and report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pagemesh_api::error_chain;
use pagemesh_api::summary::{LinuxRun, RunSummary};
use pagemesh_api::{Content, CreateVm, NodeId};
use pagemesh_vmm::boot;
use pagemesh_vmm::linux::{LinuxExit, LinuxMachine};
use pagemesh_vmm::memory::{MemoryError, RamPages};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::admin::{AdminState, LiveRun};
use crate::config::{ConfigError, Settings};
use crate::coordinator::CoordinatorClient;
use crate::define::placement_request;
use crate::error::NodeError;
use crate::lifecycle::{Backing, ComputeError, FaultSetup, Launch, run_vm};
use crate::peers::{VmPeers, connect_vm_peers, held, load_vm};
use crate::signals::StopSignals;
use crate::working_set::VmIdentity;

/// The command line used when `--cmdline` is not given: a serial console, and the
/// features the instruction emulator of software-assisted KVM cannot handle turned off
/// (harmless on hosts with VT-x/AMD-V). See `docs/linux-guest.md`.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd noxsave nofsgsbase \
    clearcpuid=137,141,151,158,298,306,308 mitigations=off init_on_alloc=0 \
    cryptomgr.notests nosoftlockup nowatchdog rodata=off \
    initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,load_system_certificate_list \
    rdinit=/init";

/// Boots the kernel named in `settings` and runs it until it resets or a stop signal.
pub fn run_linux(
    id: NodeId,
    settings: &Settings,
    coordinator: &CoordinatorClient,
    admin: &AdminState,
    signals: &StopSignals,
) -> Result<bool, NodeError> {
    // The vCPUs (1 to MAX_VCPUS) were checked when parsed, and that the memory fits a Linux
    // guest (MAX_LINUX_RAM) by Settings::check.
    let linux = &settings.linux;
    let kernel = linux
        .kernel
        .clone()
        .ok_or(ConfigError::Missing("--kernel"))?;
    let vcpus = linux.vcpus;
    let mem = settings.compute.mem().bytes();
    let pages = settings.compute.mem().pages();
    let cmdline = linux.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
    let (image, entry) = boot::build_image(mem, &kernel, linux.initrd.as_deref(), cmdline, vcpus)
        .map_err(|e| ConfigError::Invalid {
        what: "--kernel",
        why: error_chain(&e),
    })?;
    let image_dir = settings
        .image_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let image_path = write_image(&image_dir, id, &image).map_err(|e| ConfigError::Invalid {
        what: "the guest image",
        why: e.to_string(),
    })?;
    drop(image);
    let _cleanup = RemoveOnDrop(image_path.clone());
    // The boot image is written anew each run: the kernel file is what a working set
    // belongs to.
    let identity = VmIdentity::new(
        pages,
        Content::Image {
            path: kernel.display().to_string(),
        },
    );
    let replay = crate::working_set::to_replay(settings, &identity)?;
    let handlers = crate::service::fault_handlers(settings, usize::from(vcpus))?;

    let vm = coordinator.create_vm(&CreateVm {
        compute_node: id,
        mem_bytes: mem,
        placement: placement_request(settings, coordinator, pages)?,
        content: Content::Image {
            path: image_path.display().to_string(),
        },
        local_memory_bytes: settings.compute.local_memory.map(|b| b.bytes()),
        replicas: settings.compute.replicas,
    })?;
    tracing::info!(
        "created VM {} for kernel {} ({} pages on nodes {:?})",
        vm.id,
        kernel.display(),
        pages,
        vm.placement.nodes()
    );
    let VmPeers {
        transport,
        more_handlers,
        mut control,
        writeback,
        prefetch,
        lost,
    } = connect_vm_peers(id, settings, coordinator, &vm, handlers)?;
    load_vm(&mut control, &vm)?;
    let held_before = held(&mut control, &vm)?;
    let directory = Arc::new(crate::service::directory_of(
        &vm.placement,
        settings.compute.huge_pages,
    )?);

    let pages_of_ram = if settings.compute.huge_pages {
        RamPages::Huge
    } else {
        RamPages::Small
    };
    let region = pagemesh_vmm::memory::ram_region(GuestAddress(0), mem as usize, pages_of_ram)
        .map_err(ComputeError::Memory)?;
    let ram = GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| ComputeError::Memory(MemoryError::Map(mem, e.into())))?;
    let mut machine = LinuxMachine::new(ram, entry, linux.console, vcpus)?;
    let console = machine.console.clone();

    let running = Arc::new(AtomicBool::new(true));
    let probes = crate::probes::load_probes(settings, admin, 0, pages);
    tracing::info!(
        "VM {} booting {} on {vcpus} vCPU(s)",
        vm.id,
        kernel.display()
    );
    let launch = Launch {
        vm: vm.id,
        backing: Backing::Pager {
            directory,
            transport,
            more_handlers,
            cache: crate::service::cache_config(settings, &vm, writeback),
            prefetch: crate::working_set::prefetch_config(settings, prefetch, replay),
            record_working_set: settings.compute.record_working_set.is_some(),
            huge_pages: settings.compute.huge_pages,
        },
        faults: FaultSetup::of(&settings.compute),
        signals: Some(signals),
        // Every 10 s without news, log where the guest is.
        idle: Duration::from_secs(10),
        dump_ram: settings.compute.dump_ram.as_deref(),
    };
    let ended = run_vm(&mut machine, launch, |pager| {
        *admin.run.lock().unwrap_or_else(|p| p.into_inner()) = Some(LiveRun {
            vm: vm.id,
            guest_pages: pages,
            stats: pager.stats().clone(),
            directory: pager.directory().clone(),
            pages_done: Arc::new(AtomicU64::new(0)),
            running: running.clone(),
            cache: pager.cache().cloned(),
            lost: Some(lost.clone()),
        });
    });
    running.store(false, Ordering::Relaxed);
    // The pager has stopped: guest RAM may go.
    drop(machine);
    let ended = ended?;
    let (elapsed, stats, failure, signalled) = (
        ended.elapsed,
        ended.stats,
        ended.pager_failure,
        ended.signalled,
    );
    // The first vCPU that ended for a reason other than the stop request tells how the VM
    // ended; vCPU 0 otherwise.
    let mut exit = Ok(LinuxExit::Stopped);
    let mut fixups = 0;
    for (i, end) in ended.vcpus.into_iter().enumerate() {
        let end = end.map(|e| {
            fixups += e.fixups;
            e.exit
        });
        let decisive = !matches!(end, Ok(LinuxExit::Stopped));
        if i == 0 || (decisive && matches!(exit, Ok(LinuxExit::Stopped))) {
            exit = end;
        }
    }
    if let Err(e) = crate::working_set::record(settings, &identity, ended.working_set.as_deref()) {
        tracing::error!("{}", error_chain(&e));
    }
    let held_after = held(&mut control, &vm).unwrap_or_default();
    if !settings.compute.keep_vm {
        crate::peers::forget_vm(&mut control, coordinator, &vm);
    }

    let log = console.lock().unwrap_or_else(|p| p.into_inner());
    let reached = |s: &str| log.milestone(s);
    let exit_text = match (&exit, &failure) {
        (_, Some(f)) => format!("stopped: the pager failed: {}", error_chain(f)),
        (Ok(LinuxExit::Reset), _) => "the guest reset the machine (poweroff/reboot)".into(),
        (Ok(LinuxExit::TripleFault { rip }), _) => format!("the guest triple-faulted at {rip:#x}"),
        (Ok(LinuxExit::Stopped), _) if signalled => "stopped by signal".into(),
        (Ok(LinuxExit::Stopped), _) => "stopped".into(),
        (Err(e), _) => format!("the VM failed: {}", error_chain(e)),
    };
    let ok = failure.is_none() && matches!(exit, Ok(LinuxExit::Reset) | Ok(LinuxExit::Stopped));
    println!(
        "vm {}: Linux guest ran {:.1} s: {exit_text}",
        vm.id,
        elapsed.as_secs_f64()
    );
    println!(
        "  faults: {} remote, {} local zero-fill (remote-miss ratio {:.3}); p50 {:.1} µs, p99 {:.1} µs",
        stats.remote,
        stats.local_zero,
        stats.remote_miss_ratio,
        stats.fault_p50_us,
        stats.fault_p99_us
    );
    if let Some(c) = &ended.cache {
        crate::summary::print_cache(c);
    }
    if let Some(p) = &stats.prefetch {
        crate::summary::print_prefetch(p);
    }
    if let Some(r) = crate::rdma::summary() {
        crate::summary::print_rdma(&r);
    }
    println!(
        "  console: {} lines; instructions emulated by the VMM: {fixups}",
        log.count
    );
    println!("  result: {}", if ok { "OK" } else { "FAILED" });
    let _ = std::io::stdout().flush();
    crate::summary::write(
        settings,
        &RunSummary {
            node: id,
            vm: Some(vm.id),
            guest_pages: pages,
            faults: crate::summary::faults(&stats),
            remote_miss_ratio: stats.remote_miss_ratio,
            fault_p50_us: stats.fault_p50_us,
            fault_p90_us: stats.fault_p90_us,
            fault_p99_us: stats.fault_p99_us,
            fault_max_us: stats.fault_max_us,
            remote_p50_us: stats.remote_p50_us,
            remote_p99_us: stats.remote_p99_us,
            handler_cpu_us_per_fault: crate::summary::handler_cpu_us_per_fault(&stats),
            bytes_fetched: stats.bytes_fetched,
            elapsed_s: elapsed.as_secs_f64(),
            linux: Some(LinuxRun {
                exit: exit_text,
                console_lines: log.count,
                fixups,
                reached_linux_version: reached("Linux version").is_some(),
                reached_memory: reached("Memory:").is_some(),
                reached_init: reached("pagemesh-init").is_some(),
                milestones_s: log.milestones(),
                console_tail: log.tail(),
            }),
            lost_nodes: lost.nodes(),
            held_before,
            held_after,
            ebpf: probes.as_ref().map(|p| p.summary()),
            cache: ended.cache,
            prefetch: stats.prefetch,
            rdma: crate::rdma::summary(),
            ok,
            // A Linux guest reports no pages or checksum, and its errors are returned below.
            ..RunSummary::default()
        },
    )?;
    if let Err(e) = exit {
        return Err(NodeError::Linux(e));
    }
    if let Some(f) = failure {
        return Err(ComputeError::PagerFailed(f).into());
    }
    Ok(ok)
}

/// Writes the boot image into `dir` (`--image-dir`, where the memory nodes may load it from).
fn write_image(dir: &Path, id: NodeId, mem: &GuestMemoryMmap) -> std::io::Result<PathBuf> {
    let path = std::fs::canonicalize(dir)?.join(format!(
        "pagemesh-node{id}-{}-guest.img",
        std::process::id()
    ));
    let mut file = std::fs::File::create(&path)?;
    let region = mem.find_region(GuestAddress(0)).expect("one region at 0");
    let len = region.len() as usize;
    // SAFETY: the region is a live mapping of `len` readable bytes that nothing writes to
    // while we read it (no vCPU runs on this image).
    let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
    file.write_all(bytes)?;
    Ok(path)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
