//! [`PageStore`]: the pages a memory node holds, per VM, within a capacity fixed at start.
//!
//! Pages live in a slab: 1 MiB chunks of 256 page slots, allocated the first time a slot in
//! them is needed and reused through a free list, so that claiming and writing back pages
//! (the steady state) allocates nothing. Each VM maps page index → slot.
//!
//! One mutex guards everything. A request holds it only to look pages up and copy at most
//! one run ([`pagemesh_protocol::MAX_RUN_PAGES`] pages, 1 MiB); loading, which may
//! read a whole image, fills pages outside the lock in batches and takes the lock once per
//! batch to copy them in.
//!
//! # Loans: claiming in two phases
//!
//! A Fetch does not free its pages: [`PageStore::lend`] copies them out and records a loan
//! to the client's [`Session`] under the request's id; the pages stay held (and can be lent
//! again: a client whose reply was lost asks again). [`PageStore::acknowledge`] frees the
//! pages of every loan of the session with an id up to the acknowledged one. Loans are kept
//! per session in request order, so acknowledging pops from the front. Loading or releasing
//! a VM drops its loans with its pages.
//!
//! # Loading
//!
//! [`PageStore::load`] checks capacity before it allocates anything, counting the pages the
//! VM already holds as free (a reload replaces them). It then drops the VM's old pages,
//! reserves room for the new ones, fills them batch by batch into slots no other request can
//! see, and publishes them all at once. While a load runs the VM is unknown to other
//! requests; a load that fails leaves the VM unknown.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{Ordering, fence};
use std::sync::{Mutex, MutexGuard, PoisonError};

use pagemesh_api::pattern;
use pagemesh_api::{Content, NodeId, PAGE_SIZE, Vm, VmId};

use crate::images::{ImageDir, ImageRefusal};

/// One page.
type Page = [u8; PAGE_SIZE];

/// Page slots per slab chunk (1 MiB).
const CHUNK_PAGES: usize = 256;
/// Bytes of one slot's tag (`pagemesh_api::rdma::slot_tag`, for one-sided readers to
/// check what they read).
const TAG: usize = pagemesh_api::rdma::TAG_BYTES as usize;
/// Pages filled outside the lock before they are copied in, when loading.
const LOAD_BATCH_PAGES: usize = 256;

/// Errors of the page store. The server turns each into a reply status.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The VM was never loaded here (or was released).
    #[error("VM {0} is not loaded on this node")]
    UnknownVm(VmId),
    /// A page of the run is not held here.
    #[error("page {page} of VM {vm} is not held on this node")]
    NotHeld {
        /// The VM.
        vm: VmId,
        /// The first page of the run that is missing.
        page: u64,
    },
    /// Not enough free slots.
    #[error(
        "no room for {needed} more {}; {free} of this node's pages are free",
        if *needed == 1 { "page" } else { "pages" }
    )]
    NoCapacity {
        /// Pages the operation needs.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// A buffer that is not a whole number of pages (or is empty).
    #[error("a run must be a non-zero multiple of 4096 bytes, got {0}")]
    BadRunLength(usize),
    /// A run that reaches past the VM's last page.
    #[error(
        "a run of {count} pages from page {first} reaches past the end of VM {vm} ({pages} pages)"
    )]
    OutOfRange {
        /// The VM.
        vm: VmId,
        /// First page of the run.
        first: u64,
        /// Pages in the run.
        count: u64,
        /// Pages of the VM.
        pages: u64,
    },
    /// The VM's replicas cannot be placed on its placement's nodes.
    #[error("VM {vm} cannot have its replicas")]
    Replicas {
        /// The VM.
        vm: VmId,
        /// Why.
        #[source]
        source: pagemesh_api::ReplicaError,
    },
    /// The VM's image may not be loaded from where it is (`--image-dir`).
    #[error("refused to load image {path} of VM {vm}: {why}")]
    ImageRefused {
        /// The VM.
        vm: VmId,
        /// The image path.
        path: String,
        /// Why.
        #[source]
        why: ImageRefusal,
    },
    /// The node was given no `--image-dir`, so it loads no images.
    #[error(
        "refused to load image {path} of VM {vm}: this memory node loads images only from \
         its --image-dir, and it has none; start it with --image-dir DIR holding the image"
    )]
    NoImageDir {
        /// The VM.
        vm: VmId,
        /// The image path.
        path: String,
    },
    /// The VM's image could not be read.
    #[error("cannot read image {path} of VM {vm}")]
    Image {
        /// The VM.
        vm: VmId,
        /// The image path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A `Hasher` for page indices: FxHash's multiply, which spreads consecutive indices over
/// the table at a fraction of SipHash's cost. Page indices come from the compute node,
/// which we trust not to attack our hash table.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(pattern::K);
    }
}

type PageMap = HashMap<u64, u32, BuildHasherDefault<PageHasher>>;

/// The pages held for one VM.
#[derive(Debug, Default)]
struct VmPages {
    /// Pages of the VM (from its placement): runs must stay below this.
    pages: u64,
    /// Page index → slab slot.
    slots: PageMap,
}

/// Page slots and their bookkeeping.
#[derive(Debug)]
struct Slab {
    capacity: u32,
    /// `CHUNK_PAGES` slots and a page of their tags each (memory taken as it is needed).
    chunks: Vec<Box<[Page]>>,
    /// Or, with memory up front: every slot, then the pages of their tags, one
    /// allocation made at start and kept until the store is dropped (memory registered for
    /// RDMA must stay where it is; one region, however large the store).
    whole: Option<Box<[Page]>>,
    /// Slots that were used and are free again.
    free: Vec<u32>,
    /// Slots `0..high_water` have been handed out at least once.
    high_water: u32,
    /// Slots holding a page (published or being loaded).
    used: u64,
    /// Slots promised to loads in progress and not allocated yet.
    reserved: u64,
}

impl Slab {
    /// Slots neither used nor reserved.
    fn available(&self) -> u64 {
        u64::from(self.capacity) - self.used - self.reserved
    }

    /// A free slot. The caller has checked [`Slab::available`] (or holds a reservation).
    fn alloc(&mut self) -> u32 {
        self.used += 1;
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        let slot = self.high_water;
        debug_assert!(slot < self.capacity, "slab allocation past capacity");
        if self.whole.is_none() && slot as usize / CHUNK_PAGES >= self.chunks.len() {
            self.chunks.push(new_chunk());
        }
        self.high_water += 1;
        slot
    }

    /// Records that `slot` holds `page` of `vm` now that its bytes are in: its tag.
    fn bind(&mut self, slot: u32, vm: VmId, page: u64) {
        // The page's bytes are written before its tag, for a one-sided reader that reads
        // them in that order on another machine (x86 keeps stores in order; the fence keeps
        // the compiler, and weaker CPUs, from moving them).
        fence(Ordering::SeqCst);
        *self.tag_mut(slot) = pagemesh_api::rdma::slot_tag(vm, page).to_le_bytes();
    }

