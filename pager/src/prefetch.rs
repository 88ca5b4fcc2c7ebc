//! Stream detection for prefetch: which pages a guest will touch next.
//!
//! Leap (ATC'20) prefetches along the *majority trend* of the recent fault deltas: a
//! window of the last few deltas, and a stride when more than half of them agree (the
//! Boyer-Moore majority vote), so one stray fault does not break a stream and random
//! access never forms one. [`StreamDetector`] does that per stream: up to [`STREAMS`]
//! trackers, each following the faults near its last one, so interleaved streams (two
//! vCPUs, or a copy from one region to another) are seen apart.
//!
//! A prefetched page never faults, so the detector learns that a window was used the way
//! Linux's readahead does (`PG_readahead`): each window leaves one page, its *trigger*,
//! unfetched; the guest's fault on it says the stream reached it, and is when the next
//! window is planned, while the guest still has the rest of the current one ahead of it.
//! A trigger reached doubles the stream's depth (up to [`MAX_DEPTH`]); a stream that
//! breaks halves it.
//!
//! The same faults say which prefetched pages were used: when the stream faults (on a
//! trigger, or, where a window came late, on a page the guest reached before it), the
//! guest has gone past every page of its stream since its fault before
//! ([`StreamDetector::take_passed`]). That is an inference, not an observation (this
//! kernel has no accessed bit a process can read for its own pages: no
//! `CONFIG_IDLE_PAGE_TRACKING`, and a used prefetched page never faults); it undercounts
//! the pages of a stream's last window, which no fault follows.
//!
//! This module plans; it fetches nothing. It is pure arithmetic on fixed arrays, so the
//! fault handler runs it on every fault without allocating.

/// Trackers, so at most this many interleaved streams are followed at once.
pub const STREAMS: usize = 8;
/// Fault deltas each tracker remembers.
pub const HISTORY: usize = 8;
/// A fault within this many pages of a tracker's last fault belongs to it.
pub const NEAR: u64 = 64;
/// Pages in a new stream's first window.
pub const MIN_DEPTH: u32 = 16;
/// Most pages in one window.
pub const MAX_DEPTH: u32 = 256;
/// A stream waiting for its trigger keeps its tracker against new ones for this many times
/// its window's pages in faults since its last.
pub const KEEP_WINDOWS: u64 = 4;

/// Pages to prefetch: `count` pages from `first` on, `stride` pages apart, leaving out
/// `trigger` (the page whose fault plans the next window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First page.
    pub first: u64,
    /// Pages between two of its pages (1: consecutive; negative: downwards).
    pub stride: i64,
    /// Pages in it, the trigger included.
    pub count: u32,
    /// The page left out.
    pub trigger: u64,
}

/// Pages a stream went past: `count` pages from `first` on, `stride` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First page.
    pub first: u64,
    /// Pages between two of its pages.
    pub stride: i64,
    /// Pages in it.
    pub count: u64,
}

impl Span {
    /// Its pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(move |i| self.first.wrapping_add_signed(i as i64 * self.stride))
    }
}

impl Window {
    /// Its pages, the trigger left out.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..i64::from(self.count))
            .map(move |i| self.first.wrapping_add_signed(i * self.stride))
            .filter(move |&p| p != self.trigger)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Tracker {
    live: bool,
    last: u64,
    deltas: [i64; HISTORY],
    len: usize,
    at: usize,
    /// The first page of the last window planned.
    first: Option<u64>,
    /// The page after the last window planned, in the stream's direction.
    next: Option<u64>,
    trigger: Option<u64>,
    /// The first page of the stream not yet known to be passed.
    unpassed: Option<u64>,
    depth: u32,
    /// For replacing the least recently used tracker.
    used: u64,
}

impl Tracker {
    /// The finer stride that `page`'s fault shows, if it fell inside the last window
    /// planned with stride `s` but between its pages.
    fn denser(&self, page: u64, s: i64) -> Option<i64> {
        let (first, next) = (self.first?, self.next?);
        let inside = if s > 0 {
            first < page && page < next
        } else {
            next < page && page < first
        };
        let off = page.abs_diff(first);
        let step = s.unsigned_abs();
        (inside && step > 1 && off % step != 0).then(|| gcd(off, step) as i64 * s.signum())
    }

    fn push(&mut self, delta: i64) {
        self.deltas[self.at] = delta;
        self.at = (self.at + 1) % HISTORY;
        self.len = (self.len + 1).min(HISTORY);
    }

