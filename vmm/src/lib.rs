//! The KVM side of a compute node: guest memory, the built-in test guest and its vCPU, and
//! a VM that boots a Linux kernel.
//!
//! [`memory`] lays out guest-physical memory (a small system region owned by the VMM, and
//! RAM, which the pager serves); [`guest`] builds the CPL3 workload guest; [`vcpu`] runs it;
//! [`linux`] (with [`boot`], [`serial`], [`i8042`]) boots a kernel. Both machines implement
//! [`run::GuestMachine`], so one lifecycle (in the node) runs either: their vCPUs run on
//! threads of their own and one [`run::Stop`] stops them all.

pub mod boot;
pub mod error;
pub mod guest;
pub mod i8042;
pub mod linux;
pub mod memory;
pub mod run;
pub mod serial;
pub mod vcpu;

pub use error::VcpuError;
pub use guest::{Access, Order, Workload, WorkloadResult};
pub use memory::{GuestLayout, RAM_BASE};
pub use run::{GuestMachine, RunVcpu, Stop};
