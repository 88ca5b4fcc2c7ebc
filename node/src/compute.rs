//! Running a guest workload on pager-served memory: what a compute node does with a VM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pagemesh_api::VmId;
use pagemesh_pager::StatsSnapshot;
use pagemesh_vmm::VcpuError;
use pagemesh_vmm::guest::{Initial, WorkloadResult};
use pagemesh_vmm::memory::RamPages;
use pagemesh_vmm::vcpu::Machine;
use pagemesh_vmm::{GuestLayout, Workload};

use crate::admin::LiveRun;
use crate::lifecycle::{Backing, ComputeError, FaultSetup, Launch, run_vm};
use crate::signals::StopSignals;

/// What a run produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunOutcome {
    /// The guest's report.
    pub result: WorkloadResult,
    /// Pager statistics (all zero for demand-zero runs).
    pub stats: StatsSnapshot,
    /// The page cache's figures, under a budget.
    pub cache: Option<pagemesh_pager::CacheSnapshot>,
    /// Wall time of the guest's run (from first instruction to the done report).
    pub elapsed: Duration,
    /// The checksum the run should have produced, when known.
    pub expected_checksum: Option<u64>,
    /// The pages the guest faulted on, in order, if recorded.
    #[serde(skip)]
    pub working_set: Option<Vec<u32>>,
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
    /// Where vCPU 0 and the fault handler run, and how the handler waits.
    pub faults: FaultSetup,
    /// Map guest RAM in 2 MiB huge pages.
    pub huge_pages: bool,
    /// vCPUs, which share the workload's pages out between them.
    pub vcpus: u8,
    /// Write guest RAM to this file when the guest stops (`--dump-ram`).
    pub dump_ram: Option<std::path::PathBuf>,
}

/// Creates the VM and runs the workload to its end through the [`run_vm`] lifecycle, or
/// until one of `signals` arrives. `observe` receives the live counters once the pager runs
/// (for the admin endpoint).
pub fn run_guest(
    opts: &RunOptions,
    backing: Backing,
    signals: Option<&StopSignals>,
    observe: impl FnOnce(LiveRun),
) -> Result<RunOutcome, ComputeError> {
    let pages = if opts.huge_pages {
        RamPages::Huge
    } else {
        RamPages::Small
    };
    let layout = GuestLayout::with_pages(opts.mem_bytes, pages)?;
    let mut machine = Machine::with_vcpus(layout, opts.vcpus.max(1))?;
    machine.prepare(&opts.workload, opts.initial.seed())?;
    let pages_done = machine.progress().clone();
    let running = Arc::new(AtomicBool::new(true));
    let launch = Launch {
        vm: opts.vm,
        backing,
        faults: opts.faults,
        signals,
        idle: Duration::MAX,
        dump_ram: opts.dump_ram.as_deref(),
    };
    let ended = run_vm(&mut machine, launch, |pager| {
        observe(LiveRun {
            vm: opts.vm,
            guest_pages: pager.directory().len(),
            stats: pager.stats().clone(),
            directory: pager.directory().clone(),
            pages_done,
            running: running.clone(),
            cache: pager.cache().cloned(),
            lost: None,
        });
    });
    running.store(false, Ordering::Relaxed);
    let ended = ended?;
    if let Some(f) = ended.pager_failure {
        return Err(ComputeError::PagerFailed(f));
    }
    // Each vCPU did its share of the pages: the run's result is their sum, its time the
    // slowest one's.
    let mut result = WorkloadResult {
        pages_done: 0,
        checksum: 0,
        first_bad_page: None,
        bad_pages: 0,
    };
    let mut elapsed = Duration::ZERO;
    if ended.vcpus.is_empty() {
        return Err(VcpuError::Stopped.into());
    }
    for exit in ended.vcpus {
        let exit = exit?;
        let r = exit.result;
        result.pages_done += r.pages_done;
        result.checksum = result.checksum.wrapping_add(r.checksum);
        result.bad_pages += r.bad_pages;
        result.first_bad_page = match (result.first_bad_page, r.first_bad_page) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        elapsed = elapsed.max(exit.elapsed);
    }
    let shares = opts
        .workload
        .split(u64::from(opts.vcpus.max(1)))
        .map_err(VcpuError::from)?;
    let expected_checksum = shares
        .iter()
        .map(|w| w.expected_checksum(opts.initial))
        .try_fold(0u64, |sum, c| c.map(|c| sum.wrapping_add(c)));
    Ok(RunOutcome {
        result,
        stats: ended.stats,
        cache: ended.cache,
        elapsed,
        expected_checksum,
        working_set: ended.working_set,
    })
}
