//! Page placement: which memory node initially holds each page of a VM.
//!
//! A placement is compact (a few words, whatever the VM's size) and answers
//! [`Placement::owner`] in O(1) for `interleave` and O(log ranges) for `ranges`. The
//! coordinator resolves a [`crate::PlacementRequest`] into one; memory nodes load the pages
//! [`Placement::pages_of`] gives them; compute nodes seed their page directory from
//! [`Placement::owner`].

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// A run of `pages` pages starting at `start`, all held by `node`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PageRange {
    /// First page index.
    pub start: u64,
    /// Number of pages.
    pub pages: u64,
    /// Node holding them.
    pub node: NodeId,
}

/// Why a placement cannot be built.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// No memory node to place pages on.
    #[error("no memory nodes to place pages on; start a node with --role memory first")]
    NoNodes,
    /// A VM must have at least one page.
    #[error("a VM needs at least one page of memory")]
    NoPages,
    /// More pages than [`MAX_PAGES`].
    #[error("a VM has at most 2^40 pages (4 PiB of memory); this one would have {0}")]
    TooManyPages(u64),
    /// Interleave granule of zero.
    #[error("granule_pages must be at least 1")]
    ZeroGranule,
    /// A node id appears twice in an interleave list.
    #[error("node {0} is listed twice")]
    DuplicateNode(NodeId),
    /// The ranges leave a gap or overlap.
    #[error("ranges must cover pages 0..{pages} exactly once; page {page} is {problem}")]
    BadCover {
        /// Total pages of the VM.
        pages: u64,
        /// First page where the cover breaks.
        page: u64,
        /// "not covered" or "covered twice".
        problem: &'static str,
    },
    /// Weighted placement over nodes that offer no capacity.
    #[error("the memory nodes offer no capacity to weigh by")]
    NoCapacity,
}

/// Most pages a VM may have: 2^40 (4 PiB), so that page arithmetic never overflows.
pub const MAX_PAGES: u64 = 1 << 40;

/// A resolved placement of a VM's pages.
///
/// It is only ever valid: the constructors check it, and so does decoding (through
/// [`wire::Placement`]), since nodes take placements from the coordinator's JSON and do
/// arithmetic on them (a zero granule would divide by zero, ranges could overflow).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase", tag = "policy", try_from = "wire::Placement")]
pub enum Placement {
    /// Page `p` is held by `nodes[(p / granule_pages) % nodes.len()]`.
    Interleave {
        /// Memory nodes, in round-robin order.
        nodes: Vec<NodeId>,
        /// Consecutive pages on one node.
        granule_pages: u32,
        /// Pages of the VM.
        pages: u64,
    },
    /// Sorted, contiguous runs covering `0..pages`.
    Ranges {
        /// The runs, sorted by `start`.
        ranges: Vec<PageRange>,
    },
}

