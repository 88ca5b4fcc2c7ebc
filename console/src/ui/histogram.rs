//! A latency histogram as horizontal bars, one row per bucket: `≤ 32.0µs ████▌   2900`.
//!
//! The node sends cumulative buckets; the widget shows each bucket's own count, drops the
//! empty buckets at both ends and merges neighbours when there are more buckets than rows.

use pagemesh_api::stats::Histogram;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::widgets::Widget;

use crate::format::micros;

/// Width of the `≤ 1.02ms` label.
const LABEL: u16 = 9;
/// Width of the count.
const COUNT: u16 = 7;
const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];

/// Bars of one histogram.
pub(crate) struct Bars<'a> {
    /// The distribution.
    pub(crate) histogram: &'a Histogram,
    /// Bar colour.
    pub(crate) colour: Color,
}

/// `(upper bound µs, samples)` per row: per-bucket counts, empty ends dropped, merged to at
/// most `rows` rows.
pub(crate) fn rows(histogram: &Histogram, rows: usize) -> Vec<(f64, u64)> {
    let mut below = 0;
    let own: Vec<(f64, u64)> = histogram
        .buckets
        .iter()
        .map(|b| {
            // Cumulative counts should not decrease; a node that sends one that does gets an
            // empty bucket rather than a panic.
            let n = b.count.saturating_sub(below);
            below = below.max(b.count);
            (b.le_us, n)
        })
        .collect();
    let first = own.iter().position(|&(_, n)| n > 0);
    let last = own.iter().rposition(|&(_, n)| n > 0);
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    let own = &own[first..=last];
    if rows == 0 {
        return Vec::new();
    }
    let group = own.len().div_ceil(rows);
    own.chunks(group)
        .map(|chunk| {
            let le = chunk.last().map_or(0.0, |&(le, _)| le);
            (le, chunk.iter().map(|&(_, n)| n).sum())
        })
        .collect()
}

/// A bar of `count / max` of `width` cells, in eighths; any sample shows at least an eighth.
fn bar(count: u64, max: u64, width: u16) -> String {
    if max == 0 || width == 0 {
        return String::new();
    }
    let eighths = (u128::from(count) * u128::from(width) * 8 / u128::from(max)) as usize;
    let eighths = if count > 0 { eighths.max(1) } else { 0 };
    let mut s = "█".repeat(eighths / 8);
    if eighths % 8 > 0 {
        s.push(EIGHTHS[eighths % 8]);
    }
    s
}

impl Widget for Bars<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let rows = rows(self.histogram, usize::from(area.height));
        if rows.is_empty() {
            buf.set_stringn(
                area.x,
                area.y,
                "no samples yet",
                usize::from(area.width),
                Style::new().fg(Color::DarkGray),
            );
            return;
        }
        let max = rows.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let bar_width = area.width.saturating_sub(LABEL + COUNT + 2);
        for (y, (le, count)) in (area.y..area.bottom()).zip(rows) {
            // The last bucket may be unbounded (+Inf): it holds whatever the others do not.
            let label = if le.is_infinite() {
                "≤∞".to_owned()
            } else {
                format!("≤{}", micros(le))
            };
            let line = format!(
                "{label:>w$} {:<bw$} {count:>cw$}",
                bar(count, max, bar_width),
                w = usize::from(LABEL),
                bw = usize::from(bar_width),
                cw = usize::from(COUNT),
            );
            buf.set_stringn(area.x, y, &line, usize::from(area.width), Style::new());
            buf.set_style(
                Rect::new(area.x + LABEL + 1, y, bar_width, 1).intersection(area),
                Style::new().fg(self.colour),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use pagemesh_api::stats::Bucket;

    use super::*;

    fn histogram(buckets: &[(f64, u64)]) -> Histogram {
        Histogram {
            count: buckets.last().map_or(0, |b| b.1),
            buckets: buckets
                .iter()
                .map(|&(le_us, count)| Bucket { le_us, count })
                .collect(),
            ..Histogram::default()
        }
    }

    #[test]
    fn cumulative_buckets_become_own_counts_without_empty_ends() {
        let h = histogram(&[
            (1.0, 0),
            (2.0, 0),
            (4.0, 5),
            (8.0, 5),
            (16.0, 25),
            (32.0, 25),
        ]);
        assert_eq!(rows(&h, 10), vec![(4.0, 5), (8.0, 0), (16.0, 20)]);
        // Two rows: neighbours merge, the group's upper bound is its last bucket's.
        assert_eq!(rows(&h, 2), vec![(8.0, 5), (16.0, 20)]);
        assert_eq!(rows(&h, 1), vec![(16.0, 25)]);
        assert_eq!(rows(&h, 0), vec![]);
        assert_eq!(rows(&Histogram::default(), 5), vec![]);
    }

    #[test]
    fn decreasing_cumulative_counts_do_not_panic() {
        let h = histogram(&[(1.0, 10), (2.0, 4), (4.0, 12)]);
        assert_eq!(rows(&h, 5), vec![(1.0, 10), (2.0, 0), (4.0, 2)]);
    }

    #[test]
    fn bars_in_eighths() {
        assert_eq!(bar(10, 10, 4), "████");
        assert_eq!(bar(5, 10, 4), "██");
        assert_eq!(bar(1, 10, 4), "▍");
        assert_eq!(bar(1, 1000, 4), "▏", "a sample is never invisible");
        assert_eq!(bar(0, 10, 4), "");
        assert_eq!(bar(3, 0, 4), "");
    }

    #[test]
    fn renders_label_bar_and_count() {
        let h = histogram(&[(4.0, 5), (8.0, 5), (1000.0, 25)]);
        let area = Rect::new(0, 0, 26, 4);
        let mut buf = Buffer::empty(area);
        Bars {
            histogram: &h,
            colour: Color::Cyan,
        }
        .render(area, &mut buf);
        let mut expected = Buffer::with_lines([
            "  ≤4.00µs ██             5",
            "  ≤8.00µs                0",
            "  ≤1.00ms ████████      20",
            "                          ",
        ]);
        expected.set_style(Rect::new(10, 0, 8, 3), Style::new().fg(Color::Cyan));
        assert_eq!(buf, expected);
    }

    #[test]
    fn an_unbounded_last_bucket_is_labelled_infinite() {
        let h = histogram(&[(4.0, 5), (f64::INFINITY, 7)]);
        let area = Rect::new(0, 0, 26, 2);
        let mut buf = Buffer::empty(area);
        Bars {
            histogram: &h,
            colour: Color::Cyan,
        }
        .render(area, &mut buf);
        let text: String = buf.content.iter().map(|c| c.symbol()).collect();
        assert!(text.ends_with("       ≤∞ ███▏           2"), "{text:?}");
    }

    #[test]
    fn empty_histogram_says_so() {
        let area = Rect::new(0, 0, 16, 1);
        let mut buf = Buffer::empty(area);
        Bars {
            histogram: &Histogram::default(),
            colour: Color::Cyan,
        }
        .render(area, &mut buf);
        let mut expected = Buffer::with_lines(["no samples yet  "]);
        expected.set_style(Rect::new(0, 0, 14, 1), Style::new().fg(Color::DarkGray));
        assert_eq!(buf, expected);
    }
}
