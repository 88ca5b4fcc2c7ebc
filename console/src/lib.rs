//! pagemesh-console: a live terminal view of a pagemesh cluster — which parts of a guest's
//! memory are hot, which node holds them, how often faults go remote and how long they take.
//!
//! | module | what |
//! |---|---|
//! | [`app`] | the state ([`App`]) and how each [`Event`] changes it |
//! | [`event`] | [`Event`]: keys, resizes, ticks and poll results |
//! | [`poll`] | background threads polling the coordinator's `GET /nodes` and each node's `GET /stats`, and what they send ([`Update`]) |
//! | [`rate`] | per-second rates from successive snapshots of counters |
//! | [`heat`] | guest memory as a grid: merging heat cells, zoom, geometry |
//! | `layout` | where things go on the terminal, from its size alone (state and drawing agree on what fits) |
//! | `format` | number formats: durations, ratios, rates, sizes |
//! | `ui` | drawing ([`App::render`]), a file per view; snapshot-tested with `TestBackend` and `insta` |
//! | `input` | the thread turning terminal input into [`Event`]s |
//!
//! Modules depend on each other one way only: `ui` reads `app`; `app` uses `event`, `poll`,
//! `rate`, `heat`, `layout` and `format`, never `ui`; `event` wraps `poll`'s [`Update`], and
//! `poll` depends on no other module of the crate.
//!
//! The binary, `pagemesh-console`, only parses its arguments and calls [`run_terminal`] or
//! [`once`]. [`run`] is the event loop, generic over the ratatui backend so tests can drive it
//! with `TestBackend`. The wire types are [`pagemesh_api`]'s: the console does not depend on
//! the node.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod app;
pub mod event;
mod format;
pub mod heat;
mod input;
mod layout;
pub mod poll;
pub mod rate;
#[cfg(test)]
mod testdata;
mod ui;

use std::io::IsTerminal;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ratatui::Terminal;
use ratatui::backend::Backend;

pub use app::{App, View};
pub use event::Event;
pub use poll::Update;
use poll::{PollConfig, PollError, Poller};

/// Longest wait between two redraws when nothing happens.
const TICK: Duration = Duration::from_millis(250);

/// What the console does, from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Coordinator base URL.
    pub coordinator: String,
    /// The coordinator's bearer token (`Keyring::coordinator_token`), when the cluster has
    /// a key.
    pub token: Option<String>,
    /// Time between two `/stats` of a node.
    pub interval: Duration,
    /// Longest wait for one HTTP answer.
    pub timeout: Duration,
    /// Regions of the heat map to ask nodes for (their default, 1024, when `None`).
    pub heat_cells: Option<usize>,
}

impl Options {
    /// Defaults for the coordinator at `url` (`http://` is assumed when it has no scheme):
    /// stats every 200 ms, answers within a second.
    pub fn new(url: &str) -> Self {
        Self {
            coordinator: poll::base_url(url),
            token: None,
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            heat_cells: None,
        }
    }

    fn poll_config(&self) -> PollConfig {
        PollConfig {
            interval: self.interval,
            timeout: self.timeout,
            heat_cells: self.heat_cells,
            token: self.token.clone(),
            ..PollConfig::new(&self.coordinator)
        }
    }
}

