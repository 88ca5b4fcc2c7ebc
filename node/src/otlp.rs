//! OpenTelemetry metrics export: the node's figures pushed over OTLP/HTTP (protobuf) to a
//! collector, when `--otlp-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! ## Design: a snapshot exporter, not an instrumented fault path
//!
//! The pager and the page server already count everything, in atomics and HDR histograms,
//! for `GET /stats` and `GET /metrics`. The exporter reads those figures the way a Prometheus
//! scrape does: a thread of its own (`otlp`) takes [`AdminState::snapshot`] every interval,
//! converts it into an OTLP `ExportMetricsServiceRequest` ([`request`]) and POSTs it to
//! `{endpoint}/v1/metrics` with the blocking `ureq` client and a short timeout. Nothing is
//! recorded on the fault path and nothing on it waits for the network: a dead, slow or absent
//! collector costs the exporter thread a failed POST per interval, and one warning.
//!
//! We use OpenTelemetry's wire format (`opentelemetry-proto`'s prost messages), not its SDK.
//! The SDK would have us record every fault a second time into its own instruments, and its
//! periodic reader runs exporters on a thread of its own, where its async HTTP clients panic
//! for want of a tokio runtime (the known pitfall the issue warns about). It would buy us
//! nothing: a snapshot already is what OTLP's cumulative temporality wants. Monotonic
//! counters become cumulative `Sum`s, figures that go up and down `Gauge`s, and the HDR
//! histograms cumulative `Histogram`s with the bucket bounds of `/metrics` (µs converted to
//! seconds, cumulative bucket counts to per-bucket counts). Every cumulative point starts at
//! the node's start time, so a receiver sees a restarted node as a reset.
//!
//! ## Names
//!
//! The OTLP name of each metric is its `/metrics` name without the unit and `_total`
//! suffixes, with dots between namespace levels (`pagemesh_faults_total` is
//! `pagemesh.faults`, unit `{fault}`; `pagemesh_fault_duration_seconds` is
//! `pagemesh.fault.duration`, unit `s`), so that the OpenTelemetry Collector's Prometheus
//! exporter turns each back into the `/metrics` name. Attributes are the Prometheus labels,
//! as strings; the `node` label is the resource's `service.instance.id`. `docs/metrics.md`
//! has the table.
//!
//! ## Settings
//!
//! | setting | source, first found wins |
//! |---|---|
//! | endpoint | `--otlp-endpoint` (or `otlp_endpoint` in the config file; `off` disables), `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (used as is), `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/metrics` appended) |
//! | interval | `--otlp-interval SECS`, `OTEL_METRIC_EXPORT_INTERVAL` (ms), 10 s |
//! | off | `OTEL_SDK_DISABLED=true` or `OTEL_METRICS_EXPORTER=none` turn off an endpoint that came from the environment |
//!
//! The request timeout is the interval, at most [`MAX_TIMEOUT`]. The exporter sends a last
//! export when the node stops ([`Exporter`]'s `Drop`), so that a compute node that exits
//! right after its guest still reports the whole run.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use pagemesh_api::stats::{self, NodeStats};
pub use pagemesh_otlp::{Exporter, OtlpConfig, OtlpError, Sender};
use pagemesh_otlp::{text, unix_ns};
use prost::Message;

use crate::admin::AdminState;
use crate::config::{ConfigError, Settings};
use crate::metrics::catalog;

/// `service.name` of every node.
pub const SERVICE_NAME: &str = "pagemesh-node";

/// The export the settings and the process environment ask for, if any.
pub fn config_from_settings(settings: &Settings) -> Result<Option<OtlpConfig>, ConfigError> {
    resolve_config(
        settings.otlp_endpoint.as_deref(),
        settings.otlp_interval,
        |key| std::env::var(key).ok(),
    )
}

