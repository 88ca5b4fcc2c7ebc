//! Boot Debian's cloud kernel with its memory on two memory nodes.
//!
//! On hosts without hardware virtualization (`kvm_pvm`) the kernel's own code is emulated,
//! so the boot gets as far as the `Memory:` line in about two minutes and no further
//! (docs/linux-guest.md); this test checks exactly that far: the console shows
//! `Linux version` and `Memory:`, the pager served at least 10,000 remote faults, and the
//! run is stopped cleanly with nothing left behind. The VM has two vCPUs, which the kernel
//! finds in the ACPI MADT; the stop tears down both vCPU threads.
//!
//! The boot runs under a local memory budget of 24 MiB (`--local-memory`), a tenth of its
//! RAM: the kernel's pages are evicted, written back and fetched again while it boots, and
//! it gets as far as it would without one.
//!
//! The kernel and initramfs come from `cargo xtask setup` (`.pagemesh/guest/`), passed in
//! `PAGEMESH_GUEST_KERNEL` / `PAGEMESH_GUEST_INITRD` by `cargo xtask test`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Cluster, http_json, read_summary, test_dir};

fn guest_file(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.pagemesh/guest")
            .join(name)
    });
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (cargo xtask test does)",
        path.display()
    );
    path
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn debian_kernel_boots_on_remote_memory_as_far_as_this_host_allows() {
    let kernel = guest_file("PAGEMESH_GUEST_KERNEL", "vmlinuz");
    let initrd = guest_file("PAGEMESH_GUEST_INITRD", "initramfs.cpio");
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("linux"), &[1, 2], "512MiB").unwrap();
    let (mut compute, json_path) = c
        .spawn_compute(&[
            "--mem",
            "256MiB",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--vcpus",
            "2",
            "--console",
            "--local-memory",
            "24MiB",
        ])
        .unwrap();
    let admin = compute.admin_url(Duration::from_secs(60)).unwrap();
    compute
        .wait_for_line("Linux version", Duration::from_secs(600))
        .unwrap();
    let memory_line = compute
        .wait_for_line("Memory:", Duration::from_secs(600))
        .unwrap();
    assert!(memory_line.contains("K/"), "{memory_line}");
    // The ACPI MADT announced both vCPUs (the kernel starts the second one later in the
    // boot than this host gets).
    let cpus = compute
        .wait_for_line("smpboot: Allowing", Duration::from_secs(30))
        .unwrap();
    assert!(cpus.contains("Allowing 2 CPUs"), "{cpus}");
    // Remote faults: every page the kernel touched came from a memory node.
    let deadline = Instant::now() + Duration::from_secs(120);
    let remote = loop {
        let stats = http_json(&format!("{admin}/stats?cells=1")).unwrap();
        let remote = stats["pager"]["faults_remote"].as_u64().unwrap();
        if remote >= 10_000 || Instant::now() > deadline {
            break remote;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(remote >= 10_000, "only {remote} remote faults");
    let stats = http_json(&format!("{admin}/stats?cells=1")).unwrap();
    let cache = &stats["pager"]["cache"];
    assert_eq!(cache["budget_pages"], 6144, "{stats}");
    assert!(cache["evictions"].as_u64() > Some(1000), "{stats}");

    // Stop it: the VM is torn down and every node exits 0.
    let status = compute.stop().unwrap();
    assert!(
        status.success(),
        "compute node: {status}\n{}",
        compute.log_tail()
    );
    let summary = read_summary(&json_path).unwrap().expect("a summary");
    let linux = summary.linux.as_ref().expect("the Linux guest's figures");
    assert!(linux.reached_linux_version, "{summary:#?}");
    assert!(linux.reached_memory);
    assert_eq!(linux.exit, "stopped by signal");
    assert!(summary.faults.remote >= 10_000);
    let cache = summary.cache.expect("the page cache's figures");
    assert!(cache.resident_max_pages <= cache.budget_pages, "{cache:#?}");
    assert!(
        cache.dirty_evicted_pages > 0,
        "the kernel wrote pages that went home: {cache:#?}"
    );
    assert_eq!(
        cache.writeback_pages,
        cache.dirty_evicted_pages + cache.writeback_retained_pages,
        "{cache:#?}"
    );
    let mut pids = vec![compute.pid()];
    for m in &mut c.memory {
        pids.push(m.proc.pid());
        assert!(m.proc.stop().unwrap().success());
    }
    pids.push(c.coordinator.proc.pid());
    assert!(c.coordinator.proc.stop().unwrap().success());
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} was left behind");
    }
    // The guest image file was removed.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("pagemesh-node0-{}-", compute.pid()))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
