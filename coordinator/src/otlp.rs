//! OpenTelemetry metrics export of the coordinator over OTLP/HTTP (protobuf), when
//! `--otlp-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Through the OpenTelemetry SDK: an `opentelemetry_sdk` meter provider whose
//! `PeriodicReader` collects on a plain `std` thread of its own every interval (no async
//! runtime, so a slow collector never holds a tokio worker), and `opentelemetry-otlp`'s
//! exporter, which POSTs protobuf to `{endpoint}/v1/metrics` with reqwest's blocking client.
//! The settings are `pagemesh_otlp`'s, shared with the node: flags first, then the standard
//! `OTEL_*` variables ([`OtlpConfig::resolve`]); the endpoint, interval and protocol are
//! handed to the SDK as resolved, so that both programs read them alike. The SDK itself also
//! reads `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_METRICS_HEADERS`,
//! `OTEL_EXPORTER_OTLP_COMPRESSION` (`gzip`) and, for the resource, `OTEL_RESOURCE_ATTRIBUTES`;
//! `OTEL_SERVICE_NAME` renames the service.
//!
//! The node does not use the SDK: its histograms are precomputed (`node/src/otlp.rs` says
//! why that rules the SDK out). The coordinator has none: its request durations are recorded
//! one request at a time, which is what the SDK's histogram takes.
//!
//! What it exports (`docs/metrics.md`):
//! - `pagemesh.coordinator.nodes` (gauge, `{node}`, by `role`) and
//!   `pagemesh.coordinator.capacity` (gauge, `By`): registered nodes and the guest memory
//!   they offer; `pagemesh.coordinator.vms` (gauge, `{vm}`): VMs defined. Observable gauges,
//!   read from the store when the reader collects;
//! - `http.server.request.duration` (histogram, `s`): every API request, by
//!   `http.request.method`, `http.route` and `http.response.status_code`, as the
//!   OpenTelemetry HTTP conventions name it. [`track`] records it.
//! - `pagemesh.coordinator.auth.refusals` (counter, `{request}`, by `reason`: `missing` or
//!   `rejected`): requests refused for want of a valid cluster token (`crate::auth`).
//!
//! Resource: `service.name` = `pagemesh-coordinator`, `service.instance.id` = the address it
//! listens on, `service.version`. A failed export is logged at warn, with the endpoint, once
//! per interval, and the first one that works again at info ([`Logged`]); the SDK's own
//! logging (its `internal-logs` feature) is off, so that failures are not logged twice.
//! One thing the SDK's exporter does not let us see: a collector's partial success (points it
//! rejected in a 2xx answer), which the exporter only reports to that internal log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{ExporterBuildError, MetricExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::resource::EnvResourceDetector;

use pagemesh_api::Role;
pub use pagemesh_otlp::{DEFAULT_INTERVAL, OtlpConfig};

use crate::AppState;
use crate::auth::AuthError;

/// `service.name` of the coordinator.
pub const SERVICE_NAME: &str = "pagemesh-coordinator";

/// Upper bounds (seconds) of the request duration buckets: the coordinator answers from
/// memory in well under a millisecond, so they start lower than the HTTP conventions' advice.
pub const REQUEST_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why the export cannot start.
#[derive(thiserror::Error, Debug)]
pub enum OtlpError {
    /// The SDK refused the exporter's settings (from the flags or the `OTEL_*` variables).
    #[error("cannot set up the OTLP exporter")]
    Build(#[source] ExporterBuildError),
}

/// Durations of the API requests, in the SDK's histogram once [`start`] has made one; until
/// then (and without export) recording is a no-op. Set once rather than passed to
/// [`AppState::new`]: the instrument belongs to a meter provider whose resource names the
/// address the coordinator listens on, known only after the state exists.
#[derive(Default)]
pub struct RequestMetrics {
    duration: OnceLock<Histogram<f64>>,
    refusals: OnceLock<Counter<u64>>,
}

impl RequestMetrics {
    /// Counts one request.
    pub fn record(&self, method: &Method, route: Option<&str>, status: u16, seconds: f64) {
        let Some(duration) = self.duration.get() else {
            return;
        };
        let mut attributes = Vec::with_capacity(3);
        attributes.push(KeyValue::new("http.request.method", method_name(method)));
        if let Some(route) = route {
            attributes.push(KeyValue::new("http.route", route.to_owned()));
        }
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        duration.record(seconds, &attributes);
    }

