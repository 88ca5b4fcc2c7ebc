//! The soak, short: a minute of guests one after another on three memory nodes with two
//! replicas, a memory node restarted every 20 s. Every run must end well, with no bad page,
//! through the restarts; no process may gain file descriptors. (`cargo xtask soak --minutes
//! 30` is the long run, whose RSS figures are recorded in docs/benchmarks.md.)

use std::time::Duration;

use pagemesh_tests::soak::{SoakPlan, run};
use pagemesh_tests::{Bins, test_dir};

#[test]
fn a_minute_of_load_with_memory_nodes_restarting_loses_nothing_and_leaks_no_descriptor() {
    let plan = SoakPlan {
        duration: Duration::from_secs(60),
        restart_every: Duration::from_secs(20),
        mem: "32MiB".into(),
        budget: "8MiB".into(),
    };
    let report = run(Bins::for_tests().unwrap(), test_dir("soak"), &plan).unwrap();
    eprintln!("{}", report.table());
    assert!(report.failures.is_empty(), "{}", report.table());
    assert_eq!(report.bad_pages, 0);
    assert!(report.runs_ok >= 2, "{}", report.table());
    assert!(report.restarts >= 2, "{}", report.table());
    assert!(
        report.runs_through_a_restart >= 1,
        "a run went through a restart:\n{}",
        report.table()
    );
    // The coordinator and the memory nodes that lived from warm-up to the end. The
    // coordinator's descriptors include its HTTP clients' keep-alive connections: each of
    // the three memory nodes holds up to two (its lease keeper's and its repairer's, each
    // closed by ureq after 15 s idle), so their number at two instants differs by up to six
    // without anything leaking; a leak would grow with the 20-odd runs.
    assert!(report.processes.iter().any(|p| p.name == "coordinator"));
    for p in &report.processes {
        let allowed = if p.name == "coordinator" {
            2 + 2 * 3
        } else {
            2
        };
        assert!(
            p.fd_growth() <= allowed,
            "{} gained descriptors:\n{}",
            p.name,
            report.table()
        );
    }
}
