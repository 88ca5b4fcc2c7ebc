//! The Heat view: the guest's memory as a grid of glyphs, one per region (see
//! [`crate::heat`]); the glyph names the node holding the region, the colour says how much
//! of it faulted and whether it is faulting now.

use std::collections::BTreeSet;

use pagemesh_api::PAGE_SIZE;
use ratatui::Frame;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget};

use crate::app::App;
use crate::format::size;
use crate::heat::{EVICTED, Geometry, Look, NEVER_WRITTEN, RESIDENT, Region, owner_glyph, regions};
use crate::layout;

/// The colours of a region.
pub(crate) fn look_style(look: Look) -> Style {
    match look {
        Look::Cold => Style::new().fg(Color::DarkGray),
        Look::Warm(1) => Style::new().fg(Color::White).bg(Color::Blue),
        Look::Warm(2) => Style::new().fg(Color::Black).bg(Color::Cyan),
        Look::Warm(3) => Style::new().fg(Color::Black).bg(Color::Green),
        Look::Warm(_) => Style::new().fg(Color::Black).bg(Color::Yellow),
        Look::Hot => Style::new()
            .fg(Color::White)
            .bg(Color::Red)
            .add_modifier(Modifier::BOLD),
    }
}

pub(crate) fn render(app: &App, frame: &mut Frame, area: Rect) {
    let Some((node, pager)) = app
        .guest_node()
        .and_then(|n| Some((n, n.stats.as_ref()?.pager.as_ref()?)))
    else {
        frame.render_widget(
            Paragraph::new(
                "No node runs a guest yet: the map appears when a compute node reports its pager.",
            )
            .style(Style::new().fg(Color::DarkGray))
            .block(Block::bordered().title(" Heat ")),
            area,
        );
        return;
    };
    let zoom = app.heat.zoom;
    let regions = regions(
        &pager.heat,
        pager.guest_pages,
        &node.heat_previous,
        zoom.cells_per_glyph(),
    );
    let [grid_area, legend_area] = layout::heat_areas(area);
    let geometry = Geometry::new(
        grid_area.width,
        grid_area.height,
        regions.len(),
        zoom.glyph_width(),
    );
    let scroll = app.heat.scroll.min(geometry.max_scroll());
    let pages = pager
        .heat
        .pages_per_cell
        .saturating_mul(zoom.cells_per_glyph() as u64);
    let unit = match zoom.glyph_width() {
        1 => "glyph".to_owned(),
        w => format!("{w} columns"),
    };
    let last_row = (scroll + geometry.visible).min(geometry.rows);
    let title = format!(
        " Heat · node {} · vm {} · {} pages · {pages} pages per {unit} · rows {}-{last_row} of {} ",
        node.info.node_id,
        pager.vm,
        pager.guest_pages,
        (scroll + 1).min(last_row),
        geometry.rows,
    );
    frame.render_widget(Block::bordered().title(title), area);
    frame.render_widget(
        Grid {
            regions: &regions,
            geometry,
            scroll,
            glyph_width: zoom.glyph_width(),
        },
        grid_area,
    );
    frame.render_widget(legend(&regions, node.info.node_id), legend_area);
}

fn legend(regions: &[Region], compute: pagemesh_api::NodeId) -> Paragraph<'static> {
    let owners: BTreeSet<char> = regions
        .iter()
        .filter(|r| r.remote > 0)
        .filter_map(|r| r.owner.map(owner_glyph))
        .collect();
    let owners: String = owners
        .iter()
        .flat_map(|c| [*c, ' '])
        .collect::<String>()
        .trim_end()
        .to_owned();
    let dim = Style::new().fg(Color::DarkGray);
    let mut glyphs = vec![Span::styled("glyph  ", dim)];
    if !owners.is_empty() {
        glyphs.push(Span::raw(format!("{owners} held by that node   ")));
    }
    glyphs.push(Span::raw(format!(
        "{RESIDENT} resident on node {compute}   "
    )));
    if regions.iter().any(|r| r.evicted > 0) {
        glyphs.push(Span::raw(format!("{EVICTED} evicted (back home)   ")));
    }
    glyphs.push(Span::raw(format!("{NEVER_WRITTEN} never written")));
    let swatch = |look| Span::styled("  ", look_style(look));
    let colours = vec![
        Span::styled("colour ", dim),
        swatch(Look::Cold),
        Span::raw(" no fault "),
        swatch(Look::Warm(1)),
        Span::raw(" <¼ "),
        swatch(Look::Warm(2)),
        Span::raw(" <½ "),
        swatch(Look::Warm(3)),
        Span::raw(" <¾ "),
        swatch(Look::Warm(4)),
        Span::raw(" all of its pages faulted   "),
        swatch(Look::Hot),
        Span::raw(" faulting now"),
    ];
    Paragraph::new(vec![Line::from(glyphs), Line::from(colours)])
}

