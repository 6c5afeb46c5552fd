//! The Llama-family decoder as a stack of the layers in `model/layers/` (embedding, decoder
//! blocks of RMSNorm, RoPE, grouped-query causal attention and SwiGLU MLP, final norm, LM head
//! tied or not): loading, the inference forward with a KV cache, and the training forward and
//! backward (loss, the adapters' gradients; with gradient checkpointing each layer is recomputed
//! during backward from its input). Gradients flow only into LoRA adapters; the base is frozen.

use super::config::Config;
use super::engine::{LoraGrad, StepOptions, StepOutput, TrainBatch};
use super::layers::attention::Step;
use super::layers::rope::RopeAt;
use super::layers::{embedding, lm_head};
use super::names::{self, ModuleId, Norm, NormId, Proj};
use super::weights::WeightFiles;
use crate::profile;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

pub use super::layers::attention::Attention;
pub use super::layers::block::Block;
pub use super::layers::kv_cache::{KvBuf, KvCache, LayerKv};
pub use super::layers::linear::{Linear, Weight};
pub use super::layers::mlp::Mlp;
pub use super::layers::norm::RmsNorm;
pub use super::layers::rope::Rope;

/// Positions the RoPE tables cover at most (sequences are limited to this many tokens).
pub const ROPE_TABLE_MAX: usize = 1 << 17;

mod decode_cuda;

pub struct Llama {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
    /// How the 4-bit decoder linears were quantized (`None`: a dense model).
    pub quantization: Option<super::bnb_config::BnbConfig>,
}

/// Where the tensors of a model come from (an HF checkpoint or an in-memory map).
pub trait TensorSource {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
    fn has(&self, name: &str) -> bool;
    /// The tensor as stored (dtype and shape unchanged, on the CPU); `None` when absent.
    fn stored(&self, name: &str) -> Result<Option<Tensor>>;
    /// Where `name` lives, for error messages (a file path).
    fn location(&self, _name: &str) -> Option<String> {
        None
    }
}

impl TensorSource for WeightFiles {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.load(name, Some(shape), dtype, device)
    }
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn stored(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.contains(name) {
            return Ok(None);
        }
        Ok(Some(self.load_stored(name)?))
    }
    fn location(&self, name: &str) -> Option<String> {
        self.file_of(name).map(|p| p.display().to_string())
    }
}

impl TensorSource for std::collections::HashMap<String, Tensor> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.get(name).with_context(|| format!("missing tensor `{name}`"))?;
        anyhow::ensure!(t.dims() == shape, "tensor `{name}` has shape {:?}, expected {:?}", t.dims(), shape);
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }
    fn stored(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.get(name).cloned())
    }
}

/// A 4-bit weight saved by bitsandbytes under `name` (`...q_proj.weight`), if the checkpoint
/// has one (its `quant_state` tensor marks it); shape checked against `[out, inp]`.
fn load_bnb_weight(src: &dyn TensorSource, name: &str, out: usize, inp: usize) -> Result<Option<crate::quant::Quantized4bit>> {
    if !["nf4", "fp4"].iter().any(|q| src.has(&names::bnb_quant_state_key(name, q))) {
        return Ok(None);
    }
    // `from_bnb_tensors` asks by name; keep the first read error to report it as such.
    let err = std::cell::RefCell::new(None);
    let got = crate::quant::Quantized4bit::from_bnb_tensors(name, |n| match src.stored(n) {
        Ok(t) => t,
        Err(e) => {
            err.borrow_mut().get_or_insert(e);
            None
        }
    });
    let at = src.location(name).map(|l| format!("{l}: ")).unwrap_or_default();
    if let Some(e) = err.into_inner() {
        return Err(e);
    }
    let q = got.map_err(|e| anyhow::anyhow!("{at}{e:#}"))?;
    if q.state.shape != [out, inp] {
        anyhow::bail!("{at}{name}: 4-bit weight has shape {:?} in its quant_state, expected {:?}", q.state.shape, [out, inp]);
    }
    Ok(Some(q))
}

