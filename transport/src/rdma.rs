//! RDMA: what this host has of it, and the parts of the RDMA data path.
//!
//! - [`devices`]: the RDMA devices the kernel lists in [`SYSFS_DIR`], what `--transport`
//!   decides between RDMA and TCP on. This development host has none (its kernel has no
//!   InfiniBand support, so no soft-RoCE either).
//! - [`plan`]: where a memory node's page slots are in the memory it registered, and the
//!   one-sided RDMA READs that bring a run of pages in (no device needed; tested here).
//! - [`source`]: the page source that reads with RDMA and claims, writes back and
//!   controls over TCP, over any [`source::OneSided`] queue pair (tested here with memory
//!   of the same process standing in for the peer's).
//! - [`emulated`]: one-sided reads of another process's memory on the same host, standing
//!   in for a device to test the data path end to end (`--transport rdma-emulated`).
//! - `verbs` (cargo feature `rdma`, linking the system's libibverbs): a small wrapper over
//!   the raw verbs of `ibverbs-sys` that registers memory, connects a reliable queue pair
//!   and posts those reads. It builds and lints here; nothing has run it on RDMA hardware,
//!   and the node does not use it yet (docs/rdma.md says what is missing).

use std::path::Path;

pub mod emulated;
pub mod plan;
pub mod source;
#[cfg(feature = "rdma")]
pub mod verbs;

/// Where the kernel lists RDMA devices (InfiniBand, RoCE, iWARP and soft-RoCE alike).
pub const SYSFS_DIR: &str = "/sys/class/infiniband";

/// The names of the RDMA devices in `dir` (normally [`SYSFS_DIR`]), sorted; none when the
/// directory is missing (no RDMA support in the kernel) or empty (no device).
pub fn devices_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The RDMA devices of this host.
pub fn devices() -> Vec<String> {
    devices_in(Path::new(SYSFS_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_the_entries_of_the_directory_and_none_without_it() {
        let dir = std::env::temp_dir().join(format!("pagemesh-rdma-{}", std::process::id()));
        assert_eq!(devices_in(&dir), Vec::<String>::new());
        std::fs::create_dir_all(dir.join("rxe0")).unwrap();
        std::fs::create_dir_all(dir.join("mlx5_0")).unwrap();
        assert_eq!(devices_in(&dir), ["mlx5_0", "rxe0"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