    fn release(&mut self, slot: u32) {
        // Untagged before anything can write into the slot again.
        *self.tag_mut(slot) = [0; 8];
        fence(Ordering::SeqCst);
        self.used -= 1;
        self.free.push(slot);
    }

    /// Where `slot`'s tag is: the page that holds it and the offset in that page.
    fn tag_at(&self, slot: u32) -> (usize, usize, usize) {
        let slot = slot as usize;
        match &self.whole {
            // After every slot, the tags in slot order.
            Some(_) => {
                let byte = slot * TAG;
                (
                    0,
                    self.capacity as usize + byte / PAGE_SIZE,
                    byte % PAGE_SIZE,
                )
            }
            None => (slot / CHUNK_PAGES, CHUNK_PAGES, slot % CHUNK_PAGES * TAG),
        }
    }

    fn tag_mut(&mut self, slot: u32) -> &mut [u8; 8] {
        let (chunk, page, at) = self.tag_at(slot);
        let tags = match &mut self.whole {
            Some(w) => &mut w[page],
            None => &mut self.chunks[chunk][page],
        };
        (&mut tags[at..at + TAG])
            .try_into()
            .expect("a tag is 8 bytes")
    }

    #[cfg(test)]
    fn tag(&self, slot: u32) -> u64 {
        let (chunk, page, at) = self.tag_at(slot);
        let tags = match &self.whole {
            Some(w) => &w[page],
            None => &self.chunks[chunk][page],
        };
        u64::from_le_bytes(tags[at..at + TAG].try_into().expect("8 bytes"))
    }

    fn page(&self, slot: u32) -> &Page {
        let slot = slot as usize;
        match &self.whole {
            Some(w) => &w[slot],
            None => &self.chunks[slot / CHUNK_PAGES][slot % CHUNK_PAGES],
        }
    }

    fn page_mut(&mut self, slot: u32) -> &mut Page {
        let slot = slot as usize;
        match &mut self.whole {
            Some(w) => &mut w[slot],
            None => &mut self.chunks[slot / CHUNK_PAGES][slot % CHUNK_PAGES],
        }
    }

    /// Gives the chunks back to the allocator once nothing is held or promised (unless
    /// they were allocated up front).
    fn shrink_if_empty(&mut self) {
        if self.used == 0 && self.reserved == 0 && self.whole.is_none() {
            self.chunks = Vec::new();
            self.free = Vec::new();
            self.high_water = 0;
        }
    }
}

#[derive(Debug)]
struct Inner {
    slab: Slab,
    vms: HashMap<VmId, VmPages>,
    /// Runs lent to each client session and not acknowledged yet, oldest first.
    loans: HashMap<Session, VecDeque<Loan>>,
}

impl Inner {
    /// Frees every page of `vm` (which the caller has taken out of `vms`) and forgets its
    /// loans.
    fn free_all(&mut self, vm: VmId, pages: VmPages) {
        for slot in pages.slots.into_values() {
            self.slab.release(slot);
        }
        self.loans.retain(|_, loans| {
            loans.retain(|l| l.vm != vm);
            !loans.is_empty()
        });
    }
}

/// Who pages are lent to: a client's session, which outlives its connections (the client
/// names it in its Hello), so that a client that reconnects acknowledges what it was lent
/// before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Session {
    /// The client's node id ([`Session::ANONYMOUS`] for a connection without a Hello).
    pub client: u64,
    /// The session id the client chose, or the connection's serial number for an anonymous
    /// one.
    pub id: u64,
}

impl Session {
    /// The client id of connections that did not say Hello: their loans live as long as
    /// their connection's serial number is used, which is never again.
    pub const ANONYMOUS: u64 = u64::MAX;
}

/// A run lent by one Fetch.
#[derive(Clone, Copy, Debug)]
struct Loan {
    request_id: u64,
    vm: VmId,
    first: u64,
    count: u64,
}

/// The pages a memory node holds for its peers, thread-safe.
#[derive(Debug)]
pub struct PageStore {
    inner: Mutex<Inner>,
    /// Where `Content::Image` may be loaded from; none: no images at all.
    images: Option<ImageDir>,
}

/// Where a load's pages come from.
enum Source {
    Zero,
    Pattern(u64),
    Image { file: File, path: String },
}

impl PageStore {
    /// A store that holds at most `capacity_pages` pages. Memory is taken as pages arrive,
    /// 1 MiB at a time, and given back when the store becomes empty.
    pub fn new(capacity_pages: u32) -> Self {
        PageStore {
            inner: Mutex::new(Inner {
                slab: Slab {
                    capacity: capacity_pages,
                    chunks: Vec::new(),
                    whole: None,
                    free: Vec::new(),
                    high_water: 0,
                    used: 0,
                    reserved: 0,
                },
                vms: HashMap::new(),
                loans: HashMap::new(),
            }),
            images: None,
        }
    }

    /// This store with all the memory its capacity needs allocated now, in one piece, and
    /// kept until it is dropped: memory that stays where it is, for registering with an
    /// RDMA device as one region ([`PageStore::regions`]). Costs `capacity` pages (and
    /// 1/512 more for tags) of address space at once; the kernel backs them as they are
    /// touched, or all at once when a device registers (pins) them. Call it on a new store.
    pub fn with_memory_up_front(self) -> Self {
        {
            let mut inner = self.lock();
            let slab = &mut inner.slab;
            debug_assert!(slab.chunks.is_empty(), "memory up front on a store in use");
            let slots = slab.capacity as usize;
            let tag_pages = (slots * TAG).div_ceil(PAGE_SIZE);
            slab.whole = Some(vec![[0u8; PAGE_SIZE]; slots + tag_pages].into_boxed_slice());
        }
        self
    }