    /// Counts one request refused for want of a valid cluster token.
    pub fn refused(&self, why: AuthError) {
        if let Some(refusals) = self.refusals.get() {
            refusals.add(1, &[KeyValue::new("reason", why.reason())]);
        }
    }
}

/// The method as the HTTP conventions want it: a known one, or `_OTHER` (so that made-up
/// methods cannot grow the series without bound).
fn method_name(m: &Method) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN
        .into_iter()
        .find(|k| *k == m.as_str())
        .unwrap_or("_OTHER")
}

/// Middleware recording every request into [`RequestMetrics`]; the route is the matched
/// template (`/nodes/{node_id}`), none for requests no route matched.
pub async fn track(
    State(metrics): State<Arc<RequestMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(req).await;
    metrics.record(
        &method,
        route.as_deref(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The running export; dropping it exports once more and stops the reader's thread. It
/// blocks meanwhile (up to the export's timeout): drop it off the async runtime's workers.
pub struct Exporter {
    provider: SdkMeterProvider,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // A last export that failed is already logged, by `Logged`.
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!("OTLP export shutdown: {e}");
        }
    }
}

/// Starts exporting the coordinator listening on `instance` (`host:port`) every
/// `config.interval`.
pub fn start(config: OtlpConfig, state: &AppState, instance: &str) -> Result<Exporter, OtlpError> {
    // reqwest's rustls takes the process's crypto provider: ring, which ureq builds already.
    // Installing it fails only when one is installed, which then serves as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = MetricExporter::builder()
        .with_http()
        .with_endpoint(config.url.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(config.interval.min(pagemesh_otlp::MAX_TIMEOUT))
        .build()
        .map_err(OtlpError::Build)?;
    let reader = PeriodicReader::builder(Logged::new(exporter, config.url.clone()))
        .with_interval(config.interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_resource(resource(instance))
        .with_reader(reader)
        .build();
    let meter = provider.meter_with_scope(
        InstrumentationScope::builder(SERVICE_NAME)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    );
    instruments(&meter, state);
    tracing::info!(url = %config.url, interval = ?config.interval, "exporting metrics over OTLP/HTTP");
    Ok(Exporter { provider })
}

/// The coordinator's resource: ours, then `OTEL_RESOURCE_ATTRIBUTES` over it, then
/// `OTEL_SERVICE_NAME` over that (the standard variables win over built-in defaults).
fn resource(instance: &str) -> Resource {
    let builder = Resource::builder_empty()
        .with_service_name(SERVICE_NAME)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance.to_owned()),
        ])
        .with_detector(Box::new(EnvResourceDetector::new()));
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => builder.with_service_name(name),
        _ => builder,
    }
    .build()
}

