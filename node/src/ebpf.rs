//! Kernel-side latency probes: loads the eBPF programs of `node-ebpf` (embedded by
//! `build.rs`), attaches them, and turns their maps into [`EbpfStats`].
//!
//! What each probe measures, for the threads of one process (the node's tgid):
//!
//! | figure | start → end, same thread | source |
//! |---|---|---|
//! | vCPU stall | `kvmmmu:kvm_mmu_pagetable_walk` (shadow MMU) or `kvm:kvm_page_fault` (hardware virtualization) → `kvmmmu:kvm_mmu_spte_requested` | tracepoints |
//! | resume | `kvm_mmu_spte_requested` → `kvm:kvm_entry` (hardware hosts only; never fires under kvm_pvm) | tracepoints |
//! | install | `syscalls:sys_enter_ioctl` → `sys_exit_ioctl` for `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` | tracepoints |
//! | transfer, per peer | [`pagemesh_fetch_begin`] → [`pagemesh_fetch_end`] | uprobes |
//! | page heat | faults resolved per guest frame number (`gfn` of `kvm_mmu_spte_requested`) | tracepoint |
//!
//! A fault's stall is timed from the *first* walk for its address: a walk repeated for the
//! same page within a second (a retried fault) does not restart the clock.
//!
//! The kernel keeps log2 histograms of nanoseconds per CPU; [`Probes::snapshot`] merges them
//! and interpolates percentiles within buckets ([`histogram`]). Heat is double-buffered: a
//! drain thread flips the map the probes write every [`HEAT_DRAIN_MS`] ms and empties the
//! other one into [`Probes::heat`]'s totals, so the kernel map stays bounded by what one
//! period can touch. Sampled per-fault records ([`StallSample`], at most 640 a second per
//! CPU) come through a ring buffer that the same thread polls.
//!
//! Loading needs CAP_BPF and CAP_PERFMON (or root), tracefs (mounted here if it is not) and a
//! kernel with BPF ring buffers (5.8+). A node built without the eBPF toolchain has no probes
//! to load: [`Probes::load`] then fails with [`EbpfError::NotBuiltIn`].

use std::collections::{BTreeMap, VecDeque};
use std::error::Error as StdError;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{TracePoint, UProbe, uprobe::UProbeScope};
use aya::{Ebpf, EbpfLoader};
use pagemesh_api::stats::{Bucket, EbpfStats, Histogram, PeerStats};
use pagemesh_node_common::{
    CONFIG_RESUME, CTR_HEAT_DROPPED, CTR_SAMPLES_LOST, CTR_SAMPLES_SENT, CTR_SAMPLES_THROTTLED,
    CTR_UNMATCHED_END, CTR_UNMATCHED_FETCH, CTR_WALKS, Config, HIST_BUCKETS, HIST_INSTALL,
    HIST_RESUME, HIST_STALL, Hist, StallSample, bucket_high_ns, bucket_low_ns,
};

pub use pagemesh_node_common::HEAT_DRAIN_MS;

/// The probe object built by `build.rs` (empty when the toolchain was missing).
#[cfg(pagemesh_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pagemesh-node-ebpf"));
#[cfg(not(pagemesh_ebpf))]
static OBJECT: &[u8] = &[];

/// Whether this build embeds the probes.
pub const BUILT_IN: bool = cfg!(pagemesh_ebpf);

/// Stall samples kept in memory (the most recent).
const SAMPLES_KEPT: usize = 4096;
/// How long in-flight probes may still write the heat map the drain just retired. A probe
/// runs for a microsecond or so, with preemption disabled (it fires under KVM's mmu_lock).
const HEAT_GRACE: Duration = Duration::from_millis(2);

/// Marks the start of a page fetch from `node` for the transfer uprobe. The fault handler
/// calls it right before sending the request.
///
/// Exported under a fixed, unmangled name so that a uprobe can attach to it, and written as
/// a 5-byte `nop` and a `ret`: on a `nop5`, Linux 6.17+ turns the uprobe's `int3` trap into a
/// call to the uprobe trampoline after the first hit. Measured here: 0.35 µs per hit instead
/// of 5 µs for a uprobe on ordinary code (docs/observability.md).
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub extern "C" fn pagemesh_fetch_begin(node: u32, page: u64) {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret")
}

