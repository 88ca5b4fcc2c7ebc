//! The page directory: where each guest page lives, and what the cache knows of it.
//!
//! One `AtomicU64` per 4 KiB page (8 bytes per page: 2 MiB of directory per GiB of guest
//! memory), or per 2 MiB huge page for RAM of huge pages ([`PageDirectory::coarse`]: 4 KiB
//! of directory per GiB), read and changed without locks by the fault handler, the
//! reclaimer and the stats:
//!
//! ```text
//!  63  61 60 59              36 35   32 31 30 29    24 23             0
//! +------+--+------------------+-------+--+--+--------+---------------+
//! |unused|P |  staging slot    | state |  |H |  heat  | home node id  |
//! +------+--+------------------+-------+--+--+--------+---------------+
//! P:     1 when prefetch installed the page and no sign of its use has been seen yet
//! state: what the page is now ([`PageState`])
//! slot:  where a staged page's bytes are in the reclaimer's staging area
//! H:     1 when the page has a home node (`home node id` is meaningful)
//! heat:  faults served on this page, saturating at 63 (the console's heat map)
//! ```
//!
//! Every change of state is one compare-and-swap from a known state, so the fault handler
//! and the reclaimer never both act on a page: whoever moves it out of a state owns the
//! next step. Node ids are limited to 24 bits ([`MAX_NODE_ID`]).
//!
//! A coarse directory keeps the same per-page interface: every page of an entry reads that
//! entry, and a change made through any of its pages changes them all (a huge page is
//! fetched, installed and counted as one).

use std::sync::atomic::{AtomicU64, Ordering};

use pagemesh_api::{NodeId, Placement};

/// Largest node id a directory entry can hold.
pub const MAX_NODE_ID: NodeId = (1 << 24) - 1;

const NODE_MASK: u64 = MAX_NODE_ID as u64;
const HEAT_SHIFT: u32 = 24;
/// Largest heat an entry records.
pub const MAX_HEAT: u32 = 63;
const HEAT_MASK: u64 = (MAX_HEAT as u64) << HEAT_SHIFT;
const HOME_BIT: u64 = 1 << 30;
const STATE_SHIFT: u32 = 32;
const STATE_MASK: u64 = 0b1111 << STATE_SHIFT;
const SLOT_SHIFT: u32 = 36;
/// Largest staging slot an entry can name.
pub const MAX_SLOT: u32 = (1 << 24) - 1;
const SLOT_MASK: u64 = (MAX_SLOT as u64) << SLOT_SHIFT;
const PREFETCHED_BIT: u64 = 1 << 60;

/// What a page is now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not resident and never written anywhere: it reads as zeros (zero-filled here on its
    /// first touch). Its home, if it has one, holds nothing for it yet.
    Zero = 0,
    /// Not resident: its home holds it.
    Remote = 1,
    /// Resident, and the only copy (no budget: fetched pages move here for good).
    Local = 2,
    /// Resident and write-protected; its home holds the same bytes, so dropping it costs
    /// nothing.
    Clean = 3,
    /// Resident, write-protected and all zeros, never written: dropping it makes it
    /// [`PageState::Zero`] again.
    ZeroClean = 4,
    /// Resident and written since its home last had it (or it has never been written back):
    /// it must be written back before it is dropped.
    Dirty = 5,
    /// Being taken out of guest memory by the reclaimer (a few microseconds); a fault on it
    /// waits until it settles.
    Evicting = 6,
    /// Out of guest memory, its bytes in a staging slot, the same as its home's: a fault
    /// on it puts it back from there (a local fault); left alone, it is dropped.
    StagedClean = 7,
    /// Out of guest memory, its bytes in a staging slot and newer than its home's: a fault
    /// on it puts it back; left alone, it is written back, then dropped.
    StagedDirty = 8,
    /// Staged and dirty, its bytes on their way home; a fault on it still puts it back
    /// from the slot (and that write-back is wasted).
    WritingBack = 9,
    /// Not resident, its home holds it, and a fetch of it is under way (by the fault handler
    /// or the prefetcher, whichever moved it here from [`PageState::Remote`]): nobody else
    /// fetches it. A fault on it needs nothing more: the install wakes the guest, and a
    /// fetch that fails puts the page back to `Remote` and wakes the guest to fault again.
    Fetching = 10,
}

