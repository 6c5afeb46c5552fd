//! The SFT trainer, in named parts: setup (data iterator, totals, optimizer), resume, the step
//! loop over [`StepState::train_step`], logging, evaluation and saving (checkpoints with exact
//! resume), with callbacks that can stop training. The trainer works on the model it is given for
//! the length of a `train()` / `evaluate()` call; it keeps no handle to it.

use super::args::{OnNonFinite, Resume, Strategy, TrainingArguments};
use super::callbacks::{Callbacks, Control};
use super::checkpoint::{self, Manifest, TrainerState};
use super::logging::RunLog;
use super::optim::ParamState;
use super::step::{MicroBatch, StepState, StepStats};
use crate::data::{tokenize_for_model, Batch, BatchIterator, BatchOptions, Dataset, TokenizeOptions, TokenizedDataset, Truncation};
use crate::model::engine::{self, TrainBatch};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub global_step: usize,
    /// Mean training loss over the steps run in this call.
    pub train_loss: f64,
    pub seconds: f64,
    pub tokens: u64,
    pub tokens_per_sec: f64,
    pub best_eval_loss: Option<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub stopped_early: bool,
    pub skipped_steps: usize,
}

pub struct SftTrainer {
    pub train_data: Arc<TokenizedDataset>,
    pub eval_data: Option<Arc<TokenizedDataset>>,
    pub args: TrainingArguments,
    /// Source of the recipe that built this trainer (copied into output_dir, hashed).
    pub recipe: Option<(PathBuf, String)>,
    pub save_adapter: SaveAdapter,
}

/// Writes the peft adapter files of the current model into a directory.
pub type SaveAdapter = Box<dyn Fn(&Model, &Path) -> Result<()>>;

/// One `train()` call: the state its parts share.
struct Run {
    it: BatchIterator,
    steps: StepState,
    state: TrainerState,
    manifest: Manifest,
    batches_per_epoch: usize,
    t0: Instant,
    /// Tokens of this call's steps, and their finite losses summed (with their count).
    tokens: u64,
    loss_sum: f64,
    loss_steps: usize,
    /// Finite losses since the last log entry.
    window_loss: f64,
    window_steps: usize,
    last_checkpoint: Option<PathBuf>,
    last_eval_loss: Option<f64>,
}

impl Run {
    fn total(&self) -> usize {
        self.steps.total
    }

    fn accumulation(&self) -> usize {
        self.steps.args.gradient_accumulation_steps
    }

    fn is_last(&self) -> bool {
        self.state.global_step == self.total()
    }

    /// The step just done ended an epoch.
    fn epoch_crossed(&self) -> bool {
        let (after, bpe) = (self.state.global_step * self.accumulation(), self.batches_per_epoch);
        (after - self.accumulation()) / bpe != after / bpe
    }

    /// Whether `strategy` (every `every` steps, or every epoch) acts after the step just done.
    fn due(&self, strategy: Strategy, every: usize) -> bool {
        match strategy {
            Strategy::No => false,
            Strategy::Steps => self.state.global_step.is_multiple_of(every) || self.is_last(),
            Strategy::Epoch => self.epoch_crossed() || self.is_last(),
        }
    }

    /// Counts a finished step into the trainer state and this call's figures.
    fn record(&mut self, s: &StepStats) {
        self.state.global_step = s.step;
        self.state.position = self.it.position();
        self.state.epoch = (s.step * self.accumulation()) as f64 / self.batches_per_epoch as f64;
        self.state.train_tokens += s.tokens;
        self.tokens += s.tokens;
        if s.loss.is_finite() {
            self.window_loss += s.loss;
            self.window_steps += 1;
            self.loss_sum += s.loss;
            self.loss_steps += 1;
        }
    }

    fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9)
    }

    /// The epoch as log entries show it.
    fn epoch_rounded(&self) -> f64 {
        (self.state.epoch * 1000.0).round() / 1000.0
    }
}

