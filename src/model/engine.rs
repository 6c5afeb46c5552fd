//! The training engine: a Llama forward that saves exactly what its hand-derived backward needs,
//! and that backward, per decoder layer. Gradients flow only into LoRA adapters; the base is
//! frozen. With `gradient_checkpointing` only each layer's input (and the dropout RNG state) is
//! kept and the layer is recomputed during backward.

use super::llama::{Block, Linear, Llama};
use super::names::{ModuleId, Proj};
use super::ops::{attention, cross_entropy, linear, rms_norm, rope, swiglu};
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
    /// Additive attention mask `[b, 1, t, t]` (causal, per example, padding isolated).
    pub mask: Tensor,
    /// The segment ids `[b, t]` (u32) it was built from (what the flash kernels take).
    pub segments: Tensor,
    /// `targets[i]` = the label token row `i` predicts (labels shifted left), −100 = ignored.
    pub targets: Vec<i64>,
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
            input_ids: Tensor::from_vec(input_ids.to_vec(), (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            mask: attention::build_mask(&seg, b, t, device)?,
            segments: Tensor::from_vec(seg, (b, t), device)?,
            targets,
        })
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
    /// Multiplier of the summed loss whose gradient is returned; `None` = 1/(trained tokens),
    /// i.e. the mean. The trainer passes 1/(tokens of the whole accumulated step).
    pub grad_scale: Option<f64>,
}

