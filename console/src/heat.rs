//! Guest memory as a grid: merging the node's heat cells into screen glyphs, zoom, and the
//! grid's geometry.
//!
//! A node sends its guest memory as `cells.len()` regions of `pages_per_cell` pages
//! ([`pagemesh_api::stats::Heat`]). The console shows each region, or a run of them when
//! zoomed out, as one glyph (or, zoomed in, as several columns): the glyph tells who holds the
//! region's pages, the colour how much of it has faulted and whether it faulted just now.

use pagemesh_api::NodeId;
use pagemesh_api::stats::{Heat, HeatCell};

/// A run of consecutive heat cells shown as one glyph.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Region {
    /// First guest page.
    pub first_page: u64,
    /// Guest pages covered.
    pub pages: u64,
    /// Faults since the VM started.
    pub faults: u64,
    /// Faults since the previous snapshot.
    pub recent: u64,
    /// Pages resident on the compute node.
    pub local: u64,
    /// Pages never written.
    pub zero: u64,
    /// Pages held by other nodes.
    pub remote: u64,
    /// Of the pages not resident, those evicted (resident before, under a local memory
    /// budget).
    pub evicted: u64,
    /// The node holding most of the remote pages.
    pub owner: Option<NodeId>,
}

/// How a region looks, before colours are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// Never faulted.
    Cold,
    /// Faulted on some of its pages: 1 (under a quarter) to 4 (all of them).
    Warm(u8),
    /// Faulted since the previous snapshot.
    Hot,
}

impl Region {
    /// The region's glyph: its owner node's id as a digit or letter, `•` when its pages are
    /// resident on the compute node and none is elsewhere, `·` when never written. Under a
    /// local memory budget, once some of its pages were evicted, whichever is the most of
    /// its pages: `•` resident, `○` evicted, or the glyph of the rest (never fetched).
    pub fn glyph(&self) -> char {
        if self.evicted > 0 {
            let rest = (self.remote + self.zero).saturating_sub(self.evicted);
            if self.local >= self.evicted && self.local >= rest {
                return RESIDENT;
            }
            if self.evicted >= rest {
                return EVICTED;
            }
        }
        match self.owner {
            Some(id) if self.remote > 0 => owner_glyph(id),
            _ if self.local > 0 => RESIDENT,
            Some(id) => owner_glyph(id),
            None => NEVER_WRITTEN,
        }
    }

    /// How hot the region is.
    pub fn look(&self) -> Look {
        if self.recent > 0 {
            return Look::Hot;
        }
        if self.faults == 0 || self.pages == 0 {
            return Look::Cold;
        }
        let quarter = self.faults.saturating_mul(4) / self.pages;
        Look::Warm(u8::try_from(quarter.clamp(0, 3)).unwrap_or(3) + 1)
    }
}

/// Glyph of a region whose pages are resident on the compute node.
pub const RESIDENT: char = '•';
/// Glyph of a region whose pages were evicted from the compute node's page cache (their
/// homes hold them).
pub const EVICTED: char = '○';
/// Glyph of a region that was never written.
pub const NEVER_WRITTEN: char = '·';

/// The glyph for pages held by node `id`: `0`–`9`, then `a`–`z`, then `#`.
pub fn owner_glyph(id: NodeId) -> char {
    match id {
        0..=9 => char::from_digit(id, 10).unwrap_or('#'),
        10..=35 => char::from_digit(id, 36).unwrap_or('#'),
        _ => '#',
    }
}

