//! The console's state and how events change it. Drawing lives in the `ui` module, which
//! reads this state; nothing here depends on it (the sizes the state needs to keep scrolling
//! in range come from `layout`).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use pagemesh_api::stats::NodeStats;
use pagemesh_api::{NodeId, NodeInfo};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;

use crate::event::Event;
use crate::format::percent;
use crate::heat::Zoom;
use crate::layout;
use crate::poll::{PollError, Update};
use crate::rate::Rate;

/// Log entries kept; older ones are dropped.
const LOG_CAPACITY: usize = 2000;
/// Fault-rate samples kept per node for the sparkline.
const HISTORY: usize = 240;

/// The four views, in tab order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum View {
    /// Nodes and their figures.
    #[default]
    Cluster,
    /// Guest memory as a grid.
    Heat,
    /// Latency distributions.
    Latency,
    /// What happened.
    Log,
}

impl View {
    /// Every view, in tab order.
    pub const ALL: [View; 4] = [View::Cluster, View::Heat, View::Latency, View::Log];

    /// The tab's name.
    pub fn title(self) -> &'static str {
        match self {
            View::Cluster => "Cluster",
            View::Heat => "Heat",
            View::Latency => "Latency",
            View::Log => "Log",
        }
    }

    /// Position in [`View::ALL`].
    pub fn index(self) -> usize {
        match self {
            View::Cluster => 0,
            View::Heat => 1,
            View::Latency => 2,
            View::Log => 3,
        }
    }

    fn nth(i: usize) -> Self {
        Self::ALL[i % Self::ALL.len()]
    }
}

/// Whether the coordinator answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Not asked yet.
    Waiting,
    /// The last `GET /nodes` worked.
    Up,
    /// The last `GET /nodes` failed, and why.
    Down(String),
}

/// Whether a node's `/stats` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Registered, not polled yet.
    Waiting,
    /// The last poll worked.
    Up,
    /// The last poll failed, and why.
    Down(String),
    /// The node registered no admin endpoint: nothing to poll.
    NoAdmin,
}

/// How important a log entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Normal life of a cluster.
    Info,
    /// Worth a look.
    Warn,
    /// Something failed.
    Error,
}

/// One line of the Log view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Time since the console started polling.
    pub at: Duration,
    /// Importance.
    pub level: Level,
    /// What happened.
    pub text: String,
}

/// What the console knows about one node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its registration.
    pub info: NodeInfo,
    /// Whether the coordinator still lists it.
    pub listed: bool,
    /// Whether its stats answer.
    pub health: Health,
    /// Its last good stats.
    pub stats: Option<NodeStats>,
    /// Guest faults per second (remote, zero-filled and spurious).
    pub faults: Rate,
    /// Pages served per second.
    pub served: Rate,
    /// Page cache evictions per second (under a local memory budget).
    pub evictions: Rate,
    /// Page cache write-backs per second.
    pub writebacks: Rate,
    /// Page cache refaults per second (evicted pages fetched or zero-filled again).
    pub refaults: Rate,
    /// Recent fault rates, oldest first.
    pub fault_history: VecDeque<u64>,
    /// Each heat cell's faults in the snapshot before [`Node::stats`] (same VM), for the
    /// cells that faulted in between.
    pub heat_previous: Vec<u64>,
}

impl Node {
    fn new(info: NodeInfo) -> Self {
        let health = if info.admin.is_some() {
            Health::Waiting
        } else {
            Health::NoAdmin
        };
        Self {
            info,
            listed: true,
            health,
            stats: None,
            faults: Rate::default(),
            served: Rate::default(),
            evictions: Rate::default(),
            writebacks: Rate::default(),
            refaults: Rate::default(),
            fault_history: VecDeque::new(),
            heat_previous: Vec::new(),
        }
    }

    fn reset_cache_rates(&mut self) {
        self.evictions.reset();
        self.writebacks.reset();
        self.refaults.reset();
    }

    /// Whether its figures are current: listed and answering.
    pub fn is_up(&self) -> bool {
        self.listed && self.info.up && self.health == Health::Up
    }

