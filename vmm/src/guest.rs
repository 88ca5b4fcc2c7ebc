//! The built-in workload guest: what it runs, how the VMM sets it up, and how its result
//! is checked.
//!
//! The guest code is `guest.S`, assembled by `build.rs`. The VMM writes into the system
//! region a GDT with DPL3 code and data descriptors, a TSS, identity page tables (2 MiB pages,
//! U bit on every level), the code, and a parameter block; then it starts the vCPU in 64-bit
//! mode at CPL0, where a seven-instruction stub `iretq`s to CPL3 (see
//! `../shared/ENVIRONMENT.md` for why loops must run at CPL3 here). kvm_pvm keeps user-mode
//! IOPL at 0 whatever the guest sets (measured: RFLAGS reads back 0x10046 after `iretq` with
//! IOPL=3), so the TSS carries an I/O bitmap that allows every port: that is what lets the
//! guest's `out` reach the VMM.

use std::fmt;
use std::str::FromStr;

use pagemesh_api::pattern;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memory::{RAM_BASE, SYSTEM_SIZE};

/// The assembled guest code.
static GUEST_CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// GDT location (guest-physical = guest-virtual: everything is identity mapped).
pub const GDT_ADDR: u64 = 0x1000;
/// TSS location (with its I/O permission bitmap: 0x68 + 8193 bytes).
pub const TSS_ADDR: u64 = 0x5_0000;
/// TSS limit: the 104-byte TSS, an I/O bitmap allowing all 65536 ports, its 0xFF end byte.
pub const TSS_LIMIT: u64 = 0x68 + 8192;
/// Parameter/result block location.
pub const PARAMS_ADDR: u64 = 0x3000;
/// PML4 location; the PDPT follows, then one page directory per GiB.
pub const PML4_ADDR: u64 = 0x4000;
/// Guest code location.
pub const CODE_ADDR: u64 = 0x8_0000;
/// Initial stack pointer (the stack grows down through the system region).
pub const STACK_TOP: u64 = SYSTEM_SIZE - 0x1000;

/// Port the guest writes its progress (pages done) to.
pub const PORT_PROGRESS: u16 = 0xF0;
/// Port the guest writes to when it has finished.
pub const PORT_DONE: u16 = 0xF1;
/// Written at +96 of the parameter block when the guest finished.
pub const DONE_MAGIC: u64 = 0x600D;

/// Kernel code segment selector: GDT entry 1.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector: GDT entry 2.
pub const KERNEL_SS: u16 = 0x10;
/// User code segment selector: GDT entry 3, RPL 3.
pub const USER_CS: u16 = 0x1b;
/// Data/stack segment selector: GDT entry 4, RPL 3.
pub const USER_SS: u16 = 0x23;
/// TSS selector: GDT entries 5-6.
pub const TSS_SEL: u16 = 0x28;

/// Order in which the guest visits pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// 0, 1, 2, ...
    Seq,
    /// A pseudo-random permutation of the pages.
    Random,
    /// 0, K, 2K, ..., then 1, 1+K, ...
    Stride(u64),
    /// `accesses` pages drawn from a Zipf distribution of exponent `milli / 1000` over the
    /// range ([`pagemesh_api::trace::zipf`]); pages are visited again.
    Zipf {
        /// The exponent in thousandths (`zipf:0.99` is 990).
        milli: u32,
    },
    /// `accesses` pages, `access_pct` percent of them to a hot set of `hot_pct` percent of
    /// the range ([`pagemesh_api::trace::hotset`]).
    Hotset {
        /// Percent of the pages that are hot.
        hot_pct: u8,
        /// Percent of the accesses that go to them.
        access_pct: u8,
    },
    /// Every page once: the first half in order, interleaved one for one with the second
    /// half in a pseudo-random order ([`pagemesh_api::trace::mixed`]).
    Mixed,
}

impl Order {
    /// Whether the order visits pages again (a trace of `accesses` pages).
    pub fn is_trace(self) -> bool {
        matches!(
            self,
            Order::Zipf { .. } | Order::Hotset { .. } | Order::Mixed
        )
    }
}

