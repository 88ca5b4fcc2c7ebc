//! `cargo xtask run`: a local cluster with a guest on remote memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use pagemesh_tests::{Bins, Cluster, read_summary};
use serde::Serialize;

use crate::summary::{ClusterRunSummary, NamedRun};
use crate::{cmd, setup};

/// Nodes of the local cluster: two memory nodes and the compute node.
const NODES: u32 = 3;

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
    /// Run the guests through a page cache of this size on the compute node (e.g. 64MiB,
    /// at least 1MiB): pages are evicted, written back and fetched again while they run
    /// (docs/page-cache.md) [default: unlimited].
    #[arg(long, value_name = "SIZE")]
    local_memory: Option<String>,
    /// Prefetch along the guests' fault streams (docs/prefetch.md).
    #[arg(long)]
    prefetch: bool,
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
    let root = cmd::project_root();
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
    cmd::cargo(&root, &args)?;
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
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A new folder under `.pagemesh/runs/`.
/// `path` as people should see it: relative to the project's root when it is inside it
/// (`.pagemesh/runs/…`), whole otherwise.
pub fn relative(path: &std::path::Path) -> String {
    let root = cmd::project_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Gives the local cluster a key of its own: a new random key in a private file under
/// `.pagemesh/`, handed to every process this run starts through `PAGEMESH_CLUSTER_KEY_FILE`
/// (unless the caller set that variable already), so that even the demo cluster serves its
/// pages only to its own nodes (docs/security.md).
fn use_local_cluster_key() -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::env::var_os("PAGEMESH_CLUSTER_KEY_FILE").is_some() {
        return Ok(());
    }
    let path = cmd::project_root().join(".pagemesh").join("cluster.key");
    if !path.exists() {
        std::fs::create_dir_all(path.parent().unwrap_or(&path))?;
        let key = pagemesh_auth::Keyring::generate()?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .with_context(|| format!("cannot write the cluster key {}", path.display()))?;
    }
    pagemesh_auth::Keyring::load(&path)?;
    eprintln!("xtask: cluster key {}", relative(&path));
    // SAFETY: xtask is single-threaded here (nothing has been spawned yet), so nothing reads
    // the environment while it changes.
    unsafe { std::env::set_var("PAGEMESH_CLUSTER_KEY_FILE", &path) };
    Ok(())
}

pub fn run_dir(kind: &str) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    cmd::project_root()
        .join(".pagemesh")
        .join(kind)
        .join(format!("{secs}-{}", std::process::id()))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    setup::setup()?;
    use_local_cluster_key()?;
    if args.guest == "linux" {
        return run_linux(&args);
    }
    let bins = build(args.debug)?;
    let dir = run_dir("runs");
    eprintln!("xtask: run folder {}", relative(&dir));
    let cluster = Cluster::start(bins, dir.clone(), &[1, 2], "1GiB")?;
    eprintln!(
        "xtask: coordinator at {}, memory nodes {} and {}",
        cluster.coordinator.url, cluster.memory[0].addr, cluster.memory[1].addr
    );
    let (mut cluster, runs, held) = if args.headless {
        run_workloads(cluster, &args.mem, &compute_args(&args), false, true)?
    } else {
        // The console in the foreground; the workloads in the background. The last run
        // holds its node up so the console keeps showing its figures until `q`.
        let console_bin = cluster.bins.node.with_file_name("pagemesh-console");
        let url = cluster.coordinator.url.clone();
        let mem = args.mem.clone();
        let extra = compute_args(&args);
        let work = std::thread::spawn(move || run_workloads(cluster, &mem, &extra, true, false));
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
        for (_, out) in &runs {
            print!("{out}");
        }
    }
    let summary = ClusterRunSummary::new(
        NODES,
        relative(&dir),
        runs.into_iter().map(|(run, _)| run).collect(),
    );
    println!();
    print!("{}", summary.text());
    if let Some(path) = &args.json {
        write_json(path, &summary)?;
    }
    cluster.stop()?;
    if !summary.ok {
        anyhow::bail!("the run failed; see the logs in {}", relative(&dir));
    }
    Ok(())
}

