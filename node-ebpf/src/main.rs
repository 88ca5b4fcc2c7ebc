//! pagemesh's kernel-side latency probes, loaded by the node (`node/src/ebpf.rs`).
//!
//! Every probe measures only threads of the node's own process (`CONFIG.tgid`), and pairs a
//! start with an end **on the same thread** through a per-thread `Start` slot:
//!
//! | program | attached to | does |
//! |---|---|---|
//! | `stall_walk` | `kvmmmu:kvm_mmu_pagetable_walk` | a vCPU fault enters KVM's shadow MMU: start |
//! | `stall_fault` | `kvm:kvm_page_fault` | same, on hosts with hardware virtualization |
//! | `stall_end` | `kvmmmu:kvm_mmu_spte_requested` | the page is resolved: stall histogram, heat, sample |
//! | `resume` | `kvm:kvm_entry` | the vCPU re-enters the guest (hardware hosts only) |
//! | `install_enter` / `install_exit` | `syscalls:sys_{enter,exit}_ioctl` | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` time |
//! | `fetch_done` | uprobe on `pagemesh_fetch_done` | transfer time per peer |
//!
//! The probes run on every remote fault, so they are written for cost (measured with
//! `kernel.bpf_stats_enabled`, docs/observability.md): histograms and counters are per-CPU (no
//! atomics; the node merges them); a thread's start slot is created once and then updated in
//! place (a hash lookup, not an insert and a delete per fault); heat is one atomic add into an
//! array indexed by guest frame number, which the node reads in place through a shared
//! mapping (`BPF_F_MMAPABLE`), so nothing is inserted or drained per page. Built with `-Z build-std=core` for `bpfel-unknown-none` by `node/build.rs`; on the
//! host it compiles to an empty program so that `cargo clippy --workspace` checks it.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, tracepoint, uprobe};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::{ProbeContext, TracePointContext};
use pagemesh_node_common::{
    CONFIG_RESUME, CTR_HEAT_DROPPED, CTR_SAMPLES_LOST, CTR_SAMPLES_SENT, CTR_SAMPLES_THROTTLED,
    CTR_UNMATCHED_END, CTR_WALKS, Config, CpuStats, HIST_INSTALL, HIST_RESUME, HIST_STALL, Hist,
    PEERS_MAX_ENTRIES, SAMPLE_WINDOW_NS, SAMPLES_PER_WINDOW, SAMPLES_RING_BYTES, START_MAX_ENTRIES,
    StallSample, Start, UFFDIO_COPY, UFFDIO_ZEROPAGE, field,
};

/// Set by the node before loading (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config { tgid: 0, flags: 0 };

/// vCPU thread id → the walk that started its current fault.
#[map]
static STALL_START: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);
/// vCPU thread id → when its last fault was resolved (for `resume`).
#[map]
static RESOLVED: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);
/// Handler thread id → its pending install ioctl.
#[map]
static INSTALL_START: HashMap<u32, Start> = HashMap::with_max_entries(START_MAX_ENTRIES, 0);

/// Histograms (`HIST_*`), counters (`CTR_*`) and the sample rate window, per CPU.
#[map]
static CPU: PerCpuArray<CpuStats> = PerCpuArray::with_max_entries(1, 0);
/// Peer node → transfer time.
#[map]
static TRANSFER: PerCpuHashMap<u32, Hist> = PerCpuHashMap::with_max_entries(PEERS_MAX_ENTRIES, 0);
/// An all-zero `Hist` to insert from (too large for the 512-byte BPF stack).
#[map]
static ZERO_HIST: Array<Hist> = Array::with_max_entries(1, 0);

/// Guest frame number → faults resolved on it. The loader sizes it to the VM's frames
/// (`set_max_entries`); the node maps it and reads the counters in place.
#[map]
static HEAT: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Sampled stalls.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLES_RING_BYTES, 0);

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

/// The u64 at byte `OFFSET` of the tracepoint record: one load from the context (the
/// verifier allows constant offsets into a tracepoint's record), no helper call.
#[inline(always)]
fn read_field<const OFFSET: usize>(ctx: &TracePointContext) -> u64 {
    // SAFETY: the loader checked that the field lies at OFFSET in this kernel's record
    // (`pagemesh_node_common::field`); records are 8-byte aligned and the fields are u64s.
    unsafe { core::ptr::read(ctx.as_ptr().cast::<u8>().add(OFFSET).cast::<u64>()) }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(c) = cpu().and_then(|s| s.counters.get_mut(counter as usize)) {
        *c += 1;
    }
}

#[inline(always)]
fn record(kind: u32, ns: u64) {
    if let Some(h) = cpu().and_then(|s| s.hists.get_mut(kind as usize)) {
        h.record(ns);
    }
}

/// This CPU's [`CpuStats`].
#[inline(always)]
fn cpu() -> Option<&'static mut CpuStats> {
    // SAFETY: this CPU's slot of a per-CPU array, valid while the program runs; programs do
    // not nest on one CPU, and each caller drops its reference before the next is made.
    CPU.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Adds one fault on `gfn` to the heat array.
