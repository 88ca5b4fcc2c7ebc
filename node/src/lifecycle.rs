//! One lifecycle for every guest, the built-in test guest and a Linux kernel alike: take the
//! machine's vCPUs, start the pager over its RAM, run each vCPU on a thread of its own,
//! wait for the first to end (the built-in guest: for all, each doing its share) or for a
//! stop signal, stop the rest, stop the pager, and only then let the machine (and its RAM)
//! go.
//!
//! One [`Stop`] stops every vCPU (the pager's failure and the node's stop signals request
//! it), and one channel tells the waiting thread what happened. The pager borrows guest RAM
//! through [`GuestRam`], so it cannot outlive the machine that maps it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use pagemesh_api::VmId;
use pagemesh_pager::{
    CacheConfig, CacheSnapshot, FaultPath, GuestRam, PageDirectory, Pager, PagerConfig, PagerError,
    PrefetchConfig, StatsSnapshot,
};
use pagemesh_transport::TransportManager;
use pagemesh_vmm::VcpuError;
use pagemesh_vmm::run::install_kick_handler;
use pagemesh_vmm::{GuestMachine, RunVcpu, Stop};

use crate::config::ComputeOptions;
use crate::config::values::PinArg;
use crate::signals::{StopSignals, wait_stop_signal_for};

/// Errors running a guest.
#[derive(thiserror::Error, Debug)]
pub enum ComputeError {
    /// Guest memory could not be set up.
    #[error("cannot set up guest memory")]
    Memory(#[from] pagemesh_vmm::memory::MemoryError),
    /// The VM could not be created or run.
    #[error("the guest failed")]
    Vcpu(#[from] VcpuError),
    /// The signal handler that kicks vCPUs could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The pager could not start.
    #[error("the pager failed to start")]
    PagerStart(#[source] PagerError),
    /// The pager stopped on an error; the guest was stopped.
    #[error("the guest was stopped because the pager failed")]
    PagerFailed(#[source] PagerError),
}

/// How guest memory is served during a run.
#[expect(
    clippy::large_enum_variant,
    reason = "made once per run and moved into the pager: its size costs nothing"
)]
pub enum Backing {
    /// Plain anonymous memory: the kernel zero-fills on demand, no userfaultfd.
    DemandZero,
    /// userfaultfd with the given directory and peers.
    Pager {
        /// The directory.
        directory: Arc<PageDirectory>,
        /// The peers, for the first fault handler.
        transport: TransportManager,
        /// The peers again for each more fault handler.
        more_handlers: Vec<TransportManager>,
        /// A local memory budget, `None` for unlimited.
        cache: Option<CacheConfig>,
        /// The prefetch thread (streams, a replayed working set); `None`: no prefetch.
        prefetch: Option<PrefetchConfig>,
        /// Record the pages the guest faults on ([`Ended::working_set`]).
        record_working_set: bool,
        /// Guest RAM is mapped in 2 MiB huge pages.
        huge_pages: bool,
    },
}

/// What [`run_vm`] needs besides the machine.
pub struct Launch<'a> {
    /// The VM's id (for fetch requests).
    pub vm: VmId,
    /// How guest memory is served.
    pub backing: Backing,
    /// Where vCPU 0 and the fault handler run, and how the handler waits.
    pub faults: FaultSetup,
    /// Stop signals to watch while the guest runs; `None` runs it to its end.
    pub signals: Option<&'a StopSignals>,
    /// How long nothing may happen before [`GuestMachine::on_idle`] runs.
    pub idle: Duration,
    /// Write guest RAM here when the guest has stopped, before the pager does.
    pub dump_ram: Option<&'a Path>,
}

/// Where vCPU 0 and the fault handler run, and how the handler waits for faults
/// (`--pin-cpu`, `--handler-cpu`, `--fault-poll-us`, `--wake-separately`).
#[derive(Clone, Copy, Debug)]
pub struct FaultSetup {
    /// vCPU 0's CPU, and the handler's unless `handler_cpu` says otherwise.
    pub pin: PinArg,
    /// The handler's own CPU.
    pub handler_cpu: Option<usize>,
    /// How the handler waits and wakes.
    pub path: FaultPath,
}

impl FaultSetup {
    /// The compute node's settings.
    pub fn of(c: &ComputeOptions) -> Self {
        FaultSetup {
            pin: c.pin_cpu,
            handler_cpu: c.handler_cpu,
            path: FaultPath {
                poll: Duration::from_micros(c.fault_poll_us),
                wake_separately: c.wake_separately,
            },
        }
    }