/// Merges the node's heat cells `per_glyph` at a time.
///
/// `guest_pages` sizes the last cell, which may be shorter (0: trust the counts).
/// `previous` holds each cell's fault count in the previous snapshot of the same VM (empty
/// when there is none); the difference is the region's recent faults.
pub fn regions(heat: &Heat, guest_pages: u64, previous: &[u64], per_glyph: usize) -> Vec<Region> {
    let per_glyph = per_glyph.max(1);
    let ppc = heat.pages_per_cell;
    heat.cells
        .chunks(per_glyph)
        .enumerate()
        .map(|(chunk, cells)| {
            let first_cell = chunk * per_glyph;
            let first_page = ppc.saturating_mul(first_cell as u64);
            let mut region = Region {
                first_page,
                ..Region::default()
            };
            let mut owners: Vec<(NodeId, u64)> = Vec::new();
            for (i, cell) in cells.iter().enumerate() {
                region.pages += cell_pages(cell, ppc, first_page + ppc * i as u64, guest_pages);
                region.faults += cell.faults;
                region.local += cell.local;
                region.zero += cell.zero;
                region.remote += cell.remote;
                region.evicted += cell.evicted;
                if let Some(&before) = previous.get(first_cell + i) {
                    region.recent += cell.faults.saturating_sub(before);
                }
                if let Some(owner) = cell.owner {
                    match owners.iter_mut().find(|(id, _)| *id == owner) {
                        Some((_, remote)) => *remote += cell.remote,
                        None => owners.push((owner, cell.remote)),
                    }
                }
            }
            // Most remote pages wins; a tie goes to the lower id.
            region.owner = owners
                .iter()
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|&(id, _)| id);
            region
        })
        .collect()
}

fn cell_pages(cell: &HeatCell, ppc: u64, first_page: u64, guest_pages: u64) -> u64 {
    if guest_pages == 0 || ppc == 0 {
        return cell.local + cell.zero + cell.remote;
    }
    ppc.min(guest_pages.saturating_sub(first_page))
}

/// Zoom of the heat grid: zoomed out, several cells share a glyph; zoomed in, a cell spans
/// several columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Zoom {
    /// 0: one cell per column; `n > 0`: `2^n` columns per cell; `n < 0`: `2^-n` cells per
    /// column.
    level: i8,
}

impl Zoom {
    const MIN: i8 = -12;
    const MAX: i8 = 3;

    /// One step in (`+`), up to 8 columns per cell.
    pub fn zoom_in(&mut self) {
        self.level = (self.level + 1).min(Self::MAX);
    }

    /// One step out (`-`), down to 4096 cells per column.
    pub fn zoom_out(&mut self) {
        self.level = (self.level - 1).max(Self::MIN);
    }

    /// Heat cells merged into one glyph.
    pub fn cells_per_glyph(self) -> usize {
        if self.level < 0 {
            1 << self.level.unsigned_abs()
        } else {
            1
        }
    }

    /// Columns one glyph spans.
    pub fn glyph_width(self) -> u16 {
        if self.level > 0 {
            1 << self.level.unsigned_abs()
        } else {
            1
        }
    }

    /// `1:4` (four cells a glyph), `1:1`, `4:1` (four columns a cell).
    pub fn label(self) -> String {
        format!("{}:{}", self.glyph_width(), self.cells_per_glyph())
    }
}

/// Where the glyphs go in an area of the screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Columns of the address label left of each row, separator included.
    pub label_width: u16,
    /// Glyphs in a row.
    pub per_row: usize,
    /// Rows needed for every glyph.
    pub rows: usize,
    /// Rows visible at once.
    pub visible: usize,
}

impl Geometry {
    /// Width of the address label (`  12.5M │`).
    pub const LABEL: u16 = 9;

    /// Lays out `glyphs` glyphs of `glyph_width` columns in a `width` × `height` area.
    /// Rows span a multiple of 8 columns when that fits, so that row addresses stay round.
    pub fn new(width: u16, height: u16, glyphs: usize, glyph_width: u16) -> Self {
        let label_width = Self::LABEL.min(width);
        let glyph_width = glyph_width.max(1);
        let fit = usize::from((width - label_width) / glyph_width);
        let step = usize::from((8 / glyph_width).max(1));
        let per_row = if fit >= step {
            fit - fit % step
        } else {
            fit.max(1)
        };
        Self {
            label_width,
            per_row,
            rows: glyphs.div_ceil(per_row),
            visible: usize::from(height),
        }
    }

