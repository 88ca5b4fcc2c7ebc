//! One-sided reads without an RDMA device, for testing the RDMA data path end to end on a
//! host that has none (`--transport rdma-emulated`, hidden): the "queue pair" reads the
//! memory node's registered memory with `process_vm_readv(2)`, a read of another process's
//! memory the other process takes no part in, as a NIC's READ would be.
//!
//! It works only between processes of one host, and only where this process may read the
//! other's memory (the same user, or root, as ptrace allows). It checks no remote key: what
//! stops a stranger here is the page protocol's authentication, which RdmaConnect needs, and
//! the kernel's ptrace rules. It is a test transport, never one for production.
//!
//! The memory node's end of an emulated queue pair is [`EMULATED_GID`] with its process id
//! as the queue pair number (process ids fit 24 bits: Linux's `pid_max` is at most 2^22).

use std::io;
use std::time::Duration;

use pagemesh_protocol::QueuePair;

use super::plan::{MAX_OPS, ReadOp};
use super::source::{BUFFER_LEN, OneSided, Readers};

/// The GID of an emulated queue pair's end: no device has it.
pub const EMULATED_GID: [u8; 16] = *b"pagemesh-emulate";

/// The memory node's end of an emulated queue pair: its process.
pub fn responder_end() -> QueuePair {
    QueuePair {
        gid: EMULATED_GID,
        lid: 0,
        qpn: std::process::id(),
        psn: 0,
    }
}

/// Reads another process's memory into a buffer of its own.
pub struct ProcessReader {
    /// The memory node's process, once connected.
    pid: Option<libc::pid_t>,
    buffer: Box<[u8]>,
    local: Box<[libc::iovec; MAX_OPS]>,
    remote: Box<[libc::iovec; MAX_OPS]>,
}

// SAFETY: the iovecs are scratch space filled and used within one `read` call, pointing
// into `buffer` (owned) and the peer's address space; nothing is shared.
unsafe impl Send for ProcessReader {}

impl ProcessReader {
    /// An unconnected reader.
    pub fn new() -> Self {
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        ProcessReader {
            pid: None,
            buffer: vec![0u8; BUFFER_LEN].into_boxed_slice(),
            local: Box::new([empty; MAX_OPS]),
            remote: Box::new([empty; MAX_OPS]),
        }
    }
}

impl Default for ProcessReader {
    fn default() -> Self {
        Self::new()
    }
}

impl OneSided for ProcessReader {
    fn end(&self) -> QueuePair {
        QueuePair {
            gid: EMULATED_GID,
            lid: 0,
            qpn: std::process::id(),
            psn: 0,
        }
    }

    fn connect(&mut self, peer: &QueuePair) -> Result<(), String> {
        if peer.gid != EMULATED_GID {
            return Err(
                "the memory node has a real RDMA device; this node only emulates one \
                        (--transport rdma-emulated)"
                    .into(),
            );
        }
        self.pid = Some(peer.qpn as libc::pid_t);
        Ok(())
    }

    fn read(&mut self, pages: &[ReadOp], tags: &[ReadOp], _: Duration) -> Result<(), String> {
        let pid = self.pid.ok_or("the queue pair is not connected")?;
        let n = pages.len() + tags.len();
        if n > MAX_OPS {
            return Err(format!("{n} READs in one post; at most {MAX_OPS}"));
        }
        // One pointer into the buffer for every entry (the kernel copies the iovecs in
        // order, so the tags are read after the pages).
        let base: *mut u8 = self.buffer.as_mut_ptr();
        let mut total = 0;
        for (i, r) in pages.iter().chain(tags).enumerate() {
            let len = r.len as usize;
            if r.local_offset
                .checked_add(len)
                .is_none_or(|end| end > BUFFER_LEN)
            {
                return Err(format!(
                    "a READ of {len} bytes at {} overruns the buffer",
                    r.local_offset
                ));
            }
            self.local[i] = libc::iovec {
                // SAFETY: `local_offset + len <= BUFFER_LEN` (checked above): inside the buffer.
                iov_base: unsafe { base.add(r.local_offset) }.cast(),
                iov_len: len,
            };
            self.remote[i] = libc::iovec {
                iov_base: r.remote_addr as *mut libc::c_void,
                iov_len: len,
            };
            total += len;
        }
        let n = n as libc::c_ulong;
        // SAFETY: the local iovecs point into `self.buffer`, inside it (checked above), and
        // nothing else touches it during the call; the remote ones name the peer's memory,
        // which the kernel checks (a bad address is EFAULT, not a fault here). The iovec
        // arrays hold `n` entries filled above.
        let got = unsafe {
            libc::process_vm_readv(pid, self.local.as_ptr(), n, self.remote.as_ptr(), n, 0)
        };
        match got {
            -1 => Err(format!(
                "reading process {pid}'s memory failed: {}",
                io::Error::last_os_error()
            )),
            n if n as usize != total => Err(format!(
                "read {n} of {total} bytes of process {pid}'s memory (a region ended?)"
            )),
            _ => Ok(()),
        }
    }

    fn buffer(&self) -> &[u8] {
        &self.buffer
    }
}

/// Makes [`ProcessReader`]s.
#[derive(Default)]
pub struct ProcessReaders;

impl Readers for ProcessReaders {
    fn reader(&self) -> Result<Box<dyn OneSided>, String> {
        Ok(Box::new(ProcessReader::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read of this very process through the kernel lands in the buffer; an address
    /// nothing is mapped at is an error, not a crash; an unconnected reader reads nothing.
    #[test]
    fn reads_land_in_the_buffer_and_bad_addresses_are_errors() {
        let mut reader = ProcessReader::new();
        assert!(reader.read(&[], &[], Duration::ZERO).is_err());
        assert!(
            reader.connect(&QueuePair::default()).is_err(),
            "a real device's end"
        );
        reader.connect(&responder_end()).unwrap();
        let source: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let op = |local_offset, addr: u64, len| ReadOp {
            local_offset,
            remote_addr: addr,
            rkey: 0,
            len,
            tag_addr: 0,
        };
        let base = source.as_ptr() as u64;
        reader
            .read(
                &[op(4096, base + 4096, 4096)],
                &[op(0, base, 16)],
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(&reader.buffer()[4096..8192], &source[4096..]);
        assert_eq!(&reader.buffer()[..16], &source[..16]);
        let e = reader
            .read(&[op(0, 8, 4096)], &[], Duration::ZERO)
            .unwrap_err();
        assert!(e.contains("Bad address"), "{e}");
        let e = reader
            .read(&[], &[op(BUFFER_LEN - 8, base, 16)], Duration::ZERO)
            .unwrap_err();
        assert!(e.contains("overruns the buffer"), "{e}");
    }
}
