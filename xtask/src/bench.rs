//! `cargo xtask bench`: fault latency, from the kernel's demand-zero floor to remote
//! random faults over TCP.
//!
//! Every case runs the same guest code (the built-in workload guest) in a fresh
//! `pagemesh-node` process, one VM per run. µs/page is guest wall time divided by pages;
//! the fault percentiles are the pager's own (event read → page installed). Each figure is
//! the median over runs.
//!
//! With `--baseline-bin DIR` a second cluster runs from another build's binaries, every case
//! runs on both clusters in every round, and the bench reports the paired change of this
//! build against that one ([`PairedChange`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use pagemesh_api::summary::RunSummary;
use pagemesh_tests::{Bins, Cluster};
use serde::Serialize;
use serde_json::{Value, json};

use crate::run::{build, run_dir, write_json};

mod link;
mod repair;

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
    /// Only the cases whose name contains this (several, comma-separated: any of them;
    /// `=NAME` for that case alone, e.g. `=remote-random`).
    #[arg(long)]
    only: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also run every case on a second cluster started from the `pagemesh-coordinator` and
    /// `pagemesh-node` in this folder (another build, in the release profile: e.g.
    /// `target/release` of a worktree of the commit before a change), in the same rounds,
    /// and report this build's paired change against it.
    #[arg(long, value_name = "DIR")]
    baseline_bin: Option<PathBuf>,
    /// Run the memory image cases over the Linux guest's boot image (its kernel and
    /// initramfs as loaded, zero pages elsewhere) rather than its RAM once booted to
    /// `Memory:`, which takes minutes to make the first time.
    #[arg(long)]
    boot_image: bool,
    /// Draw the cases into this SVG file: each case's fault-latency CDF (the pager's,
    /// median over runs at each percentile) beside its µs/page (page cache cases left out).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    remote: bool,
    /// On the TLS cluster (a memory node with `--tls-cert ...`), with a certificate of its CA.
    tls: bool,
    /// Each run is two: one with `--record-working-set`, then the measured one replaying
    /// what it recorded (`--replay-working-set`).
    replay: bool,
    /// A page cache case: its own VM size and budget, and the reference policies beside it.
    tier: Option<Tier>,
    /// Measured during a repair and without one, each round on a cluster of its own
    /// ([`repair`]) whose memory nodes get these arguments.
    repair: Option<&'static [&'static str]>,
    /// On a cluster whose memory node is behind a link of this many bits a second
    /// ([`link`]).
    link: Option<u64>,
    /// Over the Linux guest's memory image ([`link::IMAGE`]) rather than the test pattern.
    image: bool,
    /// On a cluster whose memory node serves one-sided reads (`--transport rdma-emulated`:
    /// no device here, so the reads are emulated, docs/rdma.md).
    rdma: bool,
}

impl Case {
    /// Whether it runs on the cluster of two memory nodes (it sets `--replicas`).
    fn replicated(&self) -> bool {
        self.args.contains(&"--replicas") && self.repair.is_none()
    }

    /// A case over a rate-limited link, `remote-random` with `--compress`.
    const fn linked(
        name: &'static str,
        args: &'static [&'static str],
        bits_per_s: u64,
        image: bool,
    ) -> Case {
        Case {
            name,
            args,
            link: Some(bits_per_s),
            image,
            ..REMOTE
        }
    }
}

/// A page cache case (`tier-*`): the VM, its budget and the access sequence it replays.
#[derive(Clone, Copy)]
struct Tier {
    /// `--local-memory` as a percentage of the VM; `None`: no budget (the reference).
    budget_pct: Option<u64>,
    /// The workload's order, which [`tier_trace`] replays for LRU, FIFO and MIN.
    workload: &'static str,
}

/// The repair cases' measured guest: `remote-random` with two copies, on the two memory
/// nodes that survive.
const REPAIR_GUEST: &[&str] = &[
    "--workload",
    "random",
    "--access",
    "read",
    "--no-ebpf",
    "--replicas",
    "2",
    "--memory-nodes",
    "1,2",
];

/// A gigabit a second.
const GBIT: u64 = 1_000_000_000;

/// Guest memory of the page cache cases (at least 256 MiB, as the issue asks).
const TIER_MEM_MIB: u64 = 256;
/// Accesses per page of the skewed page cache cases.
const TIER_ACCESSES_PER_PAGE: u64 = 4;