/// `--guest linux`: boot the kernel on the cluster and show its console.
fn run_linux(args: &RunArgs) -> anyhow::Result<()> {
    let guest = crate::guest::ensure()?;
    let bins = build(args.debug)?;
    let dir = run_dir("runs");
    eprintln!("xtask: run folder {}", relative(&dir));
    let mut cluster = Cluster::start(bins, dir.clone(), &[1, 2], "1GiB")?;
    let (kernel, initrd) = (
        guest.kernel.display().to_string(),
        guest.initrd.display().to_string(),
    );
    let mut a = vec![
        "--mem",
        &args.mem,
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--console",
    ];
    let extra = compute_args(args);
    a.extend(extra.iter().map(String::as_str));
    let (mut compute, json) = cluster.spawn_compute(&a)?;
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
    // A node stopped before its guest ended writes no summary: the run is then listed
    // without one, and fails.
    let written = read_summary(&json)?;
    if let Some(path) = &args.json {
        let run = NamedRun {
            name: "linux".into(),
            exit_ok: status.success(),
            summary: written.unwrap_or_default(),
        };
        write_json(
            path,
            &ClusterRunSummary::new(NODES, relative(&dir), vec![run]),
        )?;
    }
    cluster.stop()?;
    println!("  logs                 {}", relative(&dir));
    if !status.success() {
        anyhow::bail!("the compute node failed ({status}); see {}", relative(&dir));
    }
    Ok(())
}

/// The compute node flags `run` passes on: `--local-memory`, `--prefetch`.
fn compute_args(args: &RunArgs) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(b) = &args.local_memory {
        a.extend(["--local-memory".to_owned(), b.clone()]);
    }
    if args.prefetch {
        a.push("--prefetch".to_owned());
    }
    a
}

/// One finished run and the compute node's stdout.
type RunResult = (NamedRun, String);

/// Runs the verify and the random read-modify-write workloads, each on a fresh VM. With
/// `hold_last` the last compute node stays up (its summary is written) and is returned.
fn run_workloads(
    mut cluster: Cluster,
    mem: &str,
    extra: &[String],
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
    for (i, (name, extra_workload)) in plan.into_iter().enumerate() {
        let mut a = vec!["--mem", mem, "--placement", "interleave"];
        a.extend(extra_workload);
        a.extend(extra.iter().map(String::as_str));
        let last = i == 1;
        if echo {
            eprintln!("xtask: running {name} on freshly loaded remote memory");
        }
        let (exit_ok, summary, proc) = if last && hold_last {
            a.push("--hold");
            let (mut proc, json) = cluster.spawn_compute(&a)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            let summary = loop {
                if let Some(s) = read_summary(&json)? {
                    break s;
                }
                if let Some(status) = proc.try_wait()? {
                    // It may have written its summary (a failure's) just before exiting.
                    if let Some(s) = read_summary(&json)? {
                        break s;
                    }
                    anyhow::bail!(
                        "the {name} run exited ({status}) without writing its summary; its log:\n{}",
                        proc.log_tail()
                    );
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the {name} run did not finish in time"
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            let ok = proc.try_wait()?.is_none_or(|s| s.success());
            (ok, summary, proc)
        } else {
            // Fails with the node's log when it wrote no summary.
            let (status, summary, proc) = cluster.run_compute(&a, Duration::from_secs(600))?;
            (status.success(), summary, proc)
        };
        if echo {
            print!("{}", proc.output());
        }
        let run = NamedRun {
            name: name.to_owned(),
            exit_ok,
            summary,
        };
        runs.push((run, proc.output()));
        if last && hold_last {
            held = Some(proc);
        }
    }
    Ok((cluster, runs, held))
}
