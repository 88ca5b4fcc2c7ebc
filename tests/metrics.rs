//! A real Prometheus server scrapes a live node and answers queries about it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Cluster, Proc, http_get, http_json, test_dir};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the first sample of an instant query, once Prometheus has one.
fn query(prom: &str, q: &str, deadline: Instant) -> f64 {
    let url = format!("{prom}/api/v1/query?query={}", urlencode(q));
    loop {
        if let Ok(v) = http_json(&url)
            && let Some(value) = v["data"]["result"][0]["value"][1].as_str()
        {
            return value.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had a sample for {q}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts a real Prometheus scraping the admin endpoints `targets` every second; returns
/// it and its URL once it is ready.
fn start_prometheus(dir: &std::path::Path, targets: &[&str]) -> (Proc, String) {
    let config = dir.join("prometheus.yml");
    let targets: Vec<String> = targets
        .iter()
        .map(|t| format!("\"{}\"", t.trim_start_matches("http://")))
        .collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pagemesh\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prom = Proc::spawn(
        "prometheus",
        dir,
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}")),
    )
    .expect("prometheus is installed (cargo xtask setup installs it)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&format!("{url}/-/ready")).is_err() {
        assert!(
            prom.try_wait().unwrap().is_none(),
            "prometheus exited: {}",
            prom.log_tail()
        );
        assert!(Instant::now() < deadline, "prometheus never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    (prom, url)
}

/// `promtool check metrics` accepts the text of `GET {admin}/metrics`, which it returns.
fn promtool_checked(admin: &str) -> String {
    let mut response = ureq::get(format!("{admin}/metrics")).call().unwrap();
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.body_mut().read_to_string().unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed with prometheus");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    text
}

#[test]
fn prometheus_scrapes_fault_counters_and_histograms_from_a_live_node() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("prometheus");
    let mut c = Cluster::start(bins, dir.clone(), &[1, 2], "256MiB").unwrap();
    let (mut compute, admin, _) = c
        .run_compute_held(
            &["--mem", "16MiB", "--workload", "random", "--access", "read"],
            Duration::from_secs(120),
        )
        .unwrap();

    let (mut prom, url) = start_prometheus(&dir, &[&admin, &c.memory[0].admin]);

    let deadline = Instant::now() + Duration::from_secs(60);
    let remote = query(
        &url,
        r#"pagemesh_faults_total{kind="remote",node="0"}"#,
        deadline,
    );
    assert_eq!(remote, 4096.0);
    let count = query(
        &url,
        r#"pagemesh_fault_duration_seconds_count{node="0"}"#,
        deadline,
    );
    assert_eq!(count, 4096.0);
    let p99 = query(
        &url,
        r#"histogram_quantile(0.99, pagemesh_fault_duration_seconds_bucket{node="0"})"#,
        deadline,
    );
    assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99} s");
    let claimed = query(
        &url,
        r#"pagemesh_pages_served_total{node="1",claimed="true"}"#,
        deadline,
    );
    assert_eq!(claimed, 2048.0);

    // Served as the Prometheus text format, which Prometheus's own checker accepts.
    promtool_checked(&admin);

    prom.stop().unwrap();
    assert!(compute.stop().unwrap().success());
}

#[test]
fn prometheus_scrapes_the_page_cache_of_a_node_under_a_budget() {
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("prometheus-cache");
    let mut c = Cluster::start(bins, dir.clone(), &[1, 2], "256MiB").unwrap();
    // 16 MiB read-modify-written in a random order through 1 MiB: 4096 pages come in,
    // nearly all go out dirty.
    let (mut compute, admin, summary) = c
        .run_compute_held(
            &[
                "--mem",
                "16MiB",
                "--workload",
                "random",
                "--access",
                "rmw",
                "--local-memory",
                "1MiB",
            ],
            Duration::from_secs(120),
        )
        .unwrap();
    assert!(summary.ok, "{summary:#?}");
    let cache = summary.cache.expect("the summary's cache");
    assert!(cache.dirty_evicted_pages > 3000, "{cache:#?}");

    // /stats has the same figures, and its heat map tells evicted pages from resident ones:
    // every page was served, so those not resident now are exactly the evicted ones.
    let stats = http_json(&format!("{admin}/stats")).unwrap();
    let live = &stats["pager"]["cache"];
    assert_eq!(live["budget_pages"], 256, "{stats}");
    assert_eq!(live["writeback_pages"], cache.writeback_pages, "{stats}");
    assert_eq!(live["dirty_evicted_pages"], cache.dirty_evicted_pages);
    let resident = live["resident_pages"].as_u64().unwrap();
    assert!(resident <= 256, "{stats}");
    let cells = stats["pager"]["heat"]["cells"].as_array().unwrap();
    let sum = |k: &str| cells.iter().map(|c| c[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("evicted"), 4096 - resident, "{stats}");
    assert_eq!(sum("local"), resident);

    let (mut prom, url) = start_prometheus(&dir, &[&admin]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let q = |metric: &str| query(&url, metric, deadline);
    assert_eq!(q(r#"pagemesh_cache_budget_pages{node="0"}"#), 256.0);
    assert_eq!(
        q(r#"pagemesh_cache_resident_pages{node="0"}"#),
        resident as f64
    );
    assert_eq!(
        q(r#"pagemesh_cache_evictions_total{node="0",kind="dirty"}"#),
        cache.dirty_evicted_pages as f64
    );
    assert_eq!(
        q(r#"pagemesh_cache_evictions_total{node="0",kind="clean"}"#),
        cache.clean_drops as f64
    );
    assert_eq!(
        q(r#"pagemesh_cache_writeback_pages_total{node="0"}"#),
        cache.writeback_pages as f64
    );
    assert_eq!(
        q(r#"pagemesh_cache_refaults_total{node="0",source="home"}"#),
        cache.refaults as f64
    );
    assert_eq!(
        q(r#"pagemesh_errors_total{node="0",kind="writeback"}"#),
        0.0
    );
    let text = promtool_checked(&admin);
    assert!(
        text.contains("# TYPE pagemesh_cache_evictions_total counter"),
        "{text}"
    );

    prom.stop().unwrap();
    assert!(compute.stop().unwrap().success());
}
