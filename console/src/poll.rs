//! Background polling: the coordinator's node list and every node's `/stats`.
//!
//! ```text
//!  discovery thread ── GET /nodes (every second) ──▶ Update::Nodes ─┐
//!     │ starts/stops one worker per node with an admin address      ├─▶ channel ─▶ UI thread
//!  worker (node n) ── GET /stats (every interval) ─▶ Update::Stats ─┤
//!     └ when /stats fails: GET /nodes/{n}, 404 ──────▶ Update::Left ─┘
//! ```
//!
//! A node that finishes deregisters before it exits, so when its `/stats` stops answering the
//! coordinator has already forgotten it: the worker asks, and reports the node as gone
//! ([`Update::Left`]) rather than down, then stops.
//!
//! Blocking HTTP (ureq) in plain threads: one worker per node, so a node that hangs until
//! its timeout delays only its own row, and the UI thread never waits on the network. Threads
//! end when the [`Poller`] is dropped or the receiving end of the channel is gone.
//!
//! The pollers know nothing of the console's other inputs: they send [`Update`]s into any
//! channel whose messages can be made from one (the console's carries
//! [`Event`](crate::Event)s, which can).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread;
use std::time::{Duration, Instant};

use pagemesh_api::stats::NodeStats;
use pagemesh_api::{NodeId, NodeInfo};
use ureq::Agent;

/// Why a poll brought nothing.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No answer: refused, timed out, name not found.
    #[error("cannot reach {url}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// The transport's reason.
        #[source]
        source: ureq::Error,
    },
    /// An answer other than 200.
    #[error("{url} answered HTTP {status}{}", if *status == 401 {
        " (the coordinator has a cluster key: give the console --cluster-key-file)"
    } else {
        ""
    })]
    Status {
        /// What was asked.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// A 200 whose body is not the expected JSON.
    #[error("{url} sent an unexpected body")]
    Body {
        /// What was asked.
        url: String,
        /// The decoder's reason.
        #[source]
        source: ureq::Error,
    },
}

/// A poll result. `at` is the time since polling started, so rates do not depend on when the
/// UI thread gets to the message.
#[derive(Debug)]
pub enum Update {
    /// The coordinator's `GET /nodes`.
    Nodes {
        /// When the answer arrived.
        at: Duration,
        /// The node list, or why there is none.
        result: Result<Vec<NodeInfo>, PollError>,
    },
    /// One node's `GET /stats`.
    Stats {
        /// When the answer arrived.
        at: Duration,
        /// The node asked.
        node: NodeId,
        /// Its statistics (boxed: they are large), or why there are none.
        result: Result<Box<NodeStats>, PollError>,
    },
    /// A node's `GET /stats` failed and the coordinator no longer knows the node: it left
    /// the cluster (it deregistered when its work was over).
    Left {
        /// When the coordinator's answer arrived.
        at: Duration,
        /// The node.
        node: NodeId,
    },
}

/// Timings of the pollers.
#[derive(Clone, Debug)]
pub struct PollConfig {
    /// Coordinator base URL (`http://127.0.0.1:7070`).
    pub coordinator: String,
    /// The coordinator's bearer token, when the cluster has a key.
    pub token: Option<String>,
    /// Time between two `/stats` of one node.
    pub interval: Duration,
    /// Time between two `GET /nodes`.
    pub discovery: Duration,
    /// Longest wait for one answer.
    pub timeout: Duration,
    /// Regions of the heat map to ask nodes for (their default when `None`).
    pub heat_cells: Option<usize>,
}

impl PollConfig {
    /// Defaults around `coordinator`: stats every 200 ms (5 a second), nodes every second,
    /// answers within a second.
    pub fn new(coordinator: &str) -> Self {
        Self {
            coordinator: coordinator.trim_end_matches('/').to_owned(),
            token: None,
            interval: Duration::from_millis(200),
            discovery: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            heat_cells: None,
        }
    }
}

