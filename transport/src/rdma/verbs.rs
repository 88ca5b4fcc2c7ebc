//! A small wrapper over the raw verbs (`ibverbs-sys`, the bindings of the `ibverbs` crate)
//! for one-sided page reads: open a device, register memory a peer may read, connect a
//! reliable-connected queue pair to a peer's [`RdmaEndpoint`], post the READs
//! [`super::plan::plan_reads`] planned and poll for their completion.
//!
//! Why raw bindings and not `ibverbs`' safe types: its released 0.9 has no RDMA READ, keeps
//! a region's local key and a queue pair's handle private, and registers only memory it
//! allocates itself, where a memory node must register its page store and a compute node
//! its fetch buffers. Each unsafe call below says what it relies on; the types own their
//! verbs objects and release them in reverse order of creation through lifetimes (a region
//! or queue pair cannot outlive its protection domain, nor that its device).
//!
//! Built with the cargo feature `rdma`; it links the system's libibverbs. Nothing here has
//! run on RDMA hardware: this project's hosts have none (docs/rdma.md).

use std::ffi::CStr;
use std::io;
use std::marker::PhantomData;
use std::ptr;
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use pagemesh_api::error_chain;
use pagemesh_api::rdma::{RdmaEndpoint, RdmaRegion};

pub use super::plan::MAX_OPS;
use super::plan::ReadOp;
use super::source::{BUFFER_LEN, OneSided, Readers};

/// The port every queue pair uses (the first; multi-port devices are not handled yet).
const PORT: u8 = 1;

/// The most RDMA READs a queue pair keeps outstanding (and serves at once), when the
/// device allows as many.
const RD_ATOMIC: u8 = 16;

