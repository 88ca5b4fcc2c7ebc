//! Minimal userfaultfd wrappers: create, register (MISSING, and WP for dirty tracking),
//! read events, COPY (optionally write-protected), ZEROPAGE, WRITEPROTECT, WAKE.
//!
//! Written against the kernel ABI (`include/uapi/linux/userfaultfd.h`) rather than the
//! `userfaultfd` crate: that crate needs libclang at build time, and reports `EAGAIN` from
//! `UFFDIO_COPY` as a partial copy of `-11` bytes. Here both `EEXIST` and `EAGAIN` are
//! explicit outcomes.
//!
//! Kernel-mode faults must be delivered: KVM touches guest memory from the kernel
//! (`get_user_pages` on the vCPU thread), and a "user-mode only" userfaultfd makes `KVM_RUN`
//! fail with `EFAULT` at the first fault. We therefore create the descriptor through
//! `/dev/userfaultfd` (which needs no `vm.unprivileged_userfaultfd`) without
//! `UFFD_USER_MODE_ONLY`, falling back to the syscall.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

const UFFDIO: u64 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// Set in a page-fault event's flags when the access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// Set in a page-fault event's flags when it is a write to a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// Request the faulting thread id in events (used by the eBPF probes later).
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`, page-fault view.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<UffdMsg>() == 32);

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

/// Errors setting up a userfaultfd.
#[derive(thiserror::Error, Debug)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the syscall gave a descriptor.
    #[error(
        "cannot create a userfaultfd (needs root or CAP_SYS_PTRACE, or access to /dev/userfaultfd)"
    )]
    Create(#[source] io::Error),
    /// The API handshake failed.
    #[error("the kernel refused the userfaultfd API handshake")]
    Api(#[source] io::Error),
    /// Registering the range failed.
    #[error("cannot register {len} bytes at {start:#x} with userfaultfd")]
    Register {
        /// Start address.
        start: u64,
        /// Length.
        len: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// What a page install ioctl did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The page is now mapped and the faulting threads are woken.
    Done,
    /// The page was already present (another path installed it); waiters were woken.
    AlreadyPresent,
}

/// A page fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address (not page aligned).
    pub address: u64,
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// Faulting thread id.
    pub tid: u32,
}

impl Fault {
    /// A write to a write-protected page (the page is there).
    pub fn is_write_protect(&self) -> bool {
        self.flags & UFFD_PAGEFAULT_FLAG_WP != 0
    }

    /// The access was a write.
    pub fn is_write(&self) -> bool {
        self.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0
    }
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Creates a blocking userfaultfd that also receives kernel-mode faults.
    pub fn new() -> Result<Self, UffdError> {
        let fd = match OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes an int of O_* flags and returns a new
                // descriptor or -1; `dev` is a valid open descriptor.
                let rc = unsafe {
                    libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, libc::O_CLOEXEC)
                };
                if rc < 0 {
                    return Err(UffdError::Create(io::Error::last_os_error()));
                }
                rc
            }
            Err(_) => {
                // SAFETY: the userfaultfd syscall takes flags and returns a descriptor or -1.
                let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
                if rc < 0 {
                    return Err(UffdError::Create(io::Error::last_os_error()));
                }
                rc as i32
            }
        };
        // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_THREAD_ID,
            ioctls: 0,
        };
        ioctl(fd.as_fd(), UFFDIO_API, &mut api).map_err(UffdError::Api)?;
        Ok(Self { fd })
    }

    /// Registers `[start, start + len)` for missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg).map_err(|source| UffdError::Register {
            start,
            len,
            source,
        })
    }

    /// Registers `[start, start + len)` for missing-page and write-protect faults: pages
    /// installed with [`Uffd::copy_protected`] (or protected with [`Uffd::write_protect`])
    /// fault on their next write, which is how the cache learns a page is dirty.
    pub fn register_missing_and_wp(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.fd.as_fd(), UFFDIO_REGISTER, &mut reg).map_err(|source| UffdError::Register {
            start,
            len,
            source,
        })
    }

    /// Write-protects `[start, start + len)` (`protect`), so that the next write to any of
    /// its pages faults, or lifts the protection and wakes the threads waiting on a write
    /// there. Present pages only; the kernel invalidates secondary MMUs (KVM's) first, so a
    /// guest write after this returns faults too.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        loop {
            match ioctl(self.fd.as_fd(), UFFDIO_WRITEPROTECT, &mut arg) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                r => return r,
            }
        }
    }

    /// Makes [`Uffd::read_fault`] return `ErrorKind::WouldBlock` rather than wait when no
    /// event is queued (for [`Uffd::poll_fault`]). The flag is the open file's: it holds for
    /// every reader of this descriptor.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL and F_SETFL on a valid open descriptor take and return ints.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next page fault on a descriptor made non-blocking ([`Uffd::set_nonblocking`]):
    /// reads without waiting until `spin_until` (a bounded poll: an event that arrives
    /// meanwhile needs no wake-up of this thread), then sleeps in `poll` until one is
    /// queued. Between reads it yields, so a thread ready on this CPU (a memory node's
    /// server on a small host) runs first; a plain busy loop measured the same here.
    /// Returns as [`Uffd::read_fault`] does, `ErrorKind::Interrupted` included, which it also
    /// returns when `stop` is set during the spin (a kick between two reads lands in no
    /// system call).
    pub fn poll_fault(
        &self,
        spin_until: Instant,
        stop: &std::sync::atomic::AtomicBool,
    ) -> io::Result<Option<Fault>> {
        loop {
            match self.read_fault() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            if stop.load(std::sync::atomic::Ordering::Acquire) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if Instant::now() < spin_until {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
                continue;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; -1 waits until the descriptor is readable or a
            // signal (the stop kick) interrupts.
            if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }

    /// Blocks until a page fault arrives. Returns `Ok(None)` for events that are not page
    /// faults and `Err` with `ErrorKind::Interrupted` when a signal interrupted the wait.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        let mut msg = UffdMsg::default();
        // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain-data struct
        // with the kernel's uffd_msg layout (checked above).
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&raw mut msg).cast(),
                size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != size_of::<UffdMsg>() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short uffd read",
            ));
        }
        if msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some(Fault {
            address: msg.address,
            flags: msg.flags,
            tid: msg.ptid,
        }))
    }

    /// Copies `len` bytes from `src` to the registered address `dst` and wakes the faulting
    /// threads. Retries on `EAGAIN` (the mapping was changing) from where the kernel stopped.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes; `dst..dst+len` must lie in a range
    /// registered with this descriptor, page aligned.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> io::Result<Installed> {
        // SAFETY: the caller's guarantees are this function's.
        unsafe { self.copy_mode(dst, src, len, 0) }
    }

    /// Like [`Uffd::copy`], but the pages are installed write-protected (in a range
    /// registered with [`Uffd::register_missing_and_wp`]): their first write faults.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn copy_protected(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
    ) -> io::Result<Installed> {
        // SAFETY: the caller's guarantees are this function's.
        unsafe { self.copy_mode(dst, src, len, UFFDIO_COPY_MODE_WP) }
    }

    /// Like [`Uffd::copy`], but wakes nobody (`UFFDIO_COPY_MODE_DONTWAKE`): the caller
    /// wakes the faulting threads with [`Uffd::wake`] when it is ready to.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn copy_without_waking(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
    ) -> io::Result<Installed> {
        // SAFETY: the caller's guarantees are this function's.
        unsafe { self.copy_mode(dst, src, len, UFFDIO_COPY_MODE_DONTWAKE) }
    }

    /// # Safety
    /// As for [`Uffd::copy`].
    unsafe fn copy_mode(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: u64,
    ) -> io::Result<Installed> {
        let mut done = 0u64;
        loop {
            let mut arg = UffdioCopy {
                dst: dst + done,
                src: src as u64 + done,
                len: len - done,
                mode,
                copy: 0,
            };
            match ioctl(self.fd.as_fd(), UFFDIO_COPY, &mut arg) {
                Ok(()) => return Ok(Installed::Done),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Someone else mapped (part of) the range; make sure nobody stays
                    // asleep on it.
                    self.wake(dst, len)?;
                    return Ok(Installed::AlreadyPresent);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if arg.copy > 0 {
                        done += arg.copy as u64;
                    }
                    if done >= len {
                        return Ok(Installed::Done);
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Maps zero pages over `[dst, dst + len)` and wakes the faulting threads.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<Installed> {
        loop {
            let mut arg = UffdioZeropage {
                range: UffdioRange { start: dst, len },
                mode: 0,
                zeropage: 0,
            };
            match ioctl(self.fd.as_fd(), UFFDIO_ZEROPAGE, &mut arg) {
                Ok(()) => return Ok(Installed::Done),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.wake(dst, len)?;
                    return Ok(Installed::AlreadyPresent);
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Wakes threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_fd(), UFFDIO_WAKE, &mut range)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Issues a userfaultfd ioctl whose argument is `*arg`.
fn ioctl<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the matching repr(C) struct, whose
    // size is encoded in the request number and checked at compile time above.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;

    /// A fresh anonymous mapping of `len` bytes (the tests unmap it at their end).
    fn anonymous(len: usize) -> *mut libc::c_void {
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        base
    }

    /// A real userfaultfd over a real anonymous mapping: a thread touching it blocks until
    /// we copy the page in.
    #[test]
    fn copy_resolves_a_fault_and_eexist_is_reported() {
        let len = 4 * 4096;
        let base = anonymous(len);
        let uffd = Uffd::new().unwrap();
        uffd.register_missing(base as u64, len as u64).unwrap();
        let addr = base as u64 + 4096;
        let reader = std::thread::spawn(move || {
            // SAFETY: the address is inside the live mapping; the read blocks until the
            // page is installed.
            unsafe { std::ptr::read_volatile((addr + 8) as *const u64) }
        });
        let fault = uffd.read_fault().unwrap().unwrap();
        assert_eq!(fault.address & !4095, addr);
        let page = [0x5au8; 4096];
        // SAFETY: `page` is 4096 readable bytes; `addr` is a registered, aligned page.
        let r = unsafe { uffd.copy(addr, page.as_ptr(), 4096) }.unwrap();
        assert_eq!(r, Installed::Done);
        assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        // SAFETY: as above.
        let again = unsafe { uffd.copy(addr, page.as_ptr(), 4096) }.unwrap();
        assert_eq!(again, Installed::AlreadyPresent);
        assert_eq!(
            uffd.zeropage(addr, 4096).unwrap(),
            Installed::AlreadyPresent
        );
        // SAFETY: unmapping the mapping created above; nothing references it any more.
        unsafe { libc::munmap(base, len) };
    }

    /// A polled descriptor hands over a fault that comes while it spins and one that comes
    /// after it went to sleep in `poll`; a page copied without waking leaves its reader
    /// asleep until the wake.
    #[test]
    fn poll_fault_spins_then_sleeps_and_a_dontwake_copy_waits_for_the_wake() {
        let len = 2 * 4096;
        let base = anonymous(len);
        let uffd = Uffd::new().unwrap();
        uffd.register_missing(base as u64, len as u64).unwrap();
        uffd.set_nonblocking().unwrap();
        let err = uffd.read_fault().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let touch = |addr: u64| {
            std::thread::spawn(move || {
                // SAFETY: inside the live mapping; blocks until the page is installed.
                unsafe { std::ptr::read_volatile(addr as *const u64) }
            })
        };
        let page = [0x33u8; 4096];
        for (i, spin) in [(0u64, Duration::from_secs(5)), (1, Duration::ZERO)] {
            let addr = base as u64 + i * 4096;
            let reader = touch(addr);
            let fault = uffd
                .poll_fault(Instant::now() + spin, &AtomicBool::new(false))
                .unwrap()
                .unwrap();
            assert_eq!(fault.address & !4095, addr);
            // SAFETY: `page` is 4096 readable bytes; `addr` is a registered, aligned page.
            let r = unsafe { uffd.copy_without_waking(addr, page.as_ptr(), 4096) }.unwrap();
            assert_eq!(r, Installed::Done);
            std::thread::sleep(Duration::from_millis(50));
            assert!(!reader.is_finished(), "the reader ran before the wake");
            uffd.wake(addr, 4096).unwrap();
            assert_eq!(reader.join().unwrap(), 0x3333_3333_3333_3333);
        }
        // SAFETY: unmapping the mapping created above; nothing references it any more.
        unsafe { libc::munmap(base, len) };
    }

    /// A stop during the spin ends it at once, as a kick ends the sleep.
    #[test]
    fn a_stop_ends_the_spin() {
        let uffd = Uffd::new().unwrap();
        uffd.set_nonblocking().unwrap();
        let stop = AtomicBool::new(true);
        let started = Instant::now();
        let r = uffd.poll_fault(started + Duration::from_secs(10), &stop);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Polling stops when faults do: a reader that spins for 20 ms and then meets no fault
    /// for 300 ms sleeps for most of them.
    #[test]
    fn poll_fault_sleeps_once_its_spin_is_over() {
        let len = 4096;
        let base = anonymous(len);
        let uffd = std::sync::Arc::new(Uffd::new().unwrap());
        uffd.register_missing(base as u64, len as u64).unwrap();
        uffd.set_nonblocking().unwrap();
        let poller = {
            let uffd = uffd.clone();
            std::thread::spawn(move || {
                let cpu = crate::stats::thread_cpu();
                let started = Instant::now();
                let fault =
                    uffd.poll_fault(started + Duration::from_millis(20), &AtomicBool::new(false));
                (fault, started.elapsed(), crate::stats::thread_cpu() - cpu)
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let addr = base as u64;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the live mapping; blocks until the page is installed.
            unsafe { std::ptr::read_volatile(addr as *const u64) }
        });
        let (fault, waited, cpu) = poller.join().unwrap();
        assert_eq!(fault.unwrap().unwrap().address & !4095, addr);
        assert!(
            waited >= Duration::from_millis(300),
            "returned after {waited:?}"
        );
        let cpu = Duration::from_nanos(cpu);
        assert!(
            cpu < Duration::from_millis(150),
            "the poller used {cpu:?} of CPU in {waited:?}: it did not sleep after its spin"
        );
        uffd.zeropage(addr, 4096).unwrap();
        assert_eq!(reader.join().unwrap(), 0);
        // SAFETY: unmapping the mapping created above; nothing references it any more.
        unsafe { libc::munmap(base, len) };
    }
}