/// Why the console stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// `--once` got no node list.
    #[error("no node list from the coordinator; is it running, and is --coordinator right?")]
    Coordinator(#[source] PollError),
    /// Standard output is not a terminal.
    #[error("standard output is not a terminal; use --once for a plain-text snapshot")]
    NotATerminal,
    /// The terminal could not be set up, drawn on or restored.
    #[error("terminal failure")]
    Terminal(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Runs the console until `app` wants to quit or `events` has no sender left: draws, waits
/// for an event (a [`Event::Tick`] after `tick` without one), hands it to the app.
///
/// Every event queued when the app wakes is handled before the next redraw, so a burst of
/// poll results costs one frame.
pub fn run<B: Backend>(
    terminal: &mut Terminal<B>,
    app: &mut App,
    events: &Receiver<Event>,
    tick: Duration,
) -> Result<(), B::Error> {
    while !app.should_quit() {
        terminal.draw(|frame| app.render(frame))?;
        let event = match events.recv_timeout(tick) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => Event::Tick,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        app.handle(event);
        while !app.should_quit() {
            match events.try_recv() {
                Ok(event) => app.handle(event),
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// The interactive console on this process's terminal: sets the terminal up (raw mode,
/// alternate screen), polls in the background, runs until `q`, and restores the terminal,
/// also when drawing fails or a panic unwinds.
pub fn run_terminal(options: &Options) -> Result<(), ConsoleError> {
    if !std::io::stdout().is_terminal() {
        return Err(ConsoleError::NotATerminal);
    }
    let (tx, rx) = mpsc::channel();
    let _poller = Poller::spawn(options.poll_config(), tx.clone())
        .map_err(|e| ConsoleError::Thread("poller", e))?;
    // Installs a panic hook that restores the terminal, then enters raw mode and the
    // alternate screen.
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            ratatui::restore();
            return Err(ConsoleError::Terminal(e));
        }
    };
    let result = (|| {
        let input = input::Input::spawn(tx).map_err(|e| ConsoleError::Thread("input", e))?;
        let size = terminal.size().map_err(ConsoleError::Terminal)?;
        let mut app = App::new(&options.coordinator, size.width, size.height);
        let result = run(&mut terminal, &mut app, &rx, TICK).map_err(ConsoleError::Terminal);
        // Stop reading the terminal before handing it back to the shell.
        input.stop();
        result
    })();
    let shown = terminal.show_cursor();
    drop(terminal);
    let restored = ratatui::try_restore();
    result?;
    shown.and(restored).map_err(ConsoleError::Terminal)
}

/// One plain-text snapshot of the Cluster view: the node list, two rounds of stats
/// `options.interval` apart (so rates are known), rendered as text.
pub fn once(options: &Options) -> Result<String, ConsoleError> {
    let agent = poll::agent(options.timeout);
    let start = Instant::now();
    let nodes = poll::fetch_nodes(&agent, &options.coordinator, options.token.as_deref())
        .map_err(ConsoleError::Coordinator)?;
    let mut app = App::new(&options.coordinator, 120, 40);
    app.handle(Event::Update(Update::Nodes {
        at: start.elapsed(),
        result: Ok(nodes.clone()),
    }));
    for round in 0..2 {
        if round > 0 {
            thread::sleep(options.interval);
        }
        let results: Vec<_> = thread::scope(|s| {
            let agent = &agent;
            let handles: Vec<_> = nodes
                .iter()
                .filter_map(|n| Some((n.node_id, n.admin.as_deref()?)))
                .map(|(id, admin)| {
                    s.spawn(move || {
                        (
                            id,
                            poll::fetch_stats(agent, admin, options.heat_cells).map(Box::new),
                        )
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let at = start.elapsed();
        for (node, result) in results {
            app.handle(Event::Update(Update::Stats { at, node, result }));
        }
    }
    Ok(ui::cluster::text(&app))
}

#[cfg(test)]
mod tests {
    use ratatui::backend::TestBackend;
    use ratatui::crossterm::event::{KeyCode, KeyEvent};

    use super::*;

    #[test]
    fn run_draws_handles_events_and_stops_on_q() {
        let (tx, rx) = mpsc::channel();
        let mut app = testdata::app(100, 30, None);
        let mut terminal = Terminal::new(TestBackend::new(100, 30)).expect("terminal");
        for event in [
            Event::Key(KeyEvent::from(KeyCode::Char('2'))),
            Event::Resize(80, 24),
            Event::Key(KeyEvent::from(KeyCode::Char('q'))),
            Event::Key(KeyEvent::from(KeyCode::Char('3'))),
        ] {
            tx.send(event).expect("send");
        }
        run(&mut terminal, &mut app, &rx, Duration::from_millis(10)).expect("run");
        assert!(app.should_quit());
        assert_eq!(app.view(), View::Heat, "events after q are not handled");
        assert!(terminal.backend().to_string().contains("1 Cluster"));
    }

    #[test]
    fn run_ends_when_the_senders_are_gone() {
        let (tx, rx) = mpsc::channel();
        drop(tx);
        let mut app = App::new("http://127.0.0.1:1", 40, 10);
        let mut terminal = Terminal::new(TestBackend::new(40, 10)).expect("terminal");
        run(&mut terminal, &mut app, &rx, Duration::from_millis(10)).expect("run");
        assert!(!app.should_quit());
    }

    #[test]
    fn resizing_the_terminal_redraws_at_the_new_size() {
        let (tx, rx) = mpsc::channel();
        let mut app = testdata::app(100, 30, None);
        let mut terminal = Terminal::new(TestBackend::new(100, 30)).expect("terminal");
        terminal.backend_mut().resize(60, 12);
        tx.send(Event::Resize(60, 12)).expect("send");
        tx.send(Event::Tick).expect("send");
        drop(tx);
        run(&mut terminal, &mut app, &rx, Duration::from_millis(10)).expect("run");
        let text = terminal.backend().to_string();
        assert_eq!(text.lines().count(), 12);
        assert!(text.lines().all(|l| l.chars().count() == 62), "{text}");
    }

    #[test]
    fn coordinator_urls_get_a_scheme() {
        assert_eq!(
            Options::new("127.0.0.1:7070/").coordinator,
            "http://127.0.0.1:7070"
        );
        assert_eq!(Options::new("https://c:1").coordinator, "https://c:1");
    }

    #[test]
    fn once_fails_clearly_without_a_coordinator() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let err = once(&Options::new(&url)).expect_err("nothing listens");
        assert!(matches!(err, ConsoleError::Coordinator(_)));
        let text = app::chain(&err);
        assert!(
            text.starts_with("no node list from the coordinator"),
            "{text}"
        );
        assert!(
            text.contains(&format!("cannot reach {url}/nodes")),
            "{text}"
        );
    }
}
