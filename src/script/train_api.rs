//! `TrainingArguments(#{...})`, `SFTTrainer(model, train, args, #{eval_dataset, callbacks})`,
//! `trainer.train()` / `trainer.train(#{resume_from_checkpoint})`, `trainer.evaluate()`, and in
//! the REPL, where Ctrl-C pauses training, `trainer.resume()` and `trainer.set_callbacks(...)`.
//! Callbacks are Rhai closures; one returning "stop" ends training cleanly. The script keeps the model handle; the trainer gets the model itself
//! for the length of `train()`; a callback may read it (evaluate, generate), never change it.

use super::config::{self, Cfg};
use super::data_api::DatasetHandle;
use super::model_api::ModelHandle;
use super::{rt, Api, RhaiResult};
use crate::train::args::{OnNonFinite, Resume, Schedule, Strategy};
use crate::model::Model;
use crate::train::{Callbacks, Control, OnInterrupt, SftTrainer, TrainingArguments};
use rhai::{Dynamic, EvalAltResult, FnPtr, Map, NativeCallContext};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the REPL: Ctrl-C pauses a `train()` instead of checkpointing and stopping the recipe.
static PAUSE_ON_INTERRUPT: AtomicBool = AtomicBool::new(false);

pub fn pause_on_interrupt(on: bool) {
    PAUSE_ON_INTERRUPT.store(on, Ordering::SeqCst);
}

#[derive(Clone)]
pub struct TrainingArgumentsHandle(pub TrainingArguments);

#[derive(Clone)]
pub struct TrainerHandle(pub Rc<RefCell<TrainerInner>>);

pub struct TrainerInner {
    pub trainer: SftTrainer,
    /// The model it trains.
    model: ModelHandle,
    callbacks: Vec<(String, FnPtr)>,
}

/// The trainer, unless a callback of its own `train()` asks for it.
fn inner(t: &TrainerHandle) -> anyhow::Result<std::cell::RefMut<'_, TrainerInner>> {
    t.0.try_borrow_mut().map_err(|_| anyhow::anyhow!("the trainer is training: a training callback cannot call train() or evaluate() on it"))
}

pub fn training_arguments(map: &Map) -> anyhow::Result<TrainingArguments> {
    training_arguments_as(&config::TRAINING_ARGS, map)
}

/// `TrainingArguments(...)` or trl's `SFTConfig(...)`: one map, errors named after the caller.
pub fn training_arguments_as(schema: &'static config::Schema, map: &Map) -> anyhow::Result<TrainingArguments> {
    let cfg: Cfg = schema.check(map).map_err(anyhow::Error::msg)?;
    let out = cfg.str("output_dir").ok_or_else(|| anyhow::anyhow!("TrainingArguments: `output_dir` is required"))?;
    crate::util::permissions::output_dir(Path::new(&out))?;
    let mut a = TrainingArguments::new(out);
    let us = |k: &str| cfg.usize(k).map_err(|e| anyhow::anyhow!("TrainingArguments: {e}"));
    if let Some(v) = cfg.float("num_train_epochs") {
        a.num_train_epochs = v;
    }
    if let Some(v) = cfg.int("max_steps") {
        a.max_steps = if v < 0 { None } else { Some(v as usize) };
    }
    macro_rules! set_usize {
        ($($k:ident),*) => { $( if let Some(v) = us(stringify!($k))? { a.$k = v; } )* };
    }
    set_usize!(per_device_train_batch_size, per_device_eval_batch_size, gradient_accumulation_steps, warmup_steps, logging_steps, save_steps, max_seq_length);
    macro_rules! set_f64 {
        ($($k:ident),*) => { $( if let Some(v) = cfg.float(stringify!($k)) { a.$k = v; } )* };
    }
    set_f64!(learning_rate, warmup_ratio, weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm, ddp_timeout);
    macro_rules! set_bool {
        ($($k:ident),*) => { $( if let Some(v) = cfg.bool(stringify!($k)) { a.$k = v; } )* };
    }
    set_bool!(packing, group_by_length, gradient_checkpointing, train_on_inputs);
    if let Some(kw) = cfg.get("gradient_checkpointing_kwargs").and_then(|v| v.read_lock::<Map>()) {
        // Its keys were checked with the map's (`Ty::MapOf`).
        let kw = config::GRADIENT_CHECKPOINTING_KWARGS.check(&kw).map_err(anyhow::Error::msg)?;
        if let Some(v) = kw.bool("offload") {
            a.offload_checkpoints = v;
        }
    }
    if let Some(s) = cfg.str("lr_scheduler_type") {
        a.lr_scheduler_type = Schedule::parse(&s)?;
    }
    if let Some(s) = cfg.str("eval_strategy") {
        a.eval_strategy = Strategy::parse(&s)?;
    }
    a.eval_steps = us("eval_steps")?;
    if let Some(s) = cfg.str("save_strategy") {
        a.save_strategy = Strategy::parse(&s)?;
    }
    a.save_total_limit = us("save_total_limit")?;
    if let Some(s) = cfg.int("seed") {
        a.seed = s as u64;
    }
    if let Some(v) = cfg.get("resume_from_checkpoint") {
        a.resume_from_checkpoint = resume_value(v, "TrainingArguments")?;
    }
    best_model_keys(&cfg, &mut a)?;
    if let Some(s) = cfg.str("on_nan") {
        a.on_non_finite = if s == "skip" { OnNonFinite::Skip } else { OnNonFinite::Stop };
    }
    config::notebook_names(&cfg, &mut a)?;
    a.validate()?;
    Ok(a)
}

