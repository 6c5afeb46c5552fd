//! What a training run reports while it runs: `metrics.jsonl` (one JSON entry a line, mirroring
//! the trainer state's log history), the progress bar on a terminal, and the lines on stderr.
//! Without a terminal (piped, nohup, CI) there is no bar, so every line carries the elapsed time
//! and the time left instead.

use crate::data::tokenize::Lint;
use anyhow::Result;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

pub struct RunLog {
    /// None on the ranks of a data-parallel run other than 0: they say and write nothing.
    metrics: Option<File>,
    bar: indicatif::ProgressBar,
    tty: bool,
    clock: Clock,
    /// `report_to: "tensorboard"`: every entry also goes to an event file.
    tensorboard: Option<super::tensorboard::EventWriter>,
}

/// Steps done in this process and when they began, for elapsed time and ETA.
#[derive(Debug, Clone)]
pub struct Clock {
    t0: Instant,
    start_step: usize,
    step: usize,
    total: usize,
}

impl Clock {
    pub fn new(start_step: usize, total: usize) -> Self {
        Self { t0: Instant::now(), start_step, step: start_step, total }
    }

    /// `elapsed 1:02:03 | eta 0:04:10` (no ETA before the first step).
    pub fn suffix(&self, elapsed: f64) -> String {
        let done = self.step.saturating_sub(self.start_step);
        let eta = if done == 0 { "?".to_string() } else { hms(elapsed / done as f64 * self.total.saturating_sub(self.step) as f64) };
        format!("elapsed {} | eta {eta}", hms(elapsed))
    }
}

/// `h:mm:ss`, or `m:ss` under an hour.
pub fn hms(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 { format!("{h}:{m:02}:{s:02}") } else { format!("{m}:{s:02}") }
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
        // Hidden until the first step is done: nothing to show before, and a bar drawn at 0/N
        // would stay behind if the first step failed.
        let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::hidden());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(start_step as u64);
        Ok(Self { metrics: Some(metrics), bar, tty, clock: Clock::new(start_step, total), tensorboard: None })
    }

    /// The log of a rank other than 0: no file, no line, no bar.
    pub fn silent(start_step: usize, total: usize) -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(Some(total as u64), indicatif::ProgressDrawTarget::hidden());
        Self { metrics: None, bar, tty: false, clock: Clock::new(start_step, total), tensorboard: None }
    }

    /// A line on stderr: above the bar on a terminal; else with elapsed time and ETA.
    pub fn say(&self, s: &str) {
        if self.metrics.is_none() {
            return;
        }
        if self.tty {
            self.bar.println(s)
        } else {
            eprintln!("{s} | {}", self.clock.suffix(self.clock.t0.elapsed().as_secs_f64()))
        }
    }

    pub fn progress(&mut self, step: usize, loss: f64, lr: f64, tokens_per_sec: f64) {
        if self.metrics.is_none() {
            return;
        }
        if self.tty && self.bar.is_hidden() {
            self.bar.reset_elapsed();
            self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        self.clock.step = step;
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tokens_per_sec:.0} tok/s"));
    }

    /// Appends an entry to `metrics.jsonl` (and to the TensorBoard events, when reporting there).
    pub fn write(&mut self, entry: &Value) -> Result<()> {
        let Some(metrics) = &mut self.metrics else { return Ok(()) };
        writeln!(metrics, "{entry}")?;
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

impl Drop for RunLog {
    /// A run that ends in an error leaves no bar behind either.
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

/// Kinds of notes already printed by this process: a note (a lint that needs no action) is said
/// once, not for every dataset tokenized.
static NOTES_SAID: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Prints a dataset's lints on stderr, each line prefixed with `what` (e.g. "train"): warnings
/// every time, notes once per process.
pub fn print_lints(what: Option<&str>, lints: &[Lint]) {
    let mut said = NOTES_SAID.lock().unwrap_or_else(|e| e.into_inner());
    for line in lint_lines(said.get_or_insert_with(HashSet::new), what, lints) {
        eprintln!("{line}");
    }
}

/// The lines [`print_lints`] prints; the notes among them are added to `said`.
fn lint_lines(said: &mut HashSet<&'static str>, what: Option<&str>, lints: &[Lint]) -> Vec<String> {
    lints
        .iter()
        .filter(|l| !l.is_note() || said.insert(l.kind))
        .map(|l| match what {
            Some(w) => format!("{w}: {l}"),
            None => l.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_elapsed_and_eta() {
        let mut c = Clock::new(10, 110);
        assert_eq!(c.suffix(5.0), "elapsed 0:05 | eta ?");
        c.step = 20; // 10 steps in 60 s, 90 to go
        assert_eq!(c.suffix(60.0), "elapsed 1:00 | eta 9:00");
        c.step = 110;
        assert_eq!(c.suffix(3725.0), "elapsed 1:02:05 | eta 0:00");
        assert_eq!(hms(59.6), "1:00");
    }

    #[test]
    fn notes_are_said_once() {
        let note = Lint { kind: "no-pad-token", message: "m".into(), count: 0, examples: vec![] };
        let warn = Lint { kind: "end-not-eos", message: "w".into(), count: 0, examples: vec![] };
        assert!(note.to_string().starts_with("note: ") && warn.to_string().starts_with("warning [end-not-eos]: "), "{note} / {warn}");
        let (both, mut said) = ([note, warn], HashSet::new());
        assert_eq!(lint_lines(&mut said, Some("train"), &both), ["train: note: m", "train: warning [end-not-eos]: w"]);
        // The eval set (or the next dataset) repeats the warning, not the note.
        assert_eq!(lint_lines(&mut said, Some("eval"), &both), ["eval: warning [end-not-eos]: w"]);
    }
}
