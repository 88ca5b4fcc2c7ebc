//! pagemesh's kernel-side latency probes, loaded by the node (`node/src/ebpf.rs`).
//!
//! Every probe measures only threads of the node's own process (`CONFIG.tgid`), and pairs a
//! start with an end **on the same thread** through a per-thread `Start` map:
//!
//! | program | attached to | does |
//! |---|---|---|
//! | `stall_walk` | `kvmmmu:kvm_mmu_pagetable_walk` | a vCPU fault enters KVM's shadow MMU: start |
//! | `stall_fault` | `kvm:kvm_page_fault` | same, on hosts with hardware virtualization |
//! | `stall_end` | `kvmmmu:kvm_mmu_spte_requested` | the page is resolved: stall histogram, heat, sample |
//! | `resume` | `kvm:kvm_entry` | the vCPU re-enters the guest (hardware hosts only) |
//! | `install_enter` / `install_exit` | `syscalls:sys_{enter,exit}_ioctl` | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` time |
//! | `fetch_begin` / `fetch_end` | uprobes on `pagemesh_fetch_{begin,end}` | transfer time per peer |
//!
//! Histograms are per-CPU (no atomics on the hot path; the node merges them); the heat maps
//! are double-buffered so that the node can drain one exactly while the probes fill the
//! other. Built with `-Z build-std=core` for `bpfel-unknown-none` by `node/build.rs`; on the
//! host it compiles to an empty program so that `cargo clippy --workspace` checks it.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, tracepoint, uprobe};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::{ProbeContext, TracePointContext};
use pagemesh_node_common::{
    CONFIG_RESUME, COUNTERS, CTR_HEAT_DROPPED, CTR_SAMPLES_LOST, CTR_SAMPLES_SENT,
    CTR_SAMPLES_THROTTLED, CTR_UNMATCHED_END, CTR_UNMATCHED_FETCH, CTR_WALKS, Config,
    HEAT_MAX_ENTRIES, HIST_INSTALL, HIST_KINDS, HIST_RESUME, HIST_STALL, Hist, PEERS_MAX_ENTRIES,
    RateWindow, SAMPLE_WINDOW_NS, SAMPLES_PER_WINDOW, SAMPLES_RING_BYTES, START_MAX_ENTRIES,
    StallSample, Start, UFFDIO_COPY, UFFDIO_ZEROPAGE,
};

/// Set by the node before loading (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    tgid: 0,
    spte_gfn_offset: 8,
    flags: 0,
    pad: 0,
};

/// vCPU thread id → the walk that started its current fault.
#[map]
static STALL_START: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);
/// vCPU thread id → when its last fault was resolved (for `resume`).
#[map]
static RESOLVED: HashMap<u32, u64> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);
/// Handler thread id → its pending install ioctl.
#[map]
static INSTALL_START: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);
/// Handler thread id → its pending fetch (`arg` is the peer).
#[map]
static FETCH_START: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);

/// `HIST_STALL`, `HIST_INSTALL`, `HIST_RESUME`.
#[map]
static HISTS: PerCpuArray<Hist> = PerCpuArray::with_max_entries(HIST_KINDS, 0);
/// Peer node → transfer time.
#[map]
static TRANSFER: PerCpuHashMap<u32, Hist> = PerCpuHashMap::with_max_entries(PEERS_MAX_ENTRIES, 0);
/// An all-zero `Hist` to insert from (too large for the 512-byte BPF stack).
#[map]
static ZERO_HIST: Array<Hist> = Array::with_max_entries(1, 0);
/// `CTR_*` counters.
#[map]
static COUNTERS_MAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// Which heat map the probes fill: 0 → `HEAT0`, 1 → `HEAT1`. The node flips it and drains the
/// other one.
#[map]
static HEAT_GEN: Array<u32> = Array::with_max_entries(1, 0);
/// Guest frame number → faults resolved on it (per CPU: no atomics; the node sums them).
#[map]
static HEAT0: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(HEAT_MAX_ENTRIES, 0);
/// The other half of the double buffer.
#[map]
static HEAT1: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(HEAT_MAX_ENTRIES, 0);

/// Sampled stalls.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLES_RING_BYTES, 0);
/// Per-CPU rate limit of `SAMPLES`.
#[map]
static SAMPLE_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// Offsets in the `syscalls:sys_{enter,exit}_*` records (`struct syscall_trace_enter/exit`:
/// 8 bytes of common fields, the syscall number, then 8-byte arguments or the return value).
const SYSCALL_ARG1_OFFSET: usize = 24;
/// `kvm:kvm_page_fault`'s `fault_address`.
const KVM_PAGE_FAULT_ADDR_OFFSET: usize = 24;
/// A start older than this is not the same fault any more (see `start_stall`).
const SAME_FAULT_NS: u64 = 1_000_000_000;