/// An HTTP agent that gives up after `timeout`.
pub fn agent(timeout: Duration) -> Agent {
    Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// `GET {coordinator}{path}` as JSON from the first of `coordinators` (one URL, or several
/// comma-separated: coordinators sharing an etcd store) that answers; the last failure
/// when none does. A coordinator that answers 503 (its store failed) is passed over too.
fn from_any<T: serde::de::DeserializeOwned>(
    agent: &Agent,
    coordinators: &str,
    path: &str,
    token: Option<&str>,
) -> Result<T, PollError> {
    let mut last = None;
    for base in coordinators
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        match get_json(agent, format!("{}{path}", base_url(base)), token) {
            Err(e @ (PollError::Unreachable { .. } | PollError::Status { status: 503, .. })) => {
                last = Some(e);
            }
            answer => return answer,
        }
    }
    match last {
        Some(e) => Err(e),
        None => get_json(agent, format!("{coordinators}{path}"), token),
    }
}

/// `GET {coordinator}/nodes`, with the bearer `token` when given, from the first of the
/// comma-separated `coordinator` URLs that answers.
pub fn fetch_nodes(
    agent: &Agent,
    coordinator: &str,
    token: Option<&str>,
) -> Result<Vec<NodeInfo>, PollError> {
    from_any(agent, coordinator, "/nodes", token)
}

/// `GET {coordinator}/nodes/{node}`, with the bearer `token` when given, from the first of
/// the comma-separated `coordinator` URLs that answers.
pub fn fetch_node(
    agent: &Agent,
    coordinator: &str,
    token: Option<&str>,
    node: NodeId,
) -> Result<NodeInfo, PollError> {
    from_any(agent, coordinator, &format!("/nodes/{node}"), token)
}

/// `GET http://{admin}/stats`; `admin` is `host:port` or a URL. `heat_cells` asks for the
/// guest's heat map in that many regions (the node's default otherwise).
pub fn fetch_stats(
    agent: &Agent,
    admin: &str,
    heat_cells: Option<usize>,
) -> Result<NodeStats, PollError> {
    let query = heat_cells.map_or_else(String::new, |n| format!("?cells={n}"));
    get_json(agent, format!("{}/stats{query}", base_url(admin)), None)
}

/// `address` as a base URL: `http://` when it has no scheme, no trailing `/`.
pub(crate) fn base_url(address: &str) -> String {
    let address = address.trim_end_matches('/');
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

fn get_json<T: serde::de::DeserializeOwned>(
    agent: &Agent,
    url: String,
    token: Option<&str>,
) -> Result<T, PollError> {
    let mut request = agent.get(&url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::StatusCode(status)) => return Err(PollError::Status { url, status }),
        Err(source) => return Err(PollError::Unreachable { url, source }),
    };
    match response.body_mut().read_json::<T>() {
        Ok(v) => Ok(v),
        Err(source) => Err(PollError::Body { url, source }),
    }
}

/// The running pollers; dropping it stops them.
pub struct Poller {
    stop: Arc<AtomicBool>,
}

impl Poller {
    /// Starts discovery (which starts the workers); every result goes to `events`.
    pub fn spawn<E>(config: PollConfig, events: Sender<E>) -> std::io::Result<Self>
    where
        E: From<Update> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        thread::Builder::new()
            .name("discovery".into())
            .spawn(move || discover(&config, &events, &flag))?;
        Ok(Self { stop })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Worker {
    admin: String,
    stop: Arc<AtomicBool>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn discover<E>(config: &PollConfig, events: &Sender<E>, stop: &Arc<AtomicBool>)
where
    E: From<Update> + Send + 'static,
{
    let start = Instant::now();
    let agent = agent(config.timeout);
    let mut workers: BTreeMap<NodeId, Worker> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        let result = fetch_nodes(&agent, &config.coordinator, config.token.as_deref());
        if let Ok(nodes) = &result {
            // Dropping a worker stops its thread. A worker whose node left has stopped by
            // itself; should the node be listed again, it gets a new one.
            workers.retain(|id, w| {
                !w.stop.load(Ordering::Relaxed)
                    && nodes
                        .iter()
                        .any(|n| n.node_id == *id && n.admin.as_deref() == Some(w.admin.as_str()))
            });
            for node in nodes {
                let Some(admin) = &node.admin else { continue };
                if workers.contains_key(&node.node_id) {
                    continue;
                }
                let worker = Worker {
                    admin: admin.clone(),
                    stop: Arc::new(AtomicBool::new(false)),
                };
                let job = StatsJob {
                    node: node.node_id,
                    admin: admin.clone(),
                    coordinator: config.coordinator.clone(),
                    token: config.token.clone(),
                    start,
                    interval: config.interval,
                    heat_cells: config.heat_cells,
                    agent: agent.clone(),
                    events: events.clone(),
                    stops: [Arc::clone(stop), Arc::clone(&worker.stop)],
                };
                // A node we cannot start a thread for shows as waiting; the next round retries.
                if thread::Builder::new()
                    .name(format!("stats-{}", node.node_id))
                    .spawn(move || job.run())
                    .is_ok()
                {
                    workers.insert(node.node_id, worker);
                }
            }
        }
        // When the coordinator is unreachable the workers keep polling the nodes they know.
        let update = Update::Nodes {
            at: start.elapsed(),
            result,
        };
        if events.send(update.into()).is_err() {
            break;
        }
        sleep_until(began + config.discovery, || stop.load(Ordering::Relaxed));
    }
}

struct StatsJob<E> {
    node: NodeId,
    admin: String,
    coordinator: String,
    token: Option<String>,
    start: Instant,
    interval: Duration,
    heat_cells: Option<usize>,
    agent: Agent,
    events: Sender<E>,
    /// The poller's and this worker's (set by the worker itself when its node left).
    stops: [Arc<AtomicBool>; 2],
}

impl<E: From<Update>> StatsJob<E> {
    fn stopped(&self) -> bool {
        self.stops.iter().any(|s| s.load(Ordering::Relaxed))
    }