/// What the guest does to each page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads the first word.
    Read,
    /// Writes the first word.
    Write,
    /// Reads, increments and writes back the first word.
    Rmw,
    /// Reads every word and checks it against the pattern.
    Verify,
}

/// A workload: an order and an access, over a range of RAM pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Visit order.
    pub order: Order,
    /// Per-page access.
    pub access: Access,
    /// First page of the range.
    pub first_page: u64,
    /// Pages in the range.
    pub pages: u64,
    /// Pages visited: `pages` for the orders that visit each once, `--accesses` for traces.
    pub accesses: u64,
}

/// Why a workload description does not parse.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum WorkloadError {
    /// Unknown order.
    #[error(
        "unknown workload '{0}'; expected seq, random, stride:K, zipf:S (e.g. zipf:0.99), \
         hotset:H:P (e.g. hotset:10:90), mixed or verify"
    )]
    UnknownOrder(String),
    /// A bad `zipf:S`.
    #[error("zipf exponent must be a number from 0 to 10 with at most 3 decimals, got '{0}'")]
    BadZipf(String),
    /// A bad `hotset:H:P`.
    #[error(
        "hotset wants H:P, whole percentages from 1 to 100 (H% of the pages get P% of the \
         accesses), got '{0}'"
    )]
    BadHotset(String),
    /// Too many accesses for the trace region.
    #[error("--accesses must be from 1 to {max}, got {got}")]
    BadAccesses {
        /// What was asked for.
        got: u64,
        /// The most the trace region holds.
        max: u64,
    },
    /// A trace workload cannot be shared out between vCPUs.
    #[error(
        "{vcpus} vCPUs share a workload's pages out between them: give seq, random, stride:K \
         or verify (a trace order like {order} revisits pages across vCPUs)"
    )]
    Unshared {
        /// vCPUs asked for.
        vcpus: u64,
        /// The order.
        order: String,
    },
    /// More vCPUs than pages, or than the built-in guest has room for.
    #[error(
        "the built-in guest runs 1 to {MAX_GUEST_VCPUS} vCPUs over at least one page each, got {vcpus} over {pages} pages"
    )]
    TooManyVcpus {
        /// vCPUs asked for.
        vcpus: u64,
        /// Pages of the workload.
        pages: u64,
    },
    /// Unknown access.
    #[error("unknown access '{0}'; expected read, write, rmw or verify")]
    UnknownAccess(String),
    /// Bad stride.
    #[error("stride must be a whole number of pages >= 1, got '{0}'")]
    BadStride(String),
    /// Range outside RAM.
    #[error("range of {pages} pages at page {first} does not fit in {ram_pages} pages of RAM")]
    BadRange {
        /// First page.
        first: u64,
        /// Pages.
        pages: u64,
        /// RAM pages.
        ram_pages: u64,
    },
}

impl FromStr for Order {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seq" => Ok(Order::Seq),
            "random" => Ok(Order::Random),
            "mixed" => Ok(Order::Mixed),
            _ => {
                if let Some(k) = s.strip_prefix("stride:") {
                    return match k.parse::<u64>() {
                        Ok(k) if k >= 1 => Ok(Order::Stride(k)),
                        _ => Err(WorkloadError::BadStride(k.to_owned())),
                    };
                }
                if let Some(e) = s.strip_prefix("zipf:") {
                    let bad = || WorkloadError::BadZipf(e.to_owned());
                    let decimals = e.split_once('.').map_or(0, |(_, d)| d.len());
                    let v: f64 = e.parse().map_err(|_| bad())?;
                    if decimals > 3 || !(0.0..=10.0).contains(&v) {
                        return Err(bad());
                    }
                    return Ok(Order::Zipf {
                        milli: (v * 1000.0).round() as u32,
                    });
                }
                if let Some(hp) = s.strip_prefix("hotset:") {
                    let bad = || WorkloadError::BadHotset(hp.to_owned());
                    let (h, p) = hp.split_once(':').ok_or_else(bad)?;
                    let pct = |x: &str| x.parse::<u8>().ok().filter(|v| (1..=100).contains(v));
                    return match (pct(h), pct(p)) {
                        (Some(hot_pct), Some(access_pct)) => Ok(Order::Hotset {
                            hot_pct,
                            access_pct,
                        }),
                        _ => Err(bad()),
                    };
                }
                Err(WorkloadError::UnknownOrder(s.to_owned()))
            }
        }
    }
}

