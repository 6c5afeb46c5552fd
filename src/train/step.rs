//! One optimizer step, as the trainer runs it and `qscript bench train` measures it: forward and
//! backward over the step's micro-batches (gradients normalised by the trained tokens of the whole
//! step, dropout drawn from an RNG that is a pure function of (seed, step)), accumulation,
//! clipping, the learning-rate schedule and the AdamW update. Needs no dataset or output_dir.
//! Data-parallel: the trained-token count, the loss sum and the gradients (one flat bucket) are
//! summed over the ranks of [`StepState::comm`], so every rank applies the same update.

use super::args::TrainingArguments;
use super::distributed::{self, Collective};
use super::optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};
use super::schedule::lr_at;
use crate::model::engine::{self, LoraGrad, StepOptions, TrainBatch};
use crate::model::Model;
use anyhow::Result;
use rand::{rngs::StdRng, SeedableRng};
use std::sync::Arc;

/// One micro-batch of a step: the batch on the model's device and its real (non-padding) tokens.
pub struct MicroBatch {
    pub batch: TrainBatch,
    pub tokens: usize,
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// The global step this step completed (1-based).
    pub step: usize,
    /// Mean loss over the step's trained tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The schedule's learning rate for this step.
    pub lr: f64,
    /// Real (non-padding) tokens of the micro-batches.
    pub tokens: u64,
    /// Trained tokens: the normaliser of the loss and of the gradients.
    pub n_targets: usize,
    /// The loss or the gradient norm was not finite, so no update was applied; what happens next
    /// (`on_non_finite`: stop or skip) is the caller's decision.
    pub non_finite: bool,
}

/// The step state: what a step needs besides the model and its batches.
pub struct StepState {
    pub args: TrainingArguments,
    pub opt: AdamW,
    /// Steps done: the 0-based index of the next step (the schedule's and the dropout RNG's input).
    pub step: usize,
    /// The schedule's total steps and warmup.
    pub total: usize,
    pub warmup: usize,
    /// The ranks the step's sums are reduced over ([`distributed::Single`]: none).
    pub comm: Arc<dyn Collective>,
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

impl StepState {
    /// A fresh optimizer over the model's adapters, at step 0 of `total`.
    pub fn new(model: &Model, args: TrainingArguments, total: usize) -> Result<Self> {
        let a = &args;
        let opt = AdamW::new(
            &model.llama,
            AdamWConfig { lr: a.learning_rate, beta1: a.adam_beta1, beta2: a.adam_beta2, eps: a.adam_epsilon, weight_decay: a.weight_decay },
        )?;
        let warmup = args.warmup_for(total);
        Ok(Self { args, opt, step: 0, total, warmup, comm: Arc::new(distributed::Single) })
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        lr_at(self.args.lr_scheduler_type, self.args.learning_rate, step, self.warmup, self.total)
    }

    /// What each micro-batch's forward and backward is asked for: dropout on, the arguments'
    /// checkpointing (and its offload), gradients scaled by 1/`n_targets`.
    pub fn step_options(&self, n_targets: usize) -> StepOptions {
        let a = &self.args;
        StepOptions {
            train: true,
            gradient_checkpointing: a.gradient_checkpointing,
            offload_checkpoints: a.gradient_checkpointing && a.offload_checkpoints,
            grad_scale: Some(1.0 / n_targets.max(1) as f64),
        }
    }