    /// Loads `Content::Image` from beneath `images` only (`--image-dir`); without it the
    /// store loads no image at all.
    pub fn with_image_dir(mut self, images: ImageDir) -> Self {
        self.images = Some(images);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code path panics with the lock held; if one did, the bookkeeping of the
        // operation in flight is the only thing at risk, and serving on beats dying.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Most pages the store holds.
    pub fn capacity(&self) -> u64 {
        u64::from(self.lock().slab.capacity)
    }

    /// Pages held, over every VM.
    pub fn total_held(&self) -> u64 {
        self.lock().vms.values().map(|v| v.slots.len() as u64).sum()
    }

    /// Pages that can still be stored (capacity less pages held and pages promised to loads
    /// in progress).
    pub fn free_pages(&self) -> u64 {
        self.lock().slab.available()
    }

    /// Loads this node's share of `vm`: every page of which [`pagemesh_api::Replicas`] puts
    /// a copy on `me` (with one copy, what [`pagemesh_api::Placement::pages_of`] gives it),
    /// filled from the VM's [`Content`]. Returns the pages now held for `vm`.
    ///
    /// `Pattern` fills each page with [`pattern::fill_page`]; `Image` reads page `p` from
    /// offset `p * 4096` of the file, skipping pages past its end and zero-padding a partial
    /// last page; `Zero` loads nothing but makes the VM known, so that it can take
    /// write-backs. Loading a loaded VM replaces its pages (see the module docs).
    pub fn load(&self, vm: &Vm, me: NodeId) -> Result<u64, StoreError> {
        let id = vm.id;
        let total = vm.placement.pages();
        let (source, limit) = match &vm.content {
            Content::Zero => (Source::Zero, 0),
            Content::Pattern { seed } => (Source::Pattern(*seed), total),
            Content::Image { path } => {
                let failed = |source| StoreError::Image {
                    vm: id,
                    path: path.clone(),
                    source,
                };
                let images = self.images.as_ref().ok_or_else(|| StoreError::NoImageDir {
                    vm: id,
                    path: path.clone(),
                })?;
                let file = images.open_image(path).map_err(|why| match why {
                    // Missing or unreadable: as for any file.
                    ImageRefusal::Io(e) => failed(e),
                    why => {
                        tracing::warn!(
                            vm = id,
                            path,
                            "refused an image outside --image-dir {}: {why}",
                            images.path().display()
                        );
                        StoreError::ImageRefused {
                            vm: id,
                            path: path.clone(),
                            why,
                        }
                    }
                })?;
                let len = file.metadata().map_err(failed)?.len();
                let pages = len.div_ceil(PAGE_SIZE as u64).min(total);
                let path = path.clone();
                (Source::Image { file, path }, pages)
            }
        };
        // With replicas, this node holds a copy of other nodes' pages too.
        let replicas = vm
            .replicas()
            .map_err(|e| StoreError::Replicas { vm: id, source: e })?;
        let mine = || {
            replicas
                .pages_held_by(&vm.placement, me)
                .filter(move |&p| p < limit)
        };
        let needed = if limit >= total {
            replicas.count_held_by(&vm.placement, me)
        } else {
            mine().count() as u64
        };

        // Check, drop the old pages, reserve.
        {
            let mut inner = self.lock();
            let old = inner.vms.get(&id).map_or(0, |v| v.slots.len() as u64);
            let free = inner.slab.available() + old;
            if needed > free {
                return Err(StoreError::NoCapacity { needed, free });
            }
            if let Some(old) = inner.vms.remove(&id) {
                inner.free_all(id, old);
            }
            inner.slab.reserved += needed;
        }

        let mut staged = VmPages {
            pages: total,
            slots: PageMap::with_capacity_and_hasher(
                usize::try_from(needed).unwrap_or(0),
                BuildHasherDefault::default(),
            ),
        };
        let filled = if needed == 0 {
            Ok(())
        } else {
            self.fill(id, &source, mine(), &mut staged)
        };

        let mut inner = self.lock();
        let unfilled = needed - staged.slots.len() as u64;
        inner.slab.reserved -= unfilled;
        if let Err(e) = filled {
            inner.free_all(id, staged);
            inner.slab.shrink_if_empty();
            return Err(e);
        }
        let held = staged.slots.len() as u64;
        // A concurrent load of the same VM that finished first is replaced: last one wins.
        if let Some(other) = inner.vms.insert(id, staged) {
            inner.free_all(id, other);
        }
        Ok(held)
    }

    /// Fills `pages` from `source` into slots recorded in `staged`, a batch at a time: the
    /// batch is filled outside the lock, then copied in under it.
    fn fill(
        &self,
        vm: VmId,
        source: &Source,
        mut pages: impl Iterator<Item = u64>,
        staged: &mut VmPages,
    ) -> Result<(), StoreError> {
        let mut buf = vec![0u8; LOAD_BATCH_PAGES * PAGE_SIZE];
        let mut batch = Vec::with_capacity(LOAD_BATCH_PAGES);
        loop {
            batch.clear();
            batch.extend(pages.by_ref().take(LOAD_BATCH_PAGES));
            if batch.is_empty() {
                return Ok(());
            }
            let buf = &mut buf[..batch.len() * PAGE_SIZE];
            match source {
                Source::Zero => buf.fill(0),
                Source::Pattern(seed) => {
                    for (&page, dst) in batch.iter().zip(buf.chunks_exact_mut(PAGE_SIZE)) {
                        pattern::fill_page(*seed, page, dst);
                    }
                }
                Source::Image { file, path } => {
                    read_pages(file, &batch, buf).map_err(|source| StoreError::Image {
                        vm,
                        path: path.clone(),
                        source,
                    })?;
                }
            }
            let mut inner = self.lock();
            let slab = &mut inner.slab;
            for (&page, src) in batch.iter().zip(buf.chunks_exact(PAGE_SIZE)) {
                slab.reserved -= 1;
                let slot = slab.alloc();
                slab.page_mut(slot).copy_from_slice(src);
                slab.bind(slot, vm, page);
                staged.slots.insert(page, slot);
            }
        }
    }

    /// Claims the run of `dst.len() / 4096` pages of `vm` from `first` on: copies them into
    /// `dst` and frees them. All or nothing: if a page of the run is not held, nothing is
    /// freed (and `dst` holds unspecified bytes).
    pub fn take(&self, vm: VmId, first: u64, dst: &mut [u8]) -> Result<(), StoreError> {
        let count = run_len(dst.len())?;
        let mut guard = self.lock();
        let Inner { slab, vms, .. } = &mut *guard;
        let pages = held_run(vms, vm, first, count)?;
        copy_out(slab, pages, vm, first, dst)?;
        for page in first..first + count {
            if let Some(slot) = pages.slots.remove(&page) {
                slab.release(slot);
            }
        }
        Ok(())
    }

    /// Lends the run of `dst.len() / 4096` pages of `vm` from `first` on to `session` under
    /// `request_id`: copies them into `dst` and records the loan; the store keeps the pages
    /// until [`PageStore::acknowledge`] frees them. A page lent before (to this session or
    /// another) is lent again. Fails like [`PageStore::read`].
    pub fn lend(
        &self,
        vm: VmId,
        first: u64,
        dst: &mut [u8],
        session: Session,
        request_id: u64,
    ) -> Result<(), StoreError> {
        let count = run_len(dst.len())?;
        let mut guard = self.lock();
        let Inner { slab, vms, loans } = &mut *guard;
        let pages = held_run(vms, vm, first, count)?;
        copy_out(slab, pages, vm, first, dst)?;
        record_loan(loans, session, request_id, vm, first, count);
        Ok(())
    }

    /// Lends the run of `count` pages of `vm` from `first` on to `session` under
    /// `request_id` without copying them out, like [`PageStore::lend`]: the claim of a
    /// client that read the pages itself (one-sided RDMA). Fails like [`PageStore::read`].
    pub fn claim(
        &self,
        vm: VmId,
        first: u64,
        count: u64,
        session: Session,
        request_id: u64,
    ) -> Result<(), StoreError> {
        if count == 0 {
            return Err(StoreError::BadRunLength(0));
        }
        let mut guard = self.lock();
        let Inner { vms, loans, .. } = &mut *guard;
        let pages = held_run(vms, vm, first, count)?;
        if let Some(page) = (first..first + count).find(|p| !pages.slots.contains_key(p)) {
            return Err(StoreError::NotHeld { vm, page });
        }
        record_loan(loans, session, request_id, vm, first, count);
        Ok(())
    }

    /// Frees the pages of every run lent to `session` by a request with an id up to
    /// `up_to`, as far as the store still holds them; returns how many pages it freed.
    pub fn acknowledge(&self, session: Session, up_to: u64) -> u64 {
        let mut guard = self.lock();
        let Inner { slab, vms, loans } = &mut *guard;
        let Some(queue) = loans.get_mut(&session) else {
            return 0;
        };
        let mut freed = 0;
        while let Some(loan) = queue.front().copied()
            && loan.request_id <= up_to
        {
            queue.pop_front();
            let Some(pages) = vms.get_mut(&loan.vm) else {
                continue;
            };
            for page in loan.first..loan.first + loan.count {
                if let Some(slot) = pages.slots.remove(&page) {
                    slab.release(slot);
                    freed += 1;
                }
            }
        }
        // An empty queue stays, with its room, for the session's next loan.
        freed
    }

    /// Pages lent and not acknowledged yet, over every session (a page lent twice counts
    /// twice).
    pub fn lent(&self) -> u64 {
        self.lock()
            .loans
            .values()
            .flat_map(|q| q.iter().map(|l| l.count))
            .sum()
    }

    /// Copies the run of `dst.len() / 4096` pages of `vm` from `first` on into `dst`; the
    /// store keeps them.
    pub fn read(&self, vm: VmId, first: u64, dst: &mut [u8]) -> Result<(), StoreError> {
        let count = run_len(dst.len())?;
        let mut guard = self.lock();
        let Inner { slab, vms, .. } = &mut *guard;
        let pages = held_run(vms, vm, first, count)?;
        copy_out(slab, pages, vm, first, dst)
    }

    /// Stores the run of `src.len() / 4096` pages of `vm` from `first` on, replacing the
    /// pages already held. All or nothing: fails with [`StoreError::NoCapacity`] if the
    /// pages not held yet do not fit.
    pub fn put(&self, vm: VmId, first: u64, src: &[u8]) -> Result<(), StoreError> {
        self.store_run(vm, first, src, true).map(drop)
    }

    /// Stores those pages of the run of `src.len() / 4096` pages of `vm` from `first` on
    /// that are not held yet, and keeps the others: a repair's copy never replaces what a
    /// compute node wrote back meanwhile. Returns how many it stored; all or nothing when
    /// they do not fit.
    pub fn put_absent(&self, vm: VmId, first: u64, src: &[u8]) -> Result<u64, StoreError> {
        self.store_run(vm, first, src, false)
    }

    /// [`PageStore::put`] (`replace`) or [`PageStore::put_absent`]; the pages new here.
    fn store_run(
        &self,
        vm: VmId,
        first: u64,
        src: &[u8],
        replace: bool,
    ) -> Result<u64, StoreError> {
        let count = run_len(src.len())?;
        let mut guard = self.lock();
        let Inner { slab, vms, .. } = &mut *guard;
        let pages = held_run(vms, vm, first, count)?;
        let new = (first..first + count)
            .filter(|p| !pages.slots.contains_key(p))
            .count() as u64;
        if new > slab.available() {
            return Err(StoreError::NoCapacity {
                needed: new,
                free: slab.available(),
            });
        }
        for (page, chunk) in (first..).zip(src.chunks_exact(PAGE_SIZE)) {
            let slot = match pages.slots.entry(page) {
                Entry::Occupied(_) if !replace => continue,
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => *e.insert(slab.alloc()),
            };
            slab.page_mut(slot).copy_from_slice(chunk);
            slab.bind(slot, vm, page);
        }
        Ok(new)
    }

    /// Which of the pages `first..first + count` of `vm` are held, in `out` (cleared first).
    pub fn holding(
        &self,
        vm: VmId,
        first: u64,
        count: u64,
        out: &mut Vec<bool>,
    ) -> Result<(), StoreError> {
        let inner = self.lock();
        let pages = inner.vms.get(&vm).ok_or(StoreError::UnknownVm(vm))?;
        out.clear();
        out.extend((first..first + count).map(|p| pages.slots.contains_key(&p)));
        Ok(())
    }

    /// Pages held for `vm`.
    pub fn held(&self, vm: VmId) -> Result<u64, StoreError> {
        self.lock()
            .vms
            .get(&vm)
            .map(|v| v.slots.len() as u64)
            .ok_or(StoreError::UnknownVm(vm))
    }

    /// Where `out.len() / 4` pages of `vm` from `first` on are in the slab: a little-endian
    /// slot per page, [`pagemesh_protocol::NO_SLOT`] for a page not held (the page
    /// protocol's Slots reply). A slot is a page's while the store holds it: a fetch that
    /// claims it, a release or a write-back into a page not held changes it.
    pub fn slots(&self, vm: VmId, first: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let inner = self.lock();
        let pages = inner.vms.get(&vm).ok_or(StoreError::UnknownVm(vm))?;
        for (i, slot) in out.chunks_exact_mut(4).enumerate() {
            let at = first
                .checked_add(i as u64)
                .and_then(|p| pages.slots.get(&p));
            let s = at.copied().unwrap_or(pagemesh_protocol::NO_SLOT);
            slot.copy_from_slice(&s.to_le_bytes());
        }
        Ok(())
    }

    /// The slab's memory in slot order: the regions a memory node registers for RDMA,
    /// `(address, bytes of slots)` each, slot after slot. Each region's slot tags
    /// (`pagemesh_api::rdma::slot_tag`) follow its slots, so a registration covers
    /// `pagemesh_api::rdma::tags_len(len)` more bytes. With
    /// [`PageStore::with_memory_up_front`] that is one region of every slot (none for a
    /// store of no capacity); otherwise one per 1 MiB chunk (slot *s* is page *s mod 256*
    /// of chunk *s / 256*), allocated as slots are first used and all dropped when the
    /// store empties: a node registering them must keep to what is listed now.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let inner = self.lock();
        let slab = &inner.slab;
        match &slab.whole {
            Some(_) if slab.capacity == 0 => Vec::new(),
            Some(w) => vec![(
                w.as_ptr() as u64,
                u64::from(slab.capacity) * PAGE_SIZE as u64,
            )],
            None => slab
                .chunks
                .iter()
                .map(|c| (c.as_ptr() as u64, (CHUNK_PAGES * PAGE_SIZE) as u64))
                .collect(),
        }
    }

