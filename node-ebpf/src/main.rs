//! pagemesh's kernel-side latency probes, loaded by the node (`node/src/ebpf.rs`).
//!
//! Every probe measures only threads of the node's own process (`CONFIG.tgid`), and pairs a
//! start with an end **on the same thread** through a per-thread `Start` slot:
//!
//! | program | attached to | does |
//! |---|---|---|
//! | `stall_walk` | raw tracepoint `kvm_mmu_pagetable_walk` | a vCPU fault enters KVM's shadow MMU: start |
//! | `stall_fault` | `kvm:kvm_page_fault` | same, on hosts with hardware virtualization |
//! | `stall_end` | raw tracepoint `kvm_mmu_spte_requested` | the page is resolved: stall histogram, heat, sample |
//! | `stall_end_record` | `kvmmmu:kvm_mmu_spte_requested` | the same where the kernel's BTF lacks `struct kvm_page_fault` |
//! | `resume` | `kvm:kvm_entry` | the vCPU re-enters the guest (hardware hosts only) |
//! | `install_enter` / `install_exit` | `syscalls:sys_{enter,exit}_ioctl` | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` time |
//! | `fetch_done` | uprobe on `pagemesh_fetch_done` | transfer time per peer |
//!
//! The probes run on every remote fault, so they are written for cost (measured with
//! `kernel.bpf_stats_enabled` and paired benchmark rounds, docs/observability.md). The two on
//! the vCPU's path run right after a switch out of the guest, with cold caches and TLB, so
//! what they touch is kept to a few lines in a few pages: they are raw tracepoints (the
//! arguments as they are, no record copied into a per-CPU buffer first); a thread's start
//! slot is an element of a small array indexed by thread id (an inlined address
//! computation, no hashing); histograms, counters and the sample rate window are one element
//! per CPU of a small array (no atomics; the node merges them); both arrays are small enough
//! to live in the kernel's huge-page direct map. Heat is one atomic add into an array indexed
//! by guest frame number, which the node reads in place through a shared mapping
//! (`BPF_F_MMAPABLE`), so nothing is inserted or drained per page. Built with
//! `-Z build-std=core` for `bpfel-unknown-none` by `node/build.rs`; on the host it compiles
//! to an empty program so that `cargo clippy --workspace` checks it.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
};
use aya_ebpf::macros::{map, raw_tracepoint, tracepoint, uprobe};
use aya_ebpf::maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::{ProbeContext, RawTracePointContext, TracePointContext};
use pagemesh_node_common::{
    CONFIG_RESUME, CTR_HEAT_DROPPED, CTR_SAMPLES_LOST, CTR_SAMPLES_SENT, CTR_SAMPLES_THROTTLED,
    CTR_UNMATCHED_END, Config, CpuStats, HIST_INSTALL, HIST_RESUME, HIST_STALL, Hist, PEERS_LOW,
    PEERS_MAX_ENTRIES, SAMPLE_EVERY, SAMPLE_WINDOW_NS, SAMPLES_PER_WINDOW, SAMPLES_RING_BYTES,
    START_SLOTS, StallSample, Start, UFFDIO_COPY, UFFDIO_ZEROPAGE, field,
};

/// Set by the node before loading (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    tgid: 0,
    flags: 0,
    fault_gfn: 0,
    pad: 0,
};

/// vCPU thread slot → the walk that started its current fault.
#[map]
static STALL_START: Array<Start> = Array::with_max_entries(START_SLOTS, 0);
/// vCPU thread slot → when its last fault was resolved (for `resume`).
#[map]
static RESOLVED: Array<Start> = Array::with_max_entries(START_SLOTS, 0);
/// Handler thread slot → its pending install ioctl.
#[map]
static INSTALL_START: Array<Start> = Array::with_max_entries(START_SLOTS, 0);

