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

/// `optim`: transformers' optimizer names. Every one runs our AdamW (32-bit state); the
/// bitsandbytes names are accepted so a ported notebook runs, and say so once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optim {
    AdamwTorch,
    AdamwTorchFused,
    /// bitsandbytes' 8-bit AdamW (`adamw_8bit`, `adamw_bnb_8bit`, `paged_adamw_8bit`).
    Adamw8bit { paged: bool },
    PagedAdamw32bit,
}

impl Optim {
    pub const NAMES: &'static [&'static str] =
        &["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "adamw_torch" => Self::AdamwTorch,
            "adamw_torch_fused" => Self::AdamwTorchFused,
            "adamw_8bit" | "adamw_bnb_8bit" => Self::Adamw8bit { paged: false },
            "paged_adamw_8bit" => Self::Adamw8bit { paged: true },
            "paged_adamw_32bit" => Self::PagedAdamw32bit,
            other => bail!("TrainingArguments: unknown optim \"{other}\" (one of {})", Self::NAMES.join(", ")),
        })
    }

    /// One line for the bitsandbytes names: what runs instead, and what 8-bit state would have
    /// saved on tensors of these sizes (bitsandbytes keeps tensors under 4096 elements in 32
    /// bits; 8-bit state is 1 byte per element and moment plus an f32 absmax per 256 block).
    pub fn note(self, trainable: &[usize]) -> Option<String> {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        match self {
            Self::AdamwTorch | Self::AdamwTorchFused => None,
            Self::PagedAdamw32bit => Some("optim \"paged_adamw_32bit\": runs AdamW with the same 32-bit state (paging only moves it under memory pressure)".into()),
            Self::Adamw8bit { paged } => {
                let saved: usize = trainable.iter().filter(|&&n| n >= 4096).map(|&n| 2 * (4 * n) - 2 * (n + 4 * n.div_ceil(256))).sum();
                let state: usize = trainable.iter().map(|&n| 8 * n).sum();
                let name = if paged { "paged_adamw_8bit" } else { "adamw_8bit" };
                Some(format!(
                    "optim \"{name}\": runs AdamW with 32-bit state ({:.1} MiB for these adapters); 8-bit state would have saved {:.1} MiB",
                    mib(state),
                    mib(saved)
                ))
            }
        }
    }
}

/// `report_to`: where metrics go besides the console. `metrics.jsonl` is always written (it is
/// the run's record, as transformers' trainer_state.json).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReportTo {
    pub tensorboard: bool,
}

impl ReportTo {
    pub fn parse(names: &[String]) -> Result<Self> {
        let mut r = Self::default();
        for n in names {
            match n.as_str() {
                "none" | "jsonl" => {}
                "tensorboard" | "all" => r.tensorboard = true,
                other => bail!("TrainingArguments: unknown report_to \"{other}\" (none, jsonl, tensorboard, all)"),
            }
        }
        Ok(r)
    }
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
    /// With gradient checkpointing on a GPU, the kept layer inputs wait in pinned host memory
    /// (Unsloth's `use_gradient_checkpointing="unsloth"`); `gradient_checkpointing_kwargs:
    /// #{offload: false}` keeps them on the GPU. Default true.
    pub offload_checkpoints: bool,
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
    /// trl: the field a text record's text is read from (rows carrying it train on it).
    pub dataset_text_field: String,
    pub bf16: bool,
    pub fp16: bool,
    pub optim: Optim,
    pub report_to: ReportTo,
    /// TensorBoard's folder; None: `output_dir/runs/DATE_HOST`.
    pub logging_dir: Option<PathBuf>,
    /// Checkpoints without optimizer state (cannot be resumed).
    pub save_only_model: bool,
    /// Seconds a data-parallel rank waits for the others in a reduction (torch's default 1800).
    pub ddp_timeout: f64,
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
            offload_checkpoints: true,
            train_on_inputs: false,
            resume_from_checkpoint: Resume::No,
            on_non_finite: OnNonFinite::Stop,
            overwrite_output_dir: false,
            load_best_model_at_end: false,
            metric_for_best_model: "eval_loss".into(),
            greater_is_better: None,
            early_stopping_patience: None,
            early_stopping_threshold: 0.0,
            dataset_text_field: "text".into(),
            bf16: false,
            fp16: false,
            optim: Optim::AdamwTorch,
            report_to: ReportTo::default(),
            logging_dir: None,
            save_only_model: false,
            ddp_timeout: 1800.0,
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
        if !(self.ddp_timeout > 0.0 && self.ddp_timeout < 1e9) {
            bail!("TrainingArguments: `ddp_timeout` must be a positive number of seconds");
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

    /// The mixed-precision flags against the dtype the model computes in and its device:
    /// `fp16` needs a GPU (transformers refuses it on the CPU too); training computes in the
    /// model's dtype (load_model's `dtype`), so the flags only say when that is not what they ask.
    /// Returns the notes to print.
    pub fn check_precision(&self, compute: candle_core::DType, on_gpu: bool) -> Result<Vec<String>> {
        use candle_core::DType;
        let mut notes = Vec::new();
        if self.bf16 && self.fp16 {
            bail!("TrainingArguments: `bf16` and `fp16` are both true; pick one");
        }
        if self.fp16 {
            if !on_gpu {
                bail!(
                    "TrainingArguments: `fp16: true` needs a GPU: float16 mixed precision is a CUDA feature (transformers refuses it on the CPU too); \
                     drop it (the CPU trains in float32) or use `bf16: true` with a bf16 model"
                );
            }
            notes.push(format!(
                "fp16: true: training computes in the model's {} (bf16 on a GPU needs no loss scaling; float16 is not used)",
                crate::model::dtype_name(compute)
            ));
        }
        if self.bf16 && compute != DType::BF16 {
            notes.push(format!(
                "bf16: true: the model computes in {}, and training follows it; load it with dtype: \"bf16\" (4-bit: bnb_4bit_compute_dtype: \"bf16\") to train in bf16",
                crate::model::dtype_name(compute)
            ));
        }
        Ok(notes)
    }

    /// The lines a run prints about the notebook flags for this model (precision, optimizer);
    /// an error where a flag cannot hold (fp16 on the CPU).
    pub fn notes_for(&self, model: &crate::model::Model) -> Result<Vec<String>> {
        let l = &model.llama;
        let mut notes = self.check_precision(l.dtype, l.device.is_cuda())?;
        let sizes: Vec<usize> = l.adapters().flat_map(|(_, a)| [a.a.elem_count(), a.b.elem_count()]).collect();
        notes.extend(self.optim.note(&sizes));
        Ok(notes)
    }

    /// TensorBoard's folder: `logging_dir`, or transformers' default `output_dir/runs/DATE_HOST`.
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.logging_dir.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
            self.output_dir.join("runs").join(format!("{}_{host}", chrono::Local::now().format("%b%d_%H-%M-%S")))
        })
    }

    /// Warmup steps for `total` optimizer steps (warmup_steps wins over warmup_ratio).
    pub fn warmup_for(&self, total: usize) -> usize {
        if self.warmup_steps > 0 { self.warmup_steps } else { (self.warmup_ratio * total as f64).ceil() as usize }
    }
}