    /// Drops every page of `vm` and forgets the VM; returns how many pages were dropped.
    pub fn release(&self, vm: VmId) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let pages = inner.vms.remove(&vm).ok_or(StoreError::UnknownVm(vm))?;
        let dropped = pages.slots.len() as u64;
        inner.free_all(vm, pages);
        inner.slab.shrink_if_empty();
        Ok(dropped)
    }
}

/// A zeroed chunk: its slots and its page of tags (zero: every slot free).
fn new_chunk() -> Box<[Page]> {
    vec![[0u8; PAGE_SIZE]; CHUNK_PAGES + 1].into_boxed_slice()
}

/// Records the loan of a run to `session`.
fn record_loan(
    loans: &mut HashMap<Session, VecDeque<Loan>>,
    session: Session,
    request_id: u64,
    vm: VmId,
    first: u64,
    count: u64,
) {
    // Grows only while a session has more loans outstanding than ever before: in the
    // steady state (acknowledged on the next request) this reuses its room.
    loans.entry(session).or_default().push_back(Loan {
        request_id,
        vm,
        first,
        count,
    });
}

/// Pages in a run of `len` bytes.
fn run_len(len: usize) -> Result<u64, StoreError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(StoreError::BadRunLength(len));
    }
    Ok((len / PAGE_SIZE) as u64)
}

