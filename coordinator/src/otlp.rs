//! OpenTelemetry metrics export of the coordinator over OTLP/HTTP (protobuf), when
//! `--otlp-endpoint URL` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! The same design as the node's exporter (`node/src/otlp.rs`, whose module doc gives the
//! reasons): no OpenTelemetry SDK, a thread of its own that reads the figures every
//! interval, builds an `ExportMetricsServiceRequest` with `opentelemetry-proto`'s messages
//! and POSTs it to `{endpoint}/v1/metrics`; the settings, the sender and the export thread
//! are `pagemesh_otlp`'s, shared with the node. The thread is a plain `std` thread, so a slow
//! collector never holds a tokio worker; the store's methods are synchronous and quick. This
//! module only says what the coordinator exports.
//!
//! What it exports (`docs/metrics.md`):
//! - `pagemesh.coordinator.nodes` (gauge, `{node}`, by `role`) and
//!   `pagemesh.coordinator.capacity` (gauge, `By`): registered nodes and the guest memory
//!   they offer;
//! - `pagemesh.coordinator.vms` (gauge, `{vm}`): VMs defined;
//! - `http.server.request.duration` (histogram, `s`): every API request, by
//!   `http.request.method`, `http.route` and `http.response.status_code`, as the
//!   OpenTelemetry HTTP conventions name it. [`track`] records it, one short lock per request.
//!
//! Resource: `service.name` = `pagemesh-coordinator`, `service.instance.id` = the address it
//! listens on. Export failures are logged at warn once per interval, and never stop it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use pagemesh_api::Role;

use crate::AppState;

/// `service.name` of the coordinator.
pub const SERVICE_NAME: &str = "pagemesh-coordinator";

/// Upper bounds (seconds) of the request duration buckets: the coordinator answers from
/// memory in well under a millisecond, so they start lower than the HTTP conventions' advice.
pub const REQUEST_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub use pagemesh_otlp::{DEFAULT_INTERVAL, Exporter, OtlpConfig};
use pagemesh_otlp::{kv, text, unix_ns};

/// Durations of the API requests, by method, route and status.
#[derive(Default)]
pub struct RequestMetrics {
    series: Mutex<BTreeMap<RequestKey, Buckets>>,
}

/// (method, route template if one matched, status).
type RequestKey = (&'static str, Option<String>, u16);

#[derive(Clone)]
struct Buckets {
    count: u64,
    sum_s: f64,
    /// One per bound in [`REQUEST_BOUNDS`], and the overflow.
    counts: Vec<u64>,
}

impl Buckets {
    fn new() -> Self {
        Self {
            count: 0,
            sum_s: 0.0,
            counts: vec![0; REQUEST_BOUNDS.len() + 1],
        }
    }
}

impl RequestMetrics {
    /// Counts one request.
    pub fn record(&self, method: &Method, route: Option<&str>, status: u16, seconds: f64) {
        let key = (method_name(method), route.map(str::to_owned), status);
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let b = series.entry(key).or_insert_with(Buckets::new);
        b.count += 1;
        b.sum_s += seconds;
        let i = REQUEST_BOUNDS.partition_point(|&le| le < seconds);
        b.counts[i] += 1;
    }

    fn snapshot(&self) -> Vec<(RequestKey, Buckets)> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.iter().map(|(k, b)| (k.clone(), b.clone())).collect()
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

/// Starts exporting the coordinator listening on `instance` (`host:port`) every
/// `config.interval`. A thread that cannot start is logged, and the coordinator runs on.
pub fn start(config: OtlpConfig, state: AppState, instance: String) -> Option<Exporter> {
    let start_ns = unix_ns(SystemTime::now());
    tracing::info!(url = %config.url, interval = ?config.interval, "exporting metrics over OTLP/HTTP");
    pagemesh_otlp::spawn(config, move || {
        request(&state, &instance, start_ns, unix_ns(SystemTime::now())).encode_to_vec()
    })
}

fn gauge(
    name: &str,
    unit: &str,
    description: &str,
    points: Vec<(Vec<KeyValue>, i64)>,
    now: u64,
) -> Metric {
    let data_points = points
        .into_iter()
        .map(|(attributes, v)| NumberDataPoint {
            attributes,
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsInt(v)),
            ..NumberDataPoint::default()
        })
        .collect();
    Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Gauge(Gauge { data_points })),
        ..Metric::default()
    }
}

