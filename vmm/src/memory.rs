//! Guest-physical memory of the built-in workload guest.
//!
//! ```text
//! GPA 0x0000_0000  system region (2 MiB, anonymous, written by the VMM before the pager
//!                  starts, never faulted on): GDT, TSS, parameter block, page tables, code,
//!                  stack
//! GPA 0x1000_0000  trace region (256 MiB, anonymous, `MAP_NORESERVE`): the page sequence of a
//!                  skewed workload (`zipf:S`, `hotset:H:P`), one u32 per access, written by
//!                  the VMM; untouched (and free) for every other workload
//! GPA 0x4000_0000  RAM (`--mem` bytes): registered with userfaultfd; page i of the VM is the
//!                  4 KiB at RAM_BASE + i * 4096
//! ```
//!
//! Both are `vm-memory` anonymous mappings. RAM is mapped `MAP_NORESERVE`, so untouched pages
//! cost nothing, and it is never pre-faulted: every first touch reaches the pager. With huge
//! pages ([`RamPages::Huge`]) RAM is a `MAP_HUGETLB` mapping of 2 MiB pages instead, reserved
//! when mapped (so a host without enough free huge pages refuses at the start, not with a
//! SIGBUS in the middle of a run), whose faults userfaultfd resolves 2 MiB at a time.

use pagemesh_api::PAGE_SIZE;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// A huge page: what userfaultfd resolves at once in a hugetlb mapping.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The pages guest RAM is mapped with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamPages {
    /// 4 KiB pages (anonymous memory).
    #[default]
    Small,
    /// 2 MiB pages from the host's hugetlb pool (`/proc/sys/vm/nr_hugepages`).
    Huge,
}

/// Maps `len` bytes of guest RAM at guest-physical `addr` with `pages`.
pub fn ram_region(
    addr: GuestAddress,
    len: usize,
    pages: RamPages,
) -> Result<GuestRegionMmap, MemoryError> {
    let bytes = len as u64;
    let region = match pages {
        RamPages::Small => vm_memory::mmap::MmapRegion::new(len).map_err(|e| {
            MemoryError::Map(bytes, vm_memory::mmap::FromRangesError::MmapRegion(e))
        })?,
        RamPages::Huge => {
            if !bytes.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(MemoryError::HugeSize(bytes));
            }
            // MAP_HUGE_2MB: the size in the flags' top bits (log2 of 2 MiB = 21), whatever
            // the host's default huge page size is.
            const MAP_HUGE_2MB: i32 = 21 << libc::MAP_HUGE_SHIFT;
            MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB | MAP_HUGE_2MB,
                )
                .with_hugetlbfs(true)
                .build()
                .map_err(|e| MemoryError::HugePages {
                    bytes,
                    free: free_huge_pages(),
                    source: e,
                })?
        }
    };
    GuestRegionMmap::new(region, addr).ok_or(MemoryError::BadSize(bytes))
}

