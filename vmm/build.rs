//! Assembles the built-in test guest (`src/guest.S`) into a flat binary that `guest.rs`
//! embeds. Needs GNU `as` and `objcopy` (binutils, present wherever a C toolchain is, which
//! Rust's linker needs anyway).

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; install binutils"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    assemble_guest(&out);
}

fn assemble_guest(out: &Path) {
    let src = "src/guest.S";
    println!("cargo::rerun-if-changed={src}");
    let obj = out.join("guest.o");
    let bin = out.join("guest.bin");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));
}