impl Placement {
    /// Round-robin placement.
    pub fn interleave(
        nodes: Vec<NodeId>,
        granule_pages: u32,
        pages: u64,
    ) -> Result<Self, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        if pages == 0 {
            return Err(PlacementError::NoPages);
        }
        if pages > MAX_PAGES {
            return Err(PlacementError::TooManyPages(pages));
        }
        if granule_pages == 0 {
            return Err(PlacementError::ZeroGranule);
        }
        let mut seen = nodes.clone();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(PlacementError::DuplicateNode(w[0]));
        }
        Ok(Placement::Interleave {
            nodes,
            granule_pages,
            pages,
        })
    }

    /// Placement by explicit ranges, which must cover `0..pages` exactly once. Adjacent runs
    /// on the same node are merged.
    pub fn ranges(mut ranges: Vec<PageRange>, pages: u64) -> Result<Self, PlacementError> {
        if pages == 0 {
            return Err(PlacementError::NoPages);
        }
        if pages > MAX_PAGES {
            return Err(PlacementError::TooManyPages(pages));
        }
        ranges.retain(|r| r.pages > 0);
        ranges.sort_by_key(|r| r.start);
        let mut next = 0u64;
        let mut merged: Vec<PageRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.start != next {
                let (page, problem) = if r.start > next {
                    (next, "not covered")
                } else {
                    (r.start, "covered twice")
                };
                return Err(PlacementError::BadCover {
                    pages,
                    page,
                    problem,
                });
            }
            // r.start == next <= MAX_PAGES, so only a huge run can pass the end here.
            next = match r.start.checked_add(r.pages) {
                Some(end) if end <= MAX_PAGES => end,
                _ => {
                    return Err(PlacementError::TooManyPages(
                        r.start.saturating_add(r.pages),
                    ));
                }
            };
            match merged.last_mut() {
                Some(last) if last.node == r.node => last.pages += r.pages,
                _ => merged.push(r),
            }
        }
        if next != pages {
            let (page, problem) = if next < pages {
                (next, "not covered")
            } else {
                (pages, "covered twice")
            };
            return Err(PlacementError::BadCover {
                pages,
                page,
                problem: if next > pages {
                    "beyond the end"
                } else {
                    problem
                },
            });
        }
        Ok(Placement::Ranges { ranges: merged })
    }

    /// Contiguous shares proportional to capacity, in the order given.
    pub fn weighted(nodes: &[(NodeId, u64)], pages: u64) -> Result<Self, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        let total: u128 = nodes.iter().map(|&(_, c)| u128::from(c)).sum();
        if total == 0 {
            return Err(PlacementError::NoCapacity);
        }
        let mut ranges = Vec::with_capacity(nodes.len());
        let mut start = 0u64;
        let mut acc: u128 = 0;
        for (i, &(node, cap)) in nodes.iter().enumerate() {
            acc += u128::from(cap);
            let end = if i + 1 == nodes.len() {
                pages
            } else {
                // acc <= total, so the quotient is at most `pages` and fits in u64.
                u64::try_from(u128::from(pages) * acc / total).unwrap_or(pages)
            };
            ranges.push(PageRange {
                start,
                pages: end - start,
                node,
            });
            start = end;
        }
        Self::ranges(ranges, pages)
    }

    /// Pages of the VM.
    pub fn pages(&self) -> u64 {
        match self {
            Placement::Interleave { pages, .. } => *pages,
            Placement::Ranges { ranges } => ranges.last().map_or(0, |r| r.start + r.pages),
        }
    }

    /// The node initially holding `page`, or `None` past the end.
    pub fn owner(&self, page: u64) -> Option<NodeId> {
        match self {
            Placement::Interleave {
                nodes,
                granule_pages,
                pages,
            } => {
                if page >= *pages {
                    return None;
                }
                let slot = (page / u64::from(*granule_pages)) % nodes.len() as u64;
                // slot < nodes.len(), which is a usize.
                Some(nodes[usize::try_from(slot).ok()?])
            }
            Placement::Ranges { ranges } => {
                let i = ranges.partition_point(|r| r.start + r.pages <= page);
                ranges.get(i).filter(|r| r.start <= page).map(|r| r.node)
            }
        }
    }

    /// Every node that holds pages, without repetition.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = match self {
            Placement::Interleave { nodes, .. } => nodes.clone(),
            Placement::Ranges { ranges } => ranges.iter().map(|r| r.node).collect(),
        };
        let mut seen = std::collections::HashSet::new();
        out.retain(|n| seen.insert(*n));
        out
    }

    /// The pages `node` initially holds, in increasing order.
    pub fn pages_of(&self, node: NodeId) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            Placement::Interleave {
                nodes,
                granule_pages,
                pages,
            } => {
                let Some(slot) = nodes.iter().position(|&n| n == node) else {
                    return Box::new(std::iter::empty());
                };
                let g = u64::from(*granule_pages);
                let stride = g * nodes.len() as u64;
                let first = slot as u64 * g;
                let pages = *pages;
                Box::new(
                    (first..pages)
                        .step_by(usize::try_from(stride).unwrap_or(usize::MAX))
                        .flat_map(move |s| s..(s + g).min(pages)),
                )
            }
            Placement::Ranges { ranges } => Box::new(
                ranges
                    .iter()
                    .filter(move |r| r.node == node)
                    .flat_map(|r| r.start..r.start + r.pages),
            ),
        }
    }

    /// How many pages `node` initially holds.
    pub fn count_of(&self, node: NodeId) -> u64 {
        match self {
            Placement::Interleave {
                nodes,
                granule_pages,
                pages,
            } => {
                let Some(slot) = nodes.iter().position(|&n| n == node) else {
                    return 0;
                };
                let g = u64::from(*granule_pages);
                let stride = g * nodes.len() as u64;
                let full = pages / stride;
                let rest = pages % stride;
                let first = slot as u64 * g;
                full * g + rest.saturating_sub(first).min(g)
            }
            Placement::Ranges { ranges } => ranges
                .iter()
                .filter(|r| r.node == node)
                .map(|r| r.pages)
                .sum(),
        }
    }
}