    /// The majority delta of the history, if more than half of it agrees (and at least
    /// two deltas do).
    fn trend(&self) -> Option<i64> {
        let h = &self.deltas[..self.len];
        let (mut candidate, mut votes) = (0i64, 0usize);
        for &d in h {
            if votes == 0 {
                candidate = d;
                votes = 1;
            } else if d == candidate {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        let agree = h.iter().filter(|&&d| d == candidate).count();
        (candidate != 0 && agree >= 2 && agree * 2 > h.len()).then_some(candidate)
    }
}

/// Follows the faults of one VM of `pages` pages and plans prefetch windows.
#[derive(Debug)]
pub struct StreamDetector {
    pages: u64,
    trackers: [Tracker; STREAMS],
    clock: u64,
    passed: Option<Span>,
}

impl StreamDetector {
    /// A detector for a VM of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            trackers: [Tracker::default(); STREAMS],
            clock: 0,
            passed: None,
        }
    }

    /// Takes the fault on `page` into account; returns the window to prefetch now, if
    /// any. A window never reaches outside the VM.
    pub fn observe(&mut self, page: u64) -> Option<Window> {
        if page >= self.pages {
            return None;
        }
        self.clock += 1;
        let i = self.tracker_of(page);
        let t = &mut self.trackers[i];
        t.used = self.clock;
        if !t.live {
            *t = Tracker {
                live: true,
                last: page,
                depth: t.depth.clamp(MIN_DEPTH, MAX_DEPTH),
                used: self.clock,
                ..Tracker::default()
            };
            return None;
        }
        let mut delta = page.wrapping_sub(t.last) as i64;
        t.last = page;
        if delta == 0 {
            return None;
        }
        let had = t.trend();
        if let Some(s) = had
            && let Some(g) = t.denser(page, s)
        {
            // A fault between the pages of the last window: the guest touches more pages
            // than the stride says (a stride-2 trend formed while every other page was
            // still on its way would otherwise hold for good, prefetching half the
            // stream). Follow the finer stride from here.
            t.deltas = [g; HISTORY];
            t.len = HISTORY;
            t.next = None;
            t.trigger = None;
            t.unpassed = None;
        }
        let had = t.trend();
        let reached_trigger = t.trigger == Some(page);
        if let Some(s) = had
            && (reached_trigger || t.next == Some(page))
        {
            // Where the stream was predicted to fault next (the pages in between were
            // prefetched): one more step of its trend.
            delta = s;
        }
        t.push(delta);
        let Some(stride) = t.trend() else {
            if had.is_some() {
                // The stream broke: stop at once, and start the next one smaller.
                t.depth = (t.depth / 2).max(MIN_DEPTH);
                t.next = None;
                t.trigger = None;
                t.unpassed = None;
            }
            return None;
        };
        if reached_trigger {
            t.depth = (t.depth * 2).min(MAX_DEPTH);
        }
        if delta == stride
            && let Some(from) = t.unpassed
            && (if stride > 0 {
                page >= from
            } else {
                page <= from
            })
        {
            // The stream faulted where it was predicted to, so the guest went past its
            // pages before: at a trigger, and as much where a window came late and the
            // guest faulted on a page of it (or on the page after it) before it arrived.
            // A stray fault off the trend says nothing.
            let count = page.abs_diff(from) / stride.unsigned_abs();
            if count > 0 {
                self.passed = Some(Span {
                    first: from,
                    stride,
                    count,
                });
            }
            t.unpassed = Some(page.wrapping_add_signed(stride));
        }
        // Plan when the stream starts, and then at each trigger.
        if t.next.is_some() && !reached_trigger && t.next != Some(page) {
            return None;
        }
        let from = match t.next {
            Some(n) if reached_trigger => n,
            _ => page.wrapping_add_signed(stride),
        };
        let window = clamp(from, stride, t.depth, self.pages)?;
        t.first = Some(window.first);
        if t.unpassed.is_none() {
            t.unpassed = Some(window.first);
        }
        let half = i64::from(window.count / 2);
        let trigger = window.first.wrapping_add_signed(half * stride);
        t.trigger = Some(trigger);
        t.next = Some(
            window
                .first
                .wrapping_add_signed(i64::from(window.count) * stride),
        );
        Some(Window { trigger, ..window })
    }

    /// The pages the last [`StreamDetector::observe`] found passed (the stream reached a
    /// trigger: the guest went past them), once.
    pub fn take_passed(&mut self) -> Option<Span> {
        self.passed.take()
    }

