//! OTLP/HTTP (protobuf) metrics export settings, shared by the node and the coordinator
//! ([`OtlpConfig::resolve`]: flags first, then the standard `OTEL_*` variables), and the
//! node's own transport: the HTTP sender, the exporter thread and attribute and time helpers
//! for the protobuf messages it builds. The coordinator hands the resolved settings to the
//! OpenTelemetry SDK and its OTLP exporter instead (`coordinator/src/otlp.rs`); the node
//! cannot use the SDK for its precomputed histograms (`node/src/otlp.rs` says why).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// Time between exports unless configured.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The longest an export may take; shorter when the interval is.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(5);

/// Bad OTLP settings, or why one export failed.
#[derive(thiserror::Error, Debug)]
pub enum OtlpError {
    /// A setting has a bad value.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// No answer: refused, timed out, reset.
    #[error("cannot send")]
    Send(#[source] Box<ureq::Error>),
    /// An answer other than 2xx.
    #[error("the receiver answered HTTP {0}")]
    Status(u16),
    /// A 2xx answer that rejected some of the points.
    #[error("the receiver rejected {rejected} data points: {message}")]
    Rejected {
        /// Points rejected.
        rejected: i64,
        /// The receiver's explanation.
        message: String,
    },
}

/// Where and how often to export.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// The full URL to POST to (`…/v1/metrics`).
    pub url: String,
    /// Time between exports.
    pub interval: Duration,
}

impl OtlpConfig {
    /// The export asked for by `--otlp-endpoint` (`off` disables) and `--otlp-interval`
    /// (seconds), falling back on the standard variables `env` looks up:
    /// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (used as is), `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (`/v1/metrics` appended), `OTEL_METRIC_EXPORT_INTERVAL` (ms), and
    /// `OTEL_SDK_DISABLED=true` / `OTEL_METRICS_EXPORTER=none` to turn them off.
    pub fn resolve(
        endpoint: Option<&str>,
        interval: Option<f64>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, OtlpError> {
        let env = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        // (where it came from, what it said)
        let (what, given) = match endpoint.map(str::trim) {
            Some("off" | "none") => return Ok(None),
            Some(e) => ("--otlp-endpoint", e.to_owned()),
            None => {
                let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim() == "true")
                    || env("OTEL_METRICS_EXPORTER").is_some_and(|v| v.trim() == "none");
                match (
                    env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
                    env("OTEL_EXPORTER_OTLP_ENDPOINT"),
                ) {
                    _ if disabled => return Ok(None),
                    (Some(url), _) => ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", url),
                    (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", base),
                    (None, None) => return Ok(None),
                }
            }
        };
        let given = given.trim();
        if !(given.starts_with("http://") || given.starts_with("https://")) {
            return Err(OtlpError::Invalid {
                what,
                why: format!("'{given}' is not an http:// or https:// URL"),
            });
        }
        let url = if what == "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" {
            given.to_owned()
        } else {
            metrics_url(given)
        };
        let interval = match (interval, env("OTEL_METRIC_EXPORT_INTERVAL")) {
            (Some(secs), _) => Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| OtlpError::Invalid {
                    what: "--otlp-interval",
                    why: format!("{secs} is not a positive number of seconds"),
                })?,
            (None, Some(ms)) => ms
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| OtlpError::Invalid {
                    what: "OTEL_METRIC_EXPORT_INTERVAL",
                    why: format!("'{ms}' is not a positive number of milliseconds"),
                })?,
            (None, None) => DEFAULT_INTERVAL,
        };
        for key in [
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = env(key).filter(|p| p.trim() != "http/protobuf") {
                tracing::warn!("{key}={p} is not supported; exporting over http/protobuf");
            }
        }
        Ok(Some(Self { url, interval }))
    }
}

/// `base` with the OTLP/HTTP metrics path, unless it already ends with it.
fn metrics_url(base: &str) -> String {
    let base = base.trim().trim_end_matches('/');
    if base.ends_with("/v1/metrics") {
        base.to_owned()
    } else {
        format!("{base}/v1/metrics")
    }
}

/// Posts encoded export requests to one receiver.
pub struct Sender {
    agent: ureq::Agent,
    url: String,
}

impl Sender {
    /// A sender for `config`, whose requests time out within its interval (at most
    /// [`MAX_TIMEOUT`]).
    pub fn new(config: &OtlpConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.interval.min(MAX_TIMEOUT)))
            .build()
            .into();
        Self {
            agent,
            url: config.url.clone(),
        }
    }

    /// Posts one encoded `ExportMetricsServiceRequest`.
    pub fn send(&self, body: Vec<u8>) -> Result<(), OtlpError> {
        let mut response = self
            .agent
            .post(&self.url)
            .content_type("application/x-protobuf")
            .send(body)
            .map_err(|e| OtlpError::Send(Box::new(e)))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(OtlpError::Status(status));
        }
        // An empty body, or one we cannot read, is a full success.
        let body = response.body_mut().read_to_vec().unwrap_or_default();
        match ExportMetricsServiceResponse::decode(body.as_slice()) {
            Ok(ExportMetricsServiceResponse {
                partial_success: Some(p),
            }) if p.rejected_data_points > 0 => Err(OtlpError::Rejected {
                rejected: p.rejected_data_points,
                message: p.error_message,
            }),
            _ => Ok(()),
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// An attribute.
pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// A string attribute.
pub fn text(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.to_owned()))
}

/// The exporter thread; dropping it sends a last export and waits for it.
pub struct Exporter {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Closing the channel wakes the thread for its last export.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `export` every `config.interval` on a new thread, and once more when the returned
/// [`Exporter`] is dropped.
pub fn spawn(
    config: OtlpConfig,
    mut export: impl FnMut() -> Vec<u8> + Send + 'static,
) -> Option<Exporter> {
    let (stop, stopped) = mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("otlp".into())
        .spawn(move || {
            let sender = Sender::new(&config);
            let mut failures = 0u64;
            let mut next = Instant::now() + config.interval;
            loop {
                let wait = next.saturating_duration_since(Instant::now());
                let last = !matches!(stopped.recv_timeout(wait), Err(RecvTimeoutError::Timeout));
                match sender.send(export()) {
                    Ok(()) if failures > 0 => {
                        tracing::info!(
                            "OTLP export to {} works again after {failures} failed attempts",
                            config.url
                        );
                        failures = 0;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(
                            "OTLP export to {} failed ({failures} in a row): {}",
                            config.url,
                            pagemesh_api::error_chain(&e)
                        );
                    }
                }
                if last {
                    break;
                }
                // Ticks missed during a slow export are skipped, not made up in a burst.
                next = (next + config.interval).max(Instant::now());
            }
        });
    match spawned {
        Ok(thread) => Some(Exporter {
            stop: Some(stop),
            thread: Some(thread),
        }),
        Err(e) => {
            tracing::error!("cannot start the OTLP exporter thread, no metrics export: {e}");
            None
        }
    }
}
