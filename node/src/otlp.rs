//! OpenTelemetry metrics export: the node's figures pushed over OTLP/HTTP (protobuf) to a
//! collector, when `--otlp-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! ## Design: a snapshot exporter, not an instrumented fault path
//!
//! The pager and the page server already count everything, in atomics and HDR histograms,
//! for `GET /stats` and `GET /metrics`. The exporter reads those figures the way a Prometheus
//! scrape does: a thread of its own (`otlp`) takes [`AdminState::figures`] every interval,
//! turns it into the same series as `/metrics` ([`crate::metrics::families`], named by
//! [`crate::metrics::catalog`]), converts them into an OTLP `ExportMetricsServiceRequest`
//! ([`request`]) and POSTs it to `{endpoint}/v1/metrics` with the blocking `ureq` client and
//! a short timeout. Nothing is recorded on the fault path and nothing on it waits for the
//! network: a dead, slow or absent collector costs the exporter thread a failed POST per
//! interval, and one warning.
//!
//! ## Why the protobuf messages and not the OpenTelemetry SDK
//!
//! The coordinator exports through the SDK (`opentelemetry_sdk` and `opentelemetry-otlp`);
//! the node cannot, because of its histograms. They are HDR histograms the pager fills on the
//! fault path, and the SDK cannot take a histogram that is already bucketed: its `Histogram`
//! instrument aggregates values recorded one at a time (every fault would be recorded a
//! second time, on the fault path, into a second aggregation), the metrics API has no
//! observable (callback) histogram, and the SDK's data points (`HistogramDataPoint`, whose
//! fields are crate-private in 0.33) cannot be built outside it and handed to its exporter.
//! So the node builds `opentelemetry-proto`'s prost messages itself: a snapshot already is what
//! OTLP's cumulative temporality wants. Monotonic counters become cumulative `Sum`s, figures
//! that go up and down `Gauge`s, and the HDR histograms cumulative `Histogram`s with the
//! bucket bounds of `/metrics` (µs converted to seconds, cumulative bucket counts to
//! per-bucket counts). Every cumulative point starts at the node's start time, so a receiver
//! sees a restarted node as a reset. The counters and gauges go the same way, so that one
//! request carries them all.
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
//! The request timeout is the interval, at most [`pagemesh_otlp::MAX_TIMEOUT`]. The exporter sends a last
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
use pagemesh_api::stats::NodeStats;
pub use pagemesh_otlp::{Exporter, OtlpConfig, OtlpError, Sender};
use pagemesh_otlp::{text, unix_ns};
use prost::Message;

use crate::admin::AdminState;
use crate::config::{ConfigError, Settings};
use crate::metrics::catalog::Kind;
use crate::metrics::families::{Buckets, Family, Point, Value, families};

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

/// One OTLP histogram point from a snapshot's buckets; the overflow bucket is the one OTLP
/// adds after the last bound.
fn histogram_point(
    b: &Buckets,
    attributes: Vec<KeyValue>,
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: b.count,
        sum: Some(b.sum_s),
        bucket_counts: b.counts.clone(),
        explicit_bounds: b.bounds_s.clone(),
        max: b.max_s,
        ..HistogramDataPoint::default()
    }
}

/// The OTLP metric of one family of a snapshot: every point stamped `now`, cumulative ones
/// starting at `start`.
fn otlp_metric(f: &Family, start: u64, now: u64) -> Metric {
    let m = f.metric;
    let number = |p: &Point, start: u64| {
        let value = match p.value {
            Value::Int(v) => number_data_point::Value::AsInt(i64::try_from(v).unwrap_or(i64::MAX)),
            Value::Float(v) => number_data_point::Value::AsDouble(v),
            Value::Histogram(_) => return None,
        };
        Some(NumberDataPoint {
            attributes: attributes(p),
            start_time_unix_nano: start,
            time_unix_nano: now,
            value: Some(value),
            ..NumberDataPoint::default()
        })
    };
    let data = match m.kind {
        Kind::Counter => metric::Data::Sum(Sum {
            data_points: f.points.iter().filter_map(|p| number(p, start)).collect(),
            aggregation_temporality: AggregationTemporality::Cumulative.into(),
            is_monotonic: true,
        }),
        // A gauge's value is of its moment: no start time.
        Kind::Gauge => metric::Data::Gauge(Gauge {
            data_points: f.points.iter().filter_map(|p| number(p, 0)).collect(),
        }),
        Kind::Histogram => metric::Data::Histogram(Histogram {
            data_points: f
                .points
                .iter()
                .filter_map(|p| match &p.value {
                    Value::Histogram(b) => Some(histogram_point(b, attributes(p), start, now)),
                    _ => None,
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Cumulative.into(),
        }),
    };
    Metric {
        name: m.otlp.to_owned(),
        description: m.help.to_owned(),
        unit: m.unit.to_owned(),
        data: Some(data),
        ..Metric::default()
    }
}

fn attributes(p: &Point) -> Vec<KeyValue> {
    p.labels.iter().map(|(k, v)| text(k, v)).collect()
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
    let metrics = families(s)
        .iter()
        .map(|f| otlp_metric(f, start, now))
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "pagemesh-node".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                metrics,
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

    use pagemesh_api::stats::{self, Bucket, EbpfStats, PagerStats, PeerStats, ServerStats};

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
    fn a_histogram_point_carries_the_buckets_in_seconds() {
        let h = hist(
            &[(1.0, 2), (10.0, 2), (100.0, 7), (f64::INFINITY, 9)],
            9,
            450.0,
            250.0,
        );
        let p = histogram_point(&Buckets::from_stats(&h), vec![], 1, 2);
        assert_eq!(p.explicit_bounds, [1e-6, 1e-5, 1e-4]);
        assert_eq!(p.bucket_counts, [2, 0, 5, 2]);
        assert_eq!(p.count, 9);
        assert_eq!(p.sum, Some(450e-6));
        assert_eq!(p.max, Some(250e-6));
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1, 2));
        let empty = histogram_point(
            &Buckets::from_stats(&stats::Histogram::default()),
            vec![],
            0,
            0,
        );
        assert_eq!(
            (empty.bucket_counts.as_slice(), empty.max),
            (&[0][..], None)
        );
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
                lost_nodes: Vec::new(),
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