/// The pages of `vm`, if the run `first..first + count` lies inside it.
fn held_run(
    vms: &mut HashMap<VmId, VmPages>,
    vm: VmId,
    first: u64,
    count: u64,
) -> Result<&mut VmPages, StoreError> {
    let pages = vms.get_mut(&vm).ok_or(StoreError::UnknownVm(vm))?;
    match first.checked_add(count) {
        Some(end) if end <= pages.pages => Ok(pages),
        _ => Err(StoreError::OutOfRange {
            vm,
            first,
            count,
            pages: pages.pages,
        }),
    }
}

/// Copies the run from `first` on into `dst`, or names the first page not held.
fn copy_out(
    slab: &Slab,
    pages: &VmPages,
    vm: VmId,
    first: u64,
    dst: &mut [u8],
) -> Result<(), StoreError> {
    for (page, chunk) in (first..).zip(dst.chunks_exact_mut(PAGE_SIZE)) {
        let slot = *pages
            .slots
            .get(&page)
            .ok_or(StoreError::NotHeld { vm, page })?;
        chunk.copy_from_slice(slab.page(slot));
    }
    Ok(())
}

/// Reads `pages` (sorted) from `file` into consecutive pages of `dst`, one `pread` per run
/// of consecutive pages. Bytes past the end of the file read as zero.
fn read_pages(file: &File, pages: &[u64], dst: &mut [u8]) -> io::Result<()> {
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 {
            j += 1;
        }
        let offset = pages[i] * PAGE_SIZE as u64;
        read_at_padded(file, offset, &mut dst[i * PAGE_SIZE..j * PAGE_SIZE])?;
        i = j;
    }
    Ok(())
}