    /// Forward and backward over every micro-batch, gradients scaled by 1/`n_targets`: the summed
    /// loss and the accumulated gradients.
    fn forward_backward(&self, model: &Model, micro_batches: &[MicroBatch], n_targets: usize) -> Result<(f64, Vec<LoraGrad>)> {
        let opts = self.step_options(n_targets);
        // Dropout draws from an RNG that is a pure function of (seed, step): resume is exact.
        let mut seed = self.args.seed ^ (self.step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        if self.comm.world_size() > 1 {
            // Each data-parallel rank its own draws (rank 0's are those of one process).
            seed ^= (self.comm.rank() as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut grads = None;
        let mut loss_sum = 0.0;
        // A rank whose share of a short last batch is empty has nothing to run.
        for mb in micro_batches.iter().filter(|mb| mb.batch.b > 0) {
            let o = engine::forward_backward(&model.llama, &mb.batch, &opts, &mut rng)?;
            loss_sum += o.loss_sum;
            accumulate(&mut grads, o.grads)?;
        }
        Ok((loss_sum, grads.unwrap_or_default()))
    }

    /// One optimizer step over `micro_batches` (the accumulation steps): the update is applied
    /// when loss and gradient norm are finite and some token is trained.
    pub fn train_step(&mut self, model: &mut Model, micro_batches: &[MicroBatch]) -> Result<StepStats> {
        let mut n_targets: usize = micro_batches.iter().map(|mb| mb.batch.n_targets()).sum();
        let mut tokens: u64 = micro_batches.iter().map(|mb| mb.tokens as u64).sum();
        let world = self.comm.world_size() > 1;
        if world {
            // The normaliser is the global step's trained tokens (exact in f64).
            let mut v = [n_targets as f64, tokens as f64];
            self.comm.all_reduce_f64(&mut v)?;
            (n_targets, tokens) = (v[0] as usize, v[1] as u64);
        }
        let (mut loss_sum, mut grads) = self.forward_backward(model, micro_batches, n_targets)?;
        if world {
            let mut l = [loss_sum];
            self.comm.all_reduce_f64(&mut l)?;
            loss_sum = l[0];
            let _p = crate::profile::scope("all_reduce");
            grads = distributed::all_reduce_grads(&*self.comm, &model.llama, grads)?;
        }
        let loss = loss_sum / n_targets.max(1) as f64;
        let max_norm = self.args.max_grad_norm;
        let norm = if max_norm > 0.0 { clip_grad_norm(&mut grads, max_norm)? } else { grad_norm(&grads)? };
        let non_finite = !loss.is_finite() || !norm.is_finite();
        let lr = self.lr(self.step);
        if !non_finite && n_targets > 0 {
            let _p = crate::profile::scope("adamw");
            self.opt.step(&mut model.llama, &grads, lr)?;
        }
        self.step += 1;
        Ok(StepStats { step: self.step, loss, grad_norm: norm, lr, tokens, n_targets, non_finite })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{self, LoraConfig, TargetModules};
    use crate::model::LoadOptions;
    use crate::train::args::Schedule;

    fn tiny_peft() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
        let mut m = Model::load_hf_dir("tiny", &dir, &LoadOptions::default()).unwrap();
        let cfg = LoraConfig { r: 2, lora_alpha: 4.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        m
    }

    /// 2 rows × 8 tokens, every token trained.
    fn micro_batch(m: &Model, salt: u32) -> MicroBatch {
        let vocab = m.config().vocab_size as u32;
        let ids: Vec<u32> = (0..16u32).map(|i| (i * 7919 + salt * 13) % vocab).collect();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        MicroBatch { batch: TrainBatch::new(2, 8, &ids, &labels, None, None, &m.llama.device).unwrap(), tokens: ids.len() }
    }

    fn master_bits(s: &StepState) -> Vec<Vec<u32>> {
        s.opt.params.iter().map(|p| p.master.iter().map(|x| x.to_bits()).collect()).collect()
    }

    #[test]
    fn a_step_needs_no_dataset_or_output_dir_and_never_applies_a_non_finite_update() {
        let mut m = tiny_peft();
        let out = std::env::temp_dir().join("qscript-step-test-never-written");
        let mut args = TrainingArguments::new(&out);
        // So large that the first update makes the adapters (hence the next loss) infinite.
        args.learning_rate = 1e38;
        args.lr_scheduler_type = Schedule::Constant;
        args.max_grad_norm = 0.0;
        let mut st = StepState::new(&m, args, 3).unwrap();
        let micro = [micro_batch(&m, 1), micro_batch(&m, 2)];
        let s1 = st.train_step(&mut m, &micro).unwrap();
        assert_eq!((s1.step, st.step, st.opt.step), (1, 1, 1));
        assert_eq!((s1.tokens, s1.n_targets, s1.lr), (32, 2 * 2 * 7, 1e38));
        assert!(!s1.non_finite && s1.loss.is_finite() && s1.grad_norm > 0.0);
        let before = master_bits(&st);
        let s2 = st.train_step(&mut m, &micro).unwrap();
        assert!(s2.non_finite, "{s2:?}");
        assert_eq!((s2.step, st.step, st.opt.step), (2, 2, 1), "the step counts, the update is not applied");
        assert!(master_bits(&st) == before);
        assert!(!out.exists());
    }
}
