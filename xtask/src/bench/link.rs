//! The cases over a rate-limited link (`*-1g*`, `*-10g*`): a memory node in a network
//! namespace of its own, reached over a veth pair that `tc … tbf` limits each way (this
//! kernel has no netem), the coordinator and the compute node on this host.
//!
//! They run over two kinds of page: the test pattern, which does not compress (a
//! multiplicative hash of the page and word: to LZ4 it is random bytes), and a real memory
//! image, written into each cluster's folder as [`IMAGE`]: the Linux guest's RAM once its
//! console has printed `Memory:` ([`linux_ram_image`]: the kernel booted on a cluster of its
//! own with `--dump-ram`, kept in `.pagemesh/guest` for later benches), or with
//! `--boot-image` its boot image (its kernel, initramfs and boot parameters laid out in its
//! RAM as `--kernel` loads them, zero pages elsewhere; [`linux_boot_image`]).

use std::path::Path;

use anyhow::Context;
use pagemesh_api::PAGE_SIZE;
use pagemesh_tests::netns::Netns;
use pagemesh_tests::{Bins, Cluster, Coordinator, MemoryNode};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

/// The memory image's file name in a cluster's folder.
pub(super) const IMAGE: &str = "linux-memory.img";

/// The console line the RAM image is taken at: as far as the kernel boots on hosts without
/// hardware virtualization (docs/linux-guest.md).
const RAM_IMAGE_AT: &str = "Memory:";

/// RAM the Linux guest boots with for its image: with 64 MiB its decompressor triple-faults.
const RAM_IMAGE_MIB: u64 = 256;

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
    let makeup = makeup(&bytes);
    Ok((bytes, makeup))
}

/// The first `mem_bytes` of the Linux guest's RAM once its console has printed
/// [`RAM_IMAGE_AT`], and their makeup: the guest booted once with [`RAM_IMAGE_MIB`] (or
/// `mem_bytes`, if more) on a cluster of its own in `dir` and dumped (`--dump-ram`), then
/// kept in the guest folder for the next bench (a few minutes here: the kernel's code is
/// emulated). The kernel sits at 16 MiB, so 64 MiB of it hold the kernel and its early
/// allocations.
pub(super) fn linux_ram_image(
    bins: &Bins,
    dir: &Path,
    mem_bytes: u64,
) -> anyhow::Result<(Vec<u8>, ImageMakeup)> {
    let guest = crate::guest::ensure()?;
    let mem = mem_bytes.max(RAM_IMAGE_MIB << 20);
    let kept = guest
        .kernel
        .with_file_name(format!("linux-ram-{}MiB.img", mem >> 20));
    if !kept.exists() {
        boot_and_dump(bins, dir, &guest, mem, &kept)?;
    }
    let mut bytes =
        std::fs::read(&kept).with_context(|| format!("cannot read {}", kept.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 == mem,
        "{} has {} bytes, not {mem}: delete it and bench again",
        kept.display(),
        bytes.len()
    );
    bytes.truncate(mem_bytes as usize);
    let makeup = makeup(&bytes);
    Ok((bytes, makeup))
}

/// Boots the Linux guest with `mem` bytes on a cluster in `dir`, stops it at
/// [`RAM_IMAGE_AT`] and has the node write its RAM to `to`.
fn boot_and_dump(
    bins: &Bins,
    dir: &Path,
    guest: &crate::guest::Guest,
    mem: u64,
    to: &Path,
) -> anyhow::Result<()> {
    let dir = dir.join("linux-ram");
    std::fs::create_dir_all(&dir)?;
    let mut cluster = Cluster::start(bins.clone(), dir.clone(), &[1], "2GiB")?;
    let part = to.with_extension("part");
    let (mem_arg, kernel, initrd, out) = (
        format!("{}MiB", mem >> 20),
        guest.kernel.display().to_string(),
        guest.initrd.display().to_string(),
        part.display().to_string(),
    );
    eprintln!(
        "xtask: booting the Linux guest ({mem_arg}) to '{RAM_IMAGE_AT}' for its RAM image (once; \
         a few minutes here, the kernel's code is emulated)"
    );
    let (mut node, _) = cluster.spawn_compute(&[
        "--mem",
        &mem_arg,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--console",
        "--no-ebpf",
        "--dump-ram",
        &out,
    ])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1800);
    loop {
        if node.output().lines().any(|l| l.contains(RAM_IMAGE_AT)) {
            break;
        }
        if let Some(status) = node.try_wait()? {
            anyhow::bail!(
                "the Linux guest ended ({status}) before '{RAM_IMAGE_AT}'; logs in {}",
                dir.display()
            );
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the Linux guest did not reach '{RAM_IMAGE_AT}' in 30 minutes; logs in {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Stopped, the node writes the RAM before its pager stops.
    node.signal(libc::SIGTERM);
    node.wait(std::time::Duration::from_secs(300))?;
    cluster.stop()?;
    let written = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    anyhow::ensure!(
        written == mem,
        "the node wrote {written} bytes of RAM, not {mem}; logs in {}",
        dir.display()
    );
    std::fs::rename(&part, to)?;
    eprintln!("xtask: Linux RAM image kept in {}", to.display());
    Ok(())
}

/// What `bytes` hold, page by page, as packing sees them.
fn makeup(bytes: &[u8]) -> ImageMakeup {
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
    makeup
}
