//! Kernel-side latency probes: loads the eBPF programs of `node-ebpf` (embedded by
//! `build.rs`), attaches them, and turns their maps into [`EbpfStats`].
//!
//! What each probe measures, for the threads of one process (the node's tgid):
//!
//! | figure | start → end, same thread | source |
//! |---|---|---|
//! | vCPU stall | `kvmmmu:kvm_mmu_pagetable_walk` (shadow MMU) or `kvm:kvm_page_fault` (hardware virtualization) → `kvmmmu:kvm_mmu_spte_requested` | raw tracepoints (walk, spte_requested), tracepoint |
//! | resume | `kvm_mmu_spte_requested` → `kvm:kvm_entry` (hardware hosts only; never fires under kvm_pvm) | tracepoints |
//! | install | `syscalls:sys_enter_ioctl` → `sys_exit_ioctl` for `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` | tracepoints |
//! | transfer, per peer | the handler's clock (`pagemesh_pager::trace::monotonic_ns`, CLOCK_MONOTONIC) as it takes the fault on (before the request) → [`pagemesh_fetch_done`] | uprobe |
//! | page heat | faults resolved per guest frame number (`gfn` of `kvm_mmu_spte_requested`'s `struct kvm_page_fault`, at the offset [`btf`] finds) | raw tracepoint |
//!
//! A fault's stall is timed from the *first* walk for its address: a walk repeated for the
//! same page within a second (a retried fault) does not restart the clock.
//!
//! The kernel keeps log2 histograms of nanoseconds per CPU; [`Probes::snapshot`] merges them
//! and interpolates percentiles within buckets ([`histogram`]). Heat is an array of counters
//! indexed by guest frame number, sized to the VM at load (at most [`HEAT_MAX_FRAMES`]) and
//! mapped into the node (`BPF_F_MMAPABLE`): [`Probes::heat`] reads the kernel's counters in
//! place, so nothing is copied or drained and no update can be lost between two reads.
//! Sampled per-fault records ([`StallSample`], one stall in 16 a candidate, at most 640 a
//! second per CPU) come through a ring buffer that a thread polls every [`SAMPLES_POLL_MS`] ms.
//!
//! Loading needs CAP_BPF and CAP_PERFMON (or root), tracefs (mounted here if it is not) and a
//! kernel with BPF ring buffers (5.8+). A node built without the eBPF toolchain has no probes
//! to load: [`Probes::load`] then fails with [`EbpfError::NotBuiltIn`].

use std::collections::{BTreeMap, VecDeque};
use std::error::Error as StdError;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{RawTracePoint, TracePoint, UProbe, uprobe::UProbeScope};
use aya::{Ebpf, EbpfLoader};
use pagemesh_api::stats::{Bucket, EbpfStats, Histogram, PeerStats, ProgramCost};
use pagemesh_api::summary::{EbpfSummary, StallBreakdown};
use pagemesh_node_common::{
    CONFIG_RESUME, CTR_HEAT_DROPPED, CTR_SAMPLES_LOST, CTR_SAMPLES_SENT, CTR_SAMPLES_THROTTLED,
    CTR_UNMATCHED_END, Config, CpuStats, HEAT_MAX_FRAMES, HIST_BUCKETS, HIST_INSTALL, HIST_RESUME,
    HIST_STALL, Hist, PEERS_LOW, SAMPLES_POLL_MS, StallSample, Start, bucket_high_ns,
    bucket_low_ns, field,
};

pub mod btf;

/// The probe object built by `build.rs` (empty when the toolchain was missing).
#[cfg(pagemesh_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pagemesh-node-ebpf"));
#[cfg(not(pagemesh_ebpf))]
static OBJECT: &[u8] = &[];

/// Whether this build embeds the probes.
pub const BUILT_IN: bool = cfg!(pagemesh_ebpf);

/// Stall samples kept in memory (the most recent).
const SAMPLES_KEPT: usize = 4096;

/// Marks the end of a page fetch from `node` that began at `began_ns` (CLOCK_MONOTONIC, in ns),
/// for the transfer uprobe. The fault handler calls it once the reply is in (or the fetch
/// failed).
///
/// Exported under a fixed, unmangled name so that a uprobe can attach to it, and written as
/// a 5-byte `nop` and a `ret`: on a `nop5`, Linux 6.17+ turns the uprobe's `int3` trap into a
/// call to the uprobe trampoline after the first hit. Measured here: about 0.4 µs per hit
/// instead of 5 µs for a uprobe on ordinary code (docs/observability.md). One marker with the
/// begin time as an argument rather than a begin and an end marker: half the hits.
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub extern "C" fn pagemesh_fetch_done(node: u32, page: u64, began_ns: u64) {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret")
}

/// Marks the end of a page fetch (elsewhere than x86-64: a plain function that `black_box`
/// keeps from being optimized away).
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pagemesh_fetch_done(node: u32, page: u64, began_ns: u64) {
    std::hint::black_box((node, page, began_ns));
}

/// Faults the handler has recorded for the stall breakdown and the join has not seen yet
/// may be this many (a power of two): a second of faults at 15 µs each.
const SERVED_SLOTS: usize = 1 << 16;