    /// The tracker `page` belongs to: the live one whose last fault is nearest (within
    /// [`NEAR`] pages, or on its planned window), else a new one in place of the least
    /// recently used that is not a stream waiting for its trigger. A stream is kept that
    /// way for [`KEEP_WINDOWS`] windows' worth of faults after its last, so that random
    /// faults between its triggers (demand faults of another part of the guest) do not
    /// push it out and start it again from a small window.
    fn tracker_of(&mut self, page: u64) -> usize {
        let mut best: Option<(usize, u64)> = None;
        for (i, t) in self.trackers.iter().enumerate() {
            if !t.live {
                continue;
            }
            let on_window = t.trigger == Some(page) || t.next == Some(page);
            let d = if on_window { 0 } else { page.abs_diff(t.last) };
            if d <= NEAR && best.is_none_or(|(_, b)| d < b) {
                best = Some((i, d));
            }
        }
        if let Some((i, _)) = best {
            return i;
        }
        let clock = self.clock;
        let kept = |t: &Tracker| {
            t.trigger.is_some() && clock - t.used <= u64::from(t.depth) * KEEP_WINDOWS
        };
        let (i, _) = self
            .trackers
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| (t.live, kept(t), t.used))
            .expect("STREAMS > 0");
        // A new stream in this tracker.
        self.trackers[i].live = false;
        i
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `depth` pages from `from` on, `stride` apart, cut at the VM's ends; `None` when not one
/// page is inside.
fn clamp(from: u64, stride: i64, depth: u32, pages: u64) -> Option<Window> {
    if from >= pages {
        return None;
    }
    let step = stride.unsigned_abs();
    let room = if stride > 0 {
        (pages - 1 - from) / step + 1
    } else {
        from / step + 1
    };
    let count = u32::try_from(room.min(u64::from(depth))).unwrap_or(depth);
    Some(Window {
        first: from,
        stride,
        count,
        trigger: from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the faults a guest scanning `order` makes when every planned page but the
    /// triggers is prefetched; returns (faults taken, pages prefetched).
    fn scan(pages: u64, order: &[u64]) -> (u64, u64) {
        let mut d = StreamDetector::new(pages);
        let mut present = vec![false; pages as usize];
        let (mut faults, mut prefetched) = (0, 0);
        for &p in order {
            if present[p as usize] {
                continue;
            }
            faults += 1;
            present[p as usize] = true;
            if let Some(w) = d.observe(p) {
                for q in w.pages() {
                    assert!(q < pages, "window {w:?} leaves the VM");
                    if !present[q as usize] {
                        present[q as usize] = true;
                        prefetched += 1;
                    }
                }
            }
        }
        (faults, prefetched)
    }

    #[test]
    fn a_sequential_scan_faults_about_once_per_window() {
        let order: Vec<u64> = (0..16_384).collect();
        let (faults, prefetched) = scan(16_384, &order);
        assert_eq!(faults + prefetched, 16_384);
        assert!(faults < 16_384 / 50, "{faults} faults");
    }

    #[test]
    fn a_stride_of_four_is_followed() {
        let pages = 16_384u64;
        let order: Vec<u64> = (0..4).flat_map(|r| (r..pages).step_by(4)).collect();
        let (faults, _) = scan(pages, &order);
        assert!(faults < pages / 50, "{faults} faults");
    }

    #[test]
    fn a_downward_scan_is_followed_and_stays_inside() {
        let order: Vec<u64> = (0..4_096).rev().collect();
        let (faults, _) = scan(4_096, &order);
        assert!(faults < 4_096 / 20, "{faults} faults");
    }

    #[test]
    fn random_access_plans_almost_nothing() {
        let pages = 16_384u64;
        // A fixed permutation (multiplicative hashing by an odd constant).
        let order: Vec<u64> = (0..pages).map(|i| (i * 40_503 + 7) % pages).collect();
        let (_, prefetched) = scan(pages, &order);
        assert!(prefetched < pages / 100, "{prefetched} pages prefetched");
    }

    #[test]
    fn two_interleaved_streams_are_both_followed() {
        let pages = 32_768u64;
        let order: Vec<u64> = (0..16_384).flat_map(|i| [i, 16_384 + i]).collect();
        let (faults, _) = scan(pages, &order);
        assert!(faults < pages / 40, "{faults} faults");
    }

    #[test]
    fn a_stream_among_random_faults_keeps_its_tracker_and_grows() {
        // The `mixed` workload: a sequential half interleaved one for one with random
        // faults over the other half.
        let pages = 32_768u64;
        let half = pages / 2;
        let order: Vec<u64> = (0..half)
            .flat_map(|i| [i, half + (i * 40_503 + 7) % half])
            .collect();
        let mut d = StreamDetector::new(pages);
        let (mut windows, mut passed, mut deepest) = (0, 0, 0);
        let mut present = vec![false; pages as usize];
        for &p in &order {
            if std::mem::replace(&mut present[p as usize], true) {
                continue;
            }
            if let Some(w) = d.observe(p) {
                windows += 1;
                deepest = deepest.max(w.count);
                for q in w.pages() {
                    present[q as usize] = true;
                }
            }
            passed += d.take_passed().map_or(0, |s| s.count);
        }
        assert_eq!(deepest, MAX_DEPTH, "the stream's windows grew");
        assert!(windows < 200, "{windows} windows");
        assert!(
            passed > half * 9 / 10,
            "{passed} of {half} pages seen passed"
        );
    }

    #[test]
    fn windows_are_cut_at_the_end_of_the_vm() {
        let mut d = StreamDetector::new(100);
        let mut last = None;
        for p in 90..100 {
            if let Some(w) = d.observe(p) {
                assert!(w.pages().all(|q| q < 100), "{w:?}");
                last = Some(w);
            }
        }
        assert!(last.is_some(), "a stream at the end was not seen");
        assert_eq!(d.observe(100), None);
    }

    #[test]
    fn the_pages_a_stream_passed_are_each_reported_once() {
        // `lag`: faults a window waits before it arrives (a busy prefetch thread); the
        // guest faults on its pages meanwhile, and those are demand faults, not used
        // prefetches.
        for (stride, lag) in [(1i64, 0), (4, 0), (-1, 0), (1, 2), (1, 5), (4, 3), (-1, 3)] {
            let pages = 8_192u64;
            let order: Vec<u64> = if stride > 0 {
                (0..pages).step_by(stride as usize).collect()
            } else {
                (0..pages).rev().collect()
            };
            let mut d = StreamDetector::new(pages);
            let mut present = vec![false; pages as usize];
            let mut prefetched = vec![false; pages as usize];
            let mut passed = vec![false; pages as usize];
            let mut late: std::collections::VecDeque<(usize, Window)> = Default::default();
            for (i, &p) in order.iter().enumerate() {
                while let Some(&(at, w)) = late.front()
                    && at + lag <= i
                {
                    late.pop_front();
                    for q in w.pages() {
                        if !std::mem::replace(&mut present[q as usize], true) {
                            prefetched[q as usize] = true;
                        }
                    }
                }
                if std::mem::replace(&mut present[p as usize], true) {
                    // Prefetched: no fault (a trigger is never planned, so it faults).
                    continue;
                }
                if let Some(w) = d.observe(p) {
                    late.push_back((i, w));
                }
                if let Some(span) = d.take_passed() {
                    for q in span.pages() {
                        assert!(
                            !passed[q as usize],
                            "page {q} passed twice (stride {stride}, lag {lag})"
                        );
                        passed[q as usize] = true;
                    }
                }
            }
            let used = (0..pages as usize)
                .filter(|&q| prefetched[q] && passed[q])
                .count();
            let wrong = (0..pages as usize)
                .filter(|&q| passed[q] && !order.contains(&(q as u64)))
                .count();
            let issued = prefetched.iter().filter(|&&x| x).count();
            assert_eq!(
                wrong, 0,
                "stride {stride}, lag {lag}: passed pages the guest never touched"
            );
            assert!(
                issued * 2 > order.len(),
                "stride {stride}, lag {lag}: {issued} pages prefetched"
            );
            assert!(
                used * 100 >= issued * 95,
                "stride {stride}, lag {lag}: {used} of {issued} seen used"
            );
        }
    }

    #[test]
    fn faults_between_a_windows_pages_refine_its_stride() {
        // A sequential guest whose every other page was still on its way when it touched
        // it: the faults the detector saw were two apart.
        let mut d = StreamDetector::new(1 << 20);
        let mut w = None;
        for p in (0..10).step_by(2) {
            w = d.observe(p).or(w);
        }
        let w = w.expect("a stride-2 stream");
        assert_eq!(w.stride, 2);
        // The guest faults on the pages in between: the stream is sequential.
        let between = w.first + 1;
        let refined = d.observe(between).expect("a window at the finer stride");
        assert_eq!((refined.stride, refined.first), (1, between + 1));
    }

    #[test]
    fn a_broken_stream_stops_at_once() {
        let mut d = StreamDetector::new(1 << 20);
        for p in 0..4 {
            d.observe(p);
        }
        // Faults near the stream, but with no common delta.
        for p in [40, 9, 61, 17, 50] {
            assert_eq!(d.observe(p), None, "planned after a fault on {p}");
        }
    }
}