impl FromStr for Access {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Access::Read),
            "write" => Ok(Access::Write),
            "rmw" => Ok(Access::Rmw),
            "verify" => Ok(Access::Verify),
            _ => Err(WorkloadError::UnknownAccess(s.to_owned())),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.order, self.access) {
            (o, Access::Verify) if !o.is_trace() => write!(f, "verify")?,
            (o, a) => {
                match o {
                    Order::Seq => write!(f, "seq")?,
                    Order::Random => write!(f, "random")?,
                    Order::Stride(k) => write!(f, "stride:{k}")?,
                    Order::Zipf { milli } => write!(f, "zipf:{}", f64::from(milli) / 1000.0)?,
                    Order::Hotset {
                        hot_pct,
                        access_pct,
                    } => write!(f, "hotset:{hot_pct}:{access_pct}")?,
                    Order::Mixed => write!(f, "mixed")?,
                }
                let a = match a {
                    Access::Read => "read",
                    Access::Write => "write",
                    Access::Rmw => "rmw",
                    Access::Verify => "verify",
                };
                write!(f, " {a}")?;
            }
        }
        if self.order.is_trace() {
            write!(f, ", {} accesses", self.accesses)?;
        }
        write!(
            f,
            " over pages {}..{}",
            self.first_page,
            self.first_page + self.pages
        )
    }
}

/// The most accesses a trace can have: what the trace region holds.
pub const MAX_ACCESSES: u64 = crate::memory::TRACE_SIZE / 4;

impl Workload {
    /// Parses `--workload` (`seq`, `random`, `stride:K`, `zipf:S`, `hotset:H:P`, `verify`)
    /// and `--access`.
    pub fn parse(
        workload: &str,
        access: &str,
        first_page: u64,
        pages: u64,
        ram_pages: u64,
    ) -> Result<Self, WorkloadError> {
        let (order, access) = if workload == "verify" {
            (Order::Seq, Access::Verify)
        } else {
            (workload.parse()?, access.parse()?)
        };
        Self::new(order, access, first_page, pages, ram_pages)
    }

    /// `access` to each of `pages` pages from `first_page`, in `order`, checked to lie within
    /// RAM of `ram_pages` pages. A trace order makes four accesses per page unless
    /// [`Workload::with_accesses`] says otherwise.
    pub fn new(
        order: Order,
        access: Access,
        first_page: u64,
        pages: u64,
        ram_pages: u64,
    ) -> Result<Self, WorkloadError> {
        if pages == 0
            || pages > u64::from(u32::MAX)
            || first_page
                .checked_add(pages)
                .is_none_or(|end| end > ram_pages)
        {
            return Err(WorkloadError::BadRange {
                first: first_page,
                pages,
                ram_pages,
            });
        }
        let accesses = match order {
            Order::Mixed => pages.min(MAX_ACCESSES),
            o if o.is_trace() => (4 * pages).min(MAX_ACCESSES),
            _ => pages,
        };
        Ok(Self {
            order,
            access,
            first_page,
            pages,
            accesses,
        })
    }

    /// This trace workload with `accesses` accesses (`--accesses`); the other orders visit
    /// each page once whatever it says.
    pub fn with_accesses(mut self, accesses: u64) -> Result<Self, WorkloadError> {
        if !self.order.is_trace() || self.order == Order::Mixed {
            return Ok(self);
        }
        if accesses == 0 || accesses > MAX_ACCESSES {
            return Err(WorkloadError::BadAccesses {
                got: accesses,
                max: MAX_ACCESSES,
            });
        }
        self.accesses = accesses;
        Ok(self)
    }

