//! Types shared by pagemesh's eBPF probes (`node-ebpf`, built for the BPF target) and the
//! node that loads them (`node/src/ebpf.rs`).
//!
//! Everything here is `#[repr(C)]` plain data whose layout both sides must agree on; the
//! sizes are checked at compile time. The `user` feature adds the `aya::Pod` impls the node
//! needs to read these types out of BPF maps; the probes build without it (`no_std`, no
//! allocation, no aya).
//!
//! | item | what it is |
//! |---|---|
//! | [`Hist`] | a log2 histogram of nanoseconds (per CPU, in [`CpuStats`]; per peer in `TRANSFER`) |
//! | [`StallSample`] | one sampled vCPU stall, sent through the `SAMPLES` ring buffer |
//! | [`Start`] | a timestamp a probe left for the matching end probe on the same thread |
//! | [`Config`] | what the node tells the probes at load time (its tgid, flags) |
//! | [`RateWindow`] | the per-CPU state of the sample rate limit |
//! | [`CpuStats`] | all of a CPU's histograms, counters and rate window, in one map value |

#![no_std]

/// Buckets of a [`Hist`]: bucket `b` counts samples in `[2^b, 2^(b+1))` ns (bucket 0 also
/// counts 0), so 64 buckets cover every `u64`.
pub const HIST_BUCKETS: usize = 64;

/// Index of the vCPU stall histogram in [`CpuStats::hists`] (fault enters KVM's MMU → page resolved).
pub const HIST_STALL: u32 = 0;
/// Index of the install histogram in [`CpuStats::hists`] (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE` ioctl).
pub const HIST_INSTALL: u32 = 1;
/// Index of the resume histogram in [`CpuStats::hists`] (page resolved → next `kvm_entry`; hardware
/// virtualization hosts only).
pub const HIST_RESUME: u32 = 2;
/// Histograms in [`CpuStats::hists`].
pub const HIST_KINDS: u32 = 3;

/// Index in [`CpuStats::counters`]: heat updates dropped (a frame beyond the heat array).
pub const CTR_HEAT_DROPPED: u32 = 0;
/// Index in [`CpuStats::counters`]: stall samples sent to the ring buffer.
pub const CTR_SAMPLES_SENT: u32 = 1;
/// Index in [`CpuStats::counters`]: stall samples dropped because the ring buffer was full.
pub const CTR_SAMPLES_LOST: u32 = 2;
/// Index in [`CpuStats::counters`]: stall samples not sent because of the rate limit.
pub const CTR_SAMPLES_THROTTLED: u32 = 3;
/// Index in [`CpuStats::counters`]: `kvm_mmu_spte_requested` of the node's threads with no walk before
/// it on the same thread.
pub const CTR_UNMATCHED_END: u32 = 4;
/// Counters in [`CpuStats::counters`]. (Started stalls are counted in the start slots,
/// [`Start::starts`], so that the walk probe touches one cache line.)
pub const COUNTERS: u32 = 5;

/// `UFFDIO_COPY`: `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
pub const UFFDIO_COPY: u32 = 0xC028_AA03;
/// `UFFDIO_ZEROPAGE`: `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
pub const UFFDIO_ZEROPAGE: u32 = 0xC020_AA04;

/// Largest heat array the loader creates, in guest frames: 64 GiB of guest-physical address
/// space, enough for the largest VM a node runs (63 GiB of RAM above the 1 GiB system
/// region). The array is sized to the VM, 8 bytes per 4 KiB frame (0.2%): 128 MiB at this
/// limit. Frames above the VM's highest one are not counted (`CTR_HEAT_DROPPED`).
pub const HEAT_MAX_FRAMES: u32 = 1 << 24;
/// How often the node polls the stall-sample ring buffer.
pub const SAMPLES_POLL_MS: u64 = 1000;
/// Per-thread start slots, indexed by thread id modulo this (a power of two). A slot holds
/// its thread's id, so two threads that share a slot can never pair one's start with the
/// other's end; they would only lose measurements, and only if both are measured at once:
/// the vCPU threads of one node are created together, so their ids are consecutive and map
/// to distinct slots. An array rather than a hash map: the lookup is an address computation
/// that the verifier inlines, one cache line and no hashing, on the vCPU's path.
pub const START_SLOTS: u32 = 512;
/// Peers with node ids below this have their transfer histogram in an array indexed by id
/// (`TRANSFER_LOW`: an inlined lookup); others in a hash map (`TRANSFER`).
pub const PEERS_LOW: u32 = 64;
/// Peers with ids of [`PEERS_LOW`] and above that get a transfer histogram.
pub const PEERS_MAX_ENTRIES: u32 = 256;
/// Bytes of the stall sample ring buffer (a power of two, a multiple of the page size):
/// room for 8192 samples (40 bytes each with the ring's header), more than one poll period
/// of the rate limit allows on 8 CPUs.
pub const SAMPLES_RING_BYTES: u32 = 512 * 1024;
/// One stall in this many (per CPU) is a sampling candidate; candidates are then subject to
/// the per-window limit. Deciding on the stall histogram's count, which the probe updates
/// anyway, keeps the rate window's cache line out of most faults.
pub const SAMPLE_EVERY: u64 = 16;
/// Length of a sampling window.
pub const SAMPLE_WINDOW_NS: u64 = 100_000_000;
/// Samples each CPU may send per window: at most 640 a second per CPU.
pub const SAMPLES_PER_WINDOW: u64 = 64;