/// Most homes a page can have (`--replicas`).
pub const MAX_REPLICAS: u32 = 4;

/// Where the copies of a VM's pages are, with `replicas` copies of each page.
///
/// Copy 0 of a page is where the [`Placement`] puts it; copy `k` is on the node `k` places
/// after that one in [`Placement::nodes`] (wrapping round). So a page's homes are distinct
/// nodes, and a node's death leaves each of its pages on the next nodes of the list: the
/// load spreads over the survivors rather than falling on one. Made once per VM: the homes
/// of a page are then found without allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replicas {
    /// [`Placement::nodes`], in order.
    nodes: Vec<NodeId>,
    /// Copies of each page.
    copies: u32,
}

/// Why a VM cannot have the replicas asked for.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    /// Zero or more than [`MAX_REPLICAS`] copies.
    #[error("replicas must be 1 to {MAX_REPLICAS}, got {0}")]
    OutOfRange(u32),
    /// More copies than nodes to put them on.
    #[error(
        "{replicas} replicas need {replicas} memory nodes, and the placement has {nodes}; start \
         more memory nodes or ask for fewer replicas"
    )]
    TooFewNodes {
        /// Copies asked for.
        replicas: u32,
        /// Distinct nodes of the placement.
        nodes: usize,
    },
}

/// The homes of one page: its copies' nodes, copy 0 first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Homes {
    nodes: [NodeId; MAX_REPLICAS as usize],
    len: usize,
}

impl Homes {
    /// `node` alone.
    pub fn only(node: NodeId) -> Self {
        Homes {
            nodes: [node; MAX_REPLICAS as usize],
            len: 1,
        }
    }
}

impl std::ops::Deref for Homes {
    type Target = [NodeId];

    fn deref(&self) -> &[NodeId] {
        &self.nodes[..self.len]
    }
}

impl Replicas {
    /// `copies` copies of every page of `placement`.
    pub fn new(placement: &Placement, copies: u32) -> Result<Self, ReplicaError> {
        if copies == 0 || copies > MAX_REPLICAS {
            return Err(ReplicaError::OutOfRange(copies));
        }
        let nodes = placement.nodes();
        if nodes.len() < copies as usize {
            return Err(ReplicaError::TooFewNodes {
                replicas: copies,
                nodes: nodes.len(),
            });
        }
        Ok(Replicas { nodes, copies })
    }

    /// Copies of each page.
    pub fn copies(&self) -> u32 {
        self.copies
    }

    /// The homes of a page whose copy 0 is on `first`: `first`, then the next nodes in
    /// turn. A node that is not in the placement is the only home.
    pub fn homes(&self, first: NodeId) -> Homes {
        let mut out = Homes::only(first);
        if let Some(at) = self.nodes.iter().position(|&n| n == first) {
            let m = self.nodes.len();
            for k in 1..self.copies as usize {
                out.nodes[k] = self.nodes[(at + k) % m];
            }
            out.len = self.copies as usize;
        }
        out
    }

