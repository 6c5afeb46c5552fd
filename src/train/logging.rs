//! What a training run reports while it runs: `metrics.jsonl` (one JSON entry a line, mirroring
//! the trainer state's log history), the progress bar on a terminal, and the step lines on stderr.

use anyhow::Result;
use serde_json::Value;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;

pub struct RunLog {
    metrics: File,
    bar: indicatif::ProgressBar,
    tty: bool,
    /// `report_to: "tensorboard"`: every entry also goes to an event file.
    tensorboard: Option<super::tensorboard::EventWriter>,
}

impl RunLog {
    /// Rewrites `metrics.jsonl` with `history` (the entries of a resumed run), then appends to it;
    /// the bar counts `total` steps from `start_step`.
    pub fn open(out_dir: &Path, history: &[Value], start_step: usize, total: usize) -> Result<Self> {
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut lines = String::new();
        for e in history {
            lines.push_str(&e.to_string());
            lines.push('\n');
        }
        crate::util::fs::write(&metrics_path, lines.as_bytes())?;
        let metrics = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;
        let tty = std::io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new(total as u64);
        if tty {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(start_step as u64);
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Ok(Self { metrics, bar, tty, tensorboard: None })
    }

    /// A line on stderr (above the bar on a terminal).
    pub fn say(&self, s: &str) {
        if self.tty { self.bar.println(s) } else { eprintln!("{s}") }
    }

    pub fn progress(&self, step: usize, loss: f64, lr: f64, tokens_per_sec: f64) {
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tokens_per_sec:.0} tok/s"));
    }

    /// Appends an entry to `metrics.jsonl` (and to the TensorBoard events, when reporting there).
    pub fn write(&mut self, entry: &Value) -> Result<()> {
        writeln!(self.metrics, "{entry}")?;
        if let Some(tb) = &mut self.tensorboard {
            tb.entry(entry)?;
        }
        Ok(())
    }

    /// Also write every entry as TensorBoard scalars into a new event file in `dir`.
    pub fn report_to_tensorboard(&mut self, dir: &Path) -> Result<()> {
        let w = super::tensorboard::EventWriter::create(dir)?;
        self.say(&format!("tensorboard: {} (tensorboard --logdir {})", w.path.display(), dir.display()));
        self.tensorboard = Some(w);
        Ok(())
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
