//! [`RdmaSource`]: a [`PageSource`] that reads a memory node's pages with one-sided RDMA
//! READ and keeps everything else on the page protocol's TCP connection.
//!
//! - **Where a page is**: a slot map per VM, asked for with the Slots op a window of
//!   [`WINDOW_PAGES`] at a time (once per window and peer, the first time a fault needs it)
//!   and shared by every source of this node that reads from the same peer ([`SlotMaps`]):
//!   the write-back thread's source refreshes it for the pages it writes back, and the fault
//!   handlers' sources forget the pages they claim.
//! - **A fetch**: the run's slots become READs of the pages and then of their tags
//!   ([`super::plan`]), posted as one chain on the queue pair ([`OneSided`]). Only if every
//!   tag is the one of its page does the run count as read; a stale map (a tag that does not
//!   match), a page not mapped, a broken queue pair all fall back to the TCP Fetch, which is
//!   always right. A page is never taken from a slot without its tag.
//! - **Claims**: a fetched run must be claimed (the memory node frees it once the claim is
//!   acknowledged, as for a TCP Fetch). Claims wait in a fixed array and go as one batch of
//!   Claim requests when it fills ([`MAX_PENDING_CLAIMS`] runs), before any write-back, at
//!   [`PageSource::acknowledge`] and before a fetch of another VM. Until then the memory node
//!   still holds the pages: a crash loses nothing.
//! - **Write-back, control, reconnection** stay on TCP. After a reconnection the queue pair
//!   is connected again, since the memory node's end lives as long as the TCP connection.
//!
//! The fetch path allocates nothing once its window is mapped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use pagemesh_api::rdma::{RdmaEndpoint, TAG_BYTES, slot_tag};
use pagemesh_api::{NodeId, PAGE_SIZE, VmId};
use pagemesh_protocol::{MAX_RUN_BYTES, MAX_RUN_PAGES, NO_SLOT, QueuePair};

use super::plan::{MAX_READS, ReadOp, SlotLayout, plan_reads};
use crate::tcp::TcpPeer;
use crate::{PageSource, TransportError};

/// Pages of one slot-map window (256 MiB of guest memory; a 256 KiB Slots reply).
pub const WINDOW_PAGES: u64 = 65536;

/// Claimed runs kept before they are sent (one batch of Claim requests).
pub const MAX_PENDING_CLAIMS: usize = crate::tcp::MAX_BATCH;

/// Where READs put the tags of a run's pages in the local buffer: after the pages.
pub const TAGS_OFFSET: usize = MAX_RUN_BYTES;

/// Bytes of the local buffer a [`OneSided`] reads into: a run's pages, then their tags.
pub const BUFFER_LEN: usize = MAX_RUN_BYTES + MAX_RUN_PAGES as usize * TAG_BYTES as usize;

/// One end of a queue pair that reads a peer's memory into a local buffer of
/// [`BUFFER_LEN`] bytes it owns (registered with the device): what [`RdmaSource`] needs of
/// the verbs (`super::verbs`, feature `rdma`).
pub trait OneSided: Send {
    /// This end, for the peer to connect to.
    fn end(&self) -> QueuePair;

    /// Connects (again, after a reset, if it was) to the peer's end `peer`.
    fn connect(&mut self, peer: &QueuePair) -> Result<(), String>;

    /// Posts the READs of `pages` and then of their `tags` (their `local_offset`s inside
    /// the buffer), the tag READs starting only once the page READs are done, and waits up
    /// to `timeout` for them all.
    fn read(&mut self, pages: &[ReadOp], tags: &[ReadOp], timeout: Duration) -> Result<(), String>;

    /// The local buffer the reads land in.
    fn buffer(&self) -> &[u8];
}

/// Makes the local end of one queue pair per peer connection (the node's RDMA device).
pub trait Readers: Send + Sync {
    /// A new, unconnected end.
    fn reader(&self) -> Result<Box<dyn OneSided>, String>;
}

/// One window of a slot map: a slot per page, [`NO_SLOT`] for a page not known to be held.
type Window = Arc<[AtomicU32]>;

/// The slot maps of this node's RDMA sources, shared between them: one per peer, VM and
/// window; and what those sources did, counted together.
#[derive(Clone, Default)]
pub struct SlotMaps {
    maps: Arc<Mutex<Maps>>,
    stats: Arc<RdmaStats>,
}

/// Windows by peer, VM and window number.
type Maps = HashMap<(NodeId, VmId, u64), Window>;