/// One fault as the handler served it ([`pagemesh_fault_served`]).
struct ServedSlot {
    page: AtomicU64,
    read_ns: AtomicU64,
    install_ns: AtomicU64,
    /// Written last (0 while the slot is being written).
    done_ns: AtomicU64,
}

/// The faults the handlers served lately, for [`State::drain_samples`] to match with the
/// kernel's stall samples. A process serves one VM at a time, so one ring per process.
static SERVED: [ServedSlot; SERVED_SLOTS] = [const {
    ServedSlot {
        page: AtomicU64::new(0),
        read_ns: AtomicU64::new(0),
        install_ns: AtomicU64::new(0),
        done_ns: AtomicU64::new(0),
    }
}; SERVED_SLOTS];
static SERVED_NEXT: AtomicU64 = AtomicU64::new(0);

/// The fault handler's record of a fault it served: VM page `page`, its event read at
/// `read_ns`, its install begun at `install_ns` and done at `done_ns` (CLOCK_MONOTONIC, the
/// probes' clock). Seven relaxed stores and an atomic add: cheap enough for every fault.
pub fn pagemesh_fault_served(page: u64, read_ns: u64, install_ns: u64, done_ns: u64) {
    let i = SERVED_NEXT.fetch_add(1, Ordering::Relaxed) as usize & (SERVED_SLOTS - 1);
    let s = &SERVED[i];
    s.done_ns.store(0, Ordering::Relaxed);
    s.page.store(page, Ordering::Relaxed);
    s.read_ns.store(read_ns, Ordering::Relaxed);
    s.install_ns.store(install_ns, Ordering::Relaxed);
    s.done_ns.store(done_ns, Ordering::Release);
}

/// The stall breakdown's running sums: matched samples' parts and every sample's stall.
struct Breakdown {
    samples: u64,
    stall_all_ns: u64,
    /// Delivery, fetch, install, resume, and the matched stall (whose count is the
    /// matched samples').
    parts: [Hist; 5],
    /// The handler records by VM page, rebuilt at each drain (kept for its allocation).
    by_page: std::collections::HashMap<u64, Vec<[u64; 3]>>,
}

impl Breakdown {
    fn new() -> Self {
        Breakdown {
            samples: 0,
            stall_all_ns: 0,
            parts: [Hist::ZERO; 5],
            by_page: std::collections::HashMap::new(),
        }
    }

    /// Matches `samples` (guest frame numbers from `first_gfn` on are VM pages) with the
    /// handler records in [`SERVED`] and adds them up.
    fn add(&mut self, samples: &[StallSample], first_gfn: u64) {
        if samples.is_empty() {
            return;
        }
        for v in self.by_page.values_mut() {
            v.clear();
        }
        for s in &SERVED {
            let done = s.done_ns.load(Ordering::Acquire);
            if done == 0 {
                continue;
            }
            let (page, read, install) = (
                s.page.load(Ordering::Relaxed),
                s.read_ns.load(Ordering::Relaxed),
                s.install_ns.load(Ordering::Relaxed),
            );
            // Rewritten while read: skip it.
            if s.done_ns.load(Ordering::Acquire) != done {
                continue;
            }
            self.by_page
                .entry(page)
                .or_default()
                .push([read, install, done]);
        }
        for s in samples {
            self.samples += 1;
            self.stall_all_ns += s.stall_ns;
            let (start, end) = (s.ts_ns.saturating_sub(s.stall_ns), s.ts_ns);
            let Some(records) = s
                .gfn
                .checked_sub(first_gfn)
                .and_then(|page| self.by_page.get(&page))
            else {
                continue;
            };
            let Some(&[read, install, done]) = records
                .iter()
                .find(|[r, i, d]| start <= *r && r <= i && i <= d && *d <= end)
            else {
                continue;
            };
            for (h, ns) in self.parts.iter_mut().zip([
                read - start,
                install - read,
                done - install,
                end - done,
                end - start,
            ]) {
                h.record(ns);
            }
        }
    }

    fn summary(&self) -> Option<StallBreakdown> {
        let [delivery, fetch, install, resume, stall] = &self.parts;
        if stall.count == 0 {
            return None;
        }
        let mean = |h: &Hist| h.sum_ns as f64 / h.count.max(1) as f64 / 1000.0;
        Some(StallBreakdown {
            samples: stall.count,
            of_samples: self.samples,
            delivery_us: mean(delivery),
            fetch_us: mean(fetch),
            install_us: mean(install),
            resume_us: mean(resume),
            stall_us: mean(stall),
            stall_all_us: self.stall_all_ns as f64 / self.samples.max(1) as f64 / 1000.0,
            delivery_p50_us: percentile_us(delivery, 0.5),
            fetch_p50_us: percentile_us(fetch, 0.5),
            install_p50_us: percentile_us(install, 0.5),
            resume_p50_us: percentile_us(resume, 0.5),
        })
    }
}

