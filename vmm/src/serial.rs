//! The guest's COM1 (an 8250 UART from vm-superio) and where its output goes.
//!
//! Output is cut into lines; each line goes to the node's log (target `guest`) and, with
//! `--console`, to stdout, and is kept in a small ring so the node can report how far the
//! guest got.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;
/// Lines kept for reporting.
const KEEP_LINES: usize = 64;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Lines whose first appearance is recorded (boot progress).
pub const MILESTONES: &[&str] = &[
    "Linux version",
    "Command line:",
    "Memory:",
    "Calibrating delay loop",
    "Freeing unused kernel",
    "Run /init",
    "pagemesh-init",
    "Kernel panic",
];

/// What the guest printed, shared with whoever reports on it.
pub struct ConsoleLog {
    lines: VecDeque<String>,
    /// Lines printed so far.
    pub count: u64,
    started: std::time::Instant,
    seen: Vec<(&'static str, f64)>,
}

impl Default for ConsoleLog {
    fn default() -> Self {
        Self {
            lines: VecDeque::new(),
            count: 0,
            started: std::time::Instant::now(),
            seen: Vec::new(),
        }
    }
}

impl ConsoleLog {
    /// Seconds after the log was created at which a line containing the milestone `m`
    /// first appeared.
    pub fn milestone(&self, m: &str) -> Option<f64> {
        self.seen.iter().find(|(s, _)| *s == m).map(|(_, t)| *t)
    }

    /// Every milestone seen, with its time in seconds.
    pub fn milestones(&self) -> std::collections::BTreeMap<String, f64> {
        self.seen
            .iter()
            .map(|(s, t)| ((*s).to_owned(), *t))
            .collect()
    }

    /// The last lines printed.
    pub fn tail(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }

    /// Whether any kept line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }
}

/// The UART's output side: splits bytes into lines.
pub struct LineSink {
    partial: Vec<u8>,
    echo: bool,
    log: Arc<Mutex<ConsoleLog>>,
}

impl LineSink {
    /// A sink that also echoes to stdout when `echo`.
    pub fn new(echo: bool, log: Arc<Mutex<ConsoleLog>>) -> Self {
        Self {
            partial: Vec::new(),
            echo,
            log,
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_owned();
        self.partial.clear();
        tracing::info!(target: "guest", "{line}");
        if self.echo {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.count += 1;
        for m in MILESTONES {
            if line.contains(m) && log.milestone(m).is_none() {
                let t = log.started.elapsed().as_secs_f64();
                tracing::info!("guest reached '{m}' after {t:.1} s");
                log.seen.push((m, t));
            }
        }
        if log.lines.len() == KEEP_LINES {
            log.lines.pop_front();
        }
        log.lines.push_back(line);
    }
}

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.emit();
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART.
pub type Com1 = Serial<IrqTrigger, vm_superio::serial::NoEvents, LineSink>;

/// A COM1 whose interrupt is `irq`.
pub fn com1(irq: EventFd, sink: LineSink) -> Com1 {
    Serial::new(IrqTrigger(irq), sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_into_lines() {
        let log = Arc::new(Mutex::new(ConsoleLog::default()));
        let mut sink = LineSink::new(false, log.clone());
        sink.write_all(b"[    0.000000] Linux version 6.1\r\nMemory: 2")
            .unwrap();
        sink.write_all(b"56M\n").unwrap();
        let l = log.lock().unwrap();
        assert_eq!(l.count, 2);
        assert_eq!(l.tail()[0], "[    0.000000] Linux version 6.1");
        assert!(l.contains("Memory: 256M"));
        assert!(l.milestone("Linux version").is_some());
        assert!(l.milestone("Memory:").is_some());
        assert!(l.milestone("Kernel panic").is_none());
    }

    #[test]
    fn the_uart_passes_bytes_through_and_raises_its_interrupt() {
        let log = Arc::new(Mutex::new(ConsoleLog::default()));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = com1(evt.try_clone().unwrap(), LineSink::new(false, log.clone()));
        uart.write(1, 0x02).unwrap(); // IER: transmitter-empty interrupt
        for b in b"hi\n" {
            uart.write(0, *b).unwrap();
        }
        assert_eq!(log.lock().unwrap().tail(), vec!["hi".to_owned()]);
        assert!(evt.read().unwrap() >= 1);
    }
}
