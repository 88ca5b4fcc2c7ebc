//! The prefetch thread: brings in the windows the fault handler's [`StreamDetector`]
//! plans, ahead of the guest, on connections of its own, so a demand fetch never queues
//! behind a prefetch.
//!
//! The handler runs the detector itself (a few dozen integer operations per fault, no
//! allocation) and sends this thread only what needs doing: a window to fetch, the pages a
//! stream went past, a touch of a page in flight. Random access plans nothing, so it sends
//! nothing: no wake-up of this thread per fault.
//!
//! Per window: every page of it still [`PageState::Remote`] is moved to
//! [`PageState::Fetching`] (a page the handler is fetching is skipped: whoever moves it
//! first fetches it), the pages are sorted into runs of consecutive pages with the same
//! home, each home gets one batch, and each run that arrived is installed with one
//! `UFFDIO_COPY`, which also wakes a vCPU that touched one of its pages meanwhile. A run
//! that did not arrive goes back to `Remote` and is woken, so a vCPU waiting on it faults
//! again and the handler fetches it on demand.
//!
//! Without a budget the pages are claimed (they move here for good, as a demand fetch's
//! do). Under a budget they are read (their home keeps them) and installed clean
//! (write-protected); the prefetcher only takes frames above the reclaimer's low
//! watermark, so it never makes a demand fault wait for a frame, and hands the pages to
//! the reclaimer like the handler's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};
use pagemesh_transport::{Run, TransportManager};

use crate::cache::Shared;
use crate::directory::{PageDirectory, PageState};
use crate::handler::{PageBuf, bytes_mut};
use crate::prefetch::{MAX_DEPTH, Span, Window};
use crate::stats::PagerStats;
use crate::uffd::{Installed, Uffd};

/// Hints the handler may have outstanding before it drops some.
pub(crate) const HINTS: usize = 1024;

/// What the handler tells the prefetch thread.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hint {
    /// Fetch these pages.
    Window(Window),
    /// The guest went past these pages: the prefetched ones among them were used.
    Passed(Span),
    /// The guest touched this page while prefetch was bringing it: used.
    Touched(u64),
}

/// Everything the prefetch thread owns.
pub(crate) struct Prefetcher {
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) base: u64,
    pub(crate) vm: VmId,
    pub(crate) directory: Arc<PageDirectory>,
    pub(crate) stats: Arc<PagerStats>,
    pub(crate) transport: TransportManager,
    pub(crate) hints: Receiver<Hint>,
    /// The page cache's frames and the reclaimer's ear, under a budget.
    pub(crate) cache: Option<(Arc<Shared>, SyncSender<u32>)>,
    /// A working set to bring in first, in order.
    pub(crate) replay: Vec<u64>,
}

/// One window's pages, sorted, each with its home.
struct Claimed {
    pages: [(u64, NodeId); MAX_DEPTH as usize],
    len: usize,
}

impl Prefetcher {
    /// Runs until the handler hangs up (it has stopped), then delivers its last
    /// acknowledgements.
    pub(crate) fn run(mut self) {
        self.stats.prefetch.enable();
        // One window's pages: made once, reused for every batch.
        let mut buf: Box<[PageBuf]> = (0..MAX_DEPTH).map(|_| PageBuf([0; PAGE_SIZE])).collect();
        let mut claimed = Box::new(Claimed {
            pages: [(0, 0); MAX_DEPTH as usize],
            len: 0,
        });
        let replay = std::mem::take(&mut self.replay);
        let mut open = self.replay(&replay, &mut claimed, &mut buf);
        while open {
            let Ok(hint) = self.hints.recv() else { break };
            open = self.heard(hint, &mut claimed, &mut buf);
        }
        if let Err(e) = self.transport.acknowledge_all() {
            tracing::warn!(
                "cannot acknowledge the last prefetches: {}",
                pagemesh_api::error_chain(&e)
            );
        }
    }

