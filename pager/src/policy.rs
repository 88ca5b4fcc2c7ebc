//! Which pages leave guest memory, and in what order; and the reference policies the bench
//! measures them against.
//!
//! The host cannot see a resident page's reads: this kernel has no idle page tracking and no
//! MGLRU, and `PAGEMAP_SCAN` has no accessed flag. What the pager does see is every fault.
//! So the cache makes the accesses it needs to see fault: the budget is split between pages
//! mapped in guest memory and a **staging area** of slots outside it. The reclaimer takes the
//! mapped page installed longest ago out of guest memory into a staging slot (write-protected
//! first if it is dirty, so no write is lost); a guest access to it faults, and the handler
//! puts it back from the slot, a local fault with no network (a "staging hit"). A page left
//! alone until it is the oldest in staging is dropped: for nothing if it is clean, after a
//! write-back if it is dirty. This is CLOCK with the time a page spends in staging as its
//! reference window, the scheme of the kernel's own inactive list, and it is
//! [`Policy::Clock`]. [`Policy::Fifo`], the baseline, stages only the pages on their way out
//! (one batch), so pages leave in the order they came.
//!
//! [`simulate`], [`lru_misses`], [`fifo_misses`] and [`min_misses`] replay an access sequence
//! (the bench's deterministic workloads) through these policies and through exact LRU, FIFO
//! and Belady's MIN, for the bench to print beside the measured misses.

use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use crate::directory::{PageDirectory, PageState};

/// A replacement policy (`--eviction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Drop pages in the order they were installed.
    Fifo,
    /// CLOCK through the staging area (see the module docs).
    #[default]
    Clock,
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fifo" => Ok(Policy::Fifo),
            "clock" => Ok(Policy::Clock),
            _ => Err(format!(
                "unknown eviction policy '{s}'; expected clock or fifo"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Fifo => "fifo",
            Policy::Clock => "clock",
        })
    }
}

/// Staging slots of a cache of `budget` pages under `policy`: a quarter of the budget for
/// [`Policy::Clock`], one write-back batch for [`Policy::Fifo`].
pub fn staging_slots(policy: Policy, budget: u64) -> u64 {
    match policy {
        Policy::Clock => budget / 4,
        Policy::Fifo => crate::cache::BATCH_PAGES as u64,
    }
}

/// The reclaimer's two queues: mapped pages in the order they were installed, staged pages
/// in the order they were staged.
#[derive(Debug)]
pub struct Queues {
    mapped: VecDeque<u32>,
    staged: VecDeque<u32>,
}

impl Queues {
    /// Empty queues with room for `mapped` and `staged` pages.
    pub fn new(mapped: usize, staged: usize) -> Self {
        Queues {
            mapped: VecDeque::with_capacity(mapped),
            staged: VecDeque::with_capacity(staged),
        }
    }

    /// A page the handler installed in guest memory.
    pub fn installed(&mut self, page: u32) {
        self.mapped.push_back(page);
    }

    /// A page the reclaimer staged.
    pub fn staged(&mut self, page: u32) {
        self.staged.push_back(page);
    }

    /// The mapped page installed longest ago, taken out of the queue, with its state
    /// (`Clean`, `ZeroClean` or `Dirty`). Entries of pages that left guest memory since they
    /// were queued are dropped on the way.
    pub fn oldest_mapped(&mut self, dir: &PageDirectory) -> Option<(u32, PageState)> {
        while let Some(page) = self.mapped.pop_front() {
            match dir.entry(u64::from(page)).map(|e| e.state) {
                Ok(s @ (PageState::Clean | PageState::ZeroClean | PageState::Dirty)) => {
                    return Some((page, s));
                }
                _ => continue,
            }
        }
        None
    }

    /// The page staged longest ago and still staged, taken out of the queue, with its state
    /// (`StagedClean` or `StagedDirty`).
    pub fn oldest_staged(&mut self, dir: &PageDirectory) -> Option<(u32, PageState)> {
        while let Some(page) = self.staged.pop_front() {
            match dir.entry(u64::from(page)).map(|e| e.state) {
                Ok(s @ (PageState::StagedClean | PageState::StagedDirty)) => {
                    return Some((page, s));
                }
                _ => continue,
            }
        }
        None
    }

