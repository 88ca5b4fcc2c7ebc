//! The eBPF probes in a real compute-node process: they load by default, their figures land in
//! the `--json` summary next to the pager's, `--no-ebpf` turns them off, and a node without
//! the privileges to load them warns once and serves its faults all the same.
//!
//! The summary's `"ebpf"` object is a `pagemesh_api::summary::EbpfSummary`
//! (`{"faults":N,"stall_p50_us":X,"stall_p99_us":X,"install_p50_us":X,"transfer_p50_us":X}`,
//! from `pagemesh_probes::Probes::summary`; see docs/observability.md).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pagemesh_api::summary::RunSummary;
use pagemesh_tests::{Bins, Cluster, http_json, test_dir};
use serde_json::json;

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const PAGES: u64 = 16_384;
/// Faults the probes see that never reach userfaultfd: the guest's first touches of the
/// system region (page tables, code, stack; written by the VMM before the run, so present
/// on the host but not yet in the shadow page tables). A handful per run.
const SYSTEM_REGION_FAULTS: u64 = 64;

fn cluster(name: &str) -> Cluster {
    let bins = Bins::for_tests().expect("binaries are built");
    Cluster::start(bins, test_dir(name), &[1, 2], "512MiB").expect("cluster starts")
}

/// Whether this build has probes to load. CI installs the toolchain (`cargo xtask setup`),
/// so there they must be built in; elsewhere a build without them skips these checks.
fn probes_built_in(test: &str) -> bool {
    if pagemesh_probes::BUILT_IN {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must build the node with its eBPF probes (cargo xtask setup installs the toolchain)"
    );
    eprintln!("{test}: this build has no eBPF probes (no toolchain); skipped");
    false
}

/// The checks every probed run must pass; returns the pager's fault count.
fn check_probed_run(s: &RunSummary) -> u64 {
    assert!(s.ok, "{s:#?}");
    let Some(e) = s.ebpf else {
        panic!("no ebpf figures in the summary: {s:#?}");
    };
    let pager = s.faults.remote + s.faults.local_zero;
    let probed = e.faults;
    // Every userfaultfd fault is one vCPU stall; the only other stalls are the system
    // region's first touches.
    assert!(
        probed >= pager && probed <= pager + SYSTEM_REGION_FAULTS,
        "eBPF counted {probed} stalls for {pager} pager faults"
    );
    // The probes' own kernel time: at least the stall's two ends and the install's two
    // ioctl points ran per fault, each for some nanoseconds, far less than the stall.
    assert!(e.runs_per_fault >= 2.0, "{e:?}");
    assert!(
        e.cost_ns_per_fault > 0.0 && e.cost_ns_per_fault < e.stall_p50_us * 1000.0,
        "{e:?}"
    );
    let (stall_p50, stall_p99, install_p50) = (e.stall_p50_us, e.stall_p99_us, e.install_p50_us);
    // Install is non-empty and part of the stall.
    assert!(install_p50 > 0.0, "{e:?}");
    assert!(install_p50 < stall_p50, "{e:?}");
    assert!(stall_p50 <= stall_p99, "{e:?}");
    // The stall holds the handler's whole service of the fault, so it is at least the
    // handler's median — up to the handler's own overcount: when the install wakes the vCPU
    // on the handler's CPU, the handler's clock keeps running while the vCPU runs on to its
    // next fault (docs/observability.md). And it stays within the range of the
    // user-space fault latency.
    //
    // Upper bound: the guest's own time per page (wall time / pages) holds the whole stall
    // plus the guest's work, so the median stall stays below it (with room for median vs
    // mean). The handler's p99 is no upper bound: the stall also holds the event delivery
    // and the wake-up, which for a zero-fill fault are most of it.
    let (fault_p50, us_per_page) = (s.fault_p50_us, s.us_per_page);
    assert!(
        stall_p50 * 2.0 >= fault_p50 && stall_p50 <= us_per_page * 1.5,
        "stall p50 {stall_p50} µs vs handler p50 {fault_p50} µs and the guest's \
         {us_per_page} µs per page"
    );
    pager
}