    /// Leaves both to the scheduler, the handler blocking (a run without settings).
    pub fn unpinned() -> Self {
        FaultSetup {
            pin: PinArg::None,
            handler_cpu: None,
            path: FaultPath::default(),
        }
    }
}

/// Writes guest RAM to `path` through the still-running pager (`--dump-ram`); a failure is
/// logged, the run goes on to its end.
fn dump_ram(pager: &Pager<'_>, path: &Path) {
    let started = Instant::now();
    let written = std::fs::File::create(path).and_then(|f| {
        let mut out = std::io::BufWriter::new(f);
        let n = pager.write_ram(&mut out)?;
        std::io::Write::flush(&mut out)?;
        Ok(n)
    });
    match written {
        Ok(n) => tracing::info!(
            "guest RAM written to {} ({} MiB in {:.1} s)",
            path.display(),
            n >> 20,
            started.elapsed().as_secs_f64()
        ),
        Err(e) => tracing::error!("cannot write guest RAM to {}: {e}", path.display()),
    }
}

/// The CPU this thread runs on now.
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes nothing and returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// How a run ended.
pub struct Ended<E> {
    /// Each vCPU's end, in vCPU order.
    pub vcpus: Vec<Result<E, VcpuError>>,
    /// The pager's statistics (all zero without a pager).
    pub stats: StatsSnapshot,
    /// The page cache's figures, under a budget.
    pub cache: Option<CacheSnapshot>,
    /// The error that stopped the pager, if one did.
    pub pager_failure: Option<PagerError>,
    /// The pages the guest faulted on, in order, if recorded.
    pub working_set: Option<Vec<u32>>,
    /// Whether a stop signal ended the run.
    pub signalled: bool,
    /// From the first vCPU's start to the last one's end.
    pub elapsed: Duration,
}

/// What the waiting thread hears.
enum Event {
    VcpuEnded,
    Signal(i32),
}

/// Runs `machine` until a vCPU ends (any vCPU ending ends the VM), a stop signal arrives or
/// the pager fails; then stops every vCPU and the pager. `observe` sees the pager's live
/// figures once it runs (for the admin endpoint).
pub fn run_vm<M: GuestMachine>(
    machine: &mut M,
    launch: Launch<'_>,
    observe: impl FnOnce(&Pager<'_>),
) -> Result<Ended<<M::Vcpu as RunVcpu>::Exit>, ComputeError> {
    install_kick_handler().map_err(ComputeError::KickHandler)?;
    let vcpus = machine.take_vcpus();
    if vcpus.is_empty() {
        return Err(VcpuError::Taken.into());
    }
    let machine: &M = machine;
    let vcpu_cpu = launch
        .faults
        .pin
        .resolve(u8::try_from(vcpus.len()).unwrap_or(u8::MAX), current_cpu);
    let handler_cpu = launch.faults.handler_cpu.or(vcpu_cpu);
    if vcpu_cpu.is_some() || handler_cpu.is_some() {
        let at = |c: Option<usize>| c.map_or("any CPU".to_owned(), |c| format!("CPU {c}"));
        tracing::info!(
            "vCPU 0 on {}, its fault handler on {}",
            at(vcpu_cpu),
            at(handler_cpu)
        );
    }
    let stop = Arc::new(Stop::new());
    let (base, len) = machine.ram();
    // SAFETY: the machine owns the mapping and keeps it in place while it lives; the pager
    // borrows it through `machine`, so the borrow checker stops it before the machine goes.
    let ram = unsafe { GuestRam::new(base, len as usize) };
    let pager = match launch.backing {
        Backing::DemandZero => None,
        Backing::Pager {
            directory,
            transport,
            more_handlers,
            cache,
            prefetch,
            record_working_set,
            huge_pages,
        } => {
            let on_failure = {
                let stop = stop.clone();
                Box::new(move || stop.request())
            };
            let pager = pagemesh_pager::start_pager(PagerConfig {
                vm: launch.vm,
                ram,
                directory,
                transport,
                more_handlers,
                cpu: handler_cpu,
                fault_path: launch.faults.path,
                trace: crate::probes::fault_trace(),
                on_failure,
                cache,
                prefetch,
                record_working_set,
                huge_pages,
            })
            .map_err(ComputeError::PagerStart)?;
            observe(&pager);
            Some(pager)
        }
    };

    let started = Instant::now();
    let (events, heard) = mpsc::channel();
    let watching = AtomicBool::new(true);
    let (ends, signalled) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let mut spawn_error = None;
        for mut vcpu in vcpus {
            let id = vcpu.id();
            let (stop, events) = (&*stop, events.clone());
            let pin = vcpu_cpu.filter(|_| id == 0);
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn_scoped(s, move || {
                    stop.register_current(id);
                    if let Some(cpu) = pin {
                        pagemesh_pager::pin_to_cpu(cpu);
                    }
                    let end = vcpu.run(stop);
                    stop.unregister_current();
                    let _ = events.send(Event::VcpuEnded);
                    end
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(ComputeError::Spawn(e));
                    break;
                }
            }
        }
        if let Some(signals) = launch.signals {
            let events = events.clone();
            let watching = &watching;
            s.spawn(move || {
                while watching.load(Ordering::Acquire) {
                    match wait_stop_signal_for(signals, Duration::from_millis(100)) {
                        Ok(Some(sig)) => {
                            let _ = events.send(Event::Signal(sig));
                            return;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("cannot wait for stop signals: {e}");
                            return;
                        }
                    }
                }
            });
        }
        drop(events);
        let mut signalled = false;
        // Ends on the first vCPU's end, or on the last one's for a machine whose vCPUs each
        // finish on their own.
        let mut running = if machine.ends_with_first_vcpu() {
            1
        } else {
            handles.len()
        };
        while spawn_error.is_none() {
            match heard.recv_timeout(launch.idle) {
                Ok(Event::VcpuEnded) => {
                    running -= 1;
                    if running == 0 {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Event::Signal(sig)) => {
                    tracing::info!("signal {sig} received; stopping the guest");
                    signalled = true;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => machine.on_idle(&stop),
            }
        }
        // A vCPU may be between its last look at the flag and KVM_RUN when the first kick
        // lands: kick until every one has ended.
        while !handles.iter().all(|h| h.is_finished()) {
            stop.request();
            std::thread::sleep(Duration::from_millis(5));
        }
        watching.store(false, Ordering::Release);
        let ends: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    tracing::error!("a vCPU thread panicked");
                    Err(VcpuError::Stopped)
                })
            })
            .collect();
        match spawn_error {
            Some(e) => Err(e),
            None => Ok((ends, signalled)),
        }
    })?;
    let elapsed = started.elapsed();

    let (stats, cache, pager_failure, working_set) = match pager {
        Some(p) => {
            if let Some(path) = launch.dump_ram {
                dump_ram(&p, path);
            }
            // Stop first: the guest is woken by the install, before the handler has counted
            // the last fault. A handler that failed returns its error here.
            let counters = p.stats().clone();
            let cache = p.cache().cloned();
            let recorded = p.recorded();
            let failure = p.stop().err();
            let working_set = recorded.and_then(|r| r.take());
            (
                counters.snapshot(),
                cache.map(|c| c.snapshot()),
                failure,
                working_set,
            )
        }
        None => (StatsSnapshot::default(), None, None, None),
    };
    Ok(Ended {
        vcpus: ends,
        stats,
        cache,
        pager_failure,
        working_set,
        signalled,
        elapsed,
    })
}
