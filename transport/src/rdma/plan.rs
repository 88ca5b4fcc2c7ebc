//! From page slots to RDMA READs: where a memory node's slots are in the memory it
//! registered ([`SlotLayout`], from its [`RdmaEndpoint`]), and the reads that bring a run
//! of pages into a local buffer ([`plan_reads`]), slots that follow each other in one
//! region read together. Both work without an RDMA device, so they are tested here; the
//! reads are posted by [`super::verbs`] (feature `rdma`).
//!
//! Each read of pages comes with the read of their tags ([`ReadOp::tags`]), which the
//! memory node keeps after each region (`pagemesh_api::rdma` says how): a reader checks
//! them before it uses a page.
//!
//! Planning allocates nothing: the layout is built once per peer, the reads go into an
//! array the caller owns ([`MAX_READS`] long, a run's most).

use pagemesh_api::PAGE_SIZE;
use pagemesh_api::rdma::{RdmaEndpoint, RdmaEndpointError, RdmaRegion, TAG_BYTES};

/// Bytes of a page.
const PAGE: u64 = PAGE_SIZE as u64;

/// The most reads one run needs: one per page.
pub const MAX_READS: usize = pagemesh_protocol::MAX_RUN_PAGES as usize;

/// The most READs one post carries: a run's page READs and their tag READs.
pub const MAX_OPS: usize = 2 * MAX_READS;

/// A memory node's slots in its registered regions: slot 0 at the first region's start,
/// each region's pages in order, then the next region's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    /// Each region with the first slot it holds, in slot order.
    regions: Vec<(u64, RdmaRegion)>,
    /// Slots in all.
    slots: u64,
}

/// Where one slot is: its remote address, the key that reads it, and how many slots from
/// it on are in the same region (readable with it in one READ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemotePage {
    /// Address of the slot's page in the memory node.
    pub addr: u64,
    /// Remote key of its region.
    pub rkey: u32,
    /// Slots from this one to the end of its region, this one included.
    pub left_in_region: u64,
    /// Address of the slot's tag (after the region's slots).
    pub tag_addr: u64,
}

impl SlotLayout {
    /// The layout of `endpoint`'s regions; an endpoint a reader could not use is refused.
    pub fn new(endpoint: &RdmaEndpoint) -> Result<Self, RdmaEndpointError> {
        endpoint.check()?;
        let mut first = 0;
        let regions = endpoint
            .regions
            .iter()
            .map(|r| {
                let at = first;
                first += r.len / PAGE;
                (at, *r)
            })
            .collect();
        Ok(SlotLayout {
            regions,
            slots: first,
        })
    }

    /// Slots in all.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Where `slot` is; `None` past the last region.
    pub fn locate(&self, slot: u32) -> Option<RemotePage> {
        let slot = u64::from(slot);
        // The last region starting at or before the slot.
        let i = self.regions.partition_point(|(first, _)| *first <= slot);
        let (first, region) = self.regions.get(i.checked_sub(1)?)?;
        let pages = region.len / PAGE;
        let within = slot - first;
        (within < pages).then(|| RemotePage {
            addr: region.addr + within * PAGE,
            rkey: region.rkey,
            left_in_region: pages - within,
            tag_addr: region.addr + region.len + within * TAG_BYTES,
        })
    }
}

/// One RDMA READ: `len` bytes from `remote_addr` (under `rkey`) to `local_offset` in the
/// run's buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOp {
    /// Where the bytes go, from the start of the run's buffer.
    pub local_offset: usize,
    /// Where they are in the memory node.
    pub remote_addr: u64,
    /// The key of the region they are in.
    pub rkey: u32,
    /// How many bytes, whole pages (a tag read: [`TAG_BYTES`] a page).
    pub len: u32,
    /// Where the tag of the first page read is in the memory node (the tags of the others
    /// follow it).
    pub tag_addr: u64,
}

impl ReadOp {
    /// The read of the tags of this read's pages into a tag buffer at `tags_offset` of the
    /// local buffer: page *i* of the run's tag lands at `tags_offset + 8i`.
    pub fn tags(&self, tags_offset: usize) -> ReadOp {
        let first = self.local_offset / PAGE_SIZE;
        let pages = self.len / PAGE_SIZE as u32;
        ReadOp {
            local_offset: tags_offset + first * TAG_BYTES as usize,
            remote_addr: self.tag_addr,
            rkey: self.rkey,
            len: pages * TAG_BYTES as u32,
            tag_addr: 0,
        }
    }
}

