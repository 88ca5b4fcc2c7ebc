//! `cargo xtask bench --plot FILE`: the bench's cases in one SVG picture, the pager's
//! fault-latency CDF of each case (median over runs at each quantile) beside its µs/page.

use std::path::Path;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One case as drawn.
pub struct Case<'a> {
    /// The case's name.
    pub name: &'a str,
    /// Fault latency at evenly spaced quantiles from 0 to 1, µs; empty when the case had no
    /// pager faults (it is then left out of the CDF).
    pub cdf_us: Vec<f64>,
    /// Guest wall time per page, µs.
    pub us_per_page: f64,
}

/// Draws `cases` into an SVG file at `path`.
pub fn draw(path: &Path, title: &str, cases: &[Case<'_>]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(720);
    cdf(&left, cases)?;
    bars(&right, cases)?;
    root.present()
        .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    Ok(())
}

/// The colour of the `i`-th case, the same in both panels.
fn colour(i: usize) -> RGBAColor {
    Palette99::pick(i).to_rgba()
}

fn cdf(area: &DrawingArea<SVGBackend<'_>, Shift>, cases: &[Case<'_>]) -> anyhow::Result<()> {
    let drawn: Vec<(usize, &Case<'_>)> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.cdf_us.len() > 1 && c.cdf_us.iter().any(|&v| v > 0.0))
        .collect();
    let positive = || {
        drawn
            .iter()
            .flat_map(|(_, c)| &c.cdf_us)
            .filter(|&&v| v > 0.0)
    };
    // A log axis: a fault's latency spans 1 µs (already present) to milliseconds.
    let lo = positive().copied().fold(f64::INFINITY, f64::min).min(1.0);
    let hi = positive().copied().fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "fault latency CDF (pager: event read to page installed)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("µs (log)")
        .y_desc("fraction of faults")
        .draw()?;
    for (i, c) in drawn {
        let steps = (c.cdf_us.len() - 1) as f64;
        let points = c
            .cdf_us
            .iter()
            .enumerate()
            .map(|(k, &v)| (v.max(lo), k as f64 / steps));
        let style = colour(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points, style))?
            .label(c.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn bars(area: &DrawingArea<SVGBackend<'_>, Shift>, cases: &[Case<'_>]) -> anyhow::Result<()> {
    let top = cases.iter().map(|c| c.us_per_page).fold(1.0, f64::max) * 1.15;
    let n = cases.len() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption("µs per page (guest wall time)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d(0.0..top, (0..n).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(cases.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => cases
                .get(*i as usize)
                .map_or(String::new(), |c| c.name.to_owned()),
            _ => String::new(),
        })
        .x_desc("µs/page")
        .draw()?;
    chart.draw_series(cases.iter().enumerate().map(|(i, c)| {
        let i = i as u32;
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (c.us_per_page, SegmentValue::Exact(i + 1)),
            ],
            colour(i as usize).filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        bar
    }))?;
    chart.draw_series(cases.iter().enumerate().map(|(i, c)| {
        Text::new(
            format!("{:.1}", c.us_per_page),
            (c.us_per_page, SegmentValue::CenterOf(i as u32)),
            ("sans-serif", 13),
        )
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_panels_with_every_case() {
        let path = std::env::temp_dir().join(format!("xtask-plot-{}.svg", std::process::id()));
        let cdf = |base: f64| (0..=100).map(|i| base + i as f64 / 10.0).collect();
        draw(
            &path,
            "test",
            &[
                Case {
                    name: "local-demand-zero",
                    cdf_us: Vec::new(),
                    us_per_page: 22.0,
                },
                Case {
                    name: "remote-random",
                    cdf_us: cdf(12.0),
                    us_per_page: 85.0,
                },
                Case {
                    name: "remote-seq-prefetch",
                    cdf_us: cdf(30.0),
                    us_per_page: 5.3,
                },
            ],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for name in ["local-demand-zero", "remote-random", "remote-seq-prefetch"] {
            assert!(svg.contains(name), "{name} missing");
        }
        // Two cases have a CDF: two lines (polylines), and three bars.
        assert!(svg.matches("<polyline").count() >= 2, "two CDF lines");
        assert!(svg.contains("85.0") && svg.contains("5.3"));
    }
}
