//! What the console reacts to: keys, resizes, the clock, and poll results from the
//! background pollers.

use std::time::Duration;

use pagemesh_api::stats::NodeStats;
use pagemesh_api::{NodeId, NodeInfo};
use ratatui::crossterm::event::KeyEvent;

use crate::poll::PollError;

/// One input to [`App::handle`](crate::App::handle).
#[derive(Debug)]
pub enum Event {
    /// A key was pressed.
    Key(KeyEvent),
    /// Time passed with nothing else to do.
    Tick,
    /// A poller has news.
    Update(Update),
    /// The terminal is now `width` × `height`.
    Resize(u16, u16),
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