/// Errors loading the probes.
#[derive(thiserror::Error, Debug)]
pub enum EbpfError {
    /// This binary was built without the eBPF toolchain.
    #[error("built without eBPF probes; run cargo xtask setup and rebuild")]
    NotBuiltIn,
    /// The kernel refused for lack of privileges.
    #[error("not permitted to {action} (needs root, or CAP_BPF and CAP_PERFMON)")]
    Permission {
        /// What was refused.
        action: String,
        /// Cause.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The probes need BTF the kernel does not provide.
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux); it needs CONFIG_DEBUG_INFO_BTF")]
    NoBtf(#[source] aya::EbpfError),
    /// A tracepoint the probes need does not exist on this kernel.
    #[error("tracepoint {0} does not exist on this kernel (is the kvm module loaded?)")]
    TracepointMissing(String),
    /// A tracepoint's record lacks a field the probes read.
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    FieldMissing {
        /// `category:name`.
        tracepoint: String,
        /// Field name.
        field: &'static str,
    },
    /// A field the probes read is not where they were compiled to read it.
    #[error(
        "tracepoint {tracepoint} has field `{field}` at offset {found}, the probes read it at \
         {expected}; this kernel's layout is not supported yet"
    )]
    FieldMoved {
        /// `category:name`.
        tracepoint: String,
        /// Field name.
        field: &'static str,
        /// Offset compiled into the probes.
        expected: usize,
        /// Offset in this kernel's record.
        found: u32,
    },
    /// tracefs is not mounted and could not be mounted.
    #[error("tracefs is not mounted and cannot be mounted at /sys/kernel/tracing")]
    Tracefs(#[source] io::Error),
    /// The kernel rejected the object (an older kernel: BPF ring buffers need 5.8).
    #[error("the kernel rejected the eBPF probes")]
    Load(#[source] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("cannot attach {what}")]
    Attach {
        /// Program and attach point.
        what: String,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map the loader expects is missing or of the wrong type (a build mismatch).
    #[error("the probe object has no usable map {0}")]
    Map(&'static str, #[source] Option<aya::maps::MapError>),
    /// The possible CPUs could not be read (the per-CPU statistics are sized to them).
    #[error("cannot read /sys/devices/system/cpu/possible")]
    Cpus(#[source] io::Error),
    /// The heat array could not be mapped into the node.
    #[error("cannot map the eBPF heat array")]
    HeatMap(#[source] io::Error),
    /// The sample polling thread could not start.
    #[error("cannot start the eBPF sample thread")]
    Spawn(#[source] io::Error),
}

/// Counters the probes keep about themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProbeCounters {
    /// Faults that entered the MMU (walks, not counting repeats for the same page).
    pub walks: u64,
    /// `kvm_mmu_spte_requested` with no walk before it on the thread.
    pub unmatched_ends: u64,
    /// Heat updates dropped: faults on frames beyond the heat array (past the VM's frames).
    pub heat_dropped: u64,
    /// Stall samples sent through the ring buffer.
    pub samples_sent: u64,
    /// Stall samples lost because the ring buffer was full.
    pub samples_lost: u64,
    /// Stall samples held back by the rate limit.
    pub samples_throttled: u64,
}

/// Loaded and attached probes. Dropping it detaches them.
pub struct Probes {
    state: Arc<Mutex<State>>,
    attached: Vec<String>,
    heat: HeatView,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

struct State {
    cpu: Array<MapData, CpuStats>,
    /// The vCPU threads' stall start slots (their `starts` count the walks).
    stall_start: Array<MapData, Start>,
    /// Transfer histograms of peers with ids below `PEERS_LOW`, indexed by id.
    transfer_low: PerCpuArray<MapData, Hist>,
    /// Transfer histograms of the other peers.
    transfer: PerCpuHashMap<MapData, u32, Hist>,
    ring: RingBuf<MapData>,
    samples: VecDeque<StallSample>,
    /// The stall breakdown so far, and the guest frame of VM page 0 it matches with.
    breakdown: Breakdown,
    first_gfn: u64,
    /// Keeps the kernel's BPF run-time statistics on while the probes live; `None` when
    /// they could not be turned on (the programs' costs then read as nothing).
    _run_time_stats: Option<std::os::fd::OwnedFd>,
    /// Owns the programs and their links: dropping it detaches everything.
    bpf: Ebpf,
}

/// A tracepoint program and where it goes.
struct Attach {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    required: bool,
    /// The record field the program reads, and the offset it was compiled with.
    field: Option<(&'static str, usize)>,
    /// A raw tracepoint: the program gets the tracepoint's arguments, not a record (the
    /// field check then guards that the event still carries that argument first).
    raw: bool,
    /// Whether it is used when the kernel's BTF gives `struct kvm_page_fault::gfn`
    /// (`Some(true)`), when it does not (`Some(false)`), or either way (`None`).
    with_fault_gfn: Option<bool>,
}

const TRACEPOINTS: &[Attach] = &[
    Attach {
        program: "stall_end",
        category: "kvmmmu",
        name: "kvm_mmu_spte_requested",
        required: true,
        field: None,
        raw: true,
        with_fault_gfn: Some(true),
    },
    Attach {
        program: "stall_end_record",
        category: "kvmmmu",
        name: "kvm_mmu_spte_requested",
        required: true,
        field: Some(("gfn", field::SPTE_GFN)),
        raw: false,
        with_fault_gfn: Some(false),
    },
    Attach {
        program: "stall_walk",
        category: "kvmmmu",
        name: "kvm_mmu_pagetable_walk",
        required: true,
        field: Some(("addr", field::WALK_ADDR)),
        raw: true,
        with_fault_gfn: None,
    },
    // Hardware virtualization: faults start here instead (never fires under kvm_pvm).
    Attach {
        program: "stall_fault",
        category: "kvm",
        name: "kvm_page_fault",
        required: false,
        field: Some(("fault_address", field::PAGE_FAULT_ADDR)),
        raw: false,
        with_fault_gfn: None,
    },
    Attach {
        program: "resume",
        category: "kvm",
        name: "kvm_entry",
        required: false,
        field: None,
        raw: false,
        with_fault_gfn: None,
    },
    Attach {
        program: "install_enter",
        category: "syscalls",
        name: "sys_enter_ioctl",
        required: true,
        field: Some(("cmd", field::IOCTL_CMD)),
        raw: false,
        with_fault_gfn: None,
    },
    Attach {
        program: "install_exit",
        category: "syscalls",
        name: "sys_exit_ioctl",
        required: true,
        field: None,
        raw: false,
        with_fault_gfn: None,
    },
];

impl Probes {
    /// Loads the probes and attaches them to the threads of process `tgid` (normally
    /// `std::process::id()`), with heat counters for guest frames `0 .. frames` (the VM's
    /// guest-physical address space; capped at [`HEAT_MAX_FRAMES`]).
    pub fn load(tgid: u32, frames: u64) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuiltIn);
        }
        raise_memlock_limit();
        let tracefs = ensure_tracefs()?;
        // Which tracepoints this kernel has, with their records laid out as the probes were
        // compiled for: a missing or moved field of a required one is an error, of an
        // optional one (hardware-virtualization points) a reason to leave it out.
        let fault_gfn = fault_gfn_offset();
        let mut usable = Vec::new();
        for tp in TRACEPOINTS {
            if tp
                .with_fault_gfn
                .is_some_and(|with| with != fault_gfn.is_some())
            {
                continue;
            }
            let point = format!("{}:{}", tp.category, tp.name);
            let checked = if !tracefs
                .join("events")
                .join(tp.category)
                .join(tp.name)
                .is_dir()
            {
                Err(EbpfError::TracepointMissing(point.clone()))
            } else if let Some((name, offset)) = tp.field {
                check_field(&tracefs, tp.category, tp.name, name, offset)
            } else {
                Ok(())
            };
            match checked {
                Ok(()) => usable.push(tp),
                Err(e) if tp.required => return Err(e),
                Err(e) => tracing::debug!("eBPF: optional {point} left out: {e}"),
            }
        }
        let exists =
            |category: &str, name: &str| tracefs.join("events").join(category).join(name).is_dir();
        let config = Config {
            tgid,
            fault_gfn: fault_gfn.unwrap_or(0),
            pad: 0,
            flags: if exists("kvm", "kvm_entry") && hardware_virtualization() {
                CONFIG_RESUME
            } else {
                0
            },
        };
        let frames = u32::try_from(frames)
            .unwrap_or(u32::MAX)
            .clamp(1, HEAT_MAX_FRAMES);
        // Before anything is attached, so that every run is counted. The statistics are the
        // kernel's, for every BPF program while one holder keeps them on: two clock reads
        // per program run.
        let run_time_stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::info!("eBPF: the probes' own cost is not measured: {e}");
                None
            }
        };
        let mut bpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .map_max_entries("HEAT", frames)
            .map_max_entries("CPU", possible_cpus()?)
            .load(OBJECT)
            .map_err(classify_load)?;

        let mut attached = Vec::new();
        for tp in usable {
            let point = format!(
                "{}:{}{}",
                tp.category,
                tp.name,
                if tp.raw { " (raw)" } else { "" }
            );
            let what = || format!("{} to {point}", tp.program);
            if tp.raw {
                let program: &mut RawTracePoint = program(&mut bpf, tp.program, &what)?;
                program.load().map_err(|e| attach_error(what(), e))?;
                program
                    .attach(tp.name)
                    .map_err(|e| attach_error(what(), e))?;
            } else {
                let program: &mut TracePoint = program(&mut bpf, tp.program, &what)?;
                program.load().map_err(|e| attach_error(what(), e))?;
                program
                    .attach(tp.category, tp.name)
                    .map_err(|e| attach_error(what(), e))?;
            }
            attached.push(point);
        }
        match attach_fetch_uprobe(&mut bpf, tgid) {
            Ok(points) => attached.extend(points),
            // Transfer times are the one figure the node can do without (its pager times
            // fetches too); say why once and carry on.
            Err(e) => tracing::info!(
                "eBPF: transfer probe not attached: {}",
                pagemesh_api::error_chain(&e)
            ),
        }

        let heat_map = bpf.take_map("HEAT").ok_or(EbpfError::Map("HEAT", None))?;
        let heat = match heat_map {
            aya::maps::Map::Array(data) => HeatView::new(data, frames)?,
            _ => return Err(EbpfError::Map("HEAT", None)),
        };
        let state = State {
            cpu: take(&mut bpf, "CPU")?,
            stall_start: take(&mut bpf, "STALL_START")?,
            transfer_low: take(&mut bpf, "TRANSFER_LOW")?,
            transfer: take(&mut bpf, "TRANSFER")?,
            ring: take(&mut bpf, "SAMPLES")?,
            samples: VecDeque::new(),
            breakdown: Breakdown::new(),
            first_gfn: 0,
            _run_time_stats: run_time_stats,
            bpf,
        };
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ebpf-samples".into())
                .spawn(move || poll_loop(&state, &stop))
                .map_err(EbpfError::Spawn)?
        };
        Ok(Self {
            state,
            attached,
            heat,
            stop,
            poller: Some(poller),
        })
    }

    /// The attach points in use (`category:name` for tracepoints, with ` (raw)` for raw
    /// tracepoints; the symbol for uprobes).
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Everything measured so far.
    pub fn snapshot(&self) -> EbpfStats {
        let mut state = self.lock();
        state.drain_samples();
        let totals = state.totals();
        let stall = totals.hists[HIST_STALL as usize];
        EbpfStats {
            faults: stall.count,
            stall: histogram(&stall),
            install: histogram(&totals.hists[HIST_INSTALL as usize]),
            transfer: state
                .transfer_by_peer()
                .into_iter()
                .map(|(node_id, h)| PeerStats {
                    node_id,
                    pages: h.count,
                    transfer: histogram(&h),
                })
                .collect(),
            programs: state.costs(),
            breakdown: state.breakdown.summary(),
        }
    }

    /// Time from a resolved fault to the vCPU's re-entry into the guest. Empty where
    /// `kvm:kvm_entry` does not fire (kvm_pvm).
    pub fn resume(&self) -> Histogram {
        histogram(&self.lock().totals().hists[HIST_RESUME as usize])
    }

    /// The `"ebpf"` object of the node's `--json` summary: stall count and the median figures.
    /// A figure with no samples is 0.
    pub fn summary(&self) -> EbpfSummary {
        let mut state = self.lock();
        state.drain_samples();
        let totals = state.totals();
        let (stall, install) = (
            totals.hists[HIST_STALL as usize],
            totals.hists[HIST_INSTALL as usize],
        );
        let mut transfer = Hist::ZERO;
        for (_, h) in state.transfer_by_peer() {
            transfer.merge(&h);
        }
        let costs = state.costs();
        let per_fault = |total: u64| total as f64 / stall.count.max(1) as f64;
        EbpfSummary {
            faults: stall.count,
            stall_p50_us: percentile_us(&stall, 0.50),
            stall_p99_us: percentile_us(&stall, 0.99),
            install_p50_us: percentile_us(&install, 0.50),
            transfer_p50_us: percentile_us(&transfer, 0.50),
            cost_ns_per_fault: per_fault(costs.iter().map(|c| c.run_time_ns).sum()),
            runs_per_fault: per_fault(costs.iter().map(|c| c.runs).sum()),
            breakdown: state.breakdown.summary(),
        }
    }

    /// Says which guest frame VM page 0 is (for matching stalls with the fault handler's
    /// records of its faults; 0 until set).
    pub fn set_first_gfn(&self, first_gfn: u64) {
        self.lock().first_gfn = first_gfn;
    }

    /// Faults resolved per guest frame number (guest-physical address / 4096) since the
    /// probes were loaded, for the frames with any, in frame order. Read from the kernel's
    /// counters directly: every fault resolved before the call is counted.
    pub fn heat(&self) -> Vec<(u64, u64)> {
        self.heat.nonzero()
    }

    /// The most recent sampled stalls (at most 4096), oldest first.
    pub fn samples(&self) -> Vec<StallSample> {
        let mut state = self.lock();
        state.drain_samples();
        state.samples.iter().copied().collect()
    }

    /// The probes' own counters.
    pub fn counters(&self) -> ProbeCounters {
        let state = self.lock();
        let totals = state.totals();
        let c = |i: u32| totals.counters[i as usize];
        ProbeCounters {
            walks: state.stall_start.iter().flatten().map(|s| s.starts).sum(),
            unmatched_ends: c(CTR_UNMATCHED_END),
            heat_dropped: c(CTR_HEAT_DROPPED),
            samples_sent: c(CTR_SAMPLES_SENT),
            samples_lost: c(CTR_SAMPLES_LOST),
            samples_throttled: c(CTR_SAMPLES_THROTTLED),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in the sample thread leaves the state as consistent as any read of it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.poller.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Histograms and counters summed over CPUs (an element that cannot be read counts as
    /// zero).
    fn totals(&self) -> CpuStats {
        let mut total = CpuStats::ZERO;
        for s in self.cpu.iter().flatten() {
            total.merge(&s);
        }
        total
    }

    /// Each loaded program's runs and run time so far, by name (nothing while the
    /// statistics are off: the kernel then counts neither).
    fn costs(&self) -> Vec<ProgramCost> {
        self.bpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramCost {
                    name: name.to_owned(),
                    runs: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    /// Transfer histograms of the peers with any fetch, summed over CPUs.
    fn transfer_by_peer(&self) -> BTreeMap<u32, Hist> {
        let mut out = BTreeMap::new();
        for node in 0..PEERS_LOW {
            let Ok(per_cpu) = self.transfer_low.get(&node, 0) else {
                continue;
            };
            let mut total = Hist::ZERO;
            for h in per_cpu.iter() {
                total.merge(h);
            }
            if total.count > 0 {
                out.insert(node, total);
            }
        }
        for entry in self.transfer.iter() {
            let Ok((node, per_cpu)) = entry else { continue };
            let total: &mut Hist = out.entry(node).or_insert(Hist::ZERO);
            for h in per_cpu.iter() {
                total.merge(h);
            }
        }
        out
    }

    fn drain_samples(&mut self) {
        let mut fresh = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<StallSample>() {
                continue;
            }
            // SAFETY: the probes write whole StallSample records (plain integers, any bit
            // pattern valid); read_unaligned copies one out of the ring buffer's pages.
            let s = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StallSample>()) };
            if self.samples.len() == SAMPLES_KEPT {
                self.samples.pop_front();
            }
            self.samples.push_back(s);
            fresh.push(s);
        }
        let first_gfn = self.first_gfn;
        self.breakdown.add(&fresh, first_gfn);
    }
}

fn poll_loop(state: &Mutex<State>, stop: &AtomicBool) {
    let period = Duration::from_millis(SAMPLES_POLL_MS);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next = now + period;
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain_samples();
    }
}

/// The probes' heat array (`HEAT`), mapped read-only into the node: one `u64` per guest
/// frame, which the probes increment atomically.
struct HeatView {
    counters: NonNull<AtomicU64>,
    frames: usize,
    mapped: usize,
    /// Keeps the map alive for as long as it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, only ever read through atomics; it lives until
// `Drop`, which needs `&mut self`.
unsafe impl Send for HeatView {}
// SAFETY: as above; reads through `&self` are atomic loads.
unsafe impl Sync for HeatView {}

impl HeatView {
    fn new(map: MapData, frames: u32) -> Result<Self, EbpfError> {
        let frames = frames as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let mapped = (frames * size_of::<u64>()).next_multiple_of(page);
        // SAFETY: maps `mapped` bytes of an mmapable BPF array (the kernel page-aligns its
        // values and rounds them up to whole pages) read-only and shared; the result is
        // checked before use and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(EbpfError::HeatMap(io::Error::last_os_error()));
        }
        let counters = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| EbpfError::HeatMap(io::Error::other("mmap returned null")))?;
        Ok(Self {
            counters,
            frames,
            mapped,
            _map: map,
        })
    }

    /// `(gfn, faults)` for every frame with faults, in frame order.
    fn nonzero(&self) -> Vec<(u64, u64)> {
        // SAFETY: `frames` u64s lie inside the live mapping (`mapped` rounds them up), page-
        // aligned; AtomicU64 has u64's layout, and the kernel writes them atomically.
        let counters = unsafe { std::slice::from_raw_parts(self.counters.as_ptr(), self.frames) };
        counters
            .iter()
            .enumerate()
            .filter_map(|(gfn, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then_some((gfn as u64, n))
            })
            .collect()
    }
}

impl Drop for HeatView {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it outlives
        // `&self` borrows, which cannot exist during drop.
        unsafe { libc::munmap(self.counters.as_ptr().cast(), self.mapped) };
    }
}

