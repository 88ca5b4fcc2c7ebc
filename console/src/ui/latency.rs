//! The Latency view: fault service time in user space beside the kernel's view (vCPU stall
//! and page install, when the node runs its eBPF probes), transfer time per peer, and the
//! fault rate over time.

use pagemesh_api::stats::Histogram;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Sparkline, Table, Wrap};

use super::histogram::Bars;
use crate::app::App;
use crate::format::{micros, per_second};

pub(crate) fn render(app: &App, frame: &mut Frame, area: Rect) {
    let Some((node, stats, pager)) = app.guest_node().and_then(|n| {
        let stats = n.stats.as_ref()?;
        Some((n, stats, stats.pager.as_ref()?))
    }) else {
        frame.render_widget(
            Paragraph::new(
                "No node runs a guest yet: latencies appear when a compute node reports its pager.",
            )
            .style(Style::new().fg(Color::DarkGray))
            .block(Block::bordered().title(" Latency ")),
            area,
        );
        return;
    };
    let id = node.info.node_id;
    let peer_rows = u16::try_from(pager.peers.len()).unwrap_or(u16::MAX);
    let [top, peers_area, rate_area] = Layout::vertical([
        Constraint::Fill(1),
        Constraint::Length(peer_rows.saturating_add(3).min(10)),
        Constraint::Length(5),
    ])
    .areas(area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top);

    // The pager's own install time (UFFDIO_COPY), under its service time, once it has any.
    let fault_area = if pager.install_latency.count > 0 {
        let [fault, install] =
            Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(left);
        histogram(
            frame,
            install,
            " Page install (pager) ".into(),
            &pager.install_latency,
            Color::Green,
        );
        fault
    } else {
        left
    };
    histogram(
        frame,
        fault_area,
        format!(" Fault service time · node {id} · vm {} ", pager.vm),
        &pager.fault_latency,
        Color::Cyan,
    );
    match &stats.ebpf {
        Some(ebpf) => {
            let [stall, install] =
                Layout::vertical([Constraint::Fill(1), Constraint::Fill(1)]).areas(right);
            // Where the stall's time went, once samples were matched with the handler's.
            let stall = match &ebpf.breakdown {
                Some(b) => {
                    let [line, rest] =
                        Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(stall);
                    frame.render_widget(
                        Paragraph::new(format!(
                            "stall {:.1} µs = delivery {:.1} + fetch {:.1} + install {:.1} + \
                             resume {:.1} (means of {} sampled stalls)",
                            b.stall_us,
                            b.delivery_us,
                            b.fetch_us,
                            b.install_us,
                            b.resume_us,
                            b.samples
                        ))
                        .style(Style::new().fg(Color::Magenta))
                        .wrap(Wrap { trim: true }),
                        line,
                    );
                    rest
                }
                None => stall,
            };
            histogram(
                frame,
                stall,
                " vCPU stall per fault (eBPF) ".into(),
                &ebpf.stall,
                Color::Magenta,
            );
            histogram(
                frame,
                install,
                " Page install (eBPF) ".into(),
                &ebpf.install,
                Color::Green,
            );
        }
        None => frame.render_widget(
            Paragraph::new(vec![
                Line::raw(format!("eBPF probes not loaded on node {id}.")),
                Line::raw(""),
                Line::styled(
                    "The vCPU stall per fault and the page-install time, measured in the \
                     kernel, show here when the node runs with its probes.",
                    Style::new().fg(Color::DarkGray),
                ),
            ])
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" Kernel view (eBPF) ")),
            right,
        ),
    }

    // Transfer per peer, user space and (when loaded) kernel side.
    let ebpf_peers = stats.ebpf.as_ref().map(|e| &e.transfer);
    let mut header = vec!["peer", "pages", "p50", "p90", "p99", "max"];
    if ebpf_peers.is_some() {
        header.extend(["eBPF p50", "eBPF p99"]);
    }
    let rows = pager.peers.iter().map(|p| {
        let t = &p.transfer;
        let mut cells = vec![
            p.node_id.to_string(),
            p.pages.to_string(),
            micros(t.p50_us),
            micros(t.p90_us),
            micros(t.p99_us),
            micros(t.max_us),
        ];
        if let Some(peers) = ebpf_peers {
            match peers.iter().find(|k| k.node_id == p.node_id) {
                Some(k) => cells.extend([micros(k.transfer.p50_us), micros(k.transfer.p99_us)]),
                None => cells.extend(["-".into(), "-".into()]),
            }
        }
        Row::new(cells)
    });
    let widths = header
        .iter()
        .map(|&h| Constraint::Length(if h == "peer" { 4 } else { 9 }));
    frame.render_widget(
        Table::new(rows, widths)
            .header(Row::new(header.clone()).style(Style::new().add_modifier(Modifier::BOLD)))
            .block(Block::bordered().title(" Transfer per peer (request sent to last byte) ")),
        peers_area,
    );

    // Fault rate over time: the newest samples that fit.
    let block = Block::bordered().title(format!(
        " Faults/s · node {id} · now {} · peak {} ",
        node.faults
            .per_second()
            .map_or_else(|| "-".into(), per_second),
        per_second(node.fault_history.iter().copied().max().unwrap_or(0) as f64),
    ));
    let width = usize::from(block.inner(rate_area).width);
    let skip = node.fault_history.len().saturating_sub(width);
    let data: Vec<u64> = node.fault_history.iter().skip(skip).copied().collect();
    frame.render_widget(
        Sparkline::default()
            .data(&data)
            .style(Style::new().fg(Color::Yellow))
            .block(block),
        rate_area,
    );
}

/// A histogram in a box: two summary lines, then the bars.
fn histogram(frame: &mut Frame, area: Rect, title: String, h: &Histogram, colour: Color) {
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [summary, bars] =
        Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(inner);
    let mean = if h.count > 0 {
        micros(h.sum_us / h.count as f64)
    } else {
        "-".into()
    };
    frame.render_widget(
        Paragraph::new(vec![
            Line::raw(format!(
                "p50 {}  p90 {}  p99 {}",
                micros(h.p50_us),
                micros(h.p90_us),
                micros(h.p99_us)
            )),
            Line::styled(
                format!("n {}  mean {mean}  max {}", h.count, micros(h.max_us)),
                Style::new().fg(Color::DarkGray),
            ),
        ]),
        summary,
    );
    frame.render_widget(
        Bars {
            histogram: h,
            colour,
        },
        bars,
    );
}
