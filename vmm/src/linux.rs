//! A VM that boots a Linux kernel: in-kernel irqchip and PIT, one vCPU in 64-bit mode at
//! the kernel's entry point, COM1, a minimal i8042, and the fix-ups that software-assisted
//! KVM (`kvm_pvm`) needs.
//!
//! On hosts without VMX/SVM the instruction emulator stops (`KVM_EXIT_INTERNAL_ERROR`) on a
//! few instructions a kernel uses early; the VMM handles them by hand: `int3` gets a #BP
//! injected after stepping past it, `fwait` is skipped, `ud2` gets a #UD. Anything else
//! stops the VM with the instruction's bytes in the error. See `docs/linux-guest.md`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_fpu, kvm_msr_entry, kvm_pit_config,
    kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::boot::{BootEntry, GDT, GDT_ADDR, PML4_ADDR};
use super::error::VcpuError;
use super::i8042::{self, I8042};
use super::run::{GuestMachine, RunVcpu, Stop};
use super::serial::{COM1, COM1_IRQ, Com1, ConsoleLog, LineSink, com1};

/// Largest RAM this VMM maps (below the 32-bit MMIO hole).
pub const MAX_LINUX_RAM: u64 = 3 << 30;
const TSS_ADDRESS: usize = 0xfffb_d000;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const BOOT_STACK: u64 = 0x8ff0;

/// How a Linux run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxExit {
    /// The guest reset the machine (i8042 reset, e.g. `reboot=k` after poweroff/reboot).
    Reset,
    /// The guest triple-faulted.
    TripleFault {
        /// Instruction pointer at the time.
        rip: u64,
    },
    /// Stopped from outside (SIGTERM, or the pager failed).
    Stopped,
}

/// A Linux VM. Its vCPUs are taken out with [`GuestMachine::take_vcpus`] and run on their
/// own threads; the machine (VM file descriptor and memory) must outlive them.
pub struct LinuxMachine {
    _kvm: Kvm,
    _vm: VmFd,
    memory: Arc<GuestMemoryMmap>,
    cpus: Vec<Cpu>,
    /// Asks vCPU 0 to log where the guest is, the next time it is kicked.
    sample: Arc<AtomicBool>,
    /// What the guest printed.
    pub console: Arc<Mutex<ConsoleLog>>,
}

/// One vCPU and what it needs to run.
pub struct Cpu {
    id: u8,
    vcpu: VcpuFd,
    memory: Arc<GuestMemoryMmap>,
    devices: Arc<Mutex<Devices>>,
    console: Arc<Mutex<ConsoleLog>>,
    sample: Arc<AtomicBool>,
    /// Instructions the VMM emulated by hand (int3, fwait, ud2) on this vCPU.
    pub fixups: u64,
}

/// How a Linux vCPU's run ended, and what it did meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxVcpuExit {
    /// How it ended.
    pub exit: LinuxExit,
    /// Instructions the VMM emulated by hand (int3, fwait, ud2) on this vCPU.
    pub fixups: u64,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Kvm(what, e)
}

