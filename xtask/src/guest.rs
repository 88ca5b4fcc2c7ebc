//! The Linux guest for `cargo xtask run --guest linux` and the boot test: Debian's cloud
//! kernel and an initramfs built from busybox-static, fetched from Debian's archive with
//! `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed on the host).
//!
//! Results land in `.pagemesh/guest/`: `vmlinuz` (a bzImage) and `initramfs.cpio`
//! (uncompressed newc: the emulated decompressors are slow on hosts without VT-x).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cmd::{project_root, run};

/// The kernel and initramfs.
pub struct Guest {
    /// bzImage.
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs.
    pub initrd: PathBuf,
}

/// What `/init` does: prints a marker, MemTotal, writes a pattern over 32 MiB of RAM (a
/// tmpfs file), checks it, powers off.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev 2>/dev/null
echo "pagemesh-init: /init is running"
busybox grep MemTotal /proc/meminfo
busybox mkdir -p /scratch
busybox mount -t tmpfs -o size=64m tmpfs /scratch
busybox yes pagemesh-pattern | busybox head -c 33554432 > /scratch/pattern
want=$(busybox yes pagemesh-pattern | busybox head -c 33554432 | busybox md5sum)
got=$(busybox md5sum < /scratch/pattern)
if [ "$want" = "$got" ]; then
    echo "pagemesh-init: pattern OK over 32 MiB"
else
    echo "pagemesh-init: pattern MISMATCH"
fi
busybox poweroff -f
"#;

/// Fetches and builds the guest unless it is already there.
pub fn ensure() -> anyhow::Result<Guest> {
    let dir = project_root().join(".pagemesh").join("guest");
    let guest = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio"),
    };
    if guest.kernel.exists() && guest.initrd.exists() {
        return Ok(guest);
    }
    std::fs::create_dir_all(&dir)?;
    let work = dir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    let kernel_pkg = kernel_package()?;
    eprintln!("xtask: fetching {kernel_pkg} and busybox-static from Debian's archive");
    let kernel_tree = unpack(&work, &kernel_pkg)?;
    let vmlinuz = std::fs::read_dir(kernel_tree.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .context("the kernel package has no boot/vmlinuz-*")?;
    let busybox_tree = unpack(&work, "busybox-static")?;
    let busybox = std::fs::read(busybox_tree.join("bin/busybox"))
        .context("busybox-static has no bin/busybox")?;

    let mut cpio = Cpio::default();
    for d in [".", "bin", "dev", "proc", "sys", "tmp", "scratch"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, INIT.as_bytes());
    std::fs::write(&guest.initrd, cpio.finish())?;
    std::fs::copy(&vmlinuz, &guest.kernel)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "xtask: guest kernel {} and initramfs {} ready",
        guest.kernel.display(),
        guest.initrd.display()
    );
    Ok(guest)
}

/// The versioned package `linux-image-cloud-amd64` depends on.
fn kernel_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("cannot run apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
        .context("apt-cache knows no linux-image-*-cloud-amd64; run apt-get update")
}

/// Downloads `pkg`'s .deb into `work` and unpacks it; returns the tree.
fn unpack(work: &Path, pkg: &str) -> anyhow::Result<PathBuf> {
    let download = |update: bool| -> anyhow::Result<()> {
        if update {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(work))
    };
    if download(false).is_err() {
        download(true)?;
    }
    let deb = std::fs::read_dir(work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(pkg))
        })
        .with_context(|| format!("apt-get download left no {pkg}*.deb"))?;
    let tree = work.join(format!("{pkg}-tree"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    if !tree.exists() {
        bail!("dpkg-deb produced nothing for {pkg}");
    }
    Ok(tree)
}

/// A newc ("070701") cpio archive writer.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data, (0, 0));
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, target.as_bytes(), (0, 0));
    }

    /// A character device.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, &[], (major, minor));
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir(".");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The init entry's mode field: regular file, 0755.
        assert!(text.contains(&format!("{:08x}", 0o100_755)));
    }
}