/// Converts a kernel histogram into the API's: percentiles interpolated linearly within their
/// log2 bucket (and capped by the largest sample), cumulative buckets from the first
/// non-empty one to the last.
pub fn histogram(h: &Hist) -> Histogram {
    let mut buckets = Vec::new();
    if h.count > 0 {
        let first = h.buckets.iter().position(|&n| n > 0).unwrap_or(0);
        let last = h.buckets.iter().rposition(|&n| n > 0).unwrap_or(0);
        let mut cumulative = 0;
        for b in first..=last {
            cumulative += h.buckets[b];
            buckets.push(Bucket {
                le_us: bucket_high_ns(b) as f64 / 1000.0,
                count: cumulative,
            });
        }
    }
    Histogram {
        count: h.count,
        p50_us: percentile_us(h, 0.50),
        p90_us: percentile_us(h, 0.90),
        p99_us: percentile_us(h, 0.99),
        max_us: h.max_ns as f64 / 1000.0,
        sum_us: h.sum_ns as f64 / 1000.0,
        buckets,
    }
}

/// The `q` quantile in µs (0 for an empty histogram).
pub fn percentile_us(h: &Hist, q: f64) -> f64 {
    if h.count == 0 {
        return 0.0;
    }
    let rank = q.clamp(0.0, 1.0) * h.count as f64;
    let mut below = 0u64;
    for b in 0..HIST_BUCKETS {
        let n = h.buckets[b];
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            let lo = bucket_low_ns(b) as f64;
            let hi = (bucket_high_ns(b) as f64).min(h.max_ns as f64).max(lo);
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return (lo + (hi - lo) * within) / 1000.0;
        }
        below += n;
    }
    h.max_ns as f64 / 1000.0
}

