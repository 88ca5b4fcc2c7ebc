//! The `remote-random-r2-repair` cases: demand faults while the memory nodes repair.
//!
//! Each round has a cluster of its own: a coordinator with 2 s leases and memory nodes 1, 2
//! and 3. A *bystander* VM with two copies of each page over all three (16× the measured
//! guest's memory) is defined and loaded, read a little through a budget (so that none of
//! its pages is claimed), and stays (`--keep-vm`). The measured guest
//! (`remote-random` with `--replicas 2`) is placed on nodes 1 and 2 only, so that it never
//! fetches from node 3. It runs twice: once with nothing else going on (the reference), and
//! once right after node 3 was SIGKILLed and its lease ran out, while nodes 1 and 2 copy
//! the bystander's pages node 3 held. Every other round the repair run comes first (and
//! the reference waits for the repair to end). What is compared is the median latency of
//! the faults the pager fetched (`remote_p50_us`), run against run within a round.
//! `remote-random-r2-repair-paced` is the same with the memory nodes' `--repair-rate`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagemesh_api::summary::RunSummary;
use pagemesh_api::{Vm, VmId};
use pagemesh_tests::{Bins, Cluster, Coordinator, MemoryNode, http_get};
use serde::Serialize;

/// Lease of the round's cluster: node 3 is retired this long after its death.
const LEASE_SECS: &str = "2";

/// What one round measured.
pub(super) struct Round {
    /// The measured guest with no repair going on.
    pub without: RunSummary,
    /// The measured guest while the repair ran.
    pub during: RunSummary,
    /// What the repair did.
    pub repair: RepairSeen,
}

/// The repair of one round, as seen from outside.
#[derive(Serialize, Clone, Copy, Debug)]
pub(super) struct RepairSeen {
    /// Pages of the bystander VM that needed a new copy (the survivors' reports).
    pub pages: u64,
    /// From node 3's retirement to the survivors' last report, seconds.
    pub seconds: f64,
    /// Whether the repair was still going when the measured guest ended: the whole run
    /// overlapped it.
    pub covered_the_run: bool,
}

/// One round: a fresh cluster in `dir` (its memory nodes given `memory_args`), the
/// reference and the repair run of the guest whose arguments are `measured` (in the order
/// `repair_first` says), and the cluster stopped.
pub(super) fn round(
    bins: &Bins,
    dir: &Path,
    memory_args: &[&str],
    measured: &[&str],
    mem_mib: u64,
    repair_first: bool,
) -> anyhow::Result<Round> {
    std::fs::create_dir_all(dir)?;
    let coordinator =
        Coordinator::start_with(bins, dir, &["--lease-secs".as_ref(), LEASE_SECS.as_ref()])?;
    let url = coordinator.url.clone();
    let memory_args: Vec<String> = memory_args.iter().map(|a| a.to_string()).collect();
    let memory = [1, 2, 3]
        .into_iter()
        .map(|id| {
            let listen = "127.0.0.1:0";
            MemoryNode::start_with(bins, dir, &url, id, "8GiB", listen, None, &memory_args)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cluster = Cluster::from_parts(bins.clone(), dir.to_owned(), coordinator, memory);
    let result = measure(&mut cluster, measured, mem_mib, repair_first);
    cluster.stop()?;
    result.with_context(|| format!("the repair round's logs are in {}", dir.display()))
}

fn measure(
    cluster: &mut Cluster,
    measured: &[&str],
    mem_mib: u64,
    repair_first: bool,
) -> anyhow::Result<Round> {
    let bystander_mem = format!("{}MiB", mem_mib * 16);
    let (status, summary, proc) = cluster.run_compute(
        &[
            "--mem",
            &bystander_mem,
            "--replicas",
            "2",
            "--memory-nodes",
            "1,2,3",
            // A few reads, through a budget: a guest without one claims the pages it
            // reads (their homes let them go), and the bystander's must all stay there.
            "--workload",
            "hotset:1:100",
            "--accesses",
            "64",
            "--local-memory",
            "16MiB",
            "--no-ebpf",
            "--keep-vm",
        ],
        Duration::from_secs(600),
    )?;
    if !status.success() || !summary.ok {
        bail!(
            "the bystander VM's run failed ({status}):\n{}",
            proc.log_tail()
        );
    }
    let bystander = summary.vm.context("the bystander run has no VM")?;
    let without = match repair_first {
        true => None,
        false => Some(run(cluster, measured, "reference")?),
    };
    let retired = kill_node_3(cluster, bystander)?;
    let during = run(cluster, measured, "repair")?;
    let covered_the_run = !vm(cluster, bystander)?.repaired();
    let repair = repaired(cluster, bystander, retired, covered_the_run)?;
    let without = match without {
        Some(w) => w,
        None => run(cluster, measured, "reference")?,
    };
    Ok(Round {
        without,
        during,
        repair,
    })
}

/// One run of the measured guest.
fn run(cluster: &mut Cluster, measured: &[&str], what: &str) -> anyhow::Result<RunSummary> {
    let (status, summary, proc) = cluster.run_compute(measured, Duration::from_secs(600))?;
    if !status.success() || !summary.ok {
        bail!("the {what} run failed ({status}):\n{}", proc.log_tail());
    }
    Ok(summary)
}

fn vm(cluster: &Cluster, id: VmId) -> anyhow::Result<Vm> {
    let body = http_get(&format!("{}/vms/{id}", cluster.coordinator.url))?;
    serde_json::from_str(&body).with_context(|| format!("GET /vms/{id}: {body}"))
}

/// SIGKILLs memory node 3 and waits until the coordinator has retired it from `bystander`;
/// the moment it saw that.
fn kill_node_3(cluster: &mut Cluster, bystander: VmId) -> anyhow::Result<Instant> {
    cluster.memory[2].proc.kill();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !vm(cluster, bystander)?.retired.is_empty() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("node 3 was not retired from VM {bystander} within 60 s of its death");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `bystander` is repaired; what the repair did.
fn repaired(
    cluster: &Cluster,
    bystander: VmId,
    retired: Instant,
    covered_the_run: bool,
) -> anyhow::Result<RepairSeen> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let vm = vm(cluster, bystander)?;
        if vm.repaired() {
            return Ok(RepairSeen {
                pages: vm.repairs.iter().map(|r| r.needed).sum(),
                seconds: retired.elapsed().as_secs_f64(),
                covered_the_run,
            });
        }
        if Instant::now() > deadline {
            bail!("VM {bystander} was not repaired within 600 s: {vm:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
