//! What the console reacts to: keys, resizes, the clock, and poll results ([`Update`], the
//! type the background pollers send, defined beside them in [`crate::poll`]).

use ratatui::crossterm::event::KeyEvent;

use crate::poll::Update;

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

/// The pollers send [`Update`]s on the channel the app reads [`Event`]s from.
impl From<Update> for Event {
    fn from(update: Update) -> Self {
        Event::Update(update)
    }
}