/// `resume_from_checkpoint`: true (the latest checkpoint of output_dir), false, or a path.
fn resume_value(v: &Dynamic, what: &str) -> anyhow::Result<Resume> {
    Ok(match (v.as_bool().ok(), v.clone().into_string().ok()) {
        (Some(true), _) => Resume::Latest,
        (Some(false), _) => Resume::No,
        (_, Some(p)) => {
            crate::util::permissions::read(Path::new(&p))?; // issue 17: a checkpoint outside is denied
            Resume::Path(PathBuf::from(p))
        }
        _ => anyhow::bail!("{what}: `resume_from_checkpoint` must be true, false or a checkpoint path"),
    })
}

/// `overwrite_output_dir`, the best checkpoint and early stopping.
fn best_model_keys(cfg: &Cfg, a: &mut TrainingArguments) -> anyhow::Result<()> {
    if let Some(v) = cfg.bool("overwrite_output_dir") {
        a.overwrite_output_dir = v;
    }
    if let Some(v) = cfg.bool("load_best_model_at_end") {
        a.load_best_model_at_end = v;
    }
    if let Some(m) = cfg.str("metric_for_best_model") {
        a.set_metric_for_best_model(&m);
    }
    a.greater_is_better = cfg.bool("greater_is_better");
    a.early_stopping_patience = cfg.usize("early_stopping_patience").map_err(|e| anyhow::anyhow!("TrainingArguments: {e}"))?;
    if let Some(v) = cfg.float("early_stopping_threshold") {
        a.early_stopping_threshold = v;
    }
    Ok(())
}

/// Forwards trainer events to Rhai closures; keeps a closure's own error to report it with its
/// recipe position.
struct RhaiCallbacks<'a> {
    ctx: &'a NativeCallContext<'a>,
    /// The handle of the model being trained: its readers see the trainer's model while a
    /// callback runs.
    handle: &'a ModelHandle,
    fns: &'a [(String, FnPtr)],
    error: Option<Box<EvalAltResult>>,
}