impl LinuxMachine {
    /// A VM over `memory` (one region at guest-physical 0) with `vcpus` vCPUs; vCPU 0 starts
    /// at `entry`, the others wait for the guest's INIT/SIPI (in-kernel local APICs).
    pub fn new(
        memory: GuestMemoryMmap,
        entry: BootEntry,
        echo_console: bool,
        vcpus: u8,
    ) -> Result<Self, VcpuError> {
        let kvm = Kvm::new().map_err(VcpuError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("CREATE_PIT2"))?;
        for (slot, region) in memory.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `len` bytes owned by `memory`, which
            // this machine keeps (in place) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VcpuError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)
            .map_err(kvm_err("IRQFD"))?;
        let console = Arc::new(Mutex::new(ConsoleLog::default()));
        let sample = Arc::new(AtomicBool::new(false));
        let com1 = com1(irq, LineSink::new(echo_console, console.clone()));

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let memory = Arc::new(memory);
        let devices = Arc::new(Mutex::new(Devices {
            com1,
            i8042: I8042::default(),
        }));
        let mut cpus = Vec::with_capacity(usize::from(vcpus));
        for id in 0..vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            for e in cpuid.as_mut_slice() {
                match e.function {
                    // Initial APIC id and logical processor count.
                    1 => {
                        e.ebx = (e.ebx & 0x0000_ffff)
                            | (u32::from(id) << 24)
                            | (u32::from(vcpus) << 16);
                        if vcpus > 1 {
                            e.edx |= 1 << 28; // HTT: the count above is valid
                        }
                    }
                    // x2APIC id.
                    0xb => e.edx = u32::from(id),
                    _ => {}
                }
            }
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: 1, // fast strings
                ..Default::default()
            }])
            .map_err(VcpuError::MsrList)?;
            vcpu.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
            vcpu.set_fpu(&kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            })
            .map_err(kvm_err("SET_FPU"))?;
            set_lint(&vcpu)?;
            if id == 0 {
                set_boot_registers(&vcpu, entry)?;
            }
            cpus.push(Cpu {
                id,
                vcpu,
                memory: memory.clone(),
                devices: devices.clone(),
                console: console.clone(),
                sample: sample.clone(),
                fixups: 0,
            });
        }
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            memory,
            cpus,
            sample,
            console,
        })
    }
}

impl GuestMachine for LinuxMachine {
    type Vcpu = Cpu;

    fn ram(&self) -> (*mut u8, u64) {
        let r = self
            .memory
            .find_region(GuestAddress(0))
            .expect("RAM starts at 0 by construction");
        (r.as_ptr(), r.len())
    }

    fn take_vcpus(&mut self) -> Vec<Cpu> {
        std::mem::take(&mut self.cpus)
    }

    /// Logs where vCPU 0 is (boot progress): it looks the next time it leaves `KVM_RUN`.
    fn on_idle(&self, stop: &Stop) {
        self.sample.store(true, Ordering::Release);
        stop.kick(0);
    }
}

impl RunVcpu for Cpu {
    type Exit = LinuxVcpuExit;

    /// This vCPU's id (and local APIC id).
    fn id(&self) -> u8 {
        self.id
    }

    /// Runs until the guest resets, triple-faults, or `stop` is requested (then it ends as
    /// [`LinuxExit::Stopped`]).
    fn run(&mut self, stop: &Stop) -> Result<LinuxVcpuExit, VcpuError> {
        let exit = self.run_until_exit(stop)?;
        Ok(LinuxVcpuExit {
            exit,
            fixups: self.fixups,
        })
    }
}

impl Cpu {
    fn run_until_exit(&mut self, stop: &Stop) -> Result<LinuxExit, VcpuError> {
        loop {
            if stop.is_requested() {
                return Ok(LinuxExit::Stopped);
            }
            if self.id == 0 && self.sample.swap(false, Ordering::AcqRel) {
                self.log_position();
            }
            let exit = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
                    d.io_out(port, data);
                    if d.i8042.reset_requested() {
                        return Ok(LinuxExit::Reset);
                    }
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.devices
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .io_in(port, data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0xff);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => continue,
                Ok(VcpuExit::Shutdown) => None,
                Ok(VcpuExit::InternalError) => Some("internal error"),
                Ok(other) => {
                    let exit = format!("{other:?}");
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                    return Err(VcpuError::UnexpectedExit { exit, rip });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(VcpuError::Kvm("RUN", e)),
            };
            match exit {
                None => {
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Ok(LinuxExit::TripleFault { rip });
                }
                Some(_) => self.fix_up()?,
            }
        }
    }

