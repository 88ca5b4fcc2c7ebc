//! The Log view: nodes joining and leaving, guests starting and finishing, errors.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};

use crate::app::{App, Level, LogEntry};

pub(crate) fn render(app: &App, frame: &mut Frame, area: Rect) {
    let block = Block::bordered();
    let visible = usize::from(block.inner(area).height);
    let end = app.log.len().saturating_sub(app.log_scroll);
    let start = end.saturating_sub(visible);
    let title = if app.log_scroll > 0 {
        format!(
            " Log · {} entries · {} newer below (End) ",
            app.log.len(),
            app.log_scroll
        )
    } else {
        format!(" Log · {} entries ", app.log.len())
    };
    frame.render_widget(
        Paragraph::new(lines(&app.log[start..end])).block(block.title(title)),
        area,
    );
}

/// A line per entry: time, level, text.
pub(crate) fn lines(entries: &[LogEntry]) -> Vec<Line<'static>> {
    entries
        .iter()
        .map(|e| {
            let (tag, colour) = match e.level {
                Level::Info => ("info ", Color::Gray),
                Level::Warn => ("warn ", Color::Yellow),
                Level::Error => ("error", Color::Red),
            };
            Line::from(vec![
                Span::styled(
                    format!("{:>8.1}s ", e.at.as_secs_f64()),
                    Style::new().fg(Color::DarkGray),
                ),
                Span::styled(tag, Style::new().fg(colour)),
                Span::raw(" "),
                Span::styled(e.text.clone(), Style::new().fg(colour)),
            ])
        })
        .collect()
}