impl RhaiCallbacks<'_> {
    fn call(&mut self, model: &Model, name: &str, arg: Dynamic) -> anyhow::Result<Control> {
        let Some((_, f)) = self.fns.iter().find(|(n, _)| n == name) else { return Ok(Control::Continue) };
        match self.handle.lend(model, || f.call_within_context::<Dynamic>(self.ctx, (arg,))) {
            Ok(r) => Ok(if r.clone().into_string().is_ok_and(|s| s == "stop") { Control::Stop } else { Control::Continue }),
            Err(e) => {
                let msg = e.to_string();
                self.error = Some(e);
                anyhow::bail!("{name} callback failed: {msg}")
            }
        }
    }
}

fn json_dyn(v: &serde_json::Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

impl Callbacks for RhaiCallbacks<'_> {
    fn on_log(&mut self, model: &Model, m: &serde_json::Value) -> anyhow::Result<Control> {
        self.call(model, "on_log", json_dyn(m))
    }
    fn on_evaluate(&mut self, model: &Model, m: &serde_json::Value) -> anyhow::Result<Control> {
        self.call(model, "on_evaluate", json_dyn(m))
    }
    fn on_save(&mut self, model: &Model, p: &Path) -> anyhow::Result<Control> {
        self.call(model, "on_save", Dynamic::from(p.display().to_string()))
    }
    fn on_step_end(&mut self, model: &Model, s: &serde_json::Value) -> anyhow::Result<Control> {
        self.call(model, "on_step_end", json_dyn(s))
    }
}

const CALLBACKS: &[&str] = &["on_log", "on_evaluate", "on_save", "on_step_end"];

/// `#{ on_log: |m| ..., ... }` → the named closures; unknown names are errors with a hint.
fn callbacks_of(m: Map) -> anyhow::Result<Vec<(String, FnPtr)>> {
    let mut callbacks = Vec::new();
    for (k, v) in m {
        if !CALLBACKS.contains(&k.as_str()) {
            let hint = crate::util::nearest(&k, CALLBACKS.iter().copied()).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
            anyhow::bail!("SFTTrainer callbacks: unknown key `{k}`{hint}");
        }
        let f = v.try_cast::<FnPtr>().ok_or_else(|| anyhow::anyhow!("SFTTrainer callbacks: `{k}` must be a closure like |m| ..."))?;
        callbacks.push((k.to_string(), f));
    }
    Ok(callbacks)
}

fn sft_trainer(ctx: &NativeCallContext, model: &ModelHandle, train: &DatasetHandle, args: &TrainingArgumentsHandle, opts: &Map) -> anyhow::Result<TrainerHandle> {
    let cfg = config::SFT_TRAINER.check(opts).map_err(anyhow::Error::msg)?;
    let eval = match cfg.get("eval_dataset") {
        None => None,
        Some(d) => Some(d.clone().try_cast::<DatasetHandle>().ok_or_else(|| anyhow::anyhow!("SFTTrainer: `eval_dataset` must be a Dataset"))?),
    };
    let callbacks = match cfg.get("callbacks") {
        Some(m) => callbacks_of(m.clone().try_cast::<Map>().ok_or_else(|| anyhow::anyhow!("SFTTrainer: `callbacks` must be a map of closures"))?)?,
        None => Vec::new(),
    };
    // The recipe that builds the trainer is copied into output_dir and hashed into the manifest.
    let recipe = ctx.call_source().map(PathBuf::from).filter(|p| p.is_file()).and_then(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)));
    let trainer = SftTrainer::new(
        &*model.get()?,
        &train.0,
        eval.as_ref().map(|e| e.0.as_ref()),
        args.0.clone(),
        recipe,
        Box::new(|m, dir| {
            let cfg = m.lora_config.as_ref().ok_or_else(|| anyhow::anyhow!("the model has no LoRA config"))?;
            crate::model::adapter::save_adapter(&m.llama, cfg, &m.name_or_path, dir)
        }),
    )?;
    Ok(TrainerHandle(Rc::new(RefCell::new(TrainerInner { trainer, model: model.clone(), callbacks }))))
}

/// How a `train()` call starts: the arguments' resume setting, an explicit one, or the paused run.
enum Start {
    Args,
    Resume(Resume),
    Paused,
}

