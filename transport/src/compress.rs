//! Whether a connection's runs travel packed (`--compress`): pages compressed one by one,
//! zero pages as a length alone ([`pagemesh_protocol::packed`]).
//!
//! Packing costs CPU at both ends (about a microsecond or two a page here) and saves the
//! bytes it removes, which are worth the link's time per byte: on loopback almost nothing,
//! at 1 Gbit/s about 33 µs a 4 KiB page. So `auto` measures rather than guesses: every
//! [`EPOCH`] requests it spends [`TRIAL`] requests asking for packed replies and as many
//! asking for plain ones, in turns, and keeps asking for packed replies only if their median
//! time per page was at most [`WIN`] of the plain ones'. What it measures is the whole
//! request (server's compression, the wire, this end's decompression), on this link, for
//! these pages, so it turns packing on where it pays and off where it does not (a fast link,
//! pages that do not shrink; the server sends those plain anyway).

use std::fmt;
use std::time::Duration;

/// `--compress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Runs travel plain; a Hello offers nothing.
    Off,
    /// Every run packed (each page that shrinks compressed, zero pages as a length).
    On,
    /// Packed where it measures faster ([`Chooser`]): the node's default.
    Auto,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Off => "off",
            Compression::On => "on",
            Compression::Auto => "auto",
        })
    }
}

/// Requests between two trials of `auto`.
pub const EPOCH: u32 = 4096;
/// Requests of each kind in a trial.
pub const TRIAL: usize = 16;
/// Packed requests must take at most this share of the plain ones' median time per page.
pub const WIN: f64 = 0.9;

/// Chooses, request by request, whether a connection asks for packed runs.
#[derive(Clone, Debug)]
pub struct Chooser {
    mode: Compression,
    /// Requests since the trial began.
    seen: u32,
    /// Time per page of the trial's packed and plain requests, ns.
    packed: [u32; TRIAL],
    plain: [u32; TRIAL],
    /// The choice since the last trial ended.
    chosen: bool,
}

impl Chooser {
    /// A chooser for `mode`; `auto` begins with a trial.
    pub fn new(mode: Compression) -> Self {
        Chooser {
            mode,
            seen: 0,
            packed: [0; TRIAL],
            plain: [0; TRIAL],
            chosen: false,
        }
    }

    /// Whether the next request asks for (or sends) a packed run.
    pub fn packed(&self) -> bool {
        match self.mode {
            Compression::Off => false,
            Compression::On => true,
            Compression::Auto => match self.trial_turn() {
                Some(i) => i % 2 == 0,
                None => self.chosen,
            },
        }
    }

    /// The choice outside trials (for `on`, always; for `off`, never).
    pub fn chosen(&self) -> bool {
        match self.mode {
            Compression::Off => false,
            Compression::On => true,
            Compression::Auto => self.chosen,
        }
    }

    /// Books a request of `pages` pages that [`Chooser::packed`] said to pack (`packed`)
    /// or not, and took `took` from sending it to its reply. Returns the trial's medians
    /// (packed, plain, ns a page) when it ended a trial that changed the choice.
    pub fn took(&mut self, packed: bool, pages: usize, took: Duration) -> Option<(u32, u32)> {
        if self.mode != Compression::Auto {
            return None;
        }
        let mut changed = None;
        if let Some(i) = self.trial_turn()
            && packed == (i % 2 == 0)
        {
            let ns = took.as_nanos() / pages.max(1) as u128;
            let ns = u32::try_from(ns).unwrap_or(u32::MAX);
            match packed {
                true => self.packed[i / 2] = ns,
                false => self.plain[i / 2] = ns,
            }
            if i + 1 == 2 * TRIAL {
                let (p, u) = (median(self.packed), median(self.plain));
                let chosen = p as f64 <= WIN * u as f64;
                if chosen != self.chosen {
                    changed = Some((p, u));
                }
                self.chosen = chosen;
            }
        }
        self.seen = (self.seen + 1) % EPOCH;
        changed
    }

    /// The request's turn in the trial under way, if one is.
    fn trial_turn(&self) -> Option<usize> {
        let i = self.seen as usize;
        (i < 2 * TRIAL).then_some(i)
    }
}

fn median(mut v: [u32; TRIAL]) -> u32 {
    v.sort_unstable();
    v[TRIAL / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(c: &mut Chooser, packed_ns: u64, plain_ns: u64) {
        for _ in 0..EPOCH {
            let p = c.packed();
            let ns = if p { packed_ns } else { plain_ns };
            let _ = c.took(p, 1, Duration::from_nanos(ns));
        }
    }

    #[test]
    fn auto_packs_where_it_measures_faster_and_stops_where_it_does_not() {
        let mut c = Chooser::new(Compression::Auto);
        // Trials alternate, packed first.
        assert!(c.packed());
        let _ = c.took(true, 1, Duration::from_micros(10));
        assert!(!c.packed());
        // A slow link: packed runs take half the time.
        let mut c = Chooser::new(Compression::Auto);
        epoch(&mut c, 40_000, 80_000);
        assert!(c.chosen());
        // The link got fast: packing costs more than it saves.
        epoch(&mut c, 42_000, 40_000);
        assert!(!c.chosen());
        // Within the margin: not worth it.
        epoch(&mut c, 37_000, 40_000);
        assert!(!c.chosen());
        epoch(&mut c, 35_000, 40_000);
        assert!(c.chosen());
        let asked = (0..EPOCH).filter(|_| {
            let p = c.packed();
            let _ = c.took(p, 1, Duration::from_micros(if p { 35 } else { 40 }));
            p
        });
        // Half the trial, then (the choice standing) every request after it.
        assert_eq!(asked.count(), EPOCH as usize - TRIAL);
    }

    #[test]
    fn on_and_off_never_measure() {
        for (mode, packed) in [(Compression::On, true), (Compression::Off, false)] {
            let mut c = Chooser::new(mode);
            for _ in 0..3 * TRIAL {
                assert_eq!(c.packed(), packed);
                assert_eq!(c.took(packed, 4, Duration::from_secs(1)), None);
            }
            assert_eq!(c.chosen(), packed);
        }
    }
}