/// The OTLP request for the coordinator listening on `instance`: cumulative points start at
/// `start`, every point is stamped `now` (ns since the Unix epoch).
pub fn request(
    state: &AppState,
    instance: &str,
    start: u64,
    now: u64,
) -> ExportMetricsServiceRequest {
    let mut metrics = Vec::new();
    match state.store.nodes() {
        Ok(nodes) => {
            let points = [Role::Compute, Role::Memory, Role::Both]
                .into_iter()
                .map(|role| {
                    let n = nodes.iter().filter(|n| n.role == role).count();
                    (
                        vec![text("role", &role.to_string())],
                        i64::try_from(n).unwrap_or(i64::MAX),
                    )
                })
                .collect();
            metrics.push(gauge(
                "pagemesh.coordinator.nodes",
                "{node}",
                "Nodes registered, by role.",
                points,
                now,
            ));
            let capacity: u64 = nodes.iter().map(|n| n.capacity_bytes).sum();
            metrics.push(gauge(
                "pagemesh.coordinator.capacity",
                "By",
                "Guest memory the registered nodes offer to hold.",
                vec![(vec![], i64::try_from(capacity).unwrap_or(i64::MAX))],
                now,
            ));
        }
        Err(e) => tracing::debug!("no node figures for OTLP: {e}"),
    }
    match state.store.vms() {
        Ok(vms) => metrics.push(gauge(
            "pagemesh.coordinator.vms",
            "{vm}",
            "VMs defined.",
            vec![(vec![], i64::try_from(vms.len()).unwrap_or(i64::MAX))],
            now,
        )),
        Err(e) => tracing::debug!("no VM figures for OTLP: {e}"),
    }
    let requests = state.requests.snapshot();
    if !requests.is_empty() {
        let data_points = requests
            .into_iter()
            .map(|((method, route, status), b)| {
                let mut attributes = vec![text("http.request.method", method)];
                if let Some(route) = route {
                    attributes.push(text("http.route", &route));
                }
                attributes.push(kv(
                    "http.response.status_code",
                    any_value::Value::IntValue(status.into()),
                ));
                HistogramDataPoint {
                    attributes,
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    count: b.count,
                    sum: Some(b.sum_s),
                    bucket_counts: b.counts,
                    explicit_bounds: REQUEST_BOUNDS.to_vec(),
                    ..HistogramDataPoint::default()
                }
            })
            .collect();
        metrics.push(Metric {
            name: "http.server.request.duration".into(),
            description: "Duration of HTTP server requests.".into(),
            unit: "s".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative.into(),
            })),
            ..Metric::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    text("service.name", SERVICE_NAME),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                    text("service.instance.id", instance),
                ],
                ..Resource::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: SERVICE_NAME.into(),
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
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::app;
    use crate::tests::{call, register};

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
        let state = AppState::in_memory();
        let app = app(state.clone());
        register(&app, 1, "memory", 1 << 20).await;
        register(&app, 2, "memory", 1 << 20).await;
        register(&app, 3, "compute", 0).await;
        let vm =
            json!({"compute_node": 3, "mem_bytes": 8192, "placement": {"policy": "interleave"}});
        call(&app, "POST", "/vms", Some(vm)).await;
        call(&app, "GET", "/nodes/9", None).await;
        call(&app, "GET", "/nope", None).await;

        let r = request(&state, "127.0.0.1:7070", 1, 2);
        let res = &r.resource_metrics[0].resource.as_ref().unwrap().attributes;
        let s = |v: &str| any_value::Value::StringValue(v.into());
        assert_eq!(attr(res, "service.name"), Some(&s("pagemesh-coordinator")));
        assert_eq!(attr(res, "service.instance.id"), Some(&s("127.0.0.1:7070")));

        let Some(metric::Data::Gauge(nodes)) = &find(&r, "pagemesh.coordinator.nodes").data else {
            panic!()
        };
        let by_role: Vec<_> = nodes
            .data_points
            .iter()
            .map(|p| (attr(&p.attributes, "role").cloned(), p.value))
            .collect();
        let int = |v| Some(number_data_point::Value::AsInt(v));
        assert_eq!(
            by_role,
            [
                (Some(s("compute")), int(1)),
                (Some(s("memory")), int(2)),
                (Some(s("both")), int(0))
            ]
        );
        let Some(metric::Data::Gauge(vms)) = &find(&r, "pagemesh.coordinator.vms").data else {
            panic!()
        };
        assert_eq!(vms.data_points[0].value, int(1));
        assert_eq!(find(&r, "pagemesh.coordinator.capacity").unit, "By");

        let m = find(&r, "http.server.request.duration");
        assert_eq!(m.unit, "s");
        let Some(metric::Data::Histogram(h)) = &m.data else {
            panic!()
        };
        let point = |route: Option<&str>, status: i64| {
            h.data_points
                .iter()
                .find(|p| {
                    attr(&p.attributes, "http.route") == route.map(s).as_ref()
                        && attr(&p.attributes, "http.response.status_code")
                            == Some(&any_value::Value::IntValue(status))
                })
                .unwrap_or_else(|| panic!("no point for {route:?} {status}: {h:?}"))
        };
        let registered = point(Some("/nodes/{node_id}/endpoint"), 201);
        assert_eq!(registered.count, 3);
        assert_eq!(registered.bucket_counts.iter().sum::<u64>(), 3);
        assert_eq!(registered.bucket_counts.len(), REQUEST_BOUNDS.len() + 1);
        assert_eq!(
            attr(&registered.attributes, "http.request.method"),
            Some(&s("POST"))
        );
        assert_eq!(point(Some("/vms"), 201).count, 1);
        assert_eq!(point(Some("/nodes/{node_id}"), 404).count, 1);
        assert_eq!(point(None, 404).count, 1);
    }

    #[test]
    fn request_buckets_and_methods() {
        let m = RequestMetrics::default();
        m.record(&Method::GET, Some("/nodes"), 200, 0.00005);
        m.record(&Method::GET, Some("/nodes"), 200, 0.0001);
        m.record(&Method::GET, Some("/nodes"), 200, 99.0);
        let weird = Method::from_bytes(b"BREW").unwrap();
        m.record(&weird, None, 404, 0.001);
        let s = m.snapshot();
        let (key, b) = &s[0];
        assert_eq!(key, &("GET", Some("/nodes".to_owned()), 200));
        assert_eq!(b.count, 3);
        // Bounds are inclusive upper bounds.
        assert_eq!(b.counts[0], 2);
        assert_eq!(*b.counts.last().unwrap(), 1);
        assert_eq!(s[1].0.0, "_OTHER");
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
