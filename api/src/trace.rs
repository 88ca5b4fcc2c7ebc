//! The access sequences of the built-in guest's skewed workloads (`zipf:S`, `hotset:H:P`).
//!
//! Deterministic: the same parameters give the same sequence on every run and in every
//! program, so the compute node (which hands it to the guest) and `cargo xtask bench` (which
//! replays it through exact LRU, FIFO and MIN) see the very same accesses. The generator is
//! SplitMix64, written here rather than taken from `rand` because the sequence is part of the
//! benchmark's definition: a dependency's update must not change it.
//!
//! Hot pages are scattered over the range (rank `r` is page `(r * A) mod pages` for a
//! multiplier `A` coprime with `pages`), as they are in real memory, not packed at its start.

/// The seed of every trace: the workloads are fixed sequences, not random per run.
pub const TRACE_SEED: u64 = 0x7061_6765_6d65_7368;

/// SplitMix64: a 64-bit state, one multiply-xorshift output per step.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A multiplier coprime with `n` near `n` times the golden ratio's fraction, scattering ranks.
fn scatter_multiplier(n: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut a = ((n as f64 * 0.618_033_988_75) as u64).max(1);
    while gcd(a, n) != 1 {
        a += 1;
    }
    a
}

/// The page of rank `rank` (0 = hottest) of `pages`.
fn scattered(rank: u64, a: u64, pages: u64) -> u32 {
    ((u128::from(rank) * u128::from(a)) % u128::from(pages)) as u32
}

/// `accesses` page indices below `pages`, Zipf-distributed with exponent `s` over a
/// scattered ranking of the pages: rank `r` (from 1) is drawn with probability proportional
/// to `1 / r^s`.
pub fn zipf(s: f64, pages: u64, accesses: u64) -> Vec<u32> {
    assert!(pages > 0 && pages <= u64::from(u32::MAX));
    // The CDF over ranks, then one binary search per access.
    let mut cdf = Vec::with_capacity(pages as usize);
    let mut sum = 0.0f64;
    for r in 1..=pages {
        sum += (r as f64).powf(-s);
        cdf.push(sum);
    }
    let a = scatter_multiplier(pages);
    let mut rng = SplitMix(TRACE_SEED);
    (0..accesses)
        .map(|_| {
            let u = rng.unit() * sum;
            let rank = cdf.partition_point(|&c| c <= u).min(pages as usize - 1);
            scattered(rank as u64, a, pages)
        })
        .collect()
}

/// `accesses` page indices below `pages`: `access_pct` percent of them uniform over a hot set
/// of `hot_pct` percent of the pages (at least one), the rest uniform over the other pages.
pub fn hotset(hot_pct: u8, access_pct: u8, pages: u64, accesses: u64) -> Vec<u32> {
    assert!(pages > 0 && pages <= u64::from(u32::MAX));
    let hot = (pages * u64::from(hot_pct) / 100).clamp(1, pages);
    let cold = pages - hot;
    let a = scatter_multiplier(pages);
    let mut rng = SplitMix(TRACE_SEED);
    (0..accesses)
        .map(|_| {
            let rank = if cold == 0 || rng.below(100) < u64::from(access_pct) {
                rng.below(hot)
            } else {
                hot + rng.below(cold)
            };
            scattered(rank, a, pages)
        })
        .collect()
}

/// Every page below `pages` once: the first half in order, interleaved one for one with
/// the second half in a pseudo-random order (a sequential stream beside random accesses, for
/// measuring demand faults while prefetch streams run).
pub fn mixed(pages: u64) -> Vec<u32> {
    assert!(pages > 0 && pages <= u64::from(u32::MAX));
    let half = pages / 2;
    let mut random: Vec<u32> = (half as u32..pages as u32).collect();
    // Fisher-Yates with the traces' fixed seed: the same order on every run.
    let mut rng = SplitMix(TRACE_SEED);
    for i in (1..random.len()).rev() {
        random.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut out = Vec::with_capacity(pages as usize);
    for (i, r) in random.into_iter().enumerate() {
        if (i as u64) < half {
            out.push(i as u32);
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_visits_every_page_once_half_in_order() {
        for pages in [1, 2, 7, 1000] {
            let t = mixed(pages);
            let mut sorted = t.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..pages as u32).collect::<Vec<_>>(), "{pages}");
            let seq: Vec<u32> = t
                .iter()
                .copied()
                .filter(|&p| u64::from(p) < pages / 2)
                .collect();
            assert_eq!(seq, (0..(pages / 2) as u32).collect::<Vec<_>>());
        }
        assert_eq!(mixed(1000), mixed(1000));
    }

    #[test]
    fn traces_are_deterministic_and_in_range() {
        assert_eq!(zipf(0.99, 1000, 500), zipf(0.99, 1000, 500));
        assert_eq!(hotset(10, 90, 1000, 500), hotset(10, 90, 1000, 500));
        assert!(zipf(0.99, 1000, 5000).iter().all(|&p| p < 1000));
        assert!(hotset(10, 90, 1000, 5000).iter().all(|&p| p < 1000));
        // Every rank maps to its own page.
        let a = scatter_multiplier(1000);
        let mut seen: Vec<u32> = (0..1000).map(|r| scattered(r, a, 1000)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn zipf_is_skewed_and_hotset_keeps_its_share() {
        let t = zipf(0.99, 10_000, 100_000);
        let mut counts = std::collections::HashMap::new();
        for &p in &t {
            *counts.entry(p).or_insert(0u64) += 1;
        }
        let mut c: Vec<u64> = counts.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        // With s = 0.99 over 10,000 pages the hottest page takes about 10%, the top 1% of
        // pages about half.
        let top: u64 = c.iter().take(100).sum();
        assert!((0.07..0.13).contains(&(c[0] as f64 / 1e5)), "{}", c[0]);
        assert!((0.4..0.6).contains(&(top as f64 / 1e5)), "{top}");

        let h = hotset(10, 90, 10_000, 100_000);
        let a = scatter_multiplier(10_000);
        let hot: std::collections::HashSet<u32> =
            (0..1000).map(|r| scattered(r, a, 10_000)).collect();
        let share = h.iter().filter(|p| hot.contains(p)).count() as f64 / 1e5;
        assert!((0.89..0.91).contains(&share), "{share}");
    }
}
