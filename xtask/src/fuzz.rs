//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` for a bounded time, each
//! from the corpus kept in the repository (`fuzz/seeds/<target>`, read only) plus the one it
//! grows (`fuzz/corpus/<target>`, not committed), and reports executions and crashes. CI
//! runs it briefly as part of `cargo xtask test`; a long run is `--seconds 3600`
//! (docs/fuzzing.md).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cmd::{self, project_root};
use crate::ebpf::NIGHTLY;

/// The targets and the longest input each is given (`-max_len`): enough for what they parse
/// (a few frames; a key file; a VM's JSON), small enough that the corpus stays small.
pub const TARGETS: &[(&str, usize)] = &[
    ("frame", 4200),
    ("server_connection", 9000),
    ("keyring", 512),
    ("api_json", 2048),
    ("packed", 9000),
];

/// The cargo-fuzz release `setup` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (default: all of them).
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

/// One target's run.
#[derive(Serialize, Debug)]
pub struct TargetRun {
    /// The target.
    pub target: String,
    /// Inputs executed.
    pub executions: u64,
    /// Seconds it ran.
    pub seconds: f64,
    /// Inputs in its corpus at the end.
    pub corpus: u64,
    /// Whether it found a crash (its input is in `fuzz/artifacts/<target>/`).
    pub crashed: bool,
}

/// Whether `cargo fuzz` of the pinned version runs.
fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
}

/// Installs cargo-fuzz unless it is there (part of `cargo xtask setup`).
pub fn install() -> anyhow::Result<()> {
    if cargo_fuzz_installed() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    cmd::run(cmd::cargo_command().args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// `cargo fuzz` on the nightly toolchain, in `fuzz/`'s parent.
fn cargo_fuzz(root: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "cargo", "fuzz"]).current_dir(root);
    c
}

/// Runs the targets `args` names for `args.seconds` each; fails if any crashed.
pub fn fuzz(args: &FuzzArgs) -> anyhow::Result<Vec<TargetRun>> {
    crate::setup::setup()?;
    install()?;
    let root = project_root();
    let targets: Vec<(&str, usize)> = match &args.target {
        None => TARGETS.to_vec(),
        Some(t) => vec![
            *TARGETS
                .iter()
                .find(|(name, _)| name == t)
                .with_context(|| format!("no fuzz target {t:?}; the targets: {}", names()))?,
        ],
    };
    // One build for all targets, so that the time budget is spent fuzzing.
    eprintln!("xtask: building the fuzz targets (nightly, AddressSanitizer)");
    cmd::run(cargo_fuzz(&root).args(["build", "--release"]))?;
    let mut runs = Vec::new();
    for (target, max_len) in targets {
        runs.push(run_target(&root, target, max_len, args.seconds)?);
    }
    let total: u64 = runs.iter().map(|r| r.executions).sum();
    println!("\nfuzz target          executions   exec/s  corpus  result");
    for r in &runs {
        println!(
            "{:<20} {:>10} {:>8.0} {:>7}  {}",
            r.target,
            r.executions,
            r.executions as f64 / r.seconds.max(1e-9),
            r.corpus,
            if r.crashed { "CRASH" } else { "ok" }
        );
    }
    println!("total                {total:>10}");
    if let Some(path) = &args.json {
        crate::run::write_json(path, &runs)?;
    }
    let crashed: Vec<&str> = runs
        .iter()
        .filter(|r| r.crashed)
        .map(|r| r.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}; the inputs are in fuzz/artifacts/ (reproduce with \
             `rustup run nightly cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`)",
            crashed.join(", ")
        );
    }
    Ok(runs)
}

/// Inputs saved in `artifacts`.
fn findings(artifacts: &Path) -> usize {
    std::fs::read_dir(artifacts).map_or(0, |d| d.count())
}

fn names() -> String {
    TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

fn run_target(
    root: &Path,
    target: &str,
    max_len: usize,
    seconds: u64,
) -> anyhow::Result<TargetRun> {
    let fuzz = root.join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let seeds = fuzz.join("seeds").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    for dir in [&corpus, &seeds, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let found_before = findings(&artifacts);
    let started = Instant::now();
    let output = cargo_fuzz(root)
        .args(["run", "--release", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .arg("-rss_limit_mb=2048")
        .output()
        .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| -> u64 {
        log.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.trim_start_matches(':').trim().parse().ok())
            .next_back()
            .unwrap_or(0)
    };
    let executions = stat("stat::number_of_executed_units");
    // A finding is an input libFuzzer saved (crash-, leak-, timeout-, oom-...); a failure
    // without one is cargo fuzz itself failing (a build error), which is no result at all.
    let crashed = findings(&artifacts) > found_before;
    if !output.status.success() {
        // The report is what tells what went wrong: show its end.
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        if !crashed {
            bail!("cargo fuzz run {target} failed without a finding (see above)");
        }
    }
    let corpus_len = std::fs::read_dir(&corpus).map_or(0, |d| d.count() as u64);
    Ok(TargetRun {
        target: target.to_owned(),
        executions,
        seconds: elapsed,
        corpus: corpus_len,
        crashed,
    })
}