    /// Entries queued (some may be stale).
    pub fn len(&self) -> (usize, usize) {
        (self.mapped.len(), self.staged.len())
    }
}

/// What [`simulate`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Simulated {
    /// Accesses to pages in neither guest memory nor staging (a fetch from the home).
    pub misses: u64,
    /// Accesses to staged pages (put back from staging, no network).
    pub staging_hits: u64,
}

/// Replays `trace` (page indices) through the cache: `budget` pages of which `staging` are
/// staging slots; one page staged or dropped per page installed. The reclaimer's order
/// without its watermarks and batches.
pub fn simulate(budget: u64, staging: u64, trace: &[u32]) -> Simulated {
    let mapped_cap = budget.saturating_sub(staging).max(1) as usize;
    let staging = staging as usize;
    // Per page: 0 absent, 1 mapped, 2 staged; queues hold (page, generation) so that a page
    // that left and came back is not taken for its old entry.
    let mut state: HashMap<u32, (u8, u64)> = HashMap::new();
    let mut mapped: VecDeque<(u32, u64)> = VecDeque::new();
    let mut staged: VecDeque<(u32, u64)> = VecDeque::new();
    let (mut n_mapped, mut n_staged) = (0usize, 0usize);
    let mut generation = 0u64;
    let mut out = Simulated::default();
    for &p in trace {
        let (where_, _) = state.get(&p).copied().unwrap_or((0, 0));
        match where_ {
            1 => continue,
            2 => {
                out.staging_hits += 1;
                n_staged -= 1;
            }
            _ => out.misses += 1,
        }
        generation += 1;
        state.insert(p, (1, generation));
        mapped.push_back((p, generation));
        n_mapped += 1;
        while n_mapped > mapped_cap {
            let Some((q, g)) = mapped.pop_front() else {
                break;
            };
            if state.get(&q) != Some(&(1, g)) {
                continue;
            }
            n_mapped -= 1;
            if staging == 0 {
                state.remove(&q);
                continue;
            }
            state.insert(q, (2, g));
            staged.push_back((q, g));
            n_staged += 1;
            while n_staged > staging {
                let Some((r, h)) = staged.pop_front() else {
                    break;
                };
                if state.get(&r) == Some(&(2, h)) {
                    state.remove(&r);
                    n_staged -= 1;
                }
            }
        }
    }
    out
}

/// Misses of exact LRU with room for `budget` pages on `trace`.
pub fn lru_misses(budget: u64, trace: &[u32]) -> u64 {
    let budget = budget.max(1) as usize;
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut by_age: BTreeMap<u64, u32> = BTreeMap::new();
    let mut misses = 0;
    for (t, &p) in trace.iter().enumerate() {
        let t = t as u64;
        if let Some(old) = last.insert(p, t) {
            by_age.remove(&old);
        } else {
            misses += 1;
            if by_age.len() == budget
                && let Some((_, victim)) = by_age.pop_first()
            {
                last.remove(&victim);
            }
        }
        by_age.insert(t, p);
    }
    misses
}

/// Misses of exact FIFO with room for `budget` pages on `trace`.
pub fn fifo_misses(budget: u64, trace: &[u32]) -> u64 {
    let budget = budget.max(1) as usize;
    let mut resident: HashMap<u32, ()> = HashMap::new();
    let mut order = VecDeque::new();
    let mut misses = 0;
    for &p in trace {
        if resident.contains_key(&p) {
            continue;
        }
        misses += 1;
        if order.len() == budget
            && let Some(victim) = order.pop_front()
        {
            resident.remove(&victim);
        }
        resident.insert(p, ());
        order.push_back(p);
    }
    misses
}

