//! The SFT trainer, in named parts: setup (data iterator, totals, optimizer), resume, the step
//! loop over [`StepState::train_step`], logging, evaluation and saving (checkpoints with exact
//! resume), the best checkpoint and early stopping, with callbacks that can stop training. The
//! trainer works on the model it is given for the length of a `train()` / `evaluate()` call; it
//! keeps no handle to it.
//!
//! Ctrl-C ([`crate::CANCEL`]) ends the step in flight (a step the signal reaches inside the
//! forward or backward pass is abandoned and its batches put back), then per [`OnInterrupt`]:
//! a recipe run writes a checkpoint, `loss.png` and the metrics and prints the command that
//! resumes; the REPL pauses, keeping the whole run (optimizer, data position, schedule) in
//! memory for [`SftTrainer::resume_paused`], which continues exactly as if never paused.

use super::args::{OnNonFinite, Resume, Strategy, TrainingArguments};
use super::callbacks::{Callbacks, Control};
use super::checkpoint::{self, Manifest, TrainerState};
use super::distributed::{self, Collective};
use super::logging::RunLog;
use super::optim::ParamState;
use super::record::{self, RunRecord};
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
    /// Ctrl-C paused the run (the REPL): `resume_paused` continues it.
    pub paused: bool,
    pub max_steps: usize,
    /// Peak GPU memory of this call (the model's device's pool, as `torch.cuda.max_memory_allocated`);
    /// `None` on the CPU.
    pub peak_gpu_gib: Option<f64>,
}

/// What Ctrl-C does to a running `train()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInterrupt {
    /// A recipe run: a checkpoint, `loss.png` and the metrics are written, the command that
    /// resumes is printed, and `train()` fails with "interrupted".
    #[default]
    Checkpoint,
    /// The REPL: the run stays in memory, `train()` returns (paused), `resume_paused` continues.
    Pause,
}

pub struct SftTrainer {
    pub train_data: Arc<TokenizedDataset>,
    pub eval_data: Option<Arc<TokenizedDataset>>,
    pub args: TrainingArguments,
    /// Source of the recipe that built this trainer (copied into output_dir, hashed).
    pub recipe: Option<(PathBuf, String)>,
    pub save_adapter: SaveAdapter,
    pub on_interrupt: OnInterrupt,
    /// The run Ctrl-C paused (with [`OnInterrupt::Pause`]).
    paused: Option<Run>,
    /// The data-parallel group (the process's, [`distributed::world`]): each rank trains on its
    /// share of every global batch; rank 0 alone writes the output_dir.
    pub comm: Arc<dyn Collective>,
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
    /// Since the last log entry: when it was written and the tokens trained since (the entry's
    /// `tokens_per_sec` is this window's rate, so the first step's warm-up fades out of it).
    window_t0: Instant,
    window_tokens: u64,
    /// Peak GPU memory of the step loop (GiB), read when it ends.
    peak_gpu_gib: Option<f64>,
    loss_sum: f64,
    loss_steps: usize,
    last_checkpoint: Option<PathBuf>,
    /// The step of the latest evaluation when it was the best so far (its checkpoint is the best).
    best_eval_step: Option<usize>,
    /// A finished step whose logging, evaluation, saving and callbacks did not all run (Ctrl-C
    /// came between or inside them): a paused run does the rest first when it resumes.
    pending: Option<AfterStep>,
    /// The TensorBoard folder of this run (`report_to: "tensorboard"`): a paused run's events go
    /// on in the same one.
    tensorboard_dir: Option<PathBuf>,
}

/// The work after a step, in order: the log entry, `on_log`, the evaluation, `on_evaluate`, the
/// checkpoint, `on_save`, `on_step_end`. Ctrl-C can land inside any part that runs a model or
/// a callback; a paused run then redoes that part and goes on, so every part runs exactly once
/// to completion, as in a run that was never paused.
struct AfterStep {
    stats: StepStats,
    /// The next part to run (index into the order above).
    next: u8,
    control: Control,
    log_entry: Option<Value>,
    eval_entry: Option<Value>,
    saved: Option<PathBuf>,
}

