//! A KVM VM with one vCPU running the built-in guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::error::VcpuError;
use super::guest::{self, PORT_DONE, PORT_PROGRESS, Workload, WorkloadResult};
use super::memory::{GuestLayout, RAM_BASE, SYSTEM_BASE, SYSTEM_SIZE, TRACE_BASE, TRACE_SIZE};
use super::run::{GuestMachine, RunVcpu, Stop};

/// A VM with its memory and one vCPU, which runs the built-in workload guest.
pub struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: Option<VcpuFd>,
    layout: GuestLayout,
    workload: Option<Workload>,
    progress: Arc<AtomicU64>,
}

/// The built-in guest's vCPU, taken out of its [`Machine`] to run on a thread of its own.
pub struct BuiltinVcpu {
    vcpu: VcpuFd,
    memory: vm_memory::GuestMemoryMmap,
    workload: Workload,
    progress: Arc<AtomicU64>,
}

/// What a built-in guest's run produced.
#[derive(Clone, Debug)]
pub struct BuiltinExit {
    /// The guest's report.
    pub result: WorkloadResult,
    /// From the vCPU's first instruction to the guest's done report.
    pub elapsed: Duration,
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
            (TRACE_BASE, TRACE_SIZE, layout.trace_host_addr()),
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
            vcpu: Some(vcpu),
            layout,
            workload: None,
            progress: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Pages the guest has reported done so far (updated as it runs).
    pub fn progress(&self) -> &Arc<AtomicU64> {
        &self.progress
    }

    /// The guest's memory.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Loads `workload` and points the vCPU at it, in 64-bit mode at CPL0; the guest's first
    /// seven instructions drop it to CPL3.
    pub fn prepare(&mut self, workload: &Workload, seed: u64) -> Result<(), VcpuError> {
        guest::install(&self.layout.memory, self.layout.ram_pages(), workload, seed)?;
        self.workload = Some(*workload);
        let Some(vcpu) = &self.vcpu else {
            return Err(VcpuError::Taken);
        };

        let mut sregs = vcpu
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
        vcpu.set_sregs(&sregs)
            .map_err(|e| VcpuError::Kvm("SET_SREGS", e))?;

        let regs = kvm_bindings::kvm_regs {
            rip: guest::CODE_ADDR,
            rsp: guest::STACK_TOP,
            rdi: guest::PARAMS_ADDR,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| VcpuError::Kvm("SET_REGS", e))?;
        Ok(())
    }
}

impl GuestMachine for Machine {
    type Vcpu = BuiltinVcpu;

    fn ram(&self) -> (*mut u8, u64) {
        (self.layout.ram_host_addr(), self.layout.ram_size)
    }

    /// The vCPU, once [`Machine::prepare`] has loaded a workload (none before).
    fn take_vcpus(&mut self) -> Vec<BuiltinVcpu> {
        let (Some(vcpu), Some(workload)) = (self.vcpu.take(), self.workload) else {
            return Vec::new();
        };
        vec![BuiltinVcpu {
            vcpu,
            memory: self.layout.memory.clone(),
            workload,
            progress: self.progress.clone(),
        }]
    }
}

impl RunVcpu for BuiltinVcpu {
    type Exit = BuiltinExit;

    fn id(&self) -> u8 {
        0
    }

    /// Runs the vCPU until the guest reports done, recording its progress reports. Returns
    /// early with [`VcpuError::Stopped`] once `stop` is requested.
    fn run(&mut self, stop: &Stop) -> Result<BuiltinExit, VcpuError> {
        let started = Instant::now();
        loop {
            if stop.is_requested() {
                return Err(VcpuError::Stopped);
            }
            let outcome = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT_PROGRESS, data)) => {
                    let done = le_u32(data);
                    self.progress.store(done, Ordering::Relaxed);
                    tracing::debug!("guest: {done} pages done");
                    continue;
                }
                Ok(VcpuExit::IoOut(PORT_DONE, data)) => {
                    let elapsed = started.elapsed();
                    self.progress.store(le_u32(data), Ordering::Relaxed);
                    let result = guest::read_result(&self.memory, &self.workload)?;
                    return Ok(BuiltinExit { result, elapsed });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{Access, Order};

    fn run(order: Order, access: Access, pages: u64) -> WorkloadResult {
        let layout = GuestLayout::new(pages * 4096).unwrap();
        let mut m = Machine::new(layout).unwrap();
        let w = Workload::new(order, access, 0, pages, pages).unwrap();
        m.prepare(&w, 0).unwrap();
        let mut vcpus = m.take_vcpus();
        assert_eq!(vcpus.len(), 1);
        assert!(m.take_vcpus().is_empty(), "taken once");
        let r = vcpus[0].run(&Stop::new()).unwrap().result;
        assert_eq!(
            r.pages_done, w.accesses,
            "{order:?} {access:?} must visit every page (or make every access)"
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
        let expect = Workload::new(Order::Random, Access::Write, 0, 777, 777)
            .unwrap()
            .expected_checksum(crate::guest::Initial::Zero);
        assert_eq!(Some(w.checksum), expect);
    }

    #[test]
    fn trace_orders_revisit_pages_as_their_trace_says() {
        for order in [
            Order::Zipf { milli: 990 },
            Order::Hotset {
                hot_pct: 10,
                access_pct: 90,
            },
        ] {
            let r = run(order, Access::Rmw, 500);
            assert_eq!(r.pages_done, 2000, "four accesses per page by default");
            let w = Workload::new(order, Access::Rmw, 0, 500, 500).unwrap();
            // Zeroed memory: each access reads how often its page was visited before.
            let expect = w.expected_checksum(crate::guest::Initial::Zero).unwrap();
            assert_eq!(r.checksum, expect, "{order:?}");
            assert!(expect > 0, "pages were visited again");
        }
    }

    #[test]
    fn verify_flags_zeroed_memory_as_bad() {
        let r = run(Order::Seq, Access::Verify, 64);
        assert_eq!(r.bad_pages, 64);
        assert_eq!(r.first_bad_page, Some(0));
    }
}