/// Where `struct kvm_page_fault` keeps `gfn` in this kernel, from its BTF; `None` (logged)
/// when the BTF does not say, and the stall probe then reads the tracepoint's record.
/// `PAGEMESH_BTF_DIR` replaces `/sys/kernel/btf` (tests use it to exercise the fallback).
fn fault_gfn_offset() -> Option<u32> {
    let dir = std::env::var_os("PAGEMESH_BTF_DIR")
        .map_or_else(|| PathBuf::from("/sys/kernel/btf"), PathBuf::from);
    match btf::member(&dir, "kvm_page_fault", "gfn") {
        Ok(m) if m.int_size == 8 => Some(m.offset),
        Ok(m) => {
            tracing::debug!("eBPF: kvm_page_fault.gfn is {} bytes, not 8", m.int_size);
            None
        }
        Err(e) => {
            tracing::debug!("eBPF: {}", pagemesh_api::error_chain(&e));
            None
        }
    }
}

/// The number of CPUs the kernel may ever bring up (the `CPU` map has one element each).
fn possible_cpus() -> Result<u32, EbpfError> {
    let n = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Cpus(e))?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Attaches the transfer uprobe to this process's executable.
fn attach_fetch_uprobe(bpf: &mut Ebpf, tgid: u32) -> Result<Vec<String>, EbpfError> {
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).map_err(|e| EbpfError::Attach {
        what: "the transfer uprobe".into(),
        source: aya::programs::ProgramError::IOError(e),
    })?;
    // System-wide, not `UProbeScope::OneProcess(tgid)`: that opens a perf event on one task,
    // the process's main thread, which is the vCPU thread of a compute node; the kernel then
    // switches that event out and in on every one of its context switches, two per fault.
    // Measured: +5.5% µs/page on remote-random, more than every probe together costs now
    // (docs/observability.md). The program keeps to this process by its tgid check.
    let scope = UProbeScope::AllProcesses;
    let (program, symbol) = ("fetch_done", "pagemesh_fetch_done");
    let what = || format!("{program} to {symbol} in {}", exe.display());
    let p: &mut UProbe = self::program(bpf, program, &what)?;
    p.load().map_err(|e| attach_error(what(), e))?;
    p.attach(symbol, &exe, scope)
        .map_err(|e| attach_error(what(), e))?;
    Ok(vec![symbol.to_owned()])
}