    /// Short state for tables: `up`, `down`, `left`, `no admin` or `waiting`.
    pub fn state(&self) -> &'static str {
        if !self.listed {
            return "left";
        }
        if !self.info.up {
            // The coordinator has not heard from it within its lease.
            return "down";
        }
        match self.health {
            Health::Up => "up",
            Health::Down(_) => "down",
            Health::NoAdmin => "no admin",
            Health::Waiting => "waiting",
        }
    }

    /// Whether it runs a guest (as far as its last stats tell).
    pub fn has_pager(&self) -> bool {
        self.stats.as_ref().is_some_and(|s| s.pager.is_some())
    }
}

/// Where the Heat view is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeatView {
    /// Zoom level.
    pub zoom: Zoom,
    /// First row shown.
    pub scroll: usize,
}

/// The console: everything it knows and shows.
#[derive(Debug)]
pub struct App {
    pub(crate) coordinator: String,
    pub(crate) view: View,
    pub(crate) help: bool,
    quit: bool,
    pub(crate) size: Rect,
    now: Duration,
    pub(crate) link: Link,
    pub(crate) nodes: BTreeMap<NodeId, Node>,
    pub(crate) log: Vec<LogEntry>,
    pub(crate) selected: Option<NodeId>,
    pub(crate) heat: HeatView,
    /// Lines scrolled back from the newest log entry (0 follows new entries).
    pub(crate) log_scroll: usize,
}

impl App {
    /// A console for the cluster at `coordinator`, drawn on a `width` × `height` terminal.
    pub fn new(coordinator: &str, width: u16, height: u16) -> Self {
        Self {
            coordinator: coordinator.trim_end_matches('/').to_owned(),
            view: View::default(),
            help: false,
            quit: false,
            size: Rect::new(0, 0, width, height),
            now: Duration::ZERO,
            link: Link::Waiting,
            nodes: BTreeMap::new(),
            log: Vec::new(),
            selected: None,
            heat: HeatView::default(),
            log_scroll: 0,
        }
    }

    /// Whether `q` was pressed.
    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// The view shown.
    pub fn view(&self) -> View {
        self.view
    }

    /// The nodes known, by id.
    pub fn nodes(&self) -> &BTreeMap<NodeId, Node> {
        &self.nodes
    }

    /// The log, oldest first.
    pub fn log(&self) -> &[LogEntry] {
        &self.log
    }