fn run_training(ctx: &NativeCallContext, t: &mut TrainerHandle, start: Start) -> RhaiResult<Map> {
    let mut inner = rt(inner(t))?;
    let TrainerInner { trainer, model: handle, callbacks } = &mut *inner;
    let mut model = rt(handle.get_mut())?;
    trainer.on_interrupt = if PAUSE_ON_INTERRUPT.load(Ordering::SeqCst) { OnInterrupt::Pause } else { OnInterrupt::Checkpoint };
    let mut cb = RhaiCallbacks { ctx, handle, fns: callbacks, error: None };
    let result = match start {
        Start::Args => trainer.train(&mut model, &mut cb),
        Start::Resume(r) => trainer.train_resuming(&mut model, &mut cb, r),
        Start::Paused => trainer.resume_paused(&mut model, &mut cb),
    };
    // A callback that Ctrl-C stopped is part of the interruption, not an error of its own.
    let interrupted = result.as_ref().map_or(crate::CANCEL.load(Ordering::SeqCst), |s| s.paused);
    if let Some(e) = cb.error.take().filter(|_| !interrupted) {
        return Err(e);
    }
    Ok(summary_map(&rt(result)?))
}

fn summary_map(s: &crate::train::TrainSummary) -> Map {
    let mut m = Map::new();
    m.insert("global_step".into(), Dynamic::from(s.global_step as rhai::INT));
    m.insert("max_steps".into(), Dynamic::from(s.max_steps as rhai::INT));
    m.insert("train_loss".into(), Dynamic::from(s.train_loss));
    m.insert("seconds".into(), Dynamic::from(s.seconds));
    m.insert("tokens".into(), Dynamic::from(s.tokens as rhai::INT));
    m.insert("tokens_per_sec".into(), Dynamic::from(s.tokens_per_sec));
    m.insert("best_eval_loss".into(), s.best_eval_loss.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    m.insert("last_checkpoint".into(), s.last_checkpoint.as_ref().map(|p| Dynamic::from(p.display().to_string())).unwrap_or(Dynamic::UNIT));
    m.insert("stopped_early".into(), Dynamic::from(s.stopped_early));
    m.insert("paused".into(), Dynamic::from(s.paused));
    m.insert("peak_gpu_gib".into(), s.peak_gpu_gib.map(Dynamic::from).unwrap_or(Dynamic::UNIT));
    m
}

fn train_with(ctx: &NativeCallContext, t: &mut TrainerHandle, opts: &Map) -> RhaiResult<Map> {
    let cfg = rt(config::TRAIN.check(opts).map_err(anyhow::Error::msg))?;
    let start = match cfg.get("resume_from_checkpoint") {
        Some(v) => Start::Resume(rt(resume_value(v, "train"))?),
        None => Start::Args,
    };
    run_training(ctx, t, start)
}

pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<TrainingArgumentsHandle>("TrainingArguments");
    api.engine.register_type_with_name::<TrainerHandle>("SFTTrainer");
    api.func("TrainingArguments", "TrainingArguments(#{output_dir, num_train_epochs, max_steps, per_device_train_batch_size, learning_rate, ...}) -> TrainingArguments",
        "transformers' TrainingArguments / trl's SFTConfig: the keys and defaults of those (learning_rate 2e-5, 3 epochs, batch 8, logging_steps 10, save_steps 500, seed 42, max_seq_length 1024).",
        |m: Map| rt(training_arguments(&m).map(TrainingArgumentsHandle)));
    api.func("SFTConfig", "SFTConfig(#{output_dir, max_length, dataset_text_field, ...}) -> TrainingArguments",
        "trl's SFTConfig: the same map as TrainingArguments (max_length is trl's spelling of max_seq_length).",
        |m: Map| rt(training_arguments_as(&config::SFT_CONFIG, &m).map(TrainingArgumentsHandle)));
    api.func("SFTTrainer", "SFTTrainer(model, train_dataset, args) -> SFTTrainer",
        "trl's SFTTrainer: tokenizes the dataset with the model's chat template (assistant-only labels) and trains the LoRA adapters.",
        |ctx: NativeCallContext, m: ModelHandle, d: DatasetHandle, a: TrainingArgumentsHandle| rt(sft_trainer(&ctx, &m, &d, &a, &Map::new())));
    api.func("SFTTrainer", "SFTTrainer(model, train_dataset, args, #{eval_dataset, callbacks: #{on_log, on_evaluate, on_save, on_step_end}}) -> SFTTrainer",
        "SFTTrainer with an eval dataset and Rhai callbacks; a callback returning \"stop\" ends training cleanly. A callback may use the model to read or generate (model.chat in on_evaluate), not to change it.",
        |ctx: NativeCallContext, m: ModelHandle, d: DatasetHandle, a: TrainingArgumentsHandle, o: Map| rt(sft_trainer(&ctx, &m, &d, &a, &o)));
    api.func("train", "trainer.train() -> map",
        "Run training; returns #{global_step, max_steps, train_loss, seconds, tokens, tokens_per_sec, best_eval_loss, last_checkpoint, stopped_early, paused, peak_gpu_gib}. \
         Ctrl-C ends the current step, then in a recipe run writes a checkpoint, loss.png and the metrics and prints the command that resumes \
         (the same command with --resume); in the REPL it pauses (see trainer.resume()). A second Ctrl-C exits at once.",
        |ctx: NativeCallContext, t: &mut TrainerHandle| run_training(&ctx, t, Start::Args));
    api.func("train", "trainer.train(#{ resume_from_checkpoint: true | \"out/checkpoint-N\" }) -> map",
        "As transformers' trainer.train(resume_from_checkpoint=...): true continues from the latest checkpoint in output_dir, a path from that checkpoint \
         (adapters, optimizer state, data position, schedule: bit-identical to an uninterrupted run). Wins over TrainingArguments' key of the same name.",
        |ctx: NativeCallContext, t: &mut TrainerHandle, o: Map| train_with(&ctx, t, &o));
    api.func("resume", "trainer.resume() -> map",
        "Continue a run that Ctrl-C paused in the REPL, exactly where it stopped (optimizer state, data position and schedule were kept in memory): \
         the result is bit-identical to a run that was never paused.",
        |ctx: NativeCallContext, t: &mut TrainerHandle| run_training(&ctx, t, Start::Paused));
    api.func("set_callbacks", "trainer.set_callbacks(#{ on_log, on_evaluate, on_save, on_step_end })",
        "Replace the trainer's callbacks (e.g. while a run is paused in the REPL); #{} removes them.",
        |t: &mut TrainerHandle, m: Map| -> RhaiResult<()> {
            let callbacks = rt(callbacks_of(m))?;
            rt(inner(t))?.callbacks = callbacks;
            Ok(())
        });
    api.func("paused_at", "trainer.paused_at() -> int or ()", "The step where Ctrl-C paused the trainer (the REPL), or () when it is not paused.",
        |t: &mut TrainerHandle| -> RhaiResult<Dynamic> {
            Ok(rt(inner(t))?.trainer.paused_at().map(|(s, _)| Dynamic::from(s as rhai::INT)).unwrap_or(Dynamic::UNIT))
        });
    api.func("evaluate", "trainer.evaluate() -> map", "Eval loss and perplexity on the eval dataset: #{eval_loss, eval_perplexity, eval_tokens}.",
        |t: &mut TrainerHandle| -> RhaiResult<Map> {
            let inner = rt(inner(t))?;
            let m = rt(inner.model.get().and_then(|model| inner.trainer.evaluate(&model)))?;
            let mut out = Map::new();
            out.insert("eval_loss".into(), Dynamic::from(m.loss));
            out.insert("eval_perplexity".into(), Dynamic::from(m.perplexity));
            out.insert("eval_tokens".into(), Dynamic::from(m.tokens as rhai::INT));
            Ok(out)
        });
}
