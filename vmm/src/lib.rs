//! The KVM side of a compute node: guest memory, the built-in test guest and its vCPU.
//!
//! [`memory`] lays out guest-physical memory (a small system region owned by the VMM, and
//! RAM, which the pager serves); [`guest`] builds the CPL3 workload guest; [`vcpu`] runs it.

pub mod boot;
pub mod guest;
pub mod i8042;
pub mod linux;
pub mod memory;
pub mod serial;
pub mod vcpu;

pub use guest::{Access, Order, Workload, WorkloadResult};
pub use memory::{GuestLayout, RAM_BASE};
