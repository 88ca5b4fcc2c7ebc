//! Builds the eBPF probes (`../node-ebpf`) with aya-build and lets `src/lib.rs` embed them
//! (`cfg(pagemesh_ebpf)`), when the eBPF toolchain is installed: the `nightly` toolchain with
//! `rust-src`, and `bpf-linker` (`cargo xtask setup` installs all three). Without it the
//! crate still builds, embeds no probes and says so when loaded.
//!
//! `PAGEMESH_EBPF=0` skips the probes; `PAGEMESH_EBPF=1` makes a missing toolchain an error
//! (CI sets it after `cargo xtask setup`, so that probes can never silently go missing).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    build_probes(&out);
}

/// The nightly toolchain aya-build uses (`rustup run nightly cargo build -Z build-std=core`).
const NIGHTLY: &str = "nightly";

fn build_probes(out: &Path) {
    println!("cargo::rustc-check-cfg=cfg(pagemesh_ebpf)");
    println!("cargo::rerun-if-env-changed=PAGEMESH_EBPF");
    let mode = std::env::var("PAGEMESH_EBPF").unwrap_or_default();
    if mode == "0" {
        println!("cargo::warning=PAGEMESH_EBPF=0: building the node without eBPF probes");
        return;
    }
    if let Err(missing) = toolchain() {
        assert!(
            mode != "1",
            "PAGEMESH_EBPF=1 but the eBPF toolchain is missing: {missing}; run `cargo xtask setup`"
        );
        println!(
            "cargo::warning=building the node without eBPF probes ({missing}); \
             run `cargo xtask setup` and rebuild"
        );
        return;
    }
    for dir in ["../node-ebpf", "../node-common"] {
        println!("cargo::rerun-if-changed={dir}");
    }
    // The nested cargo would otherwise use every core; keep to the outer build's -j.
    if let Ok(jobs) = std::env::var("NUM_JOBS") {
        // SAFETY: build scripts are single-threaded; nothing reads the environment
        // concurrently.
        unsafe { std::env::set_var("CARGO_BUILD_JOBS", jobs) };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../node-ebpf");
    let package = aya_build::Package {
        name: "pagemesh-node-ebpf",
        root_dir: root.to_str().expect("the source path is UTF-8"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        // The toolchain is there, so this is a real error (a probe that does not compile):
        // fail rather than quietly ship a node without probes.
        panic!(
            "building the eBPF probes failed: {e:#}\n\
             (set PAGEMESH_EBPF=0 to build the node without them)"
        );
    }
    let object = out.join("pagemesh-node-ebpf");
    assert!(
        object.exists(),
        "aya-build produced no {}",
        object.display()
    );
    println!("cargo::rustc-cfg=pagemesh_ebpf");
}

/// Checks for the eBPF toolchain; says what is missing if anything is. Also asks cargo to
/// rerun this script when the toolchain is installed later, so that `cargo xtask setup`
/// followed by a plain `cargo build` embeds the probes.
fn toolchain() -> Result<(), String> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".cargo")));
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".rustup")));
    // Small files and folders that change when the pieces are installed.
    if let Some(bin) = cargo_home.as_ref().map(|c| c.join("bin"))
        && bin.is_dir()
    {
        println!("cargo::rerun-if-changed={}", bin.display());
    }
    println!("cargo::rerun-if-env-changed=PATH");

    if which("rustup").is_none() {
        return Err("no rustup to run the nightly toolchain".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        if let Some(hashes) = rustup_home.map(|r| r.join("update-hashes"))
            && hashes.is_dir()
        {
            println!("cargo::rerun-if-changed={}", hashes.display());
        }
        return Err("no nightly toolchain".into());
    };
    let components = sysroot.join("lib/rustlib/components");
    if components.exists() {
        println!("cargo::rerun-if-changed={}", components.display());
    }
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        return Err("no rust-src for the nightly toolchain".into());
    }
    if which("bpf-linker").is_none() {
        let Some(bin) = cargo_home
            .map(|c| c.join("bin"))
            .filter(|b| b.join("bpf-linker").exists())
        else {
            return Err("no bpf-linker".into());
        };
        // Installed by `cargo install` but not on PATH: the nested build must find it.
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        let path = std::env::join_paths(paths).map_err(|e| e.to_string())?;
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PATH", path) };
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
}
