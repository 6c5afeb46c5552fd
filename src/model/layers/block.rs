//! A decoder layer: pre-norm attention and pre-norm SwiGLU MLP, each added to the residual
//! stream. Inference forward (with the KV cache), training forward (keeping what backward
//! needs) and backward.

use super::attention::{self, Attention, Step};
use super::kv_cache::LayerKv;
use super::mlp::{self, Mlp};
use super::norm::{self, RmsNorm};
use super::rope::{Rope, RopeAt};
use crate::model::engine::{LoraGrad, TrainBatch};
use crate::profile;
use anyhow::Result;
use candle_core::Tensor;
use rand::Rng;

pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Everything one decoder layer's backward needs — the single list of saved activations.
pub struct LayerActs {
    pub attn_norm: norm::Saved,
    pub attn: attention::Acts,
    pub mlp_norm: norm::Saved,
    pub mlp: mlp::Acts,
}

impl Block {
    /// Inference: `x` `[b, t, hidden]`, the new tokens of `step`.
    pub fn forward(&self, x: &Tensor, rope: &Rope, step: &Step, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, step, cache)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }

    /// Training forward of the rows `x` `[b·t, hidden]` of `batch` (RoPE tables at its positions).
    pub fn forward_train(&self, x: &Tensor, batch: &TrainBatch, rope: &RopeAt, train: bool, rng: &mut impl Rng) -> Result<(Tensor, LayerActs)> {
        let (h1, attn_norm) = profile::time("rms_norm fwd", || self.input_layernorm.forward_train(x))?;
        let (ao, attn) = self.self_attn.forward_train(&h1, batch, rope, train, rng)?;
        let x2 = profile::time("heads+residual fwd", || x + ao)?;
        let (h2, mlp_norm) = profile::time("rms_norm fwd", || self.post_attention_layernorm.forward_train(&x2))?;
        let (dn, mlp) = self.mlp.forward_train(&h2, train, rng)?;
        let out = profile::time("heads+residual fwd", || x2 + dn)?;
        Ok((out, LayerActs { attn_norm, attn, mlp_norm, mlp }))
    }

    /// The input rows' gradient from the output's `d_out`; the adapters' gradients (layer `li`)
    /// are pushed onto `grads`.
    pub fn backward(&self, acts: &LayerActs, batch: &TrainBatch, rope: &RopeAt, d_out: &Tensor, li: usize, grads: &mut Vec<LoraGrad>) -> Result<Tensor> {
        let mut push = |proj, g: Option<(Tensor, Tensor)>| {
            if let Some((da, db)) = g {
                grads.push(LoraGrad { layer: li, proj, da, db });
            }
        };
        // MLP half: out = x2 + mlp(h2), h2 = norm(x2).
        let dh2 = self.mlp.backward(&acts.mlp, d_out, &mut push)?;
        let dx2 = profile::time("rms_norm+residual bwd", || Ok::<_, anyhow::Error>((d_out + self.post_attention_layernorm.backward(&acts.mlp_norm, &dh2)?)?))?;
        // Attention half: x2 = x + attn(h1), h1 = norm(x).
        let dh1 = self.self_attn.backward(&acts.attn, batch, rope, &dx2, &mut push)?;
        profile::time("rms_norm+residual bwd", || Ok((dx2 + self.input_layernorm.backward(&acts.attn_norm, &dh1)?)?))
    }
}
