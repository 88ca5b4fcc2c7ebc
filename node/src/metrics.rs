//! Prometheus text exposition of a node's statistics (`GET /metrics`).
//!
//! Names follow the OpenTelemetry conventions translated to Prometheus: a `pagemesh_` prefix,
//! base units (seconds, bytes), `_total` for counters. Every series carries `node="<id>"`.
//! `docs/metrics.md` describes each one.

use std::fmt::Write;

use pagemesh_api::stats::{Histogram, NodeStats};

pub(crate) mod catalog;

use catalog::Metric;

struct Out {
    text: String,
    node: String,
}

impl Out {
    fn header(&mut self, m: &Metric, kind: &str) {
        let _ = writeln!(self.text, "# HELP {} {}", m.prom, m.help);
        let _ = writeln!(self.text, "# TYPE {} {kind}", m.prom);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.text, "{name}{{node=\"{}\"", self.node);
        for (k, v) in labels {
            let _ = write!(self.text, ",{k}=\"{v}\"");
        }
        let _ = writeln!(self.text, "}} {}", fmt_value(value));
    }

    /// A metric with one sample.
    fn single(&mut self, m: &Metric, kind: &str, labels: &[(&str, &str)], value: f64) {
        self.header(m, kind);
        self.sample(m.prom, labels, value);
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        for b in &h.buckets {
            let le = if b.le_us.is_infinite() {
                "+Inf".to_owned()
            } else {
                fmt_value(b.le_us / 1e6)
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, b.count as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_us / 1e6);
        self.sample(&format!("{name}_count"), labels, h.count as f64);
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Renders `s` in the Prometheus text format, version 0.0.4.
pub fn prometheus_text(s: &NodeStats) -> String {
    let mut o = Out {
        text: String::new(),
        node: s.node_id.to_string(),
    };
    o.single(&catalog::UPTIME, "gauge", &[], s.uptime_s);

    o.single(
        &catalog::PAGES_HELD,
        "gauge",
        &[],
        s.server.pages_held as f64,
    );
    o.single(
        &catalog::CAPACITY,
        "gauge",
        &[],
        s.server.capacity_pages as f64,
    );
    o.header(&catalog::PAGES_SERVED, "counter");
    o.sample(
        catalog::PAGES_SERVED.prom,
        &[("claimed", "true")],
        s.server.pages_claimed as f64,
    );
    o.sample(
        catalog::PAGES_SERVED.prom,
        &[("claimed", "false")],
        (s.server.pages_served - s.server.pages_claimed.min(s.server.pages_served)) as f64,
    );
    o.single(
        &catalog::WRITTEN_BACK,
        "counter",
        &[],
        s.server.pages_written_back as f64,
    );

    o.header(&catalog::ERRORS, "counter");
    o.sample(
        catalog::ERRORS.prom,
        &[("kind", "bad_frame")],
        s.server.bad_frames as f64,
    );
    let fault_errors = s.pager.as_ref().map_or(0, |p| p.fault_errors);
    o.sample(
        catalog::ERRORS.prom,
        &[("kind", "fault")],
        fault_errors as f64,
    );

    if let Some(p) = &s.pager {
        let vm = p.vm.to_string();
        o.header(&catalog::FAULTS, "counter");
        for (kind, n) in [
            ("remote", p.faults_remote),
            ("local_zero", p.faults_local_zero),
            ("spurious", p.faults_spurious),
        ] {
            o.sample(
                catalog::FAULTS.prom,
                &[("kind", kind), ("vm", &vm)],
                n as f64,
            );
        }
        o.single(
            &catalog::REMOTE_MISS_RATIO,
            "gauge",
            &[("vm", &vm)],
            p.remote_miss_ratio,
        );
        o.single(
            &catalog::BYTES_TRANSFERRED,
            "counter",
            &[("direction", "in"), ("vm", &vm)],
            p.bytes_fetched as f64,
        );
        o.header(&catalog::FAULT_DURATION, "histogram");
        o.histogram(
            catalog::FAULT_DURATION.prom,
            &[("vm", &vm)],
            &p.fault_latency,
        );
        o.header(&catalog::INSTALL_DURATION, "histogram");
        o.histogram(
            catalog::INSTALL_DURATION.prom,
            &[("source", "pager"), ("vm", &vm)],
            &p.install_latency,
        );
        o.header(&catalog::TRANSFER_DURATION, "histogram");
        for peer in &p.peers {
            let id = peer.node_id.to_string();
            o.histogram(
                catalog::TRANSFER_DURATION.prom,
                &[("peer", &id), ("vm", &vm)],
                &peer.transfer,
            );
        }
    }
    if let Some(e) = &s.ebpf {
        o.header(&catalog::VCPU_STALL_DURATION, "histogram");
        o.histogram(catalog::VCPU_STALL_DURATION.prom, &[], &e.stall);
        if s.pager.is_none() {
            o.header(&catalog::INSTALL_DURATION, "histogram");
        }
        o.histogram(
            catalog::INSTALL_DURATION.prom,
            &[("source", "ebpf")],
            &e.install,
        );
    }
    o.text
}

#[cfg(test)]
mod tests {
    use pagemesh_api::stats::{Bucket, PagerStats};

    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let s = NodeStats {
            node_id: 3,
            pager: Some(PagerStats {
                vm: 7,
                faults_remote: 5,
                fault_latency: Histogram {
                    count: 5,
                    sum_us: 100.0,
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
                },
                ..PagerStats::default()
            }),
            ..NodeStats::default()
        };
        let t = prometheus_text(&s);
        assert!(
            t.contains("pagemesh_faults_total{node=\"3\",kind=\"remote\",vm=\"7\"} 5\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "pagemesh_fault_duration_seconds_bucket{node=\"3\",vm=\"7\",le=\"0.00001\"} 2\n"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "pagemesh_fault_duration_seconds_bucket{node=\"3\",vm=\"7\",le=\"+Inf\"} 5\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("pagemesh_fault_duration_seconds_sum{node=\"3\",vm=\"7\"} 0.0001\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE pagemesh_fault_duration_seconds histogram"));
        // Every sample line is `name{labels} value`.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.contains('{') && series.ends_with('}'), "{line}");
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