    /// The homes of a page whose copy 0 is on `first` once the nodes in `gone` are
    /// replaced: the first [`Replicas::copies`] nodes from `first` on in the placement's
    /// order (wrapping round) that are not gone; fewer if fewer are left. So a dead node's
    /// copy moves to the next live node after the page's others, and the pages of live
    /// nodes keep their homes.
    pub fn homes_without(&self, first: NodeId, gone: &[NodeId]) -> Homes {
        if gone.is_empty() {
            return self.homes(first);
        }
        let Some(at) = self.nodes.iter().position(|&n| n == first) else {
            return Homes::only(first);
        };
        let m = self.nodes.len();
        let mut out = Homes::only(first);
        out.len = 0;
        for k in 0..m {
            let n = self.nodes[(at + k) % m];
            if out.len == self.copies as usize {
                break;
            }
            if !gone.contains(&n) {
                out.nodes[out.len] = n;
                out.len += 1;
            }
        }
        out
    }

    /// The nodes whose pages `node` holds a copy of: itself (copy 0), then the one before
    /// it (copy 1), and so on.
    fn copied_from(&self, node: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let m = self.nodes.len();
        let at = self.nodes.iter().position(|&n| n == node);
        at.into_iter().flat_map(move |at| {
            (0..self.copies as usize).map(move |k| self.nodes[(at + m - k) % m])
        })
    }

