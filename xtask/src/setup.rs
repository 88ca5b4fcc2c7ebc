//! `cargo xtask setup`: make this machine able to build and run pagemesh, idempotently
//! (apt packages, the devices, the eBPF toolchain of [`crate::ebpf`], and the Python tools the
//! tests use, in a virtual environment of their own).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::cmd::{self, apt_install};
use crate::ebpf;

/// The schema-driven HTTP fuzzer `tests/coordinator_schema.rs` runs against a real
/// coordinator, pinned so that a new release cannot change what the suite checks.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// Debian packages and the command each provides (checked before installing; a library
/// without a command is checked by its name with dpkg: `None`).
const PACKAGES: &[(&str, Option<&str>)] = &[
    // `as` and `objcopy` assemble the built-in test guest (vmm/build.rs).
    ("binutils", Some("objcopy")),
    // The end-to-end tests scrape a live node with a real Prometheus server.
    ("prometheus", Some("prometheus")),
    // The console's end-to-end test drives it in a real terminal.
    ("tmux", Some("tmux")),
    // Tests cut a memory node's link in a network namespace (`ip netns`, veth).
    ("iproute2", Some("ip")),
    // The coordinator's etcd store: `etcd-client` compiles etcd's protobuf definitions at
    // build time, and the tests run a real three-member etcd cluster.
    ("protobuf-compiler", Some("protoc")),
    ("etcd-server", Some("etcd")),
    // The RDMA transport's build (`--features rdma`, which CI lints): `ibverbs-sys` builds
    // rdma-core's headers with cmake (which wants pkg-config and libnl), generates its
    // bindings with bindgen (libclang), and links the system's libibverbs.
    ("libibverbs-dev", None),
    ("cmake", Some("cmake")),
    ("pkg-config", Some("pkg-config")),
    ("libnl-3-dev", None),
    ("libnl-route-3-dev", None),
    ("libclang-dev", None),
    ("python3", Some("python3")),
];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether dpkg has `package` installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.stdout.ends_with(b"install ok installed"))
}

/// Installs missing packages; checks the devices pagemesh needs.
pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, cmd)| !cmd.map_or_else(|| installed(pkg), have))
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    // The eBPF probes' toolchain (nightly rust-src, LLVM 22, bpf-linker): without it the
    // node builds but embeds no probes.
    ebpf::install_toolchain()?;
    python_tools()?;
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

/// The virtual environment of the test tools from PyPI (under `target/`, so a `cargo clean`
/// takes it along and the next setup builds it again).
pub fn venv() -> PathBuf {
    cmd::project_root().join("target/tools/venv")
}

/// The `schemathesis` command of [`venv`].
pub fn schemathesis() -> PathBuf {
    venv().join("bin/schemathesis")
}

/// Installs [`SCHEMATHESIS`] into [`venv`] unless that version is there. Debian's Python is
/// "externally managed" (PEP 668): tools from PyPI go into a venv, not the system.
fn python_tools() -> anyhow::Result<()> {
    let venv = venv();
    let python = venv.join("bin/python");
    let (_, version) = SCHEMATHESIS.split_once("==").expect("a pinned requirement");
    let installed = Command::new(&python)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('schemathesis'))",
        ])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == version);
    if installed {
        return Ok(());
    }
    if !python.exists() {
        let has_venv = Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_venv {
            apt_install(&["python3-venv"])?;
        }
        eprintln!(
            "xtask: creating the test tools' Python environment {}",
            venv.display()
        );
        cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("cannot create a Python virtual environment (is python3-venv installed?)")?;
    }
    eprintln!("xtask: installing {SCHEMATHESIS} from PyPI");
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(SCHEMATHESIS),
    )
    .context("cannot install the coordinator's schema fuzzer from PyPI")
}
