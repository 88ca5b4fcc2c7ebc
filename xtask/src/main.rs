//! `cargo xtask`: set-up, local cluster, benchmarks and the test suite.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | installs what the project needs (apt packages, the eBPF toolchain), idempotently |
//! | `build-ebpf` | builds the eBPF probe object on its own (the node's build embeds it anyway) |
//! | `run` | builds, starts a coordinator and three nodes on loopback, runs guests, prints a summary |
//! | `bench` | the fault-latency benchmark |
//! | `test` | the whole suite (what CI runs), a short fuzz run included |
//! | `fuzz` | every cargo-fuzz target of `fuzz/` for a bounded time |
//! | `soak` | the cluster under load for N minutes, memory nodes restarting; RSS and fds watched |
//!
//! A module per command (`setup`, `ebpf`, `run`, `bench`, `fuzz`, `soak`), `guest` for the Linux guest the
//! tests boot, `summary` for a run's results, and `cmd` for running programs (cargo, apt-get)
//! from the workspace root, which all of them use and which uses none of them.

mod bench;
mod cmd;
mod ebpf;
mod fuzz;
mod guest;
mod plot;
mod run;
mod setup;
mod soak;
mod summary;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "pagemesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what pagemesh needs to build and run (apt packages, the eBPF toolchain);
    /// safe to repeat.
    Setup,
    /// Build the eBPF probes (`node-ebpf`) for the BPF target and print the object's path.
    /// The node's build (probes/build.rs) builds and embeds them by itself once `setup` has
    /// installed the toolchain; this is for inspecting the object.
    BuildEbpf,
    /// Build, start a local cluster (coordinator, two memory nodes, one compute node) and
    /// run the verify and random read-modify-write guests on remote memory.
    Run(run::RunArgs),
    /// Measure fault latency: local demand-zero, userfaultfd from a local buffer, remote
    /// sequential and remote random.
    Bench(bench::BenchArgs),
    /// Run the whole test suite: formatting, lints, unit and end-to-end tests, then each
    /// fuzz target for a few seconds.
    Test(TestArgs),
    /// Run every fuzz target (`fuzz/`, cargo-fuzz on nightly) for a bounded time from the
    /// corpus in the repository; fails if one crashes (docs/fuzzing.md).
    Fuzz(fuzz::FuzzArgs),
    /// Keep a local cluster under load (guests writing through a page cache, two replicas)
    /// for N minutes, restarting a memory node every few minutes; report every process's RSS
    /// and open descriptors at warm-up and at the end. Fails if a run fails or a page is bad.
    Soak(soak::SoakArgs),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    no_lint: bool,
    /// Seconds to run each fuzz target after the tests (0: none).
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    fuzz_seconds: u64,
    /// Extra arguments passed to `cargo test`.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::setup()
            .and_then(|()| fuzz::install())
            .and_then(|()| guest::ensure().map(|_| ())),
        Command::BuildEbpf => ebpf::build_ebpf(),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::bench(args),
        Command::Test(args) => test(args),
        Command::Fuzz(args) => fuzz::fuzz(&args).map(drop),
        Command::Soak(args) => soak::soak(args),
    }
}

fn test(args: TestArgs) -> anyhow::Result<()> {
    setup::setup()?;
    // The Linux boot test needs the guest kernel and initramfs.
    let guest = guest::ensure()?;
    let root = cmd::project_root();
    if !args.no_lint {
        cmd::cargo(&root, &["fmt", "--all", "--check"])?;
        let clippy = ["clippy", "--workspace", "--all-targets"];
        let deny = ["--", "-D", "warnings"];
        cmd::cargo(&root, &[&clippy[..], &deny[..]].concat())?;
        // And with the RDMA verbs built in (it links libibverbs; it runs only where a host
        // has an RDMA device, which this project's hosts do not).
        cmd::cargo(
            &root,
            &[&clippy[..], &["--features", "rdma"], &deny[..]].concat(),
        )?;
    }
    // End-to-end tests start the real binaries: build them first, in the same profile.
    cmd::cargo(&root, &["build", "--workspace", "--bins"])?;
    let mut test_args = vec!["test", "--workspace"];
    test_args.extend(args.cargo_args.iter().map(String::as_str));
    cmd::cargo_with_env(
        &root,
        &test_args,
        &[
            ("PAGEMESH_GUEST_KERNEL", guest.kernel.as_os_str()),
            ("PAGEMESH_GUEST_INITRD", guest.initrd.as_os_str()),
            ("PAGEMESH_SCHEMATHESIS", setup::schemathesis().as_os_str()),
        ],
    )?;
    // The RDMA verbs wrapper against the real libibverbs (on a host without a device: the
    // error that says so).
    cmd::cargo(
        &root,
        &[
            "test",
            "-p",
            "pagemesh-transport",
            "--features",
            "rdma",
            "--lib",
            "rdma",
        ],
    )?;
    if args.fuzz_seconds > 0 {
        fuzz::fuzz(&fuzz::FuzzArgs {
            seconds: args.fuzz_seconds,
            target: None,
            json: None,
        })?;
    }
    Ok(())
}