/// [`OtlpConfig::resolve`], its bad settings reported as the node's configuration errors.
pub fn resolve_config(
    endpoint: Option<&str>,
    interval: Option<f64>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpConfig>, ConfigError> {
    OtlpConfig::resolve(endpoint, interval, env).map_err(|e| match e {
        OtlpError::Invalid { what, why } => ConfigError::Invalid { what, why },
        other => ConfigError::Invalid {
            what: "OTLP settings",
            why: other.to_string(),
        },
    })
}

/// Starts exporting `state` if the settings or the environment ask for it. A bad setting is
/// an error; a thread that cannot start is logged and the node runs without export.
pub fn start(settings: &Settings, state: Arc<AdminState>) -> Result<Option<Exporter>, ConfigError> {
    let Some(config) = config_from_settings(settings)? else {
        return Ok(None);
    };
    let resource = resource(
        &state.node_id.to_string(),
        settings.cluster.as_deref().filter(|c| !c.is_empty()),
    );
    let start_ns = unix_ns(
        SystemTime::now()
            .checked_sub(state.uptime())
            .unwrap_or(UNIX_EPOCH),
    );
    tracing::info!(
        "exporting metrics over OTLP/HTTP to {} every {:?}",
        config.url,
        config.interval
    );
    let snapshot = move || {
        request(
            &state.figures(),
            resource.clone(),
            start_ns,
            unix_ns(SystemTime::now()),
        )
        .encode_to_vec()
    };
    Ok(pagemesh_otlp::spawn(config, snapshot))
}

/// The resource of node `instance`: `service.name`, `service.version`,
/// `service.instance.id` and, when it has one, `pagemesh.cluster`.
pub fn resource(instance: &str, cluster: Option<&str>) -> Resource {
    let mut attributes = vec![
        text("service.name", SERVICE_NAME),
        text("service.version", env!("CARGO_PKG_VERSION")),
        text("service.instance.id", instance),
    ];
    if let Some(c) = cluster {
        attributes.push(text("pagemesh.cluster", c));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

fn attrs(labels: &[(&str, &str)]) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| text(k, v)).collect()
}

/// Builds the metrics of one export; every point is stamped `now`, cumulative ones start
/// at `start`.
struct Points {
    start: u64,
    now: u64,
    metrics: Vec<Metric>,
}

impl Points {
    fn push(&mut self, m: &catalog::Metric, data: metric::Data) {
        self.metrics.push(Metric {
            name: m.otlp.to_owned(),
            description: m.help.to_owned(),
            unit: m.unit.to_owned(),
            data: Some(data),
            ..Metric::default()
        });
    }

    fn number(&self, labels: &[(&str, &str)], value: number_data_point::Value) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs(labels),
            start_time_unix_nano: self.start,
            time_unix_nano: self.now,
            value: Some(value),
            ..NumberDataPoint::default()
        }
    }

    /// A monotonic cumulative counter.
    fn counter(&mut self, m: &catalog::Metric, points: &[(&[(&str, &str)], u64)]) {
        let data_points = points
            .iter()
            .map(|(labels, v)| {
                self.number(
                    labels,
                    number_data_point::Value::AsInt(i64::try_from(*v).unwrap_or(i64::MAX)),
                )
            })
            .collect();
        self.push(
            m,
            metric::Data::Sum(Sum {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative.into(),
                is_monotonic: true,
            }),
        );
    }

    /// A gauge; integer values are given as `f64`s that are whole.
    fn gauge(&mut self, m: &catalog::Metric, points: &[(&[(&str, &str)], f64)], int: bool) {
        let data_points = points
            .iter()
            .map(|(labels, v)| {
                let mut p = self.number(
                    labels,
                    if int {
                        number_data_point::Value::AsInt(*v as i64)
                    } else {
                        number_data_point::Value::AsDouble(*v)
                    },
                );
                p.start_time_unix_nano = 0;
                p
            })
            .collect();
        self.push(m, metric::Data::Gauge(Gauge { data_points }));
    }

    /// A cumulative histogram (of durations, in the metric's unit: seconds).
    fn histogram(&mut self, m: &catalog::Metric, points: &[(&[(&str, &str)], &stats::Histogram)]) {
        let data_points = points
            .iter()
            .map(|(labels, h)| histogram_point(h, attrs(labels), self.start, self.now))
            .collect();
        self.push(
            m,
            metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative.into(),
            }),
        );
    }
}