/// Errors of the verbs.
#[derive(thiserror::Error, Debug)]
pub enum VerbsError {
    /// libibverbs lists no device (or the kernel has no RDMA support).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{call} failed")]
    Call {
        /// The verb.
        call: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// A READ completed with an error status.
    #[error("RDMA READ {wr_id} completed with status {status} (vendor error {vendor})")]
    Completion {
        /// The work request.
        wr_id: u64,
        /// `ibv_wc_status`.
        status: u32,
        /// The device's own code.
        vendor: u32,
    },
    /// More READs than one post carries ([`MAX_OPS`]).
    #[error("{0} READs in one post; at most {MAX_OPS}")]
    TooManyReads(usize),
    /// No completion came in time.
    #[error("RDMA READ {wr_id} did not complete within {0:?}", .timeout)]
    Timeout {
        /// The work request.
        wr_id: u64,
        /// How long it was given.
        timeout: Duration,
    },
}

fn call_failed(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

fn check(call: &'static str, errno: i32) -> Result<(), VerbsError> {
    match errno {
        0 => Ok(()),
        e => Err(VerbsError::Call {
            call,
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

/// An open RDMA device and what its first port says about itself.
pub struct Device {
    ctx: *mut ffi::ibv_context,
    port: ffi::ibv_port_attr,
    gid: [u8; 16],
    /// READs a queue pair may have outstanding, and serve, at once: [`RD_ATOMIC`] or the
    /// device's limit.
    rd_atomic: u8,
    name: String,
}

// SAFETY: a verbs context may be used from any thread (libibverbs serialises what needs it);
// `Device` hands out no interior pointers.
unsafe impl Send for Device {}
// SAFETY: as above: the verbs called through a shared `Device` are thread-safe.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device called `name`, or the first one.
    pub fn open(name: Option<&str>) -> Result<Device, VerbsError> {
        let mut n = 0i32;
        // SAFETY: writes the count to `n`; returns a list to free with
        // ibv_free_device_list, or null.
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(VerbsError::NoDevice(io::Error::last_os_error().to_string()));
        }
        let mut chosen: *mut ffi::ibv_device = ptr::null_mut();
        let mut chosen_name = String::new();
        let mut names = Vec::new();
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: a device of the list has a NUL-terminated name while the list lives.
            let dev_name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_null() && name.is_none_or(|want| want == dev_name) {
                chosen = dev;
                chosen_name.clone_from(&dev_name);
            }
            names.push(dev_name);
        }
        let ctx = match chosen.is_null() {
            true => ptr::null_mut(),
            // SAFETY: `chosen` is a device of the live list; the context it opens stays valid
            // after the list is freed.
            false => unsafe { ffi::ibv_open_device(chosen) },
        };
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        unsafe { ffi::ibv_free_device_list(list) };
        if chosen.is_null() {
            let why = match (name, names.is_empty()) {
                (_, true) => "libibverbs lists none".to_owned(),
                (Some(want), false) => format!("no {want} among {}", names.join(", ")),
                (None, false) => unreachable!("the first device is chosen"),
            };
            return Err(VerbsError::NoDevice(why));
        }
        if ctx.is_null() {
            return Err(call_failed("ibv_open_device"));
        }
        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: `ctx` is open; the port attributes are written to `port`, whose type the
        // binding's compat struct shares its layout with.
        let rc = unsafe {
            ffi::ibv_query_port(ctx, PORT, &mut port as *mut ffi::ibv_port_attr as *mut _)
        };
        let mut gid = ffi::ibv_gid::default();
        // SAFETY: as above; GID index 0 of the port is written to `gid`.
        let gid_rc = unsafe { ffi::ibv_query_gid(ctx, PORT, 0, &mut gid) };
        // SAFETY: a plain C struct of numbers and arrays: all zeros is a valid value.
        let mut attr: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; the device's attributes are written to `attr`.
        let attr_rc = unsafe { ffi::ibv_query_device(ctx, &mut attr) };
        let limit = attr.max_qp_rd_atom.min(attr.max_qp_init_rd_atom);
        let device = Device {
            ctx,
            port,
            // SAFETY: every bit pattern of the union is a valid byte array.
            gid: unsafe { gid.raw },
            rd_atomic: u8::try_from(limit.clamp(1, i32::from(RD_ATOMIC))).unwrap_or(1),
            name: chosen_name,
        };
        check("ibv_query_port", rc)?;
        check("ibv_query_gid", gid_rc)?;
        check("ibv_query_device", attr_rc)?;
        Ok(device)
    }

    /// The device's name (as `ibv_devices` lists it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Port 1's GID and LID: where peers reach this device.
    pub fn address(&self) -> ([u8; 16], u16) {
        (self.gid, self.port.lid)
    }

    /// A protection domain for regions and queue pairs that work together.
    pub fn protection_domain(&self) -> Result<ProtectionDomain<'_>, VerbsError> {
        // SAFETY: `self.ctx` is an open context.
        let pd = unsafe { ffi::ibv_alloc_pd(self.ctx) };
        if pd.is_null() {
            return Err(call_failed("ibv_alloc_pd"));
        }
        Ok(ProtectionDomain { pd, device: self })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once; everything made from it borrowed it and is
        // gone.
        unsafe { ffi::ibv_close_device(self.ctx) };
    }
}

/// A protection domain of a [`Device`].
pub struct ProtectionDomain<'d> {
    pd: *mut ffi::ibv_pd,
    device: &'d Device,
}

// SAFETY: registering memory and creating queue pairs in a protection domain are
// thread-safe verbs; the handle is only passed to them.
unsafe impl Send for ProtectionDomain<'_> {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain<'_> {}

impl ProtectionDomain<'_> {
    /// Registers `len` bytes at `addr`: readable by peers (`remote_read`: a memory node's
    /// page store) or written by this node's READs (a compute node's fetch buffer).
    ///
    /// # Safety
    /// `addr..addr + len` must stay mapped (and, with `remote_read`, hold nothing a peer
    /// must not read) for as long as the region lives.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        remote_read: bool,
    ) -> Result<Region<'_>, VerbsError> {
        let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_read {
            access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        }
        // SAFETY: `self.pd` is live; the caller keeps the memory mapped while registered.
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, addr.cast(), len, access.0 as i32) };
        if mr.is_null() {
            return Err(call_failed("ibv_reg_mr"));
        }
        Ok(Region {
            mr,
            _pd: PhantomData,
        })
    }

    /// A completion queue and a reliable-connected queue pair that reads (a post of at
    /// most [`MAX_OPS`] READs), not connected yet.
    pub fn reader(&self) -> Result<Reader<'_>, VerbsError> {
        self.queue_pair(false)
    }

    /// A queue pair that serves a peer's READs of this domain's regions readable by peers
    /// (a memory node's end), not connected yet.
    pub fn responder(&self) -> Result<Reader<'_>, VerbsError> {
        self.queue_pair(true)
    }

    fn queue_pair(&self, serves_reads: bool) -> Result<Reader<'_>, VerbsError> {
        let depth = MAX_OPS as i32;
        // SAFETY: the context is open; no completion channel, no context pointer.
        let cq = unsafe {
            ffi::ibv_create_cq(self.device.ctx, depth, ptr::null_mut(), ptr::null_mut(), 0)
        };
        if cq.is_null() {
            return Err(call_failed("ibv_create_cq"));
        }
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq,
            recv_cq: cq,
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: MAX_OPS as u32,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and the CQ are live; `init` is a valid init attribute.
        let qp = unsafe { ffi::ibv_create_qp(self.pd, &mut init) };
        if qp.is_null() {
            let e = call_failed("ibv_create_qp");
            // SAFETY: created above, used by nothing.
            unsafe { ffi::ibv_destroy_cq(cq) };
            return Err(e);
        }
        Ok(Reader {
            qp,
            cq,
            device: self.device,
            serves_reads,
            connected: false,
            wrs: Box::new([Default::default(); MAX_OPS]),
            sges: Box::new([ffi::ibv_sge::default(); MAX_OPS]),
            _pd: PhantomData,
        })
    }
}

