//! The training step's interface: the batch ([`TrainBatch`]), its options, its outputs (the
//! loss and the adapters' gradients) and the projection ids gradients are named by. The step
//! itself is the model's training forward and backward (`Llama::forward_backward` in
//! `model/llama.rs`, over each layer's in `model/layers/`).

use super::layers::attention;
use super::llama::Llama;
use super::names::{ModuleId, Proj};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

/// One training batch, already on the model's device.
pub struct TrainBatch {
    pub b: usize,
    pub t: usize,
    pub input_ids: Tensor,
    /// Per-token positions `[b, t]` (restart at 0 for each packed example).
    pub positions: Tensor,
    /// The segment ids `[b, t]` (u32): what the flash kernels take, and what the additive masks
    /// of the other attention paths are built from.
    pub segments: Tensor,
    /// The largest token id and position (checked against the model before any gather).
    pub max_id: u32,
    pub max_position: u32,
    /// `targets[i]` = the label token row `i` predicts (labels shifted left), −100 = ignored.
    pub targets: Vec<i64>,
    /// The segment ids on the host, and the additive masks `[b, 1, t, t]` made from them on
    /// first use (causal, per example, padding isolated; the sliding layers' with its window).
    /// Lazy: the flash kernels never need them, and a dense `t × t` mask built on the host and
    /// uploaded per batch cost the trainer ~10 % of a 3B step.
    seg_host: Vec<u32>,
    mask: std::sync::OnceLock<Tensor>,
    windowed: std::sync::OnceLock<(usize, Tensor)>,
}

impl TrainBatch {
    /// From HF-style `labels` aligned with `input_ids` (−100 = not trained): the shift happens
    /// here, and never across a packed example boundary or a row end. Without `position_ids` /
    /// `segment_ids` every row is one example (padding marked by `labels`/`attention_mask` is the
    /// caller's job through segment 0).
    pub fn new(
        b: usize,
        t: usize,
        input_ids: &[u32],
        labels: &[i64],
        position_ids: Option<&[u32]>,
        segment_ids: Option<&[u32]>,
        device: &Device,
    ) -> Result<Self> {
        let n = b * t;
        anyhow::ensure!(input_ids.len() == n && labels.len() == n, "batch: {} ids / {} labels for {b}×{t}", input_ids.len(), labels.len());
        let seg: Vec<u32> = match segment_ids {
            Some(s) => {
                anyhow::ensure!(s.len() == n, "batch: {} segment ids for {b}×{t}", s.len());
                s.to_vec()
            }
            None => vec![1; n],
        };
        let pos: Vec<u32> = match position_ids {
            Some(p) => {
                anyhow::ensure!(p.len() == n, "batch: {} position ids for {b}×{t}", p.len());
                p.to_vec()
            }
            None => (0..n).map(|i| (i % t) as u32).collect(),
        };
        let mut targets = vec![-100i64; n];
        for r in 0..b {
            for i in 0..t.saturating_sub(1) {
                let (a, c) = (r * t + i, r * t + i + 1);
                if seg[a] != 0 && seg[a] == seg[c] {
                    targets[a] = labels[c];
                }
            }
        }
        Ok(Self {
            b,
            t,
            max_id: input_ids.iter().copied().max().unwrap_or(0),
            max_position: pos.iter().copied().max().unwrap_or(0),
            input_ids: Tensor::from_vec(input_ids.to_vec(), (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            segments: Tensor::from_vec(seg.clone(), (b, t), device)?,
            targets,
            seg_host: seg,
            mask: std::sync::OnceLock::new(),
            windowed: std::sync::OnceLock::new(),
        })
    }

    /// The additive mask of a layer with this sliding `window` (`None`: full causal), built on
    /// first use.
    pub fn mask_for(&self, window: Option<usize>) -> Result<&Tensor> {
        let dev = self.segments.device();
        let Some(w) = window else {
            if self.mask.get().is_none() {
                let _ = self.mask.set(attention::build_mask(&self.seg_host, self.b, self.t, dev)?);
            }
            return Ok(self.mask.get().expect("set above"));
        };
        if self.windowed.get().is_none() {
            let m = attention::build_window_mask(&self.seg_host, self.b, self.t, Some(w), dev)?;
            let _ = self.windowed.set((w, m));
        }
        let (w0, m) = self.windowed.get().expect("set above");
        anyhow::ensure!(*w0 == w, "one sliding window per model ({w0} and {w})");
        Ok(m)
    }

    pub fn n_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

#[derive(Debug, Clone)]
pub struct StepOptions {
    /// Apply LoRA dropout (training) or not (evaluation).
    pub train: bool,
    pub gradient_checkpointing: bool,
    /// With gradient checkpointing, keep each layer's input in pinned host memory until its
    /// recompute (a no-op off the GPU): `kernels::offload`.
    pub offload_checkpoints: bool,
    /// Multiplier of the summed loss whose gradient is returned; `None` = 1/(trained tokens),
    /// i.e. the mean. The trainer passes 1/(tokens of the whole accumulated step).
    pub grad_scale: Option<f64>,
}

/// Gradients of one adapter: in the adapter's dtype, or f32 where the CUDA kernels summed them.
pub struct LoraGrad {
    pub layer: usize,
    pub proj: Proj,
    pub da: Tensor,
    pub db: Tensor,
}

impl LoraGrad {
    /// The adapter these are the gradients of.
    pub fn id(&self) -> ModuleId {
        ModuleId { layer: self.layer, proj: self.proj }
    }
}

pub struct StepOutput {
    pub loss_sum: f64,
    pub n_tokens: usize,
    /// Gradients of `grad_scale · loss_sum` for every adapter (empty when not training).
    pub grads: Vec<LoraGrad>,
}

impl StepOutput {
    pub fn mean_loss(&self) -> f64 {
        if self.n_tokens == 0 { 0.0 } else { self.loss_sum / self.n_tokens as f64 }
    }
}

/// Forward and backward of one batch (`Llama::forward_backward`).
pub fn forward_backward(model: &Llama, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng) -> Result<StepOutput> {
    model.forward_backward(batch, opts, rng)
}

/// Loss only, for evaluation (`Llama::loss`).
pub fn loss(model: &Llama, batch: &TrainBatch) -> Result<StepOutput> {
    model.loss(batch)
}

/// Logits of a batch through the training forward (`Llama::train_logits`).
pub fn logits(model: &Llama, batch: &TrainBatch) -> Result<Tensor> {
    model.train_logits(batch)
}
