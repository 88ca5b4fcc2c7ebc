//! `cargo xtask soak`: the cluster under continuous load for N minutes, a memory node
//! restarted every few minutes, every process's RSS and open descriptors at warm-up and at
//! the end ([`pagemesh_tests::soak`] does the work; the suite runs it for a minute).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::run::{build, relative, run_dir, write_json};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Minutes of load.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between two memory-node restarts (each node in turn).
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    restart_every: u64,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// RSS growth from warm-up to the end above which a process is called not flat.
const FLAT: f64 = 0.05;

pub fn soak(args: SoakArgs) -> anyhow::Result<()> {
    crate::setup::setup()?;
    if args.minutes.is_nan() || args.minutes <= 0.0 || args.restart_every == 0 {
        bail!("--minutes and --restart-every must be positive");
    }
    let bins = build(false)?;
    let dir = run_dir("soak");
    eprintln!("xtask: soak folder {}", relative(&dir));
    let plan = pagemesh_tests::soak::SoakPlan {
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        restart_every: Duration::from_secs(args.restart_every),
        mem: "64MiB".into(),
        budget: "16MiB".into(),
    };
    let report = pagemesh_tests::soak::run(bins, dir, &plan)?;
    print!("{}", report.table());
    let grew: Vec<&str> = report
        .processes
        .iter()
        .filter(|p| p.rss_growth() > FLAT || p.fd_growth() > 0)
        .map(|p| p.name.as_str())
        .collect();
    if grew.is_empty() {
        println!(
            "flat: every process within {:.0}% RSS and no descriptor more",
            FLAT * 100.0
        );
    } else {
        println!("NOT flat: {}", grew.join(", "));
    }
    if let Some(path) = &args.json {
        write_json(path, &report.to_json())?;
    }
    if !report.failures.is_empty() || report.bad_pages > 0 {
        bail!(
            "{} runs failed, {} bad pages",
            report.failures.len(),
            report.bad_pages
        );
    }
    Ok(())
}