impl Drop for ProtectionDomain<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated in `protection_domain`, freed once; its regions and queue
        // pairs borrowed it and are gone.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

/// Registered memory.
pub struct Region<'p> {
    mr: *mut ffi::ibv_mr,
    _pd: PhantomData<&'p ()>,
}

impl Region<'_> {
    /// What a peer needs to read it (its address, length and remote key).
    pub fn remote(&self) -> RdmaRegion {
        // SAFETY: `self.mr` is a live registration.
        let mr = unsafe { &*self.mr };
        RdmaRegion {
            addr: mr.addr as u64,
            len: mr.length as u64,
            rkey: mr.rkey,
        }
    }

    /// The local key, for READs into it.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `self.mr` is a live registration.
        unsafe { (*self.mr).lkey }
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once.
        unsafe { ffi::ibv_dereg_mr(self.mr) };
    }
}

/// A reliable-connected queue pair that reads from one peer (or, made by
/// [`ProtectionDomain::responder`], serves one peer's reads), with its completion queue.
pub struct Reader<'p> {
    qp: *mut ffi::ibv_qp,
    cq: *mut ffi::ibv_cq,
    device: &'p Device,
    serves_reads: bool,
    /// Moved past RESET: connecting again resets it first.
    connected: bool,
    /// A post's work requests and their scatter entries, filled per post (no per-read
    /// zeroing of 72 KiB on the stack).
    wrs: Box<[ffi::ibv_send_wr; MAX_OPS]>,
    sges: Box<[ffi::ibv_sge; MAX_OPS]>,
    _pd: PhantomData<&'p ()>,
}

// SAFETY: a queue pair and its completion queue may be used from any thread (the verbs
// are thread-safe); `Reader` is used by one thread at a time (`&mut self`).
unsafe impl Send for Reader<'_> {}