    /// The pages a trace order visits, in order, as indices into the range; `None` for the
    /// orders that visit each page once.
    pub fn trace(&self) -> Option<Vec<u32>> {
        match self.order {
            Order::Zipf { milli } => Some(pagemesh_api::trace::zipf(
                f64::from(milli) / 1000.0,
                self.pages,
                self.accesses,
            )),
            Order::Hotset {
                hot_pct,
                access_pct,
            } => Some(pagemesh_api::trace::hotset(
                hot_pct,
                access_pct,
                self.pages,
                self.accesses,
            )),
            Order::Mixed => Some(pagemesh_api::trace::mixed(self.pages)),
            Order::Seq | Order::Random | Order::Stride(_) => None,
        }
    }

    /// The checksum a correct run produces on memory holding `initial` before the run.
    /// `None` when it cannot be known in advance (an image of unknown bytes).
    pub fn expected_checksum(&self, initial: Initial) -> Option<u64> {
        let first_word = |p: u64| match initial {
            Initial::Pattern(seed) => Some(pattern::first_word(seed, self.first_page + p)),
            Initial::Zero => Some(0),
            Initial::Unknown => None,
        };
        if let Some(trace) = self.trace() {
            // Every access adds the first word it reads (rmw: what the earlier visits left
            // there) or writes.
            let mut visits = std::collections::HashMap::new();
            let mut sum = 0u64;
            for &p in &trace {
                let p = u64::from(p);
                let word = match self.access {
                    Access::Write => p | (1 << 63),
                    Access::Rmw => {
                        let n = visits.entry(p).or_insert(0u64);
                        let w = first_word(p)?.wrapping_add(*n);
                        *n += 1;
                        w
                    }
                    // The last write of a page wins: reads after a write see it (no trace
                    // workload mixes them).
                    Access::Read | Access::Verify => first_word(p)?,
                };
                sum = sum.wrapping_add(word);
            }
            return Some(sum);
        }
        match self.access {
            Access::Write => {
                Some((0..self.pages).fold(0u64, |acc, p| acc.wrapping_add(p | (1 << 63))))
            }
            _ => (0..self.pages).try_fold(0u64, |acc, p| Some(acc.wrapping_add(first_word(p)?))),
        }
    }
}

/// What guest RAM holds before a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// The test pattern with this seed.
    Pattern(u64),
    /// Zeros.
    Zero,
    /// Bytes not known in advance (an image).
    Unknown,
}

impl Initial {
    /// The seed the guest checks against (0 when there is no pattern).
    pub fn seed(self) -> u64 {
        match self {
            Initial::Pattern(s) => s,
            Initial::Zero | Initial::Unknown => 0,
        }
    }
}

/// The guest's parameter and result block (layout shared with `guest.S`).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Params {
    base: u64,
    pages: u64,
    order: u64,
    op: u64,
    arg: u64,
    seed: u64,
    progress_mask: u64,
    random_shift: u64,
    done: u64,
    checksum: u64,
    first_bad: u64,
    bad_pages: u64,
    magic: u64,
    pattern_first: u64,
    trace: u64,
}

const _: () = assert!(std::mem::size_of::<Params>() == 120);

// SAFETY: Params is repr(C), made of u64s only: no padding, every bit pattern valid.
unsafe impl vm_memory::ByteValued for Params {}

/// What the guest reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadResult {
    /// Pages visited.
    pub pages_done: u64,
    /// Sum of the first words read (or written).
    pub checksum: u64,
    /// First page (of RAM) whose content differed from the pattern (verify only).
    pub first_bad_page: Option<u64>,
    /// Pages whose content differed (verify only).
    pub bad_pages: u64,
}

/// Errors setting up the guest.
#[derive(thiserror::Error, Debug)]
pub enum GuestError {
    /// Writing the system region failed.
    #[error("cannot write the guest's system region")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// The guest did not write its result block.
    #[error("the guest stopped without writing its result (magic {0:#x})")]
    NoResult(u64),
}

/// Pages visited between two progress reports.
const PROGRESS_EVERY: u64 = 4096;

/// vCPUs the built-in guest can run: each has a parameter block (below the page tables) and
/// a 64 KiB stack (below the top of the system region, above the code).
pub const MAX_GUEST_VCPUS: u64 = 8;

/// Where vCPU `i`'s parameter block is.
pub fn params_addr(i: u64) -> u64 {
    PARAMS_ADDR + i * 0x80
}