impl AfterStep {
    fn new(stats: StepStats) -> Self {
        Self { stats, next: 0, control: Control::Continue, log_entry: None, eval_entry: None, saved: None }
    }

    /// For the checkpoint a Ctrl-C writes (non-finite numbers as null, as JSON has no NaN).
    fn to_json(&self) -> Value {
        let s = &self.stats;
        json!({"next": self.next, "stop": self.control == Control::Stop, "step": s.step, "loss": s.loss, "grad_norm": s.grad_norm,
               "lr": s.lr, "tokens": s.tokens, "n_targets": s.n_targets, "non_finite": s.non_finite})
    }

    /// Back from [`Self::to_json`]; the entries already written come from the log history.
    fn from_json(v: &Value, state: &TrainerState) -> Result<Self> {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let u = |k: &str| v[k].as_u64().with_context(|| format!("trainer state: after_step.{k} missing"));
        let step = u("step")? as usize;
        let stats = StepStats { step, loss: f("loss"), grad_norm: f("grad_norm"), lr: f("lr"), tokens: u("tokens")?, n_targets: u("n_targets")? as usize, non_finite: v["non_finite"].as_bool().unwrap_or(false) };
        let entry = |key: &str| state.log_history.iter().rev().find(|e| e["step"].as_u64() == Some(step as u64) && e.get(key).is_some()).cloned();
        let next = u("next")? as u8;
        Ok(Self {
            stats,
            next,
            control: if v["stop"].as_bool() == Some(true) { Control::Stop } else { Control::Continue },
            log_entry: if next >= 1 { entry("loss") } else { None },
            eval_entry: if next >= 3 { entry("eval_loss") } else { None },
            saved: None,
        })
    }
}

/// How the step loop ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Done,
    /// A callback or early stopping.
    Stopped,
    Interrupted,
}

