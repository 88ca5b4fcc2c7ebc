//! Nodes and the coordinator export their metrics over OTLP/HTTP to a receiver in this test,
//! which decodes each export with `opentelemetry-proto`; a node whose collector is down keeps
//! serving faults and warns once per interval.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    HistogramDataPoint, Metric, NumberDataPoint, metric, number_data_point,
};
use prost::Message;

use pagemesh_tests::{Bins, Cluster, Proc, http_json, test_dir};

/// An OTLP/HTTP receiver: HTTP/1.1 POSTs to `/v1/metrics`, bodies with a `Content-Length` or
/// chunked, kept-alive connections; every body decoded and kept.
struct Receiver {
    url: String,
    exports: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    problems: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let exports = Arc::new(Mutex::new(Vec::new()));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let (e, p) = (exports.clone(), problems.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (e, p) = (e.clone(), p.clone());
                std::thread::spawn(move || {
                    if let Err(err) = serve(stream, &e) {
                        p.lock().unwrap().push(err);
                    }
                });
            }
        });
        Self {
            url,
            exports,
            problems,
        }
    }

    fn count(&self) -> usize {
        self.exports.lock().unwrap().len()
    }

    /// The first export after the first `skip` that `pred` accepts, once there is one.
    fn wait_for(
        &self,
        what: &str,
        skip: usize,
        pred: impl Fn(&ExportMetricsServiceRequest) -> bool,
    ) -> ExportMetricsServiceRequest {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self
                .exports
                .lock()
                .unwrap()
                .iter()
                .skip(skip)
                .find(|r| pred(r))
            {
                return r.clone();
            }
            let problems = self.problems.lock().unwrap().clone();
            assert!(problems.is_empty(), "bad exports: {problems:?}");
            assert!(Instant::now() < deadline, "no export {what} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves one connection until the client closes it.
fn serve(
    stream: TcpStream,
    exports: &Mutex<Vec<ExportMetricsServiceRequest>>,
) -> Result<(), String> {
    let mut out = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_owned();
        let (mut length, mut chunked, mut content_type, mut close) = (0usize, false, None, false);
        loop {
            let mut h = String::new();
            r.read_line(&mut h).map_err(|e| e.to_string())?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').ok_or(format!("bad header {h:?}"))?;
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().map_err(|_| format!("{h:?}"))?,
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-type" => content_type = Some(value.to_owned()),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).map_err(|e| e.to_string())?;
                let size = size.trim_end();
                let size = size.split(';').next().unwrap_or_default();
                let size =
                    usize::from_str_radix(size, 16).map_err(|_| format!("chunk {size:?}"))?;
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        let mut t = String::new();
                        r.read_line(&mut t).map_err(|e| e.to_string())?;
                        if t.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                r.read_exact(&mut body[start..])
                    .map_err(|e| e.to_string())?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf).map_err(|e| e.to_string())?;
            }
        } else {
            body.resize(length, 0);
            r.read_exact(&mut body).map_err(|e| e.to_string())?;
        }
        if request_line != "POST /v1/metrics HTTP/1.1" {
            return Err(format!("unexpected request {request_line:?}"));
        }
        if content_type.as_deref() != Some("application/x-protobuf") {
            return Err(format!("content type {content_type:?}"));
        }
        let export = ExportMetricsServiceRequest::decode(body.as_slice())
            .map_err(|e| format!("undecodable export: {e}"))?;
        exports.lock().unwrap().push(export);
        // An empty ExportMetricsServiceResponse: full success.
        out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        )
        .map_err(|e| e.to_string())?;
        if close {
            return Ok(());
        }
    }
}

fn text(a: &[KeyValue], key: &str) -> Option<String> {
    match a
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?
    {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => panic!("{key} is {other:?}"),
    }
}

fn resource(r: &ExportMetricsServiceRequest, key: &str) -> Option<String> {
    text(
        &r.resource_metrics.first()?.resource.as_ref()?.attributes,
        key,
    )
}

fn from(r: &ExportMetricsServiceRequest, service: &str, instance: &str) -> bool {
    resource(r, "service.name").as_deref() == Some(service)
        && resource(r, "service.instance.id").as_deref() == Some(instance)
}

fn metric<'a>(r: &'a ExportMetricsServiceRequest, name: &str) -> Option<&'a Metric> {
    r.resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .find(|m| m.name == name)
}

/// The points of sum or gauge `name` whose attributes include `labels`.
fn number<'a>(
    r: &'a ExportMetricsServiceRequest,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a NumberDataPoint> {
    let points = match &metric(r, name)?.data {
        Some(metric::Data::Sum(s)) => &s.data_points,
        Some(metric::Data::Gauge(g)) => &g.data_points,
        other => panic!("{name} is {other:?}"),
    };
    points.iter().find(|p| {
        labels
            .iter()
            .all(|(k, v)| text(&p.attributes, k).as_deref() == Some(*v))
    })
}