/// A histogram of durations in nanoseconds with power-of-two buckets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hist {
    /// `buckets[b]`: samples in `[2^b, 2^(b+1))` ns (bucket 0: 0 and 1 ns).
    pub buckets: [u64; HIST_BUCKETS],
    /// Samples.
    pub count: u64,
    /// Sum of the samples, ns.
    pub sum_ns: u64,
    /// Largest sample, ns.
    pub max_ns: u64,
}

const _: () = assert!(size_of::<Hist>() == 8 * (HIST_BUCKETS + 3));

impl Hist {
    /// An empty histogram.
    pub const ZERO: Self = Self {
        buckets: [0; HIST_BUCKETS],
        count: 0,
        sum_ns: 0,
        max_ns: 0,
    };

    /// Adds one sample.
    #[inline(always)]
    pub fn record(&mut self, ns: u64) {
        // The mask keeps the index provably in bounds for the BPF verifier too.
        let b = (log2_bucket(ns) & (HIST_BUCKETS as u32 - 1)) as usize;
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_ns += ns;
        if ns > self.max_ns {
            self.max_ns = ns;
        }
    }

    /// Adds `other`'s samples (merging per-CPU copies).
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += *b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }
}

/// `floor(log2(v))`, and 0 for 0: the bucket of `v` in a [`Hist`].
///
/// A fixed sequence of compares and shifts rather than `leading_zeros`: BPF has no count-
/// leading-zeros instruction, and this keeps the probe code short and loop-free.
#[inline(always)]
pub const fn log2_bucket(v: u64) -> u32 {
    let mut v = v;
    let mut r = 0;
    if v >= 1 << 32 {
        v >>= 32;
        r += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        r += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        r += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        r += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        r += 2;
    }
    if v >= 1 << 1 {
        r += 1;
    }
    r
}

/// Lower bound of bucket `b` in ns (inclusive).
pub const fn bucket_low_ns(b: usize) -> u64 {
    if b == 0 { 0 } else { 1 << b }
}

/// Upper bound of bucket `b` in ns (exclusive); saturates for the last bucket.
pub const fn bucket_high_ns(b: usize) -> u64 {
    if b + 1 >= HIST_BUCKETS {
        u64::MAX
    } else {
        1 << (b + 1)
    }
}

/// One sampled vCPU stall.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StallSample {
    /// When the page was resolved (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Guest frame number (guest-physical address / 4096).
    pub gfn: u64,
    /// How long the vCPU thread stalled, ns.
    pub stall_ns: u64,
    /// The vCPU thread.
    pub tid: u32,
    /// Reserved (alignment).
    pub pad: u32,
}

const _: () = assert!(size_of::<StallSample>() == 32);

/// A start timestamp left for the end probe on the same thread, in that thread's slot
/// (`tid % START_SLOTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Start {
    /// `bpf_ktime_get_ns` at the start; 0 when the slot holds no start.
    pub ts_ns: u64,
    /// What started: the faulting address, the ioctl.
    pub arg: u64,
    /// The thread that started it.
    pub tid: u32,
    /// Reserved (alignment).
    pub pad: u32,
    /// Starts recorded in this slot, by every thread that used it. (32 bytes in all, so no
    /// slot straddles a cache line.)
    pub starts: u64,
}

const _: () = assert!(size_of::<Start>() == 32);

/// What the node tells the probes (a read-only global, set before loading).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Only threads of this process are measured.
    pub tgid: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Byte offset of `gfn` in the kernel's `struct kvm_page_fault` (from its BTF), for the
    /// raw `kvm_mmu_spte_requested` probe.
    pub fault_gfn: u32,
    /// Reserved.
    pub pad: u32,
}

const _: () = assert!(size_of::<Config>() == 16);

