//! Running a guest workload on pager-served memory: what a compute node does with a VM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pagemesh_api::VmId;
use pagemesh_pager::{PageDirectory, PagerConfig, PagerError, StatsSnapshot};
use pagemesh_transport::TransportManager;
use pagemesh_vmm::guest::{Initial, WorkloadResult};
use pagemesh_vmm::vcpu::{self, Machine, VcpuError};
use pagemesh_vmm::{GuestLayout, Workload};

use crate::admin::LiveRun;

/// Errors running a guest.
#[derive(thiserror::Error, Debug)]
pub enum ComputeError {
    /// Guest memory could not be set up.
    #[error("cannot set up guest memory")]
    Memory(#[from] pagemesh_vmm::memory::MemoryError),
    /// The VM could not be created or run.
    #[error("the guest failed")]
    Vcpu(#[from] VcpuError),
    /// The pager could not start.
    #[error("the pager failed to start")]
    PagerStart(#[source] PagerError),
    /// The pager stopped on an error; the guest was stopped.
    #[error("the guest was stopped because the pager failed")]
    PagerFailed(#[source] PagerError),
}

/// How memory is served during a run.
pub enum Backing {
    /// Plain anonymous memory: the kernel zero-fills on demand, no userfaultfd.
    DemandZero,
    /// userfaultfd with the given directory and peers.
    Pager {
        /// The directory.
        directory: Arc<PageDirectory>,
        /// The peers.
        transport: TransportManager,
    },
}

/// What a run produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunOutcome {
    /// The guest's report.
    pub result: WorkloadResult,
    /// Pager statistics (all zero for demand-zero runs).
    pub stats: StatsSnapshot,
    /// Wall time of the guest's run (from first instruction to the done report).
    pub elapsed: Duration,
    /// The checksum the run should have produced, when known.
    pub expected_checksum: Option<u64>,
}

impl RunOutcome {
    /// Whether the guest saw exactly what it should have.
    pub fn ok(&self) -> bool {
        self.result.bad_pages == 0
            && self.result.first_bad_page.is_none()
            && self
                .expected_checksum
                .is_none_or(|c| c == self.result.checksum)
    }

    /// µs of guest time per page visited.
    pub fn us_per_page(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / self.result.pages_done.max(1) as f64
    }
}

/// Options of [`run_guest`].
pub struct RunOptions {
    /// VM id (for fetch requests).
    pub vm: VmId,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// What the guest does.
    pub workload: Workload,
    /// What guest RAM holds before the run.
    pub initial: Initial,
    /// Pin the vCPU and the fault handler to this CPU.
    pub cpu: Option<usize>,
}

/// Creates the VM, starts the pager (for [`Backing::Pager`]) and runs the workload to the end.
/// `progress` sees pages done as the guest reports them; `observe` receives the live
/// counters once the pager runs (for the admin endpoint).
pub fn run_guest(
    opts: &RunOptions,
    backing: Backing,
    mut progress: impl FnMut(u64),
    observe: impl FnOnce(LiveRun),
) -> Result<RunOutcome, ComputeError> {
    vcpu::kick_handler_installed().map_err(VcpuError::KickHandler)?;
    if let Some(cpu) = opts.cpu {
        pagemesh_pager::pin_to_cpu(cpu);
    }
    let layout = GuestLayout::new(opts.mem_bytes)?;
    let mut machine = Machine::new(layout)?;
    machine.prepare(&opts.workload, opts.initial.seed())?;

    let stop = Arc::new(AtomicBool::new(false));
    let pager = match backing {
        Backing::DemandZero => None,
        Backing::Pager {
            directory,
            transport,
        } => {
            let stop = stop.clone();
            // SAFETY: pthread_self has no preconditions.
            let vcpu_thread = unsafe { libc::pthread_self() };
            let on_failure = Box::new(move || {
                stop.store(true, Ordering::Release);
                // Kick until the vCPU thread leaves KVM_RUN or the fault wait: a fault
                // waiting for a page that will never come is interruptible.
                for _ in 0..2000 {
                    vcpu::kick(vcpu_thread);
                    std::thread::sleep(Duration::from_millis(1));
                    if Arc::strong_count(&stop) == 1 {
                        break;
                    }
                }
            });
            let layout = machine.layout();
            Some(
                pagemesh_pager::start_pager(PagerConfig {
                    vm: opts.vm,
                    base: layout.ram_host_addr(),
                    len: layout.ram_size as usize,
                    directory,
                    transport,
                    cpu: opts.cpu,
                    trace: crate::probes::fault_trace(),
                    on_failure,
                })
                .map_err(ComputeError::PagerStart)?,
            )
        }
    };

    let pages_done = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    if let Some(p) = &pager {
        observe(LiveRun {
            vm: opts.vm,
            guest_pages: p.directory().len(),
            stats: p.stats().clone(),
            directory: p.directory().clone(),
            pages_done: pages_done.clone(),
            running: running.clone(),
        });
    }
    let start = Instant::now();
    let result = machine.run(&opts.workload, &stop, |done| {
        pages_done.store(done, Ordering::Relaxed);
        progress(done);
    });
    let elapsed = start.elapsed();
    running.store(false, Ordering::Relaxed);
    drop(stop);
    let mut stats = StatsSnapshot::default();
    if let Some(p) = pager {
        // Stop first: the guest is woken by the install, before the handler has counted
        // the last fault. A handler that failed returns its error here, which is what
        // stopped the guest.
        let counters = p.stats().clone();
        let ended = p.stop();
        stats = counters.snapshot();
        ended.map_err(ComputeError::PagerFailed)?;
    }
    let result = result?;
    Ok(RunOutcome {
        result,
        stats,
        elapsed,
        expected_checksum: opts.workload.expected_checksum(opts.initial),
    })
}