/// What a case is unless it says otherwise: over the test pattern from the main cluster's
/// memory node, this build only where the baseline may not follow.
const REMOTE: Case = Case {
    name: "",
    args: &[],
    remote: true,
    tls: false,
    replay: false,
    tier: None,
    repair: None,
    link: None,
    image: false,
    rdma: false,
};

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
        ..REMOTE
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
        ..REMOTE
    },
    Case {
        name: "remote-seq",
        args: &["--workload", "seq", "--access", "read", "--no-ebpf"],
        ..REMOTE
    },
    Case {
        name: "remote-random",
        args: &["--workload", "random", "--access", "read", "--no-ebpf"],
        ..REMOTE
    },
    // The same with the eBPF probes attached: their overhead is the difference.
    Case {
        name: "remote-random-ebpf",
        args: &["--workload", "random", "--access", "read"],
        ..REMOTE
    },
    // The random-fault path, each way with the probes (the parts of its stalls) and held to
    // `remote-random-ebpf`, whose vCPU and handler share a CPU (`--pin-cpu auto`, the
    // default): both left to the scheduler; the handler on the other CPU, sleeping and
    // polling; the vCPU woken after the fault's bookkeeping; two handlers for one vCPU.
    // `uffd-local-unpinned` is `uffd-local` left to the scheduler.
    Case {
        name: "uffd-local-unpinned",
        args: &[
            "--backing",
            "uffd-local",
            "--workload",
            "random",
            "--access",
            "read",
            "--pin-cpu",
            "none",
        ],
        remote: false,
        ..REMOTE
    },
    Case {
        name: "remote-random-unpinned",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--pin-cpu",
            "none",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-handler-other",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--pin-cpu",
            "0",
            "--handler-cpu",
            "1",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-poll",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--pin-cpu",
            "0",
            "--handler-cpu",
            "1",
            "--fault-poll-us",
            "100",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-wake-separately",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--wake-separately",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-2handlers",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--fault-handlers",
            "2",
        ],
        ..REMOTE
    },
    // RDMA's data path with its one-sided reads emulated (this host has no device): held to
    // `remote-random` and `remote-seq`, what pages cost when the memory node takes no part
    // in a fetch.
    Case {
        name: "remote-random-rdma-emulated",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--transport",
            "rdma-emulated",
        ],
        rdma: true,
        ..REMOTE
    },
    // The same with the probes: where its stalls' time goes.
    Case {
        name: "remote-random-rdma-emulated-ebpf",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--transport",
            "rdma-emulated",
        ],
        rdma: true,
        ..REMOTE
    },
    Case {
        name: "remote-seq-rdma-emulated",
        args: &[
            "--workload",
            "seq",
            "--access",
            "read",
            "--no-ebpf",
            "--transport",
            "rdma-emulated",
        ],
        rdma: true,
        ..REMOTE
    },
    // Prefetch (--prefetch): a sequential and a stride-4 scan, held to the kernel's own
    // first touch of local memory, and random access, held to `remote-random` (prefetch
    // must never hurt).
    Case {
        name: "remote-seq-prefetch",
        args: &[
            "--workload",
            "seq",
            "--access",
            "read",
            "--no-ebpf",
            "--prefetch",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-stride-prefetch",
        args: &[
            "--workload",
            "stride:4",
            "--access",
            "read",
            "--no-ebpf",
            "--prefetch",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-prefetch",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--prefetch",
        ],
        ..REMOTE
    },
    // Two vCPUs, each over half the pages, with a fault handler each and with one for both:
    // how much serving faults at once gives.
    Case {
        name: "remote-random-2vcpu",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--vcpus",
            "2",
        ],
        ..REMOTE
    },
    Case {
        name: "remote-random-2vcpu-1handler",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--vcpus",
            "2",
            "--fault-handlers",
            "1",
        ],
        ..REMOTE
    },
    // Guest RAM in 2 MiB huge pages: a sequential scan takes one fault per 512 pages.
    Case {
        name: "remote-seq-2m",
        args: &[
            "--workload",
            "seq",
            "--access",
            "read",
            "--no-ebpf",
            "--huge-pages",
        ],
        ..REMOTE
    },
    // A sequential stream interleaved with random demand faults (`mixed`), without and
    // with prefetch: the demand faults' p50 while prefetch streams run against without.
    Case {
        name: "remote-mixed",
        args: &["--workload", "mixed", "--access", "read", "--no-ebpf"],
        ..REMOTE
    },
    Case {
        name: "remote-mixed-prefetch",
        args: &[
            "--workload",
            "mixed",
            "--access",
            "read",
            "--no-ebpf",
            "--prefetch",
        ],
        ..REMOTE
    },
    // Record and replay: a random scan records its working set, the next run replays it
    // from the start (the seed makes it the same VM).
    Case {
        name: "replay",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--seed",
            "7",
        ],
        replay: true,
        ..REMOTE
    },
    // Two copies of every page (`--replicas`: on a cluster of two memory nodes of its own):
    // a fetch still goes to one home, so reads should cost what they cost with one; each
    // write-back goes to both, which the write-through-a-budget pair measures, both on the
    // two-node cluster.
    Case {
        name: "remote-random-r2",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--replicas",
            "2",
        ],
        ..REMOTE
    },
    Case {
        name: "writeback-r1",
        args: &[
            "--workload",
            "seq",
            "--access",
            "write",
            "--no-ebpf",
            "--local-memory",
            "16MiB",
            "--replicas",
            "1",
        ],
        ..REMOTE
    },
    Case {
        name: "writeback-r2",
        args: &[
            "--workload",
            "seq",
            "--access",
            "write",
            "--no-ebpf",
            "--local-memory",
            "16MiB",
            "--replicas",
            "2",
        ],
        ..REMOTE
    },
    // `remote-random-r2` while the memory nodes repair another VM's copies after a memory
    // node's death, and without a repair, in one round on a cluster of its own: the
    // demand-fault p50 during a repair against without.
    Case {
        name: "remote-random-r2-repair",
        args: REPAIR_GUEST,
        repair: Some(&[]),
        ..REMOTE
    },
    // The same with the repair paced (`--repair-rate` on the memory nodes).
    Case {
        name: "remote-random-r2-repair-paced",
        args: REPAIR_GUEST,
        repair: Some(&["--repair-rate", "32MiB"]),
        ..REMOTE
    },
    // Packed runs (`--compress`), over a link limited to 1 and 10 Gbit/s: the Linux boot
    // image (zero pages, a compressed kernel, an initramfs) read at random plain, packed, and
    // as `auto` chooses, and in order streamed ahead (`--prefetch`, where the wire is what
    // a page waits for) plain and packed; the pattern (which does not shrink) plain and
    // `auto`; and on loopback, `remote-random` (whose `--compress` is `auto`) against it with
    // packing off.
    Case::linked(
        "remote-random-1g",
        &["--workload", "random", "--no-ebpf", "--compress", "off"],
        GBIT,
        true,
    ),
    Case::linked(
        "remote-random-1g-lz4",
        &["--workload", "random", "--no-ebpf", "--compress", "on"],
        GBIT,
        true,
    ),
    Case::linked(
        "remote-random-1g-auto",
        &["--workload", "random", "--no-ebpf", "--compress", "auto"],
        GBIT,
        true,
    ),
    Case::linked(
        "remote-seq-1g",
        &[
            "--workload",
            "seq",
            "--no-ebpf",
            "--prefetch",
            "--compress",
            "off",
        ],
        GBIT,
        true,
    ),
    Case::linked(
        "remote-seq-1g-lz4",
        &[
            "--workload",
            "seq",
            "--no-ebpf",
            "--prefetch",
            "--compress",
            "on",
        ],
        GBIT,
        true,
    ),
    Case::linked(
        "remote-random-1g-pattern",
        &["--workload", "random", "--no-ebpf", "--compress", "off"],
        GBIT,
        false,
    ),
    Case::linked(
        "remote-random-1g-pattern-auto",
        &["--workload", "random", "--no-ebpf", "--compress", "auto"],
        GBIT,
        false,
    ),
    Case::linked(
        "remote-random-10g",
        &["--workload", "random", "--no-ebpf", "--compress", "off"],
        10 * GBIT,
        true,
    ),
    Case::linked(
        "remote-random-10g-lz4",
        &["--workload", "random", "--no-ebpf", "--compress", "on"],
        10 * GBIT,
        true,
    ),
    Case {
        name: "remote-random-nocompress",
        args: &[
            "--workload",
            "random",
            "--access",
            "read",
            "--no-ebpf",
            "--compress",
            "off",
        ],
        ..REMOTE
    },
    // `remote-random` with page traffic over TLS (its own cluster): TLS's cost is the
    // difference.
    Case {
        name: "remote-random-tls",
        args: &["--workload", "random", "--access", "read", "--no-ebpf"],
        tls: true,
        ..REMOTE
    },
    // The page cache (--local-memory): a skewed read-modify-write through half and a quarter
    // of the VM, a hot set read through half, a sequential write through half; and the skewed
    // one without a budget, whose fault latency the others are held to.
    Case {
        name: "tier-zipf-unlimited",
        args: &["--workload", "zipf:0.99", "--access", "rmw", "--no-ebpf"],
        tier: Some(Tier {
            budget_pct: None,
            workload: "zipf:0.99",
        }),
        ..REMOTE
    },
    Case {
        name: "tier-zipf-50",
        args: &["--workload", "zipf:0.99", "--access", "rmw", "--no-ebpf"],
        tier: Some(Tier {
            budget_pct: Some(50),
            workload: "zipf:0.99",
        }),
        ..REMOTE
    },
    Case {
        name: "tier-zipf-25",
        args: &["--workload", "zipf:0.99", "--access", "rmw", "--no-ebpf"],
        tier: Some(Tier {
            budget_pct: Some(25),
            workload: "zipf:0.99",
        }),
        ..REMOTE
    },
    Case {
        name: "tier-hotset-50",
        args: &[
            "--workload",
            "hotset:20:80",
            "--access",
            "read",
            "--no-ebpf",
        ],
        tier: Some(Tier {
            budget_pct: Some(50),
            workload: "hotset:20:80",
        }),
        ..REMOTE
    },
    Case {
        name: "tier-seq-50",
        args: &["--workload", "seq", "--access", "write", "--no-ebpf"],
        tier: Some(Tier {
            budget_pct: Some(50),
            workload: "seq",
        }),
        ..REMOTE
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
    // Checked before the build, which takes minutes.
    let baseline_bins = args
        .baseline_bin
        .as_deref()
        .map(check_baseline)
        .transpose()?;
    let bins = build(false)?;
    let dir = run_dir("bench");
    eprintln!("xtask: bench folder {}", dir.display());
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| {
            args.only.as_deref().is_none_or(|o| {
                o.split(',').any(|o| match o.strip_prefix('=') {
                    Some(exact) => c.name == exact,
                    None => c.name.contains(o),
                })
            })
        })
        .collect();
    // The huge-page cases' RAM, from the host's hugetlb pool while the bench runs.
    let _pool = match cases.iter().any(|c| c.args.contains(&"--huge-pages")) {
        true => {
            let pages = parse_mib(&mem)?.div_ceil(2) + 8;
            Some(
                pagemesh_vmm::memory::HugePool::reserve(pages)
                    .context("the 2 MiB cases need huge pages (and root to reserve them)")?,
            )
        }
        false => None,
    };
    let mut cluster = Cluster::start(bins.clone(), dir.clone(), &[1], "2GiB")?;
    // The TLS cases' cluster: a CA of its own, certificates for its memory node and for the
    // compute nodes.
    let mut tls = match cases.iter().any(|c| c.tls) {
        false => None,
        true => {
            let tls_dir = dir.join("tls");
            std::fs::create_dir_all(&tls_dir)?;
            let ca = pagemesh_tests::pki::Ca::new(&tls_dir, "bench-ca")?;
            let memory = ca.node(&tls_dir, "node1", None)?;
            let compute = ca.node(&tls_dir, "node0", None)?;
            let c = Cluster::start_with(bins.clone(), tls_dir, &[1], "2GiB", &memory.args())?;
            Some((c, compute.args()))
        }
    };
    // The replica cases' cluster: two memory nodes.
    let mut replicated = match cases.iter().any(|c| c.replicated()) {
        false => None,
        true => {
            let dir = dir.join("replicated");
            std::fs::create_dir_all(&dir)?;
            Some(Cluster::start(bins.clone(), dir, &[1, 2], "2GiB")?)
        }
    };
    // The RDMA cases' cluster: a memory node serving emulated one-sided reads.
    let mut rdma = match cases.iter().any(|c| c.rdma) {
        false => None,
        true => {
            let dir = dir.join("rdma");
            std::fs::create_dir_all(&dir)?;
            let args = ["--transport".to_owned(), "rdma-emulated".to_owned()];
            Some(Cluster::start_with(bins.clone(), dir, &[1], "2GiB", &args)?)
        }
    };
    // The rate-limited cases' clusters, one per rate, each with the memory image.
    let mut rates: Vec<u64> = cases.iter().filter_map(|c| c.link).collect();
    rates.sort_unstable();
    rates.dedup();
    let image = match rates.is_empty() {
        true => None,
        false if args.boot_image => Some(link::linux_boot_image(parse_mib(&mem)? << 20)?),
        false => Some(link::linux_ram_image(&bins, &dir, parse_mib(&mem)? << 20)?),
    };
    let mut links = Vec::new();
    for &rate in &rates {
        let (bytes, _) = image.as_ref().context("the image is built")?;
        let d = dir.join(format!("link-{}m", rate / 1_000_000));
        links.push((rate, link::start(&bins, &d, rate, bytes)?));
    }
    if let Some((_, m)) = &image {
        eprintln!(
            "xtask: memory image: {} pages, {} zero, {} compressible ({:.1}% of their bytes \
             packed), {} that do not shrink",
            m.pages,
            m.zero,
            m.compressible,
            m.compressible_bytes as f64 * 100.0 / (m.compressible.max(1) * 4096) as f64,
            m.raw
        );
    }
    // The other build's own coordinator and memory node: builds with different page
    // protocols cannot talk to each other.
    let mut baseline = match baseline_bins {
        Some(bins) => {
            let mut name = dir.file_name().unwrap_or_default().to_owned();
            name.push("-baseline");
            let dir = dir.with_file_name(name);
            eprintln!("xtask: baseline folder {}", dir.display());
            Some(
                Cluster::start(bins, dir.clone(), &[1], "2GiB").with_context(|| {
                    format!(
                        "the baseline cluster did not start (logs in {})",
                        dir.display()
                    )
                })?,
            )
        }
        None => None,
    };
    let pin = args.pin_cpu.map(|c| c.to_string());

    // Rounds, not case after case: run i of every case happens close together in time, so
    // the machine's drift (other work, CPUs idling into the hypervisor) hits every case
    // alike, and the eBPF overhead can be taken run by run against its neighbour.
    let mut per_case: Vec<Vec<RunSummary>> = vec![Vec::new(); cases.len()];
    let mut baseline_per_case: Vec<Vec<RunSummary>> = vec![Vec::new(); cases.len()];
    // The recording runs of the replay cases.
    let mut recordings: Vec<Vec<RunSummary>> = vec![Vec::new(); cases.len()];
    // The repair cases' reference runs (no repair) and what each round's repair did.
    let mut repair_refs: Vec<Vec<RunSummary>> = vec![Vec::new(); cases.len()];
    let mut repairs: Vec<Vec<repair::RepairSeen>> = vec![Vec::new(); cases.len()];
    for round in 0..runs {
        eprintln!("xtask: bench round {}/{runs}", round + 1);
        // Every other round in reverse, so that no case always runs right after another.
        let mut order: Vec<usize> = (0..cases.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if let Some(memory_args) = cases[i].repair {
                // A cluster of its own each round; this build only.
                let a = case_args(cases[i], &mem, pin.as_deref(), &[]);
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let r = repair::round(
                    &bins,
                    &dir.join(format!("{}-round{}", cases[i].name, round + 1)),
                    memory_args,
                    &a,
                    parse_mib(&mem)?,
                    round % 2 == 1,
                )
                .with_context(|| format!("{} round {}", cases[i].name, round + 1))?;
                per_case[i].push(r.during);
                repair_refs[i].push(r.without);
                repairs[i].push(r.repair);
                continue;
            }
            if let Some(rate) = cases[i].link {
                let Some((_, l)) = links.iter_mut().find(|(r, _)| *r == rate) else {
                    bail!("no cluster for {}", cases[i].name);
                };
                // This build only; over the image, from the cluster's folder.
                let image_arg = l.cluster.dir.join(link::IMAGE).display().to_string();
                let extra = match cases[i].image {
                    true => vec!["--image".to_owned(), image_arg],
                    false => Vec::new(),
                };
                per_case[i].push(run_case(
                    &mut l.cluster,
                    cases[i],
                    &mem,
                    pin.as_deref(),
                    &extra,
                )?);
                continue;
            }
            if let Some((c, certs)) = tls.as_mut().filter(|_| cases[i].tls) {
                // The baseline build may not speak TLS: this build only.
                per_case[i].push(run_case(c, cases[i], &mem, pin.as_deref(), certs)?);
                continue;
            }
            if let Some(c) = rdma.as_mut().filter(|_| cases[i].rdma) {
                // The baseline build may have no RDMA path: this build only.
                let s = run_case(c, cases[i], &mem, pin.as_deref(), &[])?;
                if s.rdma.is_none_or(|r| r.rdma_pages == 0) {
                    bail!("{} read no page one-sided: {:?}", cases[i].name, s.rdma);
                }
                per_case[i].push(s);
                continue;
            }
            if let Some(c) = replicated.as_mut().filter(|_| cases[i].replicated()) {
                // The baseline build may not know --replicas: this build only.
                per_case[i].push(run_case(c, cases[i], &mem, pin.as_deref(), &[])?);
                continue;
            }
            if cases[i].replay {
                // The baseline build may not know the flags: this build only.
                let ws = dir.join("replay.ws.json");
                let run = |c: &mut Cluster, flag: &str| {
                    let extra = [flag.to_owned(), ws.display().to_string()];
                    run_case(c, cases[i], &mem, pin.as_deref(), &extra)
                };
                recordings[i].push(run(&mut cluster, "--record-working-set")?);
                per_case[i].push(run(&mut cluster, "--replay-working-set")?);
                continue;
            }
            let Some(baseline) = baseline.as_mut() else {
                per_case[i].push(run_case(&mut cluster, cases[i], &mem, pin.as_deref(), &[])?);
                continue;
            };
            // Both builds back to back, the baseline first every other round (with the
            // case order reversed too, each round is the previous one mirrored).
            let this = |c: &mut Cluster| run_case(c, cases[i], &mem, pin.as_deref(), &[]);
            let other = |c: &mut Cluster| {
                run_case(c, cases[i], &mem, pin.as_deref(), &[])
                    .with_context(|| format!("{} on the baseline build", cases[i].name))
            };
            if round % 2 == 0 {
                per_case[i].push(this(&mut cluster)?);
                baseline_per_case[i].push(other(baseline)?);
            } else {
                baseline_per_case[i].push(other(baseline)?);
                per_case[i].push(this(&mut cluster)?);
            }
        }
    }

    println!(
        "{:<18} {:>8} {:>5} {:>10} {:>9} {:>9} {:>9}",
        "case", "pages", "runs", "µs/page", "p50 µs", "p90 µs", "p99 µs"
    );
    let mut results = Vec::new();
    let mut drawn = Vec::new();
    let mut changes = Vec::new();
    let mut tiers = Vec::new();
    for (((case, per_run), baseline_runs), recorded) in cases
        .iter()
        .zip(&per_case)
        .zip(&baseline_per_case)
        .zip(&recordings)
    {
        let vs_baseline = (!baseline_runs.is_empty()).then(|| {
            let change = paired_change(&us_per_page(per_run), &us_per_page(baseline_runs));
            (case.name, change)
        });
        if let Some(t) = case.tier {
            let mut row = tier_row(case, t, per_run, &mem);
            row["vs_baseline"] = json!(vs_baseline.as_ref().map(|(_, c)| c));
            tiers.push(row);
            changes.extend(vs_baseline);
            continue;
        }
        let get = |f: fn(&RunSummary) -> f64| median(per_run.iter().map(f).collect());
        let (us_per_page, p50, p90, p99) = (
            get(|s| s.us_per_page),
            get(|s| s.fault_p50_us),
            get(|s| s.fault_p90_us),
            get(|s| s.fault_p99_us),
        );
        drawn.push(crate::plot::Case {
            name: case.name,
            cdf_us: median_cdf(per_run),
            us_per_page,
        });
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
            "ebpf_cost_ns_per_fault": ebpf_cost(per_run),
            "stall_breakdown": stall_breakdown(per_run),
            "stall_p50_us": ebpf_median(per_run, |e| e.stall_p50_us),
            "stall_p99_us": ebpf_median(per_run, |e| e.stall_p99_us),
            "handler_cpu_us_per_fault": get(|s| s.handler_cpu_us_per_fault),
            "vs_baseline": vs_baseline.as_ref().map(|(_, c)| c),
            "remote_p50_us": get(|s| s.remote_p50_us),
            "prefetch": prefetch_medians(per_run),
            "replay": replay_figures(per_run, recorded),
        });
        println!(
            "{:<18} {:>8} {:>5} {:>10.2} {:>9.1} {:>9.1} {:>9.1}",
            case.name, pages, runs, us_per_page, p50, p90, p99
        );
        print_fault_path(&row);
        if let Some(p) = row["prefetch"].as_object()
            && !case.replay
        {
            let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<18} prefetch: {:.0} pages, accuracy {:.3}, coverage {:.3}, {:.0} touched in flight",
                "",
                f("issued"),
                f("accuracy"),
                f("coverage"),
                f("in_flight")
            );
        }
        if let Some(r) = row["replay"].as_object() {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<18} replay: {:.0} demand faults against {:.0} in the recording run \
                 ({:.1}% fewer), {:.0} pages replayed, {:.0} touched in flight",
                "",
                f("demand_faults"),
                f("recording_demand_faults"),
                f("fewer_pct"),
                f("replayed"),
                f("in_flight")
            );
        }
        results.push(row);
        changes.extend(vs_baseline);
    }
    print_tiers(&tiers);
    for (name, c) in &changes {
        println!("{}", c.line(name));
    }
    let overhead = ebpf_overhead(&cases, &per_case);
    if let Some(o) = &overhead {
        println!(
            "{}",
            overhead_line("eBPF overhead on remote-random", runs, o)
        );
    }
    let probe_cost = cases
        .iter()
        .zip(&per_case)
        .find(|(c, _)| c.name == "remote-random-ebpf")
        .and_then(|(_, runs)| probe_cost(runs));
    if let Some(c) = &probe_cost {
        println!(
            "eBPF programs' kernel time on remote-random-ebpf: {:.0} ns per fault, {:.2}% of \
             the median vCPU stall ({:.1} µs); medians of {runs} runs",
            c["ns_per_fault"].as_f64().unwrap_or(0.0),
            c["pct_of_stall_p50"].as_f64().unwrap_or(0.0),
            c["stall_p50_us"].as_f64().unwrap_or(0.0),
        );
    }
    let breakdown = cases
        .iter()
        .zip(&per_case)
        .find(|(c, _)| c.name == "remote-random-ebpf")
        .and_then(|(_, runs)| stall_breakdown(runs));
    if let Some(b) = &breakdown {
        let f = |k: &str| b[k].as_f64().unwrap_or(0.0);
        println!(
            "stall breakdown on remote-random-ebpf (means, µs): delivery {:.1} + fetch {:.1} + \
             install {:.1} + resume {:.1} = {:.1}, against {:.1} for every sampled stall \
             ({:+.1}%); medians {:.1} / {:.1} / {:.1} / {:.1}; {:.0} of {:.0} samples matched",
            f("delivery_us"),
            f("fetch_us"),
            f("install_us"),
            f("resume_us"),
            f("sum_us"),
            f("stall_all_us"),
            f("sum_vs_stall_pct"),
            f("delivery_p50_us"),
            f("fetch_p50_us"),
            f("install_p50_us"),
            f("resume_p50_us"),
            f("samples"),
            f("of_samples"),
        );
    }
    let tls_overhead = paired_overhead(&cases, &per_case, "remote-random", "remote-random-tls");
    if let Some(o) = &tls_overhead {
        println!("{}", overhead_line("TLS cost on remote-random", runs, o));
    }
    let demand = paired_demand_p50(&cases, &per_case, "remote-mixed", "remote-mixed-prefetch");
    if let Some(o) = &demand {
        let what = "demand-fault p50 while prefetch streams run (remote-mixed-prefetch / \
                    remote-mixed)";
        println!("{}", demand_line(what, runs, o));
    }
    let mut during_repair = serde_json::Map::new();
    for (i, case) in cases.iter().enumerate().filter(|(_, c)| c.repair.is_some()) {
        let repairs = &repairs[i];
        let mut o = demand_p50_pairs(&per_case[i], &repair_refs[i]);
        o["repairs"] = json!(repairs);
        let what = format!(
            "demand-fault p50 during a repair ({} / the same guest without one)",
            case.name
        );
        println!("{}", demand_line(&what, runs, &o));
        let covered = repairs.iter().filter(|r| r.covered_the_run).count();
        println!(
            "  repairs: {:.0} pages each in {:.1} s (medians); {covered} of {} covered the whole run",
            median(repairs.iter().map(|r| r.pages as f64).collect()),
            median(repairs.iter().map(|r| r.seconds).collect()),
            repairs.len()
        );
        during_repair.insert(case.name.to_owned(), o);
    }
    let mut ratios = serde_json::Map::new();
    for (new, old) in RATIOS {
        if let Some(o) = paired_overhead(&cases, &per_case, old, new) {
            println!("{}", ratio_line(&format!("{new} / {old}"), runs, &o));
            ratios.insert(format!("{new}/{old}"), o);
        }
    }
    cluster.stop()?;
    for (_, l) in &mut links {
        l.cluster.stop()?;
    }
    if let Some(c) = replicated.as_mut() {
        c.stop()?;
    }
    if let Some((c, _)) = tls.as_mut() {
        c.stop()?;
    }
    if let Some(b) = baseline.as_mut() {
        b.stop()?;
    }
    let out = json!({
        "cases": results,
        "page_cache": tiers,
        "mem": mem,
        "pin_cpu": args.pin_cpu,
        "ebpf_overhead": overhead,
        "tls_overhead": tls_overhead,
        "ebpf_cost": probe_cost,
        "stall_breakdown": breakdown,
        "demand_p50_with_streams": demand,
        "demand_p50_during_repair": during_repair,
        "memory_image": image.as_ref().map(|(_, m)| m),
        "ratios": ratios,
        "baseline_bin": args.baseline_bin,
    });
    if let Some(path) = &args.json {
        write_json(path, &out)?;
    }
    if let Some(path) = &args.plot {
        let title = format!("cargo xtask bench: {mem} per run, medians of {runs} runs");
        crate::plot::draw(path, &title, &drawn)?;
        eprintln!("xtask: plot written to {}", path.display());
    }
    Ok(())
}

