//! `cargo xtask setup`: make this machine able to build and run pagemesh, idempotently
//! (apt packages, the devices, and the eBPF toolchain of [`crate::ebpf`]).

use std::path::Path;
use std::process::Command;

use crate::cmd::apt_install;
use crate::ebpf;

/// Debian packages and the command each provides (checked before installing).
const PACKAGES: &[(&str, &str)] = &[
    // `as` and `objcopy` assemble the built-in test guest (vmm/build.rs).
    ("binutils", "objcopy"),
    // The end-to-end tests scrape a live node with a real Prometheus server.
    ("prometheus", "prometheus"),
    // The console's end-to-end test drives it in a real terminal.
    ("tmux", "tmux"),
];

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
    ebpf::install_toolchain()?;
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