    /// Brings in `pages` in order, a window's worth at a time, taking the handler's hints
    /// first between two (its windows follow the guest's faults of now); whether to go on.
    fn replay(&mut self, pages: &[u64], claimed: &mut Claimed, buf: &mut [PageBuf]) -> bool {
        if pages.is_empty() {
            return true;
        }
        let began = Instant::now();
        let inside = self.directory.len();
        let mut done = 0;
        for chunk in pages.chunks(MAX_DEPTH as usize) {
            loop {
                match self.hints.try_recv() {
                    Ok(hint) => {
                        if !self.heard(hint, claimed, buf) {
                            return false;
                        }
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    // The handler stopped: the guest is gone.
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
                }
            }
            let pages = chunk.iter().copied().filter(|&p| p < inside);
            if let Err(e) = self.fetch_pages(pages, chunk.len() as u64, true, claimed, buf) {
                tracing::warn!("replay stopped: {e}");
                return false;
            }
            done += chunk.len();
        }
        tracing::info!(
            "replayed a working set of {done} pages in {:.3} s",
            began.elapsed().as_secs_f64()
        );
        true
    }

    /// Acts on one hint; whether to go on.
    fn heard(&mut self, hint: Hint, claimed: &mut Claimed, buf: &mut [PageBuf]) -> bool {
        match hint {
            Hint::Touched(page) => {
                if self.directory.take_prefetched(page) {
                    self.stats.prefetch.count_used(1);
                }
            }
            Hint::Passed(span) => {
                let used = span
                    .pages()
                    .filter(|&p| self.directory.take_prefetched(p))
                    .count();
                self.stats.prefetch.count_used(used as u64);
            }
            Hint::Window(w) => {
                self.stats.prefetch.count_window();
                if let Err(e) = self.fetch_pages(w.pages(), u64::from(w.count), false, claimed, buf)
                {
                    tracing::warn!("prefetch stopped: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Brings in those of `pages` that are still remote. Errs only when installing fails
    /// (the guest's memory is going away); a failed fetch leaves its pages to demand.
    /// `count` bounds how many `pages` yields, at most [`MAX_DEPTH`]. Replayed pages
    /// (`replay`) are not marked prefetched: their use is the replay's point, not a guess.
    fn fetch_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
        count: u64,
        replay: bool,
        claimed: &mut Claimed,
        buf: &mut [PageBuf],
    ) -> Result<(), String> {
        let room = self.reserve_frames(count.min(u64::from(MAX_DEPTH)));
        claimed.len = 0;
        for p in pages {
            if claimed.len as u64 == room {
                break;
            }
            let Ok(e) = self.directory.entry(p) else {
                continue;
            };
            if e.state != PageState::Remote
                || self
                    .directory
                    .transition(p, PageState::Remote, PageState::Fetching)
                    .is_err()
            {
                continue;
            }
            claimed.pages[claimed.len] = (p, e.home.unwrap_or_default());
            claimed.len += 1;
        }
        self.give_frames_back(room - claimed.len as u64);
        if claimed.len == 0 {
            return Ok(());
        }
        let pages = &mut claimed.pages[..claimed.len];
        // By home, then page: runs of consecutive pages with one home.
        pages.sort_unstable_by_key(|&(p, n)| (n, p));
        let mut at = 0;
        while at < pages.len() {
            let node = pages[at].1;
            let end = at + pages[at..].iter().take_while(|&&(_, n)| n == node).count();
            self.fetch_and_install(node, &pages[at..end], &mut buf[..end - at], replay)?;
            at = end;
        }
        Ok(())
    }

    /// Fetches `pages` (sorted, all of home `node`, all Fetching) as runs into `buf` and
    /// installs those that arrived; the others go back to Remote and are woken.
    fn fetch_and_install(
        &mut self,
        node: NodeId,
        pages: &[(u64, NodeId)],
        buf: &mut [PageBuf],
        replay: bool,
    ) -> Result<(), String> {
        // The runs' (first page, pages): at most one per page.
        let mut spans = [(0u64, 0usize); MAX_DEPTH as usize];
        let mut n = 0;
        for &(p, _) in pages {
            if n > 0 && spans[n - 1].0 + spans[n - 1].1 as u64 == p {
                spans[n - 1].1 += 1;
            } else {
                spans[n] = (p, 1);
                n += 1;
            }
        }
        let spans = &spans[..n];
        // One Vec per window (not per page, and off the fault path): the runs borrow `buf`.
        let mut runs: Vec<Run<'_>> = Vec::with_capacity(n);
        let mut rest: &mut [PageBuf] = buf;
        for &(first, len) in spans {
            let (this, tail) = rest.split_at_mut(len);
            rest = tail;
            runs.push(Run::new(first, bytes_mut(this)));
        }
        let began = Instant::now();
        let fetched = if self.cache.is_some() {
            self.transport.read_runs(self.vm, node, &mut runs)
        } else {
            self.transport.fetch_runs(self.vm, node, &mut runs)
        };
        let took = began.elapsed();
        if let Err(e) = &fetched {
            self.stats.prefetch.count_failed();
            tracing::debug!(
                "prefetch from node {node}: {}",
                pagemesh_api::error_chain(e)
            );
        }
        let to = if self.cache.is_some() {
            PageState::Clean
        } else {
            PageState::Local
        };
        let mut installed = 0u64;
        let mut failure = None;
        for run in &runs {
            let count = (run.pages.len() / PAGE_SIZE) as u64;
            let addr = self.base + run.first * PAGE_SIZE as u64;
            let len = run.pages.len() as u64;
            let result = if !run.filled || failure.is_some() {
                None
            } else if self.cache.is_some() {
                // SAFETY: the run's buffer holds `len` readable bytes; `addr` is inside the
                // registered range (the window is inside the VM) and page aligned; nobody
                // else installs these pages while they are Fetching.
                Some(unsafe { self.uffd.copy_protected(addr, run.pages.as_ptr(), len) })
            } else {
                // SAFETY: as above.
                Some(unsafe { self.uffd.copy(addr, run.pages.as_ptr(), len) })
            };
            match result {
                Some(Ok(Installed::Done | Installed::AlreadyPresent)) => {
                    for p in run.first..run.first + count {
                        let _ = self.directory.prefetched(p, to, !replay);
                        if let Some((_, installs)) = &self.cache {
                            // Room for every frame, as for the handler's sends.
                            let _ = installs.try_send(p as u32);
                        }
                    }
                    installed += count;
                }
                other => {
                    if let Some(Err(e)) = other {
                        failure = Some(format!("cannot install pages {}..: {e}", run.first));
                    }
                    for p in run.first..run.first + count {
                        let _ =
                            self.directory
                                .transition(p, PageState::Fetching, PageState::Remote);
                    }
                    self.give_frames_back(count);
                    // After the state is back: a vCPU woken now faults on a Remote page.
                    let _ = self.uffd.wake(addr, len);
                }
            }
        }
        if installed > 0 {
            self.stats.record_prefetch(node, installed, took, replay);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Takes up to `want` frames above the low watermark (all `want` without a budget);
    /// how many it took.
    fn reserve_frames(&self, want: u64) -> u64 {
        let Some((shared, _)) = &self.cache else {
            return want;
        };
        let cap = shared.frames.saturating_sub(shared.low);
        let mut got = 0;
        let _ = shared
            .stats
            .mapped
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mapped| {
                got = cap.saturating_sub(mapped).min(want);
                (got > 0).then_some(mapped + got)
            });
        if got > 0 {
            shared.stats.note_resident();
        }
        got
    }

    fn give_frames_back(&self, n: u64) {
        if let Some((shared, _)) = &self.cache
            && n > 0
        {
            shared.stats.mapped.fetch_sub(n, Ordering::AcqRel);
        }
    }
}