    fn log_position(&self) {
        let (Ok(regs), Ok(sregs)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) else {
            return;
        };
        let lines = self.console.lock().map_or(0, |l| l.count);
        tracing::info!(
            "guest vCPU {} at rip {:#x} (cpl {}, cr3 {:#x}, rflags {:#x}); {lines} console lines so far",
            self.id,
            regs.rip,
            sregs.cs.dpl,
            sregs.cr3,
            regs.rflags
        );
    }

    /// The emulator gave up on the instruction at rip: handle the few that kernels use.
    fn fix_up(&mut self) -> Result<(), VcpuError> {
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("GET_REGS"))?;
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        let mut code = [0u8; 4];
        let phys = translate(&self.memory, sregs.cr3, regs.rip);
        if let Some(p) = phys {
            let _ = self.memory.read_slice(&mut code, GuestAddress(p));
        }
        let inject = |vcpu: &VcpuFd, nr: u8| -> Result<(), VcpuError> {
            let mut ev = vcpu.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?;
            ev.exception.injected = 1;
            ev.exception.nr = nr;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(kvm_err("SET_VCPU_EVENTS"))
        };
        match code {
            [0xcc, ..] => {
                // int3 is a trap: the handler sees rip after the instruction.
                regs.rip += 1;
                self.vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
                inject(&self.vcpu, 3)?;
            }
            [0x9b, ..] => {
                regs.rip += 1;
                self.vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
            }
            [0x0f, 0x0b, ..] => inject(&self.vcpu, 6)?,
            _ => {
                return Err(VcpuError::Emulation {
                    rip: regs.rip,
                    bytes: code,
                });
            }
        }
        self.fixups += 1;
        Ok(())
    }
}

/// The port-I/O devices.
struct Devices {
    com1: Com1,
    i8042: I8042,
}

impl Devices {
    fn io_out(&mut self, port: u16, data: &[u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                if let Some(&b) = data.first()
                    && let Err(e) = self.com1.write((p - COM1) as u8, b)
                {
                    tracing::debug!("COM1 write: {e:?}");
                }
            }
            i8042::DATA | i8042::COMMAND => {
                if let Some(&b) = data.first() {
                    self.i8042.write(port, b);
                }
            }
            _ => {}
        }
    }

    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                let v = self.com1.read((p - COM1) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            i8042::DATA | i8042::COMMAND => {
                let v = self.i8042.read(port);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            // No device: the bus floats high.
            _ => data.fill(0xff),
        }
    }
}

/// Guest virtual to physical through the 4-level tables at `cr3`.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & 1 == 0 {
            return None;
        }
        let large = entry & 0x80 != 0 && (level == 3 || level == 2);
        if large || level == 1 {
            let page = 1u64 << shift;
            return Some((entry & ADDR & !(page - 1)) | (va & (page - 1)));
        }
        table = entry & ADDR;
    }
    None
}

fn set_lint(vcpu: &VcpuFd) -> Result<(), VcpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("SET_LAPIC"))
}

fn set_boot_registers(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), VcpuError> {
    let regs = kvm_bindings::kvm_regs {
        rip: entry.rip,
        rsi: entry.zero_page,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
    let seg = |index: u16, flags: u16| {
        let f = u32::from(flags);
        kvm_segment {
            base: 0,
            limit: 0xfffff,
            selector: index * 8,
            type_: (f & 0xf) as u8,
            present: ((f >> 7) & 1) as u8,
            dpl: ((f >> 5) & 3) as u8,
            db: ((f >> 14) & 1) as u8,
            s: ((f >> 4) & 1) as u8,
            l: ((f >> 13) & 1) as u8,
            g: ((f >> 15) & 1) as u8,
            avl: ((f >> 12) & 1) as u8,
            unusable: 0,
            padding: 0,
        }
    };
    let code = seg(1, GDT[1].0);
    let data = seg(2, GDT[2].0);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(3, GDT[3].0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x1 | 0x8000_0000; // PE | PG
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))
}