/// vCPU `i`'s initial stack pointer.
pub fn stack_top(i: u64) -> u64 {
    STACK_TOP - i * 0x1_0000
}

impl Workload {
    /// This workload shared out between `vcpus` vCPUs: vCPU `i` does the same to the `i`-th
    /// of `vcpus` consecutive parts of the range. Trace orders revisit pages and cannot be
    /// shared out.
    pub fn split(&self, vcpus: u64) -> Result<Vec<Workload>, WorkloadError> {
        if vcpus == 0 || vcpus > MAX_GUEST_VCPUS || vcpus > self.pages {
            return Err(WorkloadError::TooManyVcpus {
                vcpus,
                pages: self.pages,
            });
        }
        if vcpus == 1 {
            return Ok(vec![*self]);
        }
        if self.order.is_trace() {
            return Err(WorkloadError::Unshared {
                vcpus,
                order: format!("{self}"),
            });
        }
        Ok((0..vcpus)
            .map(|i| {
                let from = self.pages * i / vcpus;
                let to = self.pages * (i + 1) / vcpus;
                Workload {
                    first_page: self.first_page + from,
                    pages: to - from,
                    accesses: to - from,
                    ..*self
                }
            })
            .collect())
    }
}

/// Writes GDT, TSS, page tables, code and a parameter block per vCPU, vCPU `i` doing
/// `workloads[i]` (a trace order: one vCPU), into guest memory.
pub fn install(
    mem: &GuestMemoryMmap,
    ram_pages: u64,
    workloads: &[Workload],
    seed: u64,
) -> Result<(), GuestError> {
    let w = |addr: u64, bytes: &[u8]| mem.write_slice(bytes, GuestAddress(addr));

    // GDT: null, kernel code/data (for the entry stub), user code
    // (L=1, DPL3), user data (DPL3), 64-bit TSS (two slots).
    let tss_lo = tss_descriptor_low(TSS_ADDR, TSS_LIMIT);
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        tss_lo,
        TSS_ADDR >> 32,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    w(GDT_ADDR, &gdt_bytes).map_err(GuestError::Write)?;
    // TSS: RSP0 points at the stack; an all-zero I/O bitmap lets CPL3 use every port.
    // (kvm_pvm keeps user-mode IOPL at 0 whatever the guest sets, so the bitmap is what
    // makes `out` at CPL3 reach the VMM.)
    let mut tss = vec![0u8; (TSS_LIMIT + 1) as usize];
    tss[4..12].copy_from_slice(&STACK_TOP.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    w(TSS_ADDR, &tss).map_err(GuestError::Write)?;

    // Identity page tables over 0..RAM_BASE + RAM with 2 MiB pages: P | RW | US (| PS).
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let end = RAM_BASE + ram_pages * 4096;
    let gibs = end.div_ceil(1 << 30);
    let pdpt = PML4_ADDR + 0x1000;
    w(PML4_ADDR, &(pdpt | P_RW_US).to_le_bytes()).map_err(GuestError::Write)?;
    for g in 0..gibs {
        let pd = pdpt + 0x1000 * (g + 1);
        w(pdpt + g * 8, &(pd | P_RW_US).to_le_bytes()).map_err(GuestError::Write)?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | P_RW_US | PS).to_le_bytes())
            .collect();
        w(pd, &entries).map_err(GuestError::Write)?;
    }

    w(CODE_ADDR, GUEST_CODE).map_err(GuestError::Write)?;
    for (i, workload) in workloads.iter().enumerate() {
        write_params(mem, i as u64, workload, seed)?;
    }
    Ok(())
}