/// The glyphs, a row per `geometry.per_row` regions, each row labelled with the guest
/// address it starts at. Zoomed in, a region spans `glyph_width` columns: its glyph, then
/// its colour.
struct Grid<'a> {
    regions: &'a [Region],
    geometry: Geometry,
    scroll: usize,
    glyph_width: u16,
}

impl Widget for Grid<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let g = self.geometry;
        for (dy, row) in (self.scroll..g.rows).take(g.visible).enumerate() {
            let Ok(dy) = u16::try_from(dy) else { break };
            let y = area.y + dy;
            let first = row * g.per_row;
            let Some(head) = self.regions.get(first) else {
                break;
            };
            let address = head.first_page.saturating_mul(PAGE_SIZE as u64);
            buf.set_stringn(
                area.x,
                y,
                format!("{:>7} │", size(address)),
                usize::from(g.label_width),
                Style::new().fg(Color::DarkGray),
            );
            let mut x = area.x + g.label_width;
            for region in self.regions[first..].iter().take(g.per_row) {
                let style = look_style(region.look());
                // Zoomed in, the glyph starts the cell and its colour fills the rest.
                let glyph = region.glyph();
                for column in 0..self.glyph_width {
                    if x >= area.right() {
                        break;
                    }
                    let c = if column == 0 { glyph } else { ' ' };
                    buf[(x, y)].set_char(c).set_style(style);
                    x += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of a buffer, colours aside.
    fn symbols(buf: &Buffer) -> String {
        buf.content.iter().map(|c| c.symbol()).collect()
    }

    fn region(first_page: u64, faults: u64, recent: u64, owner: Option<u32>) -> Region {
        Region {
            first_page,
            pages: 4,
            faults,
            recent,
            local: faults,
            zero: 0,
            remote: 4 - faults,
            evicted: 0,
            owner,
        }
    }

    #[test]
    fn grid_rows_carry_addresses_and_glyphs() {
        // 10 regions of 4 pages (16 KiB each), 8 to a row.
        let regions: Vec<Region> = (0..10)
            .map(|i| match i {
                0..=2 => region(i * 4, 4, 0, None),
                3 => region(12, 2, 2, Some(1)),
                _ => region(i * 4, 0, 0, Some(if i < 7 { 1 } else { 2 })),
            })
            .collect();
        let area = Rect::new(0, 0, 18, 3);
        let geometry = Geometry::new(area.width, area.height, regions.len(), 1);
        let mut buf = Buffer::empty(area);
        Grid {
            regions: &regions,
            geometry,
            scroll: 0,
            glyph_width: 1,
        }
        .render(area, &mut buf);
        // Colours: resident and wholly faulted, faulting now, never faulted.
        assert_eq!(buf[(9, 0)].bg, Color::Yellow);
        assert_eq!(buf[(12, 0)].bg, Color::Red);
        assert_eq!(buf[(13, 0)].fg, Color::DarkGray);
        assert_eq!(
            symbols(&buf),
            symbols(&Buffer::with_lines([
                "      0 │•••11112 ",
                "   128K │22       ",
                "                  ",
            ]))
        );
    }

    #[test]
    fn wide_cells_and_scroll_skipping_rows() {
        let regions: Vec<Region> = (0..4)
            .map(|i| region(i * 4, 0, 0, Some(i as u32)))
            .collect();
        let area = Rect::new(0, 0, 13, 1);
        let geometry = Geometry::new(area.width, area.height, regions.len(), 2);
        assert_eq!(geometry.per_row, 2);
        let mut buf = Buffer::empty(area);
        Grid {
            regions: &regions,
            geometry,
            scroll: 1,
            glyph_width: 2,
        }
        .render(area, &mut buf);
        assert_eq!(
            symbols(&buf),
            symbols(&Buffer::with_lines(["    32K │2 3 "]))
        );
    }
}