/// Marks the end of a page fetch from `node` (the reply is in, or the fetch failed). Same
/// shape as [`pagemesh_fetch_begin`]; the trailing `int3` keeps the two from ever being
/// merged into one function at one address (both uprobes would then fire at both calls).
#[cfg(target_arch = "x86_64")]
#[unsafe(no_mangle)]
#[unsafe(naked)]
pub extern "C" fn pagemesh_fetch_end(node: u32, page: u64) {
    core::arch::naked_asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "ret", "int3")
}

/// Marks the start of a page fetch (elsewhere than x86-64: a plain function; `black_box`
/// keeps the call, the marker bytes keep the two functions distinct).
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pagemesh_fetch_begin(node: u32, page: u64) {
    std::hint::black_box((node, page, b'B'));
}

/// Marks the end of a page fetch.
#[cfg(not(target_arch = "x86_64"))]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn pagemesh_fetch_end(node: u32, page: u64) {
    std::hint::black_box((node, page, b'E'));
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
    /// The drain thread could not start.
    #[error("cannot start the eBPF drain thread")]
    Spawn(#[source] io::Error),
}

/// Counters the probes keep about themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProbeCounters {
    /// Faults that entered the MMU (walks, not counting repeats for the same page).
    pub walks: u64,
    /// `kvm_mmu_spte_requested` with no walk before it on the thread.
    pub unmatched_ends: u64,
    /// Heat updates lost because the heat map was full.
    pub heat_dropped: u64,
    /// Stall samples sent through the ring buffer.
    pub samples_sent: u64,
    /// Stall samples lost because the ring buffer was full.
    pub samples_lost: u64,
    /// Stall samples held back by the rate limit.
    pub samples_throttled: u64,
    /// `pagemesh_fetch_end` with no `pagemesh_fetch_begin` before it.
    pub unmatched_fetches: u64,
}

/// Loaded and attached probes. Dropping it detaches them.
pub struct Probes {
    state: Arc<Mutex<State>>,
    attached: Vec<String>,
    stop: Arc<AtomicBool>,
    drainer: Option<JoinHandle<()>>,
}

struct State {
    hists: PerCpuArray<MapData, Hist>,
    transfer: PerCpuHashMap<MapData, u32, Hist>,
    counters: PerCpuArray<MapData, u64>,
    heat_gen: Array<MapData, u32>,
    heat_maps: [PerCpuHashMap<MapData, u64, u64>; 2],
    generation: u32,
    ring: RingBuf<MapData>,
    heat: BTreeMap<u64, u64>,
    samples: VecDeque<StallSample>,
    /// Owns the programs and their links: dropping it detaches everything.
    _bpf: Ebpf,
}

/// A tracepoint program and where it goes.
struct Attach {
    program: &'static str,
    category: &'static str,
    name: &'static str,
    required: bool,
}

const TRACEPOINTS: &[Attach] = &[
    Attach {
        program: "stall_end",
        category: "kvmmmu",
        name: "kvm_mmu_spte_requested",
        required: true,
    },
    Attach {
        program: "stall_walk",
        category: "kvmmmu",
        name: "kvm_mmu_pagetable_walk",
        required: true,
    },
    // Hardware virtualization: faults start here instead (never fires under kvm_pvm).
    Attach {
        program: "stall_fault",
        category: "kvm",
        name: "kvm_page_fault",
        required: false,
    },
    Attach {
        program: "resume",
        category: "kvm",
        name: "kvm_entry",
        required: false,
    },
    Attach {
        program: "install_enter",
        category: "syscalls",
        name: "sys_enter_ioctl",
        required: true,
    },
    Attach {
        program: "install_exit",
        category: "syscalls",
        name: "sys_exit_ioctl",
        required: true,
    },
];