fn count(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Creates the coordinator's instruments on `meter`: gauges that read `state`'s store when
/// collected, and the request histogram [`track`] records into.
fn instruments(meter: &Meter, state: &AppState) {
    let store = state.store.clone();
    meter
        .i64_observable_gauge("pagemesh.coordinator.nodes")
        .with_unit("{node}")
        .with_description("Nodes registered, by role.")
        .with_callback(move |gauge| match store.nodes() {
            Ok(nodes) => {
                for role in [Role::Compute, Role::Memory, Role::Both] {
                    let n = nodes.iter().filter(|n| n.role == role).count();
                    gauge.observe(count(n), &[KeyValue::new("role", role.to_string())]);
                }
            }
            Err(e) => tracing::debug!("no node figures for OTLP: {e}"),
        })
        .build();
    let store = state.store.clone();
    meter
        .i64_observable_gauge("pagemesh.coordinator.capacity")
        .with_unit("By")
        .with_description("Guest memory the registered nodes offer to hold.")
        .with_callback(move |gauge| match store.nodes() {
            Ok(nodes) => gauge.observe(
                count(nodes.iter().map(|n| n.capacity_bytes).sum::<u64>()),
                &[],
            ),
            Err(e) => tracing::debug!("no node figures for OTLP: {e}"),
        })
        .build();
    let store = state.store.clone();
    meter
        .i64_observable_gauge("pagemesh.coordinator.vms")
        .with_unit("{vm}")
        .with_description("VMs defined.")
        .with_callback(move |gauge| match store.vms() {
            Ok(vms) => gauge.observe(count(vms.len()), &[]),
            Err(e) => tracing::debug!("no VM figures for OTLP: {e}"),
        })
        .build();
    let duration = meter
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTP server requests.")
        .with_boundaries(REQUEST_BOUNDS.to_vec())
        .build();
    if state.requests.duration.set(duration).is_err() {
        tracing::warn!("requests are already recorded for another OTLP export");
    }
    let refusals = meter
        .u64_counter("pagemesh.coordinator.auth.refusals")
        .with_unit("{request}")
        .with_description("Requests refused for want of a valid cluster token, by reason.")
        .build();
    // Set together with `duration` above: a second export was already warned about.
    let _ = state.requests.refusals.set(refusals);
}

/// The SDK's OTLP exporter, whose failures it logs: at warn, with the endpoint, each time
/// (once per interval), and at info when one works again after failures.
struct Logged {
    inner: MetricExporter,
    url: String,
    failures: AtomicU64,
}

impl Logged {
    fn new(inner: MetricExporter, url: String) -> Self {
        Self {
            inner,
            url,
            failures: AtomicU64::new(0),
        }
    }
}

impl PushMetricExporter for Logged {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Ok(()) => {
                let failures = self.failures.swap(0, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(
                        "OTLP export to {} works again after {failures} failed attempts",
                        self.url
                    );
                }
            }
            Err(e) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    "OTLP export to {} failed ({failures} in a row): {}",
                    self.url,
                    pagemesh_api::error_chain(e)
                );
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::app;
    use crate::tests::{call, register};

    /// An OTLP/HTTP receiver on a thread: the body of every POST, decoded, as it arrives.
    fn receiver() -> (String, mpsc::Receiver<ExportMetricsServiceRequest>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/metrics", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut out = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    assert_eq!(line.trim_end(), "POST /v1/metrics HTTP/1.1");
                    let mut length = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        let h = h.trim_end().to_ascii_lowercase();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if let Some(v) = h.strip_prefix("content-type:") {
                            assert_eq!(v.trim(), "application/x-protobuf");
                        }
                    }
                    let mut body = vec![0; length];
                    r.read_exact(&mut body).unwrap();
                    let _ = tx.send(ExportMetricsServiceRequest::decode(body.as_slice()).unwrap());
                    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .unwrap();
                }
            }
        });
        (url, rx)
    }

    fn config(url: String, interval: Duration) -> OtlpConfig {
        OtlpConfig { url, interval }
    }

    fn find<'a>(r: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
        r.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn attr<'a>(a: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        a.iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[tokio::test]
    async fn nodes_vms_and_requests_by_route_and_status() {
        let (url, exports) = receiver();
        let state = AppState::in_memory();
        // No export before the last one, which dropping the exporter sends.
        let exporter = start(
            config(url, Duration::from_secs(3600)),
            &state,
            "127.0.0.1:7070",
        )
        .unwrap();
        let app = app(state.clone());
        register(&app, 1, "memory", 1 << 20).await;
        register(&app, 2, "memory", 1 << 20).await;
        register(&app, 3, "compute", 0).await;
        let vm =
            json!({"compute_node": 3, "mem_bytes": 8192, "placement": {"policy": "interleave"}});
        call(&app, "POST", "/vms", Some(vm)).await;
        call(&app, "GET", "/nodes/9", None).await;
        call(&app, "GET", "/nope", None).await;
        call(&app, "BREW", "/nodes", None).await;
        tokio::task::spawn_blocking(move || drop(exporter))
            .await
            .unwrap();
        let r = exports.recv_timeout(Duration::from_secs(10)).unwrap();

        let res = &r.resource_metrics[0].resource.as_ref().unwrap().attributes;
        let s = |v: &str| any_value::Value::StringValue(v.into());
        assert_eq!(attr(res, "service.name"), Some(&s("pagemesh-coordinator")));
        assert_eq!(attr(res, "service.instance.id"), Some(&s("127.0.0.1:7070")));
        assert!(attr(res, "service.version").is_some());
        let scope = r.resource_metrics[0].scope_metrics[0]
            .scope
            .as_ref()
            .unwrap();
        assert_eq!(scope.name, SERVICE_NAME);

        let nodes = find(&r, "pagemesh.coordinator.nodes");
        assert_eq!(nodes.unit, "{node}");
        let Some(metric::Data::Gauge(nodes)) = &nodes.data else {
            panic!()
        };
        let mut by_role: Vec<_> = nodes
            .data_points
            .iter()
            .map(|p| (attr(&p.attributes, "role").cloned(), p.value))
            .collect();
        by_role.sort_by_key(|(role, _)| format!("{role:?}"));
        let int = |v| Some(number_data_point::Value::AsInt(v));
        assert_eq!(
            by_role,
            [
                (Some(s("both")), int(0)),
                (Some(s("compute")), int(1)),
                (Some(s("memory")), int(2)),
            ]
        );
        let Some(metric::Data::Gauge(vms)) = &find(&r, "pagemesh.coordinator.vms").data else {
            panic!()
        };
        assert_eq!(vms.data_points[0].value, int(1));
        let capacity = find(&r, "pagemesh.coordinator.capacity");
        assert_eq!(capacity.unit, "By");
        let Some(metric::Data::Gauge(capacity)) = &capacity.data else {
            panic!()
        };
        assert_eq!(capacity.data_points[0].value, int(2 << 20));

        let m = find(&r, "http.server.request.duration");
        assert_eq!(m.unit, "s");
        let Some(metric::Data::Histogram(h)) = &m.data else {
            panic!()
        };
        let point = |method: &str, route: Option<&str>, status: i64| {
            h.data_points
                .iter()
                .find(|p| {
                    attr(&p.attributes, "http.request.method") == Some(&s(method))
                        && attr(&p.attributes, "http.route") == route.map(s).as_ref()
                        && attr(&p.attributes, "http.response.status_code")
                            == Some(&any_value::Value::IntValue(status))
                })
                .unwrap_or_else(|| panic!("no point for {method} {route:?} {status}: {h:?}"))
        };
        let registered = point("POST", Some("/nodes/{node_id}/endpoint"), 201);
        assert_eq!(registered.count, 3);
        assert_eq!(registered.bucket_counts.iter().sum::<u64>(), 3);
        assert_eq!(registered.explicit_bounds, REQUEST_BOUNDS);
        assert_eq!(point("POST", Some("/vms"), 201).count, 1);
        assert_eq!(point("GET", Some("/nodes/{node_id}"), 404).count, 1);
        assert_eq!(point("GET", None, 404).count, 1);
        // A made-up method is `_OTHER`, whatever route it was sent to.
        assert_eq!(
            h.data_points
                .iter()
                .filter(|p| attr(&p.attributes, "http.request.method") == Some(&s("_OTHER")))
                .map(|p| p.count)
                .sum::<u64>(),
            1
        );
    }

    #[test]
    fn bounds_are_inclusive_upper_bounds() {
        let (url, exports) = receiver();
        let state = AppState::in_memory();
        let exporter = start(config(url, Duration::from_secs(3600)), &state, "c:1").unwrap();
        let m = &state.requests;
        m.record(&Method::GET, Some("/nodes"), 200, 0.00005);
        m.record(&Method::GET, Some("/nodes"), 200, 0.0001);
        m.record(&Method::GET, Some("/nodes"), 200, 99.0);
        drop(exporter);
        let r = exports.recv_timeout(Duration::from_secs(10)).unwrap();
        let Some(metric::Data::Histogram(h)) = &find(&r, "http.server.request.duration").data
        else {
            panic!()
        };
        let p = &h.data_points[0];
        assert_eq!(p.count, 3);
        assert_eq!(p.bucket_counts[0], 2);
        assert_eq!(p.bucket_counts.last(), Some(&1));
    }

    #[test]
    fn a_closed_collector_port_is_an_error_not_a_hang() {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/metrics", closed.local_addr().unwrap());
        drop(closed);
        let state = AppState::in_memory();
        let exporter = start(config(url, Duration::from_millis(300)), &state, "c:1").unwrap();
        let started = Instant::now();
        assert!(exporter.provider.force_flush().is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn settings_resolve_like_the_nodes() {
        let none = |_: &str| None;
        assert_eq!(OtlpConfig::resolve(None, None, none).unwrap(), None);
        let c = OtlpConfig::resolve(Some("http://c:4318"), None, none)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.url.as_str(), c.interval),
            ("http://c:4318/v1/metrics", DEFAULT_INTERVAL)
        );
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env/".to_owned()),
            "OTEL_METRIC_EXPORT_INTERVAL" => Some("1000".to_owned()),
            _ => None,
        };
        let c = OtlpConfig::resolve(None, None, env).unwrap().unwrap();
        assert_eq!(
            (c.url.as_str(), c.interval),
            ("http://env/v1/metrics", Duration::from_secs(1))
        );
        assert_eq!(OtlpConfig::resolve(Some("off"), None, env).unwrap(), None);
        assert!(OtlpConfig::resolve(Some("c:1"), None, none).is_err());
        assert!(OtlpConfig::resolve(Some("http://c"), Some(0.0), none).is_err());
    }
}
