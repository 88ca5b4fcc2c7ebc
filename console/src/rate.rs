//! Per-second rates from successive snapshots of a monotonic counter.
//!
//! A node's `/stats` carries totals since it started (faults taken, pages served); the console
//! turns them into rates by differencing snapshots. One poll interval (200 ms) is too short a
//! base for a steady figure, so the rate is taken over a sliding window of about a second.

use std::collections::VecDeque;
use std::time::Duration;

/// The rate of one counter over a sliding window of samples.
#[derive(Clone, Debug)]
pub struct Rate {
    window: Duration,
    samples: VecDeque<(Duration, u64)>,
}

impl Default for Rate {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl Rate {
    /// A rate averaged over about `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the counter's `value` at time `at`.
    ///
    /// A value lower than the previous one means the counter started over (the node
    /// restarted), and so does a time before the previous one: the history is dropped and the
    /// rate is unknown until the next sample. A second sample at the same time replaces the
    /// first.
    pub fn push(&mut self, at: Duration, value: u64) {
        if let Some(&(t, v)) = self.samples.back() {
            if value < v || at < t {
                self.samples.clear();
            } else if at == t {
                self.samples.pop_back();
            }
        }
        self.samples.push_back((at, value));
        // Keep as the base the newest sample that is at least a window old.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t, _)| at.saturating_sub(t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Counts per second over the window, or `None` before two samples.
    pub fn per_second(&self) -> Option<f64> {
        let (&(t0, v0), &(t1, v1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.checked_sub(t0)?.as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        Some(v1.saturating_sub(v0) as f64 / dt)
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        self.samples.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unknown_before_two_samples() {
        let mut r = Rate::default();
        assert_eq!(r.per_second(), None);
        r.push(ms(0), 10);
        assert_eq!(r.per_second(), None);
    }

    #[test]
    fn steady_counter_gives_its_slope() {
        let mut r = Rate::default();
        for i in 0..20 {
            // 50 counts every 200 ms: 250/s.
            r.push(ms(i * 200), i * 50);
        }
        assert_eq!(r.per_second(), Some(250.0));
    }

    #[test]
    fn window_forgets_old_samples() {
        let mut r = Rate::new(ms(1000));
        // Fast for 2 s, then stopped for 2 s: the rate over the last second is zero.
        for i in 0..=10 {
            r.push(ms(i * 200), i * 1000);
        }
        for i in 11..=20 {
            r.push(ms(i * 200), 10_000);
        }
        assert_eq!(r.per_second(), Some(0.0));
    }

    #[test]
    fn window_keeps_a_base_at_least_a_window_old() {
        let mut r = Rate::new(ms(1000));
        r.push(ms(0), 0);
        r.push(ms(1500), 300);
        r.push(ms(1700), 340);
        // The base stays at 0 ms: no sample between it and a window before the last.
        assert_eq!(r.per_second(), Some(200.0));
        r.push(ms(2500), 500);
        // Now 1500 ms is a window before 2500 ms: it becomes the base.
        assert_eq!(r.per_second(), Some(200.0));
        assert_eq!(r.samples.front(), Some(&(ms(1500), 300)));
    }

    #[test]
    fn counter_going_backwards_starts_over() {
        let mut r = Rate::default();
        r.push(ms(0), 1000);
        r.push(ms(200), 1200);
        assert_eq!(r.per_second(), Some(1000.0));
        r.push(ms(400), 5);
        assert_eq!(r.per_second(), None, "a restarted node has no rate yet");
        r.push(ms(600), 105);
        assert_eq!(r.per_second(), Some(500.0));
    }

    #[test]
    fn same_time_replaces_and_time_going_backwards_starts_over() {
        let mut r = Rate::default();
        r.push(ms(0), 0);
        r.push(ms(500), 10);
        r.push(ms(500), 20);
        assert_eq!(r.per_second(), Some(40.0));
        r.push(ms(100), 30);
        assert_eq!(r.per_second(), None);
        r.reset();
        assert_eq!(r.per_second(), None);
    }
}
