//! Drawing: [`App::render`], one file per view and a file for the latency-histogram widget.
//! Nothing here changes [`App`], and the state does not depend on anything here: the sizes it
//! needs come from `layout`, the number formats from `format`. Everything here is tested
//! against fixed stats with `TestBackend` and `insta` (snapshots in `src/snapshots/`).

pub(crate) mod cluster;
pub(crate) mod heat;
pub(crate) mod help;
pub(crate) mod histogram;
pub(crate) mod latency;
pub(crate) mod log;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Tabs};

use crate::app::{App, Link, View};
use crate::layout;

// Rendering is a method of the state, as in gitui and ratatui's examples, but it is
// defined here, beside the views it draws, so that `app` never depends on the drawing.
impl App {
    /// Draws the console.
    pub fn render(&self, frame: &mut Frame) {
        let [top, body, bottom] = layout::areas(frame.area());
        header(self, frame, top);
        match self.view {
            View::Cluster => cluster::render(self, frame, body),
            View::Heat => heat::render(self, frame, body),
            View::Latency => latency::render(self, frame, body),
            View::Log => log::render(self, frame, body),
        }
        footer(self, frame, bottom);
        if self.help {
            help::render(frame, body);
        }
    }
}

fn header(app: &App, frame: &mut Frame, area: Rect) {
    let up = app.nodes.values().filter(|n| n.is_up()).count();
    let (dot, colour) = match app.link {
        Link::Up => ("●", Color::Green),
        Link::Down(_) => ("●", Color::Red),
        Link::Waiting => ("○", Color::Yellow),
    };
    let status = Line::from(vec![
        Span::styled(dot, Style::new().fg(colour)),
        Span::raw(format!(
            " {} · {} nodes, {up} up ",
            app.coordinator,
            app.nodes.len()
        )),
    ]);
    let width = u16::try_from(status.width()).unwrap_or(u16::MAX);
    let [tabs, right] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Length(width)]).areas(area);
    let titles = View::ALL
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{} {}", i + 1, v.title()));
    frame.render_widget(
        Tabs::new(titles)
            .select(app.view.index())
            .style(Style::new().fg(Color::Gray))
            .highlight_style(
                Style::new()
                    .fg(Color::Black)
                    .bg(Color::Cyan)
                    .add_modifier(Modifier::BOLD),
            ),
        tabs,
    );
    frame.render_widget(Paragraph::new(status), right);
}