    /// Reacts to one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Key(key) => self.key(key),
            Event::Tick => {}
            Event::Resize(width, height) => {
                self.size = Rect::new(0, 0, width, height);
                self.clamp_scroll();
            }
            Event::Update(Update::Nodes { at, result }) => {
                self.now = self.now.max(at);
                self.nodes_polled(result);
            }
            Event::Update(Update::Stats { at, node, result }) => {
                self.now = self.now.max(at);
                self.stats_polled(at, node, result);
            }
            Event::Update(Update::Left { at, node }) => {
                self.now = self.now.max(at);
                self.left(node);
            }
        }
    }

    fn key(&mut self, key: KeyEvent) {
        if key.kind == KeyEventKind::Release {
            return;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('c') if ctrl => self.quit = true,
            KeyCode::Char('?') => self.help = !self.help,
            KeyCode::Esc => self.help = false,
            _ if self.help => {}
            KeyCode::Tab => self.view = View::nth(self.view.index() + 1),
            KeyCode::BackTab => self.view = View::nth(self.view.index() + View::ALL.len() - 1),
            KeyCode::Char(c @ '1'..='4') => {
                self.view = View::nth(usize::from(c as u8 - b'1'));
            }
            KeyCode::Char('+' | '=') => {
                self.heat.zoom.zoom_in();
                self.clamp_scroll();
            }
            KeyCode::Char('-' | '_') => {
                self.heat.zoom.zoom_out();
                self.clamp_scroll();
            }
            KeyCode::Up => self.scroll(-1),
            KeyCode::Down => self.scroll(1),
            KeyCode::PageUp => self.scroll(-self.page()),
            KeyCode::PageDown => self.scroll(self.page()),
            KeyCode::Home => self.scroll(isize::MIN / 2),
            KeyCode::End => self.scroll(isize::MAX / 2),
            KeyCode::Left => self.cycle_guest(false),
            KeyCode::Right => self.cycle_guest(true),
            _ => {}
        }
    }

    fn page(&self) -> isize {
        isize::try_from(self.size.height.saturating_sub(6).max(1)).unwrap_or(1)
    }

    /// Moves down (`by > 0`) or up in the current view.
    fn scroll(&mut self, by: isize) {
        match self.view {
            View::Cluster => {
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                if ids.is_empty() {
                    return;
                }
                let at = self
                    .selected
                    .and_then(|s| ids.iter().position(|&id| id == s))
                    .unwrap_or(0);
                let to = at.saturating_add_signed(by).min(ids.len() - 1);
                self.selected = ids.get(to).copied();
            }
            View::Heat => {
                self.heat.scroll = self.heat.scroll.saturating_add_signed(by);
                self.clamp_scroll();
            }
            View::Latency => {}
            View::Log => {
                // Up goes back in time, away from the newest entry.
                self.log_scroll = self.log_scroll.saturating_add_signed(-by);
                self.clamp_scroll();
            }
        }
    }

    fn clamp_scroll(&mut self) {
        let cells = self
            .guest_node()
            .and_then(|n| n.stats.as_ref()?.pager.as_ref())
            .map(|p| p.heat.cells.len());
        let max = cells.map_or(0, |cells| {
            layout::heat_geometry(self.size, cells, self.heat.zoom).max_scroll()
        });
        self.heat.scroll = self.heat.scroll.min(max);
        let visible = layout::log_lines(self.size);
        self.log_scroll = self.log_scroll.min(self.log.len().saturating_sub(visible));
    }

    /// The node whose guest the Heat and Latency views show: the selected node if it runs a
    /// guest, otherwise the first that does.
    pub fn guest_node(&self) -> Option<&Node> {
        self.selected
            .and_then(|id| self.nodes.get(&id))
            .filter(|n| n.has_pager())
            .or_else(|| self.nodes.values().find(|n| n.has_pager()))
    }

    /// Selects the next (or previous) node that runs a guest.
    fn cycle_guest(&mut self, forward: bool) {
        let guests: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.has_pager())
            .map(|(&id, _)| id)
            .collect();
        if guests.is_empty() {
            return;
        }
        let current = self.guest_node().map(|n| n.info.node_id);
        let at = guests
            .iter()
            .position(|&id| Some(id) == current)
            .unwrap_or(0);
        let next = if forward {
            (at + 1) % guests.len()
        } else {
            (at + guests.len() - 1) % guests.len()
        };
        self.selected = Some(guests[next]);
        self.heat.scroll = 0;
    }

    fn note(&mut self, level: Level, text: String) {
        if self.log.len() >= LOG_CAPACITY {
            self.log.drain(..LOG_CAPACITY / 10);
        }
        // A reader scrolled back keeps looking at the same lines.
        if self.log_scroll > 0 {
            self.log_scroll += 1;
        }
        self.log.push(LogEntry {
            at: self.now,
            level,
            text,
        });
    }

    fn nodes_polled(&mut self, result: Result<Vec<NodeInfo>, PollError>) {
        let list = match result {
            Ok(list) => list,
            Err(err) => {
                let why = chain(&err);
                if !matches!(&self.link, Link::Down(w) if *w == why) {
                    self.note(Level::Error, format!("coordinator unreachable: {why}"));
                }
                self.link = Link::Down(why);
                return;
            }
        };
        match self.link {
            Link::Waiting => self.note(
                Level::Info,
                format!(
                    "coordinator {} lists {} node{}",
                    self.coordinator,
                    list.len(),
                    if list.len() == 1 { "" } else { "s" }
                ),
            ),
            Link::Down(_) => self.note(Level::Info, "coordinator reachable again".into()),
            Link::Up => {}
        }
        self.link = Link::Up;
        for info in &list {
            self.node_listed(info);
        }
        let gone: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| n.listed && !list.iter().any(|i| i.node_id == **id))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.left(id);
        }
        if self.selected.is_none() {
            self.selected = self.nodes.keys().next().copied();
        }
        self.clamp_scroll();
    }

    /// Node `id` is no longer registered: it left the cluster (it deregisters when its work
    /// is over). Not an error: a node that fails while registered is `down` instead.
    fn left(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id).filter(|n| n.listed) else {
            return;
        };
        node.listed = false;
        node.faults.reset();
        node.served.reset();
        self.note(Level::Info, format!("node {id} left the cluster"));
    }

    fn node_listed(&mut self, info: &NodeInfo) {
        let id = info.node_id;
        // A node that left and registers again is a new node (a new process).
        if self.nodes.get(&id).is_some_and(|n| !n.listed) {
            self.nodes.remove(&id);
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            let admin = info.admin.as_deref().unwrap_or("none");
            self.nodes.insert(id, Node::new(info.clone()));
            self.note(
                Level::Info,
                format!(
                    "node {id} joined: {}, pages at {}, admin {admin}",
                    info.role, info.endpoint.address
                ),
            );
            if info.admin.is_none() {
                self.note(
                    Level::Warn,
                    format!("node {id} has no admin endpoint: its figures cannot be shown"),
                );
            }
            return;
        };
        let moved = node.info.endpoint != info.endpoint
            || node.info.admin != info.admin
            || node.info.registered_at_ms != info.registered_at_ms;
        let admin_changed = node.info.admin != info.admin;
        let lease = match (node.info.up, info.up) {
            (true, false) => Some((
                Level::Error,
                format!(
                    "node {id} is down: the coordinator has not heard from it within its {:.1} s lease",
                    info.lease_ms as f64 / 1e3
                ),
            )),
            (false, true) => Some((Level::Info, format!("node {id} renewed its lease: up"))),
            _ => None,
        };
        node.info = info.clone();
        if admin_changed {
            *node = Node::new(info.clone());
        }
        if moved {
            self.note(
                Level::Info,
                format!(
                    "node {id} registered again: pages at {}, admin {}",
                    info.endpoint.address,
                    info.admin.as_deref().unwrap_or("none")
                ),
            );
        }
        if let Some((level, text)) = lease {
            self.note(level, text);
        }
    }

    fn stats_polled(
        &mut self,
        at: Duration,
        id: NodeId,
        result: Result<Box<NodeStats>, PollError>,
    ) {
        // A node that left keeps its last figures; a poll that was under way when it left
        // says nothing new.
        let Some(node) = self.nodes.get_mut(&id).filter(|n| n.listed) else {
            return;
        };
        let stats = match result {
            Ok(stats) => *stats,
            Err(err) => {
                let why = chain(&err);
                let was_down = matches!(node.health, Health::Down(_));
                node.health = Health::Down(why.clone());
                node.faults.reset();
                node.served.reset();
                if !was_down {
                    self.note(Level::Error, format!("node {id} is down: {why}"));
                }
                return;
            }
        };
        let mut notes = Vec::new();
        match node.health {
            Health::Down(_) => notes.push((Level::Info, format!("node {id} answers again"))),
            Health::Waiting | Health::NoAdmin => notes.push((
                Level::Info,
                format!(
                    "node {id} is up: {}, running for {:.1} s",
                    node.info.role, stats.uptime_s
                ),
            )),
            Health::Up => {}
        }
        node.health = Health::Up;
        let previous = node.stats.take();
        let restarted = previous
            .as_ref()
            .is_some_and(|p| stats.uptime_s + 0.5 < p.uptime_s);
        let previous = if restarted {
            notes.push((Level::Warn, format!("node {id} restarted")));
            node.faults.reset();
            node.served.reset();
            node.reset_cache_rates();
            node.fault_history.clear();
            None
        } else {
            previous
        };
        notes.extend(changes(id, previous.as_ref(), &stats));

        node.served.push(at, stats.server.pages_served);
        node.heat_previous.clear();
        match &stats.pager {
            Some(pager) => {
                node.faults.push(
                    at,
                    pager.faults_remote + pager.faults_local_zero + pager.faults_spurious,
                );
                if let Some(rate) = node.faults.per_second() {
                    if node.fault_history.len() >= HISTORY {
                        node.fault_history.pop_front();
                    }
                    node.fault_history.push_back(rate.round() as u64);
                }
                match &pager.cache {
                    Some(c) => {
                        node.evictions.push(at, c.evictions);
                        node.writebacks.push(at, c.writeback_pages);
                        node.refaults.push(at, c.refaults);
                    }
                    None => node.reset_cache_rates(),
                }
                if let Some(before) = previous.as_ref().and_then(|p| p.pager.as_ref())
                    && before.vm == pager.vm
                    && before.heat.cells.len() == pager.heat.cells.len()
                {
                    node.heat_previous = before.heat.cells.iter().map(|c| c.faults).collect();
                }
            }
            None => {
                node.faults.reset();
                node.reset_cache_rates();
                node.fault_history.clear();
            }
        }
        node.stats = Some(stats);
        for (level, text) in notes {
            self.note(level, text);
        }
        self.clamp_scroll();
    }
}