/// Program `name` of the object, as its kind `T` (`TracePoint`, `UProbe`); `what` names the
/// attachment for the error.
fn program<'a, T>(
    bpf: &'a mut Ebpf,
    name: &'static str,
    what: &dyn Fn() -> String,
) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::Map(name, None))?
        .try_into()
        .map_err(|source| EbpfError::Attach {
            what: what(),
            source,
        })
}

fn take<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.take_map(name).ok_or(EbpfError::Map(name, None))?;
    T::try_from(map).map_err(|e| EbpfError::Map(name, Some(e)))
}

/// Whether `e` or one of its sources is EPERM / EACCES.
fn permission_denied(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::PermissionDenied
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify_load(e: aya::EbpfError) -> EbpfError {
    if permission_denied(&e) {
        return EbpfError::Permission {
            action: "load eBPF programs".into(),
            source: Box::new(e),
        };
    }
    let btf_related = matches!(
        e,
        aya::EbpfError::BtfError(_) | aya::EbpfError::BtfRelocationError(_) | aya::EbpfError::NoBTF
    );
    if btf_related && !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return EbpfError::NoBtf(e);
    }
    EbpfError::Load(e)
}

fn attach_error(what: String, source: aya::programs::ProgramError) -> EbpfError {
    if permission_denied(&source) {
        EbpfError::Permission {
            action: format!("attach {what}"),
            source: Box::new(source),
        }
    } else {
        EbpfError::Attach { what, source }
    }
}