fn interrupted() -> bool {
    crate::CANCEL.load(std::sync::atomic::Ordering::SeqCst)
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
        self.window_tokens += s.tokens;
        if s.loss.is_finite() {
            self.state.window_loss += s.loss;
            self.state.window_steps += 1;
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
    if distributed::is_main_process() {
        eprintln!("{what}: {}", t.report.summary());
        super::logging::print_lints(Some(what), &t.report.lints);
    }
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

/// The model's adapters have the optimizer's modules and shapes (they were not replaced, merged
/// or re-attached while a run was paused).
fn model_matches(model: &Model, params: &[ParamState]) -> bool {
    let now: Vec<_> = model.llama.adapters().flat_map(|(id, lo)| [(id, lo.a.dims().to_vec()), (id, lo.b.dims().to_vec())]).collect();
    now.len() == params.len() && now.iter().zip(params).all(|((id, dims), p)| id.layer == p.layer && id.proj == p.proj && dims[..] == [p.shape.0, p.shape.1])
}

fn warn_if_changed(dir: &Path, saved: &Manifest, now: &Manifest) {
    for change in saved.record.changes(&now.record) {
        eprintln!("warning: resuming {}: {change}", dir.display());
    }
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
            if distributed::is_main_process() {
                eprintln!("{note}");
            }
        }
        let train_data = tokenize(model, train, &args, "train")?;
        let eval_data = match eval {
            Some(e) => Some(tokenize(model, e, &args, "eval")?),
            None => None,
        };
        if args.eval_strategy != Strategy::No && eval_data.is_none() {
            bail!("TrainingArguments: eval_strategy is set but SFTTrainer got no eval_dataset");
        }
        Ok(Self { train_data, eval_data, args, recipe, save_adapter, on_interrupt: OnInterrupt::default(), paused: None, comm: distributed::world() })
    }

    /// Rank 0 (or one process) writes the output_dir.
    fn is_main(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Rows of one global batch: per_device_train_batch_size × WORLD_SIZE.
    fn global_batch(&self) -> usize {
        self.args.per_device_train_batch_size * self.comm.world_size()
    }

    /// The options of the global batches (`global`: the train batch's rows); each rank's iterator
    /// takes its shard of them.
    fn batch_options(&self, eval: bool, global: usize) -> BatchOptions {
        let a = &self.args;
        BatchOptions {
            batch_size: if eval { a.per_device_eval_batch_size * self.comm.world_size() } else { global },
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
        let it = BatchIterator::new(data, self.batch_options(true, 0))?.with_shard(self.comm.rank(), self.comm.world_size());
        let (mut sum, mut n) = (0.0, 0usize);
        for b in it.epoch(0).iter().filter(|b| b.batch > 0) {
            crate::check_cancel()?;
            let out = engine::loss(&model.llama, &to_train_batch(b, model)?)?;
            sum += out.loss_sum;
            n += out.n_tokens;
        }
        if self.comm.world_size() > 1 {
            let mut v = [sum, n as f64];
            self.comm.all_reduce_f64(&mut v)?;
            (sum, n) = (v[0], v[1] as usize);
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
            base_model_config_sha256: checkpoint::config_sha256(model.config()),
            base_model: model.name_or_path.clone(),
            seed: self.args.seed,
            run_id: Some(checkpoint::new_run_id()),
            record: RunRecord {
                recipe_file: self.recipe_file(),
                recipe_path: self.recipe_path(),
                checkpoint_offload: self.args.gradient_checkpointing.then(|| self.args.offload_checkpoints && model.llama.device.is_cuda()),
                ..RunRecord::of(model)
            },
        }
    }

    fn recipe_path(&self) -> Option<String> {
        self.recipe.as_ref().and_then(|(path, _)| path.canonicalize().ok()).map(|p| p.display().to_string())
    }

    fn recipe_file(&self) -> Option<String> {
        self.recipe.as_ref().map(|(path, _)| path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "recipe.rhai".into()))
    }

    /// `qscript RECIPE --resume`: a run whose output_dir holds a checkpoint continues from it.
    fn with_cli_resume(&self, resume: Resume) -> Resume {
        let cli = record::launch().is_some_and(|l| l.resume);
        if resume == Resume::No && cli && !checkpoint::list(&self.args.output_dir).is_empty() { Resume::Latest } else { resume }
    }

    fn resume_dir(&self, resume: &Resume) -> Result<Option<PathBuf>> {
        Ok(match resume {
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

    /// Trains `model`'s adapters for the configured steps, resuming if `resume_from_checkpoint`
    /// says so.
    pub fn train(&mut self, model: &mut Model, callbacks: &mut dyn Callbacks) -> Result<TrainSummary> {
        let resume = self.args.resume_from_checkpoint.clone();
        self.train_resuming(model, callbacks, resume)
    }

    /// `train(resume_from_checkpoint=...)` as transformers: `resume` wins over the argument's.
    pub fn train_resuming(&mut self, model: &mut Model, callbacks: &mut dyn Callbacks, resume: Resume) -> Result<TrainSummary> {
        if let Some(run) = &self.paused {
            bail!("the trainer is paused at step {} of {}: trainer.resume() continues it", run.state.global_step, run.total());
        }
        let resume = self.with_cli_resume(resume);
        let mut run = self.setup(model, self.global_batch())?;
        let resumed = self.resume(model, &mut run, &resume)?;
        let log = if self.is_main() {
            super::run_dir::prepare(&self.args.output_dir, self.args.overwrite_output_dir, resumed, self.recipe_path().as_deref())?;
            self.open_output(&mut run)?
        } else {
            RunLog::silent(run.state.global_step, run.total())
        };
        self.drive(model, run, log, callbacks)
    }

    /// The step and total of a paused run.
    pub fn paused_at(&self) -> Option<(usize, usize)> {
        self.paused.as_ref().map(|r| (r.state.global_step, r.total()))
    }

    /// Continues the run Ctrl-C paused, exactly where it stopped (same optimizer state, data
    /// position, schedule and dropout draws as an uninterrupted run).
    pub fn resume_paused(&mut self, model: &mut Model, callbacks: &mut dyn Callbacks) -> Result<TrainSummary> {
        let Some(mut run) = self.paused.take() else {
            bail!("the trainer is not paused: trainer.train() starts a run");
        };
        if !model_matches(model, &run.steps.opt.params) {
            let at = run.state.global_step;
            self.paused = Some(run);
            bail!("cannot resume: the model's adapters changed since the pause at step {at} (merged, replaced or re-attached)");
        }
        let mut log = if self.is_main() {
            RunLog::open(&self.args.output_dir, &run.state.log_history, run.state.global_step, run.total())?
        } else {
            RunLog::silent(run.state.global_step, run.total())
        };
        if let Some(dir) = &run.tensorboard_dir {
            log.report_to_tensorboard(dir)?;
        }
        log.say(&format!("resuming at step {}/{}", run.state.global_step, run.total()));
        (run.tokens, run.loss_sum, run.loss_steps) = (0, 0.0, 0);
        self.drive(model, run, log, callbacks)
    }

    /// The step loop, then what its end calls for: the summary (with the best checkpoint loaded
    /// if asked), or the interrupted run's checkpoint or pause.
    fn drive(&mut self, model: &mut Model, mut run: Run, mut log: RunLog, callbacks: &mut dyn Callbacks) -> Result<TrainSummary> {
        (run.t0, run.window_t0, run.window_tokens) = (Instant::now(), Instant::now(), 0);
        crate::device::reset_peak_memory(&model.llama.device)?;
        let outcome = self.step_loop(model, &mut run, &mut log, callbacks);
        let peak = crate::device::peak_memory(&model.llama.device)?;
        run.peak_gpu_gib = peak.map(|b| b as f64 / (1u64 << 30) as f64);
        match outcome? {
            Outcome::Interrupted => self.interrupted(model, run, log),
            outcome => {
                self.load_best(model, &mut run, &log)?;
                Ok(self.finish(run, &log, outcome == Outcome::Stopped))
            }
        }
    }

    fn step_loop(&self, model: &mut Model, run: &mut Run, log: &mut RunLog, callbacks: &mut dyn Callbacks) -> Result<Outcome> {
        if let Some(a) = run.pending.take() {
            if let Some(end) = self.after_step(model, run, log, a, callbacks)? {
                return Ok(end);
            }
        }
        while run.steps.step < run.total() {
            // Data-parallel: every rank stops at the same step.
            if distributed::any(&*self.comm, interrupted())? {
                return Ok(Outcome::Interrupted);
            }
            let at = run.it.position();
            let stats = match self.next_micro_batches(model, &mut run.it).and_then(|micro| run.steps.train_step(model, &micro)) {
                Ok(s) => s,
                Err(_) if interrupted() => {
                    // Stopped inside forward/backward, before the update: the step never happened.
                    run.it.seek(at)?;
                    log.say(&format!("Ctrl-C: step {} abandoned", run.state.global_step + 1));
                    return Ok(Outcome::Interrupted);
                }
                Err(e) => return Err(e),
            };
            self.on_non_finite(run, log, &stats)?;
            run.record(&stats);
            log.progress(stats.step, stats.loss, stats.lr, run.tokens_per_sec());
            if interrupted() {
                run.pending = Some(AfterStep::new(stats));
                return Ok(Outcome::Interrupted);
            }
            if let Some(end) = self.after_step(model, run, log, AfterStep::new(stats), callbacks)? {
                return Ok(end);
            }
        }
        Ok(Outcome::Done)
    }

    /// Logging, evaluation, saving and the callbacks of a finished step, from the part `a` is
    /// at; `Some` when training ends there (stopped, or Ctrl-C reached one of them: the run
    /// keeps `a` as pending, at the part that was cut).
    fn after_step(&self, model: &Model, run: &mut Run, log: &mut RunLog, mut a: AfterStep, callbacks: &mut dyn Callbacks) -> Result<Option<Outcome>> {
        while a.next < 7 {
            match self.after_step_part(model, run, log, &mut a, callbacks) {
                Ok(c) => {
                    a.control = a.control.or(c);
                    a.next += 1;
                }
                Err(_) if interrupted() => {
                    run.pending = Some(a);
                    return Ok(Some(Outcome::Interrupted));
                }
                Err(e) => return Err(e),
            }
        }
        if distributed::any(&*self.comm, a.control == Control::Stop)? {
            log.say(&format!("training stopped at step {}", run.state.global_step));
            return Ok(Some(Outcome::Stopped));
        }
        Ok(None)
    }

    fn after_step_part(&self, model: &Model, run: &mut Run, log: &mut RunLog, a: &mut AfterStep, callbacks: &mut dyn Callbacks) -> Result<Control> {
        let none = Control::Continue;
        match a.next {
            0 => a.log_entry = self.write_log_entry(run, log, &a.stats)?,
            1 => return a.log_entry.as_ref().map_or(Ok(none), |e| callbacks.on_log(model, e)),
            2 => {
                let (entry, stop) = self.maybe_evaluate(model, run, log)?;
                a.eval_entry = entry;
                return Ok(stop);
            }
            3 => return a.eval_entry.as_ref().map_or(Ok(none), |e| callbacks.on_evaluate(model, e)),
            4 => a.saved = self.maybe_save(model, run, a.control)?,
            5 => return a.saved.as_ref().map_or(Ok(none), |d| callbacks.on_save(model, d)),
            _ => return callbacks.on_step_end(model, &step_end_state(run, &a.stats)),
        }
        Ok(none)
    }

    /// Ctrl-C: pause (the REPL) or checkpoint and stop (a recipe run).
    fn interrupted(&mut self, model: &Model, mut run: Run, mut log: RunLog) -> Result<TrainSummary> {
        let (step, total) = (run.state.global_step, run.total());
        if self.on_interrupt == OnInterrupt::Pause {
            log.finish();
            crate::CANCEL.store(false, std::sync::atomic::Ordering::SeqCst);
            eprintln!(
                "paused at step {step}/{total}: trainer.resume() continues exactly here; meanwhile model.chat(...), trainer.evaluate() \
                 and trainer.set_callbacks(#{{...}}) work"
            );
            let summary = self.summary(&run, false, true);
            self.paused = Some(run);
            return Ok(summary);
        }
        // A recipe run stops here: the step's log entry is written; what else its after-step work
        // had left (an evaluation, callbacks) goes into the checkpoint, for the resumed run to do
        // first, as the run that never stopped did.
        if let Some(mut a) = run.pending.take() {
            if a.next == 0 {
                a.log_entry = self.write_log_entry(&mut run, &mut log, &a.stats)?;
                a.next = 1;
            }
            run.state.after_step = (a.next < 5).then(|| a.to_json());
        }
        log.finish();
        if step == 0 {
            bail!("interrupted (Ctrl-C) before the first step finished; no checkpoint was written");
        }
        let done = !self.args.save_only_model && run.last_checkpoint.as_ref().is_some_and(|c| c.ends_with(format!("checkpoint-{step}")));
        let dir = if done { run.last_checkpoint.clone().unwrap_or_default() } else { self.save_checkpoint(model, &mut run, true)? };
        run.state.after_step = None;
        self.draw_loss(&run);
        let how = record::resume_command()
            .unwrap_or_else(|| "resume_from_checkpoint: true in TrainingArguments, or trainer.train(#{ resume_from_checkpoint: true })".into());
        if self.is_main() {
            eprintln!(
                "interrupted at step {step}/{total}: checkpoint {}, metrics and loss.png in {}\nresume with: {how}",
                dir.display(),
                self.args.output_dir.display()
            );
        }
        bail!("interrupted (Ctrl-C) at step {step} of {total}; checkpoint {}", dir.display())
    }

    /// The data iterator, the step totals, a fresh optimizer and trainer state.
    /// `global`: rows of a global batch (per_device_train_batch_size × WORLD_SIZE, or the
    /// checkpoint's when a run resumes on another number of ranks).
    fn setup(&self, model: &Model, global: usize) -> Result<Run> {
        let a = &self.args;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let it = BatchIterator::new(self.train_data.clone(), self.batch_options(false, global))?.with_shard(rank, world);
        if global > it.rows_per_epoch() {
            let times = if world > 1 { format!(" × WORLD_SIZE ({world})") } else { String::new() };
            bail!("per_device_train_batch_size ({}){times} is larger than the training set ({} rows)", global / world, it.rows_per_epoch());
        }
        let bpe = it.batches_per_epoch();
        let total = match a.max_steps {
            Some(s) => s,
            None => ((a.num_train_epochs * bpe as f64) / a.gradient_accumulation_steps as f64).ceil().max(1.0) as usize,
        };
        let manifest = self.manifest(model);
        let mut steps = StepState::new(model, a.clone(), total)?;
        steps.comm = self.comm.clone();
        self.comm.set_timeout(std::time::Duration::from_secs_f64(a.ddp_timeout));
        let state = TrainerState {
            global_batch_size: Some(global),
            world_size: Some(world),
            global_step: 0,
            max_steps: total,
            epoch: 0.0,
            position: Default::default(),
            train_tokens: 0,
            skipped_steps: 0,
            best_metric: None,
            best_model_checkpoint: None,
            log_history: vec![],
            ..Default::default()
        };
        Ok(Run {
            it,
            steps,
            state,
            manifest,
            batches_per_epoch: bpe,
            t0: Instant::now(),
            window_t0: Instant::now(),
            window_tokens: 0,
            peak_gpu_gib: None,
            tokens: 0,
            loss_sum: 0.0,
            loss_steps: 0,
            last_checkpoint: None,
            best_eval_step: None,
            pending: None,
            tensorboard_dir: None,
        })
    }

    /// With `resume_from_checkpoint`: restores the adapters and the optimizer exactly, the data
    /// position and the trainer state; warns when the recipe, data, base model or `--set`
    /// values changed. Whether it resumed.
    fn resume(&self, model: &mut Model, run: &mut Run, resume: &Resume) -> Result<bool> {
        let Some(dir) = self.resume_dir(resume)? else { return Ok(false) };
        let ck = checkpoint::load(&dir)?;
        if !same_adapters(&ck.params, &run.steps.opt.params) {
            bail!("{}: its adapters do not match the model's (different LoraConfig?)", dir.display());
        }
        if self.is_main() {
            warn_if_changed(&dir, &ck.manifest, &run.manifest);
        }
        let world = self.comm.world_size();
        if let Some(g) = ck.state.global_batch_size.filter(|&g| g != self.global_batch()) {
            // Positions count global batches: a resumed run keeps the checkpoint's (another
            // WORLD_SIZE, or per_device_train_batch_size changed), each rank taking its share.
            if self.is_main() {
                let w = ck.state.world_size.unwrap_or(1);
                eprintln!("resuming {} (trained with WORLD_SIZE {w}) with WORLD_SIZE {world}: the global batch stays {g} rows", dir.display());
            }
            *run = self.setup(model, g)?;
        }
        // The resumed run continues the checkpoint's run (its checkpoints stay its own).
        if ck.manifest.run_id.is_some() {
            run.manifest.run_id = ck.manifest.run_id.clone();
        }
        let opt = &mut run.steps.opt;
        opt.params = ck.params;
        opt.step = ck.optimizer_step;
        opt.write_back(&mut model.llama)?;
        run.it.seek(ck.state.position)?;
        let global = run.state.global_batch_size;
        run.state = ck.state;
        (run.state.global_batch_size, run.state.world_size) = (global, Some(world));
        if let Some(v) = run.state.after_step.take() {
            run.pending = Some(AfterStep::from_json(&v, &run.state)?);
        }
        run.state.max_steps = run.total();
        run.steps.step = run.state.global_step;
        if self.is_main() {
            eprintln!("resumed from {} at step {}", dir.display(), run.state.global_step);
        }
        Ok(true)
    }

    /// output_dir with the recipe's copy and the manifest, `metrics.jsonl`, the progress bar, and
    /// the line that says what will run.
    fn open_output(&self, run: &mut Run) -> Result<RunLog> {
        let (a, out_dir) = (&self.args, &self.args.output_dir);
        crate::util::permissions::write(out_dir)?;
        crate::util::fs::remove_dead_temps(out_dir);
        std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create output_dir", out_dir.display()))?;
        if let (Some((_, src)), Some(name)) = (&self.recipe, self.recipe_file()) {
            crate::util::fs::write(&out_dir.join(name), src.as_bytes())?;
        }
        crate::util::fs::write(&out_dir.join("manifest.json"), serde_json::to_string_pretty(&run.manifest)?.as_bytes())?;
        let mut log = RunLog::open(out_dir, &run.state.log_history, run.state.global_step, run.total())?;
        if a.report_to.tensorboard {
            let dir = a.tensorboard_dir();
            log.report_to_tensorboard(&dir)?;
            run.tensorboard_dir = Some(dir);
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
    /// one) and its line.
    fn write_log_entry(&self, run: &mut Run, log: &mut RunLog, s: &StepStats) -> Result<Option<Value>> {
        if !run.due(Strategy::Steps, self.args.logging_steps) {
            return Ok(None);
        }
        let tps = run.window_tokens as f64 / run.window_t0.elapsed().as_secs_f64().max(1e-9);
        (run.window_t0, run.window_tokens) = (Instant::now(), 0);
        let st = &mut run.state;
        let entry = json!({
            "step": st.global_step,
            "epoch": (st.epoch * 1000.0).round() / 1000.0,
            "loss": if st.window_steps > 0 { st.window_loss / st.window_steps as f64 } else { f64::NAN },
            "learning_rate": s.lr,
            "grad_norm": s.grad_norm,
            "tokens_per_sec": tps,
        });
        (st.window_loss, st.window_steps) = (0.0, 0);
        log.write(&entry)?;
        log.say(&format!(
            "step {}/{} | epoch {:.2} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {:.0} tok/s",
            st.global_step,
            run.steps.total,
            st.epoch,
            entry["loss"].as_f64().unwrap_or(f64::NAN),
            entry["learning_rate"].as_f64().unwrap_or(0.0),
            s.grad_norm,
            tps
        ));
        st.log_history.push(entry.clone());
        Ok(Some(entry))
    }

    /// When `eval_strategy` says so: eval loss and perplexity, their entry and line, the best
    /// metric and early stopping (which may say stop).
    fn maybe_evaluate(&self, model: &Model, run: &mut Run, log: &mut RunLog) -> Result<(Option<Value>, Control)> {
        let a = &self.args;
        if !run.due(a.eval_strategy, a.eval_steps.unwrap_or(a.logging_steps)) {
            return Ok((None, Control::Continue));
        }
        let m = self.evaluate(model)?;
        let step = run.state.global_step;
        let entry = json!({"step": step, "epoch": run.epoch_rounded(), "eval_loss": m.loss, "eval_perplexity": m.perplexity, "eval_tokens": m.tokens});
        log.write(&entry)?;
        log.say(&format!("step {step}/{} | eval_loss {:.4} | eval_perplexity {:.2}", run.total(), m.loss, m.perplexity));
        run.state.log_history.push(entry.clone());
        let value = if a.metric_for_best_model == "eval_perplexity" { m.perplexity } else { m.loss };
        let previous = run.state.best_metric;
        let best = value.is_finite() && previous.is_none_or(|b| a.better(value, b));
        if best {
            run.state.best_metric = Some(value);
        }
        run.best_eval_step = best.then_some(step);
        let stop = self.early_stopping(run, log, value, previous);
        Ok((Some(entry), stop))
    }

    /// transformers' EarlyStoppingCallback: an evaluation that does not beat the best before it
    /// by more than `early_stopping_threshold` counts; `early_stopping_patience` of them stop.
    fn early_stopping(&self, run: &mut Run, log: &RunLog, value: f64, previous: Option<f64>) -> Control {
        let a = &self.args;
        let Some(patience) = a.early_stopping_patience else { return Control::Continue };
        let improved = previous.is_none_or(|b| a.better(value, b) && (value - b).abs() > a.early_stopping_threshold);
        let counter = &mut run.state.early_stopping_patience_counter;
        *counter = if improved { 0 } else { *counter + 1 };
        if *counter < patience {
            return Control::Continue;
        }
        log.say(&format!("early stopping: {} did not improve in {patience} evaluation(s)", a.metric_for_best_model));
        Control::Stop
    }

    /// When `save_strategy` says so, or a callback stops a run that saves: a checkpoint.
    fn maybe_save(&self, model: &Model, run: &mut Run, control: Control) -> Result<Option<PathBuf>> {
        let a = &self.args;
        let stopping = control == Control::Stop && a.save_strategy != Strategy::No;
        if !(run.due(a.save_strategy, a.save_steps) || stopping) {
            return Ok(None);
        }
        let dir = self.save_checkpoint(model, run, false)?;
        // The other ranks read it (load_best_model_at_end) only once rank 0 has written it whole.
        distributed::barrier(&*self.comm)?;
        run.last_checkpoint = Some(dir.clone());
        Ok(Some(dir))
    }

    /// `checkpoint-<step>` (adapters, optimizer, trainer state, manifest, scheduler), then the
    /// oldest beyond `save_total_limit` pruned, the best one kept.
    /// `resumable`: with the optimizer state even under `save_only_model` (the checkpoint Ctrl-C
    /// writes is there to be resumed).
    fn save_checkpoint(&self, model: &Model, run: &mut Run, resumable: bool) -> Result<PathBuf> {
        let (a, out_dir) = (&self.args, &self.args.output_dir);
        let (step, total, warmup) = (run.state.global_step, run.total(), run.steps.warmup);
        if run.best_eval_step == Some(step) {
            run.state.best_model_checkpoint = Some(out_dir.join(format!("checkpoint-{step}")).display().to_string());
        }
        if !self.is_main() {
            return Ok(out_dir.join(format!("checkpoint-{step}")));
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
        if a.save_only_model && !resumable {
            checkpoint::drop_optimizer_state(&dir)?;
        }
        if let Some(limit) = a.save_total_limit {
            let best = run.state.best_model_checkpoint.as_ref().map(PathBuf::from);
            let run_id = run.manifest.run_id.clone().unwrap_or_default();
            checkpoint::prune(out_dir, limit.max(1), best.as_deref(), &run_id)?;
        }
        Ok(dir)
    }

    /// `load_best_model_at_end`: the best checkpoint's adapters (its exact f32 master weights)
    /// into the model.
    fn load_best(&self, model: &mut Model, run: &mut Run, log: &RunLog) -> Result<()> {
        if !self.args.load_best_model_at_end {
            return Ok(());
        }
        let Some(best) = run.state.best_model_checkpoint.clone() else {
            log.say("load_best_model_at_end: no checkpoint was saved at an evaluation; the model keeps its last weights");
            return Ok(());
        };
        let ck = checkpoint::load(Path::new(&best))?;
        if !same_adapters(&ck.params, &run.steps.opt.params) {
            bail!("{best}: its adapters do not match the model's");
        }
        run.steps.opt.params = ck.params;
        run.steps.opt.write_back(&mut model.llama)?;
        log.say(&format!(
            "load_best_model_at_end: loaded {best} ({} {:.4}, step {})",
            self.args.metric_for_best_model,
            run.state.best_metric.unwrap_or(f64::NAN),
            ck.state.global_step
        ));
        Ok(())
    }

    fn draw_loss(&self, run: &Run) {
        if !self.is_main() {
            return;
        }
        if let Err(e) = super::plot::loss_png(&self.args.output_dir.join("loss.png"), &run.state.log_history) {
            eprintln!("warning: could not draw loss.png: {e:#}");
        }
    }

    fn summary(&self, run: &Run, stopped: bool, paused: bool) -> TrainSummary {
        let seconds = run.t0.elapsed().as_secs_f64();
        let best_eval_loss = run.state.log_history.iter().filter_map(|e| e.get("eval_loss")?.as_f64()).filter(|l| l.is_finite()).reduce(f64::min);
        TrainSummary {
            global_step: run.state.global_step,
            train_loss: if run.loss_steps > 0 { run.loss_sum / run.loss_steps as f64 } else { f64::NAN },
            seconds,
            tokens: run.tokens,
            tokens_per_sec: run.tokens as f64 / seconds.max(1e-9),
            best_eval_loss,
            last_checkpoint: run.last_checkpoint.clone(),
            stopped_early: stopped,
            skipped_steps: run.state.skipped_steps,
            paused,
            max_steps: run.total(),
            peak_gpu_gib: run.peak_gpu_gib,
        }
    }

    /// Clears the bar, draws loss.png, prints and returns the summary.
    fn finish(&self, run: Run, log: &RunLog, stopped: bool) -> TrainSummary {
        log.finish();
        let summary = self.summary(&run, stopped, false);
        self.draw_loss(&run);
        if self.is_main() {
            eprintln!("{}", summary.describe(&self.args.output_dir));
        }
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
        if let Some(g) = self.peak_gpu_gib {
            s.push_str(&format!("; peak GPU memory {g:.2} GiB"));
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