impl PageState {
    fn from_bits(bits: u64) -> Self {
        match (bits & STATE_MASK) >> STATE_SHIFT {
            0 => PageState::Zero,
            1 => PageState::Remote,
            2 => PageState::Local,
            3 => PageState::Clean,
            4 => PageState::ZeroClean,
            5 => PageState::Dirty,
            6 => PageState::Evicting,
            7 => PageState::StagedClean,
            8 => PageState::StagedDirty,
            9 => PageState::WritingBack,
            // 11..=15 are never stored.
            _ => PageState::Fetching,
        }
    }

    fn bits(self) -> u64 {
        (self as u64) << STATE_SHIFT
    }

    /// Whether the page is mapped in guest memory.
    pub fn is_mapped(self) -> bool {
        matches!(
            self,
            PageState::Local | PageState::Clean | PageState::ZeroClean | PageState::Dirty
        )
    }

    /// Whether the page's bytes are in a staging slot.
    pub fn is_staged(self) -> bool {
        matches!(
            self,
            PageState::StagedClean | PageState::StagedDirty | PageState::WritingBack
        )
    }
}

/// Who owns a page, as the heat map and the summary see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageOwner {
    /// Never written: no node holds it; it reads as zeros.
    Zero,
    /// Resident in this node's guest memory.
    Local,
    /// Held by another node, not resident here.
    Remote(NodeId),
}

/// One page's entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What it is now.
    pub state: PageState,
    /// Its home node, if it has one.
    pub home: Option<NodeId>,
    /// Faults served on it (saturating at [`MAX_HEAT`]).
    pub heat: u32,
    /// Its staging slot (meaningful while [`PageState::is_staged`]).
    pub slot: u32,
    /// Prefetch installed it and no use of it has been seen yet.
    pub prefetched: bool,
}

impl Entry {
    fn decode(v: u64) -> Self {
        Entry {
            state: PageState::from_bits(v),
            home: (v & HOME_BIT != 0).then_some((v & NODE_MASK) as NodeId),
            heat: ((v & HEAT_MASK) >> HEAT_SHIFT) as u32,
            slot: ((v & SLOT_MASK) >> SLOT_SHIFT) as u32,
            prefetched: v & PREFETCHED_BIT != 0,
        }
    }

    /// The owner as the heat map sees it.
    pub fn owner(&self) -> PageOwner {
        match (self.state, self.home) {
            (PageState::Remote | PageState::Fetching, Some(n)) => PageOwner::Remote(n),
            (PageState::Zero | PageState::Remote, _) => PageOwner::Zero,
            // Staged pages are still on this node, in its staging area.
            _ => PageOwner::Local,
        }
    }
}

/// Errors from directory construction and updates.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum DirectoryError {
    /// Page index past the end.
    #[error("page {page} is outside the directory of {pages} pages")]
    OutOfRange {
        /// The page.
        page: u64,
        /// Directory size.
        pages: u64,
    },
    /// A node id does not fit in an entry.
    #[error("node id {0} is too large for the page directory (at most {MAX_NODE_ID})")]
    NodeIdTooLarge(NodeId),
    /// A coarse entry's pages would have more than one home.
    #[error(
        "pages {first}..{end} share a directory entry (a 2 MiB huge page) but the placement \
         puts them on more than one node; place whole huge pages (2 MiB-aligned ranges)"
    )]
    SplitEntry {
        /// The entry's first page.
        first: u64,
        /// Its end.
        end: u64,
    },
    /// A coarse directory's pages are not whole entries.
    #[error("{pages} pages are not whole directory entries of {per} pages")]
    PartialEntry {
        /// Pages in the placement.
        pages: u64,
        /// Pages per entry.
        per: u64,
    },
    /// The placement is for a different number of pages.
    #[error("the placement covers {placement} pages but the guest has {pages}")]
    SizeMismatch {
        /// Pages in the placement.
        placement: u64,
        /// Pages in the directory.
        pages: u64,
    },
}

