//! The thread that reads the terminal and sends keys and resizes as [`Event`]s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use ratatui::crossterm::event::{self as term, Event as TermEvent};

use crate::event::Event;

/// How often the thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// The running input thread.
pub(crate) struct Input {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Input {
    /// Starts reading; events go to `events`.
    pub(crate) fn spawn(events: Sender<Event>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("input".into())
            .spawn(move || read(&events, &flag))?;
        Ok(Self { stop, thread })
    }

    /// Stops reading and waits for the thread, so that nothing reads the terminal after the
    /// console hands it back.
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

fn read(events: &Sender<Event>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // Poll with a timeout rather than block in read(), to see the stop flag.
        match term::poll(POLL) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let event = match term::read() {
            Ok(TermEvent::Key(key)) => Event::Key(key),
            Ok(TermEvent::Resize(width, height)) => Event::Resize(width, height),
            Ok(_) => continue,
            Err(_) => return,
        };
        if events.send(event).is_err() {
            return;
        }
    }
}
