//! A KVM VM with one vCPU running the built-in guest.

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::guest::{self, GuestError, PORT_DONE, PORT_PROGRESS, Workload, WorkloadResult};
use super::memory::{GuestLayout, RAM_BASE, SYSTEM_BASE, SYSTEM_SIZE};

/// Errors creating or running the VM.
#[derive(thiserror::Error, Debug)]
pub enum VcpuError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm; is KVM available and are you root?")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Setting up guest memory failed.
    #[error("cannot set up the guest")]
    Guest(#[from] GuestError),
    /// The guest triple-faulted.
    #[error("the guest shut down unexpectedly (triple fault) at rip {rip:#x}")]
    Shutdown {
        /// Instruction pointer at the time.
        rip: u64,
    },
    /// KVM left the guest for a reason the VMM does not handle.
    #[error("KVM stopped the guest with exit {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, as `kvm_ioctls` prints it (the exit itself borrows the vCPU's run
        /// area, so only its description can be kept).
        exit: String,
        /// Instruction pointer at the time.
        rip: u64,
    },
    /// KVM's instruction emulator gave up on an instruction the VMM cannot emulate either.
    #[error(
        "the instruction emulator stopped at rip {rip:#x} (bytes {bytes:02x?}); on hosts \
         without hardware virtualization, disable the feature on the kernel command line \
         (see docs/linux-guest.md)"
    )]
    Emulation {
        /// Instruction pointer of the instruction.
        rip: u64,
        /// Its first bytes (zeros when its address does not translate).
        bytes: [u8; 4],
    },
    /// The eventfd that signals the serial port's interrupt could not be created.
    #[error("cannot create the serial port's interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// The MSRs to set do not fit KVM's list.
    #[error("cannot build the list of MSRs to set")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// The handler of [`KICK_SIGNAL`] could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] std::io::Error),
    /// A thread to run a vCPU could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The run was stopped from outside (the pager failed, or the node is shutting down).
    #[error("the guest was stopped")]
    Stopped,
}

/// A VM with its memory and one vCPU.
pub struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    layout: GuestLayout,
}

impl Machine {
    /// Creates a VM over `layout` with one vCPU.
    pub fn new(layout: GuestLayout) -> Result<Self, VcpuError> {
        let kvm = Kvm::new().map_err(VcpuError::OpenKvm)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VcpuError::Kvm("CREATE_VM", e))?;
        let regions = [
            (SYSTEM_BASE, SYSTEM_SIZE, layout.system_host_addr()),
            (RAM_BASE, layout.ram_size, layout.ram_host_addr()),
        ];
        for (slot, (gpa, size, host)) in regions.into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: `host` points at a live mapping of `size` bytes owned by `layout`,
            // which the Machine keeps alive (and in place) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| VcpuError::Kvm("SET_USER_MEMORY_REGION", e))?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| VcpuError::Kvm("CREATE_VCPU", e))?;
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            layout,
        })
    }

    /// The guest's memory.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Loads `workload` and points the vCPU at it, in 64-bit mode at CPL0; the guest's first
    /// seven instructions drop it to CPL3.
    pub fn prepare(&mut self, workload: &Workload, seed: u64) -> Result<(), VcpuError> {
        guest::install(&self.layout.memory, self.layout.ram_pages(), workload, seed)?;

        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| VcpuError::Kvm("GET_SREGS", e))?;
        // Kernel code and data segments: the stub at CODE_ADDR irets to CPL3 itself.
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: guest::KERNEL_CS,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: guest::KERNEL_SS,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ss = data;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.tr = kvm_segment {
            base: guest::TSS_ADDR,
            limit: guest::TSS_LIMIT as u32,
            selector: guest::TSS_SEL,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.gdt.base = guest::GDT_ADDR;
        sregs.gdt.limit = 7 * 8 - 1;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = guest::PML4_ADDR;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
        sregs.cr0 = 0x8000_0000 | 0x1 | 0x10 | 0x20 | 0x1_0000; // PG | PE | ET | NE | WP
        sregs.efer = 0x500; // LME | LMA
        self.vcpu
            .set_sregs(&sregs)
            .map_err(|e| VcpuError::Kvm("SET_SREGS", e))?;

        let regs = kvm_bindings::kvm_regs {
            rip: guest::CODE_ADDR,
            rsp: guest::STACK_TOP,
            rdi: guest::PARAMS_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| VcpuError::Kvm("SET_REGS", e))?;
        Ok(())
    }

    /// Runs the vCPU until the guest reports done. `progress` sees pages done as the guest
    /// reports them. Returns early with [`VcpuError::Stopped`] once `stop` is set and the
    /// thread has been kicked (see [`kick_handler_installed`]).
    pub fn run(
        &mut self,
        workload: &Workload,
        stop: &AtomicBool,
        mut progress: impl FnMut(u64),
    ) -> Result<WorkloadResult, VcpuError> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Err(VcpuError::Stopped);
            }
            let outcome = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT_PROGRESS, data)) => {
                    progress(le_u32(data));
                    continue;
                }
                Ok(VcpuExit::IoOut(PORT_DONE, data)) => {
                    progress(le_u32(data));
                    return Ok(guest::read_result(&self.layout.memory, workload)?);
                }
                Ok(VcpuExit::Shutdown) => Ok(None),
                Ok(other) => Ok(Some(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => Err(e),
            };
            let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            return Err(match outcome {
                Ok(None) => VcpuError::Shutdown { rip },
                Ok(Some(exit)) => VcpuError::UnexpectedExit { exit, rip },
                Err(e) => VcpuError::Kvm("RUN", e),
            });
        }
    }
}

