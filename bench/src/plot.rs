//! ratios.svg: each mode's throughput relative to direct.
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::{
    load::{self, Load},
    modes::{self, Mode},
    report::Summary,
};

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(150, 150, 150),
        Mode::Nft => RGBColor(70, 120, 200),
        Mode::Haproxy => RGBColor(230, 140, 40),
        Mode::XlbDefault => RGBColor(200, 50, 50),
        Mode::Xlb => RGBColor(40, 160, 80),
        Mode::XlbTc => RGBColor(20, 110, 50),
        Mode::XdpPass => RGBColor(170, 215, 170),
        Mode::XlbFullnat => RGBColor(130, 80, 170),
        Mode::XlbDsr => RGBColor(30, 160, 170),
    }
}

/// Grouped bars: each load's throughput relative to direct, per mode, with min–max
/// whiskers and xlb's goal as a red mark.
pub fn plot(path: &Path, summary: &[Summary]) -> Result<()> {
    let loads: Vec<Load> = load::ALL
        .into_iter()
        .filter(|l| summary.iter().any(|s| s.load == *l))
        .collect();
    let top = summary
        .iter()
        .map(|s| s.ratio_max)
        .filter(|r| r.is_finite())
        .fold(1.0, f64::max)
        .max(1.0)
        * 1.45;
    let root = SVGBackend::new(path, (1100, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput relative to direct (same run); whiskers: min–max over repetitions",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..loads.len().max(1) as f64, 0f64..top)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ratio to direct")
        .draw()
        .map_err(plot_err)?;
    // Only the modes that ran get a slot: a run of a few modes has no gaps.
    let shown: Vec<Mode> = modes::ALL
        .into_iter()
        .filter(|m| summary.iter().any(|s| s.mode == *m))
        .collect();
    let width = 0.8 / shown.len().max(1) as f64;
    for (m, mode) in shown.into_iter().enumerate() {
        let bars: Vec<(f64, &Summary)> = loads
            .iter()
            .enumerate()
            .filter_map(|(g, l)| {
                let s = summary.iter().find(|s| s.load == *l && s.mode == mode)?;
                Some((g as f64 + 0.1 + m as f64 * width, s))
            })
            .collect();
        let c = color(mode);
        chart
            .draw_series(
                bars.iter().map(|(x, s)| {
                    Rectangle::new([(*x, 0.0), (x + width * 0.9, s.ratio)], c.filled())
                }),
            )
            .map_err(plot_err)?
            .label(mode.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                let mid = x + width * 0.45;
                PathElement::new(vec![(mid, s.ratio_min), (mid, s.ratio_max)], BLACK)
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                Text::new(
                    format!("{:.2}", s.ratio),
                    (*x, s.ratio_max.max(s.ratio) + top * 0.01),
                    ("sans-serif", 12)
                        .into_font()
                        .transform(FontTransform::None),
                )
            }))
            .map_err(plot_err)?;
        if mode == Mode::XlbDefault {
            chart
                .draw_series(bars.iter().map(|(x, s)| {
                    let goal = match s.load {
                        Load::KeepAlive => 0.98,
                        Load::Close => 0.95,
                        Load::Udp => 1.0,
                    };
                    PathElement::new(
                        vec![(x - width * 0.1, goal), (x + width, goal)],
                        RED.stroke_width(2),
                    )
                }))
                .map_err(plot_err)?
                .label("xlb goal")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], RED.stroke_width(2)));
        }
    }
    for (g, l) in loads.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            format!("{} ({})", l.title(), l.unit()),
            (px - 90, py + 12),
            ("sans-serif", 14),
        ))
        .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
