//! The eBPF toolchain and `cargo xtask build-ebpf`.
//!
//! The node embeds its probes through `probes/build.rs` (aya-build), which builds
//! `node-ebpf` whenever the toolchain below is installed; `cargo xtask setup` installs it.
//! `build-ebpf` builds the same object on its own, with the same flags, for inspection
//! (`llvm-objdump -d`, `bpftool prog load`) and as a quick compile check of the probes.
//!
//! The toolchain, all of it needed:
//! - the `nightly` Rust toolchain with `rust-src` (`-Z build-std=core` for
//!   `bpfel-unknown-none`);
//! - `bpf-linker`, built against the system's LLVM 22 (`llvm-22-dev`), the LLVM of that
//!   nightly. aya 0.15+ needs rustc 1.98, hence the pinned aya versions in the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::cmd::{self, project_root};

pub(crate) const NIGHTLY: &str = "nightly";
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "pagemesh-node-ebpf";

/// What is missing of the toolchain, by name (empty when complete).
pub fn missing() -> Vec<&'static str> {
    let mut out = Vec::new();
    if !nightly_has_rust_src() {
        out.push("rust-src for the nightly toolchain");
    }
    if !deb_installed(LLVM_PACKAGE) {
        out.push(LLVM_PACKAGE);
    }
    if !bpf_linker_works() {
        out.push("bpf-linker");
    }
    out
}

/// Installs whatever of the toolchain is missing; does nothing when it is complete.
pub fn install_toolchain() -> anyhow::Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    eprintln!(
        "xtask: installing the eBPF toolchain: {}",
        missing.join(", ")
    );
    if !nightly_has_rust_src() {
        // Never update an installed nightly: its LLVM must stay the one bpf-linker links.
        let mut rustup = Command::new("rustup");
        if nightly_installed() {
            rustup.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
        } else {
            rustup.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
            rustup.args(["--component", "rust-src"]);
        }
        cmd::run(&mut rustup)?;
    }
    if !deb_installed(LLVM_PACKAGE) {
        cmd::apt_install(&[LLVM_PACKAGE])?;
    }
    if !bpf_linker_works() {
        // bpf-linker's build finds LLVM through the first `llvm-config` on PATH, which on
        // Debian 12 is LLVM 14's; LLVM_PREFIX points it at LLVM 22 instead.
        cmd::run(
            cmd::cargo_command()
                .args(["install", "--locked", "bpf-linker", "--version"])
                .arg(BPF_LINKER_VERSION)
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    let still = self::missing();
    if !still.is_empty() {
        bail!(
            "the eBPF toolchain is still incomplete after installing: {}",
            still.join(", ")
        );
    }
    eprintln!(
        "xtask: eBPF toolchain installed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask build-ebpf`: installs the toolchain if needed, builds the probe object and
/// prints where it is.
pub fn build_ebpf() -> anyhow::Result<()> {
    install_toolchain()?;
    let root = project_root();
    let target_dir = target_dir(&root).join("ebpf");
    // The same command and flags as aya-build in probes/build.rs.
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    eprintln!("xtask: building {PACKAGE} for {TARGET}");
    cmd::run(
        Command::new("rustup")
            .args(["run", NIGHTLY, "cargo", "build", "--package", PACKAGE])
            .args(["--bins", "--release", "--target", TARGET])
            .args(["-Z", "build-std=core", "--target-dir"])
            .arg(&target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .env("PATH", path_with_bpf_linker())
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .current_dir(&root),
    )?;
    let object = target_dir.join(TARGET).join("release").join(PACKAGE);
    let len = std::fs::metadata(&object)
        .with_context(|| format!("no object at {}", object.display()))?
        .len();
    println!("{} ({len} bytes)", object.display());
    Ok(())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn nightly_installed() -> bool {
    Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
    else {
        return false;
    };
    out.status.success()
        && Path::new(String::from_utf8_lossy(&out.stdout).trim())
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b" installed"))
}

/// `bpf-linker` on PATH, or where `cargo install` put it.
fn bpf_linker() -> Option<PathBuf> {
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        Some(cargo_home.join("bin/bpf-linker")).filter(|p| p.is_file())
    })
}

fn bpf_linker_works() -> bool {
    bpf_linker().is_some_and(|l| {
        Command::new(l)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// PATH with `bpf-linker`'s folder in it, for the nested nightly build.
fn path_with_bpf_linker() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(dir) = bpf_linker().and_then(|l| l.parent().map(Path::to_path_buf)) else {
        return path;
    };
    let mut dirs = vec![dir];
    dirs.extend(std::env::split_paths(&path));
    std::env::join_paths(dirs).unwrap_or(path)
}
