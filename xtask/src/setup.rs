//! `cargo xtask setup`: make this machine able to build and run pagemesh, idempotently
//! (apt packages, the devices, and the eBPF toolchain of [`crate::ebpf`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Debian packages and the command each provides (checked before installing).
const PACKAGES: &[(&str, &str)] = &[
    // `as` and `objcopy` assemble the built-in test guest (vmm/build.rs).
    ("binutils", "objcopy"),
    // The end-to-end tests scrape a live node with a real Prometheus server.
    ("prometheus", "prometheus"),
    // The console's end-to-end test drives it in a real terminal.
    ("tmux", "tmux"),
];

/// The workspace root.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs missing packages; checks the devices pagemesh needs.
pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    // The eBPF probes' toolchain (nightly rust-src, LLVM 22, bpf-linker): without it the
    // node builds but embeds no probes.
    crate::ebpf::install_toolchain()?;
    for dev in ["/dev/kvm", "/dev/userfaultfd"] {
        if !Path::new(dev).exists() {
            eprintln!(
                "xtask: warning: {dev} is missing; guests cannot run on this machine \
                 (see docs/operations.md)"
            );
        }
    }
    Ok(())
}

/// Installs Debian packages (after refreshing the package lists).
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: installing {}", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cargo` with `args` in `root` and extra environment variables.
pub fn cargo_with_env(
    root: &Path,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut cmd = cargo_command();
    cmd.current_dir(root).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// Runs `cargo` with `args` in `root`.
pub fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    cargo_with_env(root, args, &[])
}

/// The cargo that runs this xtask (`$CARGO`), or the one on PATH.
pub fn cargo_command() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
