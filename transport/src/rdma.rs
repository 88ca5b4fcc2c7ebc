//! RDMA: what this host has of it.
//!
//! The RDMA data path (one-sided RDMA READ of page runs through `ibverbs`, behind the cargo
//! feature `rdma`) is not built yet; what is here is what `--transport` needs to decide
//! between RDMA and TCP: the RDMA devices the kernel lists in [`SYSFS_DIR`]. This
//! development host has none (its kernel has no InfiniBand support, so no soft-RoCE
//! either).

use std::path::Path;

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
