//! AdamW with PyTorch's semantics (decoupled weight decay applied first, bias correction, eps
//! added outside the square root) over the LoRA adapters, with f32 master copies and moments,
//! and global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).

use crate::model::engine::{LoraGrad, Proj};
use crate::model::llama::Llama;
use rayon::prelude::*;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' TrainingArguments defaults.
    fn default() -> Self {
        Self { lr: 5e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor: where it lives in the model, its f32 master value and moments.
#[derive(Debug, Clone)]
pub struct ParamState {
    pub layer: usize,
    pub proj: Proj,
    /// false = LoRA A, true = LoRA B.
    pub is_b: bool,
    pub shape: (usize, usize),
    pub master: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub params: Vec<ParamState>,
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl AdamW {
    /// Track every adapter of `model` (layer-major, projections in `Proj::ALL` order, A then B).
    pub fn new(model: &Llama, cfg: AdamWConfig) -> Result<Self> {
        let mut params = Vec::new();
        for (layer, block) in model.layers.iter().enumerate() {
            for proj in Proj::ALL {
                let Some(l) = &block.proj(proj).lora else { continue };
                for (is_b, t) in [(false, &l.a), (true, &l.b)] {
                    let master = to_f32(t)?;
                    params.push(ParamState {
                        layer,
                        proj,
                        is_b,
                        shape: t.dims2()?,
                        exp_avg: vec![0.0; master.len()],
                        exp_avg_sq: vec![0.0; master.len()],
                        master,
                    });
                }
            }
        }
        if params.is_empty() {
            bail!("the model has no LoRA adapters to train (call get_peft_model first)");
        }
        Ok(Self { cfg, step: 0, params })
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|p| p.master.len()).sum()
    }

    /// One update with learning rate `lr` from `grads` (one entry per adapter), written back
    /// into the model's adapters in their compute dtype.
    pub fn step(&mut self, model: &mut Llama, grads: &[LoraGrad], lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (b1, b2, eps, bc2_sqrt) = (beta1 as f32, beta2 as f32, eps as f32, bc2_sqrt as f32);
        let decay = (1.0 - lr * weight_decay) as f32;
        // All gradients in one host copy and all updated weights in one upload: on a GPU, one
        // transfer each way instead of two per adapter.
        let mut flat = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = grads
                .iter()
                .find(|g| g.layer == p.layer && g.proj == p.proj)
                .ok_or_else(|| anyhow::anyhow!("no gradient for layer {} {:?}", p.layer, p.proj))?;
            let g = if p.is_b { &g.db } else { &g.da };
            anyhow::ensure!(g.elem_count() == p.master.len(), "gradient size mismatch for layer {} {:?}", p.layer, p.proj);
            flat.push(g.to_dtype(DType::F32)?.flatten_all()?);
        }
        let all = Tensor::cat(&flat, 0)?.to_vec1::<f32>()?;
        let mut offsets = Vec::with_capacity(self.params.len());
        let mut at = 0;
        for p in &self.params {
            offsets.push(at);
            at += p.master.len();
        }
        self.params.par_iter_mut().zip(offsets.par_iter()).for_each(|(p, &off)| {
            let g = &all[off..off + p.master.len()];
            for i in 0..g.len() {
                let w = &mut p.master[i];
                *w *= decay;
                let m = &mut p.exp_avg[i];
                *m += (g[i] - *m) * (1.0 - b1); // torch: exp_avg.lerp_(grad, 1 - beta1)
                let v = &mut p.exp_avg_sq[i];
                *v = *v * b2 + (1.0 - b2) * g[i] * g[i];
                let denom = v.sqrt() / bc2_sqrt + eps;
                *w -= step_size * *m / denom;
            }
        });
        self.write_back(model)?;
        Ok(())
    }
}

impl AdamW {
    /// Write the master weights into the model's adapters (after restoring a checkpoint).
    pub fn write_back(&self, model: &mut Llama) -> Result<()> {
        let Some(first) = self.params.first() else { return Ok(()) };
        let dev = model.layers[first.layer].proj(first.proj).lora.as_ref().map(|l| l.a.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let all: Vec<f32> = self.params.iter().flat_map(|p| p.master.iter().copied()).collect();
        let all = Tensor::from_vec(all, self.num_parameters(), &dev)?;
        let mut at = 0;
        for p in &self.params {
            let lin = model.layers.get_mut(p.layer).ok_or_else(|| anyhow::anyhow!("no layer {}", p.layer))?.proj_mut(p.proj);
            let lora = lin.lora.as_mut().ok_or_else(|| anyhow::anyhow!("layer {} {:?} has no adapter", p.layer, p.proj))?;
            let target = if p.is_b { &mut lora.b } else { &mut lora.a };
            *target = all.narrow(0, at, p.master.len())?.reshape(p.shape)?.to_dtype(target.dtype())?;
            at += p.master.len();
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &[LoraGrad]) -> Result<f64> {
    // Per-tensor sums stay on the device; one scalar comes back.
    let mut sums = Vec::with_capacity(2 * grads.len());
    for g in grads {
        for t in [&g.da, &g.db] {
            sums.push(t.to_dtype(DType::F64)?.sqr()?.sum_all()?);
        }
    }
    if sums.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [LoraGrad], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.da = (&g.da * coef)?;
            g.db = (&g.db * coef)?;
        }
    }
    Ok(norm)
}
