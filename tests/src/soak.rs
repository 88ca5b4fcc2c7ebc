//! The soak: a cluster under continuous load for a while, a memory node restarted every so
//! often, and every process's resident memory and open file descriptors watched.
//!
//! Three memory nodes and a coordinator stay up; compute nodes run one guest after another,
//! each a random read-modify-write (`zipf:0.99`) over 64 MiB through a 16 MiB budget with two
//! replicas of every page, so each run evicts, writes back and fetches again, and each run
//! checks its checksum. Every `restart_every`, the next memory node in turn is stopped and
//! started again (a new, empty process under the same id): a guest running then loses that
//! node and finishes on its pages' other copies; later VMs load onto the new process.
//!
//! Each process is sampled (`VmRSS` from `/proc/PID/status`, the entries of `/proc/PID/fd`)
//! at the end of every guest run it took a whole part in (a memory node restarted in the
//! middle of a run waits for the next) and at the end. Its warm-up is the first quarter of
//! those runs (at least one): the report gives the sample that ends it, the last, the
//! growth between them and the peak, and the JSON every sample. `cargo xtask soak --minutes N` runs it on the release build; the test suite
//! runs it for a minute and a half (`tests/soak.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{Bins, Cluster, MemoryNode, Proc, read_summary};

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakPlan {
    /// How long guests keep being started.
    pub duration: Duration,
    /// Time between two memory-node restarts.
    pub restart_every: Duration,
    /// Guest memory of each run.
    pub mem: String,
    /// Its local memory budget.
    pub budget: String,
}

/// One process's figures: after warm-up and at the end.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessFigures {
    /// `coordinator`, `node1`, `node2 (2nd)`, ...
    pub name: String,
    /// Resident memory after warm-up and at the end, KiB.
    pub rss_kib: (u64, u64),
    /// Open file descriptors after warm-up and at the end.
    pub fds: (u64, u64),
    /// The most resident memory of any sample, KiB.
    pub peak_rss_kib: u64,
    /// Every sample, in order: the end of each whole run, then the end of the soak.
    pub samples: Vec<Sample>,
}

/// One sample of a process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

impl ProcessFigures {
    /// RSS growth from warm-up to the end, as a fraction (0.05: 5% more).
    pub fn rss_growth(&self) -> f64 {
        self.rss_kib.1 as f64 / self.rss_kib.0.max(1) as f64 - 1.0
    }

    /// Open descriptors gained from warm-up to the end (negative: fewer).
    pub fn fd_growth(&self) -> i64 {
        i64::try_from(self.fds.1).unwrap_or(i64::MAX) - i64::try_from(self.fds.0).unwrap_or(0)
    }
}

/// What a soak found.
#[derive(Clone, Debug)]
pub struct SoakReport {
    /// Guest runs that ended well (checksum right, no bad page).
    pub runs_ok: u64,
    /// Guest runs that did not, with why.
    pub failures: Vec<String>,
    /// Bad pages over every run.
    pub bad_pages: u64,
    /// Memory-node restarts.
    pub restarts: u64,
    /// Runs during which a memory node was restarted (they ran on the other copies).
    pub runs_through_a_restart: u64,
    /// Every process that lived from warm-up to the end (a restarted memory node's new
    /// process from its first sample).
    pub processes: Vec<ProcessFigures>,
    /// How long it ran.
    pub elapsed: Duration,
}