impl SlotMaps {
    /// The window, asking `tcp` for it if no source has yet.
    fn window(&self, tcp: &mut TcpPeer, vm: VmId, index: u64) -> Result<Window, TransportError> {
        let key = (tcp.peer(), vm, index);
        if let Some(w) = self.lock().get(&key) {
            return Ok(Arc::clone(w));
        }
        let slots = tcp.slots(vm, index * WINDOW_PAGES, WINDOW_PAGES)?;
        let window: Window = slots.into_iter().map(AtomicU32::new).collect();
        // Another source may have asked meanwhile: the first one in wins, both are fresh.
        Ok(Arc::clone(self.lock().entry(key).or_insert(window)))
    }

    /// The window if it is mapped.
    fn mapped(&self, peer: NodeId, vm: VmId, index: u64) -> Option<Window> {
        self.lock().get(&(peer, vm, index)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the sources sharing these maps did, together.
    pub fn stats(&self) -> &RdmaStats {
        &self.stats
    }
}

/// What RDMA sources did ([`SlotMaps::stats`]), for the run summary and tests.
#[derive(Debug, Default)]
pub struct RdmaStats {
    /// Pages read with RDMA READ and used.
    pub rdma_pages: AtomicU64,
    /// Pages fetched or read over TCP instead (not mapped, stale, or RDMA broken).
    pub tcp_pages: AtomicU64,
    /// Runs whose tags did not match the map (the map was stale).
    pub stale_runs: AtomicU64,
    /// Pages claimed with Claim requests.
    pub claimed_pages: AtomicU64,
}

/// A page source over one-sided RDMA READ, with its TCP connection for the rest (see the
/// module docs).
pub struct RdmaSource {
    tcp: TcpPeer,
    reader: Box<dyn OneSided>,
    layout: SlotLayout,
    maps: SlotMaps,
    /// Windows this source has used, so that a fault takes no lock.
    windows: HashMap<(VmId, u64), Window>,
    timeout: Duration,
    /// Why RDMA stopped working, if it did: everything goes over TCP until a reconnection.
    broken: Option<String>,
    tags: Box<[ReadOp; MAX_READS]>,
    planned: Box<[ReadOp; MAX_READS]>,
    run_slots: Box<[u32; MAX_READS]>,
    claims: [(u64, u32); MAX_PENDING_CLAIMS],
    pending: usize,
    claims_vm: VmId,
}

impl RdmaSource {
    /// A source reading `endpoint`'s regions through `reader`, connected to the memory
    /// node's end of a queue pair made over `tcp` (RdmaConnect). Fails if the peer has no
    /// RDMA, its endpoint is unusable or the queue pair cannot connect: the caller then
    /// goes on with `tcp` alone, which is handed back with why (boxed: a connection is
    /// large).
    pub fn connect(
        mut tcp: TcpPeer,
        mut reader: Box<dyn OneSided>,
        endpoint: &RdmaEndpoint,
        maps: SlotMaps,
        timeout: Duration,
    ) -> Result<RdmaSource, Box<(TcpPeer, String)>> {
        let layout = match SlotLayout::new(endpoint) {
            Ok(l) => l,
            Err(e) => {
                return Err(Box::new((
                    tcp,
                    format!("its RDMA endpoint is unusable: {e}"),
                )));
            }
        };
        if let Err(why) = connect_queue_pair(&mut tcp, &mut *reader) {
            return Err(Box::new((tcp, why)));
        }
        Ok(RdmaSource {
            tcp,
            reader,
            layout,
            maps,
            windows: HashMap::new(),
            timeout,
            broken: None,
            tags: Box::new([ReadOp::default(); MAX_READS]),
            planned: Box::new([ReadOp::default(); MAX_READS]),
            run_slots: Box::new([NO_SLOT; MAX_READS]),
            claims: [(0, 0); MAX_PENDING_CLAIMS],
            pending: 0,
            claims_vm: 0,
        })
    }

    /// What this source, and every other sharing its slot maps, did so far.
    pub fn stats(&self) -> Arc<RdmaStats> {
        Arc::clone(&self.maps.stats)
    }

    /// Why RDMA is not used any more, if it is not.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Reads the run of `dst.len() / 4096` pages of `vm` from `first` with RDMA into `dst`;
    /// `Ok(false)` when it could not be read that way (then `dst` is untouched).
    fn read_one_sided(
        &mut self,
        vm: VmId,
        first: u64,
        dst: &mut [u8],
    ) -> Result<bool, TransportError> {
        if self.broken.is_some() {
            return Ok(false);
        }
        let count = crate::tcp::run_pages(dst.len())? as usize;
        // The run's slots, from its window(s).
        let mut window: Option<(u64, Window)> = None;
        for i in 0..count {
            let page = first + i as u64;
            let index = page / WINDOW_PAGES;
            if window.as_ref().is_none_or(|(at, _)| *at != index) {
                window = Some((index, self.window(vm, index)?));
            }
            let (_, w) = window.as_ref().expect("set above");
            let slot = w[(page % WINDOW_PAGES) as usize].load(Ordering::Relaxed);
            if slot == NO_SLOT {
                return Ok(false);
            }
            self.run_slots[i] = slot;
        }
        let Ok(data) = plan_reads(&self.layout, &self.run_slots[..count], &mut self.planned) else {
            // A slot past the regions: the map and the registration disagree.
            return Ok(false);
        };
        let n = data.len();
        for i in 0..n {
            self.tags[i] = self.planned[i].tags(TAGS_OFFSET);
        }
        let read = self
            .reader
            .read(&self.planned[..n], &self.tags[..n], self.timeout);
        if let Err(why) = read {
            // Once more on a queue pair made anew over the TCP connection (the memory node's
            // end dies with a connection it closed), then TCP until a reconnection.
            let again = connect_queue_pair(&mut self.tcp, &mut *self.reader).and_then(|()| {
                self.reader
                    .read(&self.planned[..n], &self.tags[..n], self.timeout)
            });
            if let Err(again) = again {
                tracing::warn!(
                    node = self.tcp.peer(),
                    "RDMA READ from node {} failed ({why}; again on a new queue pair: \
                     {again}): its pages come over TCP until the connection is made anew",
                    self.tcp.peer()
                );
                self.broken = Some(why);
                return Ok(false);
            }
        }
        let buf = self.reader.buffer();
        let tags = &buf[TAGS_OFFSET..TAGS_OFFSET + count * TAG_BYTES as usize];
        let fresh = (first..)
            .zip(tags.chunks_exact(TAG_BYTES as usize))
            .all(|(page, tag)| {
                u64::from_le_bytes(tag.try_into().expect("8 bytes")) == slot_tag(vm, page)
            });
        if !fresh {
            self.maps.stats.stale_runs.fetch_add(1, Ordering::Relaxed);
            self.forget(vm, first, count as u64);
            return Ok(false);
        }
        dst.copy_from_slice(&buf[..dst.len()]);
        self.maps
            .stats
            .rdma_pages
            .fetch_add(count as u64, Ordering::Relaxed);
        Ok(true)
    }

    /// The window `index` of `vm`'s map, from this source's cache or the shared maps.
    fn window(&mut self, vm: VmId, index: u64) -> Result<Window, TransportError> {
        if let Some(w) = self.windows.get(&(vm, index)) {
            return Ok(Arc::clone(w));
        }
        let w = self.maps.window(&mut self.tcp, vm, index)?;
        self.windows.insert((vm, index), Arc::clone(&w));
        Ok(w)
    }

    /// Marks pages as not known to be held (claimed, or found stale), in the windows this
    /// source has used (no lock: this is on the fault path; another source's stale entry
    /// fails its tag check).
    fn forget(&mut self, vm: VmId, first: u64, count: u64) {
        self.set_slots(vm, first, count, false, |_| NO_SLOT);
    }

    /// Sets the mapped slots of `count` pages of `vm` from `first` to `slot(i)`, in
    /// windows this source used or, with `shared`, any source of the node mapped.
    fn set_slots(
        &mut self,
        vm: VmId,
        first: u64,
        count: u64,
        shared: bool,
        slot: impl Fn(usize) -> u32,
    ) {
        let peer = self.tcp.peer();
        let mut window: Option<(u64, Option<Window>)> = None;
        for i in 0..count {
            let page = first + i;
            let index = page / WINDOW_PAGES;
            if window.as_ref().is_none_or(|(at, _)| *at != index) {
                let w = match self.windows.get(&(vm, index)) {
                    Some(w) => Some(Arc::clone(w)),
                    None if shared => self.maps.mapped(peer, vm, index),
                    None => None,
                };
                window = Some((index, w));
            }
            if let Some((_, Some(w))) = &window {
                w[(page % WINDOW_PAGES) as usize].store(slot(i as usize), Ordering::Relaxed);
            }
        }
    }

    /// Queues the claim of a run read with RDMA; sends the queue when it is full or was
    /// for another VM.
    fn claim(&mut self, vm: VmId, first: u64, count: u32) -> Result<(), TransportError> {
        // A queue still full (its sending failed) or of another VM goes first.
        if self.pending == MAX_PENDING_CLAIMS || (self.pending > 0 && self.claims_vm != vm) {
            self.send_claims()?;
        }
        self.claims_vm = vm;
        match self.pending.checked_sub(1).map(|i| &mut self.claims[i]) {
            Some((at, n)) if *at + u64::from(*n) == first && *n + count <= MAX_RUN_PAGES => {
                *n += count;
            }
            _ => {
                self.claims[self.pending] = (first, count);
                self.pending += 1;
            }
        }
        if self.pending == MAX_PENDING_CLAIMS {
            self.send_claims()?;
        }
        Ok(())
    }

    /// Sends the queued claims. A refused one (the memory node no longer holds a page:
    /// something else freed it) is logged and dropped: the pages read were checked by their
    /// tags, so nothing is lost here. A failure of the connection keeps them queued.
    fn send_claims(&mut self) -> Result<(), TransportError> {
        if self.pending == 0 {
            return Ok(());
        }
        let n = self.pending;
        match self.tcp.claim_runs(self.claims_vm, &self.claims[..n]) {
            Ok(()) => {}
            Err(e @ TransportError::Remote { .. }) => {
                tracing::warn!(
                    node = self.tcp.peer(),
                    vm = self.claims_vm,
                    "a claim of pages read with RDMA was refused: {e}"
                );
            }
            Err(e) => return Err(e),
        }
        let pages: u64 = self.claims[..n].iter().map(|&(_, c)| u64::from(c)).sum();
        self.maps
            .stats
            .claimed_pages
            .fetch_add(pages, Ordering::Relaxed);
        self.pending = 0;
        Ok(())
    }

    /// Maps the slots the memory node gave the pages of `runs`, just written back, with
    /// one Slots request over their span (or one per run, for runs far apart). If it fails
    /// the pages are forgotten instead: they come over TCP until mapped again.
    fn refresh(&mut self, vm: VmId, runs: &[(u64, &[u8])]) {
        let end = |&(first, pages): &(u64, &[u8])| first + (pages.len() / PAGE_SIZE) as u64;
        let (Some(lo), Some(hi)) = (runs.iter().map(|r| r.0).min(), runs.iter().map(end).max())
        else {
            return;
        };
        let spans: Vec<(u64, u64)> = match hi - lo <= u64::from(pagemesh_protocol::MAX_SLOTS) {
            true => vec![(lo, hi - lo)],
            false => runs.iter().map(|r| (r.0, end(r) - r.0)).collect(),
        };
        for (first, count) in spans {
            match self.tcp.slots(vm, first, count) {
                Ok(slots) => self.set_slots(vm, first, count, true, |i| slots[i]),
                Err(e) => {
                    tracing::debug!(
                        node = self.tcp.peer(),
                        vm,
                        "cannot map the slots of pages written back ({e}): they come over TCP"
                    );
                    self.set_slots(vm, first, count, true, |_| NO_SLOT);
                }
            }
        }
    }
}

/// Connects `reader` to a queue pair the peer makes for it over `tcp`.
fn connect_queue_pair(tcp: &mut TcpPeer, reader: &mut dyn OneSided) -> Result<(), String> {
    let theirs = tcp
        .rdma_connect(&reader.end())
        .map_err(|e| format!("it made no queue pair for this node: {e}"))?;
    reader
        .connect(&theirs)
        .map_err(|e| format!("the queue pair does not connect: {e}"))
}

impl PageSource for RdmaSource {
    fn peer(&self) -> NodeId {
        self.tcp.peer()
    }

    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        let one_sided = self.read_one_sided(vm, page, dst)?;
        if !one_sided {
            self.tcp.fetch(vm, page, dst)?;
        }
        // Claimed (or about to be): its slots are no longer its.
        let count = (dst.len() / PAGE_SIZE) as u64;
        self.forget(vm, page, count);
        match one_sided {
            true => self.claim(vm, page, count as u32),
            false => {
                self.maps
                    .stats
                    .tcp_pages
                    .fetch_add(count, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        if self.read_one_sided(vm, page, dst)? {
            return Ok(());
        }
        self.tcp.read(vm, page, dst)?;
        let count = (dst.len() / PAGE_SIZE) as u64;
        self.maps
            .stats
            .tcp_pages
            .fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError> {
        self.write_back_runs(vm, &[(page, src)])
    }

    fn write_back_runs(&mut self, vm: VmId, runs: &[(u64, &[u8])]) -> Result<(), TransportError> {
        // Claims first: a claim sent after a write-back of the same page would free it.
        self.send_claims()?;
        let written = self.tcp.write_back_runs(vm, runs);
        // Where the pages now are, for this node's readers (refused runs too: some may
        // have been stored). Not on the fault path.
        if !matches!(&written, Err(e) if !matches!(e, TransportError::Remote { .. })) {
            self.refresh(vm, runs);
        }
        written
    }

    fn acknowledge(&mut self) -> Result<(), TransportError> {
        self.send_claims()?;
        self.tcp.acknowledge()
    }

    fn reconnect(&mut self) -> Result<(), TransportError> {
        self.tcp.reconnect()?;
        // The memory node's end of the queue pair went with the old connection.
        match connect_queue_pair(&mut self.tcp, &mut *self.reader) {
            Ok(()) => self.broken = None,
            Err(why) => {
                tracing::warn!(
                    node = self.tcp.peer(),
                    "RDMA with node {} did not come back after a reconnection ({why}): its \
                     pages come over TCP",
                    self.tcp.peer()
                );
                self.broken = Some(why);
            }
        }
        Ok(())
    }
}
