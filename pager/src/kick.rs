//! Kicking the handler thread out of its blocking `read` so that it sees the stop flag.
//!
//! A signal with a no-op handler installed without `SA_RESTART` makes the blocked `read`
//! return `EINTR` (vmm-sys-util's `register_signal_handler` installs it that way, and its
//! `Killable` sends it to one thread). The VMM kicks its vCPU threads out of `KVM_RUN` with
//! the same signal and the same no-op handler, so whichever installs it first, both work.

use std::sync::OnceLock;
use std::thread::JoinHandle;

use vmm_sys_util::signal::{Killable, register_signal_handler};

/// The signal that interrupts a blocking system call of the thread it is sent to.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op [`KICK_SIGNAL`] handler once per process.
pub(crate) fn install() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(KICK_SIGNAL, on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// Sends [`KICK_SIGNAL`] to `thread`; a thread that has already exited is not an error.
pub(crate) fn kick<T>(thread: &JoinHandle<T>) {
    let _ = thread.kill(KICK_SIGNAL);
}