fn tokenize(model: &Model, ds: &Dataset, args: &TrainingArguments, what: &str) -> Result<Arc<TokenizedDataset>> {
    let opts = TokenizeOptions { max_seq_length: Some(args.max_seq_length), train_on_inputs: args.train_on_inputs, truncation: Truncation::Truncate };
    let ds = &ds.with_text_field(&args.dataset_text_field)?;
    let t = tokenize_for_model(ds, model, &opts).with_context(|| format!("{what} dataset"))?;
    eprintln!("{what}: {}", t.report.summary());
    super::logging::print_lints(Some(what), &t.report.lints);
    if t.is_empty() {
        bail!("{what} dataset: no example left to train on after tokenization");
    }
    Ok(Arc::new(t))
}

fn to_train_batch(b: &Batch, model: &Model) -> Result<TrainBatch> {
    TrainBatch::new(b.batch, b.seq, &b.input_ids, &b.labels, Some(&b.position_ids), Some(&b.segment_ids), &model.llama.device)
}

/// A checkpoint's optimizer tracks the same adapters (module, A/B, shape) as this model's.
fn same_adapters(a: &[ParamState], b: &[ParamState]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.layer == y.layer && x.proj == y.proj && x.is_b == y.is_b && x.shape == y.shape)
}

fn warn_if_changed(dir: &Path, saved: &Manifest, now: &Manifest) {
    if saved.recipe_sha256 != now.recipe_sha256 {
        eprintln!("warning: resuming {} with a changed recipe", dir.display());
    }
    if saved.dataset_sha256 != now.dataset_sha256 {
        eprintln!("warning: resuming {} with a changed dataset", dir.display());
    }
    if saved.base_model_config_sha256 != now.base_model_config_sha256 {
        eprintln!("warning: resuming {} with a different base model", dir.display());
    }
}

impl SftTrainer {
    pub fn new(
        model: &Model,
        train: &Dataset,
        eval: Option<&Dataset>,
        args: TrainingArguments,
        recipe: Option<(PathBuf, String)>,
        save_adapter: SaveAdapter,
    ) -> Result<Self> {
        args.validate()?;
        if model.lora_config.is_none() {
            bail!("SFTTrainer: the model has no LoRA adapters; call get_peft_model(model, LoraConfig(...)) first");
        }
        for note in args.notes_for(model)? {
            eprintln!("{note}");
        }
        let train_data = tokenize(model, train, &args, "train")?;
        let eval_data = match eval {
            Some(e) => Some(tokenize(model, e, &args, "eval")?),
            None => None,
        };
        if args.eval_strategy != Strategy::No && eval_data.is_none() {
            bail!("TrainingArguments: eval_strategy is set but SFTTrainer got no eval_dataset");
        }
        Ok(Self { train_data, eval_data, args, recipe, save_adapter })
    }

    fn batch_options(&self, eval: bool) -> BatchOptions {
        let a = &self.args;
        BatchOptions {
            batch_size: if eval { a.per_device_eval_batch_size } else { a.per_device_train_batch_size },
            seed: a.seed,
            shuffle: !eval,
            packing: a.packing && !eval,
            max_seq_length: Some(a.max_seq_length),
            group_by_length: a.group_by_length && !eval,
            drop_last: false,
        }
    }

    /// Eval loss (mean over trained tokens) and perplexity of `model` on the eval dataset.
    pub fn evaluate(&self, model: &Model) -> Result<EvalMetrics> {
        let data = self.eval_data.clone().context("evaluate: SFTTrainer has no eval_dataset")?;
        let it = BatchIterator::new(data, self.batch_options(true))?;
        let (mut sum, mut n) = (0.0, 0usize);
        for b in it.epoch(0) {
            crate::check_cancel()?;
            let out = engine::loss(&model.llama, &to_train_batch(&b, model)?)?;
            sum += out.loss_sum;
            n += out.n_tokens;
        }
        let loss = if n == 0 { f64::NAN } else { sum / n as f64 };
        Ok(EvalMetrics { loss, perplexity: loss.exp(), tokens: n })
    }

