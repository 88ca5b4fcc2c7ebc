//! Running a VM: what both machines (the built-in test guest and a Linux kernel) have in
//! common, so that one lifecycle runs either.
//!
//! A [`GuestMachine`] owns the VM and its memory and hands out its vCPUs ([`RunVcpu`]), each
//! to run on a thread of its own while the machine stays alive. One [`Stop`] stops them all:
//! a flag every vCPU checks before each `KVM_RUN`, and a kick (a signal with a no-op handler
//! installed without `SA_RESTART`, through vmm-sys-util) that gets a vCPU out of one, or out
//! of a page-fault wait that no page will end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use vmm_sys_util::signal::register_signal_handler;

use crate::error::VcpuError;

/// A VM whose vCPUs run on threads of their own.
pub trait GuestMachine {
    /// One vCPU, as it runs on its thread.
    type Vcpu: RunVcpu + Send;

    /// Host address and length of guest RAM (what the pager registers). The mapping lives
    /// as long as the machine.
    fn ram(&self) -> (*mut u8, u64);

    /// The vCPUs, vCPU 0 first; a second call returns none.
    fn take_vcpus(&mut self) -> Vec<Self::Vcpu>;

    /// Whether the VM ends when its first vCPU does (a Linux guest's reset or triple fault),
    /// rather than when every vCPU has (the built-in guest's vCPUs each finish their share).
    fn ends_with_first_vcpu(&self) -> bool {
        true
    }

    /// Called while the VM runs whenever nothing has happened for a while (e.g. to log where
    /// the guest is); `stop` can kick a vCPU. Nothing by default.
    fn on_idle(&self, stop: &Stop) {
        let _ = stop;
    }
}

/// One vCPU.
pub trait RunVcpu {
    /// How its run ends when the guest ends it.
    type Exit: Send;

    /// The vCPU's id.
    fn id(&self) -> u8;

    /// Runs the vCPU until the guest ends its run, or until `stop` is requested (the
    /// machine says how a stopped run ends: an exit or [`VcpuError::Stopped`]).
    fn run(&mut self, stop: &Stop) -> Result<Self::Exit, VcpuError>;
}

/// The signal that kicks a thread out of `KVM_RUN` or a page-fault wait. The pager stops its
/// handler with the same signal and the same no-op handler.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op [`KICK_SIGNAL`] handler (without `SA_RESTART`) once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(KICK_SIGNAL, on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// The stop of a VM, shared by its vCPU threads and whoever may stop it (the node on a
/// signal, the pager when it fails).
#[derive(Debug, Default)]
pub struct Stop {
    requested: AtomicBool,
    /// The vCPU threads, by vCPU index, once they run.
    threads: Mutex<Vec<(u8, libc::pthread_t)>>,
}

impl Stop {
    /// A stop not requested yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the VM is to stop.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks every vCPU to stop and kicks those that run. Safe to call from any thread, any
    /// number of times.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        for &(_, thread) in self.threads().iter() {
            kick(thread);
        }
    }

    /// Kicks vCPU `id` out of `KVM_RUN` without stopping it (it runs on after handling
    /// whatever it was kicked for).
    pub fn kick(&self, id: u8) {
        if let Some(&(_, thread)) = self.threads().iter().find(|(i, _)| *i == id) {
            kick(thread);
        }
    }

    /// Records the calling thread as vCPU `id`'s, so that [`Stop::request`] kicks it.
    pub fn register_current(&self, id: u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads().push((id, me));
    }

    /// Forgets the calling thread (it is about to end): a thread id may be reused.
    pub fn unregister_current(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads().retain(|&(_, t)| t != me);
    }

    fn threads(&self) -> std::sync::MutexGuard<'_, Vec<(u8, libc::pthread_t)>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends [`KICK_SIGNAL`] to `thread`, which must be registered with a [`Stop`] and so alive
/// (threads unregister before they end).
fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a thread that registered itself with a Stop and unregisters
    // before it ends (under the same lock we hold while kicking).
    unsafe {
        libc::pthread_kill(thread, KICK_SIGNAL);
    }
}