/// Where every page of one guest's RAM lives.
#[derive(Debug)]
pub struct PageDirectory {
    entries: Box<[AtomicU64]>,
    /// Pages of guest RAM.
    pages: u64,
    /// log2 of the pages per entry: 0, or 9 for 2 MiB huge pages.
    shift: u32,
    /// Pages from here on were never loaded (past the end of an image); in a coarse entry
    /// that holds both kinds, they read as zeros.
    loaded_end: u64,
}

impl PageDirectory {
    /// A directory of `pages` never-written pages without homes.
    pub fn new(pages: u64) -> Self {
        let entries = (0..pages).map(|_| AtomicU64::new(0)).collect();
        Self {
            entries,
            pages,
            shift: 0,
            loaded_end: pages,
        }
    }

    /// A directory whose pages are held where `placement` put them (each page's home is
    /// its placement's node, and it is [`PageState::Remote`]).
    pub fn from_placement(placement: &Placement) -> Result<Self, DirectoryError> {
        Self::homed(placement, PageState::Remote)
    }

    /// A directory whose pages have their homes where `placement` put them and are all
    /// `state` (`Remote`: the homes hold them; `Zero`: never written, the homes hold nothing
    /// yet).
    pub fn homed(placement: &Placement, state: PageState) -> Result<Self, DirectoryError> {
        for n in placement.nodes() {
            if n > MAX_NODE_ID {
                return Err(DirectoryError::NodeIdTooLarge(n));
            }
        }
        let dir = Self::new(placement.pages());
        for n in placement.nodes() {
            let raw = state.bits() | HOME_BIT | u64::from(n);
            for p in placement.pages_of(n) {
                dir.entries[p as usize].store(raw, Ordering::Relaxed);
            }
        }
        Ok(dir)
    }

    /// A directory like [`Self::from_placement`] with one entry per `per` consecutive pages
    /// (a power of two: 512 for 2 MiB huge pages), for RAM whose faults resolve `per` pages
    /// at a time. Each entry's pages must have one home.
    pub fn coarse(placement: &Placement, per: u64) -> Result<Self, DirectoryError> {
        debug_assert!(per.is_power_of_two());
        let pages = placement.pages();
        if !pages.is_multiple_of(per) {
            return Err(DirectoryError::PartialEntry { pages, per });
        }
        let entries = (0..pages / per)
            .map(|i| {
                let (first, end) = (i * per, (i + 1) * per);
                let home = placement.owner(first);
                if (first + 1..end).any(|p| placement.owner(p) != home) {
                    return Err(DirectoryError::SplitEntry { first, end });
                }
                Ok(AtomicU64::new(match home {
                    Some(n) if n > MAX_NODE_ID => return Err(DirectoryError::NodeIdTooLarge(n)),
                    Some(n) => PageState::Remote.bits() | HOME_BIT | u64::from(n),
                    None => 0,
                }))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            entries,
            pages,
            shift: per.trailing_zeros(),
            loaded_end: pages,
        })
    }

    /// Pages each entry covers (1, or 512 for 2 MiB huge pages).
    pub fn pages_per_entry(&self) -> u64 {
        1 << self.shift
    }

    /// Records that the pages from `page` on were never written (not loaded: past the end
    /// of an image): their entries become [`PageState::Zero`], keeping their homes. In a
    /// coarse directory the entry that holds both kinds stays as it was, its pages from
    /// `page` on reading as zeros ([`Self::loaded_end`]).
    pub fn never_written_from(&mut self, page: u64) {
        let page = page.min(self.loaded_end);
        self.loaded_end = page;
        let first_whole = page.div_ceil(self.pages_per_entry());
        for e in &self.entries[first_whole as usize..] {
            let v = e.load(Ordering::Relaxed);
            e.store(
                (v & !STATE_MASK) | PageState::Zero.bits(),
                Ordering::Relaxed,
            );
        }
    }