/// The median over runs of each point of their fault-latency CDFs (runs without faults
/// left out); empty when no run had any.
fn median_cdf(runs: &[RunSummary]) -> Vec<f64> {
    let cdfs: Vec<&[f64]> = runs
        .iter()
        .map(|s| s.fault_cdf_us.as_slice())
        .filter(|c| !c.is_empty())
        .collect();
    let Some(len) = cdfs.iter().map(|c| c.len()).min() else {
        return Vec::new();
    };
    (0..len)
        .map(|i| median(cdfs.iter().map(|c| c[i]).collect()))
        .collect()
}

/// One run of `case`: a fresh compute node, with `extra` arguments; its `--json` summary.
fn run_case(
    cluster: &mut Cluster,
    case: &Case,
    mem: &str,
    pin: Option<&str>,
    extra: &[String],
) -> anyhow::Result<RunSummary> {
    let a = case_args(case, mem, pin, extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
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

/// The compute node's arguments for a run of `case`, with `extra` added.
fn case_args(case: &Case, mem: &str, pin: Option<&str>, extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = match case.tier {
        Some(t) => {
            let mut a = vec!["--mem".to_owned(), format!("{}MiB", tier_mem_mib(mem))];
            a.extend(case.args.iter().map(|s| s.to_string()));
            a.extend(tier_args(t, tier_mem_mib(mem)));
            a
        }
        None => {
            let mut a = vec!["--mem".to_owned(), mem.to_owned()];
            a.extend(case.args.iter().map(|s| s.to_string()));
            a
        }
    };
    a.extend(extra.iter().cloned());
    if case.remote {
        a.extend(["--placement", "interleave"].map(String::from));
    }
    // The image cases are given `--image` in `extra`.
    if case.remote && !case.image {
        a.extend(["--content", "pattern"].map(String::from));
    }
    // A case that places its threads itself keeps its placement.
    if let Some(p) = pin.filter(|_| !case.args.contains(&"--pin-cpu")) {
        a.extend(["--pin-cpu".to_owned(), p.to_owned()]);
    }
    a
}

/// `--mem` in MiB (`64MiB`, `1GiB`).
fn parse_mib(mem: &str) -> anyhow::Result<u64> {
    let (n, unit) = mem.split_at(mem.find(|c: char| !c.is_ascii_digit()).unwrap_or(mem.len()));
    let n: u64 = n.parse().with_context(|| format!("--mem {mem}"))?;
    Ok(match unit {
        "GiB" => n << 10,
        "MiB" => n,
        _ => bail!("--mem {mem}: give MiB or GiB"),
    })
}

/// The page cache cases' VM: [`TIER_MEM_MIB`], or 32 MiB in a quick run (16 MiB `mem`).
fn tier_mem_mib(mem: &str) -> u64 {
    if mem == "16MiB" { 32 } else { TIER_MEM_MIB }
}

/// `--local-memory` and `--accesses` of a page cache case over a VM of `mem_mib`.
fn tier_args(t: Tier, mem_mib: u64) -> Vec<String> {
    let pages = mem_mib << 8;
    let mut a = vec![
        "--accesses".to_owned(),
        (pages * TIER_ACCESSES_PER_PAGE).to_string(),
    ];
    if let Some(pct) = t.budget_pct {
        a.push("--local-memory".to_owned());
        a.push(format!("{}KiB", pages * pct / 100 * 4));
    }
    a
}

/// The access sequence a page cache case's guest makes over `pages` pages: what exact LRU,
/// FIFO and MIN are replayed on.
fn tier_trace(t: Tier, pages: u64) -> Vec<u32> {
    let accesses = pages * TIER_ACCESSES_PER_PAGE;
    match t.workload {
        "zipf:0.99" => pagemesh_api::trace::zipf(0.99, pages, accesses),
        "hotset:20:80" => pagemesh_api::trace::hotset(20, 80, pages, accesses),
        // `seq` visits each page once.
        _ => (0..pages as u32).collect(),
    }
}

/// What a page cache case measured beside what the reference policies miss on its very
/// access sequence, for the JSON and the table.
fn tier_row(case: &Case, t: Tier, per_run: &[RunSummary], mem: &str) -> Value {
    let pages = tier_mem_mib(mem) << 8;
    let get = |f: &dyn Fn(&RunSummary) -> f64| median(per_run.iter().map(f).collect());
    let cache = |f: fn(&pagemesh_api::summary::CacheSummary) -> u64| {
        get(&|s: &RunSummary| s.cache.map_or(0, |c| f(&c)) as f64)
    };
    let misses = get(&|s| (s.faults.remote + s.faults.local_zero) as f64);
    let mut row = json!({
        "name": case.name,
        "us_per_access": get(&|s| s.us_per_page),
        "misses": misses,
        "fault_p50_us": get(&|s| s.fault_p50_us),
        "fault_p99_us": get(&|s| s.fault_p99_us),
        "remote_p50_us": get(&|s| s.remote_p50_us),
        "remote_p99_us": get(&|s| s.remote_p99_us),
        "misses_each_run": per_run.iter().map(|s| s.faults.remote + s.faults.local_zero).collect::<Vec<_>>(),
    });
    if let Some(pct) = t.budget_pct {
        let budget = pages * pct / 100;
        let trace = tier_trace(t, pages);
        let staging = pagemesh_pager::policy::staging_slots(pagemesh_pager::Policy::Clock, budget);
        row["budget_pages"] = json!(budget);
        row["lru_misses"] = json!(pagemesh_pager::policy::lru_misses(budget, &trace));
        row["fifo_misses"] = json!(pagemesh_pager::policy::fifo_misses(budget, &trace));
        row["min_misses"] = json!(pagemesh_pager::policy::min_misses(budget, &trace));
        row["clock_simulated_misses"] =
            json!(pagemesh_pager::policy::simulate(budget, staging, &trace).misses);
        row["writeback_pages"] = json!(cache(|c| c.writeback_pages));
        row["dirty_evicted_pages"] = json!(cache(|c| c.dirty_evicted_pages));
        row["writeback_retained_pages"] = json!(cache(|c| c.writeback_retained_pages));
        row["clean_drops"] = json!(cache(|c| c.clean_drops));
        row["evictions"] = json!(cache(|c| c.evictions));
        row["staging_hits"] = json!(cache(|c| c.staging_hits));
        row["resident_max_pages"] = json!(cache(|c| c.resident_max_pages));
        row["budget_waits"] = json!(cache(|c| c.budget_waits));
    }
    row
}

/// The page cache cases' table: measured misses against LRU, FIFO and MIN on the same
/// accesses, write-backs against dirty evictions, and fault latency against the VM without
/// a budget.
fn print_tiers(rows: &[Value]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8}",
        "page cache",
        "µs/acc",
        "misses",
        "lru",
        "fifo",
        "min",
        "writeback",
        "dirty-ev",
        "p50 µs",
        "p99 µs"
    );
    let num = |r: &Value, k: &str| r[k].as_f64().map_or("-".to_owned(), |v| format!("{v:.0}"));
    for r in rows {
        println!(
            "{:<20} {:>9.2} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8.1} {:>8.1}",
            r["name"].as_str().unwrap_or(""),
            r["us_per_access"].as_f64().unwrap_or(0.0),
            num(r, "misses"),
            num(r, "lru_misses"),
            num(r, "fifo_misses"),
            num(r, "min_misses"),
            num(r, "writeback_pages"),
            num(r, "dirty_evicted_pages"),
            r["fault_p50_us"].as_f64().unwrap_or(0.0),
            r["fault_p99_us"].as_f64().unwrap_or(0.0),
        );
    }
    for r in rows {
        if let (Some(m), Some(lru), Some(fifo)) = (
            r["misses"].as_f64(),
            r["lru_misses"].as_f64(),
            r["fifo_misses"].as_f64(),
        ) {
            println!(
                "{}: misses {:.3}× exact LRU's, {:.3}× FIFO's (simulated CLOCK {:.3}× LRU's)",
                r["name"].as_str().unwrap_or(""),
                m / lru,
                m / fifo,
                r["clock_simulated_misses"].as_f64().unwrap_or(0.0) / lru
            );
        }
    }
    let p50 = |name: &str, key: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r[key].as_f64())
    };
    for (key, what) in [
        ("fault_p50_us", "fault p50"),
        ("remote_p50_us", "remote-fetch fault p50"),
    ] {
        if let (Some(base), Some(tier)) =
            (p50("tier-zipf-unlimited", key), p50("tier-zipf-50", key))
        {
            println!(
                "{what} under reclaim (tier-zipf-50) {:.2}× the same VM's without a budget \
                 ({tier:.1} against {base:.1} µs)",
                tier / base
            );
        }
    }
}

