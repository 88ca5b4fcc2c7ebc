//! A KVM VM whose vCPUs (one by default) run the built-in guest, each over its share of the
//! workload's pages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::error::VcpuError;
use super::guest::{self, PORT_DONE, PORT_PROGRESS, Workload, WorkloadResult};
use super::memory::{GuestLayout, RAM_BASE, SYSTEM_BASE, SYSTEM_SIZE, TRACE_BASE, TRACE_SIZE};
use super::run::{GuestMachine, RunVcpu, Stop};

/// A VM with its memory and vCPUs, which run the built-in workload guest.
pub struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    /// Taken by [`GuestMachine::take_vcpus`].
    vcpus: Vec<VcpuFd>,
    layout: GuestLayout,
    /// Each vCPU's share of the workload, once prepared.
    workloads: Vec<Workload>,
    progress: Arc<AtomicU64>,
}

/// The built-in guest's vCPU, taken out of its [`Machine`] to run on a thread of its own.
pub struct BuiltinVcpu {
    id: u8,
    vcpu: VcpuFd,
    memory: vm_memory::GuestMemoryMmap,
    workload: Workload,
    /// Pages done by every vCPU, and by this one at its last report.
    progress: Arc<AtomicU64>,
    reported: u64,
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
        Self::with_vcpus(layout, 1)
    }

    /// Creates a VM over `layout` with `vcpus` vCPUs (1 to
    /// [`guest::MAX_GUEST_VCPUS`]), which share the workload's pages out between them.
    pub fn with_vcpus(layout: GuestLayout, vcpus: u8) -> Result<Self, VcpuError> {
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
        let vcpus = (0..vcpus)
            .map(|i| {
                vm.create_vcpu(u64::from(i))
                    .map_err(|e| VcpuError::Kvm("CREATE_VCPU", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            vcpus,
            layout,
            workloads: Vec::new(),
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

    /// Loads `workload`, shared out between the vCPUs, and points each vCPU at its share,
    /// in 64-bit mode at CPL0; the guest's first seven instructions drop it to CPL3.
    pub fn prepare(&mut self, workload: &Workload, seed: u64) -> Result<(), VcpuError> {
        if self.vcpus.is_empty() {
            return Err(VcpuError::Taken);
        }
        let shares = workload.split(self.vcpus.len() as u64)?;
        guest::install(&self.layout.memory, self.layout.ram_pages(), &shares, seed)?;
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            point_at_guest(vcpu, i as u64)?;
        }
        self.workloads = shares;
        Ok(())
    }
}

/// Sets vCPU `i`'s registers for the guest's entry: 64-bit mode, CPL0, its parameter block
/// in rdi and its own stack.
fn point_at_guest(vcpu: &VcpuFd, i: u64) -> Result<(), VcpuError> {
    {
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
            rsp: guest::stack_top(i),
            rdi: guest::params_addr(i),
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

    /// Each vCPU ends when its share is done; the run when they all are.
    fn ends_with_first_vcpu(&self) -> bool {
        false
    }

    /// The vCPUs, once [`Machine::prepare`] has loaded a workload (none before).
    fn take_vcpus(&mut self) -> Vec<BuiltinVcpu> {
        if self.workloads.len() != self.vcpus.len() {
            return Vec::new();
        }
        self.vcpus
            .drain(..)
            .zip(&self.workloads)
            .enumerate()
            .map(|(i, (vcpu, &workload))| BuiltinVcpu {
                id: i as u8,
                vcpu,
                memory: self.layout.memory.clone(),
                workload,
                progress: self.progress.clone(),
                reported: 0,
            })
            .collect()
    }
}

impl RunVcpu for BuiltinVcpu {
    type Exit = BuiltinExit;

    fn id(&self) -> u8 {
        self.id
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
                    let all = report(&self.progress, &mut self.reported, done);
                    tracing::debug!("guest: {all} pages done");
                    continue;
                }
                Ok(VcpuExit::IoOut(PORT_DONE, data)) => {
                    let elapsed = started.elapsed();
                    let done = le_u32(data);
                    report(&self.progress, &mut self.reported, done);
                    let result =
                        guest::read_result(&self.memory, u64::from(self.id), &self.workload)?;
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

/// Takes a vCPU's report of `done` pages (it had `reported` at its last) into the shared
/// count; returns that count.
fn report(progress: &AtomicU64, reported: &mut u64, done: u64) -> u64 {
    let more = done.saturating_sub(*reported);
    *reported = done;
    progress.fetch_add(more, Ordering::Relaxed) + more
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
