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
}

/// Why a workload description does not parse.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum WorkloadError {
    /// Unknown order.
    #[error("unknown workload '{0}'; expected seq, random, stride:K or verify")]
    UnknownOrder(String),
    /// Unknown access.
    #[error("unknown access '{0}'; expected read, write or rmw")]
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
            _ => match s.strip_prefix("stride:") {
                Some(k) => match k.parse::<u64>() {
                    Ok(k) if k >= 1 => Ok(Order::Stride(k)),
                    _ => Err(WorkloadError::BadStride(k.to_owned())),
                },
                None => Err(WorkloadError::UnknownOrder(s.to_owned())),
            },
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
            _ => Err(WorkloadError::UnknownAccess(s.to_owned())),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.order, self.access) {
            (_, Access::Verify) => write!(f, "verify")?,
            (o, a) => {
                match o {
                    Order::Seq => write!(f, "seq")?,
                    Order::Random => write!(f, "random")?,
                    Order::Stride(k) => write!(f, "stride:{k}")?,
                }
                let a = match a {
                    Access::Read => "read",
                    Access::Write => "write",
                    Access::Rmw | Access::Verify => "rmw",
                };
                write!(f, " {a}")?;
            }
        }
        write!(
            f,
            " over pages {}..{}",
            self.first_page,
            self.first_page + self.pages
        )
    }
}

impl Workload {
    /// Parses `--workload` (`seq`, `random`, `stride:K`, `verify`) and `--access`.
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
    /// RAM of `ram_pages` pages.
    pub fn new(
        order: Order,
        access: Access,
        first_page: u64,
        pages: u64,
        ram_pages: u64,
    ) -> Result<Self, WorkloadError> {
        if pages == 0
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
        Ok(Self {
            order,
            access,
            first_page,
            pages,
        })
    }

    /// The checksum a correct run produces on memory holding `initial` before the run.
    /// `None` when it cannot be known in advance (an image of unknown bytes).
    pub fn expected_checksum(&self, initial: Initial) -> Option<u64> {
        let range = self.first_page..self.first_page + self.pages;
        match (self.access, initial) {
            (Access::Write, _) => {
                Some((0..self.pages).fold(0u64, |acc, p| acc.wrapping_add(p | (1 << 63))))
            }
            (_, Initial::Pattern(seed)) => Some(range.fold(0u64, |acc, p| {
                acc.wrapping_add(pattern::first_word(seed, p))
            })),
            (_, Initial::Zero) => Some(0),
            (_, Initial::Unknown) => None,
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
}

const _: () = assert!(std::mem::size_of::<Params>() == 112);

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

/// Writes GDT, TSS, page tables, code and parameters for `workload` into guest memory.
pub fn install(
    mem: &GuestMemoryMmap,
    ram_pages: u64,
    workload: &Workload,
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

    let (order, arg, random_shift) = match workload.order {
        Order::Seq => (0, 0, 0),
        Order::Random => {
            let bits = 64 - (workload.pages - 1).leading_zeros().min(63);
            let bits = u64::from(bits.max(1));
            ((1), (1u64 << bits) - 1, (bits / 2).max(1))
        }
        Order::Stride(k) => (2, k, 0),
    };
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
        ..Params::default()
    };
    mem.write_obj(params, GuestAddress(PARAMS_ADDR))
        .map_err(GuestError::Write)
}

/// Reads the guest's result block after it reported done.
pub fn read_result(
    mem: &GuestMemoryMmap,
    workload: &Workload,
) -> Result<WorkloadResult, GuestError> {
    let p: Params = mem
        .read_obj(GuestAddress(PARAMS_ADDR))
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
