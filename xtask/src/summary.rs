//! The JSON of `cargo xtask run --json FILE`: every guest run's own summary (the compute
//! node's [`RunSummary`]) and totals that are sums over those runs, so that every top-level
//! figure covers the same runs. Figures that do not add up (fault percentiles, the eBPF
//! probes' medians, µs per page) are only in the runs.

use pagemesh_api::summary::{FaultCounts, RunSummary};
use serde::{Deserialize, Serialize};

/// What `cargo xtask run --json FILE` writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClusterRunSummary {
    /// Nodes in the cluster: the memory nodes and the compute node.
    pub nodes: u32,
    /// Pages of guest RAM, summed over the runs' VMs (each run defines a fresh VM).
    pub guest_pages: u64,
    /// Pages the guests visited, summed over the runs.
    pub pages_done: u64,
    /// Pages whose content differed from the pattern, summed over the runs.
    pub bad_pages: u64,
    /// Faults served, by kind, summed over the runs.
    pub faults: FaultCounts,
    /// remote / (remote + local_zero) of the summed faults; 0 when there were none.
    pub remote_miss_ratio: f64,
    /// Bytes fetched from memory nodes, summed over the runs.
    pub bytes_fetched: u64,
    /// Guest wall time, summed over the runs, seconds.
    pub elapsed_s: f64,
    /// Every run, in the order they ran.
    pub runs: Vec<NamedRun>,
    /// The folder with every process's log.
    pub run_dir: String,
    /// Whether every run exited cleanly and its guest saw exactly the memory it should have
    /// (false without runs).
    pub ok: bool,
}

/// One guest run of `cargo xtask run`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NamedRun {
    /// The workload (`verify`, `random-rmw`, `linux`).
    pub name: String,
    /// Whether its compute node exited 0 (or, for a node held up for the console, had not
    /// failed when its summary was read).
    pub exit_ok: bool,
    /// What the compute node wrote with `--json`.
    pub summary: RunSummary,
}

impl ClusterRunSummary {
    /// The totals of `runs` on a cluster of `nodes` nodes, whose logs are in `run_dir`.
    pub fn new(nodes: u32, run_dir: String, runs: Vec<NamedRun>) -> Self {
        let sum = |f: fn(&RunSummary) -> u64| runs.iter().map(|r| f(&r.summary)).sum::<u64>();
        let mut faults = FaultCounts::default();
        for r in &runs {
            faults += r.summary.faults;
        }
        let served = faults.remote + faults.local_zero;
        Self {
            nodes,
            guest_pages: sum(|s| s.guest_pages),
            pages_done: sum(RunSummary::pages_done),
            bad_pages: sum(RunSummary::bad_pages),
            faults,
            remote_miss_ratio: if served == 0 {
                0.0
            } else {
                faults.remote as f64 / served as f64
            },
            bytes_fetched: sum(|s| s.bytes_fetched),
            elapsed_s: runs.iter().map(|r| r.summary.elapsed_s).sum(),
            ok: !runs.is_empty() && runs.iter().all(|r| r.exit_ok && r.summary.ok),
            runs,
            run_dir,
        }
    }