/// Why a run cannot be read.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// More pages than one run carries.
    #[error("a run of {0} pages is longer than the {MAX_READS} one request may carry")]
    TooLong(usize),
    /// A slot the memory node did not register.
    #[error(
        "page {index} of the run is in slot {slot}, past the {slots} slots the memory node registered"
    )]
    UnknownSlot {
        /// Its place in the run.
        index: usize,
        /// The slot.
        slot: u32,
        /// Slots the memory node registered.
        slots: u64,
    },
}

/// The reads that bring a run of pages into a buffer of the run (page *i* at offset
/// *i × 4096*), page *i* being in `slots[i]` of the memory node laid out as `layout`: pages
/// in consecutive slots of one region are one read. Written into `out`, returned as the
/// part of it used.
pub fn plan_reads<'a>(
    layout: &SlotLayout,
    slots: &[u32],
    out: &'a mut [ReadOp; MAX_READS],
) -> Result<&'a [ReadOp], PlanError> {
    if slots.len() > MAX_READS {
        return Err(PlanError::TooLong(slots.len()));
    }
    let mut n = 0;
    // The read being built, and how many more slots its region holds after its last.
    let mut open: Option<(ReadOp, u64)> = None;
    for (index, &slot) in slots.iter().enumerate() {
        let at = layout.locate(slot).ok_or(PlanError::UnknownSlot {
            index,
            slot,
            slots: layout.slots(),
        })?;
        if let Some((op, left)) = &mut open
            && *left > 0
            && op.rkey == at.rkey
            && op.remote_addr + u64::from(op.len) == at.addr
        {
            op.len += PAGE_SIZE as u32;
            *left -= 1;
            continue;
        }
        if let Some((op, _)) = open.take() {
            out[n] = op;
            n += 1;
        }
        let op = ReadOp {
            local_offset: index * PAGE_SIZE,
            remote_addr: at.addr,
            rkey: at.rkey,
            len: PAGE_SIZE as u32,
            tag_addr: at.tag_addr,
        };
        open = Some((op, at.left_in_region - 1));
    }
    if let Some((op, _)) = open {
        out[n] = op;
        n += 1;
    }
    Ok(&out[..n])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Two regions of 256 slots (the page store's 1 MiB chunks), far apart.
    fn layout() -> SlotLayout {
        let region = |addr, rkey| RdmaRegion {
            addr,
            len: 256 * PAGE,
            rkey,
        };
        SlotLayout::new(&RdmaEndpoint {
            gid: [0; 16],
            lid: 1,
            qpn: 2,
            psn: 3,
            regions: vec![region(0x10_0000_0000, 7), region(0x20_0000_0000, 8)],
        })
        .unwrap()
    }

    #[test]
    fn slots_are_laid_out_region_after_region() {
        let l = layout();
        assert_eq!(l.slots(), 512);
        let at = |s| l.locate(s).unwrap();
        assert_eq!(
            at(0),
            RemotePage {
                addr: 0x10_0000_0000,
                rkey: 7,
                left_in_region: 256,
                tag_addr: 0x10_0000_0000 + 256 * PAGE,
            }
        );
        assert_eq!(at(255).addr, 0x10_0000_0000 + 255 * PAGE);
        assert_eq!(at(255).left_in_region, 1);
        assert_eq!(
            at(256),
            RemotePage {
                addr: 0x20_0000_0000,
                rkey: 8,
                left_in_region: 256,
                tag_addr: 0x20_0000_0000 + 256 * PAGE,
            }
        );
        assert_eq!(at(511).addr, 0x20_0000_0000 + 255 * PAGE);
        assert_eq!(at(511).tag_addr, 0x20_0000_0000 + 256 * PAGE + 255 * 8);
        assert_eq!(l.locate(512), None);
    }

    #[test]
    fn a_layout_of_an_endpoint_a_reader_cannot_use_is_refused() {
        let mut e = RdmaEndpoint {
            gid: [0; 16],
            lid: 0,
            qpn: 1,
            psn: 1,
            regions: vec![RdmaRegion {
                addr: 4096,
                len: 6000,
                rkey: 1,
            }],
        };
        assert!(SlotLayout::new(&e).is_err());
        e.regions.clear();
        let empty = SlotLayout::new(&e).unwrap();
        assert_eq!((empty.slots(), empty.locate(0)), (0, None));
    }

    #[test]
    fn consecutive_slots_are_one_read_and_region_ends_and_gaps_split_them() {
        let l = layout();
        let mut out = [ReadOp::default(); MAX_READS];
        // 254..=257 crosses from the first region to the second; 300 after a gap; 299
        // before 300 in the run but after it in memory.
        let reads = plan_reads(&l, &[254, 255, 256, 257, 300, 299], &mut out).unwrap();
        let op = |local_pages: usize, addr: u64, rkey, pages: u32| {
            let base = addr & !0xf_ffff_ffff;
            ReadOp {
                local_offset: local_pages * PAGE_SIZE,
                remote_addr: addr,
                rkey,
                len: pages * PAGE_SIZE as u32,
                tag_addr: base + 256 * PAGE + (addr - base) / PAGE * 8,
            }
        };
        // The second read's tags: pages 2 and 3 of the run, slots 0 and 1 of region 2.
        assert_eq!(
            reads[1].tags(1 << 20),
            ReadOp {
                local_offset: (1 << 20) + 16,
                remote_addr: 0x20_0000_0000 + 256 * PAGE,
                rkey: 8,
                len: 16,
                tag_addr: 0,
            }
        );
        assert_eq!(
            reads,
            [
                op(0, 0x10_0000_0000 + 254 * PAGE, 7, 2),
                op(2, 0x20_0000_0000, 8, 2),
                op(4, 0x20_0000_0000 + 44 * PAGE, 8, 1),
                op(5, 0x20_0000_0000 + 43 * PAGE, 8, 1),
            ]
        );
        // A whole region's run is one read of 1 MiB.
        let all: Vec<u32> = (256..512).collect();
        let reads = plan_reads(&l, &all, &mut out).unwrap();
        assert_eq!(reads, [op(0, 0x20_0000_0000, 8, 256)]);
        assert_eq!(plan_reads(&l, &[], &mut out).unwrap(), []);
    }

    #[test]
    fn an_unknown_slot_or_an_overlong_run_is_an_error_not_a_read() {
        let l = layout();
        let mut out = [ReadOp::default(); MAX_READS];
        assert_eq!(
            plan_reads(&l, &[3, 512], &mut out).unwrap_err().to_string(),
            "page 1 of the run is in slot 512, past the 512 slots the memory node registered"
        );
        let long = vec![0u32; MAX_READS + 1];
        assert_eq!(
            plan_reads(&l, &long, &mut out),
            Err(PlanError::TooLong(MAX_READS + 1))
        );
    }

    proptest! {
        /// Whatever the slots, the reads cover the run's buffer exactly once, in order,
        /// each inside one region, and each page's bytes come from its own slot.
        #[test]
        fn reads_cover_the_run_once_each_page_from_its_slot(
            slots in proptest::collection::vec(0u32..512, 0..=MAX_READS)
        ) {
            let l = layout();
            let mut out = [ReadOp::default(); MAX_READS];
            let reads = plan_reads(&l, &slots, &mut out).unwrap();
            let mut next = 0;
            for r in reads {
                prop_assert_eq!(r.local_offset, next);
                prop_assert!(r.len > 0 && (r.len as usize).is_multiple_of(PAGE_SIZE));
                let first = r.local_offset / PAGE_SIZE;
                for k in 0..r.len as usize / PAGE_SIZE {
                    let at = l.locate(slots[first + k]).unwrap();
                    prop_assert_eq!(at.addr, r.remote_addr + (k * PAGE_SIZE) as u64);
                    prop_assert_eq!(at.rkey, r.rkey);
                    prop_assert_eq!(at.tag_addr, r.tags(0).remote_addr + (k * 8) as u64);
                }
                prop_assert_eq!(r.tags(0).local_offset, first * 8);
                next += r.len as usize;
            }
            prop_assert_eq!(next, slots.len() * PAGE_SIZE);
        }
    }
}
