//! A node's metrics, and their Prometheus exposition (`GET /metrics`).
//!
//! | module | what it is |
//! |---|---|
//! | [`catalog`] | every metric's names (Prometheus, OpenTelemetry), unit, kind and help, once |
//! | [`families`] | which series a snapshot has: labels and values, for both exporters |
//! | this file | the Prometheus text format (0.0.4), written by `prometheus-client`'s encoder |
//!
//! `crate::otlp` is the other exporter of the same families. Names follow the OpenTelemetry
//! conventions translated to Prometheus: a `pagemesh_` prefix, base units (seconds, bytes),
//! `_total` for counters. Every series carries `node="<id>"`. `docs/metrics.md` describes
//! each one.
//!
//! The histograms are the pager's HDR histograms, already bucketed: they are written from
//! their bucket counts through `prometheus-client`'s `MetricEncoder::encode_histogram`, not
//! recorded again into its `Histogram` type. The encoder escapes label values and help texts.

use std::borrow::Cow;

use pagemesh_api::stats::NodeStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub(crate) mod catalog;
pub(crate) mod families;

use catalog::Kind;
use families::{Family, Value};

/// The `Content-Type` of [`prometheus_text`]: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The families of one snapshot, as a `prometheus-client` collector.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for f in &self.0 {
            let m = f.metric;
            let (name, kind) = match m.kind {
                // The encoder writes a counter's `_total` itself, after the family's name.
                Kind::Counter => (
                    m.prom.strip_suffix("_total").unwrap_or(m.prom),
                    MetricType::Counter,
                ),
                Kind::Gauge => (m.prom, MetricType::Gauge),
                Kind::Histogram => (m.prom, MetricType::Histogram),
            };
            // No unit: the catalog's Prometheus names already end with theirs, and the 0.0.4
            // format has no UNIT line.
            let mut family = encoder.encode_descriptor(name, m.help, None, kind)?;
            for p in &f.points {
                let mut e = family.encode_family(&p.labels)?;
                match (&p.value, m.kind) {
                    (Value::Int(v), Kind::Counter) => {
                        e.encode_counter::<NoLabelSet, _, u64>(v, None)?;
                    }
                    (Value::Float(v), Kind::Counter) => {
                        e.encode_counter::<NoLabelSet, _, f64>(v, None)?;
                    }
                    (Value::Int(v), _) => e.encode_gauge(v)?,
                    (Value::Float(v), _) => e.encode_gauge(v)?,
                    (Value::Histogram(b), _) => {
                        // Per-bucket counts, the last one above the last bound (`+Inf`); the
                        // encoder writes them cumulative.
                        let buckets: Vec<(f64, u64)> = b
                            .bounds_s
                            .iter()
                            .copied()
                            .chain([f64::INFINITY])
                            .zip(b.counts.iter().copied())
                            .collect();
                        e.encode_histogram::<NoLabelSet>(b.sum_s, b.count, &buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Renders `s` in the Prometheus text format, version 0.0.4 ([`CONTENT_TYPE`]).
pub fn prometheus_text(s: &NodeStats) -> String {
    let node = (Cow::Borrowed("node"), Cow::Owned(s.node_id.to_string()));
    let mut registry = Registry::with_labels(std::iter::once(node));
    registry.register_collector(Box::new(Snapshot(families::families(s))));
    let mut text = String::new();
    // Writing to a `String` cannot fail, and neither can our collector.
    if let Err(e) = prometheus_text::encode(&mut text, &registry) {
        tracing::error!("cannot encode /metrics: {e}");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use pagemesh_api::stats::{Bucket, EbpfStats, Histogram, PagerStats, PeerStats};

    use super::*;

    fn hist() -> Histogram {
        Histogram {
            count: 5,
            sum_us: 100.0,
            max_us: 40.0,
            buckets: vec![
                Bucket {
                    le_us: 10.0,
                    count: 2,
                },
                Bucket {
                    le_us: f64::INFINITY,
                    count: 5,
                },
            ],
            ..Histogram::default()
        }
    }

    fn sample() -> NodeStats {
        NodeStats {
            node_id: 3,
            uptime_s: 12.5,
            pager: Some(PagerStats {
                vm: 7,
                faults_remote: 5,
                fault_latency: hist(),
                install_latency: hist(),
                lost_nodes: Vec::new(),
                peers: vec![PeerStats {
                    node_id: 1,
                    pages: 5,
                    transfer: hist(),
                }],
                cache: Some(pagemesh_api::summary::CacheSummary {
                    budget_pages: 256,
                    resident_pages: 200,
                    ..Default::default()
                }),
                prefetch: Some(pagemesh_api::stats::PrefetchStats {
                    issued: 40,
                    used: 38,
                    ..Default::default()
                }),
                ..PagerStats::default()
            }),
            ebpf: Some(EbpfStats {
                stall: hist(),
                install: hist(),
                ..EbpfStats::default()
            }),
            ..NodeStats::default()
        }
    }

    #[test]
    fn renders_counters_and_histograms() {
        let t = prometheus_text(&sample());
        for line in [
            "# HELP pagemesh_faults_total Guest page faults served, by kind: remote (fetched from another node), local_zero (never-written page zero-filled here), spurious (already present).",
            "# TYPE pagemesh_faults_total counter",
            "pagemesh_faults_total{node=\"3\",kind=\"remote\",vm=\"7\"} 5",
            "# TYPE pagemesh_fault_duration_seconds histogram",
            // Bounds as Go clients write them.
            "pagemesh_fault_duration_seconds_bucket{node=\"3\",vm=\"7\",le=\"1e-05\"} 2",
            "pagemesh_fault_duration_seconds_bucket{node=\"3\",vm=\"7\",le=\"+Inf\"} 5",
            "pagemesh_fault_duration_seconds_sum{node=\"3\",vm=\"7\"} 0.0001",
            "pagemesh_fault_duration_seconds_count{node=\"3\",vm=\"7\"} 5",
            "# TYPE pagemesh_uptime_seconds gauge",
            "pagemesh_uptime_seconds{node=\"3\"} 12.5",
            "pagemesh_pages_held{node=\"3\"} 0",
            "pagemesh_install_duration_seconds_count{node=\"3\",source=\"ebpf\"} 5",
            "pagemesh_cache_resident_pages{node=\"3\",vm=\"7\"} 200",
            "pagemesh_cache_evictions_total{node=\"3\",kind=\"dirty\",vm=\"7\"} 0",
            "pagemesh_prefetch_pages_total{node=\"3\",kind=\"used\",vm=\"7\"} 38",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
        }
        let families = parse(&t);
        // One family per catalog entry, each with the kind the catalog gives it.
        assert_eq!(families.len(), catalog::ALL.len(), "{t}");
        for m in catalog::ALL {
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert_eq!(families[m.prom].kind, kind, "{}", m.prom);
            assert_eq!(families[m.prom].help, m.help, "{}", m.prom);
        }
        // The pager's and the kernel's install times are one family, written together.
        let install = &families["pagemesh_install_duration_seconds"].samples;
        assert_eq!(install.len(), 2 * 4);
    }

    #[test]
    fn label_values_are_escaped() {
        let nasty = "a \"quoted\" C:\\path\nand a second line";
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot(vec![Family {
            metric: &catalog::FAULTS,
            points: vec![families::Point {
                labels: vec![("vm", nasty.to_owned())],
                value: Value::Int(1),
            }],
        }])));
        let mut t = String::new();
        prometheus_text::encode(&mut t, &registry).unwrap();
        assert!(
            t.contains(r#"pagemesh_faults_total{vm="a \"quoted\" C:\\path\nand a second line"} 1"#),
            "{t}"
        );
        let families = parse(&t);
        let samples = &families["pagemesh_faults_total"].samples;
        assert_eq!(samples[0].labels["vm"], nasty);
        assert_eq!(samples[0].value, 1.0);
    }

    /// One family of a parsed exposition.
    #[derive(Default, Debug)]
    struct Parsed {
        help: String,
        kind: String,
        samples: Vec<Sample>,
    }

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: HashMap<String, String>,
        value: f64,
    }

    /// Parses the text format as strictly as Prometheus does: every sample belongs to the family
    /// whose `# TYPE` came last (a histogram's by its suffixes), families appear once, label
    /// values are quoted and escaped, values are numbers.
    fn parse(t: &str) -> HashMap<String, Parsed> {
        let mut out: HashMap<String, Parsed> = HashMap::new();
        let mut current = String::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                let help = help.replace("\\n", "\n").replace("\\\\", "\\");
                assert!(!out.contains_key(name), "{name} twice");
                current = name.to_owned();
                out.entry(current.clone()).or_default().help = help;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current, "TYPE without its HELP");
                out.get_mut(name).unwrap().kind = kind.to_owned();
            } else {
                let s = parse_sample(line);
                let family = &out[&current];
                let own = if family.kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|sfx| s.name == format!("{current}{sfx}"))
                } else {
                    s.name == current
                };
                assert!(own, "{line} is not in family {current}");
                out.get_mut(&current).unwrap().samples.push(s);
            }
        }
        out
    }

    fn parse_sample(line: &str) -> Sample {
        let (name, mut rest) = line
            .split_once(['{', ' '])
            .unwrap_or_else(|| panic!("{line}"));
        let mut labels = HashMap::new();
        if line.as_bytes()[name.len()] == b'{' {
            loop {
                if let Some(r) = rest.strip_prefix("} ") {
                    rest = r;
                    break;
                }
                let r = rest.strip_prefix(',').unwrap_or(rest);
                let (key, r) = r.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars
                        .next()
                        .unwrap_or_else(|| panic!("unterminated: {line}"))
                    {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            other => panic!("bad escape {other:?}: {line}"),
                        },
                        (_, '\n') => panic!("raw newline: {line}"),
                        (_, c) => value.push(c),
                    }
                };
                assert!(labels.insert(key.to_owned(), value).is_none(), "{line}");
                rest = &r[end + 1..];
            }
        }
        let value = match rest {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?}: {line}")),
        };
        Sample {
            name: name.to_owned(),
            labels,
            value,
        }
    }
}