#[inline(always)]
fn heat(gfn: u64) {
    match u32::try_from(gfn).ok().and_then(|i| HEAT.get_ptr_mut(i)) {
        // SAFETY: a live, aligned u64 of the array.
        Some(n) => unsafe { atomic_inc(n) },
        None => count(CTR_HEAT_DROPPED),
    }
}

/// `*p += 1` as one BPF atomic add (`BPF_ATOMIC | BPF_ADD`): two CPUs may resolve faults on
/// the same page at once. Rust has no atomic read-modify-write for BPF (the target has no
/// compare-and-swap, so `AtomicU64::fetch_add` does not exist there), hence the assembly.
///
/// # Safety
/// `p` points at a live, 8-byte aligned `u64` in a map value.
#[inline(always)]
unsafe fn atomic_inc(p: *mut u64) {
    // SAFETY: the caller's contract; the instruction touches only `*p`.
    #[cfg(target_arch = "bpf")]
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {one}",
            p = in(reg) p,
            one = in(reg) 1u64,
            options(nostack),
        );
    }
    // The host build only type-checks the probes (clippy); it never runs them.
    // SAFETY: the caller's contract.
    #[cfg(not(target_arch = "bpf"))]
    unsafe {
        *p += 1;
    }
}

/// Starts the clock in `tid`'s slot of `map`: in place when the thread has one (every fault
/// after its first), else by creating it.
#[inline(always)]
fn start(map: &HashMap<u32, Start>, tid: u32, ts_ns: u64, arg: u64) {
    match map.get_ptr_mut(tid) {
        // SAFETY: a live map value; a thread's slot is only touched by that thread, and
        // programs do not nest on a CPU.
        Some(slot) => unsafe { *slot = Start { ts_ns, arg } },
        None => {
            let _ = map.insert(tid, Start { ts_ns, arg }, 0);
        }
    }
}

/// Takes the start from `tid`'s slot of `map`, leaving it empty (`ts_ns == 0`).
#[inline(always)]
fn take(map: &HashMap<u32, Start>, tid: u32) -> Option<Start> {
    let slot = map.get_ptr_mut(tid)?;
    // SAFETY: as in `start`.
    let slot = unsafe { &mut *slot };
    if slot.ts_ns == 0 {
        return None;
    }
    let taken = *slot;
    slot.ts_ns = 0;
    Some(taken)
}

/// Sends a sample of this stall unless this CPU used up its window's budget.
#[inline(always)]
fn sample(ts_ns: u64, gfn: u64, stall_ns: u64, tid: u32) {
    let Some(stats) = cpu() else {
        return;
    };
    let w = &mut stats.rate;
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
    if let Some(prev) = STALL_START.get_ptr_mut(tid) {
        // SAFETY: as in `start`.
        let prev = unsafe { &mut *prev };
        if prev.ts_ns != 0
            && prev.arg >> 12 == addr >> 12
            && ts.wrapping_sub(prev.ts_ns) < SAME_FAULT_NS
        {
            return;
        }
        count(CTR_WALKS);
        *prev = Start {
            ts_ns: ts,
            arg: addr,
        };
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
    start_stall(tid, read_field::<{ field::WALK_ADDR }>(ctx));
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
    start_stall(tid, read_field::<{ field::PAGE_FAULT_ADDR }>(ctx));
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
    let Some(started) = take(&STALL_START, tid) else {
        count(CTR_UNMATCHED_END);
        return Ok(0);
    };
    let stall = ts.wrapping_sub(started.ts_ns);
    let gfn = read_field::<{ field::SPTE_GFN }>(ctx);
    record(HIST_STALL, stall);
    heat(gfn);
    sample(ts, gfn, stall, tid);
    if config().flags & CONFIG_RESUME != 0 {
        start(&RESOLVED, tid, ts, gfn);
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
    let resolved = take(&RESOLVED, tid).ok_or(0u32)?;
    record(HIST_RESUME, now().wrapping_sub(resolved.ts_ns));
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
    let cmd = read_field::<{ field::IOCTL_CMD }>(ctx) as u32;
    if cmd == UFFDIO_COPY || cmd == UFFDIO_ZEROPAGE {
        start(&INSTALL_START, tid, now(), u64::from(cmd));
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
    let started = take(&INSTALL_START, tid).ok_or(0u32)?;
    record(HIST_INSTALL, now().wrapping_sub(started.ts_ns));
    Ok(0)
}

/// `pagemesh_fetch_done(node, page, began_ns)`: a fetch from peer `node` that began at
/// `began_ns` (CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`) is over: its transfer time
/// goes into the peer's histogram. One uprobe hit per fetch, not two (begin and end): each
/// hit costs about 0.4 µs here, and this one runs on every remote fault.
#[uprobe]
fn fetch_done(ctx: ProbeContext) -> u32 {
    match try_fetch_done(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_fetch_done(ctx: &ProbeContext) -> Result<u32, u32> {
    node_thread(ctx).ok_or(0u32)?;
    let ts = now();
    let node: u64 = ctx.arg(0).ok_or(0u32)?;
    let began: u64 = ctx.arg(2).ok_or(0u32)?;
    // Two readings of one clock, taken on one thread: a begin after the end can only be a
    // caller's mistake; it counts as 0 rather than as 584 years.
    let transfer = ts.saturating_sub(began);
    let node = node as u32;
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
    unsafe { (*hist).record(transfer) };
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
