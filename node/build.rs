//! Assembles the built-in test guest (`src/vm/guest.S`) into a flat binary that
//! `vm/guest.rs` embeds. Needs GNU `as` and `objcopy` (binutils, present wherever a C
//! toolchain is, which Rust's linker needs anyway).

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}; install binutils"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let src = "src/vm/guest.S";
    println!("cargo::rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let obj = out.join("guest.o");
    let bin = out.join("guest.bin");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));
}
