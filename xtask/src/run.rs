//! `cargo xtask run`: a local cluster with a guest on remote memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use pagemesh_tests::{Bins, Cluster};
use serde_json::{Value, json};

use crate::setup;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Do not open the live console: run the guests, print the summary and exit.
    #[arg(long)]
    headless: bool,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Guest memory, interleaved over the two memory nodes.
    #[arg(long, default_value = "256MiB")]
    mem: String,
    /// Build and run the debug binaries instead of release.
    #[arg(long)]
    debug: bool,
    /// Which guest runs: `builtin` (the verify and random read-modify-write workloads) or
    /// `linux` (Debian's cloud kernel with a busybox initramfs, fetched by `cargo xtask
    /// setup`; its serial console is shown until it powers off, or Ctrl-C).
    #[arg(long, default_value = "builtin", value_parser = ["builtin", "linux"])]
    guest: String,
    /// With `--guest linux --headless`: stop the guest once its console shows this line
    /// (the boot gets no further than `Memory:` on hosts without hardware virtualization).
    #[arg(long, default_value = "pagemesh-init: pattern")]
    until: String,
}

/// Builds the binaries in the chosen profile and returns where they are.
pub fn build(debug: bool) -> anyhow::Result<Bins> {
    let root = setup::project_root();
    let mut args = vec![
        "build",
        "-p",
        "pagemesh-node",
        "-p",
        "pagemesh-coordinator",
        "-p",
        "pagemesh-console",
    ];
    if !debug {
        args.push("--release");
    }
    setup::cargo(&root, &args)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(Bins::in_dir(&target.join(if debug {
        "debug"
    } else {
        "release"
    })))
}

/// Writes `value` to `path` as pretty JSON.
pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A new folder under `.pagemesh/runs/`.
pub fn run_dir(kind: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    setup::project_root()
        .join(".pagemesh")
        .join(kind)
        .join(format!("{secs}-{}", std::process::id()))
}

fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
}

fn u(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    setup::setup()?;
    if args.guest == "linux" {
        return run_linux(&args);
    }
    let bins = build(args.debug)?;
    let dir = run_dir("runs");
    eprintln!("xtask: run folder {}", dir.display());
    let cluster = Cluster::start(bins, dir.clone(), &[1, 2], "1GiB")?;
    eprintln!(
        "xtask: coordinator at {}, memory nodes {} and {}",
        cluster.coordinator.url, cluster.memory[0].addr, cluster.memory[1].addr
    );
    let (mut cluster, runs, held) = if args.headless {
        run_workloads(cluster, &args.mem, false, true)?
    } else {
        // The console in the foreground; the workloads in the background. The last run
        // holds its node up so the console keeps showing its figures until `q`.
        let console_bin = cluster.bins.node.with_file_name("pagemesh-console");
        let url = cluster.coordinator.url.clone();
        let mem = args.mem.clone();
        let work = std::thread::spawn(move || run_workloads(cluster, &mem, true, false));
        let status = std::process::Command::new(&console_bin)
            .args(["--coordinator", &url])
            .status()
            .with_context(|| format!("cannot start {}", console_bin.display()))?;
        if !status.success() {
            eprintln!("xtask: the console exited with {status}");
        }
        if !work.is_finished() {
            eprintln!("xtask: waiting for the guest runs to finish");
        }
        work.join()
            .map_err(|_| anyhow::anyhow!("the workload thread panicked"))??
    };
    if let Some(mut p) = held {
        p.stop()?;
    }
    if !args.headless {
        // The console had the terminal while they ran: show what the compute nodes printed.
        for (_, _, _, out) in &runs {
            print!("{out}");
        }
    }
    let runs: Vec<(&str, bool, Value)> = runs.into_iter().map(|(n, ok, s, _)| (n, ok, s)).collect();

    let remote: u64 = runs
        .iter()
        .map(|(_, _, s)| u(s, &["faults", "remote"]))
        .sum();
    let local: u64 = runs
        .iter()
        .map(|(_, _, s)| u(s, &["faults", "local_zero"]))
        .sum();
    let verify = &runs[0].2;
    let ok = runs.iter().all(|(_, ok, s)| *ok && s["ok"] == json!(true));
    let summary = json!({
        "nodes": 3,
        "guest_pages": u(verify, &["guest_pages"]),
        "faults": {"remote": remote, "local_zero": local},
        "remote_miss_ratio": if remote + local == 0 { 0.0 } else { remote as f64 / (remote + local) as f64 },
        // The larger of the two runs' percentiles.
        "fault_p50_us": runs.iter().map(|(_, _, s)| f(s, &["fault_p50_us"])).fold(0.0, f64::max),
        "fault_p99_us": runs.iter().map(|(_, _, s)| f(s, &["fault_p99_us"])).fold(0.0, f64::max),
        "verify": {
            "pages_checked": u(verify, &["result", "pages_done"]),
            "bad_pages": u(verify, &["result", "bad_pages"]),
        },
        // Kernel-side figures of the last (random read-modify-write) run, null without probes.
        "ebpf": runs.last().map_or(Value::Null, |(_, _, s)| s["ebpf"].clone()),
        "runs": runs.iter().map(|(n, _, s)| json!({"name": n, "summary": s})).collect::<Vec<_>>(),
        "run_dir": dir.display().to_string(),
        "ok": ok,
    });

    println!();
    println!("pagemesh local cluster: coordinator + 2 memory nodes + 1 compute node");
    println!("  guest pages          {}", summary["guest_pages"]);
    println!("  faults served remote {remote}  (local zero-fill {local})");
    println!(
        "  remote-miss ratio    {:.3}",
        f(&summary, &["remote_miss_ratio"])
    );
    println!(
        "  fault latency        p50 {:.1} µs  p99 {:.1} µs",
        f(&summary, &["fault_p50_us"]),
        f(&summary, &["fault_p99_us"])
    );
    for (name, _, s) in &runs {
        println!(
            "  {name:<12} {:.1} µs/page, {} pages, ok={}",
            f(s, &["us_per_page"]),
            u(s, &["result", "pages_done"]),
            s["ok"]
        );
    }
    println!(
        "  verification         {} pages checked, {} bad",
        summary["verify"]["pages_checked"], summary["verify"]["bad_pages"]
    );
    println!("  logs                 {}", dir.display());
    println!(
        "  result               {}",
        if ok { "OK" } else { "FAILED" }
    );

    if let Some(path) = &args.json {
        write_json(path, &summary)?;
    }
    cluster.stop()?;
    if !ok {
        anyhow::bail!("the run failed; see the logs in {}", dir.display());
    }
    Ok(())
}