/// Histograms (`HIST_*`), counters (`CTR_*`) and the sample rate window, indexed by CPU (the
/// loader sizes it to the possible CPUs). A plain array rather than a per-CPU one: a small
/// array is one `kmalloc` in the kernel's direct map, which is mapped with huge pages, while
/// per-CPU memory for maps comes from vmalloc'ed chunks of 4 KiB pages; on the vCPU's path,
/// after a switch out of the guest, fewer distinct pages mean fewer TLB misses. (Measured as
/// a whole with the other changes of docs/observability.md#overhead, not alone.)
#[map]
static CPU: Array<CpuStats> = Array::with_max_entries(1, 0);
/// Peer node (below `PEERS_LOW`) → transfer time.
#[map]
static TRANSFER_LOW: PerCpuArray<Hist> = PerCpuArray::with_max_entries(PEERS_LOW, 0);
/// Peer node (from `PEERS_LOW` on) → transfer time.
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
fn node_thread() -> Option<u32> {
    let cfg = config();
    // One helper call for both halves (`ctx.tgid()` and `ctx.pid()` would make two).
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == cfg.tgid {
        Some(pid_tgid as u32)
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
fn record(kind: u32, ns: u64) -> u64 {
    match cpu().and_then(|s| s.hists.get_mut(kind as usize)) {
        Some(h) => {
            h.record(ns);
            h.count
        }
        None => 0,
    }
}

/// This CPU's [`CpuStats`].
#[inline(always)]
fn cpu() -> Option<&'static mut CpuStats> {
    // SAFETY: bpf_get_smp_processor_id has no preconditions (tracing programs run with
    // migration disabled, so the CPU stays the same while the program runs).
    let id = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: this CPU's element, valid while the program runs; only programs running on
    // this CPU use it, they do not nest, and each caller drops its reference before the
    // next is made.
    CPU.get_ptr_mut(id).map(|p| unsafe { &mut *p })
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

/// `tid`'s start slot in `map` (shared with threads whose ids are equal modulo
/// `START_SLOTS`; `Start::tid` tells whose start it holds).
#[inline(always)]
fn slot(map: &Array<Start>, tid: u32) -> Option<&'static mut Start> {
    // SAFETY: a live array element; a thread's slot is only used by that thread's probes
    // (or by a thread sharing it, which takes it over with `begin`), and programs do not nest
    // on a CPU.
    map.get_ptr_mut(tid & (START_SLOTS - 1))
        .map(|p| unsafe { &mut *p })
}

/// Starts the clock in `tid`'s slot of `map`.
#[inline(always)]
fn start(map: &Array<Start>, tid: u32, ts_ns: u64, arg: u64) {
    if let Some(s) = slot(map, tid) {
        begin(s, tid, ts_ns, arg);
    }
}

/// Records in slot `s` a start of thread `tid` at `ts_ns` on `arg`, and counts it.
#[inline(always)]
fn begin(s: &mut Start, tid: u32, ts_ns: u64, arg: u64) {
    s.ts_ns = ts_ns;
    s.arg = arg;
    s.tid = tid;
    s.starts = s.starts.wrapping_add(1);
}

/// Takes `tid`'s start from its slot of `map`, leaving the slot empty (`ts_ns == 0`).
#[inline(always)]
fn take(map: &Array<Start>, tid: u32) -> Option<Start> {
    let s = slot(map, tid)?;
    if s.ts_ns == 0 || s.tid != tid {
        return None;
    }
    let taken = *s;
    s.ts_ns = 0;
    Some(taken)
}

/// Sends a sample of this stall (a candidate: one in [`SAMPLE_EVERY`]) unless this CPU used
/// up its window's budget.
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
    let Some(prev) = slot(&STALL_START, tid) else {
        return;
    };
    if prev.ts_ns != 0
        && prev.tid == tid
        && prev.arg >> 12 == addr >> 12
        && ts.wrapping_sub(prev.ts_ns) < SAME_FAULT_NS
    {
        return;
    }
    begin(prev, tid, ts, addr);
}

