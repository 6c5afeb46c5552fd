//! `loss.png`: train and eval loss against the step, drawn with plotters. Text uses the
//! embedded DejaVu Sans Mono (assets/fonts, a permissive licence) so no system fonts are needed.

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn series(history: &[Value], key: &str) -> Vec<(f64, f64)> {
    history
        .iter()
        .filter_map(|e| Some((e.get("step")?.as_f64()?, e.get(key)?.as_f64()?)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

/// Draw the loss curves of `history` (trainer log entries) into `path` (written atomically).
pub fn loss_png(path: &Path, history: &[Value]) -> Result<()> {
    let train = series(history, "loss");
    let eval = series(history, "eval_loss");
    if train.is_empty() && eval.is_empty() {
        return Ok(());
    }
    register_font();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let y_min = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let pad = ((y_max - y_min) * 0.08).max(1e-3);
    // The encoder picks the format from the extension, which the temp file keeps.
    crate::util::fs::install_file(path, crate::util::fs::Existing::Replace, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, (y_min - pad).max(0.0)..y_max + pad)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("train")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)).point_size(3))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label("eval")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))
    })
}
