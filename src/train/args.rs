//! `TrainingArguments`: the keys and defaults of transformers' TrainingArguments and trl's
//! SFTConfig that the trainer honours. The script layer checks the user's map against a strict
//! schema and fills this.

use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            other => bail!("unknown lr_scheduler_type \"{other}\" (linear, cosine, constant, constant_with_warmup)"),
        })
    }
}

/// When to evaluate / save.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    No,
    Steps,
    Epoch,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "no" => Self::No,
            "steps" => Self::Steps,
            "epoch" => Self::Epoch,
            other => bail!("unknown strategy \"{other}\" (no, steps, epoch)"),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    /// The latest `checkpoint-N` in output_dir.
    Latest,
    Path(PathBuf),
}

/// What to do when a loss or gradient is NaN/Inf.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnNonFinite {
    /// Stop with an error naming the step; the last checkpoint stays as it was.
    Stop,
    /// Skip the update and go on (counted and reported).
    Skip,
}

#[derive(Debug, Clone)]
pub struct TrainingArguments {
    pub output_dir: PathBuf,
    pub num_train_epochs: f64,
    /// > 0 overrides num_train_epochs.
    pub max_steps: Option<usize>,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub logging_steps: usize,
    pub eval_strategy: Strategy,
    pub eval_steps: Option<usize>,
    pub save_strategy: Strategy,
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    pub max_seq_length: usize,
    pub packing: bool,
    pub group_by_length: bool,
    pub gradient_checkpointing: bool,
    pub train_on_inputs: bool,
    pub resume_from_checkpoint: Resume,
    pub on_non_finite: OnNonFinite,
    /// Start over in an output_dir that already holds a run (its files are removed first).
    pub overwrite_output_dir: bool,
    /// At the end, load the checkpoint with the best `metric_for_best_model` into the model.
    pub load_best_model_at_end: bool,
    /// `eval_loss` or `eval_perplexity` (`loss` / `perplexity` accepted, as transformers).
    pub metric_for_best_model: String,
    /// `None`: false for both metrics (lower is better).
    pub greater_is_better: Option<bool>,
    /// transformers' EarlyStoppingCallback: stop after this many evaluations without an
    /// improvement larger than `early_stopping_threshold`.
    pub early_stopping_patience: Option<usize>,
    pub early_stopping_threshold: f64,
}

impl TrainingArguments {
    /// Defaults of trl's SFTConfig (which extends transformers' TrainingArguments).
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            num_train_epochs: 3.0,
            max_steps: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-5,
            lr_scheduler_type: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            logging_steps: 10,
            eval_strategy: Strategy::No,
            eval_steps: None,
            save_strategy: Strategy::Steps,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            max_seq_length: 1024,
            packing: false,
            group_by_length: false,
            gradient_checkpointing: false,
            train_on_inputs: false,
            resume_from_checkpoint: Resume::No,
            on_non_finite: OnNonFinite::Stop,
            overwrite_output_dir: false,
            load_best_model_at_end: false,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
        }
    }

    /// `metric_for_best_model` as transformers spells it out: `loss` means `eval_loss`.
    pub fn set_metric_for_best_model(&mut self, name: &str) {
        self.metric_for_best_model = if name.starts_with("eval_") { name.to_string() } else { format!("eval_{name}") };
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| if v == 0 { bail!("TrainingArguments: `{name}` must be at least 1") } else { Ok(()) };
        pos("per_device_train_batch_size", self.per_device_train_batch_size)?;
        pos("per_device_eval_batch_size", self.per_device_eval_batch_size)?;
        pos("gradient_accumulation_steps", self.gradient_accumulation_steps)?;
        pos("logging_steps", self.logging_steps)?;
        pos("save_steps", self.save_steps)?;
        pos("max_seq_length", self.max_seq_length)?;
        if self.max_steps == Some(0) {
            bail!("TrainingArguments: `max_steps` must be positive (or -1 to train for num_train_epochs)");
        }
        if self.max_steps.is_none() && self.num_train_epochs <= 0.0 {
            bail!("TrainingArguments: `num_train_epochs` must be positive");
        }
        if !(self.learning_rate > 0.0) {
            bail!("TrainingArguments: `learning_rate` must be positive");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!("TrainingArguments: `warmup_ratio` must be in [0, 1]");
        }
        if self.output_dir.is_file() {
            bail!("TrainingArguments: output_dir {} is a file", self.output_dir.display());
        }
        self.validate_best_model()
    }

    /// transformers' rules: the best model needs evaluations, and checkpoints saved when they run.
    fn validate_best_model(&self) -> Result<()> {
        if !matches!(self.metric_for_best_model.as_str(), "eval_loss" | "eval_perplexity") {
            bail!("TrainingArguments: `metric_for_best_model` \"{}\" is not a metric qscript computes (eval_loss, eval_perplexity)", self.metric_for_best_model);
        }
        let wants = if self.load_best_model_at_end { Some("load_best_model_at_end") } else { self.early_stopping_patience.map(|_| "early_stopping_patience") };
        if let Some(key) = wants {
            if self.eval_strategy == Strategy::No {
                bail!("TrainingArguments: `{key}` needs evaluations: set eval_strategy (\"steps\" or \"epoch\") and an eval_dataset");
            }
        }
        if self.load_best_model_at_end {
            if self.save_strategy != self.eval_strategy {
                bail!("TrainingArguments: `load_best_model_at_end` needs save_strategy equal to eval_strategy (a checkpoint at every evaluation)");
            }
            let every = self.eval_steps.unwrap_or(self.logging_steps);
            if self.save_strategy == Strategy::Steps && !self.save_steps.is_multiple_of(every) {
                bail!("TrainingArguments: `load_best_model_at_end` needs save_steps ({}) to be a multiple of eval_steps ({every})", self.save_steps);
            }
        }
        if self.early_stopping_patience == Some(0) {
            bail!("TrainingArguments: `early_stopping_patience` must be at least 1");
        }
        Ok(())
    }

    /// Whether a larger `metric_for_best_model` is better (both metrics qscript has: no).
    pub fn greater_is_better(&self) -> bool {
        self.greater_is_better.unwrap_or(false)
    }

    /// `a` is better than `b` by `metric_for_best_model`.
    pub fn better(&self, a: f64, b: f64) -> bool {
        if self.greater_is_better() { a > b } else { a < b }
    }

    /// Warmup steps for `total` optimizer steps (warmup_steps wins over warmup_ratio).
    pub fn warmup_for(&self, total: usize) -> usize {
        if self.warmup_steps > 0 { self.warmup_steps } else { (self.warmup_ratio * total as f64).ceil() as usize }
    }
}