    /// The largest useful scroll offset.
    pub fn max_scroll(&self) -> usize {
        self.rows.saturating_sub(self.visible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(faults: u64, local: u64, zero: u64, owner: Option<NodeId>, remote: u64) -> HeatCell {
        HeatCell {
            faults,
            local,
            zero,
            owner,
            remote,
            evicted: 0,
            stalls: None,
        }
    }

    /// 10 cells of 4 pages over a 38-page guest: the last cell has 2 pages.
    fn heat() -> Heat {
        let mut cells: Vec<HeatCell> = (0..10)
            .map(|i| cell(i, i.min(4), 0, Some(1 + (i as u32 % 2)), 4 - i.min(4)))
            .collect();
        cells[9] = cell(0, 0, 2, None, 0);
        Heat {
            pages_per_cell: 4,
            cells,
        }
    }

    #[test]
    fn one_cell_per_glyph_keeps_cells() {
        let r = regions(&heat(), 38, &[], 1);
        assert_eq!(r.len(), 10);
        assert_eq!(r[0].first_page, 0);
        assert_eq!(r[3].first_page, 12);
        assert_eq!(r[3].pages, 4);
        assert_eq!(r[9].pages, 2, "the last cell is short");
        assert_eq!(r[1].owner, Some(2));
        assert_eq!(r[9].owner, None);
    }

    #[test]
    fn merging_sums_counts_and_picks_the_main_owner() {
        let r = regions(&heat(), 38, &[], 4);
        assert_eq!(r.len(), 3);
        // Cells 0..4: faults 0+1+2+3, remote 4+3+2+1 (node 1: 4+2, node 2: 3+1).
        assert_eq!(r[0].faults, 6);
        assert_eq!(r[0].remote, 10);
        assert_eq!(r[0].pages, 16);
        assert_eq!(r[0].owner, Some(1));
        assert_eq!(r[1].first_page, 16);
        // Cells 8, 9: the last region is 4 + 2 pages.
        assert_eq!(r[2].pages, 6);
        assert_eq!(r[2].first_page, 32);
    }

    #[test]
    fn owner_tie_goes_to_the_lower_id() {
        let h = Heat {
            pages_per_cell: 2,
            cells: vec![cell(0, 0, 0, Some(7), 2), cell(0, 0, 0, Some(3), 2)],
        };
        assert_eq!(regions(&h, 4, &[], 2)[0].owner, Some(3));
    }

    #[test]
    fn recent_faults_come_from_the_previous_snapshot() {
        let h = heat();
        let previous: Vec<u64> = h.cells.iter().map(|c| c.faults.saturating_sub(1)).collect();
        let r = regions(&h, 38, &previous, 1);
        assert_eq!(r[0].recent, 0);
        assert_eq!(r[5].recent, 1);
        assert_eq!(r[5].look(), Look::Hot);
        // Without a previous snapshot nothing is recent.
        assert!(regions(&h, 38, &[], 1).iter().all(|r| r.recent == 0));
        // A shorter previous snapshot (another VM) leaves the rest alone.
        assert_eq!(regions(&h, 38, &[0, 0], 1)[5].recent, 0);
    }

    #[test]
    fn without_guest_size_pages_are_counted() {
        let h = heat();
        let r = regions(&h, 0, &[], 1);
        assert_eq!(r[9].pages, 2);
        assert_eq!(r[2].pages, 4);
    }

    #[test]
    fn looks_by_share_faulted() {
        let region = |faults, pages| Region {
            faults,
            pages,
            ..Region::default()
        };
        assert_eq!(region(0, 64).look(), Look::Cold);
        assert_eq!(region(1, 64).look(), Look::Warm(1));
        assert_eq!(region(16, 64).look(), Look::Warm(2));
        assert_eq!(region(40, 64).look(), Look::Warm(3));
        assert_eq!(region(63, 64).look(), Look::Warm(4));
        assert_eq!(region(64, 64).look(), Look::Warm(4));
        assert_eq!(region(500, 64).look(), Look::Warm(4), "refaults clamp");
        assert_eq!(region(5, 0).look(), Look::Cold);
    }

    #[test]
    fn glyphs() {
        let g = |local, zero, owner, remote| {
            Region {
                local,
                zero,
                owner,
                remote,
                ..Region::default()
            }
            .glyph()
        };
        assert_eq!(g(0, 0, Some(2), 4), '2');
        assert_eq!(g(3, 0, Some(2), 1), '2', "any remote page shows its owner");
        assert_eq!(g(4, 0, None, 0), RESIDENT);
        assert_eq!(g(0, 4, None, 0), NEVER_WRITTEN);
        // Under a budget, the most of resident, evicted and never fetched.
        let e = |local, owner, remote, evicted| {
            Region {
                local,
                owner,
                remote,
                evicted,
                ..Region::default()
            }
            .glyph()
        };
        assert_eq!(e(1, Some(2), 3, 3), EVICTED);
        assert_eq!(e(2, Some(2), 2, 1), RESIDENT);
        assert_eq!(e(0, Some(2), 4, 1), '2', "mostly never fetched");
        assert_eq!(
            e(1, Some(2), 3, 0),
            '2',
            "nothing evicted: as without a budget"
        );
        assert_eq!(owner_glyph(0), '0');
        assert_eq!(owner_glyph(9), '9');
        assert_eq!(owner_glyph(10), 'a');
        assert_eq!(owner_glyph(35), 'z');
        assert_eq!(owner_glyph(36), '#');
    }

    #[test]
    fn zoom_steps_and_limits() {
        let mut z = Zoom::default();
        assert_eq!((z.cells_per_glyph(), z.glyph_width()), (1, 1));
        assert_eq!(z.label(), "1:1");
        z.zoom_out();
        z.zoom_out();
        assert_eq!((z.cells_per_glyph(), z.glyph_width()), (4, 1));
        assert_eq!(z.label(), "1:4");
        for _ in 0..20 {
            z.zoom_out();
        }
        assert_eq!(z.cells_per_glyph(), 4096);
        for _ in 0..12 {
            z.zoom_in();
        }
        assert_eq!(z, Zoom::default());
        z.zoom_in();
        assert_eq!((z.cells_per_glyph(), z.glyph_width()), (1, 2));
        for _ in 0..20 {
            z.zoom_in();
        }
        assert_eq!(z.glyph_width(), 8);
        assert_eq!(z.label(), "8:1");
    }

    #[test]
    fn geometry_rounds_rows_to_eight_glyphs() {
        // 9 label + 100 columns: 100 glyphs fit, rows of 96.
        let g = Geometry::new(109, 10, 1000, 1);
        assert_eq!(g.per_row, 96);
        assert_eq!(g.rows, 11);
        assert_eq!(g.max_scroll(), 1);
        // Two columns a glyph: 50 fit, rows of 48 (96 columns).
        assert_eq!(Geometry::new(109, 10, 1000, 2).per_row, 48);
        // Four columns a glyph: 25 fit, rows of 24 (96 columns).
        assert_eq!(Geometry::new(109, 10, 1000, 4).per_row, 24);
        // Eight columns a glyph: 12 fit, rows of 12.
        assert_eq!(Geometry::new(109, 10, 1000, 8).per_row, 12);
        // Tiny areas still make progress.
        let tiny = Geometry::new(12, 3, 10, 1);
        assert_eq!(tiny.per_row, 3);
        assert_eq!(Geometry::new(4, 3, 10, 1).per_row, 1);
        assert_eq!(Geometry::new(200, 50, 100, 1).max_scroll(), 0);
    }
}
