//! The SFT training loop: batches → engine forward/backward → clipping → AdamW, with the
//! learning-rate schedule, gradient accumulation normalised by the trained tokens of the whole
//! step, logging (`metrics.jsonl`, progress), evaluation, checkpoints with exact resume, and
//! callbacks that can stop training.

use super::args::{OnNonFinite, Resume, Strategy, TrainingArguments};
use super::checkpoint::{self, Manifest, TrainerState};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::lr_at;
use crate::data::{tokenize_for_model, Batch, BatchIterator, BatchOptions, Dataset, TokenizeOptions, TokenizedDataset, Truncation};
use crate::model::engine::{self, LoraGrad, StepOptions, TrainBatch};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Control {
    Continue,
    Stop,
}

/// Hooks into the loop (the script layer forwards them to Rhai closures).
pub trait Callbacks {
    fn on_log(&mut self, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_evaluate(&mut self, _metrics: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_save(&mut self, _checkpoint: &Path) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_step_end(&mut self, _state: &Value) -> Result<Control> {
        Ok(Control::Continue)
    }
}

pub struct NoCallbacks;
impl Callbacks for NoCallbacks {}

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
    pub model: Rc<RefCell<Model>>,
    pub train_data: Arc<TokenizedDataset>,
    pub eval_data: Option<Arc<TokenizedDataset>>,
    pub args: TrainingArguments,
    /// Source of the recipe that built this trainer (copied into output_dir, hashed).
    pub recipe: Option<(PathBuf, String)>,
    /// Writes the peft adapter files of the current model into a directory.
    pub save_adapter: Box<dyn Fn(&Model, &Path) -> Result<()>>,
}

fn tokenize(model: &Model, ds: &Dataset, args: &TrainingArguments, what: &str) -> Result<Arc<TokenizedDataset>> {
    let opts = TokenizeOptions { max_seq_length: Some(args.max_seq_length), train_on_inputs: args.train_on_inputs, truncation: Truncation::Truncate };
    let t = tokenize_for_model(ds, model, &opts).with_context(|| format!("{what} dataset"))?;
    eprintln!("{what}: {}", t.report.summary());
    for lint in &t.report.lints {
        eprintln!("{what}: {lint}");
    }
    if t.is_empty() {
        bail!("{what} dataset: no example left to train on after tokenization");
    }
    Ok(Arc::new(t))
}

/// Sum per-adapter gradients of micro-batches.
fn accumulate(acc: &mut Option<Vec<LoraGrad>>, grads: Vec<LoraGrad>) -> Result<()> {
    match acc {
        None => *acc = Some(grads),
        Some(a) => {
            for (x, y) in a.iter_mut().zip(grads) {
                x.da = (&x.da + &y.da)?;
                x.db = (&x.db + &y.db)?;
            }
        }
    }
    Ok(())
}

fn to_train_batch(b: &Batch, model: &Model) -> Result<TrainBatch> {
    TrainBatch::new(b.batch, b.seq, &b.input_ids, &b.labels, Some(&b.position_ids), Some(&b.segment_ids), &model.llama.device)
}

impl SftTrainer {
    pub fn new(
        model: Rc<RefCell<Model>>,
        train: &Dataset,
        eval: Option<&Dataset>,
        args: TrainingArguments,
        recipe: Option<(PathBuf, String)>,
        save_adapter: Box<dyn Fn(&Model, &Path) -> Result<()>>,
    ) -> Result<Self> {
        args.validate()?;
        let m = model.borrow();
        if m.lora_config.is_none() {
            bail!("SFTTrainer: the model has no LoRA adapters; call get_peft_model(model, LoraConfig(...)) first");
        }
        let train_data = tokenize(&m, train, &args, "train")?;
        let eval_data = match eval {
            Some(e) => Some(tokenize(&m, e, &args, "eval")?),
            None => None,
        };
        if args.eval_strategy != Strategy::No && eval_data.is_none() {
            bail!("TrainingArguments: eval_strategy is set but SFTTrainer got no eval_dataset");
        }
        drop(m);
        Ok(Self { model, train_data, eval_data, args, recipe, save_adapter })
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

    /// Eval loss (mean over trained tokens) and perplexity on the eval dataset.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        let data = self.eval_data.clone().context("evaluate: SFTTrainer has no eval_dataset")?;
        let it = BatchIterator::new(data, self.batch_options(true))?;
        let model = self.model.borrow();
        let (mut sum, mut n) = (0.0, 0usize);
        for b in it.epoch(0) {
            crate::check_cancel()?;
            let out = engine::loss(&model.llama, &to_train_batch(&b, &model)?)?;
            sum += out.loss_sum;
            n += out.n_tokens;
        }
        let loss = if n == 0 { f64::NAN } else { sum / n as f64 };
        Ok(EvalMetrics { loss, perplexity: loss.exp(), tokens: n })
    }

