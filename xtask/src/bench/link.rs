//! The cases over a rate-limited link (`*-1g*`, `*-10g*`): a memory node in a network
//! namespace of its own, reached over a veth pair that `tc … tbf` limits each way (this
//! kernel has no netem), the coordinator and the compute node on this host.
//!
//! They run over two kinds of page: the test pattern, which does not compress (a
//! multiplicative hash of the page and word: to LZ4 it is random bytes), and a real memory
//! image, the Linux guest's boot image (its kernel, initramfs and boot parameters laid out in
//! its RAM as `--kernel` loads them, zero pages elsewhere), written into each cluster's
//! folder as [`IMAGE`].

use std::path::Path;

use anyhow::Context;
use pagemesh_api::PAGE_SIZE;
use pagemesh_tests::netns::Netns;
use pagemesh_tests::{Bins, Cluster, Coordinator, MemoryNode};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

/// The memory image's file name in a cluster's folder.
pub(super) const IMAGE: &str = "linux-boot.img";

/// A cluster whose memory node sits behind a link of `bits_per_s`.
pub(super) struct LinkCluster {
    pub cluster: Cluster,
    /// Kept for the cluster's life: dropping it deletes the namespace and the link.
    _netns: Netns,
}

/// Starts a coordinator (on every address, so that the namespace reaches it) and memory
/// node 1 in a namespace behind a link limited to `bits_per_s`, in `dir`, with the memory
/// image written there.
pub(super) fn start(
    bins: &Bins,
    dir: &Path,
    bits_per_s: u64,
    image: &[u8],
) -> anyhow::Result<LinkCluster> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(IMAGE), image)?;
    let netns = Netns::create().context("the rate-limited cases need network namespaces")?;
    netns.rate_limit(bits_per_s)?;
    let mut coordinator = Coordinator::start_on(bins, dir, "0.0.0.0:0", &[])?;
    let port = coordinator
        .url
        .rsplit(':')
        .next()
        .context("no port in the coordinator's URL")?
        .to_owned();
    coordinator.url = format!("http://127.0.0.1:{port}");
    let from_netns = format!("http://{}:{port}", netns.host_ip);
    let memory = MemoryNode::start_in(&netns, bins, dir, &from_netns, 1, "2GiB", &[])?;
    Ok(LinkCluster {
        cluster: Cluster::from_parts(bins.clone(), dir.to_owned(), coordinator, vec![memory]),
        _netns: netns,
    })
}

/// What the memory image holds, page by page, as packing sees it.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub(super) struct ImageMakeup {
    pub pages: u64,
    pub zero: u64,
    /// Pages LZ4 shrinks.
    pub compressible: u64,
    /// Their packed bytes, against `compressible * 4096`.
    pub compressible_bytes: u64,
    /// Pages that go raw.
    pub raw: u64,
}

/// The Linux guest's boot image for `mem_bytes` of RAM (at least 64 MiB), and its makeup.
pub(super) fn linux_boot_image(mem_bytes: u64) -> anyhow::Result<(Vec<u8>, ImageMakeup)> {
    let guest = crate::guest::ensure()?;
    let (mem, _) = pagemesh_vmm::boot::build_image(
        mem_bytes.max(64 << 20),
        &guest.kernel,
        Some(&guest.initrd),
        "console=ttyS0",
        1,
    )
    .context("cannot lay out the Linux guest's boot image")?;
    let mut bytes = vec![0u8; mem_bytes.max(64 << 20) as usize];
    mem.read_slice(&mut bytes, GuestAddress(0))
        .context("cannot read the boot image")?;
    bytes.truncate(mem_bytes as usize);
    let mut makeup = ImageMakeup::default();
    let mut out = vec![0u8; PAGE_SIZE];
    let mut scratch = vec![0u8; pagemesh_protocol::packed::SCRATCH_LEN];
    let len_bytes = pagemesh_protocol::packed::LEN_BYTES;
    for page in bytes.chunks_exact(PAGE_SIZE) {
        makeup.pages += 1;
        // A zero page packs to its length alone.
        match pagemesh_protocol::packed::pack(page, &mut out, &mut scratch) {
            Some(len) if len == len_bytes => makeup.zero += 1,
            Some(len) => {
                makeup.compressible += 1;
                makeup.compressible_bytes += (len - len_bytes) as u64;
            }
            None => makeup.raw += 1,
        }
    }
    Ok((bytes, makeup))
}
