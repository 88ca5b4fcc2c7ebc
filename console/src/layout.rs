//! Where things go on the terminal, from its size alone: the console's three bands, and the
//! parts of the views whose size the state needs to keep scrolling in range (the log lines
//! that show, where the heat map's glyphs go). The state (`app`) and the drawing (`ui`) both
//! take their sizes from here, so they agree on what fits; neither is needed to compute them.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::widgets::Block;

use crate::heat::{Geometry, Zoom};

/// Tab bar, view, key hints.
pub(crate) fn areas(area: Rect) -> [Rect; 3] {
    Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(area)
}

/// The area a view gets on a terminal of `size`.
pub(crate) fn body_area(size: Rect) -> Rect {
    areas(size)[1]
}

/// Log lines that fit on a terminal of `size`.
pub(crate) fn log_lines(size: Rect) -> usize {
    usize::from(Block::bordered().inner(body_area(size)).height)
}

/// The Heat view's grid and legend, inside the view's border.
pub(crate) fn heat_areas(body: Rect) -> [Rect; 2] {
    Layout::vertical([Constraint::Fill(1), Constraint::Length(2)])
        .areas(Block::bordered().inner(body))
}

/// Where the glyphs of a heat map of `cells` cells go at `zoom` on a terminal of `size`.
pub(crate) fn heat_geometry(size: Rect, cells: usize, zoom: Zoom) -> Geometry {
    let [grid, _] = heat_areas(body_area(size));
    Geometry::new(
        grid.width,
        grid.height,
        cells.div_ceil(zoom.cells_per_glyph()),
        zoom.glyph_width(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_what_fits_in_them() {
        let size = Rect::new(0, 0, 100, 10);
        assert_eq!(
            areas(size),
            [
                Rect::new(0, 0, 100, 1),
                Rect::new(0, 1, 100, 8),
                Rect::new(0, 9, 100, 1),
            ]
        );
        // 8 rows of view less its border.
        assert_eq!(log_lines(size), 6);
        // 6 rows inside the border, 2 of them for the legend; 98 columns less the label.
        let g = heat_geometry(size, 1000, Zoom::default());
        assert_eq!(g.visible, 4);
        assert_eq!(g.per_row, 88);
        assert_eq!(log_lines(Rect::new(0, 0, 0, 0)), 0);
    }
}