fn le_u32(data: &[u8]) -> u64 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u64::from(u32::from_le_bytes(b))
}

/// Signal used to kick a thread out of a blocking `KVM_RUN` or userfaultfd wait.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs a no-op handler for [`KICK_SIGNAL`] without `SA_RESTART`, so that sending it to
/// a thread makes its blocking ioctl or read return `EINTR`. Idempotent.
pub fn kick_handler_installed() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_kick as *const () as usize;
    sa.sa_flags = 0;
    // SAFETY: sa is fully initialised; the handler is async-signal-safe (it does nothing).
    let rc = unsafe { libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends [`KICK_SIGNAL`] to `thread`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a pthread_t obtained from a live std thread; a thread that has
    // already exited yields ESRCH, which is harmless here.
    unsafe {
        libc::pthread_kill(thread, KICK_SIGNAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{Access, Order};

    fn run(order: Order, access: Access, pages: u64) -> WorkloadResult {
        let layout = GuestLayout::new(pages * 4096).unwrap();
        let mut m = Machine::new(layout).unwrap();
        let w = Workload {
            order,
            access,
            first_page: 0,
            pages,
        };
        m.prepare(&w, 0).unwrap();
        let stop = AtomicBool::new(false);
        let r = m.run(&w, &stop, |_| {}).unwrap();
        assert_eq!(
            r.pages_done, pages,
            "{order:?} {access:?} must visit every page"
        );
        r
    }

    #[test]
    fn every_order_visits_every_page_of_zeroed_memory() {
        for order in [Order::Seq, Order::Random, Order::Stride(7)] {
            let r = run(order, Access::Read, 1000);
            assert_eq!(r.checksum, 0, "zeroed memory reads as zero");
        }
        let w = run(Order::Random, Access::Write, 777);
        let expect = Workload {
            order: Order::Random,
            access: Access::Write,
            first_page: 0,
            pages: 777,
        }
        .expected_checksum(crate::guest::Initial::Zero);
        assert_eq!(Some(w.checksum), expect);
    }

    #[test]
    fn verify_flags_zeroed_memory_as_bad() {
        let r = run(Order::Seq, Access::Verify, 64);
        assert_eq!(r.bad_pages, 64);
        assert_eq!(r.first_bad_page, Some(0));
    }
}