impl Reader<'_> {
    /// What the peer needs to connect to this queue pair (no regions: a reader exposes
    /// none), its first packet sequence number `psn`.
    pub fn endpoint(&self, psn: u32) -> RdmaEndpoint {
        let (gid, lid) = self.device.address();
        RdmaEndpoint {
            gid,
            lid,
            // SAFETY: `self.qp` is a live queue pair.
            qpn: unsafe { (*self.qp).qp_num },
            psn,
            regions: Vec::new(),
        }
    }

    /// Connects to `peer` (INIT, ready to receive, ready to send), sending from `psn`; a
    /// queue pair connected before is reset first.
    pub fn connect(&mut self, peer: &RdmaEndpoint, psn: u32) -> Result<(), VerbsError> {
        use ffi::ibv_qp_attr_mask as m;
        if self.connected {
            let mut attr = ffi::ibv_qp_attr {
                qp_state: ffi::ibv_qp_state::IBV_QPS_RESET,
                ..Default::default()
            };
            self.modify(&mut attr, m::IBV_QP_STATE, "ibv_modify_qp (RESET)")?;
            self.connected = false;
        }
        let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if self.serves_reads {
            access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        }
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: PORT,
            qp_access_flags: access.0,
            ..Default::default()
        };
        let mask = m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut attr, mask, "ibv_modify_qp (INIT)")?;
        self.connected = true;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: self.device.port.active_mtu,
            dest_qp_num: peer.qpn,
            rq_psn: peer.psn,
            max_dest_rd_atomic: self.device.rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                dlid: peer.lid,
                port_num: PORT,
                ..Default::default()
            },
            ..Default::default()
        };
        if peer.gid != [0; 16] {
            // Routed by GID (RoCE, or InfiniBand across subnets).
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ffi::ibv_gid { raw: peer.gid };
            attr.ah_attr.grh.hop_limit = 0xff;
            attr.ah_attr.grh.sgid_index = 0;
        }
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "ibv_modify_qp (RTR)")?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: self.device.rd_atomic,
            ..Default::default()
        };
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "ibv_modify_qp (RTS)")
    }

    fn modify(
        &mut self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        call: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: `self.qp` is live; `attr` is a valid attribute for the fields in `mask`.
        check(call, unsafe {
            ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32)
        })
    }

    /// Reads `pages` and then `tags` (planned over the peer's regions) into `local`, whose
    /// start is the run's buffer, and waits up to `timeout` for the last one: the reads go
    /// as one chain of work requests, only the last signalled (a queue pair completes its
    /// requests in order), the first tag READ fenced so that it starts only once every page
    /// READ before it is done (InfiniBand does not order READs otherwise).
    ///
    /// # Safety
    /// Every read's `local_offset + len` must lie inside `local`, which must stay untouched
    /// by anyone else until this returns and, if it fails, until the queue pair is reset
    /// (connected again: a READ may still land after a timeout); the queue pair must be
    /// connected to the peer the reads were planned for.
    pub unsafe fn read(
        &mut self,
        pages: &[ReadOp],
        tags: &[ReadOp],
        local: &Region<'_>,
        wr_id: u64,
        timeout: Duration,
    ) -> Result<(), VerbsError> {
        let n = pages.len() + tags.len();
        if n > MAX_OPS {
            return Err(VerbsError::TooManyReads(n));
        }
        let Some(last) = n.checked_sub(1) else {
            return Ok(());
        };
        let base = local.remote().addr;
        let lkey = local.lkey();
        let wr_base = self.wrs.as_mut_ptr();
        let sge_base = self.sges.as_mut_ptr();
        for (i, r) in pages.iter().chain(tags).enumerate() {
            self.sges[i] = ffi::ibv_sge {
                addr: base + r.local_offset as u64,
                length: r.len,
                lkey,
            };
            let wr = &mut self.wrs[i];
            wr.wr_id = wr_id;
            // SAFETY: `i < n <= MAX_OPS`, inside `sges`, a heap array the queue pair owns,
            // which outlives the post.
            wr.sg_list = unsafe { sge_base.add(i) };
            wr.num_sge = 1;
            wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_READ;
            let mut flags = 0;
            if i == last {
                flags |= ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if i == pages.len() {
                flags |= ffi::ibv_send_flags::IBV_SEND_FENCE.0;
            }
            wr.send_flags = flags;
            wr.wr.rdma.remote_addr = r.remote_addr;
            wr.wr.rdma.rkey = r.rkey;
            wr.next = match i == last {
                true => ptr::null_mut(),
                // SAFETY: `i + 1 <= last < MAX_OPS`, inside `wrs`.
                false => unsafe { wr_base.add(i + 1) },
            };
        }
        let mut bad = ptr::null_mut();
        // SAFETY: `self.qp` is live and its context's ops table is libibverbs' own; the chain
        // of `n` requests points into `wrs` and `sges`, which outlive the post.
        let errno = unsafe {
            let ops = &mut (*(*self.qp).context).ops;
            let post = ops.post_send.expect("libibverbs fills in post_send");
            post(self.qp, wr_base, &mut bad)
        };
        check("ibv_post_send", errno)?;
        self.wait(wr_id, timeout)
    }

    /// Polls the completion queue until `wr_id` completes or `timeout` passes.
    fn wait(&mut self, wr_id: u64, timeout: Duration) -> Result<(), VerbsError> {
        let start = Instant::now();
        let mut wc = [ffi::ibv_wc::default(); 4];
        loop {
            // SAFETY: `self.cq` is live; at most `wc.len()` completions are written to `wc`.
            let n = unsafe {
                let ops = &mut (*(*self.cq).context).ops;
                let poll = ops.poll_cq.expect("libibverbs fills in poll_cq");
                poll(self.cq, wc.len() as i32, wc.as_mut_ptr())
            };
            if n < 0 {
                return Err(VerbsError::Call {
                    call: "ibv_poll_cq",
                    source: io::Error::other("polling the completion queue failed"),
                });
            }
            for c in &wc[..n as usize] {
                // Completions of earlier posts (flushed after an error, or come after their
                // timeout) are drained and ignored: every request of a post carries its id.
                if c.wr_id() != wr_id {
                    continue;
                }
                if let Some((status, vendor)) = c.error() {
                    return Err(VerbsError::Completion {
                        wr_id,
                        status,
                        vendor,
                    });
                }
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(VerbsError::Timeout { wr_id, timeout });
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `reader`, destroyed once, the queue pair before its completion
        // queue.
        unsafe {
            ffi::ibv_destroy_qp(self.qp);
            ffi::ibv_destroy_cq(self.cq);
        }
    }
}

/// A queue pair end that reads into a registered buffer of its own: what the RDMA page
/// source reads through ([`OneSided`]).
pub struct VerbsReader {
    // Dropped in this order: the queue pair, the registration, then the memory.
    reader: Reader<'static>,
    region: Region<'static>,
    memory: Box<[u8]>,
    psn: u32,
    next_wr: u64,
    /// A READ failed: the device may still write `memory` until the queue pair is reset.
    failed: bool,
}

// SAFETY: `Region` is a registration handle, used only through `&self` for its keys; the
// queue pair is `Send`; the memory is owned.
unsafe impl Send for VerbsReader {}

impl OneSided for VerbsReader {
    fn end(&self) -> pagemesh_protocol::QueuePair {
        queue_pair_of(&self.reader.endpoint(self.psn))
    }

    fn connect(&mut self, peer: &pagemesh_protocol::QueuePair) -> Result<(), String> {
        if peer.gid == super::emulated::EMULATED_GID {
            return Err("the memory node only emulates RDMA (--transport rdma-emulated)".into());
        }
        let peer = endpoint_of(peer);
        self.reader
            .connect(&peer, self.psn)
            .map_err(|e| error_chain(&e))?;
        self.failed = false;
        Ok(())
    }

    fn read(&mut self, pages: &[ReadOp], tags: &[ReadOp], timeout: Duration) -> Result<(), String> {
        if self.failed {
            return Err("a READ failed on this queue pair; it reads again once reconnected".into());
        }
        let overrun = pages
            .iter()
            .chain(tags)
            .find(|r| r.local_offset + r.len as usize > BUFFER_LEN);
        if let Some(r) = overrun {
            return Err(format!(
                "a READ of {} bytes at {} overruns the buffer",
                r.len, r.local_offset
            ));
        }
        self.next_wr = self.next_wr.wrapping_add(1);
        // SAFETY: every read lies inside `memory` (checked above), which `region` registers
        // and nothing else touches while this runs (`&mut self`) nor, after a failure,
        // until `connect` resets the queue pair (`failed`); the queue pair was connected (by
        // `connect`) to the memory node whose regions the reads were planned over.
        let read = unsafe {
            self.reader
                .read(pages, tags, &self.region, self.next_wr, timeout)
                .map_err(|e| error_chain(&e))
        };
        self.failed = read.is_err();
        read
    }

    fn buffer(&self) -> &[u8] {
        &self.memory
    }
}

/// Makes [`VerbsReader`]s in one protection domain, for every peer connection of a node.
pub struct VerbsReaders {
    pd: &'static ProtectionDomain<'static>,
}

impl VerbsReaders {
    /// Readers in `pd` (a node's, kept for the life of the process).
    pub fn new(pd: &'static ProtectionDomain<'static>) -> Self {
        VerbsReaders { pd }
    }
}

impl Readers for VerbsReaders {
    fn reader(&self) -> Result<Box<dyn OneSided>, String> {
        let reader = self.pd.reader().map_err(|e| error_chain(&e))?;
        let mut memory = vec![0u8; BUFFER_LEN].into_boxed_slice();
        // SAFETY: `memory` is moved into the reader below with the region, and dropped
        // after it (field order); a heap block does not move when its box does. Peers
        // cannot read it (local write only).
        let region = unsafe { self.pd.register(memory.as_mut_ptr(), memory.len(), false) }
            .map_err(|e| error_chain(&e))?;
        // A first sequence number that differs from one queue pair to the next.
        let psn = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos())
            & pagemesh_api::rdma::MAX_24BIT;
        Ok(Box::new(VerbsReader {
            reader,
            region,
            memory,
            psn,
            next_wr: 0,
            failed: false,
        }))
    }
}

/// The queue pair part of an endpoint.
pub fn queue_pair_of(e: &RdmaEndpoint) -> pagemesh_protocol::QueuePair {
    pagemesh_protocol::QueuePair {
        gid: e.gid,
        lid: e.lid,
        qpn: e.qpn,
        psn: e.psn,
    }
}

/// An endpoint of a queue pair alone (no regions).
pub fn endpoint_of(qp: &pagemesh_protocol::QueuePair) -> RdmaEndpoint {
    RdmaEndpoint {
        gid: qp.gid,
        lid: qp.lid,
        qpn: qp.qpn,
        psn: qp.psn,
        regions: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the real libibverbs: on a host without an RDMA device (this project's), opening
    /// one is a clear error, not a crash; on a host with one, the device opens and a reader's
    /// endpoint is one a peer can use.
    #[test]
    fn opening_a_device_says_why_there_is_none_or_gives_a_usable_endpoint() {
        match Device::open(None) {
            Err(VerbsError::NoDevice(why)) => {
                assert!(
                    crate::rdma::devices().is_empty(),
                    "libibverbs lists no device ({why}) where the kernel lists some"
                );
            }
            Err(e) => panic!("opening the first RDMA device failed: {e}"),
            Ok(device) => {
                let pd = device.protection_domain().unwrap();
                let reader = pd.reader().unwrap();
                let endpoint = reader.endpoint(0x1234);
                assert_eq!(endpoint.check(), Ok(()));
            }
        }
        let e = Device::open(Some("no-such-device"))
            .err()
            .expect("no such device");
        assert!(matches!(e, VerbsError::NoDevice(_)), "{e}");
    }
}