/// One OTLP histogram point from a `/stats` histogram: bounds in seconds, and the count of
/// each bucket rather than the count up to its bound. The `+Inf` bucket becomes the overflow
/// bucket OTLP adds after the last bound.
pub fn histogram_point(
    h: &stats::Histogram,
    attributes: Vec<KeyValue>,
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    let mut explicit_bounds = Vec::with_capacity(h.buckets.len());
    let mut bucket_counts = Vec::with_capacity(h.buckets.len() + 1);
    let mut below = 0u64;
    for b in h.buckets.iter().filter(|b| b.le_us.is_finite()) {
        explicit_bounds.push(b.le_us / 1e6);
        bucket_counts.push(b.count.saturating_sub(below));
        below = below.max(b.count);
    }
    // OTLP wants count == the sum of the bucket counts; a `/stats` histogram is consistent,
    // but a torn read must not produce an invalid point.
    let count = h.count.max(below);
    bucket_counts.push(count - below);
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count,
        sum: Some(h.sum_us / 1e6),
        bucket_counts,
        explicit_bounds,
        max: (count > 0).then_some(h.max_us / 1e6),
        ..HistogramDataPoint::default()
    }
}

/// The OTLP request for snapshot `s` of a node whose resource is `resource`; cumulative
/// points start at `start` (ns since the Unix epoch, the node's start), all are stamped `now`.
/// The metrics are those of [`crate::metrics::prometheus_text`], under their OTLP names.
pub fn request(
    s: &NodeStats,
    resource: Resource,
    start: u64,
    now: u64,
) -> ExportMetricsServiceRequest {
    let mut o = Points {
        start,
        now,
        metrics: Vec::new(),
    };
    let none: &[(&str, &str)] = &[];
    o.gauge(&catalog::UPTIME, &[(none, s.uptime_s)], false);
    o.gauge(
        &catalog::PAGES_HELD,
        &[(none, s.server.pages_held as f64)],
        true,
    );
    o.gauge(
        &catalog::CAPACITY,
        &[(none, s.server.capacity_pages as f64)],
        true,
    );
    o.counter(
        &catalog::PAGES_SERVED,
        &[
            (&[("claimed", "true")], s.server.pages_claimed),
            (
                &[("claimed", "false")],
                s.server.pages_served.saturating_sub(s.server.pages_claimed),
            ),
        ],
    );
    o.counter(
        &catalog::WRITTEN_BACK,
        &[(none, s.server.pages_written_back)],
    );
    o.counter(
        &catalog::ERRORS,
        &[
            (&[("kind", "bad_frame")], s.server.bad_frames),
            (
                &[("kind", "fault")],
                s.pager.as_ref().map_or(0, |p| p.fault_errors),
            ),
        ],
    );
    if let Some(p) = &s.pager {
        let vm = p.vm.to_string();
        let vm = vm.as_str();
        o.counter(
            &catalog::FAULTS,
            &[
                (&[("kind", "remote"), ("vm", vm)], p.faults_remote),
                (&[("kind", "local_zero"), ("vm", vm)], p.faults_local_zero),
                (&[("kind", "spurious"), ("vm", vm)], p.faults_spurious),
            ],
        );
        o.gauge(
            &catalog::REMOTE_MISS_RATIO,
            &[(&[("vm", vm)], p.remote_miss_ratio)],
            false,
        );
        o.counter(
            &catalog::BYTES_TRANSFERRED,
            &[(&[("direction", "in"), ("vm", vm)], p.bytes_fetched)],
        );
        o.histogram(
            &catalog::FAULT_DURATION,
            &[(&[("vm", vm)], &p.fault_latency)],
        );
        let peers: Vec<(String, &stats::Histogram)> = p
            .peers
            .iter()
            .map(|peer| (peer.node_id.to_string(), &peer.transfer))
            .collect();
        let labels: Vec<[(&str, &str); 2]> = peers
            .iter()
            .map(|(id, _)| [("peer", id.as_str()), ("vm", vm)])
            .collect();
        let points: Vec<(&[(&str, &str)], &stats::Histogram)> = labels
            .iter()
            .zip(&peers)
            .map(|(l, (_, h))| (l.as_slice(), *h))
            .collect();
        if !points.is_empty() {
            o.histogram(&catalog::TRANSFER_DURATION, &points);
        }
    }
    if let Some(e) = &s.ebpf {
        o.histogram(&catalog::VCPU_STALL_DURATION, &[(none, &e.stall)]);
    }
    // One metric, a point per source: the pager's own timing and the kernel's.
    let pager_vm = s.pager.as_ref().map(|p| p.vm.to_string());
    let pager_labels: Vec<(&str, &str)> = match &pager_vm {
        Some(vm) => vec![("source", "pager"), ("vm", vm.as_str())],
        None => Vec::new(),
    };
    let ebpf_labels = [("source", "ebpf")];
    let mut install: Vec<(&[(&str, &str)], &stats::Histogram)> = Vec::new();
    if let Some(p) = &s.pager {
        install.push((pager_labels.as_slice(), &p.install_latency));
    }
    if let Some(e) = &s.ebpf {
        install.push((&ebpf_labels, &e.install));
    }
    if !install.is_empty() {
        o.histogram(&catalog::INSTALL_DURATION, &install);
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "pagemesh-node".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                metrics: o.metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use opentelemetry_proto::tonic::common::v1::any_value;
    use pagemesh_otlp::DEFAULT_INTERVAL;

    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use pagemesh_api::stats::{Bucket, EbpfStats, PagerStats, PeerStats, ServerStats};

    use super::*;

    fn hist(buckets: &[(f64, u64)], count: u64, sum_us: f64, max_us: f64) -> stats::Histogram {
        stats::Histogram {
            count,
            sum_us,
            max_us,
            buckets: buckets
                .iter()
                .map(|&(le_us, count)| Bucket { le_us, count })
                .collect(),
            ..stats::Histogram::default()
        }
    }

    #[test]
    fn cumulative_buckets_become_per_bucket_counts_in_seconds() {
        let h = hist(
            &[(1.0, 2), (10.0, 2), (100.0, 7), (f64::INFINITY, 9)],
            9,
            450.0,
            250.0,
        );
        let p = histogram_point(&h, vec![], 1, 2);
        assert_eq!(p.explicit_bounds, [1e-6, 1e-5, 1e-4]);
        assert_eq!(p.bucket_counts, [2, 0, 5, 2]);
        assert_eq!(p.count, 9);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
        assert_eq!(p.sum, Some(450e-6));
        assert_eq!(p.max, Some(250e-6));
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1, 2));
    }

    #[test]
    fn empty_and_torn_histograms_stay_valid_points() {
        let empty = histogram_point(&stats::Histogram::default(), vec![], 0, 0);
        assert!(empty.explicit_bounds.is_empty());
        assert_eq!(empty.bucket_counts, [0]);
        assert_eq!(empty.max, None);
        // Buckets read after more samples arrived than `count` says.
        let torn = histogram_point(
            &hist(&[(5.0, 4), (f64::INFINITY, 3)], 3, 1.0, 1.0),
            vec![],
            0,
            0,
        );
        assert_eq!(torn.count, 4);
        assert_eq!(torn.bucket_counts, [4, 0]);
        // The pager's real bucket bounds.
        let real = pagemesh_pager::stats::BUCKETS_US;
        let mut buckets: Vec<(f64, u64)> = real.iter().map(|&b| (b, 1)).collect();
        buckets.push((f64::INFINITY, 1));
        let p = histogram_point(&hist(&buckets, 1, 0.5, 0.5), vec![], 0, 0);
        assert_eq!(p.explicit_bounds.len(), real.len());
        assert_eq!(p.bucket_counts.len(), real.len() + 1);
        assert_eq!(p.bucket_counts[0], 1);
        assert_eq!(p.explicit_bounds.last(), Some(&0.1));
    }

    fn metric<'a>(r: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
        r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn labels(a: &[KeyValue]) -> HashMap<&str, &str> {
        a.iter()
            .map(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => (kv.key.as_str(), s.as_str()),
                    other => panic!("{} is {other:?}", kv.key),
                },
            )
            .collect()
    }

    fn sample() -> NodeStats {
        let h = hist(&[(10.0, 3), (f64::INFINITY, 5)], 5, 100.0, 40.0);
        NodeStats {
            node_id: 3,
            uptime_s: 12.5,
            server: ServerStats {
                pages_held: 10,
                capacity_pages: 100,
                pages_served: 7,
                pages_claimed: 5,
                ..ServerStats::default()
            },
            pager: Some(PagerStats {
                vm: 7,
                faults_remote: 5,
                faults_local_zero: 2,
                remote_miss_ratio: 5.0 / 7.0,
                bytes_fetched: 5 * 4096,
                fault_latency: h.clone(),
                install_latency: h.clone(),
                peers: vec![PeerStats {
                    node_id: 1,
                    pages: 5,
                    transfer: h.clone(),
                }],
                ..PagerStats::default()
            }),
            ebpf: Some(EbpfStats {
                stall: h.clone(),
                install: h,
                ..EbpfStats::default()
            }),
            ..NodeStats::default()
        }
    }

    #[test]
    fn a_snapshot_becomes_sums_gauges_and_histograms_with_units() {
        let r = request(&sample(), resource("3", Some("lab")), 100, 200);
        let rm = &r.resource_metrics[0];
        let res = labels(&rm.resource.as_ref().unwrap().attributes);
        assert_eq!(res["service.name"], "pagemesh-node");
        assert_eq!(res["service.instance.id"], "3");
        assert_eq!(res["pagemesh.cluster"], "lab");
        assert!(!labels(&resource("3", None).attributes).contains_key("pagemesh.cluster"));

        let faults = metric(&r, "pagemesh.faults");
        assert_eq!(faults.unit, "{fault}");
        let Some(metric::Data::Sum(sum)) = &faults.data else {
            panic!("{faults:?}")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let remote = sum
            .data_points
            .iter()
            .find(|p| labels(&p.attributes)["kind"] == "remote")
            .unwrap();
        assert_eq!(labels(&remote.attributes)["vm"], "7");
        assert_eq!(remote.value, Some(number_data_point::Value::AsInt(5)));
        assert_eq!(
            (remote.start_time_unix_nano, remote.time_unix_nano),
            (100, 200)
        );

        let served = metric(&r, "pagemesh.pages.served");
        let Some(metric::Data::Sum(sum)) = &served.data else {
            panic!()
        };
        let values: Vec<_> = sum.data_points.iter().map(|p| p.value).collect();
        assert_eq!(
            values,
            [
                Some(number_data_point::Value::AsInt(5)),
                Some(number_data_point::Value::AsInt(2))
            ]
        );

        let ratio = metric(&r, "pagemesh.remote_miss_ratio");
        assert_eq!(ratio.unit, "1");
        let Some(metric::Data::Gauge(g)) = &ratio.data else {
            panic!()
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(5.0 / 7.0))
        );
        assert_eq!(metric(&r, "pagemesh.uptime").unit, "s");
        assert_eq!(metric(&r, "pagemesh.bytes_transferred").unit, "By");

        for name in [
            "pagemesh.fault.duration",
            "pagemesh.transfer.duration",
            "pagemesh.vcpu_stall.duration",
            "pagemesh.install.duration",
        ] {
            let m = metric(&r, name);
            assert_eq!(m.unit, "s", "{name}");
            let Some(metric::Data::Histogram(h)) = &m.data else {
                panic!("{name}")
            };
            assert_eq!(
                h.aggregation_temporality,
                AggregationTemporality::Cumulative as i32
            );
            let p = &h.data_points[0];
            assert_eq!(p.count, 5);
            assert_eq!(p.bucket_counts, [3, 2]);
            assert_eq!(p.explicit_bounds, [1e-5]);
            assert_eq!(p.sum, Some(1e-4));
        }
        let transfer = metric(&r, "pagemesh.transfer.duration");
        let Some(metric::Data::Histogram(h)) = &transfer.data else {
            panic!()
        };
        assert_eq!(labels(&h.data_points[0].attributes)["peer"], "1");

        // Every `/metrics` family has its OTLP counterpart.
        let names: Vec<&str> = r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        let prom = crate::metrics::prometheus_text(&sample());
        let families = prom.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(names.len(), families, "{names:?}");
        // It survives the wire.
        let bytes = r.encode_to_vec();
        assert_eq!(
            ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap(),
            r
        );
    }

    type Vars = &'static [(&'static str, &'static str)];

    /// What `--otlp-endpoint endpoint --otlp-interval interval` resolve to with `vars` set.
    fn resolve(
        endpoint: Option<&str>,
        interval: Option<f64>,
        vars: Vars,
    ) -> Result<Option<(String, Duration)>, ConfigError> {
        let env = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        };
        Ok(resolve_config(endpoint, interval, env)?.map(|c| (c.url, c.interval)))
    }

    fn ok(url: &str, interval: Duration) -> Option<(String, Duration)> {
        Some((url.to_owned(), interval))
    }

    #[test]
    fn endpoint_and_interval_come_from_flags_then_the_environment() {
        let url = "http://c:4318/v1/metrics";
        assert_eq!(resolve(None, None, &[]).unwrap(), None);
        assert_eq!(
            resolve(Some("http://c:4318/"), None, &[]).unwrap(),
            ok(url, DEFAULT_INTERVAL)
        );
        assert_eq!(
            resolve(Some(url), Some(0.5), &[]).unwrap(),
            ok(url, Duration::from_millis(500))
        );

        let std_env: Vars = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://env:4318"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "2500"),
        ];
        assert_eq!(
            resolve(None, None, std_env).unwrap(),
            ok("https://env:4318/v1/metrics", Duration::from_millis(2500))
        );
        // Flags win.
        assert_eq!(
            resolve(Some("http://flag"), Some(3.0), std_env).unwrap(),
            ok("http://flag/v1/metrics", Duration::from_secs(3))
        );
        assert_eq!(resolve(Some("off"), None, std_env).unwrap(), None);
        let signal: Vars = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:1/custom"),
        ];
        assert_eq!(
            resolve(None, None, signal).unwrap(),
            ok("http://m:1/custom", DEFAULT_INTERVAL)
        );
        let off: Vars = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://base"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ];
        assert_eq!(resolve(None, None, off).unwrap(), None);

        let bad_interval: Vars = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "10s"),
        ];
        for (endpoint, interval, vars) in [
            (Some("c:4318"), None, &[][..]),
            (Some("http://c"), Some(0.0), &[]),
            (Some("http://c"), Some(-1.0), &[]),
            (None, None, bad_interval),
            (None, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")]),
        ] {
            let err = resolve(endpoint, interval, vars).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        }
    }

    fn config(url: String) -> OtlpConfig {
        OtlpConfig {
            url,
            interval: Duration::from_millis(300),
        }
    }

    #[test]
    fn failures_are_errors_not_hangs() {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/metrics", closed.local_addr().unwrap());
        drop(closed);
        let err = Sender::new(&config(url)).send(vec![1, 2, 3]).unwrap_err();
        assert!(matches!(err, OtlpError::Send(_)), "{err}");

        // A receiver that accepts and never answers: the timeout (the interval) ends it.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/metrics", silent.local_addr().unwrap());
        let started = Instant::now();
        let err = Sender::new(&config(url)).send(vec![0; 100]).unwrap_err();
        assert!(matches!(err, OtlpError::Send(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        for (answer, want) in [
            (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                Some(503),
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", None),
        ] {
            let server = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/v1/metrics", server.local_addr().unwrap());
            let t = std::thread::spawn(move || {
                let (mut s, _) = server.accept().unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                s.write_all(answer.as_bytes()).unwrap();
            });
            let got = Sender::new(&config(url)).send(vec![]);
            t.join().unwrap();
            match (got, want) {
                (Err(OtlpError::Status(s)), Some(w)) => assert_eq!(s, w),
                (Ok(()), None) => {}
                (got, _) => panic!("{got:?} for {answer:?}"),
            }
        }
    }
}
