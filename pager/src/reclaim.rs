//! The reclaimer: the thread that keeps free frames for the fault handler, off the fault path.
//!
//! Each round it stages the oldest mapped pages (a dirty one write-protected first, so that
//! the copy it takes is the page's last state: a write after that faults and waits until the
//! page is staged, then takes it back) and, when the staging area is full, drops the oldest
//! staged pages: clean ones for nothing, dirty ones after one batched write-back per home
//! node. Every step is a compare-and-swap on the page's directory entry, so a page the
//! handler takes back in the meantime is simply left to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use pagemesh_api::{NodeId, PAGE_SIZE, VmId, error_chain};
use pagemesh_transport::TransportManager;

use crate::cache::{BATCH_PAGES, Counter, Shared};
use crate::directory::{PageDirectory, PageState};
use crate::policy::Queues;
use crate::uffd::Uffd;

/// How long the reclaimer sleeps when nothing asks it to work.
const IDLE: Duration = Duration::from_millis(20);

pub(crate) struct Reclaimer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) directory: Arc<PageDirectory>,
    pub(crate) uffd: Arc<Uffd>,
    pub(crate) base: u64,
    pub(crate) vm: VmId,
    pub(crate) writeback: TransportManager,
    pub(crate) stop: Arc<AtomicBool>,
    /// Pages the handler installed.
    pub(crate) installs: Receiver<u32>,
    /// Staging slots the handler took pages back from.
    pub(crate) returned: Receiver<u32>,
}

/// A dirty staged page on its way home.
#[derive(Clone, Copy)]
struct Outgoing {
    home: NodeId,
    page: u64,
    slot: u32,
}

impl Reclaimer {
    pub(crate) fn run(mut self) {
        let slots = self.shared.staging.slots();
        let mut free_slots: Vec<u32> = (0..slots).rev().collect();
        let mut queues = Queues::new(self.shared.frames as usize, slots as usize);
        let mut out: Vec<Outgoing> = Vec::with_capacity(BATCH_PAGES);
        let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
        loop {
            self.drain(&mut queues, &mut free_slots);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if self.shared.free_frames() >= self.shared.low {
                std::thread::park_timeout(IDLE);
                continue;
            }
            while self.shared.free_frames() < self.shared.high && !self.stop.load(Ordering::Acquire)
            {
                if free_slots.is_empty() {
                    self.drop_staged(&mut queues, &mut free_slots, &mut out, &mut buf);
                    self.drain(&mut queues, &mut free_slots);
                }
                let staged = self.stage(&mut queues, &mut free_slots);
                self.drain(&mut queues, &mut free_slots);
                if staged == 0 && free_slots.is_empty() {
                    // Nothing could move (every write-back failed): try again after a rest
                    // rather than spin; the handler gives up on its own deadline.
                    std::thread::sleep(Duration::from_millis(1));
                    break;
                }
                if staged == 0 && queues.len().0 == 0 {
                    break;
                }
            }
        }
    }

    /// Takes in what the handler sent: installed pages and returned slots.
    fn drain(&self, queues: &mut Queues, free_slots: &mut Vec<u32>) {
        while let Ok(page) = self.installs.try_recv() {
            queues.installed(page);
        }
        while let Ok(slot) = self.returned.try_recv() {
            self.free_slot(slot, free_slots);
        }
    }

    fn free_slot(&self, slot: u32, free_slots: &mut Vec<u32>) {
        self.shared.staging.release(slot);
        free_slots.push(slot);
        self.shared.stats.staged_now.fetch_sub(1, Ordering::AcqRel);
    }