impl Probes {
    /// Loads the probes and attaches them to the threads of process `tgid` (normally
    /// `std::process::id()`).
    pub fn load(tgid: u32) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuiltIn);
        }
        raise_memlock_limit();
        let tracefs = ensure_tracefs()?;
        for tp in TRACEPOINTS.iter().filter(|t| t.required) {
            if !tracefs
                .join("events")
                .join(tp.category)
                .join(tp.name)
                .is_dir()
            {
                return Err(EbpfError::TracepointMissing(format!(
                    "{}:{}",
                    tp.category, tp.name
                )));
            }
        }
        let exists =
            |category: &str, name: &str| tracefs.join("events").join(category).join(name).is_dir();
        let config = Config {
            tgid,
            spte_gfn_offset: field_offset(&tracefs, "kvmmmu", "kvm_mmu_spte_requested", "gfn")?,
            flags: if exists("kvm", "kvm_entry") {
                CONFIG_RESUME
            } else {
                0
            },
            pad: 0,
        };
        let mut bpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .load(OBJECT)
            .map_err(classify_load)?;

        let mut attached = Vec::new();
        for tp in TRACEPOINTS {
            let point = format!("{}:{}", tp.category, tp.name);
            if !tracefs
                .join("events")
                .join(tp.category)
                .join(tp.name)
                .is_dir()
            {
                tracing::debug!("eBPF: optional tracepoint {point} does not exist; skipped");
                continue;
            }
            let what = || format!("{} to {point}", tp.program);
            let program: &mut TracePoint = bpf
                .program_mut(tp.program)
                .ok_or(EbpfError::Map(tp.program, None))?
                .try_into()
                .map_err(|source| EbpfError::Attach {
                    what: what(),
                    source,
                })?;
            program.load().map_err(|e| attach_error(what(), e))?;
            program
                .attach(tp.category, tp.name)
                .map_err(|e| attach_error(what(), e))?;
            attached.push(point);
        }
        match attach_fetch_uprobes(&mut bpf, tgid) {
            Ok(points) => attached.extend(points),
            // Transfer times are the one figure the node can do without (its pager times
            // fetches too); say why once and carry on.
            Err(e) => tracing::info!(
                "eBPF: transfer probes not attached: {}",
                crate::service::error_chain(&e)
            ),
        }

        let state = State {
            hists: take(&mut bpf, "HISTS")?,
            transfer: take(&mut bpf, "TRANSFER")?,
            counters: take(&mut bpf, "COUNTERS_MAP")?,
            heat_gen: take(&mut bpf, "HEAT_GEN")?,
            heat_maps: [take(&mut bpf, "HEAT0")?, take(&mut bpf, "HEAT1")?],
            generation: 0,
            ring: take_ring(&mut bpf)?,
            heat: BTreeMap::new(),
            samples: VecDeque::new(),
            _bpf: bpf,
        };
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let drainer = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ebpf-drain".into())
                .spawn(move || drain_loop(&state, &stop))
                .map_err(EbpfError::Spawn)?
        };
        tracing::info!("eBPF probes attached: {}", attached.join(", "));
        Ok(Self {
            state,
            attached,
            stop,
            drainer: Some(drainer),
        })
    }

    /// The attach points in use (`category:name` for tracepoints, the symbol for uprobes).
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Everything measured so far.
    pub fn snapshot(&self) -> EbpfStats {
        let state = self.lock();
        let stall = state.hist(HIST_STALL);
        EbpfStats {
            faults: stall.count,
            stall: histogram(&stall),
            install: histogram(&state.hist(HIST_INSTALL)),
            transfer: state
                .transfer_by_peer()
                .into_iter()
                .map(|(node_id, h)| PeerStats {
                    node_id,
                    pages: h.count,
                    transfer: histogram(&h),
                })
                .collect(),
        }
    }

    /// Time from a resolved fault to the vCPU's re-entry into the guest. Empty where
    /// `kvm:kvm_entry` does not fire (kvm_pvm).
    pub fn resume(&self) -> Histogram {
        histogram(&self.lock().hist(HIST_RESUME))
    }

    /// The `"ebpf"` object of the node's `--json` summary:
    /// `{"faults":N,"stall_p50_us":X,"stall_p99_us":X,"install_p50_us":X,"transfer_p50_us":X}`.
    /// A figure with no samples is 0.
    pub fn ebpf_summary_json(&self) -> serde_json::Value {
        let state = self.lock();
        let stall = state.hist(HIST_STALL);
        let install = state.hist(HIST_INSTALL);
        let mut transfer = Hist::ZERO;
        for (_, h) in state.transfer_by_peer() {
            transfer.merge(&h);
        }
        serde_json::json!({
            "faults": stall.count,
            "stall_p50_us": percentile_us(&stall, 0.50),
            "stall_p99_us": percentile_us(&stall, 0.99),
            "install_p50_us": percentile_us(&install, 0.50),
            "transfer_p50_us": percentile_us(&transfer, 0.50),
        })
    }

    /// Faults resolved per guest frame number (guest-physical address / 4096) since the
    /// probes were loaded, in frame order. Drains the kernel's heat map first, so every
    /// fault resolved before the call is counted.
    pub fn heat(&self) -> Vec<(u64, u64)> {
        let mut state = self.lock();
        state.drain_heat();
        state.heat.iter().map(|(&gfn, &n)| (gfn, n)).collect()
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
        let c = |i| state.counter(i);
        ProbeCounters {
            walks: c(CTR_WALKS),
            unmatched_ends: c(CTR_UNMATCHED_END),
            heat_dropped: c(CTR_HEAT_DROPPED),
            samples_sent: c(CTR_SAMPLES_SENT),
            samples_lost: c(CTR_SAMPLES_LOST),
            samples_throttled: c(CTR_SAMPLES_THROTTLED),
            unmatched_fetches: c(CTR_UNMATCHED_FETCH),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in the drain thread leaves the state as consistent as any read of it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.drainer.take() {
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
    /// One histogram, summed over CPUs (empty if unreadable).
    fn hist(&self, kind: u32) -> Hist {
        let mut total = Hist::ZERO;
        if let Ok(per_cpu) = self.hists.get(&kind, 0) {
            for h in per_cpu.iter() {
                total.merge(h);
            }
        }
        total
    }

    fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    fn transfer_by_peer(&self) -> BTreeMap<u32, Hist> {
        let mut out = BTreeMap::new();
        for entry in self.transfer.iter() {
            let Ok((node, per_cpu)) = entry else { continue };
            let total: &mut Hist = out.entry(node).or_insert(Hist::ZERO);
            for h in per_cpu.iter() {
                total.merge(h);
            }
        }
        out
    }

    /// Points the probes at the other heat map, waits out the probes still writing the old
    /// one, and moves its counts into `heat`.
    fn drain_heat(&mut self) {
        let old = self.generation as usize;
        let new = 1 - self.generation;
        if self.heat_gen.set(0, new, 0).is_err() {
            return;
        }
        self.generation = new;
        std::thread::sleep(HEAT_GRACE);
        let map = &mut self.heat_maps[old];
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for gfn in keys {
            if let Ok(per_cpu) = map.get(&gfn, 0) {
                *self.heat.entry(gfn).or_insert(0) += per_cpu.iter().sum::<u64>();
            }
            let _ = map.remove(&gfn);
        }
    }

    fn drain_samples(&mut self) {
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
        }
    }
}

fn drain_loop(state: &Mutex<State>, stop: &AtomicBool) {
    let period = Duration::from_millis(HEAT_DRAIN_MS);
    let mut next = Instant::now() + period;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next = now + period;
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.drain_samples();
        s.drain_heat();
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

/// Attaches the transfer uprobes to this process's executable.
fn attach_fetch_uprobes(bpf: &mut Ebpf, tgid: u32) -> Result<Vec<String>, EbpfError> {
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).map_err(|e| EbpfError::Attach {
        what: "the transfer uprobes".into(),
        source: aya::programs::ProgramError::IOError(e),
    })?;
    let scope =
        std::num::NonZeroU32::new(tgid).map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
    let mut points = Vec::new();
    for (program, symbol) in [
        ("fetch_begin", "pagemesh_fetch_begin"),
        ("fetch_end", "pagemesh_fetch_end"),
    ] {
        let what = || format!("{program} to {symbol} in {}", exe.display());
        let p: &mut UProbe = bpf
            .program_mut(program)
            .ok_or(EbpfError::Map(program, None))?
            .try_into()
            .map_err(|source| EbpfError::Attach {
                what: what(),
                source,
            })?;
        p.load().map_err(|e| attach_error(what(), e))?;
        p.attach(symbol, &exe, scope)
            .map_err(|e| attach_error(what(), e))?;
        points.push(symbol.to_owned());
    }
    Ok(points)
}

fn take<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.take_map(name).ok_or(EbpfError::Map(name, None))?;
    T::try_from(map).map_err(|e| EbpfError::Map(name, Some(e)))
}

fn take_ring(bpf: &mut Ebpf) -> Result<RingBuf<MapData>, EbpfError> {
    let map = bpf
        .take_map("SAMPLES")
        .ok_or(EbpfError::Map("SAMPLES", None))?;
    RingBuf::try_from(map).map_err(|e| EbpfError::Map("SAMPLES", Some(e)))
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

/// Byte offset of `field` in a tracepoint's record, from its `format` file.
fn field_offset(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &'static str,
) -> Result<u32, EbpfError> {
    let point = format!("{category}:{name}");
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
            EbpfError::TracepointMissing(point.clone())
        }
    })?;
    parse_field_offset(&text, field).ok_or(EbpfError::FieldMissing {
        tracepoint: point,
        field,
    })
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
    fn fetch_markers_are_callable() {
        pagemesh_fetch_begin(1, 2);
        pagemesh_fetch_end(1, 2);
    }
}