impl Llama {
    /// Build from HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load(config: &Config, src: &dyn TensorSource, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(config, src, dtype, device, None)
    }

    /// [`Self::load`], with the decoder linears in 4 bits: those saved by bitsandbytes load as
    /// they are; with `quant`, the others (less `llm_int8_skip_modules`) are quantized as they
    /// load, one tensor at a time, so the dense copy of only one weight exists at once.
    /// Embeddings, norms and the LM head stay dense in `dtype`, as in transformers.
    pub fn load_with(config: &Config, src: &dyn TensorSource, dtype: DType, device: &Device, quant: Option<&super::bnb_config::BnbConfig>) -> Result<Self> {
        let c = config;
        let (hd, h, kvh, d, inter) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size);
        let mut any_4bit = false;
        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = names::weight_key(name);
            let bias = if bias { Some(src.tensor(&names::bias_key(name), &[out], dtype, device)?) } else { None };
            let compute = quant.map_or(dtype, |q| q.compute_dtype);
            if let Some(q) = load_bnb_weight(src, &w, out, inp)? {
                any_4bit = true;
                return Linear::new_4bit(q, compute, dtype, device, bias);
            }
            if let Some(cfg) = quant.filter(|q| name != names::LM_HEAD && q.quantizes(name)) {
                let at = src.location(&w).map(|l| format!("{l}: ")).unwrap_or_default();
                // Rounded to `dtype` first, as transformers quantizes the weight it loaded.
                let dense = match src.stored(&w)? {
                    Some(t) if !t.dtype().is_float() => anyhow::bail!("{at}tensor `{w}` is {:?}, not a floating tensor: cannot quantize it", t.dtype()),
                    Some(t) if t.dims() != [out, inp] => anyhow::bail!("{at}tensor `{w}` has shape {:?}, expected {:?}", t.dims(), [out, inp]),
                    Some(t) => t.to_dtype(dtype)?,
                    None => src.tensor(&w, &[out, inp], dtype, &Device::Cpu)?, // reports it missing
                };
                let q = crate::quant::quantize_4bit_tensor(&dense, cfg.quant_type, cfg.blocksize, cfg.double_quant)
                    .with_context(|| format!("{w}: cannot quantize"))?;
                any_4bit = true;
                return Linear::new_4bit(q, compute, dtype, device, bias);
            }
            Ok(Linear::new(src.tensor(&w, &[out, inp], dtype, device)?, bias))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: src.tensor(&names::weight_key(name), &[hd], dtype, device)?, eps: c.rms_norm_eps })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            crate::check_limits()?;
            // This layer's module paths, by projection and by norm.
            let (p, n) = (|proj| ModuleId { layer: i, proj }.path(), |norm| NormId { layer: i, norm }.path());
            layers.push(Block {
                input_layernorm: norm(&n(Norm::Input))?,
                self_attn: Attention {
                    q_proj: linear(&p(Proj::Q), h * d, hd, c.attention_bias)?,
                    k_proj: linear(&p(Proj::K), kvh * d, hd, c.attention_bias)?,
                    v_proj: linear(&p(Proj::V), kvh * d, hd, c.attention_bias)?,
                    o_proj: linear(&p(Proj::O), hd, h * d, c.attention_bias)?,
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: d,
                },
                post_attention_layernorm: norm(&n(Norm::PostAttention))?,
                mlp: Mlp {
                    gate_proj: linear(&p(Proj::Gate), inter, hd, c.mlp_bias)?,
                    up_proj: linear(&p(Proj::Up), inter, hd, c.mlp_bias)?,
                    down_proj: linear(&p(Proj::Down), hd, inter, c.mlp_bias)?,
                },
            });
        }
        let embed_tokens = src.tensor(&names::weight_key(names::EMBED_TOKENS), &[c.vocab_size, hd], dtype, device)?;
        // Some checkpoints mark tied embeddings only by omitting lm_head.
        let lm_head = if c.tie_word_embeddings || !src.has(&names::weight_key(names::LM_HEAD)) {
            None
        } else {
            Some(linear(names::LM_HEAD, c.vocab_size, hd, false)?)
        };
        let quantization = match (any_4bit, quant) {
            (false, _) => None,
            (true, Some(q)) => Some(q.clone()),
            // 4-bit tensors without a quantization_config: describe what was found.
            (true, None) => names::Family::of(c).linears(&layers)
                .find_map(|(_, l)| l.quantized())
                .map(|q| super::bnb_config::BnbConfig {
                    quant_type: q.state.quant_type,
                    double_quant: matches!(q.state.absmax, crate::quant::Absmax::Double { .. }),
                    compute_dtype: dtype,
                    ..Default::default()
                }),
        };
        Ok(Self {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: norm(names::FINAL_NORM)?,
            lm_head,
            // The cos/sin tables are built eagerly: at most ROPE_TABLE_MAX positions, not the
            // config's 16M, which would cost gigabytes before a token is read.
            rope: Rope::new(c, c.max_position_embeddings.clamp(1, ROPE_TABLE_MAX), dtype, device)?,
            dtype,
            device: device.clone(),
            quantization,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Logits (f32) for `ids` `[b, t]` at positions `cache.len()..`; with `last_only` only the
    /// last position's logits `[b, 1, vocab]` are computed (generation), else `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, last_only: bool) -> Result<Tensor> {
        if self.device.is_cpu() && rayon::current_num_threads() > 1 {
            // The many short parallel kernels of a forward (GEMVs while decoding) are joined by
            // a worker instead of each waking a blocked caller.
            return on_pool(|| self.forward_inner(ids, cache, last_only));
        }
        self.forward_inner(ids, cache, last_only)
    }

    fn forward_inner(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, last_only: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = cache.as_ref().map_or(0, |c| c.len());
        let max_pos = self.rope.max_positions()?;
        anyhow::ensure!(pos + t <= max_pos, "sequence of {} tokens exceeds max_position_embeddings ({max_pos})", pos + t);
        if let Some(c) = cache.as_deref_mut() {
            if let Some(logits) = decode_cuda::forward(self, ids, c)? {
                return Ok(logits);
            }
        }
        let step = Step::new(&self.rope, b, t, pos, &self.device)?;
        let mut x = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &self.rope, &step, slot)?;
        }
        let x = if last_only && t > 1 { x.narrow(1, t - 1, 1)? } else { x };
        self.logits(&x)
    }

    /// The embeddings of `ids` `[b, t]`: `[b, t, hidden]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        embedding::lookup(&self.embed_tokens, ids)
    }

    /// Final norm and LM head: f32 logits for the hidden states `x` `[..., hidden]`.
    pub(crate) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        match &self.lm_head {
            Some(head) => lm_head::logits(head, &x),
            None => lm_head::logits(&Linear::new(self.embed_tokens.clone(), None), &x),
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.config.num_parameters()
    }

    /// Forward and backward of one batch: the summed loss, the number of trained tokens and the
    /// adapters' gradients (of `grad_scale · loss_sum`).
    pub fn forward_backward(&self, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng) -> Result<StepOutput> {
        let keep = if opts.gradient_checkpointing { Keep::Inputs } else { Keep::All };
        on_pool(|| self.train_step(batch, opts, rng, keep))
    }

    /// Loss only (evaluation): no activations are kept.
    pub fn loss(&self, batch: &TrainBatch) -> Result<StepOutput> {
        let opts = StepOptions { train: false, gradient_checkpointing: false, grad_scale: None };
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        on_pool(|| self.train_step(batch, &opts, &mut rng, Keep::Nothing))
    }

    /// Logits `[b, t, vocab]` (f32) of a batch through the training forward — positions and
    /// segment masks as in training, so a packed row can be compared with its examples alone.
    pub fn train_logits(&self, batch: &TrainBatch) -> Result<Tensor> {
        let mut rng = rand::SeedableRng::seed_from_u64(0);
        let (x, _, _) = self.train_layers(batch, false, &mut rng, Keep::Nothing)?;
        Ok(self.logits(&x)?.reshape((batch.b, batch.t, ()))?)
    }

    /// The embedding and the decoder layers' training forward: the last hidden rows `[b·t,
    /// hidden]`, the RoPE tables at the batch's positions and what each layer keeps.
    fn train_layers(&self, batch: &TrainBatch, train: bool, rng: &mut StdRng, keep: Keep) -> Result<(Tensor, RopeAt, Vec<Kept>)> {
        let tables = || -> Result<_> { Ok((self.rope.gather(&batch.positions)?, embedding::forward(&self.embed_tokens, &batch.input_ids.flatten_all()?)?)) };
        let (rope, mut x) = profile::time("embedding+rope tables", tables)?; // x [n, h]
        let mut kept = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            crate::check_cancel()?;
            let state = matches!(keep, Keep::Inputs).then(|| rng.clone());
            let (y, acts) = layer.forward_train(&x, batch, &rope, train, rng)?;
            match (keep, state) {
                (Keep::Nothing, _) => {}
                (_, Some(state)) => kept.push(Kept::Input(x, state)),
                (_, None) => kept.push(Kept::All(acts)),
            }
            x = y;
        }
        Ok((x, rope, kept))
    }

    /// The loss and, unless `keep` is `Nothing`, the backward of one batch.
    fn train_step(&self, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng, keep: Keep) -> Result<StepOutput> {
        let (x, rope, kept) = self.train_layers(batch, opts.train, rng, keep)?;
        let (hn, final_norm) = self.norm.forward_train(&x)?;
        let head = match &self.lm_head {
            Some(h) => h.dense_weight()?,
            None => self.embed_tokens.clone(),
        };
        let n_targets = batch.n_targets();
        let grad_scale = match keep {
            Keep::Nothing => None,
            _ => Some(opts.grad_scale.unwrap_or(1.0 / n_targets.max(1) as f64)),
        };
        let chunk = lm_head::chunk_rows(hn.device());
        let ce = profile::time("lm_head+cross_entropy", || lm_head::forward_backward(&hn, &head, &batch.targets, grad_scale, chunk))?;
        let mut out = StepOutput { loss_sum: ce.loss_sum, n_tokens: ce.n_tokens, grads: Vec::new() };
        let Some(dh) = ce.dh else { return Ok(out) };
        let dx = self.norm.backward(&final_norm, &dh)?;
        self.backward_layers(batch, &rope, kept, dx, opts.train, &mut out.grads)?;
        Ok(out)
    }

    /// The decoder layers' backward, last first, each recomputed first if only its input was kept.
    fn backward_layers(&self, batch: &TrainBatch, rope: &RopeAt, kept: Vec<Kept>, mut dx: Tensor, train: bool, grads: &mut Vec<LoraGrad>) -> Result<()> {
        for (li, (layer, k)) in self.layers.iter().zip(kept).enumerate().rev() {
            crate::check_cancel()?;
            let acts = match k {
                Kept::All(a) => a,
                Kept::Input(xin, mut state) => layer.forward_train(&xin, batch, rope, train, &mut state)?.1,
            };
            dx = layer.backward(&acts, batch, rope, &dx, li, grads)?;
        }
        Ok(())
    }
}

/// What the training forward keeps of each layer for a backward.
#[derive(Clone, Copy)]
enum Keep {
    /// Nothing: no backward follows (loss, logits).
    Nothing,
    All,
    /// Gradient checkpointing: only each layer's input.
    Inputs,
}

/// What one layer kept between forward and backward.
enum Kept {
    All(super::layers::block::LayerActs),
    /// Gradient checkpointing: the layer input and the RNG as it was, to recompute identically.
    Input(Tensor, StdRng),
}

/// Runs `f` on one of rayon's worker threads: a forward's serial parts then run where its
/// parallel kernels fork, instead of the caller's thread handing every kernel over to the pool
/// and sleeping (two context switches per kernel, ~9k a second).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}