/// The probes' cost on `remote-random`, pair by pair: run i with probes against run i
/// without, taken within the same round. `None` unless both cases ran.
fn ebpf_overhead(cases: &[&Case], per_case: &[Vec<RunSummary>]) -> Option<Value> {
    paired_overhead(cases, per_case, "remote-random", "remote-random-ebpf")
}

/// The µs/page ratios the bench reports, `(case, against)`: the issues' targets.
const RATIOS: &[(&str, &str)] = &[
    ("remote-random", "local-demand-zero"),
    ("uffd-local", "local-demand-zero"),
    ("uffd-local-unpinned", "uffd-local"),
    ("remote-random-unpinned", "remote-random-ebpf"),
    ("remote-random-handler-other", "remote-random-ebpf"),
    ("remote-random-poll", "remote-random-ebpf"),
    ("remote-random-wake-separately", "remote-random-ebpf"),
    ("remote-random-2handlers", "remote-random-ebpf"),
    ("remote-random-rdma-emulated", "remote-random"),
    ("remote-random-rdma-emulated-ebpf", "remote-random-ebpf"),
    ("remote-random-rdma-emulated", "local-demand-zero"),
    ("remote-seq-rdma-emulated", "remote-seq"),
    ("remote-seq-prefetch", "local-demand-zero"),
    ("remote-stride-prefetch", "local-demand-zero"),
    ("remote-seq-prefetch", "remote-seq"),
    ("remote-random-prefetch", "remote-random"),
    ("remote-mixed-prefetch", "remote-mixed"),
    ("remote-random-2vcpu", "remote-random"),
    ("remote-random-2vcpu", "remote-random-2vcpu-1handler"),
    ("remote-seq-2m", "local-demand-zero"),
    ("remote-seq-2m", "remote-seq"),
    ("replay", "local-demand-zero"),
    ("replay", "remote-random"),
    ("remote-random-r2", "remote-random"),
    ("writeback-r2", "writeback-r1"),
    ("remote-random-1g-lz4", "remote-random-1g"),
    ("remote-random-1g-auto", "remote-random-1g"),
    ("remote-seq-1g-lz4", "remote-seq-1g"),
    ("remote-random-1g-pattern-auto", "remote-random-1g-pattern"),
    ("remote-random-10g-lz4", "remote-random-10g"),
    ("remote-random", "remote-random-nocompress"),
];