    /// Stages up to a batch of the oldest mapped pages; returns how many left guest memory.
    fn stage(&self, queues: &mut Queues, free_slots: &mut Vec<u32>) -> usize {
        let mut moved = 0;
        while moved < BATCH_PAGES {
            let Some((page, state)) = queues.oldest_mapped(&self.directory) else {
                break;
            };
            let p = u64::from(page);
            if self
                .directory
                .transition(p, state, PageState::Evicting)
                .is_err()
            {
                // It changed under us (a write made it dirty): look at it again later.
                queues.installed(page);
                continue;
            }
            let addr = self.base + p * PAGE_SIZE as u64;
            if state == PageState::ZeroClean {
                // Never written, all zeros: nothing to keep.
                self.discard(addr);
                let _ = self
                    .directory
                    .transition(p, PageState::Evicting, PageState::Zero);
                self.shared.stats.mapped.fetch_sub(1, Ordering::AcqRel);
                self.shared
                    .stats
                    .count(Counter::Evicted { dirty: false }, 1);
                moved += 1;
                continue;
            }
            let Some(slot) = free_slots.pop() else {
                let _ = self.directory.transition(p, PageState::Evicting, state);
                queues.installed(page);
                break;
            };
            if state == PageState::Dirty
                && let Err(e) = self.uffd.write_protect(addr, PAGE_SIZE as u64, true)
            {
                tracing::warn!("cannot write-protect page {page} to stage it: {e}");
                free_slots.push(slot);
                let _ = self.directory.transition(p, PageState::Evicting, state);
                queues.installed(page);
                break;
            }
            // SAFETY: `addr` is a mapped page of guest memory (it was Clean or Dirty, so
            // installed, and only this thread removes pages); the slot is ours (free). The
            // page is write-protected (Clean pages always are), so the guest cannot change
            // it while it is copied; it only reads here.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    addr as *const u8,
                    self.shared.staging.slot_ptr(slot),
                    PAGE_SIZE,
                );
            }
            self.discard(addr);
            self.shared.stats.staged_now.fetch_add(1, Ordering::AcqRel);
            self.shared.stats.mapped.fetch_sub(1, Ordering::AcqRel);
            let staged = if state == PageState::Dirty {
                PageState::StagedDirty
            } else {
                PageState::StagedClean
            };
            let _ = self.directory.stage(p, slot, staged);
            queues.staged(page);
            self.shared.stats.count(Counter::Staged, 1);
            moved += 1;
        }
        moved
    }

    /// Drops up to a batch of the oldest staged pages: clean ones at once, dirty ones after
    /// writing them back, one batch per home node.
    fn drop_staged(
        &mut self,
        queues: &mut Queues,
        free_slots: &mut Vec<u32>,
        out: &mut Vec<Outgoing>,
        buf: &mut [u8],
    ) {
        out.clear();
        let mut looked = 0;
        while looked < BATCH_PAGES {
            let Some((page, state)) = queues.oldest_staged(&self.directory) else {
                break;
            };
            looked += 1;
            let p = u64::from(page);
            let Ok(entry) = self.directory.entry(p) else {
                continue;
            };
            if state == PageState::StagedClean {
                if self
                    .directory
                    .transition(p, PageState::StagedClean, PageState::Remote)
                    .is_ok()
                {
                    self.free_slot(entry.slot, free_slots);
                    self.shared
                        .stats
                        .count(Counter::Evicted { dirty: false }, 1);
                }
                continue;
            }
            let Some(home) = entry.home else {
                // Checked at start: every page of a budgeted VM has a home.
                continue;
            };
            if self
                .directory
                .transition(p, PageState::StagedDirty, PageState::WritingBack)
                .is_ok()
            {
                out.push(Outgoing {
                    home,
                    page: p,
                    slot: entry.slot,
                });
            }
        }
        if out.is_empty() {
            return;
        }
        out.sort_unstable_by_key(|o| (o.home, o.page));
        for (i, o) in out.iter().enumerate() {
            // SAFETY: the slot holds the page's bytes and stays the reclaimer's until it
            // frees it (the handler only reads a slot, and returns it through `returned`).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.shared.staging.slot_ptr(o.slot),
                    buf[i * PAGE_SIZE..].as_mut_ptr(),
                    PAGE_SIZE,
                );
            }
        }
        let mut start = 0;
        while start < out.len() {
            let home = out[start].home;
            let end = start + out[start..].iter().take_while(|o| o.home == home).count();
            self.write_back(
                home,
                &out[start..end],
                &buf[start * PAGE_SIZE..end * PAGE_SIZE],
                queues,
                free_slots,
            );
            start = end;
        }
    }

    /// Writes `pages` (sorted, their bytes in `bytes`) back to `home`, then drops those the
    /// handler did not take back meanwhile.
    fn write_back(
        &mut self,
        home: NodeId,
        pages: &[Outgoing],
        bytes: &[u8],
        queues: &mut Queues,
        free_slots: &mut Vec<u32>,
    ) {
        // Runs of consecutive pages, each one request; the runs of a batch go out together.
        let mut runs: Vec<(u64, &[u8])> = Vec::with_capacity(pages.len());
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j].page == pages[j - 1].page + 1 {
                j += 1;
            }
            runs.push((pages[i].page, &bytes[i * PAGE_SIZE..j * PAGE_SIZE]));
            i = j;
        }
        match self.writeback.write_back_runs(self.vm, home, &runs) {
            Ok(()) => {
                self.shared
                    .stats
                    .count(Counter::WrittenBack, pages.len() as u64);
                if let Ok(mut f) = self.shared.failure.lock() {
                    *f = None;
                }
                for o in pages {
                    if self
                        .directory
                        .transition(o.page, PageState::WritingBack, PageState::Remote)
                        .is_ok()
                    {
                        self.free_slot(o.slot, free_slots);
                        self.shared.stats.count(Counter::Evicted { dirty: true }, 1);
                    } else {
                        // The handler took it back: it returns the slot.
                        self.shared.stats.count(Counter::Retained, 1);
                    }
                }
            }
            Err(e) => {
                self.shared.stats.count(Counter::WritebackError, 1);
                let why = format!(
                    "cannot write {} pages ({}) back to node {home}: {}; they stay cached",
                    pages.len(),
                    page_list(pages.iter().map(|o| o.page)),
                    error_chain(&e)
                );
                tracing::warn!("{why}");
                if let Ok(mut f) = self.shared.failure.lock() {
                    *f = Some(why);
                }
                for o in pages {
                    if self
                        .directory
                        .transition(o.page, PageState::WritingBack, PageState::StagedDirty)
                        .is_ok()
                    {
                        queues.staged(o.page as u32);
                    }
                }
            }
        }
    }

    /// Takes the page at `addr` out of guest memory: its next access faults (missing).
    fn discard(&self, addr: u64) {
        // SAFETY: one page of guest memory, which the pager serves; the page's directory
        // state (Evicting) tells the handler it is going, and a fault on it is served
        // again from where the state then says it is.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, PAGE_SIZE, libc::MADV_DONTNEED) };
        if rc != 0 {
            tracing::warn!(
                "cannot drop guest page at {addr:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Up to four page numbers of `pages`, and how many more: what an error names.
fn page_list(pages: impl ExactSizeIterator<Item = u64>) -> String {
    const SHOWN: usize = 4;
    let n = pages.len();
    let shown: Vec<String> = pages.take(SHOWN).map(|p| p.to_string()).collect();
    let list = shown.join(", ");
    match n.saturating_sub(SHOWN) {
        0 if n == 1 => format!("page {list}"),
        0 => format!("pages {list}"),
        more => format!("pages {list} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::page_list;

    #[test]
    fn errors_name_a_few_pages_and_count_the_rest() {
        assert_eq!(page_list([7].into_iter()), "page 7");
        assert_eq!(page_list([1, 5].into_iter()), "pages 1, 5");
        assert_eq!(
            page_list((10..74).collect::<Vec<_>>().into_iter()),
            "pages 10, 11, 12, 13 and 60 more"
        );
    }
}