fn int(p: Option<&NumberDataPoint>) -> Option<i64> {
    match p?.value? {
        number_data_point::Value::AsInt(i) => Some(i),
        number_data_point::Value::AsDouble(d) => panic!("{d} is not an integer"),
    }
}

fn histogram<'a>(
    r: &'a ExportMetricsServiceRequest,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<&'a HistogramDataPoint> {
    let Some(metric::Data::Histogram(h)) = &metric(r, name)?.data else {
        panic!("{name} is not a histogram")
    };
    h.data_points.iter().find(|p| {
        labels
            .iter()
            .all(|(k, v)| text(&p.attributes, k).as_deref() == Some(*v))
    })
}

fn wait_for_file(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the run never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_exports_the_fault_counters_its_stats_show() {
    let rx = Receiver::start();
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("otlp-node"), &[1, 2], "256MiB").unwrap();
    let (mut compute, json_path) = c
        .spawn_compute(&[
            "--mem",
            "16MiB",
            "--workload",
            "random",
            "--access",
            "read",
            // Through a page cache of 1 MiB: its figures are exported too.
            "--local-memory",
            "1MiB",
            "--hold",
            "--otlp-endpoint",
            &rx.url,
            "--otlp-interval",
            "1",
        ])
        .unwrap();
    let admin = compute.admin_url(Duration::from_secs(30)).unwrap();
    wait_for_file(&json_path);

    // The run is over: the counters no longer move, and the next export must carry them.
    let stats = http_json(&format!("{admin}/stats")).unwrap();
    let pager = &stats["pager"];
    let remote = pager["faults_remote"].as_i64().unwrap();
    assert_eq!(remote, 4096, "{stats}");
    let vm = pager["vm"].to_string();
    // The first export to arrive from now on may carry a snapshot taken just before the run
    // ended; the one after it was taken after that first one arrived, so after this read.
    let seen = rx.count();
    let export = rx.wait_for("from node 0 after the run", seen + 1, |r| {
        from(r, "pagemesh-node", "0")
    });
    assert_eq!(
        resource(&export, "pagemesh.cluster"),
        None,
        "the node has no --cluster"
    );
    let faults = |kind| {
        int(number(
            &export,
            "pagemesh.faults",
            &[("kind", kind), ("vm", &vm)],
        ))
    };
    assert_eq!(faults("remote"), Some(remote));
    assert_eq!(faults("local_zero"), pager["faults_local_zero"].as_i64());
    let m = metric(&export, "pagemesh.faults").unwrap();
    assert_eq!(m.unit, "{fault}");
    let Some(metric::Data::Sum(sum)) = &m.data else {
        panic!("{m:?}")
    };
    assert!(sum.is_monotonic);

    let h = histogram(&export, "pagemesh.fault.duration", &[("vm", &vm)]).unwrap();
    assert_eq!(
        metric(&export, "pagemesh.fault.duration").unwrap().unit,
        "s"
    );
    assert_eq!(Some(h.count), pager["fault_latency"]["count"].as_u64());
    assert!(h.count >= 4096);
    assert_eq!(h.bucket_counts.iter().sum::<u64>(), h.count);
    assert_eq!(h.bucket_counts.len(), h.explicit_bounds.len() + 1);
    assert_eq!(
        h.explicit_bounds.first(),
        Some(&1e-6),
        "bounds are in seconds"
    );
    let sum_s = h.sum.unwrap();
    assert!(sum_s > 0.0 && sum_s < 60.0, "{sum_s} s");
    for peer in ["1", "2"] {
        let t = histogram(
            &export,
            "pagemesh.transfer.duration",
            &[("peer", peer), ("vm", &vm)],
        )
        .unwrap_or_else(|| panic!("no transfers from {peer}"));
        assert_eq!(t.count, 2048);
    }
    let bytes = int(number(
        &export,
        "pagemesh.bytes_transferred",
        &[("vm", &vm)],
    ));
    assert_eq!(bytes, Some(remote * 4096));
    let cache = &pager["cache"];
    let cached = |name, labels: &[(&str, &str)]| int(number(&export, name, labels));
    assert_eq!(cached("pagemesh.cache.budget", &[("vm", &vm)]), Some(256));
    assert_eq!(
        cached("pagemesh.cache.resident", &[("vm", &vm)]),
        cache["resident_pages"].as_i64()
    );
    assert_eq!(
        cached(
            "pagemesh.cache.evictions",
            &[("kind", "clean"), ("vm", &vm)]
        ),
        cache["clean_drops"].as_i64()
    );
    assert!(cache["clean_drops"].as_i64() > Some(3000), "{stats}");
    assert_eq!(
        cached(
            "pagemesh.cache.evictions",
            &[("kind", "dirty"), ("vm", &vm)]
        ),
        Some(0),
        "a read-only guest dirties nothing"
    );
    assert_eq!(cached("pagemesh.cache.writebacks", &[("vm", &vm)]), Some(0));
    assert_eq!(
        metric(&export, "pagemesh.cache.evictions").unwrap().unit,
        "{page}"
    );
    assert!(compute.stop().unwrap().success());

    // Without --hold a compute node exits right after its guest: its last export goes out
    // as it stops, long before the next interval.
    let (status, summary, _run) = c
        .run_compute(
            &[
                "--mem",
                "8MiB",
                "--workload",
                "seq",
                "--otlp-endpoint",
                &rx.url,
                "--otlp-interval",
                "600",
            ],
            Duration::from_secs(120),
        )
        .unwrap();
    assert!(status.success(), "{summary:#?}");
    let vm = summary.vm.expect("a VM").to_string();
    let last = rx.wait_for("from the second run", 0, |r| {
        from(r, "pagemesh-node", "0")
            && number(r, "pagemesh.faults", &[("kind", "remote"), ("vm", &vm)]).is_some()
    });
    assert_eq!(
        int(number(
            &last,
            "pagemesh.faults",
            &[("kind", "remote"), ("vm", &vm)]
        )),
        i64::try_from(summary.faults.remote).ok()
    );
}