#[test]
fn probes_measure_remote_faults_next_to_the_pager() {
    if !probes_built_in("remote") {
        return;
    }
    let mut c = cluster("ebpf-remote");
    let (mut proc, admin, s) = c
        .run_compute_held(&["--mem", "64MiB", "--workload", "verify"], RUN_TIMEOUT)
        .unwrap();
    assert_eq!(check_probed_run(&s), PAGES);
    // The kernel's per-page counts reach the node's heat data: in /stats, every cell counts
    // the stalls on its pages, one per page the guest read (the system region's stalls are
    // not VM pages and are left out).
    let stats = http_json(&format!("{admin}/stats?cells=64")).unwrap();
    let cells = stats["pager"]["heat"]["cells"]
        .as_array()
        .expect("heat cells");
    assert_eq!(cells.len(), 64);
    let per_cell = PAGES / 64;
    for (i, cell) in cells.iter().enumerate() {
        assert_eq!(cell["stalls"], json!(per_cell), "cell {i}: {cell}");
    }
    // The probes' own cost, per program, from the kernel's BPF statistics: the stall's
    // two ends ran once per stall at least, and every program that ran took time.
    let programs = stats["ebpf"]["programs"].as_array().expect("program costs");
    let runs = |name: &str| {
        programs
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["runs"].as_u64())
            .unwrap_or_else(|| panic!("no {name} in {programs:?}"))
    };
    assert!(runs("stall_walk") >= PAGES, "{programs:?}");
    for p in programs.iter().filter(|p| p["runs"].as_u64() > Some(0)) {
        assert!(p["run_time_ns"].as_u64() > Some(0), "{p}");
    }
    proc.stop().unwrap();
    assert_eq!(s.faults.remote, PAGES, "{s:#?}");
    let e = s.ebpf.expect("checked above");
    // The sampled stalls, matched with the handler's record of their faults, cut in four:
    // most samples matched, the four parts add up to the stall, and each remote fault spent
    // time in every part. (On a quiet machine nearly every sample matches, 1019 of 1023 in
    // the bench; on a busy one the handler can be preempted between its install's return
    // and its clock reading while the woken vCPU already runs, and such a sample, whose
    // record ends after the stall does, is left out: 82-85% matched here with the other
    // tests of this file running beside it.)
    let b = e.breakdown.expect("a stall breakdown");
    assert!(b.samples > 0 && b.samples * 2 >= b.of_samples, "{b:?}");
    let sum = b.delivery_us + b.fetch_us + b.install_us + b.resume_us;
    assert!((sum - b.stall_us).abs() <= b.stall_us * 0.01, "{b:?}");
    for part in [b.delivery_us, b.fetch_us, b.install_us, b.resume_us] {
        assert!(part > 0.0, "{b:?}");
    }
    // Every fault fetched its page from a peer: transfers were timed, and each is a part
    // of its fault's stall.
    assert!(e.transfer_p50_us > 0.0, "{e:?}");
    assert!(e.transfer_p50_us < e.stall_p99_us, "{e:?}");
    assert!(
        !warned_about_ebpf(&proc.stderr),
        "a privileged node must not warn about its probes:\n{}",
        proc.log_tail()
    );
}

#[test]
fn zero_fill_faults_are_stalls_and_installs_without_transfers() {
    if !probes_built_in("zero") {
        return;
    }
    let mut c = cluster("ebpf-zero");
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "32MiB",
                "--content",
                "zero",
                "--workload",
                "random",
                "--access",
                "write",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert_eq!(check_probed_run(&s), PAGES / 2);
    assert_eq!(s.faults.local_zero, PAGES / 2, "{s:#?}");
    assert_eq!(
        s.ebpf.map(|e| e.transfer_p50_us),
        Some(0.0),
        "no fetches, no transfers"
    );
}

#[test]
fn no_ebpf_runs_without_probes() {
    let mut c = cluster("ebpf-off");
    let (status, s, proc) = c
        .run_compute(
            &["--mem", "16MiB", "--workload", "verify", "--no-ebpf"],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    assert_eq!(s.faults.remote, PAGES / 4);
    assert!(s.ebpf.is_none(), "--no-ebpf still reported probes: {s:#?}");
    assert!(!warned_about_ebpf(&proc.stderr), "{}", proc.log_tail());
}

#[test]
fn unprivileged_node_warns_once_and_serves_faults() {
    let mut c = cluster("ebpf-unprivileged");
    // The compute node (only) runs with the capabilities that loading probes needs taken
    // out of its bounding set: as root it keeps /dev/kvm and /dev/userfaultfd (file
    // permissions), but the kernel refuses BPF maps, programs and perf events.
    c.bins.node = without_bpf_capabilities(&c.dir, &c.bins.node);
    let (status, s, proc) = c
        .run_compute(&["--mem", "64MiB", "--workload", "verify"], RUN_TIMEOUT)
        .unwrap();
    assert!(status.success(), "{status}: {}", proc.log_tail());
    assert!(s.ok, "{s:#?}");
    assert_eq!(s.faults.remote, PAGES, "{s:#?}");
    assert!(
        s.ebpf.is_none(),
        "probes reported without privileges: {s:#?}"
    );
    let log = std::fs::read_to_string(&proc.stderr).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|l| is_ebpf_warning(l)).collect();
    assert_eq!(warnings.len(), 1, "one warning about the probes:\n{log}");
    let expected = if pagemesh_probes::BUILT_IN {
        "not permitted"
    } else {
        "built without eBPF probes"
    };
    assert!(
        warnings[0].contains(expected),
        "the warning says why: {}",
        warnings[0]
    );
}

fn is_ebpf_warning(line: &str) -> bool {
    line.contains("WARN") && line.to_lowercase().contains("ebpf")
}

fn warned_about_ebpf(stderr: &Path) -> bool {
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .any(is_ebpf_warning)
}

/// A wrapper that runs `node` with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN dropped from the
/// bounding set (so not in its effective set either, root or not).
fn without_bpf_capabilities(dir: &Path, node: &Path) -> PathBuf {
    let setpriv = Path::new("/usr/bin/setpriv");
    assert!(
        setpriv.exists(),
        "setpriv (util-linux) is needed to drop capabilities"
    );
    let script = dir.join("pagemesh-node-unprivileged");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --bounding-set -bpf,-perfmon,-sys_admin -- {} \"$@\"\n",
            setpriv.display(),
            node.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}
