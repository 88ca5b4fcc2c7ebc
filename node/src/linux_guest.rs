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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagemesh_api::error_chain;
use pagemesh_api::{Content, CreateVm, NodeId, PAGE_SIZE};
use pagemesh_pager::{PageDirectory, PagerConfig};
use pagemesh_vmm::boot;
use pagemesh_vmm::linux::{LinuxExit, LinuxMachine, MAX_LINUX_RAM};
use pagemesh_vmm::memory::MemoryError;
use pagemesh_vmm::vcpu::{self, VcpuError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::admin::{AdminState, LiveRun};
use crate::compute::ComputeError;
use crate::config::{ConfigError, Settings};
use crate::coordinator::CoordinatorClient;
use crate::define::{guest_mem, placement_request};
use crate::error::NodeError;
use crate::peers::{connect_vm_peers, held, load_vm};
use crate::signals::{StopSignals, wait_signal_for};

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
    let kernel = settings
        .kernel
        .clone()
        .ok_or(ConfigError::Missing("--kernel"))?;
    let vcpus = match settings.vcpus.unwrap_or(1) {
        n @ 1..=32 => n as u8,
        n => {
            return Err(ConfigError::Invalid {
                what: "--vcpus",
                why: format!("{n}; between 1 and 32"),
            }
            .into());
        }
    };
    let mem = guest_mem(settings, 256 << 20)?;
    if mem > MAX_LINUX_RAM {
        return Err(ConfigError::Invalid {
            what: "--mem",
            why: format!("a Linux guest can have at most {MAX_LINUX_RAM} bytes here"),
        }
        .into());
    }
    let pages = mem / PAGE_SIZE as u64;
    let cmdline = settings.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE);
    let (image, entry) =
        boot::build_image(mem, &kernel, settings.initrd.as_deref(), cmdline, vcpus).map_err(
            |e| ConfigError::Invalid {
                what: "--kernel",
                why: error_chain(&e),
            },
        )?;
    let image_path = write_image(id, &image).map_err(|e| ConfigError::Invalid {
        what: "the guest image",
        why: e.to_string(),
    })?;
    drop(image);
    let _cleanup = RemoveOnDrop(image_path.clone());

    let vm = coordinator.create_vm(&CreateVm {
        compute_node: id,
        mem_bytes: mem,
        placement: placement_request(settings, coordinator, pages)?,
        content: Content::Image {
            path: image_path.display().to_string(),
        },
    })?;
    tracing::info!(
        "created VM {} for kernel {} ({} pages on nodes {:?})",
        vm.id,
        kernel.display(),
        pages,
        vm.placement.nodes()
    );
    let (transport, mut control) = connect_vm_peers(id, settings, coordinator, &vm)?;
    load_vm(&mut control, &vm)?;
    let held_before = held(&mut control, &vm)?;
    let directory = Arc::new(PageDirectory::from_placement(&vm.placement).map_err(|e| {
        ConfigError::Invalid {
            what: "placement",
            why: e.to_string(),
        }
    })?);

    let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem as usize)])
        .map_err(|e| ComputeError::Memory(MemoryError::Map(mem, e)))?;
    vcpu::kick_handler_installed().map_err(VcpuError::KickHandler)?;
    let mut machine = LinuxMachine::new(ram, entry, settings.console, vcpus)?;
    let (base, len) = machine.ram();
    let console = machine.console.clone();
    let cpus = machine.take_cpus();

    let stop = Arc::new(AtomicBool::new(false));
    // SAFETY: pthread_self has no preconditions.
    let main_thread = unsafe { libc::pthread_self() };
    // The vCPU threads, once they have started, for kicking them out of KVM_RUN.
    let threads: Arc<Mutex<Vec<libc::pthread_t>>> = Arc::new(Mutex::new(Vec::new()));
    let kick_all = {
        let threads = threads.clone();
        move || {
            for &t in threads.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                vcpu::kick(t);
            }
        }
    };
    let on_failure = {
        let stop = stop.clone();
        let kick_all = kick_all.clone();
        Box::new(move || {
            stop.store(true, Ordering::Release);
            kick_all();
        })
    };
    let pager = pagemesh_pager::start_pager(PagerConfig {
        vm: vm.id,
        base,
        len: len as usize,
        directory: directory.clone(),
        transport,
        cpu: settings.pin_cpu,
        trace: crate::probes::fault_trace(),
        on_failure,
    })
    .map_err(ComputeError::PagerStart)?;
    let running = Arc::new(AtomicBool::new(true));
    *admin.run.lock().unwrap_or_else(|p| p.into_inner()) = Some(LiveRun {
        vm: vm.id,
        guest_pages: pages,
        stats: pager.stats().clone(),
        directory,
        pages_done: Arc::new(AtomicU64::new(0)),
        running: running.clone(),
    });

    let probes = crate::probes::load_probes(settings, admin, 0, pages);
    let started = Instant::now();
    let sample = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(cpus.len());
    for mut cpu in cpus {
        let stop = stop.clone();
        let sample = sample.clone();
        let threads = threads.clone();
        let pin = settings.pin_cpu;
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", cpu.id()))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                threads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(unsafe { libc::pthread_self() });
                if let Some(c) = pin
                    && cpu.id() == 0
                {
                    pagemesh_pager::pin_to_cpu(c);
                }
                let r = cpu.run(&stop, &sample);
                // Any vCPU ending ends the VM: wake the main thread, which waits for signals.
                // SAFETY: pthread_kill on the main thread, which outlives this one.
                unsafe { libc::pthread_kill(main_thread, libc::SIGUSR2) };
                (r, cpu.fixups)
            })
            .map_err(VcpuError::Thread)?;
        handles.push(handle);
    }
    tracing::info!(
        "VM {} booting {} on {vcpus} vCPU(s)",
        vm.id,
        kernel.display()
    );
    let signalled = loop {
        // Every 10 s without news, log where the guest is.
        let Some(sig) = wait_signal_for(signals, Duration::from_secs(10))? else {
            sample.store(true, Ordering::Release);
            if let Some(&t) = threads.lock().unwrap_or_else(|p| p.into_inner()).first() {
                vcpu::kick(t);
            }
            continue;
        };
        if sig != libc::SIGUSR2 {
            tracing::info!("signal {sig} received; stopping the guest");
            break true;
        }
        if handles.iter().any(|h| h.is_finished()) {
            break false;
        }
    };
    stop.store(true, Ordering::Release);
    while !handles.iter().all(|h| h.is_finished()) {
        kick_all();
        std::thread::sleep(Duration::from_millis(5));
    }
    // The first vCPU that ended for a reason other than the stop request tells how the VM
    // ended; vCPU 0 otherwise.
    let mut exit = Ok(LinuxExit::Stopped);
    let mut fixups = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let (r, f) = h.join().map_err(|_| VcpuError::Stopped)?;
        fixups += f;
        let decisive = !matches!(r, Ok(LinuxExit::Stopped));
        if i == 0 || (decisive && matches!(exit, Ok(LinuxExit::Stopped))) {
            exit = r;
        }
    }
    drop(machine);
    running.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let counters = pager.stats().clone();
    // The handler's error, if it stopped on one (that is when it stopped the vCPUs).
    let failure = pager.stop().err();
    let stats = counters.snapshot();
    let held_after = held(&mut control, &vm).unwrap_or_default();
    if !settings.keep_vm {
        crate::peers::release_vm(&mut control, &vm);
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
    println!(
        "  console: {} lines; instructions emulated by the VMM: {fixups}",
        log.count
    );
    println!("  result: {}", if ok { "OK" } else { "FAILED" });
    let _ = std::io::stdout().flush();
    if let Some(path) = &settings.json {
        let v = serde_json::json!({
            "node": id,
            "vm": vm.id,
            "guest_pages": pages,
            "faults": {"remote": stats.remote, "local_zero": stats.local_zero, "spurious": stats.spurious, "errors": stats.errors},
            "remote_miss_ratio": stats.remote_miss_ratio,
            "fault_p50_us": stats.fault_p50_us,
            "fault_p99_us": stats.fault_p99_us,
            "elapsed_s": elapsed.as_secs_f64(),
            "linux": {
                "exit": exit_text,
                "console_lines": log.count,
                "fixups": fixups,
                "reached_linux_version": reached("Linux version").is_some(),
                "reached_memory": reached("Memory:").is_some(),
                "reached_init": reached("pagemesh-init").is_some(),
                "milestones_s": log.milestones(),
                "console_tail": log.tail(),
            },
            "held_before": held_before,
            "held_after": held_after,
            "ebpf": probes.as_ref().map(|p| p.ebpf_summary_json()),
            "ok": ok,
        });
        std::fs::write(
            path,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
        .map_err(|e| NodeError::Summary(path.display().to_string(), e))?;
    }
    if let Err(e) = exit {
        return Err(NodeError::Linux(e));
    }
    if let Some(f) = failure {
        return Err(ComputeError::PagerFailed(f).into());
    }
    Ok(ok)
}

/// Writes guest RAM to a temporary image file the memory nodes can read.
fn write_image(id: NodeId, mem: &GuestMemoryMmap) -> std::io::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!(
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
