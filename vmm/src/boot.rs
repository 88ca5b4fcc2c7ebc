//! Building the initial memory of a Linux guest: kernel, initrd, command line, boot
//! parameters (zero page with the e820 map), GDT and identity page tables, all laid out in
//! guest RAM exactly as the 64-bit boot protocol wants them
//! (<https://www.kernel.org/doc/html/latest/arch/x86/boot.html>).
//!
//! The result is an *image* of guest RAM, not memory the vCPU runs on: the compute node
//! writes it to a file, the memory nodes load it, and the guest's pages — kernel text
//! included — reach it through the pager, fault by fault.
//!
//! ```text
//! 0x0000_0500  GDT: null, code (0x08, 64-bit), data (0x10), TSS (0x18)
//! 0x0000_7000  boot_params (the "zero page"): setup header, e820 map
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. page directories: identity map, 2 MiB pages
//! 0x0002_0000  kernel command line
//! 0x0010_0000  kernel (protected-mode part of the bzImage, or the vmlinux ELF segments)
//! high RAM     initrd, page aligned, as high as the kernel allows
//! ```

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// Zero page address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// PML4 address (PDPT at +0x1000, page directories from +0x2000).
pub const PML4_ADDR: u64 = 0x9000;
/// Command line address.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line we write (the kernel's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX: usize = 2048;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of the low RAM area (the EBDA starts here on PCs).
const EBDA_START: u64 = 0x9_fc00;
/// Gigabytes the identity page tables cover (the kernel builds its own tables early).
const IDENTITY_GIBS: u64 = 4;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Errors building a Linux guest's memory.
#[derive(thiserror::Error, Debug)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel is neither a bzImage nor an x86-64 ELF vmlinux.
    #[error("{0} is not a Linux kernel (neither a bzImage nor an x86-64 ELF vmlinux)")]
    NotAKernel(String),
    /// linux-loader could not load it.
    #[error("cannot load kernel {0}")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    /// The initrd could not be read or does not fit.
    #[error("cannot load initrd {0}")]
    Initrd(String, #[source] std::io::Error),
    /// The initrd does not fit below the kernel's limit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Path.
        path: String,
        /// Size.
        size: u64,
        /// Highest address the kernel accepts.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Guest memory is too small.
    #[error("guest memory of {0} bytes is too small for a Linux guest (at least 64 MiB)")]
    TooSmall(u64),
    /// Writing guest memory failed.
    #[error("cannot write the guest's boot data")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// Writing the zero page failed.
    #[error("cannot write the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Mapping the image failed.
    #[error("cannot map {0} bytes for the guest image")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Where the vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub rip: u64,
    /// Zero page address, passed in `rsi`.
    pub zero_page: u64,
}

/// The boot_params struct, made writable into guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);

// SAFETY: boot_params is a bindgen-generated plain-old-data struct (integers and arrays of
// them, packed); any byte pattern is a valid value and it has no padding-dependent invariant.
unsafe impl vm_memory::ByteValued for ZeroPage {}

/// Lays out a Linux guest with `vcpus` CPUs in a fresh `mem_bytes` image at guest-physical 0.
pub fn build_image(
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<(GuestMemoryMmap, BootEntry), BootError> {
    if mem_bytes < (64 << 20) {
        return Err(BootError::TooSmall(mem_bytes));
    }
    let len = usize::try_from(mem_bytes).map_err(|_| BootError::TooSmall(mem_bytes))?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|e| BootError::Map(mem_bytes, e))?;
    let kname = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| BootError::OpenKernel(kname.clone(), e))?;
    let mut magic = [0u8; 4];
    let _ = std::io::Read::read(&mut file, &mut magic);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
        .map_err(|e| BootError::OpenKernel(kname.clone(), e))?;
    let loaded = if &magic == b"\x7fELF" {
        Elf::load(&mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
    } else {
        BzImage::load(&mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
    }
    .map_err(|e| match e {
        linux_loader::loader::Error::Bzimage(_) | linux_loader::loader::Error::Elf(_) => {
            BootError::NotAKernel(kname.clone())
        }
        e => BootError::LoadKernel(kname.clone(), e),
    })?;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(&mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|_| BootError::Cmdline(linux_loader::cmdline::Error::TooLarge))?;

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (cmdline.len() + 1) as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;

    if let Some(path) = initrd {
        let pname = path.display().to_string();
        let data = std::fs::read(path).map_err(|e| BootError::Initrd(pname.clone(), e))?;
        let limit = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        }
        .min(mem_bytes - 1);
        let size = data.len() as u64;
        let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;
        let addr = (limit + 1).saturating_sub(size) & !0xfff;
        if size == 0 || addr <= kernel_end.max(HIMEM_START) {
            return Err(BootError::InitrdTooBig {
                path: pname,
                size,
                limit,
            });
        }
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(BootError::Write)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    write_acpi(&mem, vcpus)?;
    params.acpi_rsdp_addr = ACPI_RSDP_ADDR;

    let e820 = e820_map(mem_bytes);
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    let zero_page = ZeroPage(params);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_ADDR)),
        &mem,
    )
    .map_err(BootError::ZeroPage)?;

    write_gdt(&mem)?;
    write_page_tables(&mem)?;
    write_mptable(&mem, vcpus)?;
    // (ACPI tables were written before the zero page, which points at them.)
    Ok((
        mem,
        BootEntry {
            // A bzImage's 64-bit entry is 0x200 past the protected-mode code; an ELF
            // vmlinux's entry is its e_entry, which linux-loader reports as kernel_load.
            rip: if &magic == b"\x7fELF" {
                loaded.kernel_load.0
            } else {
                loaded.kernel_load.0 + 0x200
            },
            zero_page: ZERO_PAGE_ADDR,
        },
    ))
}