/// Everything one decoder layer's backward needs — the single list of saved activations.
pub struct LayerActs {
    pub attn_norm: rms_norm::Saved,
    pub q: linear::Saved,
    pub k: linear::Saved,
    pub v: linear::Saved,
    pub attn: attention::Saved,
    pub o: linear::Saved,
    pub mlp_norm: rms_norm::Saved,
    pub gate: linear::Saved,
    pub up: linear::Saved,
    pub swiglu: swiglu::Saved,
    pub down: linear::Saved,
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

/// Rope tables gathered for the batch's positions.
struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

fn lin_fwd(l: &Linear, x: &Tensor, train: bool, rng: &mut StdRng) -> Result<(Tensor, linear::Saved)> {
    let w = {
        let _p = crate::profile::scope("dequantize");
        l.dense_weight()?
    };
    let _p = crate::profile::scope("linear+lora fwd");
    linear::forward(x, &w, l.bias.as_ref(), l.lora.as_ref(), train, rng)
}

fn lin_bwd(l: &Linear, s: &linear::Saved, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    // Re-dequantized (or the dense weight again); nothing of W is kept from the forward.
    let w = {
        let _p = crate::profile::scope("dequantize");
        l.dense_weight()?
    };
    let _p = crate::profile::scope("linear+lora bwd");
    linear::backward(s, &w, l.lora.as_ref(), dy)
}

fn layer_forward(layer: &Block, x: &Tensor, batch: &TrainBatch, rope_at: &RopeAt, train: bool, rng: &mut StdRng) -> Result<(Tensor, LayerActs)> {
    let (b, t) = (batch.b, batch.t);
    let a = &layer.self_attn;
    let p = crate::profile::scope("rms_norm fwd");
    let (h1, attn_norm) = rms_norm::forward(x, &layer.input_layernorm.weight, layer.input_layernorm.eps)?;
    drop(p);
    let (q, sq) = lin_fwd(&a.q_proj, &h1, train, rng)?;
    let (k, sk) = lin_fwd(&a.k_proj, &h1, train, rng)?;
    let (v, sv) = lin_fwd(&a.v_proj, &h1, train, rng)?;
    let p = crate::profile::scope("rope fwd");
    let r = Some((&rope_at.cos, &rope_at.sin));
    let q = rope::split_heads(&q, b, t, a.n_heads, a.head_dim, r)?;
    let k = rope::split_heads(&k, b, t, a.n_kv_heads, a.head_dim, r)?;
    let v = rope::split_heads(&v, b, t, a.n_kv_heads, a.head_dim, None)?;
    drop(p);
    let p = crate::profile::scope("attention fwd");
    let (o, attn) = attention::forward_segments(&q, &k, &v, &batch.mask, &batch.segments)?;
    drop(p);
    let p = crate::profile::scope("heads+residual fwd");
    let o = rope::merge_heads(&o, None)?;
    drop(p);
    let (ao, so) = lin_fwd(&a.o_proj, &o, train, rng)?;
    let p = crate::profile::scope("heads+residual fwd");
    let x2 = (x + ao)?;
    drop(p);
    let p = crate::profile::scope("rms_norm fwd");
    let (h2, mlp_norm) = rms_norm::forward(&x2, &layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)?;
    drop(p);
    let (g, sg) = lin_fwd(&layer.mlp.gate_proj, &h2, train, rng)?;
    let (u, su) = lin_fwd(&layer.mlp.up_proj, &h2, train, rng)?;
    let p = crate::profile::scope("swiglu fwd");
    let (hm, ssw) = swiglu::forward(g, u)?;
    drop(p);
    let (dn, sd) = lin_fwd(&layer.mlp.down_proj, &hm, train, rng)?;
    let p = crate::profile::scope("heads+residual fwd");
    let out = (x2 + dn)?;
    drop(p);
    let acts = LayerActs { attn_norm, q: sq, k: sk, v: sv, attn, o: so, mlp_norm, gate: sg, up: su, swiglu: ssw, down: sd };
    Ok((out, acts))
}

fn layer_backward(layer: &Block, acts: &LayerActs, batch: &TrainBatch, rope_at: &RopeAt, d_out: &Tensor, li: usize, grads: &mut Vec<LoraGrad>) -> Result<Tensor> {
    let (b, t) = (batch.b, batch.t);
    let a = &layer.self_attn;
    let mut push = |proj: Proj, g: Option<(Tensor, Tensor)>| {
        if let Some((da, db)) = g {
            grads.push(LoraGrad { layer: li, proj, da, db });
        }
    };
    // MLP half: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2).
    let (dhm, gd) = lin_bwd(&layer.mlp.down_proj, &acts.down, d_out)?;
    push(Proj::Down, gd);
    let p = crate::profile::scope("swiglu bwd");
    let (dg, du) = swiglu::backward(&acts.swiglu, &dhm)?;
    drop(p);
    let (dh2g, gg) = lin_bwd(&layer.mlp.gate_proj, &acts.gate, &dg)?;
    push(Proj::Gate, gg);
    let (dh2u, gu) = lin_bwd(&layer.mlp.up_proj, &acts.up, &du)?;
    push(Proj::Up, gu);
    let p = crate::profile::scope("rms_norm+residual bwd");
    let dx2 = (d_out + rms_norm::backward(&acts.mlp_norm, &layer.post_attention_layernorm.weight, &(dh2g + dh2u)?)?)?;
    drop(p);
    // Attention half: x2 = x + o_proj(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm(x).
    let (do_, go) = lin_bwd(&a.o_proj, &acts.o, &dx2)?;
    push(Proj::O, go);
    let p = crate::profile::scope("heads bwd");
    let do_ = rope::split_heads(&do_, b, t, a.n_heads, a.head_dim, None)?;
    drop(p);
    let p = crate::profile::scope("attention bwd");
    let (dq, dk, dv) = attention::backward(&acts.attn, &do_)?;
    drop(p);
    let p = crate::profile::scope("rope bwd");
    let r = Some((&rope_at.cos, &rope_at.sin));
    let dq = rope::merge_heads(&dq, r)?;
    let dk = rope::merge_heads(&dk, r)?;
    let dv = rope::merge_heads(&dv, None)?;
    drop(p);
    let (dh1q, gq) = lin_bwd(&a.q_proj, &acts.q, &dq)?;
    push(Proj::Q, gq);
    let (dh1k, gk) = lin_bwd(&a.k_proj, &acts.k, &dk)?;
    push(Proj::K, gk);
    let (dh1v, gv) = lin_bwd(&a.v_proj, &acts.v, &dv)?;
    push(Proj::V, gv);
    let _p = crate::profile::scope("rms_norm+residual bwd");
    let dh1 = ((dh1q + dh1k)? + dh1v)?;
    Ok((dx2 + rms_norm::backward(&acts.attn_norm, &layer.input_layernorm.weight, &dh1)?)?)
}

/// What each layer keeps between forward and backward.
enum Kept {
    All(LayerActs),
    /// Gradient checkpointing: the layer input and the RNG as it was, to recompute identically.
    Input(Tensor, StdRng),
}

/// Forward and backward of one batch: the summed loss, the number of trained tokens and the
/// adapters' gradients (of `grad_scale · loss_sum`).
pub fn forward_backward(model: &Llama, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng) -> Result<StepOutput> {
    on_pool(|| forward_impl(model, batch, opts, rng, true))
}

/// Runs `f` on one of rayon's worker threads: the step's serial parts then run where its
/// parallel kernels fork, instead of the caller's thread handing every kernel over to the pool
/// and sleeping (two context switches per kernel, ~9k a second).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

/// Logits `[b, t, vocab]` (f32) of a batch through the training forward — positions and
/// segment masks as in training, so a packed row can be compared with its examples alone.
pub fn logits(model: &Llama, batch: &TrainBatch) -> Result<Tensor> {
    let (cos, sin) = rope::gather(&model.rope.cos, &model.rope.sin, &batch.positions)?;
    let rope_at = RopeAt { cos, sin };
    let mut rng: StdRng = rand::SeedableRng::seed_from_u64(0);
    let mut x = model.embed_tokens.index_select(&batch.input_ids.flatten_all()?, 0)?;
    for layer in &model.layers {
        x = layer_forward(layer, &x, batch, &rope_at, false, &mut rng)?.0;
    }
    let (hn, _) = rms_norm::forward(&x, &model.norm.weight, model.norm.eps)?;
    let head = match &model.lm_head {
        Some(h) => h.dense_weight()?,
        None => model.embed_tokens.clone(),
    };
    Ok(hn.matmul(&head.t()?)?.to_dtype(candle_core::DType::F32)?.reshape((batch.b, batch.t, ()))?)
}

/// Loss only (evaluation): no activations are kept.
pub fn loss(model: &Llama, batch: &TrainBatch) -> Result<StepOutput> {
    let opts = StepOptions { train: false, gradient_checkpointing: false, grad_scale: None };
    let mut rng = rand::SeedableRng::seed_from_u64(0);
    on_pool(|| forward_impl(model, batch, &opts, &mut rng, false))
}

fn forward_impl(model: &Llama, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng, backward: bool) -> Result<StepOutput> {
    let p = crate::profile::scope("embedding+rope tables");
    let (cos, sin) = rope::gather(&model.rope.cos, &model.rope.sin, &batch.positions)?;
    let rope_at = RopeAt { cos, sin };
    let mut x = model.embed_tokens.index_select(&batch.input_ids.flatten_all()?, 0)?; // [n, h]
    drop(p);
    let mut kept = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        crate::check_cancel()?;
        if backward && opts.gradient_checkpointing {
            let state = rng.clone();
            let (y, _) = layer_forward(layer, &x, batch, &rope_at, opts.train, rng)?;
            kept.push(Kept::Input(x, state));
            x = y;
        } else {
            let (y, acts) = layer_forward(layer, &x, batch, &rope_at, opts.train, rng)?;
            if backward {
                kept.push(Kept::All(acts));
            }
            x = y;
        }
    }
    let (hn, final_norm) = rms_norm::forward(&x, &model.norm.weight, model.norm.eps)?;
    let head = match &model.lm_head {
        Some(h) => h.dense_weight()?,
        None => model.embed_tokens.clone(),
    };
    let n_targets = batch.n_targets();
    let grad_scale = if backward { Some(opts.grad_scale.unwrap_or(1.0 / n_targets.max(1) as f64)) } else { None };
    let p = crate::profile::scope("lm_head+cross_entropy");
    let ce = cross_entropy::forward_backward(&hn, &head, &batch.targets, grad_scale, cross_entropy::chunk_rows(hn.device()))?;
    drop(p);
    let mut out = StepOutput { loss_sum: ce.loss_sum, n_tokens: ce.n_tokens, grads: Vec::new() };
    let Some(dh) = ce.dh else { return Ok(out) };
    let mut dx = rms_norm::backward(&final_norm, &model.norm.weight, &dh)?;
    for (li, (layer, k)) in model.layers.iter().zip(kept).enumerate().rev() {
        crate::check_cancel()?;
        let acts = match k {
            Kept::All(a) => a,
            Kept::Input(xin, mut state) => layer_forward(layer, &xin, batch, &rope_at, opts.train, &mut state)?.1,
        };
        dx = layer_backward(layer, &acts, batch, &rope_at, &dx, li, &mut out.grads)?;
    }
    Ok(out)
}