/// Finds tracefs, mounting it at `/sys/kernel/tracing` when it is not mounted (as on a
/// fresh boot of this machine). aya looks in the same two places.
fn ensure_tracefs() -> Result<PathBuf, EbpfError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    // SAFETY: mount(2) with NUL-terminated static strings and no data.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::PermissionDenied {
            return Err(EbpfError::Permission {
                action: "mount tracefs at /sys/kernel/tracing".into(),
                source: Box::new(e),
            });
        }
        return Err(EbpfError::Tracefs(e));
    }
    tracing::info!("eBPF: mounted tracefs at /sys/kernel/tracing");
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// Whether KVM runs on VT-x or AMD-V here (`kvm_intel` / `kvm_amd`), where `kvm:kvm_entry`
/// fires on every guest entry. Elsewhere (kvm_pvm) the tracepoint exists but never fires, and
/// the stall probe skips the resume bookkeeping it would feed: one more start slot written
/// per fault, in the vCPU's most expensive context.
fn hardware_virtualization() -> bool {
    ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists())
}

/// Checks that `field` of `category:name` lies at `offset` in this kernel's record, as the
/// probes were compiled to read it.
fn check_field(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &'static str,
    offset: usize,
) -> Result<(), EbpfError> {
    let tracepoint = format!("{category}:{name}");
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            EbpfError::Permission {
                action: format!("read {}", path.display()),
                source: Box::new(e),
            }
        } else {
            EbpfError::TracepointMissing(tracepoint.clone())
        }
    })?;
    match parse_field_offset(&text, field) {
        None => Err(EbpfError::FieldMissing { tracepoint, field }),
        Some(found) if found as usize != offset => Err(EbpfError::FieldMoved {
            tracepoint,
            field,
            expected: offset,
            found,
        }),
        Some(_) => Ok(()),
    }
}