/// A vCPU fault enters the shadow MMU: the stall starts. A raw tracepoint, which hands the
/// program the tracepoint's arguments (`u64 addr, u32 pferr`) as they are; a perf-event
/// tracepoint would first copy them into a record in a per-CPU buffer, on the vCPU's path.
#[raw_tracepoint(tracepoint = "kvm_mmu_pagetable_walk")]
fn stall_walk(ctx: RawTracePointContext) -> u32 {
    match try_stall_walk(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_stall_walk(ctx: &RawTracePointContext) -> Result<u32, u32> {
    let tid = node_thread().ok_or(0u32)?;
    start_stall(tid, ctx.arg::<u64>(0));
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
    let tid = node_thread().ok_or(0u32)?;
    start_stall(tid, read_field::<{ field::PAGE_FAULT_ADDR }>(ctx));
    Ok(0)
}

/// The faulting page is resolved: the stall ends; heat and a sample are recorded. A raw
/// tracepoint (see `stall_walk`); its argument is the `struct kvm_page_fault *`, whose `gfn`
/// lies at the offset the loader found in the kernel's BTF (`Config::fault_gfn`).
#[raw_tracepoint(tracepoint = "kvm_mmu_spte_requested")]
fn stall_end(ctx: RawTracePointContext) -> u32 {
    let fault = ctx.arg::<u64>(0);
    match try_stall_end(|| {
        let at = fault.wrapping_add(u64::from(config().fault_gfn)) as *const u64;
        // SAFETY: a checked read of kernel memory (the helper fails rather than faults).
        unsafe { bpf_probe_read_kernel(at) }.ok()
    }) {
        Ok(r) | Err(r) => r,
    }
}

/// The same from the tracepoint's record, for kernels whose BTF does not describe
/// `struct kvm_page_fault`.
#[tracepoint]
fn stall_end_record(ctx: TracePointContext) -> u32 {
    match try_stall_end(|| Some(read_field::<{ field::SPTE_GFN }>(&ctx))) {
        Ok(r) | Err(r) => r,
    }
}

/// Ends the current thread's stall on the frame `gfn()` returns (read only for a matched
/// end; a frame that cannot be read counts as a dropped heat update).
#[inline(always)]
fn try_stall_end(gfn: impl FnOnce() -> Option<u64>) -> Result<u32, u32> {
    let tid = node_thread().ok_or(0u32)?;
    let ts = now();
    let Some(started) = take(&STALL_START, tid) else {
        count(CTR_UNMATCHED_END);
        return Ok(0);
    };
    let stall = ts.wrapping_sub(started.ts_ns);
    let stalls = record(HIST_STALL, stall);
    let gfn = gfn().unwrap_or(u64::MAX);
    heat(gfn);
    if stalls.is_multiple_of(SAMPLE_EVERY) {
        sample(ts, gfn, stall, tid);
    }
    if config().flags & CONFIG_RESUME != 0 {
        start(&RESOLVED, tid, ts, gfn);
    }
    Ok(0)
}

/// The vCPU re-enters the guest after a resolved fault (hardware virtualization).
#[tracepoint]
fn resume(_ctx: TracePointContext) -> u32 {
    match try_resume() {
        Ok(r) | Err(r) => r,
    }
}

fn try_resume() -> Result<u32, u32> {
    let tid = node_thread().ok_or(0u32)?;
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
    let tid = node_thread().ok_or(0u32)?;
    let cmd = read_field::<{ field::IOCTL_CMD }>(ctx) as u32;
    if cmd == UFFDIO_COPY || cmd == UFFDIO_ZEROPAGE {
        start(&INSTALL_START, tid, now(), u64::from(cmd));
    }
    Ok(0)
}

/// The ioctl returns: install time.
#[tracepoint]
fn install_exit(_ctx: TracePointContext) -> u32 {
    match try_install_exit() {
        Ok(r) | Err(r) => r,
    }
}

fn try_install_exit() -> Result<u32, u32> {
    let tid = node_thread().ok_or(0u32)?;
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
    node_thread().ok_or(0u32)?;
    let ts = now();
    let node: u64 = ctx.arg(0).ok_or(0u32)?;
    let began: u64 = ctx.arg(2).ok_or(0u32)?;
    // Two readings of one clock, taken on one thread: a begin after the end can only be a
    // caller's mistake; it counts as 0 rather than as 584 years.
    let transfer = ts.saturating_sub(began);
    let node = node as u32;
    let hist = match TRANSFER_LOW.get_ptr_mut(node) {
        Some(h) => h,
        None => transfer_high(node)?,
    };
    // SAFETY: this CPU's copy of a live per-CPU map value; programs do not nest on one CPU.
    unsafe { (*hist).record(transfer) };
    Ok(0)
}

/// The transfer histogram of a peer with an id of `PEERS_LOW` or more, created at its first
/// fetch.
#[inline(always)]
fn transfer_high(node: u32) -> Result<*mut Hist, u32> {
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
    Ok(hist)
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
