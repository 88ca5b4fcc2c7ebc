//! What the fault handler tells outside tracers, and the clock it tells it on.
//!
//! The pager knows nothing of eBPF: the node passes a [`FaultTrace`] down (the probes'
//! marker function), and the handler calls it at the points a tracer times. With no hook
//! the handler skips the call.

use pagemesh_api::NodeId;

/// Called when a page fetch from `node` that began at `began_ns` ([`monotonic_ns`]) has
/// ended (its reply is in, or it failed). An `extern "C"` function so that a uprobe can sit
/// on it (the eBPF probes' `pagemesh_fetch_done`).
pub type FetchDone = extern "C" fn(node: NodeId, page: u64, began_ns: u64);

/// Called after the handler installed a page it served on a fault: VM page `page`, whose
/// event it read at `read_ns`, whose install began at `install_ns` and ended at `done_ns`
/// (all [`monotonic_ns`]); for the eBPF probes' stall breakdown.
pub type FaultServed = fn(page: u64, read_ns: u64, install_ns: u64, done_ns: u64);

/// The hooks the handler calls on each fault.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultTrace {
    /// After each remote fetch.
    pub fetch_done: Option<FetchDone>,
    /// After each fault it installed a page for.
    pub served: Option<FaultServed>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so that a time the
/// handler takes and one taken in a probe can be subtracted. Read through the vDSO (no
/// syscall).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock` (a `clock_gettime` clock id) in nanoseconds.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid, exclusively borrowed one.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    // Both fields are non-negative for the monotonic and CPU-time clocks.
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