/// RAM below the EBDA and from 1 MiB to the end of guest memory.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem_bytes - HIMEM_START,
            r#type: E820_RAM,
        },
    ]
}

/// A GDT descriptor from flags, base and limit (x86 segment descriptor layout).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

/// Where the MP floating pointer goes: the last KiB of base memory, which Linux scans.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// The local APICs' address.
const APIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's address.
const IOAPIC_ADDR: u32 = 0xfec0_0000;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The Intel MultiProcessor Specification 1.4 tables: a floating pointer and a
/// configuration table listing `cpus` processors (APIC ids 0..cpus, CPU 0 the bootstrap
/// processor), the ISA bus, the I/O APIC (id `cpus`), ISA IRQs 0-15 routed to its pins 0-15,
/// and LINT0 = ExtINT, LINT1 = NMI on every local APIC.
pub fn mptable(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if id == 0 { 0x02 } else { 0 }; // enabled, bootstrap processor
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    let mut ioapic = vec![2, ioapic_id, 0x11, 0x01];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&ioapic);
    count += 1;
    for irq in 0..16u8 {
        // type 3: I/O interrupt, INT, conforming polarity/trigger, ISA bus, irq -> pin irq
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // type 4: local interrupts, to every local APIC (0xff): ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"PAGEMESH");
    table.extend_from_slice(b"PAGEMESH-VM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

/// Where the ACPI RSDP goes (in the BIOS area Linux also scans); the XSDT and MADT follow.
pub const ACPI_RSDP_ADDR: u64 = 0xe_0000;
const ACPI_XSDT_ADDR: u64 = ACPI_RSDP_ADDR + 0x40;
const ACPI_MADT_ADDR: u64 = ACPI_RSDP_ADDR + 0x80;

/// An ACPI table: the 36-byte header with `body`, checksummed.
fn acpi_table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(b"PGMESH"); // OEM id
    t.extend_from_slice(b"PAGEMESH"); // OEM table id
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"PGMS"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The ACPI tables that describe the CPUs to kernels that only read ACPI (Debian's cloud
/// kernel is built without MP-table parsing): an RSDP (revision 2) pointing at an XSDT
/// holding one MADT, which lists the local APICs (ids 0..cpus), the I/O APIC (id `cpus`) and
/// the ISA override IRQ 0 -> GSI 2. No FADT or DSDT: the kernel uses the MADT for the CPUs
/// during early boot and then runs without an ACPI namespace.
pub fn acpi_tables(cpus: u8) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut madt = Vec::new();
    madt.extend_from_slice(&APIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s too
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, processor uid, APIC id, flags (enabled).
        madt.extend_from_slice(&[0, 8, id, id]);
        madt.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
    madt.extend_from_slice(&[1, 12, cpus, 0]);
    madt.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    madt.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: type 2, length 10, bus ISA, IRQ 0 -> GSI 2, flags 0.
    madt.extend_from_slice(&[2, 10, 0, 0]);
    madt.extend_from_slice(&2u32.to_le_bytes());
    madt.extend_from_slice(&0u16.to_le_bytes());
    let madt = acpi_table(b"APIC", 3, &madt);
    let xsdt = acpi_table(b"XSDT", 1, &ACPI_MADT_ADDR.to_le_bytes());

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(b"PGMESH");
    rsdp.push(2); // revision: ACPI 2.0+, with an XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&ACPI_XSDT_ADDR.to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    (rsdp, xsdt, madt)
}

fn write_acpi(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let (rsdp, xsdt, madt) = acpi_tables(cpus);
    debug_assert!(ACPI_RSDP_ADDR + rsdp.len() as u64 <= ACPI_XSDT_ADDR);
    debug_assert!(ACPI_XSDT_ADDR + xsdt.len() as u64 <= ACPI_MADT_ADDR);
    for (addr, bytes) in [
        (ACPI_RSDP_ADDR, rsdp),
        (ACPI_XSDT_ADDR, xsdt),
        (ACPI_MADT_ADDR, madt),
    ] {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(BootError::Write)?;
    }
    Ok(())
}

fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    mem.write_slice(&mptable(cpus), GuestAddress(MPTABLE_ADDR))
        .map_err(BootError::Write)
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, (flags, base, limit)) in GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(GDT_ADDR + 8 * i as u64),
        )
        .map_err(BootError::Write)?;
    }
    Ok(())
}

fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let pdpt = PML4_ADDR + 0x1000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_ADDR))
        .map_err(BootError::Write)?;
    for g in 0..IDENTITY_GIBS {
        let pd = PML4_ADDR + 0x2000 + g * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(pdpt + g * 8))
            .map_err(BootError::Write)?;
        for i in 0..512u64 {
            let entry = ((g << 30) + (i << 21)) | 0x83; // present, writable, 2 MiB
            mem.write_obj(entry, GuestAddress(pd + i * 8))
                .map_err(BootError::Write)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_architecture_says() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0, 0, 0), 0);
    }

    #[test]
    fn acpi_tables_point_at_each_other_and_checksum_to_zero() {
        let (rsdp, xsdt, madt) = acpi_tables(3);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            ACPI_XSDT_ADDR
        );
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        assert_eq!(
            u64::from_le_bytes(xsdt[36..44].try_into().unwrap()),
            ACPI_MADT_ADDR
        );
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(&madt), 0);
        assert_eq!(
            u32::from_le_bytes(madt[4..8].try_into().unwrap()) as usize,
            madt.len()
        );
        // Three local APIC entries right after the 44 bytes of header + MADT fields.
        for id in 0..3usize {
            let e = &madt[44 + 8 * id..44 + 8 * (id + 1)];
            assert_eq!(&e[..4], &[0, 8, id as u8, id as u8]);
        }
        assert!(ACPI_MADT_ADDR + madt.len() as u64 <= 0xf_0000);
    }

    #[test]
    fn mptable_lists_every_cpu_and_checksums_to_zero() {
        let t = mptable(4);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_ADDR + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0, "configuration table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 16 + 2);
        // Processor entries: ids 0..4, only the first is the bootstrap processor.
        for id in 0..4usize {
            let e = &table[44 + 20 * id..44 + 20 * (id + 1)];
            assert_eq!((e[0], e[1]), (0, id as u8));
            assert_eq!(e[3] & 2 != 0, id == 0);
        }
        // Everything fits below the end of base memory.
        assert!(MPTABLE_ADDR + t.len() as u64 <= 0xa_0000);
    }

    #[test]
    fn e820_covers_low_and_high_ram_without_the_hole() {
        let m = e820_map(256 << 20);
        assert_eq!(m.len(), 2);
        let (a0, s0, a1, s1) = (m[0].addr, m[0].size, m[1].addr, m[1].size);
        assert_eq!((a0, s0), (0, EBDA_START));
        assert_eq!(a1, HIMEM_START);
        assert_eq!(a1 + s1, 256 << 20);
        assert!(m.iter().all(|e| {
            let t = e.r#type;
            t == E820_RAM
        }));
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("pagemesh-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bogus = dir.join("not-a-kernel");
        std::fs::write(&bogus, vec![0x42u8; 64 * 1024]).unwrap();
        let err = build_image(64 << 20, &bogus, None, "console=ttyS0", 1).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err:?}");
        assert!(err.to_string().contains("is not a Linux kernel"), "{err}");
        let missing = build_image(64 << 20, &dir.join("nope"), None, "", 1).unwrap_err();
        assert!(matches!(missing, BootError::OpenKernel(..)), "{missing:?}");
        assert!(matches!(
            build_image(1 << 20, &bogus, None, "", 1).unwrap_err(),
            BootError::TooSmall(_)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fake_bzimage_gets_a_zero_page_cmdline_and_initrd() {
        // A minimal bzImage: setup header at 0x1f1 with the HdrS magic, protocol 2.15,
        // one setup sector, 64-bit loadable, and a small protected-mode payload.
        let mut img = vec![0u8; 0x1000 + 0x4000];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&0x1u16.to_le_bytes()); // xloadflags: 64-bit entry
        let dir = std::env::temp_dir().join(format!("pagemesh-bz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("bzImage");
        std::fs::write(&k, &img).unwrap();
        let i = dir.join("initrd");
        std::fs::write(&i, vec![7u8; 10_000]).unwrap();
        let (mem, entry) = build_image(64 << 20, &k, Some(&i), "console=ttyS0 quiet", 2).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(entry.zero_page, ZERO_PAGE_ADDR);
        assert_eq!(entry.rip, HIMEM_START + 0x200);
        let zp: ZeroPage = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = zp.0.hdr;
        let (ptr, size, flag, magic, kind) = (
            hdr.cmd_line_ptr,
            hdr.ramdisk_size,
            hdr.boot_flag,
            hdr.header,
            hdr.type_of_loader,
        );
        assert_eq!(ptr as u64, CMDLINE_ADDR);
        assert_eq!(size, 10_000);
        assert_eq!((flag, magic, kind), (0xaa55, KERNEL_HDR_MAGIC, 0xff));
        assert_eq!(zp.0.e820_entries, 2);
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl[..20], b"console=ttyS0 quiet\0");
        let rd = hdr.ramdisk_image as u64;
        assert_eq!(rd % 4096, 0);
        assert!(rd + 10_000 <= 64 << 20);
        let b: u8 = mem.read_obj(GuestAddress(rd + 9_999)).unwrap();
        assert_eq!(b, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
