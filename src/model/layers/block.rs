//! A decoder layer: pre-norm attention and pre-norm gated MLP, each added to the residual
//! stream; with Gemma's sandwich norms each sub-layer's output is normed too before the add
//! (`post_attention_layernorm` on the attention output, `pre_feedforward_layernorm` before
//! the MLP, `post_feedforward_layernorm` on its output). Inference forward (with the KV
//! cache), training forward (keeping what backward needs) and backward.

use crate::kernels::sum::sum;
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
    /// Llama: before the MLP; Gemma: on the attention output.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma: before the MLP and on its output.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    pub post_feedforward_layernorm: Option<RmsNorm>,
    pub mlp: Mlp,
}

/// Everything one decoder layer's backward needs — the single list of saved activations.
pub struct LayerActs {
    pub attn_norm: norm::Saved,
    pub attn: attention::Acts,
    /// The MLP's input norm (Llama: post_attention_layernorm; Gemma: pre_feedforward_layernorm).
    pub mlp_norm: norm::Saved,
    pub mlp: mlp::Acts,
    /// Gemma: the norms on the attention and MLP outputs.
    pub attn_out_norm: Option<norm::Saved>,
    pub mlp_out_norm: Option<norm::Saved>,
}

impl Block {
    /// The norms around the attention output and the MLP: `(before the MLP, on the attention
    /// output, on the MLP output)`.
    fn mlp_norms(&self) -> (&RmsNorm, Option<&RmsNorm>, Option<&RmsNorm>) {
        match &self.pre_feedforward_layernorm {
            Some(pre) => (pre, Some(&self.post_attention_layernorm), self.post_feedforward_layernorm.as_ref()),
            None => (&self.post_attention_layernorm, None, None),
        }
    }

    /// Inference: `x` `[b, t, hidden]`, the new tokens of `step`.
    pub fn forward(&self, x: &Tensor, rope: &Rope, step: &Step, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (pre_mlp, attn_out, mlp_out) = self.mlp_norms();
        let a = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, step, cache)?;
        let a = match attn_out {
            Some(n) => n.forward(&a)?,
            None => a,
        };
        let h = (x + a)?;
        let m = self.mlp.forward(&pre_mlp.forward(&h)?)?;
        let m = match mlp_out {
            Some(n) => n.forward(&m)?,
            None => m,
        };
        Ok((&h + m)?)
    }

    /// Training forward of the rows `x` `[b·t, hidden]` of `batch` (RoPE tables at its positions).
    pub fn forward_train(&self, x: &Tensor, batch: &TrainBatch, rope: &RopeAt, train: bool, rng: &mut impl Rng) -> Result<(Tensor, LayerActs)> {
        let (pre_mlp, attn_out, mlp_out) = self.mlp_norms();
        let (h1, attn_norm) = profile::time("rms_norm fwd", || self.input_layernorm.forward_train(x))?;
        let (ao, attn) = self.self_attn.forward_train(&h1, batch, rope, train, rng)?;
        let (ao, attn_out_norm) = out_norm(attn_out, ao)?;
        let x2 = profile::time("heads+residual fwd", || sum(&[x, &ao]))?;
        let (h2, mlp_norm) = profile::time("rms_norm fwd", || pre_mlp.forward_train(&x2))?;
        let (dn, mlp) = self.mlp.forward_train(&h2, train, rng)?;
        let (dn, mlp_out_norm) = out_norm(mlp_out, dn)?;
        let out = profile::time("heads+residual fwd", || sum(&[&x2, &dn]))?;
        Ok((out, LayerActs { attn_norm, attn, mlp_norm, mlp, attn_out_norm, mlp_out_norm }))
    }

    /// The input rows' gradient from the output's `d_out`; the adapters' gradients (layer `li`)
    /// are pushed onto `grads`. Takes the activations, to free the MLP's before attention's
    /// backward runs; `between` runs between the two halves (when the layer's memory is lowest).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, acts: LayerActs, batch: &TrainBatch, rope: &RopeAt, d_out: &Tensor, li: usize, grads: &mut Vec<LoraGrad>, between: impl FnOnce() -> Result<()>) -> Result<Tensor> {
        let (pre_mlp, attn_out, mlp_out) = self.mlp_norms();
        let mut push = |proj, g: Option<(Tensor, Tensor)>| {
            if let Some((da, db)) = g {
                grads.push(LoraGrad { layer: li, proj, da, db });
            }
        };
        // MLP half: out = x2 + [norm](mlp(h2)), h2 = norm(x2).
        let dm = out_norm_backward(mlp_out, acts.mlp_out_norm.as_ref(), d_out)?;
        let LayerActs { attn_norm, attn, mlp_norm, mlp, attn_out_norm, mlp_out_norm: _ } = acts;
        let dh2 = self.mlp.backward(mlp, &dm, &mut push)?;
        let dx2 = profile::time("rms_norm+residual bwd", || pre_mlp.backward_plus(&mlp_norm, &dh2, d_out))?;
        drop((mlp_norm, dh2, dm));
        between()?;
        // Attention half: x2 = x + [norm](attn(h1)), h1 = norm(x).
        let da = out_norm_backward(attn_out, attn_out_norm.as_ref(), &dx2)?;
        let dh1 = self.self_attn.backward(&attn, batch, rope, &da, &mut push)?;
        drop((attn, da));
        profile::time("rms_norm+residual bwd", || self.input_layernorm.backward_plus(&attn_norm, &dh1, &dx2))
    }
}

/// A sub-layer output through its (Gemma) output norm, if any.
fn out_norm(n: Option<&RmsNorm>, y: Tensor) -> Result<(Tensor, Option<norm::Saved>)> {
    match n {
        Some(n) => profile::time("rms_norm fwd", || n.forward_train(&y)).map(|(y, s)| (y, Some(s))),
        None => Ok((y, None)),
    }
}

/// The backward of [`out_norm`].
fn out_norm_backward(n: Option<&RmsNorm>, s: Option<&norm::Saved>, dy: &Tensor) -> Result<Tensor> {
    match (n, s) {
        (Some(n), Some(s)) => profile::time("rms_norm bwd", || n.backward(s, dy)),
        _ => Ok(dy.clone()),
    }
}