/// The median over runs of one of the probes' figures; `None` for a case without probes.
fn ebpf_median(
    runs: &[RunSummary],
    f: fn(&pagemesh_api::summary::EbpfSummary) -> f64,
) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|s| s.ebpf.as_ref())
        .filter(|e| e.faults > 0)
        .map(f)
        .collect();
    (!v.is_empty()).then(|| median(v))
}

/// A case's fault path under its table row: what the fault handlers' CPU cost per fault,
/// and with the probes, the median parts of a stall and its p99 against its p50.
fn print_fault_path(row: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let cpu = f(&row["handler_cpu_us_per_fault"]);
    let mut line = match cpu > 0.0 {
        true => format!("handler CPU {cpu:.1} µs/fault"),
        false => String::new(),
    };
    if let Some(b) = row["stall_breakdown"].as_object() {
        let (p50, p99) = (f(&row["stall_p50_us"]), f(&row["stall_p99_us"]));
        line.push_str(&format!(
            "; stall parts (p50 µs) delivery {:.1} fetch {:.1} install {:.1} resume {:.1}; \
             stall p50 {p50:.1} p99 {p99:.1} ({:.2}×)",
            f(&b["delivery_p50_us"]),
            f(&b["fetch_p50_us"]),
            f(&b["install_p50_us"]),
            f(&b["resume_p50_us"]),
            if p50 > 0.0 { p99 / p50 } else { 0.0 },
        ));
    }
    if !line.is_empty() {
        println!("{:<18} {}", "", line.trim_start_matches("; "));
    }
}

