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
//! cost nothing, and it is never pre-faulted: every first touch reaches the pager.

use pagemesh_api::PAGE_SIZE;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
}

/// The guest's memory and where RAM sits in the host's address space.
pub struct GuestLayout {
    /// All guest memory regions.
    pub memory: GuestMemoryMmap,
    /// RAM size in bytes.
    pub ram_size: u64,
}

impl GuestLayout {
    /// Maps a system region and `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE as u64) || ram_size > MAX_RAM {
            return Err(MemoryError::BadSize(ram_size));
        }
        let ram_len = usize::try_from(ram_size).map_err(|_| MemoryError::BadSize(ram_size))?;
        let memory = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(SYSTEM_BASE), SYSTEM_SIZE as usize),
            (GuestAddress(TRACE_BASE), TRACE_SIZE as usize),
            (GuestAddress(RAM_BASE), ram_len),
        ])
        .map_err(|e| MemoryError::Map(ram_size, e))?;
        Ok(Self { memory, ram_size })
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