    /// The pages of `placement` (the one these replicas were made for) of which `node`
    /// holds a copy: its own pages in increasing order, then those it holds copy 1 of, and
    /// so on (each part in increasing order; no page twice).
    pub fn pages_held_by<'a>(
        &'a self,
        placement: &'a Placement,
        node: NodeId,
    ) -> impl Iterator<Item = u64> + 'a {
        self.copied_from(node).flat_map(|n| placement.pages_of(n))
    }

    /// How many pages of `placement` `node` holds a copy of.
    pub fn count_held_by(&self, placement: &Placement, node: NodeId) -> u64 {
        self.copied_from(node).map(|n| placement.count_of(n)).sum()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_copies_of_each_page_are_on_distinct_nodes_and_each_node_holds_its_share() {
        let p = Placement::interleave(vec![3, 1, 2], 1, 9).unwrap();
        let r = Replicas::new(&p, 2).unwrap();
        assert_eq!(&*r.homes(3), [3, 1]);
        assert_eq!(&*r.homes(2), [2, 3]);
        assert_eq!(&*r.homes(7), [7], "not in the placement");
        // Node 1 holds copy 0 of pages 1, 4, 7 and copy 1 of those of node 3: 0, 3, 6.
        assert_eq!(
            r.pages_held_by(&p, 1).collect::<Vec<_>>(),
            [1, 4, 7, 0, 3, 6]
        );
        assert_eq!(r.count_held_by(&p, 1), 6);
        assert_eq!(r.pages_held_by(&p, 9).count(), 0);
        assert_eq!(
            Replicas::new(&p, 4),
            Err(ReplicaError::TooFewNodes {
                replicas: 4,
                nodes: 3
            })
        );
        assert_eq!(Replicas::new(&p, 0), Err(ReplicaError::OutOfRange(0)));
        assert_eq!(&*Replicas::new(&p, 1).unwrap().homes(1), [1]);
    }

    #[test]
    fn a_dead_nodes_copies_move_to_the_next_live_node() {
        let p = Placement::interleave(vec![1, 2, 3], 1, 9).unwrap();
        let r = Replicas::new(&p, 2).unwrap();
        assert_eq!(&*r.homes_without(1, &[]), [1, 2]);
        assert_eq!(&*r.homes_without(1, &[2]), [1, 3]);
        assert_eq!(&*r.homes_without(2, &[2]), [3, 1]);
        assert_eq!(&*r.homes_without(3, &[2]), [3, 1], "untouched");
        assert_eq!(&*r.homes_without(1, &[2, 3]), [1], "fewer left than copies");
        assert_eq!(r.homes_without(2, &[1, 2, 3]).len(), 0);
        assert_eq!(&*r.homes_without(7, &[2]), [7], "not in the placement");
    }

    #[test]
    fn decoding_checks_the_placement() {
        let bad = [
            (
                r#"{"policy":"interleave","nodes":[1],"granule_pages":0,"pages":5}"#,
                "granule_pages",
            ),
            (
                r#"{"policy":"interleave","nodes":[],"granule_pages":1,"pages":5}"#,
                "no memory nodes",
            ),
            (
                r#"{"policy":"interleave","nodes":[1,1],"granule_pages":1,"pages":5}"#,
                "twice",
            ),
            (
                r#"{"policy":"interleave","nodes":[1],"granule_pages":1,"pages":0}"#,
                "at least one page",
            ),
            (
                r#"{"policy":"interleave","nodes":[1],"granule_pages":1,"pages":18446744073709551615}"#,
                "at most 2^40 pages",
            ),
            (
                r#"{"policy":"ranges","ranges":[{"start":1,"pages":2,"node":1}]}"#,
                "not covered",
            ),
            (
                r#"{"policy":"ranges","ranges":[{"start":0,"pages":18446744073709551615,"node":1},{"start":18446744073709551615,"pages":5,"node":1}]}"#,
                "at most 2^40 pages",
            ),
        ];
        for (json, why) in bad {
            let err = serde_json::from_str::<Placement>(json)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{json}: {err}");
        }
        let good = r#"{"policy":"ranges","ranges":[{"start":0,"pages":2,"node":1},{"start":2,"pages":3,"node":2}]}"#;
        let p: Placement = serde_json::from_str(good).unwrap();
        assert_eq!((p.pages(), p.count_of(2), p.owner(4)), (5, 3, Some(2)));
        assert_eq!(serde_json::to_string(&p).unwrap(), good);
    }

    use proptest::prelude::*;

    use super::*;

    fn node_list() -> impl Strategy<Value = Vec<NodeId>> {
        proptest::collection::hash_set(0u32..50, 1..6).prop_map(|s| s.into_iter().collect())
    }

    proptest! {
        #[test]
        fn every_copy_of_every_page_is_held_where_its_homes_say(nodes in node_list(), g in 1u32..5, pages in 1u64..500, copies in 1u32..=MAX_REPLICAS) {
            let p = Placement::interleave(nodes.clone(), g, pages).unwrap();
            let Ok(r) = Replicas::new(&p, copies) else {
                prop_assert!(copies as usize > nodes.len());
                return Ok(());
            };
            let mut held = std::collections::BTreeSet::new();
            for &n in &nodes {
                prop_assert_eq!(r.pages_held_by(&p, n).count() as u64, r.count_held_by(&p, n));
                for pg in r.pages_held_by(&p, n) {
                    prop_assert!(held.insert((pg, n)), "page {} twice on {}", pg, n);
                }
            }
            for pg in 0..pages {
                let homes = r.homes(p.owner(pg).unwrap());
                prop_assert_eq!(homes.len(), copies as usize);
                let distinct: std::collections::BTreeSet<_> = homes.iter().collect();
                prop_assert_eq!(distinct.len(), homes.len());
                for &h in homes.iter() {
                    prop_assert!(held.remove(&(pg, h)));
                }
            }
            prop_assert!(held.is_empty());
        }

        #[test]
        fn interleave_partitions_pages(nodes in node_list(), g in 1u32..9, pages in 1u64..3000) {
            let p = Placement::interleave(nodes.clone(), g, pages).unwrap();
            let mut seen = vec![0u32; usize::try_from(pages).unwrap()];
            for &n in &nodes {
                let mine: Vec<u64> = p.pages_of(n).collect();
                prop_assert_eq!(mine.len() as u64, p.count_of(n));
                prop_assert!(mine.windows(2).all(|w| w[0] < w[1]));
                for pg in mine {
                    prop_assert_eq!(p.owner(pg), Some(n));
                    seen[usize::try_from(pg).unwrap()] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
            prop_assert_eq!(p.owner(pages), None);
        }

        #[test]
        fn weighted_partitions_pages(caps in proptest::collection::vec(0u64..1000, 1..5), pages in 1u64..5000) {
            let nodes: Vec<(NodeId, u64)> = caps.iter().enumerate().map(|(i, &c)| (i as u32 + 1, c)).collect();
            let total: u64 = caps.iter().sum();
            let placed = Placement::weighted(&nodes, pages);
            if total == 0 {
                prop_assert_eq!(placed, Err(PlacementError::NoCapacity));
                return Ok(());
            }
            let p = placed.unwrap();
            prop_assert_eq!(p.pages(), pages);
            let counted: u64 = nodes.iter().map(|&(n, _)| p.count_of(n)).sum();
            prop_assert_eq!(counted, pages);
            for pg in 0..pages {
                let o = p.owner(pg).unwrap();
                prop_assert!(p.pages_of(o).any(|x| x == pg));
            }
        }

        #[test]
        fn ranges_accept_exact_covers_only(cuts in proptest::collection::btree_set(1u64..500, 0..6), pages in 500u64..600, shift in 0u64..3) {
            let mut bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(pages)).collect();
            bounds.dedup();
            let mut ranges: Vec<PageRange> = bounds.windows(2).enumerate()
                .map(|(i, w)| PageRange { start: w[0], pages: w[1] - w[0], node: (i % 3) as u32 })
                .collect();
            let good = Placement::ranges(ranges.clone(), pages).unwrap();
            for pg in 0..pages {
                prop_assert!(good.owner(pg).is_some());
            }
            prop_assert_eq!(good.owner(pages), None);
            if shift > 0 {
                ranges[0].start += shift;
                prop_assert!(Placement::ranges(ranges, pages).is_err());
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            Placement::interleave(vec![], 1, 10),
            Err(PlacementError::NoNodes)
        );
        assert_eq!(
            Placement::interleave(vec![1, 1], 1, 10),
            Err(PlacementError::DuplicateNode(1))
        );
        assert_eq!(
            Placement::interleave(vec![1], 0, 10),
            Err(PlacementError::ZeroGranule)
        );
        let overlap = vec![
            PageRange {
                start: 0,
                pages: 6,
                node: 1,
            },
            PageRange {
                start: 5,
                pages: 5,
                node: 2,
            },
        ];
        assert!(matches!(
            Placement::ranges(overlap, 10),
            Err(PlacementError::BadCover { page: 5, .. })
        ));
    }

    #[test]
    fn serde_shape_is_stable() {
        let p = Placement::interleave(vec![1, 2], 1, 4).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"policy":"interleave","nodes":[1,2],"granule_pages":1,"pages":4}"#
        );
    }
}