impl SoakReport {
    /// The report as JSON (`cargo xtask soak --json`).
    pub fn to_json(&self) -> Value {
        json!({
            "runs_ok": self.runs_ok,
            "failures": self.failures,
            "bad_pages": self.bad_pages,
            "restarts": self.restarts,
            "runs_through_a_restart": self.runs_through_a_restart,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "processes": self.processes.iter().map(|p| json!({
                "name": p.name,
                "rss_kib_start": p.rss_kib.0,
                "rss_kib_end": p.rss_kib.1,
                "rss_growth_pct": p.rss_growth() * 100.0,
                "fds_start": p.fds.0,
                "fds_end": p.fds.1,
                "rss_kib_peak": p.peak_rss_kib,
                "samples": p.samples.iter().map(|s| json!({
                    "at_s": s.at_s,
                    "rss_kib": s.rss_kib,
                    "fds": s.fds,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} runs ok, {} failed, {} bad pages, {} memory-node restarts ({} runs through one), {:.0} s\n",
            self.runs_ok,
            self.failures.len(),
            self.bad_pages,
            self.restarts,
            self.runs_through_a_restart,
            self.elapsed.as_secs_f64()
        );
        out.push_str(
            "process           samples  RSS KiB warm    end   peak  growth   fds warm  end\n",
        );
        for p in &self.processes {
            out.push_str(&format!(
                "{:<18} {:>7} {:>12} {:>6} {:>6} {:>6.1}% {:>9} {:>4}\n",
                p.name,
                p.samples.len(),
                p.rss_kib.0,
                p.rss_kib.1,
                p.peak_rss_kib,
                p.rss_growth() * 100.0,
                p.fds.0,
                p.fds.1
            ));
        }
        for f in &self.failures {
            out.push_str(&format!("failed: {f}\n"));
        }
        out
    }
}

/// `VmRSS` (KiB) and the open descriptors of process `pid`.
pub fn sample(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok((rss, fds))
}

/// A watched process: its name and its samples.
struct Watched {
    name: String,
    pid: u32,
    samples: Vec<Sample>,
    /// Started while a guest ran, so that it took no part in that run: its first sample is the
    /// end of the next one.
    late: bool,
}

impl Watched {
    fn new(name: String, proc: &Proc, late: bool) -> Self {
        Watched {
            name,
            pid: proc.pid(),
            samples: Vec::new(),
            late,
        }
    }

    /// At the end of a run: samples it if it took part in the whole run (loaded its VM,
    /// served it, released it).
    fn sample(&mut self, started: Instant) {
        if self.late {
            self.late = false;
        } else if let Ok((rss_kib, fds)) = sample(self.pid) {
            self.samples.push(Sample {
                at_s: started.elapsed().as_secs_f64(),
                rss_kib,
                fds,
            });
        }
    }

    /// Its figures, if it took part in a whole run and is still alive: the sample that
    /// ends its warm-up (the first quarter of its samples) against one taken now.
    fn figures(&mut self, started: Instant) -> Option<ProcessFigures> {
        let warm = *self.samples.get(self.samples.len().saturating_sub(1) / 4)?;
        let (rss_kib, fds) = sample(self.pid).ok()?;
        self.samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib,
            fds,
        });
        Some(ProcessFigures {
            name: self.name.clone(),
            rss_kib: (warm.rss_kib, rss_kib),
            fds: (warm.fds, fds),
            peak_rss_kib: self.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
            samples: self.samples.clone(),
        })
    }
}

/// Whether the guest of `compute` has started (its VM defined, loaded and running).
fn guest_runs(compute: &Proc) -> bool {
    std::fs::read_to_string(&compute.stderr).is_ok_and(|log| log.contains("service: running "))
}

/// Runs the soak of `plan` with `bins`, its processes' output in `dir`.
pub fn run(bins: Bins, dir: PathBuf, plan: &SoakPlan) -> anyhow::Result<SoakReport> {
    let ids = [1u32, 2, 3];
    let capacity = "1GiB";
    let mut c = Cluster::start(bins.clone(), dir.clone(), &ids, capacity)?;
    let mut watched = vec![Watched::new(
        "coordinator".into(),
        &c.coordinator.proc,
        false,
    )];
    for m in &c.memory {
        watched.push(Watched::new(format!("node{}", m.id), &m.proc, false));
    }
    let args = [
        "--mem",
        &plan.mem,
        "--local-memory",
        &plan.budget,
        "--workload",
        "zipf:0.99",
        "--access",
        "rmw",
        "--replicas",
        "2",
        "--peer-timeout",
        "2",
        "--no-ebpf",
    ];
    let mut report = SoakReport {
        runs_ok: 0,
        failures: Vec::new(),
        bad_pages: 0,
        restarts: 0,
        runs_through_a_restart: 0,
        processes: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let mut next_restart = started + plan.restart_every;
    let mut next_node = 0usize;
    let mut lives = [1u32; 3];
    while started.elapsed() < plan.duration {
        let (mut compute, json) = c.spawn_compute(&args)?;
        let mut restarted_during = false;
        let status = loop {
            if let Some(status) = compute.try_wait()? {
                break status;
            }
            // Only once the guest runs: a memory node that goes while a VM is being
            // defined and loaded fails that start (`memory node N could not load VM V`),
            // which is not what the soak is after.
            if Instant::now() >= next_restart && guest_runs(&compute) {
                // The next memory node in turn: stopped (it leaves the cluster) and started
                // again, empty, under its id.
                let m = &mut c.memory[next_node];
                let id = m.id;
                m.proc
                    .stop()
                    .with_context(|| format!("stopping memory node {id}"))?;
                let fresh = MemoryNode::start(&bins, &dir, &c.coordinator.url, id, capacity)
                    .with_context(|| format!("restarting memory node {id}"))?;
                lives[next_node] += 1;
                watched.push(Watched::new(
                    format!("node{id} (life {})", lives[next_node]),
                    &fresh.proc,
                    true,
                ));
                c.memory[next_node] = fresh;
                report.restarts += 1;
                restarted_during = true;
                next_node = (next_node + 1) % ids.len();
                next_restart = Instant::now() + plan.restart_every;
            }
            if started.elapsed() > plan.duration + Duration::from_secs(600) {
                bail!("a guest run did not end within 10 minutes of the soak's end");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let summary = read_summary(&json)?;
        let bad = summary
            .as_ref()
            .and_then(|s| s.result.as_ref())
            .map_or(0, |r| r.bad_pages);
        report.bad_pages += bad;
        match summary {
            Some(s) if status.success() && s.ok && bad == 0 => {
                report.runs_ok += 1;
                report.runs_through_a_restart += u64::from(restarted_during);
            }
            s => report.failures.push(format!(
                "run {} ({status}): {}",
                report.runs_ok + report.failures.len() as u64 + 1,
                s.and_then(|s| s.error)
                    .unwrap_or_else(|| compute.log_tail())
            )),
        }
        // Every process alive now has served the whole run (but one restarted during it).
        for w in &mut watched {
            w.sample(started);
        }
    }
    report.elapsed = started.elapsed();
    report.processes = watched
        .iter_mut()
        .filter_map(|w| w.figures(started))
        .collect();
    c.stop()?;
    Ok(report)
}