    fn manifest(&self) -> Manifest {
        let m = self.model.borrow();
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
            base_model_config_sha256: checkpoint::sha256_hex(serde_json::to_string(&m.config().raw).unwrap_or_default().as_bytes()),
            base_model: m.name_or_path.clone(),
            seed: self.args.seed,
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
            Resume::Latest => match checkpoint::list(&self.args.output_dir).pop() {
                Some((_, p)) => Some(p),
                None => bail!("resume_from_checkpoint: no checkpoint-* directory in {}", self.args.output_dir.display()),
            },
        })
    }

    pub fn train(&mut self, callbacks: &mut dyn Callbacks) -> Result<TrainSummary> {
        let a = self.args.clone();
        let out_dir = a.output_dir.clone();
        let mut it = BatchIterator::new(self.train_data.clone(), self.batch_options(false))?;
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
        let warmup = a.warmup_for(total);
        let manifest = self.manifest();
        let mut opt = AdamW::new(
            &self.model.borrow().llama,
            AdamWConfig { lr: a.learning_rate, beta1: a.adam_beta1, beta2: a.adam_beta2, eps: a.adam_epsilon, weight_decay: a.weight_decay },
        )?;
        let mut state = TrainerState {
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
        // Resume: restore adapters and optimizer exactly, and the data position.
        if let Some(dir) = self.resume_dir()? {
            let ck = checkpoint::load(&dir)?;
            if ck.params.len() != opt.params.len()
                || ck.params.iter().zip(&opt.params).any(|(x, y)| x.layer != y.layer || x.proj != y.proj || x.is_b != y.is_b || x.shape != y.shape)
            {
                bail!("{}: its adapters do not match the model's (different LoraConfig?)", dir.display());
            }
            if ck.manifest.recipe_sha256 != manifest.recipe_sha256 {
                eprintln!("warning: resuming {} with a changed recipe", dir.display());
            }
            if ck.manifest.dataset_sha256 != manifest.dataset_sha256 {
                eprintln!("warning: resuming {} with a changed dataset", dir.display());
            }
            if ck.manifest.base_model_config_sha256 != manifest.base_model_config_sha256 {
                eprintln!("warning: resuming {} with a different base model", dir.display());
            }
            opt.params = ck.params;
            opt.step = ck.optimizer_step;
            opt.write_back(&mut self.model.borrow_mut().llama)?;
            it.seek(ck.state.position)?;
            state = ck.state;
            state.max_steps = total;
            eprintln!("resumed from {} at step {}", dir.display(), state.global_step);
        }
        std::fs::create_dir_all(&out_dir).with_context(|| format!("{}: cannot create output_dir", out_dir.display()))?;
        if let Some((path, src)) = &self.recipe {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "recipe.rhai".into());
            crate::util::fs::write(&out_dir.join(name), src.as_bytes())?;
        }
        crate::util::fs::write(&out_dir.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        // metrics.jsonl mirrors log_history (rewritten on resume, then appended).
        let metrics_path = out_dir.join("metrics.jsonl");
        let mut lines = String::new();
        for e in &state.log_history {
            lines.push_str(&e.to_string());
            lines.push('\n');
        }
        crate::util::fs::write(&metrics_path, lines.as_bytes())?;
        let mut metrics = std::fs::OpenOptions::new().append(true).open(&metrics_path)?;

        let tty = std::io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new(total as u64);
        if tty {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(state.global_step as u64);
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let say = |s: &str| if tty { bar.println(s) } else { eprintln!("{s}") };
        eprintln!(
            "training: {} examples, {} batches/epoch, {} steps (batch {} × accumulation {}), lr {:e} ({:?}, warmup {warmup})",
            self.train_data.len(),
            bpe,
            total,
            a.per_device_train_batch_size,
            a.gradient_accumulation_steps,
            a.learning_rate,
            a.lr_scheduler_type
        );

        let t0 = Instant::now();
        let start_step = state.global_step;
        let (mut run_tokens, mut loss_acc, mut loss_n, mut run_loss_sum, mut run_steps) = (0u64, 0.0f64, 0usize, 0.0f64, 0usize);
        let mut last_checkpoint = None;
        let mut stopped = false;
        let mut last_saved_step = None;
        let mut last_eval_loss: Option<f64> = None;
        let step_opts = |scale: f64| StepOptions { train: true, gradient_checkpointing: a.gradient_checkpointing, grad_scale: Some(scale) };
        for step in start_step..total {
            crate::check_cancel()?;
            let batches_before = step * a.gradient_accumulation_steps;
            let micro: Vec<Batch> = (0..a.gradient_accumulation_steps).map(|_| it.next_batch()).collect();
            let (loss, norm, step_tokens) = {
                let model = self.model.borrow();
                let tbs: Vec<TrainBatch> = micro.iter().map(|b| to_train_batch(b, &model)).collect::<Result<_>>()?;
                let n_tok: usize = tbs.iter().map(|t| t.n_targets()).sum();
                // Dropout draws from an RNG that is a pure function of (seed, step): resume is exact.
                let mut rng = StdRng::seed_from_u64(a.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut grads = None;
                let mut loss_sum = 0.0;
                for tb in &tbs {
                    let o = engine::forward_backward(&model.llama, tb, &step_opts(1.0 / n_tok.max(1) as f64), &mut rng)?;
                    loss_sum += o.loss_sum;
                    accumulate(&mut grads, o.grads)?;
                }
                drop(model);
                let mut grads = grads.unwrap_or_default();
                let loss = loss_sum / n_tok.max(1) as f64;
                let norm = if a.max_grad_norm > 0.0 { clip_grad_norm(&mut grads, a.max_grad_norm)? } else { super::optim::grad_norm(&grads)? };
                if !loss.is_finite() || !norm.is_finite() {
                    match a.on_non_finite {
                        OnNonFinite::Stop => bail!(
                            "step {}: non-finite {} ({}); training stopped, the last checkpoint{} is intact",
                            step + 1,
                            if loss.is_finite() { "gradient norm" } else { "loss" },
                            if loss.is_finite() { norm } else { loss },
                            last_checkpoint.as_ref().or(checkpoint::list(&out_dir).last().map(|(_, p)| p)).map(|p: &PathBuf| format!(" ({})", p.display())).unwrap_or_default()
                        ),
                        OnNonFinite::Skip => {
                            state.skipped_steps += 1;
                            say(&format!("step {}: non-finite loss or gradient, update skipped", step + 1));
                        }
                    }
                } else if n_tok > 0 {
                    let lr = lr_at(a.lr_scheduler_type, a.learning_rate, step, warmup, total);
                    opt.step(&mut self.model.borrow_mut().llama, &grads, lr)?;
                }
                (loss, norm, micro.iter().map(|b| b.num_tokens() as u64).sum::<u64>())
            };
            state.global_step = step + 1;
            state.position = it.position();
            state.epoch = (batches_before + a.gradient_accumulation_steps) as f64 / bpe as f64;
            state.train_tokens += step_tokens;
            run_tokens += step_tokens;
            if loss.is_finite() {
                loss_acc += loss;
                loss_n += 1;
                run_loss_sum += loss;
                run_steps += 1;
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let tps = run_tokens as f64 / elapsed.max(1e-9);
            bar.set_position(state.global_step as u64);
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", loss, lr_at(a.lr_scheduler_type, a.learning_rate, step, warmup, total), tps));
            let epoch_crossed = (batches_before / bpe) != ((batches_before + a.gradient_accumulation_steps) / bpe);
            let last = state.global_step == total;
            let mut control = Control::Continue;

            if state.global_step % a.logging_steps == 0 || last {
                let entry = json!({
                    "step": state.global_step,
                    "epoch": (state.epoch * 1000.0).round() / 1000.0,
                    "loss": if loss_n > 0 { loss_acc / loss_n as f64 } else { f64::NAN },
                    "learning_rate": lr_at(a.lr_scheduler_type, a.learning_rate, step, warmup, total),
                    "grad_norm": norm,
                    "tokens_per_sec": tps,
                });
                loss_acc = 0.0;
                loss_n = 0;
                writeln!(metrics, "{entry}")?;
                say(&format!(
                    "step {}/{total} | epoch {:.2} | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {:.0} tok/s",
                    state.global_step, state.epoch, entry["loss"].as_f64().unwrap_or(f64::NAN), entry["learning_rate"].as_f64().unwrap_or(0.0), norm, tps
                ));
                state.log_history.push(entry.clone());
                if callbacks.on_log(&entry)? == Control::Stop {
                    control = Control::Stop;
                }
            }
            let eval_now = match a.eval_strategy {
                Strategy::No => false,
                Strategy::Steps => state.global_step % a.eval_steps.unwrap_or(a.logging_steps) == 0 || last,
                Strategy::Epoch => epoch_crossed || last,
            };
            if eval_now {
                let m = self.evaluate()?;
                last_eval_loss = Some(m.loss);
                let entry = json!({"step": state.global_step, "epoch": (state.epoch * 1000.0).round() / 1000.0, "eval_loss": m.loss, "eval_perplexity": m.perplexity, "eval_tokens": m.tokens});
                writeln!(metrics, "{entry}")?;
                say(&format!("step {}/{total} | eval_loss {:.4} | eval_perplexity {:.2}", state.global_step, m.loss, m.perplexity));
                state.log_history.push(entry.clone());
                if state.best_metric.is_none_or(|b| m.loss < b) {
                    state.best_metric = Some(m.loss);
                }
                if callbacks.on_evaluate(&entry)? == Control::Stop {
                    control = Control::Stop;
                }
            }
            let save_now = match a.save_strategy {
                Strategy::No => false,
                Strategy::Steps => state.global_step % a.save_steps == 0 || last,
                Strategy::Epoch => epoch_crossed || last,
            } || (control == Control::Stop && a.save_strategy != Strategy::No);
            if save_now {
                if last_eval_loss.is_some() && state.best_metric == last_eval_loss {
                    state.best_model_checkpoint = Some(out_dir.join(format!("checkpoint-{}", state.global_step)).display().to_string());
                }
                opt.sync_to_host()?;
                let model = self.model.borrow();
                let save_adapter = &self.save_adapter;
                let dir = checkpoint::save(
                    &out_dir,
                    &checkpoint::Checkpoint {
                        state: &state,
                        optimizer: &opt,
                        manifest: &manifest,
                        scheduler: json!({"lr_scheduler_type": format!("{:?}", a.lr_scheduler_type), "base_lr": a.learning_rate, "warmup_steps": warmup, "total_steps": total, "last_step": state.global_step}),
                    },
                    &|d: &Path| save_adapter(&model, d),
                )?;
                drop(model);
                if let Some(limit) = a.save_total_limit {
                    let best = state.best_model_checkpoint.as_ref().map(PathBuf::from);
                    checkpoint::prune(&out_dir, limit.max(1), best.as_deref())?;
                }
                last_saved_step = Some(state.global_step);
                last_checkpoint = Some(dir.clone());
                if callbacks.on_save(&dir)? == Control::Stop {
                    control = Control::Stop;
                }
            }
            let st = json!({"global_step": state.global_step, "max_steps": total, "epoch": state.epoch, "loss": loss, "grad_norm": norm, "tokens": state.train_tokens});
            if callbacks.on_step_end(&st)? == Control::Stop {
                control = Control::Stop;
            }
            if control == Control::Stop {
                say(&format!("training stopped by a callback at step {}", state.global_step));
                stopped = true;
                break;
            }
        }
        bar.finish_and_clear();
        let _ = last_saved_step;
        let seconds = t0.elapsed().as_secs_f64();
        let summary = TrainSummary {
            global_step: state.global_step,
            train_loss: if run_steps > 0 { run_loss_sum / run_steps as f64 } else { f64::NAN },
            seconds,
            tokens: run_tokens,
            tokens_per_sec: run_tokens as f64 / seconds.max(1e-9),
            best_eval_loss: state.best_metric,
            last_checkpoint,
            stopped_early: stopped,
            skipped_steps: state.skipped_steps,
        };
        if let Err(e) = super::plot::loss_png(&out_dir.join("loss.png"), &state.log_history) {
            eprintln!("warning: could not draw loss.png: {e:#}");
        }
        eprintln!("{}", summary.describe(&out_dir));
        Ok(summary)
    }
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
