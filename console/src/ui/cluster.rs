//! The Cluster view: a row per node, a paragraph per guest. Also the plain text of
//! `--once`, built from the same cells.

use std::fmt::Write as _;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};

use super::log;
use pagemesh_api::PAGE_SIZE;
use pagemesh_api::summary::CacheSummary;

use crate::app::{App, Health, Link, Node};
use crate::format::{bytes, micros, per_second, percent};
use crate::rate::Rate;

const HEADER: [&str; 10] = [
    "node",
    "role",
    "state",
    "pages held",
    "faults/s",
    "served/s",
    "remote miss",
    "p50",
    "p99",
    "admin",
];

/// The cells of a node's row.
fn cells(node: &Node) -> [String; 10] {
    let stats = node.stats.as_ref();
    let pager = stats.and_then(|s| s.pager.as_ref());
    let up = node.is_up();
    let rate = |r: Option<f64>| r.filter(|_| up).map_or_else(|| "-".into(), per_second);
    let held = stats.map_or_else(
        || "-".into(),
        |s| {
            let held = match s.server.capacity_pages {
                0 => s.server.pages_held.to_string(),
                cap => format!("{}/{cap}", s.server.pages_held),
            };
            // A memory node restoring the copies of one that died.
            match s.server.pages_to_repair {
                0 => held,
                n => format!("{held} repairing {n}"),
            }
        },
    );
    [
        node.info.node_id.to_string(),
        node.info.role.to_string(),
        node.state().into(),
        held,
        if pager.is_some() {
            rate(node.faults.per_second())
        } else {
            "-".into()
        },
        if stats.is_some() {
            rate(node.served.per_second())
        } else {
            "-".into()
        },
        pager.map_or_else(|| "-".into(), |p| percent(p.remote_miss_ratio)),
        pager.map_or_else(|| "-".into(), |p| micros(p.fault_latency.p50_us)),
        pager.map_or_else(|| "-".into(), |p| micros(p.fault_latency.p99_us)),
        node.info.admin.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// Two lines about each guest, three under a local memory budget.
fn guests(app: &App) -> Vec<Vec<String>> {
    app.nodes
        .values()
        .filter_map(|n| Some((n, n.stats.as_ref()?.pager.as_ref()?)))
        .map(|(node, p)| {
            let done = if p.guest_pages > 0 {
                p.guest_pages_done as f64 / p.guest_pages as f64
            } else {
                0.0
            };
            let mut lines = vec![
                format!(
                    "vm {} on node {}: {}, {} of {} pages done ({})",
                    p.vm,
                    node.info.node_id,
                    if p.running { "running" } else { "finished" },
                    p.guest_pages_done,
                    p.guest_pages,
                    percent(done),
                ),
                format!(
                    "  faults {} remote · {} zero-filled · {} spurious · {} failed · {} fetched",
                    p.faults_remote,
                    p.faults_local_zero,
                    p.faults_spurious,
                    p.fault_errors,
                    bytes(p.bytes_fetched),
                ),
            ];
            if !p.lost_nodes.is_empty() {
                let nodes: Vec<String> = p.lost_nodes.iter().map(|n| n.to_string()).collect();
                lines.push(format!(
                    "  degraded: lost memory node {}; running on the other copies",
                    nodes.join(", ")
                ));
            }
            if let Some(c) = &p.cache {
                lines.push(cache_line(node, c));
            }
            if let Some(f) = &p.prefetch {
                lines.push(format!(
                    "  prefetch {} pages · accuracy {} · coverage {} · {} touched in flight",
                    f.issued,
                    percent(f.accuracy),
                    percent(f.coverage),
                    f.in_flight,
                ));
                if f.replayed > 0 {
                    lines.push(format!("  replayed working set {} pages", f.replayed));
                }
            }
            lines
        })
        .collect()
}

/// A guest's page cache: how full it is, and evictions, write-backs and refaults, each as a
/// total and, once two snapshots are in, per second.
fn cache_line(node: &Node, c: &CacheSummary) -> String {
    let up = node.is_up();
    let with_rate = |total: u64, rate: &Rate| match rate.per_second().filter(|_| up) {
        Some(r) => format!("{total} ({}/s)", per_second(r)),
        None => total.to_string(),
    };
    format!(
        "  cache {} of {} pages resident ({} budget) · evictions {} · write-backs {} · \
         refaults {} · staging hits {}",
        c.resident_pages,
        c.budget_pages,
        bytes(c.budget_pages * PAGE_SIZE as u64),
        with_rate(c.evictions, &node.evictions),
        with_rate(c.writeback_pages, &node.writebacks),
        with_rate(c.refaults, &node.refaults),
        c.staging_hits,
    )
}

fn widths(rows: &[[String; 10]]) -> [usize; 10] {
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

pub(crate) fn render(app: &App, frame: &mut Frame, area: Rect) {
    let block = Block::bordered().title(" Nodes ");
    if app.nodes.is_empty() {
        let text = match &app.link {
            Link::Waiting => Line::raw("Waiting for the coordinator…"),
            Link::Up => Line::raw("No node registered yet."),
            Link::Down(why) => Line::styled(
                format!("Coordinator unreachable: {why}"),
                Style::new().fg(Color::Red),
            ),
        };
        frame.render_widget(Paragraph::new(text).block(block), area);
        return;
    }

    let mut lines: Vec<Line> = Vec::new();
    if let Link::Down(why) = &app.link {
        lines.push(Line::styled(
            format!("Coordinator unreachable: {why}"),
            Style::new().fg(Color::Red),
        ));
    }
    for guest in guests(app) {
        let mut guest = guest.into_iter();
        if let Some(first) = guest.next() {
            lines.push(Line::from(Span::styled(
                first,
                Style::new().add_modifier(Modifier::BOLD),
            )));
        }
        lines.extend(guest.map(Line::raw));
    }
    if lines.is_empty() {
        lines.push(Line::styled(
            "No node runs a guest.",
            Style::new().fg(Color::DarkGray),
        ));
    }
    let height = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).saturating_add(2);
    let [table_area, guest_area, log_area] = Layout::vertical([
        Constraint::Length(height(app.nodes.len() + 1)),
        Constraint::Length(height(lines.len())),
        Constraint::Fill(1),
    ])
    .areas(area);

    let cells: Vec<[String; 10]> = app.nodes.values().map(cells).collect();
    let widths = widths(&cells);
    let constraints = widths.iter().enumerate().map(|(i, &w)| {
        if i == HEADER.len() - 1 {
            Constraint::Fill(1)
        } else {
            Constraint::Length(u16::try_from(w).unwrap_or(u16::MAX))
        }
    });
    let rows = app.nodes.values().zip(cells).map(|(node, cells)| {
        let style = match node.state() {
            "up" => Style::new(),
            "down" => Style::new().fg(Color::Red),
            "left" => Style::new().fg(Color::DarkGray),
            _ => Style::new().fg(Color::Yellow),
        };
        Row::new(cells).style(style)
    });
    let selected = app
        .selected
        .and_then(|id| app.nodes.keys().position(|&k| k == id));
    let table = Table::new(rows, constraints)
        .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(block);
    let mut state = TableState::new().with_selected(selected);
    frame.render_stateful_widget(table, table_area, &mut state);

    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Guests ")),
        guest_area,
    );

    let block = Block::bordered().title(" Recent events (4: the whole log) ");
    let fit = usize::from(block.inner(log_area).height);
    let recent = &app.log[app.log.len().saturating_sub(fit)..];
    frame.render_widget(Paragraph::new(log::lines(recent)).block(block), log_area);
}

/// The Cluster view as plain text, for `--once`.
pub(crate) fn text(app: &App) -> String {
    let up = app.nodes.values().filter(|n| n.is_up()).count();
    let mut out = format!(
        "pagemesh cluster at {}: {} nodes, {up} up\n",
        app.coordinator,
        app.nodes.len()
    );
    if let Link::Down(why) = &app.link {
        let _ = writeln!(out, "coordinator unreachable: {why}");
    }
    let cells: Vec<[String; 10]> = app.nodes.values().map(cells).collect();
    let widths = widths(&cells);
    for row in std::iter::once(HEADER.map(String::from)).chain(cells) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for guest in guests(app) {
        for line in guest {
            let _ = writeln!(out, "{line}");
        }
    }
    for node in app.nodes.values() {
        if let Health::Down(why) = &node.health {
            let _ = writeln!(out, "node {} is down: {why}", node.info.node_id);
        }
    }
    out
}
