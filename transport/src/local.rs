//! A [`PageSource`] over a buffer in this process: the `uffd-local` benchmark case and
//! tests of the pager without a network.

use pagemesh_api::{NodeId, PAGE_SIZE, VmId};

use super::{PageSource, PeerControl, Status, TransportError};

/// Pages of one VM held in a local buffer, posing as node `node`.
pub struct LocalSource {
    node: NodeId,
    vm: VmId,
    pages: Vec<u8>,
    held: Vec<bool>,
}

impl LocalSource {
    /// `pages` pages of `vm` filled with the pattern of `seed`.
    pub fn with_pattern(node: NodeId, vm: VmId, pages: u64, seed: u64) -> Self {
        let n = usize::try_from(pages).expect("page count fits in memory");
        let mut buf = vec![0u8; n * PAGE_SIZE];
        for (p, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            pagemesh_api::pattern::fill_page(seed, p as u64, page);
        }
        Self {
            node,
            vm,
            pages: buf,
            held: vec![true; n],
        }
    }

    fn range(
        &self,
        vm: VmId,
        page: u64,
        len: usize,
    ) -> Result<std::ops::Range<usize>, TransportError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(TransportError::InvalidPageSize(len));
        }
        if vm != self.vm {
            return Err(self.refuse(Status::UnknownVm, format!("unknown VM {vm}")));
        }
        let first = usize::try_from(page).unwrap_or(usize::MAX);
        let count = len / PAGE_SIZE;
        match first.checked_add(count) {
            Some(end) if end <= self.held.len() => Ok(first..end),
            _ => Err(self.refuse(Status::NotHeld, format!("page {page} is not held"))),
        }
    }

    fn refuse(&self, status: Status, message: String) -> TransportError {
        TransportError::Remote {
            node: self.node,
            status,
            message,
        }
    }
}

impl PageSource for LocalSource {
    fn peer(&self) -> NodeId {
        self.node
    }

    fn fetch(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        self.read(vm, page, dst)?;
        let r = self.range(vm, page, dst.len())?;
        self.held[r].fill(false);
        Ok(())
    }

    fn read(&mut self, vm: VmId, page: u64, dst: &mut [u8]) -> Result<(), TransportError> {
        let r = self.range(vm, page, dst.len())?;
        if let Some(p) = r.clone().find(|&p| !self.held[p]) {
            return Err(self.refuse(Status::NotHeld, format!("page {p} is not held")));
        }
        dst.copy_from_slice(&self.pages[r.start * PAGE_SIZE..r.end * PAGE_SIZE]);
        Ok(())
    }

    fn write_back(&mut self, vm: VmId, page: u64, src: &[u8]) -> Result<(), TransportError> {
        let r = self.range(vm, page, src.len())?;
        self.pages[r.start * PAGE_SIZE..r.end * PAGE_SIZE].copy_from_slice(src);
        self.held[r].fill(true);
        Ok(())
    }
}

impl PeerControl for LocalSource {
    fn peer(&self) -> NodeId {
        self.node
    }

    fn load(&mut self, vm: VmId) -> Result<u64, TransportError> {
        self.held(vm)
    }

    fn held(&mut self, vm: VmId) -> Result<u64, TransportError> {
        if vm != self.vm {
            return Err(self.refuse(Status::UnknownVm, format!("unknown VM {vm}")));
        }
        Ok(self.held.iter().filter(|&&h| h).count() as u64)
    }

    fn release(&mut self, vm: VmId) -> Result<u64, TransportError> {
        let n = self.held(vm)?;
        self.held.fill(false);
        Ok(n)
    }
}