/// The placement as it is written, before it is checked: what [`Placement`] decodes through.
pub mod wire {
    use serde::Deserialize;

    use super::{PageRange, PlacementError};
    use crate::NodeId;

    /// [`super::Placement`]'s JSON, unchecked.
    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase", tag = "policy")]
    pub enum Placement {
        /// See [`super::Placement::Interleave`].
        Interleave {
            /// Memory nodes, in round-robin order.
            nodes: Vec<NodeId>,
            /// Consecutive pages on one node.
            granule_pages: u32,
            /// Pages of the VM.
            pages: u64,
        },
        /// See [`super::Placement::Ranges`].
        Ranges {
            /// The runs.
            ranges: Vec<PageRange>,
        },
    }

    impl TryFrom<Placement> for super::Placement {
        type Error = PlacementError;

        fn try_from(p: Placement) -> Result<Self, PlacementError> {
            match p {
                Placement::Interleave {
                    nodes,
                    granule_pages,
                    pages,
                } => super::Placement::interleave(nodes, granule_pages, pages),
                Placement::Ranges { ranges } => {
                    let end = ranges
                        .iter()
                        .try_fold(0u64, |sum, r| sum.checked_add(r.pages))
                        .ok_or(PlacementError::TooManyPages(u64::MAX))?;
                    super::Placement::ranges(ranges, end)
                }
            }
        }
    }
}
