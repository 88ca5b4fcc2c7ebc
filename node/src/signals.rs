//! The signals that stop a node: SIGINT and SIGTERM. They are blocked in every thread, and
//! whoever waits for them (the main thread of a memory node, a signal watcher while a guest
//! runs) takes them with `sigwait`, so no thread is ever interrupted by them.

use std::io;
use std::time::Duration;

/// SIGINT and SIGTERM, blocked in every thread so that one thread can wait for them.
pub struct StopSignals(libc::sigset_t);

/// Blocks the stop signals in this thread and every thread it spawns later.
pub fn block_stop_signals() -> io::Result<StopSignals> {
    // SAFETY: sigemptyset/sigaddset initialise and modify a local sigset_t;
    // pthread_sigmask blocks them for this thread and the threads it spawns later.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals(set))
    }
}

/// Waits for SIGINT or SIGTERM.
pub fn wait_for_stop_signal(signals: &StopSignals) -> io::Result<()> {
    let mut sig = 0;
    // SAFETY: sigwait on a set of signals this thread has blocked.
    let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    tracing::info!("signal {sig} received; shutting down");
    Ok(())
}

/// Waits up to `timeout` for SIGINT or SIGTERM; `None` if none came.
pub fn wait_stop_signal_for(signals: &StopSignals, timeout: Duration) -> io::Result<Option<i32>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: sigtimedwait on a set of signals this thread has blocked; no siginfo wanted.
    let sig = unsafe { libc::sigtimedwait(&signals.0, std::ptr::null_mut(), &ts) };
    if sig >= 0 {
        return Ok(Some(sig));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_stop_signal_is_taken_by_the_waiter() {
        // A thread of its own, so that the mask and the signal stay in it.
        std::thread::spawn(|| {
            let signals = block_stop_signals().unwrap();
            assert_eq!(
                wait_stop_signal_for(&signals, Duration::from_millis(10)).unwrap(),
                None
            );
            // SAFETY: sends SIGTERM to this thread, which has it blocked: it stays pending
            // until sigtimedwait takes it, and never runs a handler or ends the process.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
            assert_eq!(
                wait_stop_signal_for(&signals, Duration::from_secs(5)).unwrap(),
                Some(libc::SIGTERM)
            );
        })
        .join()
        .unwrap();
    }
}