    /// The run named `name`.
    pub fn run(&self, name: &str) -> Option<&RunSummary> {
        self.runs
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.summary)
    }

    /// The summary for people, as `cargo xtask run` prints it (README.md shows one).
    pub fn text(&self) -> String {
        use std::fmt::Write;

        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "pagemesh local cluster: coordinator + {} memory nodes + 1 compute node",
            self.nodes.saturating_sub(1)
        ));
        let mut pages = format!("  guest pages          {}", self.guest_pages);
        if let [first, rest @ ..] = self.runs.as_slice() {
            let each = first.summary.guest_pages;
            let vms = self.runs.len();
            let s = if vms == 1 { "" } else { "s" };
            if rest.iter().all(|r| r.summary.guest_pages == each) {
                let _ = write!(pages, "  ({vms} VM{s} of {each})");
            } else {
                let _ = write!(pages, "  ({vms} VM{s})");
            }
        }
        line(pages);
        line(format!(
            "  faults served remote {}  (local zero-fill {})",
            self.faults.remote, self.faults.local_zero
        ));
        line(format!(
            "  remote-miss ratio    {:.3}",
            self.remote_miss_ratio
        ));
        // Percentiles do not add up over runs: the highest of the runs' own.
        let max =
            |f: fn(&RunSummary) -> f64| self.runs.iter().map(|r| f(&r.summary)).fold(0.0, f64::max);
        line(format!(
            "  fault latency        p50 {:.1} µs  p99 {:.1} µs  (max over runs)",
            max(|s| s.fault_p50_us),
            max(|s| s.fault_p99_us)
        ));
        for r in &self.runs {
            line(format!(
                "  {:<12} {:.1} µs/page, {} pages, ok={}",
                r.name,
                r.summary.us_per_page,
                r.summary.pages_done(),
                r.exit_ok && r.summary.ok
            ));
        }
        if let Some(v) = self.run("verify") {
            line(format!(
                "  verification         {} pages checked, {} bad",
                v.pages_done(),
                v.bad_pages()
            ));
        }
        line(format!("  logs                 {}", self.run_dir));
        line(format!(
            "  result               {}",
            if self.ok { "OK" } else { "FAILED" }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use pagemesh_api::summary::{EbpfSummary, GuestResult};

    use super::*;

    fn run(name: &str, remote: u64, p50: f64, ebpf: Option<EbpfSummary>) -> NamedRun {
        NamedRun {
            name: name.into(),
            exit_ok: true,
            summary: RunSummary {
                vm: Some(1),
                guest_pages: 65536,
                faults: FaultCounts {
                    remote,
                    local_zero: 2,
                    spurious: 1,
                    errors: 0,
                },
                fault_p50_us: p50,
                fault_p99_us: p50 * 2.0,
                bytes_fetched: remote * 4096,
                us_per_page: 60.0,
                elapsed_s: 4.0,
                result: Some(GuestResult {
                    pages_done: 65536,
                    checksum: 7,
                    first_bad_page: None,
                    bad_pages: 0,
                }),
                ebpf,
                ok: true,
                ..RunSummary::default()
            },
        }
    }

    fn cluster() -> ClusterRunSummary {
        let ebpf = EbpfSummary {
            faults: 65538,
            stall_p50_us: 40.0,
            ..EbpfSummary::default()
        };
        ClusterRunSummary::new(
            3,
            "/tmp/run".into(),
            vec![
                run("verify", 65534, 31.0, None),
                run("random-rmw", 65534, 35.0, Some(ebpf)),
            ],
        )
    }

    #[test]
    fn totals_are_sums_over_the_runs() {
        let c = cluster();
        assert_eq!(c.guest_pages, 2 * 65536);
        assert_eq!(c.pages_done, 2 * 65536);
        assert_eq!(c.bad_pages, 0);
        assert_eq!(
            c.faults,
            FaultCounts {
                remote: 2 * 65534,
                local_zero: 4,
                spurious: 2,
                errors: 0
            }
        );
        assert_eq!(c.bytes_fetched, 2 * 65534 * 4096);
        assert_eq!(c.elapsed_s, 8.0);
        assert!((c.remote_miss_ratio - 65534.0 / 65536.0).abs() < 1e-12);
        assert!(c.ok);

        // A failed run fails the whole, and so does a node that exited non-zero.
        let mut bad = cluster().runs;
        bad[0].summary = RunSummary::failed(0, Some(1), "cannot fetch page 3 from node 2".into());
        let c = ClusterRunSummary::new(3, String::new(), bad);
        assert!(!c.ok);
        assert_eq!(c.faults.remote, 65534);
        let mut bad = cluster().runs;
        bad[1].exit_ok = false;
        assert!(!ClusterRunSummary::new(3, String::new(), bad).ok);
        assert!(!ClusterRunSummary::new(3, String::new(), Vec::new()).ok);
    }

    #[test]
    fn per_run_figures_are_only_in_the_runs() {
        let v = serde_json::to_value(cluster()).unwrap();
        for key in [
            "ebpf",
            "fault_p50_us",
            "fault_p99_us",
            "us_per_page",
            "verify",
        ] {
            assert!(v.get(key).is_none(), "top-level {key}: {v:#}");
        }
        assert_eq!(v["runs"][1]["summary"]["ebpf"]["faults"], 65538);
        assert_eq!(v["runs"][0]["summary"]["fault_p50_us"], 31.0);
        let back: ClusterRunSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, cluster());
    }

    #[test]
    fn the_text_keeps_its_shape() {
        let text = cluster().text();
        let expected = "\
pagemesh local cluster: coordinator + 2 memory nodes + 1 compute node
  guest pages          131072  (2 VMs of 65536)
  faults served remote 131068  (local zero-fill 4)
  remote-miss ratio    1.000
  fault latency        p50 35.0 µs  p99 70.0 µs  (max over runs)
  verify       60.0 µs/page, 65536 pages, ok=true
  random-rmw   60.0 µs/page, 65536 pages, ok=true
  verification         65536 pages checked, 0 bad
  logs                 /tmp/run
  result               OK
";
        assert_eq!(text, expected);
    }
}