/// Misses of Belady's MIN (drop the page used again furthest ahead) with room for `budget`
/// pages on `trace`: the fewest any policy can have.
pub fn min_misses(budget: u64, trace: &[u32]) -> u64 {
    let budget = budget.max(1) as usize;
    // next[i]: the next index at which trace[i]'s page is used again (u64::MAX: never).
    let mut next = vec![u64::MAX; trace.len()];
    let mut seen: HashMap<u32, u64> = HashMap::new();
    for (i, &p) in trace.iter().enumerate().rev() {
        if let Some(&j) = seen.get(&p) {
            next[i] = j;
        }
        seen.insert(p, i as u64);
    }
    // Resident pages with their next use; the heap holds (next use, page), stale entries
    // skipped when popped.
    let mut resident: HashMap<u32, u64> = HashMap::new();
    let mut heap: BinaryHeap<(u64, u32)> = BinaryHeap::new();
    let mut misses = 0;
    for (i, &p) in trace.iter().enumerate() {
        if !resident.contains_key(&p) {
            misses += 1;
            if resident.len() == budget {
                while let Some((n, q)) = heap.pop() {
                    if resident.get(&q) == Some(&n) {
                        resident.remove(&q);
                        break;
                    }
                }
            }
        }
        resident.insert(p, next[i]);
        heap.push((next[i], p));
    }
    misses
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page 0 is touched every other access; 1.. once each.
    fn one_hot_page() -> Vec<u32> {
        let mut trace = Vec::new();
        for i in 1..200u32 {
            trace.push(0);
            trace.push(i);
        }
        trace
    }

    #[test]
    fn the_reference_policies_agree_with_their_definitions() {
        // Worked by hand for 3 pages.
        let trace = [1, 2, 3, 1, 4, 1, 2, 5, 1, 2, 3, 4, 5];
        assert_eq!(lru_misses(3, &trace), 9);
        assert_eq!(fifo_misses(3, &trace), 9);
        assert_eq!(min_misses(3, &trace), 7);
        let recency = [1, 2, 3, 1, 4, 1, 5, 1, 6];
        assert_eq!(lru_misses(3, &recency), 6);
        assert_eq!(fifo_misses(3, &recency), 7);
        assert_eq!(min_misses(3, &recency), 6);
        // Everything fits: only first touches miss.
        assert_eq!(lru_misses(10, &trace), 5);
        assert_eq!(min_misses(10, &trace), 5);
        assert_eq!(simulate(10, 2, &trace).misses, 5);
    }

    #[test]
    fn staging_keeps_what_comes_back_and_fifo_does_not() {
        let trace = one_hot_page();
        let clock = simulate(8, 2, &trace);
        let fifo = simulate(8, 0, &trace);
        assert_eq!(fifo.misses, fifo_misses(8, &trace));
        assert_eq!(
            clock.misses, 200,
            "page 0 misses once, every other page once"
        );
        assert!(fifo.misses > clock.misses, "{fifo:?} {clock:?}");
        assert!(clock.staging_hits > 0);
    }

    #[test]
    fn queues_skip_pages_that_moved() {
        let dir = PageDirectory::new(3);
        let mut q = Queues::new(3, 3);
        for p in 0..3 {
            dir.installed(p, PageState::Zero, PageState::Clean).unwrap();
            q.installed(p as u32);
        }
        dir.transition(0, PageState::Clean, PageState::Evicting)
            .unwrap();
        assert_eq!(q.oldest_mapped(&dir), Some((1, PageState::Clean)));
        dir.transition(1, PageState::Clean, PageState::Evicting)
            .unwrap();
        dir.stage(1, 0, PageState::StagedClean).unwrap();
        q.staged(1);
        q.staged(0);
        assert_eq!(q.oldest_staged(&dir), Some((1, PageState::StagedClean)));
        assert_eq!(q.oldest_staged(&dir), None, "page 0 is not staged");
        assert_eq!(q.oldest_mapped(&dir), Some((2, PageState::Clean)));
        assert_eq!(q.oldest_mapped(&dir), None);
    }
}
