//! `cargo xtask bench`: fault latency, from the kernel's demand-zero floor to remote
//! random faults over TCP.
//!
//! Every case runs the same guest code (the built-in workload guest) in a fresh
//! `pagemesh-node` process, one VM per run. µs/page is guest wall time divided by pages;
//! the fault percentiles are the pager's own (event read → page installed). Each figure is
//! the median over runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use pagemesh_api::summary::RunSummary;
use pagemesh_tests::Cluster;
use serde_json::{Value, json};

use crate::run::{build, run_dir, write_json};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Short run: 16 MiB and 3 runs per case (for a smoke test, not for quoting).
    #[arg(long)]
    quick: bool,
    /// Guest memory touched per run.
    #[arg(long, default_value = "64MiB")]
    mem: String,
    /// Runs per case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pin the vCPU and its fault handler to this CPU.
    #[arg(long, value_name = "CPU")]
    pin_cpu: Option<usize>,
    /// Only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    remote: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "local-demand-zero",
        args: &[
            "--backing",
            "demand-zero",
            "--workload",
            "random",
            "--access",
            "read",
        ],
        remote: false,
    },
    Case {
        name: "uffd-local",
        args: &[
            "--backing",
            "uffd-local",
            "--workload",
            "random",
            "--access",
            "read",
        ],
        remote: false,
    },
    Case {
        name: "remote-seq",
        args: &["--workload", "seq", "--access", "read", "--no-ebpf"],
        remote: true,
    },
    Case {
        name: "remote-random",
        args: &["--workload", "random", "--access", "read", "--no-ebpf"],
        remote: true,
    },
    // The same with the eBPF probes attached: their overhead is the difference.
    Case {
        name: "remote-random-ebpf",
        args: &["--workload", "random", "--access", "read"],
        remote: true,
    },
];

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A 95% confidence interval for the median of `v`, by bootstrap: the medians of 2,000
/// resamples of `v` (drawn with replacement by a fixed-seed xorshift, so the interval is
/// reproducible from the same values), their 2.5th and 97.5th percentiles. `None` for fewer
/// than two values.
fn median_ci95(v: &[f64]) -> Option<(f64, f64)> {
    const RESAMPLES: usize = 2000;
    if v.len() < 2 {
        return None;
    }
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pick = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        v[(state % v.len() as u64) as usize]
    };
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| median((0..v.len()).map(|_| pick()).collect()))
        .collect();
    medians.sort_by(f64::total_cmp);
    Some((
        medians[RESAMPLES / 40],
        medians[RESAMPLES - 1 - RESAMPLES / 40],
    ))
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    crate::setup::setup()?;
    let (mem, runs) = if args.quick {
        ("16MiB".to_owned(), 3)
    } else {
        (args.mem.clone(), args.runs.max(1))
    };
    let bins = build(false)?;
    let dir = run_dir("bench");
    eprintln!("xtask: bench folder {}", dir.display());
    let mut cluster = Cluster::start(bins, dir.clone(), &[1], "2GiB")?;
    let pin = args.pin_cpu.map(|c| c.to_string());

    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| args.only.as_deref().is_none_or(|o| c.name.contains(o)))
        .collect();
    // Rounds, not case after case: run i of every case happens close together in time, so
    // the machine's drift (other work, CPUs idling into the hypervisor) hits every case
    // alike, and the eBPF overhead can be taken run by run against its neighbour.
    let mut per_case: Vec<Vec<RunSummary>> = vec![Vec::new(); cases.len()];
    for round in 0..runs {
        eprintln!("xtask: bench round {}/{runs}", round + 1);
        // Every other round in reverse, so that no case always runs right after another.
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            per_case[i].push(run_case(&mut cluster, cases[i], &mem, pin.as_deref())?);
        }
    }

    println!(
        "{:<18} {:>8} {:>5} {:>10} {:>9} {:>9} {:>9}",
        "case", "pages", "runs", "µs/page", "p50 µs", "p90 µs", "p99 µs"
    );
    let mut results = Vec::new();
    for (case, per_run) in cases.iter().zip(&per_case) {
        let get = |f: fn(&RunSummary) -> f64| median(per_run.iter().map(f).collect());
        let (us_per_page, p50, p90, p99) = (
            get(|s| s.us_per_page),
            get(|s| s.fault_p50_us),
            get(|s| s.fault_p90_us),
            get(|s| s.fault_p99_us),
        );
        let pages = per_run[0].pages_done();
        let row = json!({
            "name": case.name,
            "pages": pages,
            "runs": runs,
            "us_per_page": us_per_page,
            "fault_p50_us": p50,
            "fault_p90_us": p90,
            "fault_p99_us": p99,
            "us_per_page_each_run": per_run.iter().map(|s| s.us_per_page).collect::<Vec<_>>(),
            "ebpf_last_run": per_run.last().and_then(|s| s.ebpf),
        });
        println!(
            "{:<18} {:>8} {:>5} {:>10.2} {:>9.1} {:>9.1} {:>9.1}",
            case.name, pages, runs, us_per_page, p50, p90, p99
        );
        results.push(row);
    }
    let overhead = ebpf_overhead(&cases, &per_case);
    if let Some(o) = &overhead {
        let ci = match o["ci95_pct"].as_array().map(Vec::as_slice) {
            Some([lo, hi]) => format!(
                "95% CI {:+.1}..{:+.1}; ",
                lo.as_f64().unwrap_or(0.0),
                hi.as_f64().unwrap_or(0.0)
            ),
            _ => String::new(),
        };
        println!(
            "eBPF overhead on remote-random: median of {} paired runs {:+.1}% ({ci}per pair: {})",
            runs,
            o["median_pct"].as_f64().unwrap_or(0.0),
            o["per_pair_pct"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{:+.1}", v.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    cluster.stop()?;
    let out = json!({
        "cases": results,
        "mem": mem,
        "pin_cpu": args.pin_cpu,
        "ebpf_overhead": overhead,
    });
    if let Some(path) = &args.json {
        write_json(path, &out)?;
    }
    Ok(())
}

/// One run of `case`: a fresh compute node; its `--json` summary.
fn run_case(
    cluster: &mut Cluster,
    case: &Case,
    mem: &str,
    pin: Option<&str>,
) -> anyhow::Result<RunSummary> {
    let mut a: Vec<&str> = vec!["--mem", mem];
    a.extend_from_slice(case.args);
    if case.remote {
        a.extend_from_slice(&["--placement", "interleave", "--content", "pattern"]);
    }
    if let Some(p) = pin {
        a.extend_from_slice(&["--pin-cpu", p]);
    }
    let (status, summary, proc) = cluster.run_compute(&a, Duration::from_secs(600))?;
    if !status.success() || !summary.ok {
        bail!(
            "{} run failed ({status}); its log:\n{}",
            case.name,
            proc.log_tail()
        );
    }
    Ok(summary)
}

/// The probes' cost on `remote-random`, pair by pair: run i with probes against run i
/// without, taken within the same round. `None` unless both cases ran.
fn ebpf_overhead(cases: &[&Case], per_case: &[Vec<RunSummary>]) -> Option<Value> {
    let find = |name: &str| cases.iter().position(|c| c.name == name);
    let (plain, probed) = (find("remote-random")?, find("remote-random-ebpf")?);
    let pct: Vec<f64> = per_case[plain]
        .iter()
        .zip(&per_case[probed])
        .filter_map(|(a, b)| {
            let (a, b) = (a.us_per_page, b.us_per_page);
            (a > 0.0).then(|| (b / a - 1.0) * 100.0)
        })
        .collect();
    Some(json!({
        "median_pct": median(pct.clone()),
        "ci95_pct": median_ci95(&pct).map(|(lo, hi)| [lo, hi]),
        "per_pair_pct": pct,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_holds_the_median_and_narrows_with_more_pairs() {
        assert_eq!(median_ci95(&[]), None);
        assert_eq!(median_ci95(&[3.0]), None);
        assert_eq!(median_ci95(&[2.0; 10]), Some((2.0, 2.0)));
        // Pairs as noisy as this machine's: a spread of about ±10 points around +5.
        let noisy = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| 5.0 + ((i * 37 % 21) as f64 - 10.0))
                .collect()
        };
        let (lo10, hi10) = median_ci95(&noisy(10)).unwrap();
        let (lo200, hi200) = median_ci95(&noisy(200)).unwrap();
        for (lo, hi, v) in [(lo10, hi10, noisy(10)), (lo200, hi200, noisy(200))] {
            let m = median(v);
            assert!(lo <= m && m <= hi, "{lo} <= {m} <= {hi}");
        }
        assert!(
            hi200 - lo200 < hi10 - lo10,
            "{lo200}..{hi200} vs {lo10}..{hi10}"
        );
        // The same values give the same interval.
        assert_eq!(median_ci95(&noisy(30)), median_ci95(&noisy(30)));
    }
}