    fn manifest(&self, model: &Model) -> Manifest {
        let mut h = Vec::new();
        for e in &self.train_data.examples {
            for id in &e.input_ids {
                h.extend_from_slice(&id.to_le_bytes());
            }
            h.extend(e.trained.iter().map(|&t| t as u8));
            h.push(0xff);
        }
        Manifest {
            qscript_version: env!("CARGO_PKG_VERSION").to_string(),
            recipe_sha256: self.recipe.as_ref().map(|(_, src)| checkpoint::sha256_hex(src.as_bytes())),
            dataset_sha256: checkpoint::sha256_hex(&h),
            base_model_config_sha256: checkpoint::sha256_hex(serde_json::to_string(&model.config().raw).unwrap_or_default().as_bytes()),
            base_model: model.name_or_path.clone(),
            seed: self.args.seed,
            run_id: Some(checkpoint::new_run_id()),
        }
    }

    fn resume_dir(&self) -> Result<Option<PathBuf>> {
        Ok(match &self.args.resume_from_checkpoint {
            Resume::No => None,
            Resume::Path(p) => {
                if !p.is_dir() {
                    bail!("resume_from_checkpoint: {} not found", p.display());
                }
                Some(p.clone())
            }
            Resume::Latest => match checkpoint::latest(&self.args.output_dir) {
                Some(p) => Some(p),
                None => bail!("resume_from_checkpoint: no checkpoint-* directory in {}", self.args.output_dir.display()),
            },
        })
    }

    /// Trains `model`'s adapters for the configured steps (resuming if asked); the loop only.
    pub fn train(&mut self, model: &mut Model, callbacks: &mut dyn Callbacks) -> Result<TrainSummary> {
        let mut run = self.setup(model)?;
        self.resume(model, &mut run)?;
        let mut log = self.open_output(&run)?;
        run.t0 = Instant::now();
        let mut stopped = false;
        while run.steps.step < run.total() {
            crate::check_cancel()?;
            let micro = self.next_micro_batches(model, &mut run.it)?;
            let stats = run.steps.train_step(model, &micro)?;
            self.on_non_finite(&mut run, &log, &stats)?;
            run.record(&stats);
            let tps = run.tokens_per_sec();
            log.progress(stats.step, stats.loss, stats.lr, tps);
            let mut control = self.log_step(model, &mut run, &mut log, &stats, tps, callbacks)?;
            control = control.or(self.maybe_evaluate(model, &mut run, &mut log, callbacks)?);
            control = control.or(self.maybe_save(model, &mut run, control, callbacks)?);
            control = control.or(callbacks.on_step_end(model, &step_end_state(&run, &stats))?);
            if control == Control::Stop {
                log.say(&format!("training stopped by a callback at step {}", run.state.global_step));
                stopped = true;
                break;
            }
        }
        Ok(self.finish(run, &log, stopped))
    }

    /// The data iterator, the step totals, a fresh optimizer and trainer state.
    fn setup(&self, model: &Model) -> Result<Run> {
        let a = &self.args;
        let it = BatchIterator::new(self.train_data.clone(), self.batch_options(false))?;
        if a.per_device_train_batch_size > it.rows_per_epoch() {
            bail!(
                "per_device_train_batch_size ({}) is larger than the training set ({} rows)",
                a.per_device_train_batch_size,
                it.rows_per_epoch()
            );
        }
        let bpe = it.batches_per_epoch();
        let total = match a.max_steps {
            Some(s) => s,
            None => ((a.num_train_epochs * bpe as f64) / a.gradient_accumulation_steps as f64).ceil().max(1.0) as usize,
        };
        let manifest = self.manifest(model);
        let steps = StepState::new(model, a.clone(), total)?;
        let state = TrainerState {
            global_step: 0,
            max_steps: total,
            epoch: 0.0,
            position: Default::default(),
            train_tokens: 0,
            skipped_steps: 0,
            best_metric: None,
            best_model_checkpoint: None,
            log_history: vec![],
        };
        Ok(Run {
            it,
            steps,
            state,
            manifest,
            batches_per_epoch: bpe,
            t0: Instant::now(),
            tokens: 0,
            loss_sum: 0.0,
            loss_steps: 0,
            window_loss: 0.0,
            window_steps: 0,
            last_checkpoint: None,
            last_eval_loss: None,
        })
    }