/// Parses `field:u64 gfn;\toffset:8;\tsize:8;...` lines.
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.trim().strip_prefix("offset:"))
            .and_then(|v| v.parse().ok())
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!(
            "eBPF: cannot raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(samples: impl IntoIterator<Item = u64>) -> Hist {
        let mut h = Hist::ZERO;
        for s in samples {
            h.record(s);
        }
        h
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let h = histogram(&Hist::ZERO);
        assert_eq!(h, Histogram::default());
        assert_eq!(percentile_us(&Hist::ZERO, 0.5), 0.0);
    }

    #[test]
    fn percentiles_interpolate_within_a_bucket() {
        // 1000 samples spread evenly over [16384, 32768) ns: one bucket, and linear
        // interpolation recovers the uniform distribution's quantiles.
        let h = hist((0..1000).map(|i| 16_384 + i * 16_384 / 1000));
        let out = histogram(&h);
        assert_eq!(out.count, 1000);
        let max = h.max_ns as f64;
        let expect = |q: f64| (16_384.0 + (max - 16_384.0) * q) / 1000.0;
        assert!((out.p50_us - expect(0.5)).abs() < 1e-9, "{out:?}");
        assert!((out.p90_us - expect(0.9)).abs() < 1e-9, "{out:?}");
        assert!((out.p99_us - expect(0.99)).abs() < 1e-9, "{out:?}");
        assert!(out.p99_us <= out.max_us);
        assert_eq!(out.buckets.len(), 1);
        assert_eq!(out.buckets[0].count, 1000);
        assert!((out.buckets[0].le_us - 32.768).abs() < 1e-9);
    }

    #[test]
    fn percentiles_pick_the_right_bucket() {
        // 90 fast (≈1 µs) and 10 slow (≈100 µs) samples.
        let h = hist(std::iter::repeat_n(1_000, 90).chain(std::iter::repeat_n(100_000, 10)));
        let out = histogram(&h);
        // Both land in the fast samples' bucket, 512..1024 ns.
        assert!(out.p50_us >= 0.512 && out.p50_us <= 1.024, "{out:?}");
        assert!(out.p90_us >= 0.512 && out.p90_us <= 1.024, "{out:?}");
        assert!(out.p99_us >= 65.536 && out.p99_us <= 100.0, "{out:?}");
        assert_eq!(out.max_us, 100.0);
        assert_eq!(out.sum_us, 90.0 * 1.0 + 10.0 * 100.0);
    }

    #[test]
    fn buckets_are_cumulative_and_cover_every_sample() {
        let h = hist([3_000, 5_000, 20_000, 20_000, 1_000_000]);
        let out = histogram(&h);
        // From the bucket of 3 µs (2048..4096 ns) to that of 1 ms (524288..1048576 ns).
        assert_eq!(out.buckets.first().unwrap().le_us, 4.096);
        assert_eq!(out.buckets.last().unwrap().le_us, 1048.576);
        assert_eq!(out.buckets.last().unwrap().count, 5);
        assert!(out.buckets.windows(2).all(|w| w[0].le_us < w[1].le_us));
        assert!(out.buckets.windows(2).all(|w| w[0].count <= w[1].count));
        // Every sample is at most the le of the bucket that first counts it.
        for s in [3_000u64, 5_000, 20_000, 1_000_000] {
            let first = out
                .buckets
                .iter()
                .find(|b| b.le_us * 1000.0 >= s as f64)
                .unwrap();
            assert!(first.count >= 1);
        }
    }

    #[test]
    fn parses_tracepoint_formats() {
        let format = "name: kvm_mmu_spte_requested\nID: 118\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
            \tfield:u64 gfn;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:u64 pfn;\toffset:16;\tsize:8;\tsigned:0;\n";
        assert_eq!(parse_field_offset(format, "gfn"), Some(8));
        assert_eq!(parse_field_offset(format, "pfn"), Some(16));
        assert_eq!(parse_field_offset(format, "level"), None);
    }

    #[test]
    fn fetch_marker_is_callable_and_the_clock_advances() {
        let a = pagemesh_pager::trace::monotonic_ns();
        pagemesh_fetch_done(1, 2, a);
        std::thread::sleep(Duration::from_millis(1));
        let b = pagemesh_pager::trace::monotonic_ns();
        assert!(b >= a + 1_000_000, "{a} {b}");
    }

    #[test]
    fn field_layouts_are_checked_against_tracefs() {
        let root = std::env::temp_dir().join(format!("pagemesh-tracefs-{}", std::process::id()));
        let dir = root.join("events/kvmmmu/kvm_mmu_spte_requested");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("format"),
            "format:\n\tfield:u64 gfn;\toffset:16;\tsize:8;\tsigned:0;\n",
        )
        .unwrap();
        let check = |field, offset| {
            check_field(&root, "kvmmmu", "kvm_mmu_spte_requested", field, offset)
                .map_err(|e| e.to_string())
        };
        assert!(check("gfn", 16).is_ok());
        let moved = check("gfn", field::SPTE_GFN).unwrap_err();
        assert!(
            moved.contains("at offset 16, the probes read it at 8"),
            "{moved}"
        );
        let missing = check("pfn", 16).unwrap_err();
        assert!(missing.contains("has no field `pfn`"), "{missing}");
        let gone = check_field(&root, "kvm", "kvm_page_fault", "fault_address", 24).unwrap_err();
        assert!(matches!(gone, EbpfError::TracepointMissing(_)), "{gone}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