/// Where the probes read tracepoint fields: byte offsets into the records, compiled into the
/// probes so that each read is one load from the context rather than a
/// `bpf_probe_read_kernel` call (about 100 ns each on this machine). The loader checks every
/// one against the kernel's tracefs `format` file before it attaches anything.
pub mod field {
    /// `addr` (u64) of `kvmmmu:kvm_mmu_pagetable_walk`.
    pub const WALK_ADDR: usize = 8;
    /// `gfn` (u64) of `kvmmmu:kvm_mmu_spte_requested`.
    pub const SPTE_GFN: usize = 8;
    /// `fault_address` (u64) of `kvm:kvm_page_fault`.
    pub const PAGE_FAULT_ADDR: usize = 24;
    /// `cmd` (an 8-byte argument slot) of `syscalls:sys_enter_ioctl`.
    pub const IOCTL_CMD: usize = 24;
}

/// [`Config::flags`]: `kvm:kvm_entry` is attached, so resolved faults wait for their resume
/// (on kvm_pvm it never fires, and the probes skip that bookkeeping).
pub const CONFIG_RESUME: u32 = 1;

/// Per-CPU state of the sample rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateWindow {
    /// Start of the current window, ns.
    pub start_ns: u64,
    /// Samples sent in it.
    pub sent: u64,
}

const _: () = assert!(size_of::<RateWindow>() == 16);

/// Everything the probes keep per CPU, in one map value: a probe on the vCPU's path runs with
/// cold caches and TLB (it follows a switch out of the guest), so each separate map it touches
/// costs a miss or two; one value for histograms, counters and the rate window costs one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStats {
    /// Indexed by `HIST_*`.
    pub hists: [Hist; HIST_KINDS as usize],
    /// Indexed by `CTR_*`.
    pub counters: [u64; COUNTERS as usize],
    /// The sample rate limit.
    pub rate: RateWindow,
}

const _: () = assert!(
    size_of::<CpuStats>() == size_of::<Hist>() * HIST_KINDS as usize + 8 * COUNTERS as usize + 16
);

impl CpuStats {
    /// All zero.
    pub const ZERO: Self = Self {
        hists: [Hist::ZERO; HIST_KINDS as usize],
        counters: [0; COUNTERS as usize],
        rate: RateWindow {
            start_ns: 0,
            sent: 0,
        },
    };

    /// Adds `other`'s histograms and counters (merging per-CPU copies); the rate window,
    /// which is per CPU by nature, is left as it is.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.hists.iter_mut().zip(other.hists.iter()) {
            a.merge(b);
        }
        for (a, b) in self.counters.iter_mut().zip(other.counters.iter()) {
            *a += *b;
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{Config, CpuStats, Hist, RateWindow, StallSample, Start};

    // SAFETY: each type is #[repr(C)], made only of integers, with no padding (the size
    // asserts above pin the layouts), so every bit pattern is a valid value.
    unsafe impl aya::Pod for Hist {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StallSample {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Start {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateWindow {}
    // SAFETY: as above (arrays of such types, and one of them, with no padding between).
    unsafe impl aya::Pod for CpuStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_bucket_matches_leading_zeros() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        for shift in 1..64 {
            let v = 1u64 << shift;
            assert_eq!(log2_bucket(v), shift, "{v}");
            assert_eq!(log2_bucket(v - 1), shift - 1, "{}", v - 1);
            assert_eq!(log2_bucket(v | (v - 1)), shift, "{}", v | (v - 1));
        }
        assert_eq!(log2_bucket(u64::MAX), 63);
    }

    #[test]
    fn every_value_falls_inside_its_bucket() {
        for v in [
            0,
            1,
            2,
            3,
            999,
            1000,
            1023,
            1024,
            36_000,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let b = log2_bucket(v) as usize;
            assert!(bucket_low_ns(b) <= v, "{v}");
            assert!(v < bucket_high_ns(b) || b == HIST_BUCKETS - 1, "{v}");
        }
    }

    #[test]
    fn record_and_merge() {
        let mut a = Hist::ZERO;
        a.record(20_000);
        a.record(30_000);
        a.record(0);
        let mut b = Hist::ZERO;
        b.record(40_000);
        a.merge(&b);
        assert_eq!(a.count, 4);
        assert_eq!(a.sum_ns, 90_000);
        assert_eq!(a.max_ns, 40_000);
        assert_eq!(a.buckets[14], 2); // 16384..32768
        assert_eq!(a.buckets[15], 1); // 32768..65536
        assert_eq!(a.buckets[0], 1);
    }
}