/// Log lines for what changed between two snapshots of node `id`.
fn changes(id: NodeId, before: Option<&NodeStats>, now: &NodeStats) -> Vec<(Level, String)> {
    let mut notes = Vec::new();
    let old_pager = before.and_then(|b| b.pager.as_ref());
    if let Some(pager) = &now.pager {
        let same_vm = old_pager.is_some_and(|p| p.vm == pager.vm);
        if !same_vm {
            notes.push((
                Level::Info,
                format!(
                    "node {id} runs vm {} ({} pages)",
                    pager.vm, pager.guest_pages
                ),
            ));
        }
        let was_running = old_pager.is_some_and(|p| p.vm == pager.vm && p.running);
        if !pager.running && (was_running || !same_vm) {
            notes.push((
                Level::Info,
                format!(
                    "vm {} on node {id} finished: {} remote faults, {} zero-filled, \
                     remote-miss ratio {}",
                    pager.vm,
                    pager.faults_remote,
                    pager.faults_local_zero,
                    percent(pager.remote_miss_ratio)
                ),
            ));
        }
        let errors_before = old_pager
            .filter(|p| p.vm == pager.vm)
            .map_or(0, |p| p.fault_errors);
        if pager.fault_errors > errors_before {
            notes.push((
                Level::Error,
                format!(
                    "node {id}: {} faults could not be served (vm {})",
                    pager.fault_errors - errors_before,
                    pager.vm
                ),
            ));
        }
    }
    let frames_before = before.map_or(0, |b| b.server.bad_frames);
    if now.server.bad_frames > frames_before {
        notes.push((
            Level::Warn,
            format!(
                "node {id} received {} malformed requests",
                now.server.bad_frames - frames_before
            ),
        ));
    }
    notes
}

