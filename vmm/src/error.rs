//! The error of creating or running a VM, shared by both machines and the lifecycle.

use crate::guest::GuestError;

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
    /// The workload cannot run on these vCPUs.
    #[error(transparent)]
    Workload(#[from] crate::guest::WorkloadError),
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
    /// The run was stopped from outside (the pager failed, or the node is shutting down).
    #[error("the guest was stopped")]
    Stopped,
    /// The machine's vCPUs were already taken to run.
    #[error("the vCPUs were already taken to run")]
    Taken,
}