    /// The end of the pages whose homes hold them: the pages from here on were never
    /// written ([`Self::never_written_from`]).
    pub fn loaded_end(&self) -> u64 {
        self.loaded_end
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the directory has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The entry of `page`.
    #[inline]
    pub fn entry(&self, page: u64) -> Result<Entry, DirectoryError> {
        self.slot(page)
            .map(|e| Entry::decode(e.load(Ordering::Acquire)))
    }

    /// Owner of `page`.
    #[inline]
    pub fn owner(&self, page: u64) -> Result<PageOwner, DirectoryError> {
        self.entry(page).map(|e| e.owner())
    }

    /// Records `owner` for `page` (`Remote(n)`: not resident, home `n`; `Local`: resident
    /// and the only copy; `Zero`: never written, keeping its home), keeping its heat.
    pub fn set_owner(&self, page: u64, owner: PageOwner) -> Result<(), DirectoryError> {
        if let PageOwner::Remote(n) = owner
            && n > MAX_NODE_ID
        {
            return Err(DirectoryError::NodeIdTooLarge(n));
        }
        let _ = self
            .slot(page)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let keep = v & HEAT_MASK;
                Some(match owner {
                    PageOwner::Remote(n) => {
                        keep | PageState::Remote.bits() | HOME_BIT | u64::from(n)
                    }
                    PageOwner::Local => {
                        keep | PageState::Local.bits() | (v & (HOME_BIT | NODE_MASK))
                    }
                    PageOwner::Zero => keep | PageState::Zero.bits() | (v & (HOME_BIT | NODE_MASK)),
                })
            });
        Ok(())
    }

    /// Moves `page` from `from` to `now` after a fault installed it (one compare-and-swap,
    /// counting the fault in its heat); returns its entry from before, or its state when it
    /// was not `from`.
    #[inline]
    pub fn installed(
        &self,
        page: u64,
        from: PageState,
        now: PageState,
    ) -> Result<Entry, PageState> {
        let Ok(slot) = self.slot(page) else {
            return Err(from);
        };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (PageState::from_bits(v) == from).then(|| {
                let heat = (((v & HEAT_MASK) >> HEAT_SHIFT) + 1).min(u64::from(MAX_HEAT));
                (v & (HOME_BIT | NODE_MASK)) | now.bits() | (heat << HEAT_SHIFT)
            })
        })
        .map(Entry::decode)
        .map_err(PageState::from_bits)
    }

    /// Marks `page` resident here and the only copy after a fault served on it (no budget),
    /// counting the fault in its heat, and returns its previous owner.
    #[inline]
    pub fn claim(&self, page: u64) -> Result<PageOwner, DirectoryError> {
        let prev = self
            .slot(page)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let heat = (((v & HEAT_MASK) >> HEAT_SHIFT) + 1).min(u64::from(MAX_HEAT));
                Some((v & (HOME_BIT | NODE_MASK)) | PageState::Local.bits() | (heat << HEAT_SHIFT))
            })
            .unwrap_or_else(|v| v);
        Ok(Entry::decode(prev).owner())
    }

    /// Moves `page` from `from` to `to` if it is in `from` (one compare-and-swap, keeping
    /// everything else but the prefetched mark of a page being evicted: its use was not
    /// seen before it left); returns its state when it was not.
    #[inline]
    pub fn transition(&self, page: u64, from: PageState, to: PageState) -> Result<(), PageState> {
        let Ok(slot) = self.slot(page) else {
            return Err(from);
        };
        let clear = if to == PageState::Evicting {
            STATE_MASK | PREFETCHED_BIT
        } else {
            STATE_MASK
        };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (PageState::from_bits(v) == from).then_some((v & !clear) | to.bits())
        })
        .map(|_| ())
        .map_err(PageState::from_bits)
    }

    /// Moves `page` from [`PageState::Fetching`] to `now` after the prefetcher installed it,
    /// marking it prefetched if `mark` (its heat stays: no fault was served); returns its
    /// state when it was not `Fetching`.
    pub fn prefetched(&self, page: u64, now: PageState, mark: bool) -> Result<(), PageState> {
        let bit = if mark { PREFETCHED_BIT } else { 0 };
        let Ok(slot) = self.slot(page) else {
            return Err(PageState::Zero);
        };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (PageState::from_bits(v) == PageState::Fetching)
                .then_some((v & !STATE_MASK) | now.bits() | bit)
        })
        .map(|_| ())
        .map_err(PageState::from_bits)
    }

    /// Clears `page`'s prefetched mark; whether it was set (so each prefetched page is
    /// counted used at most once).
    #[inline]
    pub fn take_prefetched(&self, page: u64) -> bool {
        self.slot(page)
            .is_ok_and(|e| e.fetch_and(!PREFETCHED_BIT, Ordering::AcqRel) & PREFETCHED_BIT != 0)
    }

    /// Moves `page` from [`PageState::Evicting`] to `staged` (`StagedClean` or
    /// `StagedDirty`) with its bytes in staging slot `at`.
    pub fn stage(&self, page: u64, at: u32, staged: PageState) -> Result<(), PageState> {
        debug_assert!(staged.is_staged() && at <= MAX_SLOT);
        let Ok(slot) = self.slot(page) else {
            return Err(PageState::Zero);
        };
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (PageState::from_bits(v) == PageState::Evicting).then(|| {
                (v & !(STATE_MASK | SLOT_MASK)) | staged.bits() | (u64::from(at) << SLOT_SHIFT)
            })
        })
        .map(|_| ())
        .map_err(PageState::from_bits)
    }

    /// Faults served on `page` (saturating at [`MAX_HEAT`]).
    pub fn heat(&self, page: u64) -> Result<u32, DirectoryError> {
        self.entry(page).map(|e| e.heat)
    }

    /// Owner and heat of every page, in order.
    pub fn scan(&self) -> impl Iterator<Item = (PageOwner, u32)> + '_ {
        self.entries().map(|e| (e.owner(), e.heat))
    }

    /// Every page's entry, in order (a coarse entry once for each of its pages).
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        let per = 1usize << self.shift;
        self.entries
            .iter()
            .flat_map(move |e| std::iter::repeat_n(Entry::decode(e.load(Ordering::Relaxed)), per))
    }

    /// Pages per owner kind: (zero, local, remote).
    pub fn counts(&self) -> (u64, u64, u64) {
        let per = self.pages_per_entry();
        let mut c = (0, 0, 0);
        for e in self.entries.iter() {
            match Entry::decode(e.load(Ordering::Relaxed)).owner() {
                PageOwner::Zero => c.0 += per,
                PageOwner::Local => c.1 += per,
                PageOwner::Remote(_) => c.2 += per,
            }
        }
        c
    }

    fn slot(&self, page: u64) -> Result<&AtomicU64, DirectoryError> {
        (page < self.pages)
            .then(|| &self.entries[(page >> self.shift) as usize])
            .ok_or(DirectoryError::OutOfRange {
                page,
                pages: self.len(),
            })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn test_page_directory_new() {
        let d = PageDirectory::new(10);
        assert_eq!(d.len(), 10);
        assert_eq!(d.owner(9), Ok(PageOwner::Zero));
        assert_eq!(d.entry(9).unwrap().home, None);
        assert_eq!(
            d.owner(10),
            Err(DirectoryError::OutOfRange {
                page: 10,
                pages: 10
            })
        );
    }

    #[test]
    fn test_page_directory_claim() {
        let d = PageDirectory::new(4);
        d.set_owner(2, PageOwner::Remote(7)).unwrap();
        assert_eq!(d.claim(2), Ok(PageOwner::Remote(7)));
        assert_eq!(d.owner(2), Ok(PageOwner::Local));
        assert_eq!(d.claim(2), Ok(PageOwner::Local));
        assert_eq!(d.counts(), (3, 1, 0));
        assert_eq!(d.heat(2), Ok(2));
        assert_eq!(d.heat(1), Ok(0));
        d.set_owner(2, PageOwner::Remote(3)).unwrap();
        assert_eq!(d.heat(2), Ok(2), "eviction keeps the heat");
        for _ in 0..100 {
            d.claim(2).unwrap();
        }
        assert_eq!(d.heat(2), Ok(MAX_HEAT));
        assert_eq!(d.owner(2), Ok(PageOwner::Local));
        assert_eq!(d.entry(2).unwrap().home, Some(3));
    }

    #[test]
    fn test_page_directory_set_owner_rejects_wide_ids() {
        let d = PageDirectory::new(1);
        assert_eq!(
            d.set_owner(0, PageOwner::Remote(MAX_NODE_ID + 1)),
            Err(DirectoryError::NodeIdTooLarge(MAX_NODE_ID + 1))
        );
    }

    #[test]
    fn transitions_are_compare_and_swap() {
        let p = Placement::interleave(vec![4], 1, 2).unwrap();
        let d = PageDirectory::homed(&p, PageState::Zero).unwrap();
        assert_eq!(d.entry(1).unwrap().home, Some(4));
        assert_eq!(d.entry(1).unwrap().state, PageState::Zero);
        let before = d
            .installed(1, PageState::Zero, PageState::ZeroClean)
            .unwrap();
        assert_eq!(before.state, PageState::Zero);
        assert_eq!(
            d.installed(1, PageState::Zero, PageState::Dirty),
            Err(PageState::ZeroClean),
            "installed only once"
        );
        assert_eq!(
            d.transition(1, PageState::Clean, PageState::Dirty),
            Err(PageState::ZeroClean)
        );
        d.transition(1, PageState::ZeroClean, PageState::Dirty)
            .unwrap();
        d.transition(1, PageState::Dirty, PageState::Evicting)
            .unwrap();
        d.stage(1, 77, PageState::StagedDirty).unwrap();
        let e = d.entry(1).unwrap();
        assert_eq!(
            (e.state, e.home, e.heat, e.slot),
            (PageState::StagedDirty, Some(4), 1, 77)
        );
        assert_eq!(d.owner(1), Ok(PageOwner::Local));
        assert_eq!(
            d.stage(1, 3, PageState::StagedClean),
            Err(PageState::StagedDirty)
        );
        d.transition(1, PageState::StagedDirty, PageState::WritingBack)
            .unwrap();
        // The guest wants it back while it is being written back: the handler wins.
        d.installed(1, PageState::WritingBack, PageState::Dirty)
            .unwrap();
        assert_eq!(
            d.transition(1, PageState::WritingBack, PageState::Remote),
            Err(PageState::Dirty)
        );
        assert_eq!(d.heat(1), Ok(2));
    }

    #[test]
    fn a_fetch_under_way_excludes_the_others_and_prefetch_marks_its_pages() {
        let p = Placement::interleave(vec![4], 1, 3).unwrap();
        let d = PageDirectory::from_placement(&p).unwrap();
        d.transition(0, PageState::Remote, PageState::Fetching)
            .unwrap();
        assert_eq!(
            d.transition(0, PageState::Remote, PageState::Fetching),
            Err(PageState::Fetching),
            "one fetch at a time"
        );
        assert_eq!(d.owner(0), Ok(PageOwner::Remote(4)), "still held there");
        d.prefetched(0, PageState::Local, true).unwrap();
        let e = d.entry(0).unwrap();
        assert_eq!((e.state, e.heat, e.prefetched), (PageState::Local, 0, true));
        assert!(d.take_prefetched(0));
        assert!(!d.take_prefetched(0), "used once");
        assert_eq!(
            d.prefetched(1, PageState::Clean, true),
            Err(PageState::Remote)
        );
        // A prefetched page a fault installs again (after an eviction) loses its mark.
        d.transition(2, PageState::Remote, PageState::Fetching)
            .unwrap();
        d.prefetched(2, PageState::Clean, true).unwrap();
        d.transition(2, PageState::Clean, PageState::Remote)
            .unwrap();
        d.installed(2, PageState::Remote, PageState::Clean).unwrap();
        assert!(!d.entry(2).unwrap().prefetched);
    }

    #[test]
    fn a_coarse_directory_moves_a_huge_page_as_one() {
        let p = Placement::interleave(vec![4, 5], 512, 2048).unwrap();
        let mut d = PageDirectory::coarse(&p, 512).unwrap();
        assert_eq!(
            (d.len(), d.pages_per_entry(), d.entries.len()),
            (2048, 512, 4)
        );
        assert_eq!(d.owner(1023), Ok(PageOwner::Remote(5)));
        d.transition(600, PageState::Remote, PageState::Fetching)
            .unwrap();
        assert_eq!(
            d.transition(1023, PageState::Remote, PageState::Fetching),
            Err(PageState::Fetching),
            "one fetch for the whole huge page"
        );
        assert_eq!(d.claim(512), Ok(PageOwner::Remote(5)));
        assert_eq!(d.counts(), (0, 512, 1536));
        assert_eq!(d.heat(1000), Ok(1));
        assert_eq!(
            d.owner(2048).unwrap_err(),
            DirectoryError::OutOfRange {
                page: 2048,
                pages: 2048
            }
        );
        // An image of 1.5 huge pages and a bit: the third and fourth entries are never
        // written, the second reads as loaded up to page 800.
        d.never_written_from(800);
        assert_eq!(d.loaded_end(), 800);
        assert_eq!(d.owner(1024), Ok(PageOwner::Zero));
        assert_eq!(d.entry(2047).unwrap().home, Some(5));
        assert_eq!(d.owner(0), Ok(PageOwner::Remote(4)));
        assert_eq!(d.counts(), (1024, 512, 512));
        assert_eq!(d.entries().count(), 2048);
        assert_eq!(
            d.scan().filter(|(o, _)| *o == PageOwner::Local).count(),
            512
        );
    }

    #[test]
    fn a_coarse_directory_refuses_a_huge_page_of_two_homes_or_a_partial_one() {
        let p = Placement::interleave(vec![4, 5], 1, 1024).unwrap();
        assert_eq!(
            PageDirectory::coarse(&p, 512).unwrap_err(),
            DirectoryError::SplitEntry { first: 0, end: 512 }
        );
        let p = Placement::interleave(vec![4], 1, 1000).unwrap();
        assert_eq!(
            PageDirectory::coarse(&p, 512).unwrap_err(),
            DirectoryError::PartialEntry {
                pages: 1000,
                per: 512
            }
        );
    }

    #[test]
    fn never_written_pages_of_a_fine_directory_are_zero() {
        let p = Placement::interleave(vec![4], 1, 10).unwrap();
        let mut d = PageDirectory::from_placement(&p).unwrap();
        d.never_written_from(7);
        assert_eq!(d.counts(), (3, 0, 7));
        assert_eq!(d.entry(9).unwrap().home, Some(4));
        d.never_written_from(20);
        assert_eq!(d.loaded_end(), 7, "never written stays so");
    }

    proptest! {
        #[test]
        fn entries_round_trip(node in 0u32..=MAX_NODE_ID, state in 0u64..11, heat in 0u64..64, slot in 0u64..=u64::from(MAX_SLOT), homed: bool) {
            let v = (state << STATE_SHIFT) | (heat << HEAT_SHIFT) | (slot << SLOT_SHIFT)
                | if homed { HOME_BIT | u64::from(node) } else { 0 };
            let e = Entry::decode(v);
            prop_assert_eq!(e.state.bits() >> STATE_SHIFT, state);
            prop_assert_eq!(e.home, homed.then_some(node));
            prop_assert_eq!((u64::from(e.heat), u64::from(e.slot)), (heat, slot));
        }

        #[test]
        fn directory_matches_placement(nodes in proptest::collection::hash_set(0u32..1000, 1..5), g in 1u32..5, pages in 1u64..2000) {
            let nodes: Vec<u32> = nodes.into_iter().collect();
            let p = Placement::interleave(nodes, g, pages).unwrap();
            let d = PageDirectory::from_placement(&p).unwrap();
            for pg in 0..pages {
                prop_assert_eq!(d.owner(pg).unwrap(), PageOwner::Remote(p.owner(pg).unwrap()));
            }
            prop_assert_eq!(d.counts(), (0, 0, pages));
        }
    }
}