    /// Whether the coordinator says it knows no such node (asked after a failed `/stats`:
    /// a node deregisters before it stops answering). Any other answer, or none, leaves the
    /// failure a failure.
    fn left(&self) -> bool {
        matches!(
            fetch_node(
                &self.agent,
                &self.coordinator,
                self.token.as_deref(),
                self.node
            ),
            Err(PollError::Status { status: 404, .. })
        )
    }

    fn run(self) {
        while !self.stopped() {
            let began = Instant::now();
            let result = fetch_stats(&self.agent, &self.admin, self.heat_cells).map(Box::new);
            if self.stopped() {
                break;
            }
            let left = result.is_err() && self.left();
            let update = if left {
                Update::Left {
                    at: self.start.elapsed(),
                    node: self.node,
                }
            } else {
                Update::Stats {
                    at: self.start.elapsed(),
                    node: self.node,
                    result,
                }
            };
            if self.events.send(update.into()).is_err() {
                break;
            }
            if left {
                self.stops[1].store(true, Ordering::Relaxed);
                break;
            }
            sleep_until(began + self.interval, || self.stopped());
        }
    }
}

/// Sleeps until `deadline` in short steps, returning early once `stopped()`.
fn sleep_until(deadline: Instant, stopped: impl Fn() -> bool) {
    const STEP: Duration = Duration::from_millis(50);
    loop {
        let now = Instant::now();
        if now >= deadline || stopped() {
            return;
        }
        thread::sleep((deadline - now).min(STEP));
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use super::*;

    /// An HTTP server answering every request with `status` and `body`.
    fn serve(status: &'static str, body: String) -> String {
        serve_recording(status, body).0
    }

    /// Same, also sending each request line (`GET /stats HTTP/1.1`) to the receiver.
    fn serve_recording(status: &'static str, body: String) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local address").to_string();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() {
                    let _ = tx.send(line.trim_end().to_owned());
                    line.clear();
                }
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (addr, rx)
    }

    fn dead_address() -> String {
        // Bound and dropped: nothing listens there now.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.local_addr().expect("local address").to_string()
    }

    #[test]
    fn stats_are_decoded() {
        let (addr, requests) = serve_recording("200 OK", r#"{"node_id":7,"role":"memory","uptime_s":1.5,"server":{"pages_held":3,"capacity_pages":9,"pages_served":0,"pages_claimed":0,"pages_written_back":0,"bad_frames":0,"connections":0,"open_connections":0},"pager":null,"ebpf":null}"#.into());
        let a = agent(Duration::from_secs(2));
        let stats = fetch_stats(&a, &addr, None).expect("stats");
        assert_eq!(stats.node_id, 7);
        assert_eq!(stats.server.pages_held, 3);
        fetch_stats(&a, &format!("http://{addr}/"), Some(4096)).expect("stats");
        let seen: Vec<String> = requests.try_iter().collect();
        assert_eq!(
            seen,
            ["GET /stats HTTP/1.1", "GET /stats?cells=4096 HTTP/1.1"]
        );
    }

    #[test]
    fn errors_say_what_failed() {
        let a = agent(Duration::from_secs(2));
        let err = fetch_stats(&a, &dead_address(), None).expect_err("nothing listens");
        assert!(matches!(err, PollError::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("cannot reach http://127.0.0.1:")
        );

        let err = fetch_nodes(
            &a,
            &format!("http://{}/", serve("503 Service Unavailable", "{}".into())),
            None,
        )
        .expect_err("503");
        assert!(
            matches!(err, PollError::Status { status: 503, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().ends_with("/nodes answered HTTP 503"),
            "{err}"
        );

        let err = fetch_stats(&a, &serve("200 OK", "[1, 2]".into()), None).expect_err("not stats");
        assert!(matches!(err, PollError::Body { .. }), "{err:?}");
    }

    fn job(admin: String, coordinator: String, events: mpsc::Sender<Update>) -> StatsJob<Update> {
        StatsJob {
            node: 5,
            admin,
            coordinator: format!("http://{coordinator}"),
            token: None,
            start: Instant::now(),
            interval: Duration::from_millis(20),
            heat_cells: None,
            agent: agent(Duration::from_secs(2)),
            events,
            stops: [
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(false)),
            ],
        }
    }

    #[test]
    fn a_node_the_coordinator_forgot_has_left_and_its_worker_stops() {
        let (coordinator, asked) =
            serve_recording("404 Not Found", r#"{"error":"unknown node 5"}"#.into());
        let (tx, rx) = mpsc::channel();
        let worker = job(dead_address(), coordinator, tx);
        let own_stop = Arc::clone(&worker.stops[1]);
        // Returns: the worker stops by itself once the node has left, and says so.
        worker.run();
        assert!(own_stop.load(Ordering::Relaxed));
        let updates: Vec<Update> = rx.try_iter().collect();
        assert!(
            matches!(updates[..], [Update::Left { node: 5, .. }]),
            "{updates:?}"
        );
        assert_eq!(
            asked.try_iter().collect::<Vec<_>>(),
            ["GET /nodes/5 HTTP/1.1"]
        );
    }

    #[test]
    fn a_node_the_coordinator_still_lists_is_down() {
        let (tx, rx) = mpsc::channel();
        let listed = serve("200 OK", "{}".into());
        let worker = job(dead_address(), listed, tx);
        let stop = Arc::clone(&worker.stops[1]);
        let thread = thread::spawn(move || worker.run());
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Update::Stats {
                node: 5,
                result: Err(PollError::Unreachable { .. }),
                ..
            }) => {}
            other => panic!("expected a failed poll, got {other:?}"),
        }
        stop.store(true, Ordering::Relaxed);
        thread.join().expect("the worker stops");
    }

    #[test]
    fn base_urls() {
        assert_eq!(base_url("127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(base_url("http://h:9/"), "http://h:9");
    }

    #[test]
    fn of_several_coordinators_the_first_that_answers_serves() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (live, _) = serve_recording("200 OK", "[]".into());
        let a = agent(Duration::from_secs(1));
        let nodes = fetch_nodes(&a, &format!("{dead},{live}"), None).unwrap();
        assert!(nodes.is_empty());
        let err = fetch_nodes(&a, &format!("{dead}"), None).unwrap_err();
        assert!(matches!(err, PollError::Unreachable { .. }), "{err}");
    }

    #[test]
    fn an_unreachable_coordinator_is_reported_and_polling_stops_with_the_receiver() {
        let (tx, rx) = mpsc::channel::<Update>();
        let mut config = PollConfig::new(&format!("http://{}", dead_address()));
        config.discovery = Duration::from_millis(20);
        let poller = Poller::spawn(config, tx).expect("spawn");
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Update::Nodes { result: Err(e), .. }) => {
                assert!(matches!(e, PollError::Unreachable { .. }), "{e:?}");
            }
            other => panic!("expected a failed node list, got {other:?}"),
        }
        drop(poller);
        drop(rx);
    }
}