fn footer(app: &App, frame: &mut Frame, area: Rect) {
    let keys = match app.view {
        View::Cluster => "↑↓ select node",
        View::Heat => "↑↓ PgUp PgDn scroll · ←→ guest · +/- zoom",
        View::Latency => "←→ guest",
        View::Log => "↑↓ PgUp PgDn scroll · End newest",
    };
    frame.render_widget(
        Paragraph::new(format!(" {keys} · Tab 1-4 views · ? help · q quit"))
            .style(Style::new().fg(Color::DarkGray)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use insta::assert_snapshot;
    use pagemesh_api::stats::{Histogram, NodeStats};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::{KeyCode, KeyEvent};

    use super::*;
    use crate::event::Event;
    use crate::poll::{PollError, Update};
    use crate::testdata;

    const W: u16 = 100;
    const H: u16 = 30;

    fn draw(app: &App) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(app.size.width, app.size.height))
            .expect("test terminal");
        terminal.draw(|f| app.render(f)).expect("draw");
        terminal
    }

    fn key(app: &mut App, code: KeyCode) {
        app.handle(Event::Key(KeyEvent::from(code)));
    }

    fn text(terminal: &Terminal<TestBackend>) -> String {
        terminal.backend().to_string()
    }

    #[test]
    fn cluster_view() {
        let app = testdata::app(W, H, None);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn cluster_view_with_a_node_down() {
        let mut app = testdata::app(W, H, None);
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(4100),
            node: 2,
            result: Err(PollError::Status {
                url: "http://127.0.0.1:9102/stats".into(),
                status: 503,
            }),
        }));
        let t = draw(&app);
        assert!(text(&t).contains("down"));
        assert_snapshot!(t.backend());
    }

    #[test]
    fn a_node_the_coordinator_drops_has_left() {
        let mut app = testdata::app(W, H, None);
        let mut nodes = testdata::nodes();
        nodes.retain(|n| n.node_id != 1);
        app.handle(Event::Update(Update::Nodes {
            at: Duration::from_millis(4200),
            result: Ok(nodes),
        }));
        assert_eq!(app.nodes()[&1].state(), "left");
        let out = cluster::text(&app);
        let row = out
            .lines()
            .find(|l| l.starts_with("1 "))
            .expect("row of node 1");
        assert!(row.contains(" left "), "{out}");
        assert!(
            app.log()
                .iter()
                .any(|e| e.text == "node 1 left the cluster")
        );
    }

    #[test]
    fn a_guest_that_lost_a_memory_node_is_degraded_and_the_repair_shows() {
        let mut app = testdata::app(W, H, None);
        let mut stats = testdata::last_compute(None);
        stats.pager.as_mut().unwrap().lost_nodes = vec![2];
        let mut survivor = testdata::memory(1, 3000, 9.0);
        survivor.server.pages_to_repair = 40;
        for (node, stats) in [(0, stats), (1, survivor)] {
            app.handle(Event::Update(Update::Stats {
                at: Duration::from_millis(4200),
                node,
                result: Ok(Box::new(stats)),
            }));
        }
        let out = cluster::text(&app);
        assert!(
            out.contains("degraded: lost memory node 2; running on the other copies"),
            "{out}"
        );
        let row = out.lines().find(|l| l.starts_with("1 ")).expect("node 1");
        assert!(row.contains("5192/131072 repairing 40"), "{out}");
    }

    #[test]
    fn heat_view() {
        let mut app = testdata::app(W, H, None);
        key(&mut app, KeyCode::Char('2'));
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn a_guest_under_a_budget_shows_its_cache_and_its_evicted_pages() {
        let mut app = testdata::app(W, H, None);
        // Two snapshots a second apart of node 0 under a 1024-page budget: the first half
        // of guest memory evicted, 500 evictions and 200 write-backs in that second.
        for (at_ms, evictions, writebacks) in [(4200, 5000, 1000), (5200, 5500, 1200)] {
            let mut stats = testdata::last_compute(None);
            let p = stats.pager.as_mut().unwrap();
            let half = p.heat.cells.len() / 2;
            for cell in &mut p.heat.cells[..half] {
                cell.remote += cell.local;
                cell.evicted = cell.local;
                cell.local = 0;
            }
            p.cache = Some(pagemesh_api::summary::CacheSummary {
                budget_pages: 1024,
                resident_pages: 1000,
                evictions,
                writeback_pages: writebacks,
                refaults: 70,
                staging_hits: 30,
                ..Default::default()
            });
            stats.uptime_s = at_ms as f64 / 1000.0;
            app.handle(Event::Update(Update::Stats {
                at: Duration::from_millis(at_ms),
                node: 0,
                result: Ok(Box::new(stats)),
            }));
        }
        let out = cluster::text(&app);
        assert!(
            out.contains(
                "cache 1000 of 1024 pages resident (4 MiB budget) · evictions 5500 (500/s) · \
                 write-backs 1200 (200/s) · refaults 70 (0/s) · staging hits 30"
            ),
            "{out}"
        );
        assert!(text(&draw(&app)).contains("evictions 5500 (500/s)"));
        key(&mut app, KeyCode::Char('2'));
        let heat = text(&draw(&app));
        assert!(heat.contains(crate::heat::EVICTED), "{heat}");
        assert!(
            heat.contains("evicted"),
            "the legend says what it is: {heat}"
        );
        assert!(heat.contains(crate::heat::RESIDENT), "{heat}");
    }

    #[test]
    fn a_guest_with_prefetch_shows_its_accuracy() {
        let mut app = testdata::app(W, H, None);
        let mut stats = testdata::last_compute(None);
        stats.pager.as_mut().unwrap().prefetch = Some(pagemesh_api::stats::PrefetchStats {
            issued: 8000,
            used: 7600,
            accuracy: 0.95,
            coverage: 0.9,
            in_flight: 40,
            replayed: 3000,
            ..Default::default()
        });
        stats.uptime_s = 4.2;
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(4200),
            node: 0,
            result: Ok(Box::new(stats)),
        }));
        let out = cluster::text(&app);
        assert!(
            out.contains(
                "prefetch 8000 pages · accuracy 95.0% · coverage 90.0% · 40 touched in flight"
            ),
            "{out}"
        );
        assert!(out.contains("replayed working set 3000 pages"), "{out}");
    }

    #[test]
    fn heat_view_zoomed_out_and_in() {
        // 20 rows: 14 for the grid.
        let mut app = testdata::app(W, 20, None);
        key(&mut app, KeyCode::Tab);
        key(&mut app, KeyCode::Char('-'));
        key(&mut app, KeyCode::Char('-'));
        assert_snapshot!("heat_view_zoomed_out", draw(&app).backend());
        // From 1:4 to 8 columns a cell: 11 cells a row, 24 rows.
        for _ in 0..5 {
            key(&mut app, KeyCode::Char('+'));
        }
        for _ in 0..3 {
            key(&mut app, KeyCode::Down);
        }
        assert_eq!(app.heat.scroll, 3);
        assert_snapshot!("heat_view_zoomed_in_scrolled", draw(&app).backend());
        key(&mut app, KeyCode::End);
        assert_eq!(app.heat.scroll, 10, "scrolling stops at the last row");
        key(&mut app, KeyCode::Home);
        assert_eq!(app.heat.scroll, 0);
    }

    #[test]
    fn latency_view_without_ebpf() {
        let mut app = testdata::app(W, H, None);
        key(&mut app, KeyCode::Char('3'));
        let t = draw(&app);
        assert!(text(&t).contains("eBPF probes not loaded"));
        assert_snapshot!(t.backend());
    }

    #[test]
    fn latency_view_with_ebpf() {
        let ebpf = testdata::ebpf();
        let mut app = testdata::app(W, H, Some(ebpf));
        key(&mut app, KeyCode::Char('3'));
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn latency_view_says_where_the_stall_went() {
        let mut ebpf = testdata::ebpf();
        ebpf.breakdown = Some(pagemesh_api::summary::StallBreakdown {
            samples: 900,
            of_samples: 910,
            delivery_us: 25.1,
            fetch_us: 30.4,
            install_us: 4.1,
            resume_us: 10.5,
            stall_us: 70.1,
            stall_all_us: 70.0,
            ..Default::default()
        });
        let mut app = testdata::app(W, H, Some(ebpf));
        key(&mut app, KeyCode::Char('3'));
        let out = text(&draw(&app));
        assert!(
            out.contains("stall 70.1 µs = delivery 25.1 + fetch 30.4"),
            "{out}"
        );
    }

    #[test]
    fn latency_view_shows_the_pagers_install_time_once_it_has_samples() {
        let mut app = testdata::app(W, H, None);
        key(&mut app, KeyCode::Char('3'));
        let update = |app: &mut App, at_ms, install: Histogram| {
            let mut stats = testdata::last_compute(None);
            if let Some(p) = stats.pager.as_mut() {
                p.install_latency = install;
            }
            app.handle(Event::Update(Update::Stats {
                at: Duration::from_millis(at_ms),
                node: 0,
                result: Ok(Box::new(stats)),
            }));
        };
        // A node that does not report it (older, or no install yet): no panel.
        update(&mut app, 4100, Histogram::default());
        assert!(!text(&draw(&app)).contains("Page install (pager)"));
        update(
            &mut app,
            4200,
            testdata::histogram(&[(2.0, 10), (5.0, 90), (10.0, 100)], [3.0, 4.5, 8.0, 9.5]),
        );
        let t = text(&draw(&app));
        assert!(t.contains("Page install (pager)"), "{t}");
        assert!(t.contains("Fault service time"), "{t}");
    }

    #[test]
    fn log_view() {
        let mut app = testdata::app(W, H, None);
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(4100),
            node: 2,
            result: Err(PollError::Status {
                url: "http://127.0.0.1:9102/stats".into(),
                status: 503,
            }),
        }));
        key(&mut app, KeyCode::Char('4'));
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn help_overlay() {
        let mut app = testdata::app(W, H, None);
        key(&mut app, KeyCode::Char('?'));
        assert_snapshot!(draw(&app).backend());
        key(&mut app, KeyCode::Char('?'));
        assert!(!app.help);
    }

    #[test]
    fn every_view_draws_before_any_data_and_on_tiny_terminals() {
        for (w, h) in [(W, H), (20, 6), (1, 1), (0, 0)] {
            let mut app = App::new("http://127.0.0.1:7070", w, h);
            for code in ['1', '2', '3', '4', '?'] {
                key(&mut app, KeyCode::Char(code));
                draw(&app);
            }
            let mut app = testdata::app(w, h, Some(testdata::ebpf()));
            for code in ['1', '2', '3', '4', '?', '-', '+', '+', '+', '+'] {
                key(&mut app, KeyCode::Char(code));
                key(&mut app, KeyCode::PageDown);
                draw(&app);
            }
        }
    }

    #[test]
    fn empty_console() {
        let app = App::new("http://127.0.0.1:7070", 60, 8);
        assert_snapshot!(draw(&app).backend());
    }

    #[test]
    fn once_text() {
        let app = testdata::app(W, H, None);
        assert_snapshot!(cluster::text(&app));
    }

    #[test]
    fn stats_without_a_pager_or_heat_show_placeholders() {
        let mut app = testdata::app(W, H, None);
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(4100),
            node: 0,
            result: Ok(Box::new(NodeStats {
                node_id: 0,
                ..NodeStats::default()
            })),
        }));
        key(&mut app, KeyCode::Char('2'));
        assert!(text(&draw(&app)).contains("No node runs a guest"));
        key(&mut app, KeyCode::Char('3'));
        assert!(text(&draw(&app)).contains("No node runs a guest"));
    }
}