/// The median over runs of the probes' own kernel time per fault (the kernel's BPF
/// statistics), ns; `None` for a case without probes.
fn ebpf_cost(runs: &[RunSummary]) -> Option<f64> {
    let cost: Vec<f64> = runs
        .iter()
        .filter_map(|s| s.ebpf)
        .filter(|e| e.faults > 0)
        .map(|e| e.cost_ns_per_fault)
        .collect();
    (!cost.is_empty()).then(|| median(cost))
}

/// The stall breakdown's medians over runs (each run's means and medians of its matched
/// samples), with the four means' sum against every sampled stall's mean.
fn stall_breakdown(runs: &[RunSummary]) -> Option<Value> {
    let b: Vec<_> = runs
        .iter()
        .filter_map(|s| s.ebpf.and_then(|e| e.breakdown))
        .collect();
    if b.is_empty() {
        return None;
    }
    let m =
        |f: fn(&pagemesh_api::summary::StallBreakdown) -> f64| median(b.iter().map(f).collect());
    fn sum(b: &pagemesh_api::summary::StallBreakdown) -> f64 {
        b.delivery_us + b.fetch_us + b.install_us + b.resume_us
    }
    Some(json!({
        "delivery_us": m(|b| b.delivery_us),
        "fetch_us": m(|b| b.fetch_us),
        "install_us": m(|b| b.install_us),
        "resume_us": m(|b| b.resume_us),
        "sum_us": m(sum),
        "stall_all_us": m(|b| b.stall_all_us),
        "sum_vs_stall_pct": m(|b| (sum(b) / b.stall_all_us - 1.0) * 100.0),
        "delivery_p50_us": m(|b| b.delivery_p50_us),
        "fetch_p50_us": m(|b| b.fetch_p50_us),
        "install_p50_us": m(|b| b.install_p50_us),
        "resume_p50_us": m(|b| b.resume_p50_us),
        "samples": m(|b| b.samples as f64),
        "of_samples": m(|b| b.of_samples as f64),
    }))
}