/// `--guest linux`: boot the kernel on the cluster and show its console.
fn run_linux(args: &RunArgs) -> anyhow::Result<()> {
    let guest = crate::guest::ensure()?;
    let bins = build(args.debug)?;
    let dir = run_dir("runs");
    eprintln!("xtask: run folder {}", dir.display());
    let mut cluster = Cluster::start(bins, dir.clone(), &[1, 2], "1GiB")?;
    let (mut compute, json) = cluster.spawn_compute(&[
        "--mem",
        &args.mem,
        "--kernel",
        &guest.kernel.display().to_string(),
        "--initrd",
        &guest.initrd.display().to_string(),
        "--console",
    ])?;
    eprintln!(
        "xtask: booting {} on a 2-memory-node cluster; the console follows (Ctrl-C stops it).\n\
         xtask: on hosts without hardware virtualization the kernel's own code is emulated: \
         expect the first lines after about two minutes (docs/linux-guest.md)",
        guest.kernel.display()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(1800);
    let mut shown = 0;
    let finished = loop {
        let out = compute.output();
        let lines: Vec<&str> = out.lines().collect();
        for l in &lines[shown..] {
            println!("{l}");
        }
        shown = lines.len();
        if let Some(status) = compute.try_wait()? {
            break Some(status);
        }
        if args.headless && lines.iter().any(|l| l.contains(&args.until)) {
            break None;
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = match finished {
        Some(s) => s,
        None => compute.stop()?,
    };
    let out = compute.output();
    for l in out.lines().skip(shown) {
        println!("{l}");
    }
    let summary: Value = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    if let Some(path) = &args.json {
        write_json(path, &summary)?;
    }
    cluster.stop()?;
    println!("  logs                 {}", dir.display());
    if !status.success() {
        anyhow::bail!("the compute node failed ({status}); see {}", dir.display());
    }
    Ok(())
}

/// One finished run: name, exit success, JSON summary, the node's stdout.
type RunResult = (&'static str, bool, Value, String);

/// Runs the verify and the random read-modify-write workloads, each on a fresh VM. With
/// `hold_last` the last compute node stays up (its summary is written) and is returned.
fn run_workloads(
    mut cluster: Cluster,
    mem: &str,
    hold_last: bool,
    echo: bool,
) -> anyhow::Result<(Cluster, Vec<RunResult>, Option<pagemesh_tests::Proc>)> {
    let plan: [(&'static str, Vec<&str>); 2] = [
        ("verify", vec!["--workload", "verify"]),
        (
            "random-rmw",
            vec!["--workload", "random", "--access", "rmw"],
        ),
    ];
    let mut runs = Vec::new();
    let mut held = None;
    for (i, (name, extra)) in plan.into_iter().enumerate() {
        let mut a = vec!["--mem", mem, "--placement", "interleave"];
        a.extend(extra);
        let last = i == 1;
        if echo {
            eprintln!("xtask: running {name} on freshly loaded remote memory");
        }
        let (ok, summary, proc) = if last && hold_last {
            a.push("--hold");
            let (mut proc, json) = cluster.spawn_compute(&a)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !json.exists() && proc.try_wait()?.is_none() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the {name} run did not finish in time"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(100));
            let summary: Value = std::fs::read_to_string(&json)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            let ok = proc.try_wait()?.is_none_or(|s| s.success());
            (ok, summary, proc)
        } else {
            let (status, summary, proc) = cluster.run_compute(&a, Duration::from_secs(600))?;
            (status.success(), summary, proc)
        };
        if summary.is_null() {
            anyhow::bail!(
                "the {name} run wrote no summary; its log:\n{}",
                proc.log_tail()
            );
        }
        if echo {
            print!("{}", proc.output());
        }
        runs.push((name, ok, summary, proc.output()));
        if last && hold_last {
            held = Some(proc);
        }
    }
    Ok((cluster, runs, held))
}
