//! The `?` overlay.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Padding, Paragraph, Wrap};

const KEYS: [(&str, &str); 9] = [
    ("Tab, Shift-Tab", "next, previous view"),
    ("1 2 3 4", "Cluster, Heat, Latency, Log"),
    ("↑ ↓", "select a node (Cluster), scroll (Heat, Log)"),
    ("PgUp PgDn", "scroll a page (Heat, Log)"),
    ("Home End", "scroll to the top, the bottom"),
    ("← →", "show another node's guest (Heat, Latency)"),
    ("+ -", "zoom the heat map in, out"),
    ("?  Esc", "show, hide this help"),
    ("q  Ctrl-C", "quit"),
];

const NOTES: [&str; 3] = [
    "Heat: a glyph per region of guest memory; the glyph names the node holding its pages \
     (• resident on the compute node, · never written), the colour says how much of it \
     faulted; red regions are faulting now.",
    "Cluster: faults/s and served/s are rates over the last second; remote miss is the share \
     of faults served from another node.",
    "A node whose /stats fails shows as down; one the coordinator no longer lists (its work \
     done) as left.",
];

pub(crate) fn render(frame: &mut Frame, body: Rect) {
    let [area] = Layout::horizontal([Constraint::Max(72)])
        .flex(Flex::Center)
        .areas(body);
    let [area] = Layout::vertical([Constraint::Max(20)])
        .flex(Flex::Center)
        .areas(area);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = KEYS
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!("{k:<15}"), bold.fg(Color::Cyan)),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.extend(
        NOTES
            .iter()
            .map(|n| Line::styled(*n, Style::new().fg(Color::Gray))),
    );
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::bordered()
                .title(" Help · ? or Esc closes ")
                .border_style(bold)
                .padding(Padding::horizontal(1)),
        ),
        area,
    );
}