/// The probes' kernel time per fault against the fault's whole stall, run by run: the
/// issue's target is ≤ 3% at the median.
fn probe_cost(runs: &[RunSummary]) -> Option<Value> {
    let e: Vec<_> = runs
        .iter()
        .filter_map(|s| s.ebpf)
        .filter(|e| e.faults > 0)
        .collect();
    if e.is_empty() {
        return None;
    }
    let pct: Vec<f64> = e
        .iter()
        .filter(|e| e.stall_p50_us > 0.0)
        .map(|e| e.cost_ns_per_fault / (e.stall_p50_us * 1000.0) * 100.0)
        .collect();
    Some(json!({
        "ns_per_fault": median(e.iter().map(|e| e.cost_ns_per_fault).collect()),
        "runs_per_fault": median(e.iter().map(|e| e.runs_per_fault).collect()),
        "stall_p50_us": median(e.iter().map(|e| e.stall_p50_us).collect()),
        "pct_of_stall_p50": median(pct.clone()),
        "pct_of_stall_p50_each_run": pct,
    }))
}

/// A replay case's figures against its recording runs (run i replayed what run i of
/// `recorded` recorded); `None` for other cases. Demand faults are the faults the fault
/// handler fetched itself; faults on pages the replay was bringing are `in_flight`.
fn replay_figures(runs: &[RunSummary], recorded: &[RunSummary]) -> Option<Value> {
    if recorded.is_empty() {
        return None;
    }
    let demand = |runs: &[RunSummary]| runs.iter().map(|s| s.faults.remote as f64).collect();
    let fewer: Vec<f64> = runs
        .iter()
        .zip(recorded)
        .filter(|(_, r)| r.faults.remote > 0)
        .map(|(s, r)| (1.0 - s.faults.remote as f64 / r.faults.remote as f64) * 100.0)
        .collect();
    let prefetch = |f: fn(&pagemesh_api::stats::PrefetchStats) -> u64| {
        median(
            runs.iter()
                .map(|s| s.prefetch.map_or(0, |p| f(&p)) as f64)
                .collect(),
        )
    };
    Some(json!({
        "demand_faults": median(demand(runs)),
        "recording_demand_faults": median(demand(recorded)),
        "fewer_pct": median(fewer.clone()),
        "fewer_pct_each_run": fewer,
        "replayed": prefetch(|p| p.replayed),
        "in_flight": prefetch(|p| p.in_flight),
        "recording_us_per_page": median(us_per_page(recorded)),
    }))
}

/// The medians over runs of what prefetch did, for a case with `--prefetch`.
fn prefetch_medians(runs: &[RunSummary]) -> Option<Value> {
    let p: Vec<_> = runs.iter().filter_map(|s| s.prefetch).collect();
    if p.is_empty() {
        return None;
    }
    let get = |f: fn(&pagemesh_api::stats::PrefetchStats) -> f64| median(p.iter().map(f).collect());
    Some(json!({
        "issued": get(|p| p.issued as f64),
        "used": get(|p| p.used as f64),
        "accuracy": get(|p| p.accuracy),
        "coverage": get(|p| p.coverage),
        "in_flight": get(|p| p.in_flight as f64),
        "replayed": get(|p| p.replayed as f64),
    }))
}

/// The line that reports a [`paired_overhead`] as a ratio of µs/page.
fn ratio_line(what: &str, runs: usize, o: &Value) -> String {
    let x = |pct: f64| 1.0 + pct / 100.0;
    let ci = match o["ci95_pct"].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => format!(
            " (95% CI {:.3}..{:.3})",
            x(lo.as_f64().unwrap_or(0.0)),
            x(hi.as_f64().unwrap_or(0.0))
        ),
        _ => String::new(),
    };
    format!(
        "{what}: {:.3}x µs/page, median of {runs} paired runs{ci}",
        x(o["median_pct"].as_f64().unwrap_or(0.0))
    )
}