fn config() -> Config {
    // SAFETY: CONFIG is a valid static; the volatile read keeps the compiler from folding
    // the placeholder value in, since the loader rewrites it in .rodata.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

/// Whether the current thread belongs to the node; its thread id if so.
#[inline(always)]
fn node_thread(ctx: &impl EbpfContext) -> Option<u32> {
    let cfg = config();
    if ctx.tgid() == cfg.tgid {
        Some(ctx.pid())
    } else {
        None
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(c) = COUNTERS_MAP.get_ptr_mut(counter) {
        // SAFETY: a per-CPU array slot, valid while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn record(kind: u32, ns: u64) {
    if let Some(h) = HISTS.get_ptr_mut(kind) {
        // SAFETY: a per-CPU array slot; programs do not nest on one CPU.
        unsafe { (*h).record(ns) };
    }
}

/// Adds one fault on `gfn` to the heat map the node is not draining.
#[inline(always)]
fn heat(gfn: u64) {
    let generation = HEAT_GEN.get(0).copied().unwrap_or(0);
    let map = if generation == 0 { &HEAT0 } else { &HEAT1 };
    if let Some(n) = map.get_ptr_mut(gfn) {
        // SAFETY: this CPU's copy of a live per-CPU hash entry; programs do not nest on one
        // CPU.
        unsafe { *n += 1 };
        return;
    }
    // A new entry has this CPU's value set and the other CPUs' zeroed. Another CPU may have
    // inserted the page in between: then add to ours.
    if map.insert(gfn, 1, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    match map.get_ptr_mut(gfn) {
        // SAFETY: as above.
        Some(n) => unsafe { *n += 1 },
        None => count(CTR_HEAT_DROPPED),
    }
}

/// Sends a sample of this stall unless this CPU used up its window's budget.
#[inline(always)]
fn sample(ts_ns: u64, gfn: u64, stall_ns: u64, tid: u32) {
    let Some(w) = SAMPLE_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array slot; programs do not nest on one CPU.
    let w = unsafe { &mut *w };
    if ts_ns.wrapping_sub(w.start_ns) >= SAMPLE_WINDOW_NS {
        w.start_ns = ts_ns;
        w.sent = 0;
    }
    if w.sent >= SAMPLES_PER_WINDOW {
        count(CTR_SAMPLES_THROTTLED);
        return;
    }
    w.sent += 1;
    let s = StallSample {
        ts_ns,
        gfn,
        stall_ns,
        tid,
        pad: 0,
    };
    // No wake-up: the node polls the ring buffer.
    if SAMPLES
        .output::<StallSample>(&s, u64::from(BPF_RB_NO_WAKEUP))
        .is_ok()
    {
        count(CTR_SAMPLES_SENT);
    } else {
        count(CTR_SAMPLES_LOST);
    }
}

/// A fault of thread `tid` on `addr` enters the MMU. A second walk for the same address
/// shortly after (the fault was retried, e.g. after the userfaultfd wait) keeps the first
/// start, so the stall covers the whole fault.
#[inline(always)]
fn start_stall(tid: u32, addr: u64) {
    let ts = now();
    let page = addr >> 12;
    // SAFETY: the value is copied out at once; entries are only ever touched by their own
    // thread.
    if let Some(prev) = unsafe { STALL_START.get(tid) }
        && prev.arg >> 12 == page
        && ts.wrapping_sub(prev.ts_ns) < SAME_FAULT_NS
    {
        return;
    }
    count(CTR_WALKS);
    let _ = STALL_START.insert(
        tid,
        Start {
            ts_ns: ts,
            arg: addr,
        },
        0,
    );
}

/// A vCPU fault enters the shadow MMU: the stall starts.
#[tracepoint]
fn stall_walk(ctx: TracePointContext) -> u32 {
    match try_stall_walk(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_stall_walk(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // SAFETY: `addr` is the first field after the common header (offset 8, u64) in every
    // kernel since the tracepoint was added (3.x).
    let addr: u64 = unsafe { ctx.read_at(8) }.map_err(|_| 0u32)?;
    start_stall(tid, addr);
    Ok(0)
}

/// A vCPU fault enters the MMU (hardware virtualization): the stall starts.
#[tracepoint]
fn stall_fault(ctx: TracePointContext) -> u32 {
    match try_stall_fault(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_stall_fault(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // SAFETY: reads a u64 inside the tracepoint record (layout in the module docs).
    let addr: u64 = unsafe { ctx.read_at(KVM_PAGE_FAULT_ADDR_OFFSET) }.map_err(|_| 0u32)?;
    start_stall(tid, addr);
    Ok(0)
}

/// The faulting page is resolved: the stall ends; heat and a sample are recorded.
#[tracepoint]
fn stall_end(ctx: TracePointContext) -> u32 {
    match try_stall_end(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_stall_end(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    let ts = now();
    // SAFETY: the value is copied out at once; only this thread touches its entry.
    let Some(start) = (unsafe { STALL_START.get(tid) }).copied() else {
        count(CTR_UNMATCHED_END);
        return Ok(0);
    };
    let _ = STALL_START.remove(tid);
    let stall = ts.wrapping_sub(start.ts_ns);
    let offset = config().spte_gfn_offset as usize;
    // SAFETY: the node read this offset of `gfn` (u64) from the tracepoint's format file.
    let gfn: u64 = unsafe { ctx.read_at(offset & 0xff) }.map_err(|_| 0u32)?;
    record(HIST_STALL, stall);
    heat(gfn);
    sample(ts, gfn, stall, tid);
    if config().flags & CONFIG_RESUME != 0 {
        let _ = RESOLVED.insert(tid, ts, 0);
    }
    Ok(0)
}

/// The vCPU re-enters the guest after a resolved fault (hardware virtualization).
#[tracepoint]
fn resume(ctx: TracePointContext) -> u32 {
    match try_resume(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_resume(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // SAFETY: the value is copied out at once; only this thread touches its entry.
    let resolved = (unsafe { RESOLVED.get(tid) }).copied().ok_or(0u32)?;
    let _ = RESOLVED.remove(tid);
    record(HIST_RESUME, now().wrapping_sub(resolved));
    Ok(0)
}

/// A `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` ioctl starts.
#[tracepoint]
fn install_enter(ctx: TracePointContext) -> u32 {
    match try_install_enter(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_install_enter(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // SAFETY: reads the `cmd` argument (u64 slot) of the sys_enter_ioctl record.
    let cmd: u64 = unsafe { ctx.read_at(SYSCALL_ARG1_OFFSET) }.map_err(|_| 0u32)?;
    let cmd = cmd as u32;
    if cmd == UFFDIO_COPY || cmd == UFFDIO_ZEROPAGE {
        let start = Start {
            ts_ns: now(),
            arg: u64::from(cmd),
        };
        let _ = INSTALL_START.insert(tid, start, 0);
    }
    Ok(0)
}

/// The ioctl returns: install time.
#[tracepoint]
fn install_exit(ctx: TracePointContext) -> u32 {
    match try_install_exit(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_install_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // SAFETY: the value is copied out at once; only this thread touches its entry.
    let start = (unsafe { INSTALL_START.get(tid) }).copied().ok_or(0u32)?;
    let _ = INSTALL_START.remove(tid);
    record(HIST_INSTALL, now().wrapping_sub(start.ts_ns));
    Ok(0)
}

/// `pagemesh_fetch_begin(node, page)`: a fetch from a peer starts.
#[uprobe]
fn fetch_begin(ctx: ProbeContext) -> u32 {
    match try_fetch_begin(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_fetch_begin(ctx: &ProbeContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    // `pagemesh_fetch_begin(node: u32, page: u64)`: the peer is the first argument.
    let node: u64 = ctx.arg(0).ok_or(0u32)?;
    let start = Start {
        ts_ns: now(),
        arg: node & 0xffff_ffff,
    };
    let _ = FETCH_START.insert(tid, start, 0);
    Ok(0)
}

/// `pagemesh_fetch_end(node, page)`: the fetch is done: transfer time for the peer.
#[uprobe]
fn fetch_end(ctx: ProbeContext) -> u32 {
    match try_fetch_end(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_fetch_end(ctx: &ProbeContext) -> Result<u32, u32> {
    let tid = node_thread(ctx).ok_or(0u32)?;
    let ts = now();
    // SAFETY: the value is copied out at once; only this thread touches its entry.
    let Some(start) = (unsafe { FETCH_START.get(tid) }).copied() else {
        count(CTR_UNMATCHED_FETCH);
        return Ok(0);
    };
    let _ = FETCH_START.remove(tid);
    let node = start.arg as u32;
    let hist = match TRANSFER.get_ptr_mut(node) {
        Some(h) => h,
        None => {
            let zero = ZERO_HIST.get_ptr(0).ok_or(0u32)?;
            // SAFETY: `zero` points at a live map value of the right type. Inserted by
            // reference: a `Hist` is too large for the 512-byte BPF stack.
            let zero: &Hist = unsafe { &*zero };
            let _ = TRANSFER.insert(node, zero, u64::from(BPF_NOEXIST));
            TRANSFER.get_ptr_mut(node).ok_or(0u32)?
        }
    };
    // SAFETY: this CPU's copy of a live per-CPU hash entry; programs do not nest on one CPU.
    unsafe { (*hist).record(ts.wrapping_sub(start.ts_ns)) };
    Ok(0)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; there is nothing to unwind to.
    loop {}
}

/// GPL: the probes use GPL-only helpers (`bpf_probe_read_kernel`, ring buffers).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