#[test]
fn the_coordinator_and_a_memory_node_in_a_cluster_export_too() {
    let rx = Receiver::start();
    let bins = Bins::for_tests().unwrap();
    let dir = test_dir("otlp-coordinator");
    // The standard variables rather than flags, this time.
    let mut coordinator = Proc::spawn(
        "coordinator",
        &dir,
        Command::new(&bins.coordinator)
            .args(["--listen", "127.0.0.1:0"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.url)
            .env("OTEL_METRIC_EXPORT_INTERVAL", "500"),
    )
    .unwrap();
    let line = coordinator
        .wait_for_line("listening on ", Duration::from_secs(20))
        .unwrap();
    let url = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let cluster = serde_json::json!({"name": "lab", "nodes": 1, "memory_mb": 64});
    ureq::post(format!("{url}/clusters"))
        .send_json(&cluster)
        .unwrap();
    let mut node = Proc::spawn(
        "node7",
        &dir,
        Command::new(&bins.node)
            .args(["--role", "memory", "--id", "7", "--listen", "127.0.0.1:0"])
            .args([
                "--coordinator",
                &url,
                "--capacity",
                "64MiB",
                "--cluster",
                "lab",
            ])
            .args(["--otlp-endpoint", &rx.url, "--otlp-interval", "0.5"]),
    )
    .unwrap();
    node.wait_for_line("serving pages on ", Duration::from_secs(30))
        .unwrap();

    let instance = url.trim_start_matches("http://");
    let export = rx.wait_for("from the coordinator with the node", 0, |r| {
        from(r, "pagemesh-coordinator", instance)
            && int(number(
                r,
                "pagemesh.coordinator.nodes",
                &[("role", "memory")],
            )) == Some(1)
    });
    assert_eq!(
        int(number(&export, "pagemesh.coordinator.vms", &[])),
        Some(0)
    );
    assert_eq!(
        int(number(&export, "pagemesh.coordinator.capacity", &[])),
        Some(64 << 20)
    );
    let registered = histogram(
        &export,
        "http.server.request.duration",
        &[
            ("http.request.method", "POST"),
            ("http.route", "/nodes/{node_id}/endpoint"),
            ("http.response.status_code", "201"),
        ],
    )
    .expect("the registration was counted");
    assert_eq!(registered.count, 1);
    assert_eq!(registered.bucket_counts.iter().sum::<u64>(), 1);

    let export = rx.wait_for("from node 7", 0, |r| from(r, "pagemesh-node", "7"));
    assert_eq!(
        resource(&export, "pagemesh.cluster").as_deref(),
        Some("lab")
    );
    assert_eq!(
        int(number(&export, "pagemesh.capacity_pages", &[])),
        Some(16384)
    );
    assert_eq!(int(number(&export, "pagemesh.pages.held", &[])), Some(0));
    assert!(
        metric(&export, "pagemesh.faults").is_none(),
        "a memory node runs no guest"
    );

    assert!(node.stop().unwrap().success());
    assert!(coordinator.stop().unwrap().success());
}

#[test]
fn a_closed_collector_port_costs_one_warning_per_interval_not_one_per_fault() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("otlp-closed"), &[1, 2], "256MiB").unwrap();
    let started = Instant::now();
    let (status, summary, run) = c
        .run_compute(
            &[
                "--mem",
                "64MiB",
                "--workload",
                "random",
                "--access",
                "read",
                "--otlp-endpoint",
                &endpoint,
                "--otlp-interval",
                "1",
            ],
            Duration::from_secs(120),
        )
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(status.success(), "{summary:#?}\n{}", run.log_tail());
    assert!(summary.ok);
    assert_eq!(summary.faults.remote, 16384);

    let log = std::fs::read_to_string(&run.stderr).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("OTLP export"))
        .collect();
    // At least the last export, as the node stopped; at most one per interval.
    assert!(!warnings.is_empty(), "no export failure logged:\n{log}");
    assert!(
        warnings.len() as f64 <= elapsed + 2.0,
        "{} warnings in {elapsed:.1} s:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        warnings.iter().all(|w| w.contains(&endpoint)),
        "{warnings:?}"
    );
}