/// The line that reports a [`paired_overhead`].
fn overhead_line(what: &str, runs: usize, o: &Value) -> String {
    let ci = match o["ci95_pct"].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => format!(
            "95% CI {:+.1}..{:+.1}; ",
            lo.as_f64().unwrap_or(0.0),
            hi.as_f64().unwrap_or(0.0)
        ),
        _ => String::new(),
    };
    format!(
        "{what}: median of {runs} paired runs {:+.1}% ({ci}per pair: {})",
        o["median_pct"].as_f64().unwrap_or(0.0),
        o["per_pair_pct"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!("{:+.1}", v.as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The cost of case `with` over case `without`, pair by pair (run i of each, taken within
/// the same round). `None` unless both ran.
fn paired_overhead(
    cases: &[&Case],
    per_case: &[Vec<RunSummary>],
    without: &str,
    with: &str,
) -> Option<Value> {
    let find = |name: &str| cases.iter().position(|c| c.name == name);
    let (plain, probed) = (find(without)?, find(with)?);
    let pct = paired_pct(
        &us_per_page(&per_case[probed]),
        &us_per_page(&per_case[plain]),
    );
    Some(json!({
        "median_pct": median(pct.clone()),
        "ci95_pct": median_ci95(&pct).map(|(lo, hi)| [lo, hi]),
        "per_pair_pct": pct,
    }))
}

/// The median latency of the faults the handler fetched itself (`remote_p50_us`: demand
/// fetches, not faults on pages in flight) in case `with` against case `without`, pair by
/// pair. `None` unless both ran.
fn paired_demand_p50(
    cases: &[&Case],
    per_case: &[Vec<RunSummary>],
    without: &str,
    with: &str,
) -> Option<Value> {
    let find = |name: &str| cases.iter().position(|c| c.name == name);
    let (plain, streams) = (find(without)?, find(with)?);
    Some(demand_p50_pairs(&per_case[streams], &per_case[plain]))
}

/// `remote_p50_us` of the runs `with` against the runs `without`, run i against run i.
fn demand_p50_pairs(with: &[RunSummary], without: &[RunSummary]) -> Value {
    let p50 = |runs: &[RunSummary]| runs.iter().map(|s| s.remote_p50_us).collect::<Vec<_>>();
    let pct = paired_pct(&p50(with), &p50(without));
    json!({
        "median_pct": median(pct.clone()),
        "ci95_pct": median_ci95(&pct).map(|(lo, hi)| [lo, hi]),
        "per_pair_pct": pct,
        "without_us": median(p50(without)),
        "with_us": median(p50(with)),
    })
}

/// The line that reports a [`demand_p50_pairs`] as a ratio.
fn demand_line(what: &str, runs: usize, o: &Value) -> String {
    let x = |v: &Value| 1.0 + v.as_f64().unwrap_or(0.0) / 100.0;
    let ci = match o["ci95_pct"].as_array().map(Vec::as_slice) {
        Some([lo, hi]) => format!(" (95% CI {:.3}..{:.3})", x(lo), x(hi)),
        _ => String::new(),
    };
    format!(
        "{what}: {:.3}x ({:.1} against {:.1} µs), median of {runs} paired runs{ci}",
        x(&o["median_pct"]),
        o["with_us"].as_f64().unwrap_or(0.0),
        o["without_us"].as_f64().unwrap_or(0.0),
    )
}

/// µs/page of each run.
fn us_per_page(runs: &[RunSummary]) -> Vec<f64> {
    runs.iter().map(|s| s.us_per_page).collect()
}

/// Per pair, `new / old − 1` in %; pairs whose `old` is not positive (no time measured) are
/// left out.
fn paired_pct(new: &[f64], old: &[f64]) -> Vec<f64> {
    new.iter()
        .zip(old)
        .filter(|&(_, &o)| o > 0.0)
        .map(|(n, o)| (n / o - 1.0) * 100.0)
        .collect()
}

/// This build against the baseline on one case (`vs_baseline` in the JSON): the median of
/// the per-round changes, so that the machine's drift, which hits both runs of a round
/// alike, cancels out.
#[derive(Serialize, Debug, PartialEq)]
struct PairedChange {
    /// Median of `per_round_pct`.
    median_pct: f64,
    /// 95% bootstrap interval of that median ([`median_ci95`]); `None` below two rounds.
    ci95_pct: Option<[f64; 2]>,
    /// Per round, this build's µs/page over the baseline's, − 1, in %.
    per_round_pct: Vec<f64>,
    /// This build's median µs/page.
    us_per_page: f64,
    /// The baseline's median µs/page.
    baseline_us_per_page: f64,
    /// The baseline's µs/page, run by run (this build's are the case's
    /// `us_per_page_each_run`).
    baseline_us_per_page_each_run: Vec<f64>,
}

/// The paired change of `this` against `baseline`, both µs/page round by round.
fn paired_change(this: &[f64], baseline: &[f64]) -> PairedChange {
    let per_round_pct = paired_pct(this, baseline);
    PairedChange {
        median_pct: median(per_round_pct.clone()),
        ci95_pct: median_ci95(&per_round_pct).map(|(lo, hi)| [lo, hi]),
        per_round_pct,
        us_per_page: median(this.to_vec()),
        baseline_us_per_page: median(baseline.to_vec()),
        baseline_us_per_page_each_run: baseline.to_vec(),
    }
}

impl PairedChange {
    /// `remote-random vs baseline: median of 20 paired rounds +1.2% (95% CI -0.8..+3.1)`,
    /// and a second line with both medians and the rounds.
    fn line(&self, case: &str) -> String {
        let ci = self.ci95_pct.map_or_else(
            || "no interval from one round".to_owned(),
            |[lo, hi]| format!("95% CI {lo:+.1}..{hi:+.1}"),
        );
        let rounds: Vec<String> = self
            .per_round_pct
            .iter()
            .map(|p| format!("{p:+.1}"))
            .collect();
        format!(
            "{case} vs baseline: median of {} paired rounds {:+.1}% ({ci})\n  \
             µs/page {:.2} baseline → {:.2} this build; per round: {}",
            self.per_round_pct.len(),
            self.median_pct,
            self.baseline_us_per_page,
            self.us_per_page,
            rounds.join(" ")
        )
    }
}

/// The binaries of the other build, checked: both exist and run (`--version`).
fn check_baseline(dir: &Path) -> anyhow::Result<Bins> {
    let bins = Bins::in_dir(dir);
    let build = "build the other commit in the release profile this bench uses \
                 (`cargo build --release -p pagemesh-node -p pagemesh-coordinator` in a worktree \
                 of it) and pass its target/release; see docs/benchmarks.md, \
                 \"Comparing two builds\"";
    for bin in [&bins.coordinator, &bins.node] {
        if !bin.is_file() {
            bail!("baseline binary {} does not exist: {build}", bin.display());
        }
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run baseline binary {}: {build}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "baseline binary {} does not run (`--version`: {}, {}): {build}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(bins)
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

    #[test]
    fn the_paired_change_is_the_median_of_per_round_ratios() {
        // Round by round, this build 10% slower in two rounds, 5% faster in one; the machine
        // drifted from 40 to 60 µs/page meanwhile.
        let this = [44.0, 47.5, 66.0];
        let baseline = [40.0, 50.0, 60.0];
        let c = paired_change(&this, &baseline);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(c.per_round_pct.len(), 3);
        for (got, want) in c.per_round_pct.iter().zip([10.0, -5.0, 10.0]) {
            assert!(close(*got, want), "{got} vs {want}");
        }
        assert!(close(c.median_pct, 10.0), "{}", c.median_pct);
        // Not the change of the medians (47.5 vs 50: −5%).
        assert_eq!((c.us_per_page, c.baseline_us_per_page), (47.5, 50.0));
        let [lo, hi] = c.ci95_pct.unwrap();
        assert!(lo <= c.median_pct && c.median_pct <= hi, "{lo}..{hi}");
        assert_eq!(c.baseline_us_per_page_each_run, baseline);

        // The same build on both sides: no change, and a zero-width interval.
        let same = paired_change(&baseline, &baseline);
        assert_eq!(same.median_pct, 0.0);
        assert_eq!(same.ci95_pct, Some([0.0, 0.0]));

        // One round: no interval. A baseline run without a time is left out.
        let one = paired_change(&[50.0], &[40.0]);
        assert!(close(one.median_pct, 25.0) && one.ci95_pct.is_none());
        let gap = paired_change(&[50.0, 44.0], &[0.0, 40.0]);
        assert_eq!(gap.per_round_pct.len(), 1);
        assert!(close(gap.median_pct, 10.0));
        let line = c.line("remote-random");
        assert!(
            line.starts_with(
                "remote-random vs baseline: median of 3 paired rounds +10.0% (95% CI "
            ),
            "{line}"
        );
        assert!(line.ends_with("per round: +10.0 -5.0 +10.0"), "{line}");
    }

    #[test]
    fn a_baseline_that_is_missing_or_does_not_run_says_what_to_build() {
        let dir = std::env::temp_dir().join(format!("pagemesh-baseline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = check_baseline(&dir).unwrap_err().to_string();
        assert!(e.contains("pagemesh-coordinator does not exist"), "{e}");
        assert!(e.contains("cargo build --release"), "{e}");

        // Present but not executable, then executable but failing.
        std::fs::create_dir_all(&dir).unwrap();
        let coordinator = dir.join("pagemesh-coordinator");
        std::fs::write(&coordinator, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::write(dir.join("pagemesh-node"), "#!/bin/sh\nexit 3\n").unwrap();
        let e = check_baseline(&dir).unwrap_err().to_string();
        assert!(e.starts_with("cannot run baseline binary"), "{e}");
        assert!(e.contains("cargo build --release"), "{e}");
        let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(&coordinator, executable).unwrap();
        let e = check_baseline(&dir).unwrap_err().to_string();
        assert!(e.contains("pagemesh-coordinator does not run"), "{e}");
        assert!(e.contains("cargo build --release"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