/// Pages added to the host's hugetlb pool so that enough are free, for as long as it lives:
/// it gives back what it added (tests and benchmarks use it; a service sizes the pool once,
/// as root, at boot).
#[derive(Debug)]
pub struct HugePool {
    added: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePool {
    /// Makes at least `pages` 2 MiB pages free, adding to the pool what is missing (root
    /// only).
    pub fn reserve(pages: u64) -> std::io::Result<Self> {
        let free = free_huge_pages().unwrap_or(0);
        let added = pages.saturating_sub(free);
        if added > 0 {
            let total = pool_size()?;
            std::fs::write(NR_HUGEPAGES, (total + added).to_string())?;
            let now = free_huge_pages().unwrap_or(0);
            if now < pages {
                // The kernel found fewer free 2 MiB blocks than asked (fragmented memory).
                let _ = std::fs::write(NR_HUGEPAGES, total.to_string());
                return Err(std::io::Error::other(format!(
                    "the host could make only {now} of {pages} 2 MiB huge pages free"
                )));
            }
        }
        Ok(HugePool { added })
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        if self.added > 0
            && let Ok(total) = pool_size()
        {
            let _ = std::fs::write(NR_HUGEPAGES, total.saturating_sub(self.added).to_string());
        }
    }
}

fn pool_size() -> std::io::Result<u64> {
    std::fs::read_to_string(NR_HUGEPAGES)?
        .trim()
        .parse()
        .map_err(std::io::Error::other)
}

/// Free 2 MiB huge pages on the host (`HugePages_Free`), if it says.
pub fn free_huge_pages() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("HugePages_Free:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Guest-physical address of the system region.
pub const SYSTEM_BASE: u64 = 0;
/// Size of the system region.
pub const SYSTEM_SIZE: u64 = 2 << 20;
/// Guest-physical address of the trace region.
pub const TRACE_BASE: u64 = 256 << 20;
/// Size of the trace region.
pub const TRACE_SIZE: u64 = 256 << 20;
/// Guest-physical address of RAM.
pub const RAM_BASE: u64 = 1 << 30;
/// Largest RAM the identity page tables cover (RAM_BASE + this <= 64 GiB).
pub const MAX_RAM: u64 = 63 << 30;

/// Errors building guest memory.
#[derive(thiserror::Error, Debug)]
pub enum MemoryError {
    /// RAM size not a positive multiple of the page size or too large.
    #[error("guest memory must be a non-zero multiple of 4 KiB and at most 63 GiB, got {0} bytes")]
    BadSize(u64),
    /// mmap failed.
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// RAM in huge pages must be whole huge pages.
    #[error("guest memory in 2 MiB huge pages must be a multiple of 2 MiB, got {0} bytes")]
    HugeSize(u64),
    /// The host's hugetlb pool could not back RAM.
    #[error(
        "cannot map {} MiB of guest memory in 2 MiB huge pages ({} free on this host); reserve \
         them as root, e.g. `echo {} > /proc/sys/vm/nr_hugepages`",
        .bytes >> 20,
        .free.map_or("none said".to_owned(), |f| f.to_string()),
        .bytes / HUGE_PAGE_SIZE + 8
    )]
    HugePages {
        /// RAM asked for.
        bytes: u64,
        /// `HugePages_Free` of the host.
        free: Option<u64>,
        /// Why mmap refused.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// The guest's memory and where RAM sits in the host's address space.
pub struct GuestLayout {
    /// All guest memory regions.
    pub memory: GuestMemoryMmap,
    /// RAM size in bytes.
    pub ram_size: u64,
    /// The pages RAM is mapped with.
    pub ram_pages: RamPages,
}

impl GuestLayout {
    /// Maps a system region and `ram_size` bytes of RAM in 4 KiB pages.
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        Self::with_pages(ram_size, RamPages::Small)
    }

    /// Maps a system region and `ram_size` bytes of RAM in `ram_pages`.
    pub fn with_pages(ram_size: u64, ram_pages: RamPages) -> Result<Self, MemoryError> {
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE as u64) || ram_size > MAX_RAM {
            return Err(MemoryError::BadSize(ram_size));
        }
        let ram_len = usize::try_from(ram_size).map_err(|_| MemoryError::BadSize(ram_size))?;
        let small =
            |addr: u64, len: u64| ram_region(GuestAddress(addr), len as usize, RamPages::Small);
        let memory = GuestMemoryMmap::from_regions(vec![
            small(SYSTEM_BASE, SYSTEM_SIZE)?,
            small(TRACE_BASE, TRACE_SIZE)?,
            ram_region(GuestAddress(RAM_BASE), ram_len, ram_pages)?,
        ])
        .map_err(|e| MemoryError::Map(ram_size, e.into()))?;
        Ok(Self {
            memory,
            ram_size,
            ram_pages,
        })
    }

    /// Pages of RAM.
    pub fn ram_pages(&self) -> u64 {
        self.ram_size / PAGE_SIZE as u64
    }

    /// Host virtual address of the first byte of RAM.
    pub fn ram_host_addr(&self) -> *mut u8 {
        let region = self
            .memory
            .find_region(GuestAddress(RAM_BASE))
            .expect("RAM region exists by construction");
        region.as_ptr()
    }

    /// Host virtual address of the trace region.
    pub fn trace_host_addr(&self) -> *mut u8 {
        let region = self
            .memory
            .find_region(GuestAddress(TRACE_BASE))
            .expect("trace region exists by construction");
        region.as_ptr()
    }

    /// Host virtual address of the system region.
    pub fn system_host_addr(&self) -> *mut u8 {
        let region = self
            .memory
            .find_region(GuestAddress(SYSTEM_BASE))
            .expect("system region exists by construction");
        region.as_ptr()
    }
}