    /// With `resume_from_checkpoint`: restores the adapters and the optimizer exactly, the data
    /// position and the trainer state; warns when the recipe, data or base model changed.
    fn resume(&self, model: &mut Model, run: &mut Run) -> Result<()> {
        let Some(dir) = self.resume_dir()? else { return Ok(()) };
        let ck = checkpoint::load(&dir)?;
        if !same_adapters(&ck.params, &run.steps.opt.params) {
            bail!("{}: its adapters do not match the model's (different LoraConfig?)", dir.display());
        }
        warn_if_changed(&dir, &ck.manifest, &run.manifest);
        // The resumed run continues the checkpoint's run (its checkpoints stay its own).
        if ck.manifest.run_id.is_some() {
            run.manifest.run_id = ck.manifest.run_id.clone();
        }
        let opt = &mut run.steps.opt;
        opt.params = ck.params;
        opt.step = ck.optimizer_step;
        opt.write_back(&mut model.llama)?;
        run.it.seek(ck.state.position)?;
        run.state = ck.state;
        run.state.max_steps = run.total();
        run.steps.step = run.state.global_step;
        eprintln!("resumed from {} at step {}", dir.display(), run.state.global_step);
        Ok(())
    }

    /// output_dir with the recipe's copy and the manifest, `metrics.jsonl`, the progress bar, and
    /// the line that says what will run.
    fn open_output(&self, run: &Run) -> Result<RunLog> {
        let (a, out_dir) = (&self.args, &self.args.output_dir);
        crate::util::permissions::write(out_dir)?;
        crate::util::fs::remove_dead_temps(out_dir);
        std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create output_dir", out_dir.display()))?;
        if let Some((path, src)) = &self.recipe {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "recipe.rhai".into());
            crate::util::fs::write(&out_dir.join(name), src.as_bytes())?;
        }
        crate::util::fs::write(&out_dir.join("manifest.json"), serde_json::to_string_pretty(&run.manifest)?.as_bytes())?;
        let mut log = RunLog::open(out_dir, &run.state.log_history, run.state.global_step, run.total())?;
        if a.report_to.tensorboard {
            log.report_to_tensorboard(&a.tensorboard_dir())?;
        }
        eprintln!(
            "training: {} examples, {} batches/epoch, {} steps (batch {} × accumulation {}), lr {:e} ({:?}, warmup {})",
            self.train_data.len(),
            run.batches_per_epoch,
            run.total(),
            a.per_device_train_batch_size,
            a.gradient_accumulation_steps,
            a.learning_rate,
            a.lr_scheduler_type,
            run.steps.warmup
        );
        Ok(log)
    }

    /// The next step's micro-batches (one per accumulation step), on the model's device.
    fn next_micro_batches(&self, model: &Model, it: &mut BatchIterator) -> Result<Vec<MicroBatch>> {
        let batches: Vec<Batch> = (0..self.args.gradient_accumulation_steps).map(|_| it.next_batch()).collect();
        batches.iter().map(|b| Ok(MicroBatch { batch: to_train_batch(b, model)?, tokens: b.num_tokens() })).collect()
    }

    /// `on_non_finite` for a step whose update was not applied: stop with an error naming the
    /// step and the checkpoint left intact, or count the step as skipped and go on.
    fn on_non_finite(&self, run: &mut Run, log: &RunLog, s: &StepStats) -> Result<()> {
        if !s.non_finite {
            return Ok(());
        }
        match self.args.on_non_finite {
            OnNonFinite::Stop => {
                let listed = checkpoint::list(&self.args.output_dir);
                let intact = run.last_checkpoint.as_ref().or(listed.last().map(|(_, p)| p));
                let finite_loss = s.loss.is_finite();
                bail!(
                    "step {}: non-finite {} ({}); training stopped, the last checkpoint{} is intact",
                    s.step,
                    if finite_loss { "gradient norm" } else { "loss" },
                    if finite_loss { s.grad_norm } else { s.loss },
                    intact.map(|p| format!(" ({})", p.display())).unwrap_or_default()
                )
            }
            OnNonFinite::Skip => {
                run.state.skipped_steps += 1;
                log.say(&format!("step {}: non-finite loss or gradient, update skipped", s.step));
                Ok(())
            }
        }
    }

    /// Every `logging_steps` (and at the last step): a metrics entry (mean loss since the last
    /// one), its line, and `on_log`.
    fn log_step(&self, model: &Model, run: &mut Run, log: &mut RunLog, s: &StepStats, tps: f64, callbacks: &mut dyn Callbacks) -> Result<Control> {
        if !run.due(Strategy::Steps, self.args.logging_steps) {
            return Ok(Control::Continue);
        }
        let entry = json!({
            "step": run.state.global_step,
            "epoch": run.epoch_rounded(),
            "loss": if run.window_steps > 0 { run.window_loss / run.window_steps as f64 } else { f64::NAN },
            "learning_rate": s.lr,
            "grad_norm": s.grad_norm,
            "tokens_per_sec": tps,
        });
        run.window_loss = 0.0;
        run.window_steps = 0;
        log.write(&entry)?;
        log.say(&format!(
            "step {}/{} | epoch {:.2} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {:.0} tok/s",
            run.state.global_step,
            run.total(),
            run.state.epoch,
            entry["loss"].as_f64().unwrap_or(f64::NAN),
            entry["learning_rate"].as_f64().unwrap_or(0.0),
            s.grad_norm,
            tps
        ));
        run.state.log_history.push(entry.clone());
        callbacks.on_log(model, &entry)
    }

    /// When `eval_strategy` says so: eval loss and perplexity, their entry and line, the best
    /// metric, and `on_evaluate`.
    fn maybe_evaluate(&self, model: &Model, run: &mut Run, log: &mut RunLog, callbacks: &mut dyn Callbacks) -> Result<Control> {
        let a = &self.args;
        if !run.due(a.eval_strategy, a.eval_steps.unwrap_or(a.logging_steps)) {
            return Ok(Control::Continue);
        }
        let m = self.evaluate(model)?;
        run.last_eval_loss = Some(m.loss);
        let step = run.state.global_step;
        let entry = json!({"step": step, "epoch": run.epoch_rounded(), "eval_loss": m.loss, "eval_perplexity": m.perplexity, "eval_tokens": m.tokens});
        log.write(&entry)?;
        log.say(&format!("step {step}/{} | eval_loss {:.4} | eval_perplexity {:.2}", run.total(), m.loss, m.perplexity));
        run.state.log_history.push(entry.clone());
        if run.state.best_metric.is_none_or(|b| m.loss < b) {
            run.state.best_metric = Some(m.loss);
        }
        callbacks.on_evaluate(model, &entry)
    }

    /// When `save_strategy` says so, or a callback stops a run that saves: a checkpoint, and
    /// `on_save`.
    fn maybe_save(&self, model: &Model, run: &mut Run, control: Control, callbacks: &mut dyn Callbacks) -> Result<Control> {
        let a = &self.args;
        let stopping = control == Control::Stop && a.save_strategy != Strategy::No;
        if !(run.due(a.save_strategy, a.save_steps) || stopping) {
            return Ok(Control::Continue);
        }
        let dir = self.save_checkpoint(model, run)?;
        run.last_checkpoint = Some(dir.clone());
        callbacks.on_save(model, &dir)
    }

    /// `checkpoint-<step>` (adapters, optimizer, trainer state, manifest, scheduler), then the
    /// oldest beyond `save_total_limit` pruned, the best one kept.
    fn save_checkpoint(&self, model: &Model, run: &mut Run) -> Result<PathBuf> {
        let (a, out_dir) = (&self.args, &self.args.output_dir);
        let (step, total, warmup) = (run.state.global_step, run.total(), run.steps.warmup);
        if run.last_eval_loss.is_some() && run.state.best_metric == run.last_eval_loss {
            run.state.best_model_checkpoint = Some(out_dir.join(format!("checkpoint-{step}")).display().to_string());
        }
        run.steps.opt.sync_to_host()?;
        let save_adapter = &self.save_adapter;
        let dir = checkpoint::save(
            out_dir,
            &checkpoint::Checkpoint {
                state: &run.state,
                optimizer: &run.steps.opt,
                manifest: &run.manifest,
                scheduler: json!({"lr_scheduler_type": format!("{:?}", a.lr_scheduler_type), "base_lr": a.learning_rate, "warmup_steps": warmup, "total_steps": total, "last_step": step}),
            },
            &|d: &Path| save_adapter(model, d),
        )?;
        if a.save_only_model {
            checkpoint::drop_optimizer_state(&dir)?;
        }
        if let Some(limit) = a.save_total_limit {
            let best = run.state.best_model_checkpoint.as_ref().map(PathBuf::from);
            let run_id = run.manifest.run_id.clone().unwrap_or_default();
            checkpoint::prune(out_dir, limit.max(1), best.as_deref(), &run_id)?;
        }
        Ok(dir)
    }

    /// Clears the bar, draws loss.png, prints and returns the summary.
    fn finish(&self, run: Run, log: &RunLog, stopped: bool) -> TrainSummary {
        log.finish();
        let seconds = run.t0.elapsed().as_secs_f64();
        let summary = TrainSummary {
            global_step: run.state.global_step,
            train_loss: if run.loss_steps > 0 { run.loss_sum / run.loss_steps as f64 } else { f64::NAN },
            seconds,
            tokens: run.tokens,
            tokens_per_sec: run.tokens as f64 / seconds.max(1e-9),
            best_eval_loss: run.state.best_metric,
            last_checkpoint: run.last_checkpoint,
            stopped_early: stopped,
            skipped_steps: run.state.skipped_steps,
        };
        let out_dir = &self.args.output_dir;
        if let Err(e) = super::plot::loss_png(&out_dir.join("loss.png"), &run.state.log_history) {
            eprintln!("warning: could not draw loss.png: {e:#}");
        }
        eprintln!("{}", summary.describe(out_dir));
        summary
    }
}

/// What `on_step_end` receives.
fn step_end_state(run: &Run, s: &StepStats) -> Value {
    json!({"global_step": run.state.global_step, "max_steps": run.total(), "epoch": run.state.epoch, "loss": s.loss, "grad_norm": s.grad_norm, "tokens": run.state.train_tokens})
}

impl TrainSummary {
    pub fn describe(&self, out_dir: &Path) -> String {
        let mut s = format!(
            "trained {} steps in {:.1}s ({} tokens, {:.0} tok/s); mean train loss {:.4}",
            self.global_step, self.seconds, self.tokens, self.tokens_per_sec, self.train_loss
        );
        if let Some(b) = self.best_eval_loss {
            s.push_str(&format!("; best eval loss {b:.4}"));
        }
        if self.skipped_steps > 0 {
            s.push_str(&format!("; {} steps skipped (non-finite)", self.skipped_steps));
        }
        if self.stopped_early {
            s.push_str("; stopped early");
        }
        match &self.last_checkpoint {
            Some(c) => s.push_str(&format!("; last checkpoint {}", c.display())),
            None => s.push_str(&format!("; metrics in {}", out_dir.join("metrics.jsonl").display())),
        }
        s
    }
}
