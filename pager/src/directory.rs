//! The page directory: who owns each guest page.
//!
//! One `AtomicU32` per 4 KiB page (4 bytes per page: 1 MiB of directory per GiB of guest
//! memory), readable without locks by the fault handler, stats and later eviction:
//!
//! ```text
//!  31 30 29          24 23                        0
//! +-----+--------------+--------------------------+
//! |state|     heat     |         node id          |
//! +-----+--------------+--------------------------+
//! state: 0 = Zero     never written anywhere: zero-filled locally on first touch
//!        1 = Local    resident in this node's guest memory
//!        2 = Remote   held by `node id`; fetched (and claimed) on first touch
//! heat:  faults served on this page, saturating at 63 (the console's heat map)
//! ```
//!
//! Node ids are therefore limited to 24 bits ([`MAX_NODE_ID`]).

use std::sync::atomic::{AtomicU32, Ordering};

use pagemesh_api::{NodeId, Placement};

/// Largest node id a directory entry can hold.
pub const MAX_NODE_ID: NodeId = (1 << 24) - 1;

const STATE_SHIFT: u32 = 30;
const HEAT_SHIFT: u32 = 24;
/// Largest heat an entry records.
pub const MAX_HEAT: u32 = 63;
const HEAT_MASK: u32 = MAX_HEAT << HEAT_SHIFT;
const ZERO: u32 = 0;
const LOCAL: u32 = 1;
const REMOTE: u32 = 2;

/// Who owns a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageOwner {
    /// Never written: no node holds it; it reads as zeros.
    Zero,
    /// Resident in this node's guest memory.
    Local,
    /// Held by another node.
    Remote(NodeId),
}

impl PageOwner {
    fn encode(self) -> u32 {
        match self {
            PageOwner::Zero => ZERO << STATE_SHIFT,
            PageOwner::Local => LOCAL << STATE_SHIFT,
            PageOwner::Remote(n) => (REMOTE << STATE_SHIFT) | (n & MAX_NODE_ID),
        }
    }

    fn decode(raw: u32) -> Self {
        match raw >> STATE_SHIFT {
            LOCAL => PageOwner::Local,
            REMOTE => PageOwner::Remote(raw & MAX_NODE_ID),
            _ => PageOwner::Zero,
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
    /// The placement is for a different number of pages.
    #[error("the placement covers {placement} pages but the guest has {pages}")]
    SizeMismatch {
        /// Pages in the placement.
        placement: u64,
        /// Pages in the directory.
        pages: u64,
    },
}

/// Owner of every page of one guest's RAM.
#[derive(Debug)]
pub struct PageDirectory {
    entries: Box<[AtomicU32]>,
}

impl PageDirectory {
    /// A directory of `pages` never-written pages.
    pub fn new(pages: u64) -> Self {
        let entries = (0..pages).map(|_| AtomicU32::new(ZERO)).collect();
        Self { entries }
    }

    /// A directory whose pages are held where `placement` put them.
    pub fn from_placement(placement: &Placement) -> Result<Self, DirectoryError> {
        let pages = placement.pages();
        for n in placement.nodes() {
            if n > MAX_NODE_ID {
                return Err(DirectoryError::NodeIdTooLarge(n));
            }
        }
        let dir = Self::new(pages);
        for n in placement.nodes() {
            let raw = PageOwner::Remote(n).encode();
            for p in placement.pages_of(n) {
                dir.entries[p as usize].store(raw, Ordering::Relaxed);
            }
        }
        Ok(dir)
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Whether the directory has no pages.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Owner of `page`.
    #[inline]
    pub fn owner(&self, page: u64) -> Result<PageOwner, DirectoryError> {
        self.entry(page)
            .map(|e| PageOwner::decode(e.load(Ordering::Acquire)))
    }

    /// Records `owner` for `page`, keeping its heat.
    pub fn set_owner(&self, page: u64, owner: PageOwner) -> Result<(), DirectoryError> {
        if let PageOwner::Remote(n) = owner
            && n > MAX_NODE_ID
        {
            return Err(DirectoryError::NodeIdTooLarge(n));
        }
        let raw = owner.encode();
        let _ = self
            .entry(page)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(raw | (v & HEAT_MASK))
            });
        Ok(())
    }

    /// Marks `page` resident here after a fault served on it, counting the fault in its
    /// heat, and returns its previous owner.
    #[inline]
    pub fn claim(&self, page: u64) -> Result<PageOwner, DirectoryError> {
        let local = PageOwner::Local.encode();
        let prev = self
            .entry(page)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let heat = ((v & HEAT_MASK) >> HEAT_SHIFT)
                    .saturating_add(1)
                    .min(MAX_HEAT);
                Some(local | (heat << HEAT_SHIFT))
            })
            .unwrap_or_else(|v| v);
        Ok(PageOwner::decode(prev))
    }

    /// Faults served on `page` (saturating at [`MAX_HEAT`]).
    pub fn heat(&self, page: u64) -> Result<u32, DirectoryError> {
        self.entry(page)
            .map(|e| (e.load(Ordering::Relaxed) & HEAT_MASK) >> HEAT_SHIFT)
    }

    /// Owner and heat of every page, in order.
    pub fn scan(&self) -> impl Iterator<Item = (PageOwner, u32)> + '_ {
        self.entries.iter().map(|e| {
            let v = e.load(Ordering::Relaxed);
            (PageOwner::decode(v), (v & HEAT_MASK) >> HEAT_SHIFT)
        })
    }

    /// Pages per owner kind: (zero, local, remote).
    pub fn counts(&self) -> (u64, u64, u64) {
        let mut c = (0, 0, 0);
        for e in self.entries.iter() {
            match PageOwner::decode(e.load(Ordering::Relaxed)) {
                PageOwner::Zero => c.0 += 1,
                PageOwner::Local => c.1 += 1,
                PageOwner::Remote(_) => c.2 += 1,
            }
        }
        c
    }

    fn entry(&self, page: u64) -> Result<&AtomicU32, DirectoryError> {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.entries.get(i))
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
    }

    #[test]
    fn test_page_directory_set_owner_rejects_wide_ids() {
        let d = PageDirectory::new(1);
        assert_eq!(
            d.set_owner(0, PageOwner::Remote(MAX_NODE_ID + 1)),
            Err(DirectoryError::NodeIdTooLarge(MAX_NODE_ID + 1))
        );
    }

    proptest! {
        #[test]
        fn owners_round_trip(node in 0u32..=MAX_NODE_ID, kind in 0u8..3) {
            let owner = match kind { 0 => PageOwner::Zero, 1 => PageOwner::Local, _ => PageOwner::Remote(node) };
            prop_assert_eq!(PageOwner::decode(owner.encode()), owner);
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