/// Fills `dst` from `offset` of `file`, zero-filling whatever lies past the end of the file.
fn read_at_padded(file: &File, offset: u64, dst: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < dst.len() {
        match file.read_at(&mut dst[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    dst[done..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use pagemesh_api::{PageRange, Placement};
    use proptest::prelude::*;

    use super::*;

    /// A page's slot, located in the regions the store lists, is where its bytes are: what
    /// an RDMA reader would read is the page a Read returns.
    #[test]
    fn slots_located_in_the_listed_regions_hold_their_pages() {
        for up_front in [false, true] {
            let store = match up_front {
                false => PageStore::new(1024),
                true => PageStore::new(1000).with_memory_up_front(),
            };
            slots_are_where_the_regions_say(&store, if up_front { 1 } else { 3 });
        }
    }

    /// The check of the test above on `store`, which lists `expected` regions.
    fn slots_are_where_the_regions_say(store: &PageStore, expected: usize) {
        use pagemesh_api::rdma::{RdmaEndpoint, RdmaRegion};
        use pagemesh_transport::rdma::plan::SlotLayout;
        store
            .load(&vm(3, all_on(1, 600), Content::Zero), 1)
            .unwrap();
        // 600 pages (over three chunks, or in one piece), each page its number in every
        // byte's low bits.
        let pages: Vec<u8> = (0..600u32)
            .flat_map(|p| std::iter::repeat_n((p % 251) as u8, PAGE_SIZE))
            .collect();
        for (i, run) in pages.chunks(64 * PAGE_SIZE).enumerate() {
            store.put(3, i as u64 * 64, run).unwrap();
        }
        let regions: Vec<RdmaRegion> = store
            .regions()
            .into_iter()
            .map(|(addr, len)| RdmaRegion { addr, len, rkey: 1 })
            .collect();
        assert_eq!(regions.len(), expected);
        let endpoint = RdmaEndpoint {
            gid: [0; 16],
            lid: 1,
            qpn: 1,
            psn: 1,
            regions,
        };
        let layout = SlotLayout::new(&endpoint).unwrap();
        let mut slots = vec![0u8; 600 * 4];
        store.slots(3, 0, &mut slots).unwrap();
        for (page, slot) in slots.chunks_exact(4).enumerate() {
            let slot = u32::from_le_bytes(slot.try_into().unwrap());
            let at = layout.locate(slot).expect("a listed slot");
            // SAFETY: `at.addr` is inside a chunk the store holds (listed just above, and
            // nothing is released while this test runs): one page is readable there.
            let bytes = unsafe { std::slice::from_raw_parts(at.addr as *const u8, PAGE_SIZE) };
            let mut read = vec![0u8; PAGE_SIZE];
            store.read(3, page as u64, &mut read).unwrap();
            assert_eq!(bytes, &read[..], "page {page} in slot {slot}");
            // SAFETY: as above; the tag lies in the same chunk, after its slots.
            let tag = unsafe { std::ptr::read_unaligned(at.tag_addr as *const u64) };
            assert_eq!(
                tag,
                pagemesh_api::rdma::slot_tag(3, page as u64),
                "slot {slot}"
            );
        }
    }

    /// A slot's tag names the page it holds from the moment its bytes are in until it is
    /// freed (claimed, taken or released), and a freed slot's tag is 0.
    #[test]
    fn tags_follow_the_pages_in_their_slots() {
        use pagemesh_api::rdma::slot_tag;
        let store = PageStore::new(600);
        store
            .load(&vm(4, all_on(1, 300), Content::Pattern { seed: 1 }), 1)
            .unwrap();
        let slot_of = |page: u64| {
            let mut b = [0u8; 4];
            store.slots(4, page, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        let tag = |slot: u32| store.lock().slab.tag(slot);
        let s10 = slot_of(10);
        assert_eq!(tag(s10), slot_tag(4, 10));
        assert_eq!(tag(slot_of(299)), slot_tag(4, 299));
        // Claimed and acknowledged: the slot is free and says so.
        let session = Session { client: 1, id: 1 };
        store.claim(4, 10, 2, session, 5).unwrap();
        assert_eq!(tag(s10), slot_tag(4, 10), "a lent page is still held");
        assert_eq!(store.acknowledge(session, 5), 2);
        assert_eq!(tag(s10), 0);
        // Written back into a page not held: a slot again, tagged for it.
        store.put(4, 11, &page_of(9)).unwrap();
        assert_eq!(tag(slot_of(11)), slot_tag(4, 11));
        let mut taken = page_of(0);
        let s12 = slot_of(12);
        store.take(4, 12, &mut taken).unwrap();
        assert_eq!(tag(s12), 0);
        let s0 = slot_of(0);
        store.release(4).unwrap();
        assert_eq!(
            store.lock().slab.chunks.len(),
            0,
            "an empty store gives its memory back"
        );
        // With memory up front, one region that stays where it is, tags cleared.
        let store = PageStore::new(600).with_memory_up_front();
        let before = store.regions();
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].1, 600 * PAGE_SIZE as u64);
        store
            .load(&vm(4, all_on(1, 300), Content::Pattern { seed: 1 }), 1)
            .unwrap();
        assert_eq!(store.regions(), before);
        store.release(4).unwrap();
        assert_eq!(store.regions(), before);
        assert_eq!(store.lock().slab.tag(s0), 0);
    }

    /// A claim lends without copying, all or nothing, like a Fetch's loan.
    #[test]
    fn a_claim_lends_held_pages_and_refuses_a_run_with_one_not_held() {
        let store = PageStore::new(100);
        store
            .load(&vm(2, all_on(1, 8), Content::Pattern { seed: 3 }), 1)
            .unwrap();
        let session = Session { client: 7, id: 1 };
        store.take(2, 5, &mut page_of(0)).unwrap();
        assert!(matches!(
            store.claim(2, 4, 3, session, 1),
            Err(StoreError::NotHeld { vm: 2, page: 5 })
        ));
        assert_eq!(store.lent(), 0);
        assert!(matches!(
            store.claim(2, 6, 4, session, 1),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            store.claim(9, 0, 1, session, 1),
            Err(StoreError::UnknownVm(9))
        ));
        store.claim(2, 0, 4, session, 2).unwrap();
        assert_eq!((store.lent(), store.held(2).unwrap()), (4, 7));
        assert_eq!(store.acknowledge(session, 2), 4);
        assert_eq!(store.held(2).unwrap(), 3);
    }

    #[test]
    fn no_room_for_one_page_says_page() {
        let one = StoreError::NoCapacity { needed: 1, free: 0 };
        assert_eq!(
            one.to_string(),
            "no room for 1 more page; 0 of this node's pages are free"
        );
        let nine = StoreError::NoCapacity { needed: 9, free: 2 };
        assert!(nine.to_string().starts_with("no room for 9 more pages;"));
    }

    fn vm(id: VmId, placement: Placement, content: Content) -> Vm {
        Vm {
            id,
            compute_node: 100,
            mem_bytes: placement.pages() * PAGE_SIZE as u64,
            placement,
            content,
            local_memory_bytes: None,
            replicas: 1,
            retired: Vec::new(),
            repairs: Vec::new(),
        }
    }

    fn all_on(node: NodeId, pages: u64) -> Placement {
        Placement::ranges(
            vec![PageRange {
                start: 0,
                pages,
                node,
            }],
            pages,
        )
        .unwrap()
    }

    fn page_of(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("pagemesh-store-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn loads_the_pattern_share_of_this_node() {
        let store = PageStore::new(1000);
        let placement = Placement::interleave(vec![1, 2, 3], 3, 100).unwrap();
        let v = vm(7, placement.clone(), Content::Pattern { seed: 42 });
        let held = store.load(&v, 2).unwrap();
        assert_eq!(held, placement.count_of(2));
        assert_eq!(store.held(7).unwrap(), held);
        let mut page = page_of(0);
        for p in 0..100 {
            let r = store.read(7, p, &mut page);
            if placement.owner(p) == Some(2) {
                r.unwrap();
                assert_eq!(pattern::first_mismatch(42, p, &page), None, "page {p}");
            } else {
                assert!(matches!(r, Err(StoreError::NotHeld { vm: 7, page }) if page == p));
            }
        }
        // Loading again replaces: same count, no growth.
        assert_eq!(store.load(&v, 2).unwrap(), held);
        assert_eq!(store.total_held(), held);
        // A node that holds nothing of the VM still knows it.
        let other = PageStore::new(10);
        assert_eq!(other.load(&v, 9).unwrap(), 0);
        assert_eq!(other.held(7).unwrap(), 0);
    }

    #[test]
    fn zero_content_loads_nothing_but_accepts_write_backs() {
        let store = PageStore::new(4);
        let v = vm(1, all_on(1, 16), Content::Zero);
        assert_eq!(store.load(&v, 1).unwrap(), 0);
        store.put(1, 15, &page_of(9)).unwrap();
        assert_eq!(store.held(1).unwrap(), 1);
        assert!(matches!(
            store.put(1, 16, &page_of(9)),
            Err(StoreError::OutOfRange { pages: 16, .. })
        ));
        assert!(matches!(
            store.put(1, u64::MAX, &page_of(9)),
            Err(StoreError::OutOfRange { .. })
        ));
    }

    #[test]
    fn a_repair_copy_fills_only_what_is_missing() {
        let store = PageStore::new(4);
        let v = vm(1, all_on(1, 16), Content::Zero);
        store.load(&v, 1).unwrap();
        // A write-back came first for page 3.
        store.put(1, 3, &page_of(7)).unwrap();
        let mut run = page_of(1);
        run.extend(page_of(1));
        run.extend(page_of(1));
        assert_eq!(store.put_absent(1, 2, &run).unwrap(), 2);
        let mut page = page_of(0);
        store.read(1, 3, &mut page).unwrap();
        assert_eq!(page, page_of(7), "the newer write-back stays");
        store.read(1, 4, &mut page).unwrap();
        assert_eq!(page, page_of(1));
        let mut held = Vec::new();
        store.holding(1, 1, 5, &mut held).unwrap();
        assert_eq!(held, [false, true, true, true, false]);
        // One slot left: two new pages do not fit, and nothing is stored.
        let mut two = page_of(2);
        two.extend(page_of(2));
        assert!(matches!(
            store.put_absent(1, 8, &two),
            Err(StoreError::NoCapacity { needed: 2, free: 1 })
        ));
        assert_eq!(store.held(1).unwrap(), 3);
        assert!(matches!(
            store.holding(2, 0, 1, &mut held),
            Err(StoreError::UnknownVm(2))
        ));
    }

    #[test]
    fn capacity_is_checked_before_anything_is_allocated() {
        let store = PageStore::new(10);
        let big = vm(1, all_on(1, 11), Content::Pattern { seed: 1 });
        assert!(matches!(
            store.load(&big, 1),
            Err(StoreError::NoCapacity {
                needed: 11,
                free: 10
            })
        ));
        assert_eq!(store.total_held(), 0);
        assert!(matches!(store.held(1), Err(StoreError::UnknownVm(1))));

        let a = vm(2, all_on(1, 8), Content::Pattern { seed: 2 });
        assert_eq!(store.load(&a, 1).unwrap(), 8);
        // Reloading a VM may reuse its own pages...
        assert_eq!(store.load(&a, 1).unwrap(), 8);
        // ...but another VM does not fit, and the failed load leaves `a` alone.
        let b = vm(3, all_on(1, 3), Content::Pattern { seed: 3 });
        assert!(matches!(
            store.load(&b, 1),
            Err(StoreError::NoCapacity { needed: 3, free: 2 })
        ));
        assert_eq!(store.held(2).unwrap(), 8);
        assert_eq!(store.free_pages(), 2);
        assert_eq!(store.release(2).unwrap(), 8);
        assert_eq!(store.free_pages(), 10);
        assert_eq!(store.load(&b, 1).unwrap(), 3);
    }

    #[test]
    fn image_loads_pad_the_last_page_and_skip_past_the_end() {
        // 5.5 pages of image for an 8-page VM.
        let mut bytes = Vec::new();
        for p in 0..5u8 {
            bytes.extend_from_slice(&page_of(p + 1));
        }
        bytes.extend_from_slice(&[0xAB; PAGE_SIZE / 2]);
        let file = TempFile::new("short.img", &bytes);
        let store = with_temp_images(100);
        let placement = Placement::interleave(vec![1, 2], 1, 8).unwrap();
        let content = Content::Image {
            path: file.0.to_string_lossy().into_owned(),
        };
        // Node 1 holds 0, 2, 4, 6; page 6 is past the end of the image.
        assert_eq!(
            store
                .load(&vm(4, placement.clone(), content.clone()), 1)
                .unwrap(),
            3
        );
        // Node 2 holds 1, 3, 5 (partial), 7 (past the end).
        let store2 = with_temp_images(100);
        assert_eq!(store2.load(&vm(4, placement, content), 2).unwrap(), 3);
        let mut page = page_of(0);
        for (s, p) in [
            (&store, 0u64),
            (&store2, 1),
            (&store, 2),
            (&store2, 3),
            (&store, 4),
        ] {
            s.read(4, p, &mut page).unwrap();
            assert_eq!(page, page_of(p as u8 + 1), "page {p}");
        }
        store2.read(4, 5, &mut page).unwrap();
        assert!(page[..PAGE_SIZE / 2].iter().all(|&b| b == 0xAB));
        assert!(page[PAGE_SIZE / 2..].iter().all(|&b| b == 0));
        assert!(matches!(
            store.read(4, 6, &mut page),
            Err(StoreError::NotHeld { page: 6, .. })
        ));
        assert!(matches!(
            store2.read(4, 7, &mut page),
            Err(StoreError::NotHeld { page: 7, .. })
        ));
    }

    #[test]
    fn image_loads_read_runs_across_batches() {
        let pages = LOAD_BATCH_PAGES as u64 + 10;
        let mut bytes = vec![0u8; pages as usize * PAGE_SIZE];
        for (p, chunk) in bytes.chunks_exact_mut(PAGE_SIZE).enumerate() {
            pattern::fill_page(5, p as u64, chunk);
        }
        let file = TempFile::new("long.img", &bytes);
        let store = with_temp_images(1000);
        let content = Content::Image {
            path: file.0.to_string_lossy().into_owned(),
        };
        assert_eq!(
            store.load(&vm(1, all_on(3, pages), content), 3).unwrap(),
            pages
        );
        let mut page = page_of(0);
        for p in 0..pages {
            store.read(1, p, &mut page).unwrap();
            assert_eq!(pattern::first_mismatch(5, p, &page), None, "page {p}");
        }
    }

    /// A store that loads images from the temporary directory, where [`TempFile`]s are.
    fn with_temp_images(capacity: u32) -> PageStore {
        PageStore::new(capacity).with_image_dir(ImageDir::open(&std::env::temp_dir()).unwrap())
    }

    #[test]
    fn a_missing_image_is_an_error_that_names_it() {
        let store = with_temp_images(10);
        let missing = std::env::temp_dir().join("pagemesh-nonexistent.img");
        let content = Content::Image {
            path: missing.display().to_string(),
        };
        let err = store.load(&vm(1, all_on(1, 4), content), 1).unwrap_err();
        assert!(matches!(err, StoreError::Image { vm: 1, .. }));
        assert!(err.to_string().contains("pagemesh-nonexistent.img"));
        assert!(matches!(store.held(1), Err(StoreError::UnknownVm(1))));
        assert_eq!(store.free_pages(), 10);
    }

    #[test]
    fn images_load_only_from_the_image_dir() {
        let file = TempFile::new("allowed.img", &page_of(7));
        let image = Content::Image {
            path: file.0.display().to_string(),
        };
        // No --image-dir: no image at all.
        let store = PageStore::new(10);
        let err = store
            .load(&vm(1, all_on(1, 1), image.clone()), 1)
            .unwrap_err();
        assert!(matches!(err, StoreError::NoImageDir { vm: 1, .. }), "{err}");
        assert!(err.to_string().contains("--image-dir"), "{err}");
        // Outside the directory: refused, nothing loaded.
        let dir = std::env::temp_dir().join(format!("pagemesh-store-{}-dir", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = PageStore::new(10).with_image_dir(ImageDir::open(&dir).unwrap());
        let err = store.load(&vm(1, all_on(1, 1), image), 1).unwrap_err();
        assert!(
            matches!(err, StoreError::ImageRefused { vm: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("outside the image directory"),
            "{err}"
        );
        assert!(matches!(store.held(1), Err(StoreError::UnknownVm(1))));
        assert_eq!(store.free_pages(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_must_be_whole_pages() {
        let store = PageStore::new(10);
        store.load(&vm(1, all_on(1, 4), Content::Zero), 1).unwrap();
        let mut odd = [0u8; 100];
        assert!(matches!(
            store.take(1, 0, &mut odd),
            Err(StoreError::BadRunLength(100))
        ));
        assert!(matches!(
            store.put(1, 0, &[]),
            Err(StoreError::BadRunLength(0))
        ));
        assert!(matches!(
            store.take(2, 0, &mut page_of(0)),
            Err(StoreError::UnknownVm(2))
        ));
    }

    /// One step of the model-based test.
    #[derive(Debug, Clone)]
    enum Step {
        Put {
            vm: VmId,
            first: u64,
            count: u64,
            fill: u8,
        },
        Take {
            vm: VmId,
            first: u64,
            count: u64,
        },
        Read {
            vm: VmId,
            first: u64,
            count: u64,
        },
        Release {
            vm: VmId,
        },
        Load {
            vm: VmId,
        },
    }

    const VM_PAGES: u64 = 24;
    const CAPACITY: u32 = 20;

    fn step() -> impl Strategy<Value = Step> {
        let vm = 1u32..=3; // VM 3 is never loaded
        let first = 0u64..VM_PAGES + 2;
        let count = 1u64..=6;
        prop_oneof![
            4 => (vm.clone(), first.clone(), count.clone(), any::<u8>())
                .prop_map(|(vm, first, count, fill)| Step::Put { vm, first, count, fill }),
            3 => (vm.clone(), first.clone(), count.clone())
                .prop_map(|(vm, first, count)| Step::Take { vm, first, count }),
            2 => (vm.clone(), first, count).prop_map(|(vm, first, count)| Step::Read { vm, first, count }),
            1 => vm.clone().prop_map(|vm| Step::Release { vm }),
            1 => (1u32..=2).prop_map(|vm| Step::Load { vm }),
        ]
    }

    /// Pages of the model are filled with one byte; `None` = VM not loaded.
    type Model = BTreeMap<VmId, BTreeMap<u64, u8>>;

    proptest! {
        #[test]
        fn store_matches_a_model(steps in proptest::collection::vec(step(), 1..60)) {
            let store = PageStore::new(CAPACITY);
            let mut model = Model::new();
            for vm_id in 1..=2 {
                store.load(&vm(vm_id, all_on(1, VM_PAGES), Content::Zero), 1).unwrap();
                model.insert(vm_id, BTreeMap::new());
            }
            for step in steps {
                let held_total: u64 = model.values().map(|m| m.len() as u64).sum();
                match step {
                    Step::Put { vm, first, count, fill } => {
                        let src: Vec<u8> = vec![fill; count as usize * PAGE_SIZE];
                        let got = store.put(vm, first, &src);
                        match model.get_mut(&vm) {
                            None => prop_assert!(matches!(got, Err(StoreError::UnknownVm(v)) if v == vm)),
                            Some(_) if first + count > VM_PAGES => {
                                prop_assert!(matches!(got, Err(StoreError::OutOfRange { .. })), "{:?}", got);
                            }
                            Some(pages) => {
                                let new = (first..first + count).filter(|p| !pages.contains_key(p)).count() as u64;
                                if held_total + new > u64::from(CAPACITY) {
                                    let ok = matches!(got, Err(StoreError::NoCapacity { needed, .. }) if needed == new);
                                    prop_assert!(ok, "{:?}", got);
                                } else {
                                    prop_assert!(got.is_ok(), "{:?}", got);
                                    for p in first..first + count {
                                        pages.insert(p, fill);
                                    }
                                }
                            }
                        }
                    }
                    Step::Take { vm, first, count } | Step::Read { vm, first, count } => {
                        let claim = matches!(step, Step::Take { .. });
                        let mut dst = vec![0u8; count as usize * PAGE_SIZE];
                        let got = if claim { store.take(vm, first, &mut dst) } else { store.read(vm, first, &mut dst) };
                        match model.get_mut(&vm) {
                            None => prop_assert!(matches!(got, Err(StoreError::UnknownVm(_)))),
                            Some(_) if first + count > VM_PAGES => {
                                prop_assert!(matches!(got, Err(StoreError::OutOfRange { .. })), "{:?}", got);
                            }
                            Some(pages) => {
                                let missing = (first..first + count).find(|p| !pages.contains_key(p));
                                if let Some(missing) = missing {
                                    prop_assert!(matches!(got, Err(StoreError::NotHeld { page, .. }) if page == missing), "{:?}", got);
                                } else {
                                    prop_assert!(got.is_ok(), "{:?}", got);
                                    for (p, chunk) in (first..).zip(dst.chunks_exact(PAGE_SIZE)) {
                                        let fill = pages[&p];
                                        prop_assert!(chunk.iter().all(|&b| b == fill));
                                        if claim {
                                            pages.remove(&p);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Step::Release { vm } => {
                        let got = store.release(vm);
                        match model.remove(&vm) {
                            None => prop_assert!(matches!(got, Err(StoreError::UnknownVm(_)))),
                            Some(pages) => prop_assert_eq!(got.unwrap(), pages.len() as u64),
                        }
                    }
                    Step::Load { vm: vm_id } => {
                        store.load(&vm(vm_id, all_on(1, VM_PAGES), Content::Zero), 1).unwrap();
                        model.insert(vm_id, BTreeMap::new());
                    }
                }
                for vm_id in 1..=3 {
                    match model.get(&vm_id) {
                        Some(pages) => prop_assert_eq!(store.held(vm_id).unwrap(), pages.len() as u64),
                        None => prop_assert!(store.held(vm_id).is_err()),
                    }
                }
                let total: u64 = model.values().map(|m| m.len() as u64).sum();
                prop_assert_eq!(store.total_held(), total);
                prop_assert_eq!(store.free_pages(), u64::from(CAPACITY) - total);
            }
        }

        #[test]
        fn loads_respect_capacity(pages in 1u64..300, cap in 0u32..300, granule in 1u32..5) {
            let placement = Placement::interleave(vec![1, 2], granule, pages).unwrap();
            let store = PageStore::new(cap);
            let needed = placement.count_of(1);
            let got = store.load(&vm(1, placement.clone(), Content::Pattern { seed: 9 }), 1);
            if needed > u64::from(cap) {
                let ok = matches!(got, Err(StoreError::NoCapacity { needed: n, free }) if n == needed && free == u64::from(cap));
                prop_assert!(ok);
                prop_assert_eq!(store.total_held(), 0);
            } else {
                prop_assert_eq!(got.unwrap(), needed);
                let mut page = page_of(0);
                for p in placement.pages_of(1) {
                    store.take(1, p, &mut page).unwrap();
                    prop_assert_eq!(pattern::first_mismatch(9, p, &page), None);
                }
                prop_assert_eq!(store.held(1).unwrap(), 0);
            }
        }
    }
}