pub(crate) use pagemesh_api::error_chain as chain;

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::{KeyEventState, KeyModifiers};

    use super::*;
    use crate::testdata;

    fn press(app: &mut App, code: KeyCode) {
        app.handle(Event::Key(KeyEvent::from(code)));
    }

    fn stats(app: &mut App, at_ms: u64, node: NodeId, stats: NodeStats) {
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(at_ms),
            node,
            result: Ok(Box::new(stats)),
        }));
    }

    fn last_log(app: &App) -> &str {
        app.log().last().map_or("", |e| e.text.as_str())
    }

    #[test]
    fn keys_switch_views_and_quit() {
        let mut app = App::new("http://c", 80, 24);
        assert_eq!(app.view(), View::Cluster);
        press(&mut app, KeyCode::Tab);
        assert_eq!(app.view(), View::Heat);
        press(&mut app, KeyCode::BackTab);
        press(&mut app, KeyCode::BackTab);
        assert_eq!(app.view(), View::Log);
        press(&mut app, KeyCode::Char('3'));
        assert_eq!(app.view(), View::Latency);
        press(&mut app, KeyCode::Char('5'));
        assert_eq!(app.view(), View::Latency);
        // While help shows, view keys do nothing; Esc closes it.
        press(&mut app, KeyCode::Char('?'));
        press(&mut app, KeyCode::Char('1'));
        assert_eq!(app.view(), View::Latency);
        press(&mut app, KeyCode::Esc);
        press(&mut app, KeyCode::Char('1'));
        assert_eq!(app.view(), View::Cluster);
        // Key releases are not presses.
        app.handle(Event::Key(KeyEvent {
            code: KeyCode::Char('q'),
            modifiers: KeyModifiers::NONE,
            kind: KeyEventKind::Release,
            state: KeyEventState::NONE,
        }));
        assert!(!app.should_quit());
        press(&mut app, KeyCode::Char('q'));
        assert!(app.should_quit());

        let mut app = App::new("http://c", 80, 24);
        app.handle(Event::Key(KeyEvent::new(
            KeyCode::Char('c'),
            KeyModifiers::CONTROL,
        )));
        assert!(app.should_quit());
    }

    #[test]
    fn arrows_select_nodes_in_the_cluster_view() {
        let mut app = testdata::app(100, 30, None);
        assert_eq!(app.selected, Some(0));
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down);
        press(&mut app, KeyCode::Down);
        assert_eq!(app.selected, Some(2), "stops at the last node");
        press(&mut app, KeyCode::Home);
        assert_eq!(app.selected, Some(0));
        // The selected node runs no guest: Heat and Latency show the one that does.
        press(&mut app, KeyCode::End);
        assert_eq!(app.guest_node().map(|n| n.info.node_id), Some(0));
        press(&mut app, KeyCode::Right);
        assert_eq!(app.selected, Some(0), "the only guest");
    }

    #[test]
    fn rates_come_from_successive_snapshots() {
        let app = testdata::app(100, 30, None);
        let rate = app.nodes()[&0].faults.per_second().expect("a rate");
        // 6000 remote faults over 6300 pages touched in 20 rounds; the last 5 rounds touched
        // 440+420+380+320+300 pages in one second.
        assert!((rate - 6000.0 * 1860.0 / 6300.0).abs() < 2.0, "{rate}");
        assert_eq!(app.nodes()[&0].fault_history.len(), 19);
        assert!(app.nodes()[&0].heat_previous.len() == 256);
    }

    #[test]
    fn a_restarted_node_starts_its_rates_over() {
        let mut app = testdata::app(100, 30, None);
        let mut restarted = app.nodes()[&1].stats.clone().expect("stats");
        restarted.uptime_s = 0.3;
        restarted.server.pages_served = 10;
        stats(&mut app, 4200, 1, restarted);
        assert_eq!(last_log(&app), "node 1 restarted");
        assert_eq!(app.nodes()[&1].served.per_second(), None);
    }

    #[test]
    fn guests_finishing_and_failing_faults_are_logged() {
        let mut app = testdata::app(100, 30, None);
        let mut done = app.nodes()[&0].stats.clone().expect("stats");
        let pager = done.pager.as_mut().expect("pager");
        pager.running = false;
        pager.fault_errors = 3;
        stats(&mut app, 4200, 0, done);
        let texts: Vec<&str> = app.log().iter().map(|e| e.text.as_str()).collect();
        assert!(
            texts.contains(
                &"vm 1 on node 0 finished: 6000 remote faults, 144 zero-filled, \
                  remote-miss ratio 97.7%"
            ),
            "{texts:?}"
        );
        assert_eq!(
            last_log(&app),
            "node 0: 3 faults could not be served (vm 1)"
        );
        assert_eq!(app.log().last().map(|e| e.level), Some(Level::Error));
    }

    #[test]
    fn coordinator_outages_are_logged_once() {
        let mut app = testdata::app(100, 30, None);
        let down = || PollError::Status {
            url: "http://c/nodes".into(),
            status: 500,
        };
        let before = app.log().len();
        for at in [5000, 6000] {
            app.handle(Event::Update(Update::Nodes {
                at: Duration::from_millis(at),
                result: Err(down()),
            }));
        }
        assert_eq!(app.log().len(), before + 1);
        assert_eq!(
            last_log(&app),
            "coordinator unreachable: http://c/nodes answered HTTP 500"
        );
        assert!(
            app.nodes().values().all(|n| n.state() == "up"),
            "nodes stay as their own stats say"
        );
        app.handle(Event::Update(Update::Nodes {
            at: Duration::from_millis(7000),
            result: Ok(testdata::nodes()),
        }));
        assert_eq!(last_log(&app), "coordinator reachable again");
        assert_eq!(app.log().last().map(|e| e.at), Some(Duration::from_secs(7)));
    }

    #[test]
    fn a_node_without_admin_endpoint_says_so() {
        let mut app = App::new("http://c", 80, 24);
        let mut nodes = testdata::nodes();
        nodes[1].admin = None;
        app.handle(Event::Update(Update::Nodes {
            at: Duration::ZERO,
            result: Ok(nodes),
        }));
        assert_eq!(app.nodes()[&1].state(), "no admin");
        assert_eq!(app.nodes()[&0].state(), "waiting");
        assert!(
            app.log()
                .iter()
                .any(|e| e.text == "node 1 has no admin endpoint: its figures cannot be shown")
        );
    }

    #[test]
    fn a_node_whose_lease_runs_out_is_down_until_it_renews() {
        let mut app = testdata::app(100, 30, None);
        let ms = Duration::from_millis;
        assert_eq!(app.nodes()[&1].state(), "up");
        let mut nodes = testdata::nodes();
        nodes[1].up = false;
        app.handle(Event::Update(Update::Nodes {
            at: ms(4100),
            result: Ok(nodes.clone()),
        }));
        assert_eq!(app.nodes()[&1].state(), "down");
        assert!(!app.nodes()[&1].is_up());
        assert_eq!(
            last_log(&app),
            "node 1 is down: the coordinator has not heard from it within its 10.0 s lease"
        );
        assert_eq!(app.log().last().map(|e| e.level), Some(Level::Error));
        let entries = app.log().len();
        app.handle(Event::Update(Update::Nodes {
            at: ms(4200),
            result: Ok(nodes),
        }));
        assert_eq!(app.log().len(), entries, "said once");
        app.handle(Event::Update(Update::Nodes {
            at: ms(4300),
            result: Ok(testdata::nodes()),
        }));
        assert_eq!(last_log(&app), "node 1 renewed its lease: up");
        assert_eq!(app.nodes()[&1].state(), "up");
    }

    #[test]
    fn a_node_that_leaves_is_logged_as_left_not_down() {
        let mut app = testdata::app(100, 30, None);
        let ms = Duration::from_millis;
        // Node 2's /stats failed and the coordinator no longer knows it: it finished.
        app.handle(Event::Update(Update::Left {
            at: ms(4100),
            node: 2,
        }));
        assert_eq!(last_log(&app), "node 2 left the cluster");
        assert_eq!(app.log().last().map(|e| e.level), Some(Level::Info));
        assert_eq!(app.nodes()[&2].state(), "left");
        // A poll under way when it left, and the node list without it, add nothing.
        let entries = app.log().len();
        app.handle(Event::Update(Update::Stats {
            at: ms(4150),
            node: 2,
            result: Err(PollError::Status {
                url: "http://127.0.0.1:9102/stats".into(),
                status: 503,
            }),
        }));
        let mut nodes = testdata::nodes();
        nodes.retain(|n| n.node_id != 2);
        app.handle(Event::Update(Update::Nodes {
            at: ms(4200),
            result: Ok(nodes.clone()),
        }));
        assert_eq!(app.log().len(), entries, "{:?}", app.log());

        // A node the coordinator still lists whose /stats fails is down: an error.
        app.handle(Event::Update(Update::Stats {
            at: ms(4300),
            node: 1,
            result: Err(PollError::Status {
                url: "http://127.0.0.1:9101/stats".into(),
                status: 503,
            }),
        }));
        assert_eq!(
            last_log(&app),
            "node 1 is down: http://127.0.0.1:9101/stats answered HTTP 503"
        );
        assert_eq!(app.log().last().map(|e| e.level), Some(Level::Error));
        assert_eq!(app.nodes()[&1].state(), "down");

        // Node 2 registers again: a new process, a new node.
        app.handle(Event::Update(Update::Nodes {
            at: ms(5000),
            result: Ok(testdata::nodes()),
        }));
        assert_eq!(
            last_log(&app),
            "node 2 joined: memory, pages at 127.0.0.1:9002, admin 127.0.0.1:9102"
        );
        assert_eq!(app.nodes()[&2].state(), "waiting");
    }

    #[test]
    fn log_scroll_stays_put_while_entries_arrive() {
        // 6 lines of log visible, 8 entries.
        let mut app = testdata::app(100, 10, None);
        press(&mut app, KeyCode::Char('4'));
        press(&mut app, KeyCode::Up);
        assert_eq!(app.log_scroll, 1);
        app.handle(Event::Update(Update::Stats {
            at: Duration::from_millis(4100),
            node: 2,
            result: Err(PollError::Status {
                url: "u".into(),
                status: 503,
            }),
        }));
        assert_eq!(app.log_scroll, 2);
        press(&mut app, KeyCode::End);
        assert_eq!(app.log_scroll, 0);
    }
}