/// vCPU `i`'s parameter block for `workload`.
fn write_params(
    mem: &GuestMemoryMmap,
    i: u64,
    workload: &Workload,
    seed: u64,
) -> Result<(), GuestError> {
    let w = |addr: u64, bytes: &[u8]| mem.write_slice(bytes, GuestAddress(addr));
    let (order, arg, random_shift) = match workload.order {
        Order::Seq => (0, 0, 0),
        Order::Random => {
            let bits = 64 - (workload.pages - 1).leading_zeros().min(63);
            let bits = u64::from(bits.max(1));
            ((1), (1u64 << bits) - 1, (bits / 2).max(1))
        }
        Order::Stride(k) => (2, k, 0),
        Order::Zipf { .. } | Order::Hotset { .. } | Order::Mixed => (3, workload.accesses, 0),
    };
    if let Some(trace) = workload.trace() {
        let bytes: Vec<u8> = trace.iter().flat_map(|p| p.to_le_bytes()).collect();
        w(crate::memory::TRACE_BASE, &bytes).map_err(GuestError::Write)?;
    }
    let op = match workload.access {
        Access::Read => 0,
        Access::Write => 1,
        Access::Rmw => 2,
        Access::Verify => 3,
    };
    let params = Params {
        base: RAM_BASE + workload.first_page * 4096,
        pages: workload.pages,
        order,
        op,
        arg,
        seed,
        progress_mask: PROGRESS_EVERY - 1,
        random_shift,
        first_bad: u64::MAX,
        pattern_first: workload.first_page,
        trace: crate::memory::TRACE_BASE,
        ..Params::default()
    };
    mem.write_obj(params, GuestAddress(params_addr(i)))
        .map_err(GuestError::Write)
}

/// Reads vCPU `i`'s result block after it reported done.
pub fn read_result(
    mem: &GuestMemoryMmap,
    i: u64,
    workload: &Workload,
) -> Result<WorkloadResult, GuestError> {
    let p: Params = mem
        .read_obj(GuestAddress(params_addr(i)))
        .map_err(GuestError::Write)?;
    if p.magic != DONE_MAGIC {
        return Err(GuestError::NoResult(p.magic));
    }
    Ok(WorkloadResult {
        pages_done: p.done,
        checksum: p.checksum,
        first_bad_page: (p.first_bad != u64::MAX).then(|| p.first_bad + workload.first_page),
        bad_pages: p.bad_pages,
    })
}

/// The low 8 bytes of a 64-bit available-TSS descriptor (type 9, present, DPL0).
fn tss_descriptor_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_is_shared_out_in_consecutive_parts() {
        let w = Workload::parse("random", "verify", 10, 101, 200).unwrap();
        let parts = w.split(3).unwrap();
        let spans: Vec<_> = parts.iter().map(|p| (p.first_page, p.pages)).collect();
        assert_eq!(spans, [(10, 33), (43, 34), (77, 34)]);
        // The parts' checksums add up to the whole's.
        let sum = parts
            .iter()
            .map(|p| p.expected_checksum(Initial::Pattern(4)).unwrap())
            .fold(0u64, u64::wrapping_add);
        assert_eq!(Some(sum), w.expected_checksum(Initial::Pattern(4)));
        assert!(matches!(
            Workload::parse("zipf:0.99", "read", 0, 64, 64)
                .unwrap()
                .split(2),
            Err(WorkloadError::Unshared { .. })
        ));
        assert!(matches!(
            w.split(9),
            Err(WorkloadError::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn parses_workloads() {
        let w = Workload::parse("stride:8", "rmw", 0, 10, 10).unwrap();
        assert_eq!(w.order, Order::Stride(8));
        assert_eq!(w.access, Access::Rmw);
        assert_eq!(
            Workload::parse("verify", "write", 2, 3, 10).unwrap().access,
            Access::Verify
        );
        assert!(matches!(
            Workload::parse("stride:0", "read", 0, 1, 1),
            Err(WorkloadError::BadStride(_))
        ));
        assert!(matches!(
            Workload::parse("zigzag", "read", 0, 1, 1),
            Err(WorkloadError::UnknownOrder(_))
        ));
        assert!(matches!(
            Workload::parse("seq", "read", 5, 6, 10),
            Err(WorkloadError::BadRange { .. })
        ));
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let d = tss_descriptor_low(0x1234_5678, 0x67);
        assert_eq!(d & 0xffff, 0x67);
        assert_eq!((d >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!(d >> 56, 0x12);
        assert_eq!((d >> 40) & 0xff, 0x89);
    }

    #[test]
    fn guest_code_is_assembled() {
        assert!(GUEST_CODE.len() > 64);
        assert!(CODE_ADDR + GUEST_CODE.len() as u64 <= STACK_TOP - 0x10000);
    }
}
