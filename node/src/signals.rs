//! The signals that stop a node: SIGINT and SIGTERM from outside, SIGUSR2 from a vCPU thread
//! whose guest has finished. They are blocked in every thread and the main thread waits for
//! them, so no thread is ever interrupted by them.

use crate::error::NodeError;

/// SIGINT and SIGTERM, blocked in every thread so that the main thread can wait for them.
pub struct StopSignals(libc::sigset_t);

/// Blocks the stop signals in this thread and every thread it spawns later.
pub(crate) fn block_stop_signals() -> std::io::Result<StopSignals> {
    // SAFETY: sigemptyset/sigaddset initialise and modify a local sigset_t;
    // pthread_sigmask blocks them for this thread and the threads it spawns later.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // SIGUSR2: "the guest has finished", sent by the vCPU thread to the main thread.
        libc::sigaddset(&mut set, libc::SIGUSR2);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals(set))
    }
}

/// Waits for SIGINT or SIGTERM.
pub(crate) fn wait_for_stop_signal(signals: &StopSignals) -> Result<(), NodeError> {
    loop {
        let sig = wait_signal(signals)?;
        if sig != libc::SIGUSR2 {
            tracing::info!("signal {sig} received; shutting down");
            return Ok(());
        }
    }
}

/// Like [`wait_signal`], giving up after `timeout` (`None`).
pub(crate) fn wait_signal_for(
    signals: &StopSignals,
    timeout: std::time::Duration,
) -> Result<Option<i32>, NodeError> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: sigtimedwait on a set of signals this thread has blocked; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(&signals.0, std::ptr::null_mut(), &ts) };
    if sig >= 0 {
        return Ok(Some(sig));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(NodeError::Signals(e)),
    }
}

/// Waits for any of the blocked signals (SIGINT, SIGTERM, or SIGUSR2 from the vCPU thread).
pub(crate) fn wait_signal(signals: &StopSignals) -> Result<i32, NodeError> {
    let mut sig = 0;
    // SAFETY: sigwait on a set of signals this thread has blocked.
    let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
    if rc != 0 {
        return Err(NodeError::Signals(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(sig)
}
