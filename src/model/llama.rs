//! The decoder of every supported family as one stack of the layers in `model/layers/`
//! (embedding, decoder blocks of RMSNorm, RoPE, grouped-query causal attention and a gated MLP,
//! final norm, LM head tied or not), the family's variants chosen by its config (see
//! `names.rs` and `config.rs`): loading, the inference forward with a KV cache, and the
//! training forward and backward (loss, the adapters' gradients; with gradient checkpointing
//! each layer is recomputed during backward from its input, which waits in pinned host memory
//! when offloaded: `kernels::offload`). Gradients flow only into LoRA
//! adapters; the base is frozen.

use super::config::Config;
use super::engine::{LoraGrad, StepOptions, StepOutput, TrainBatch};
use super::layers::attention::{AttnParams, QkvProj, Step};
use super::layers::mlp::GateUpProj;
use super::layers::rope::RopeAt;
use super::layers::{embedding, lm_head};
use super::names::{self, ModuleId, Norm, NormId, Proj};
use super::weights::WeightFiles;
use crate::kernels::offload::{self, Parked};
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

/// A multimodal checkpoint's language model seen under a text model's names: `model.X` is
/// `<prefix>X` (`model.language_model.` or `language_model.model.`), `lm_head.*` is
/// `lm_head.*` or `language_model.lm_head.*`.
pub struct LanguageModel<'a> {
    pub inner: &'a dyn TensorSource,
    prefix: &'static str,
    head_prefix: &'static str,
}

impl<'a> LanguageModel<'a> {
    /// The language model inside `inner`, by whichever of the two layouts it has.
    pub fn new(inner: &'a dyn TensorSource) -> Result<Self> {
        let embed = names::weight_key(names::EMBED_TOKENS);
        for (prefix, head_prefix) in names::LANGUAGE_MODEL_LAYOUTS {
            if inner.has(&format!("{prefix}{}", embed.trim_start_matches("model."))) {
                return Ok(Self { inner, prefix, head_prefix });
            }
        }
        anyhow::bail!("no language model weights (`model.language_model.*` or `language_model.model.*`) in this multimodal checkpoint")
    }

    fn rename(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.prefix),
            None => format!("{}{name}", self.head_prefix),
        }
    }
}

impl TensorSource for LanguageModel<'_> {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.inner.tensor(&self.rename(name), shape, dtype, device)
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(&self.rename(name))
    }
    fn stored(&self, name: &str) -> Result<Option<Tensor>> {
        self.inner.stored(&self.rename(name))
    }
    fn location(&self, name: &str) -> Option<String> {
        self.inner.location(&self.rename(name))
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
        let hd = c.hidden_size;
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
        let norm = |name: &str, size: usize| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: src.tensor(&names::weight_key(name), &[size], dtype, device)?, eps: c.rms_norm_eps, plus_one: c.norm_plus_one })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            crate::check_limits()?;
            layers.push(load_block(c, i, &mut linear, &norm)?);
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
            norm: norm(names::FINAL_NORM, hd)?,
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
        self.scale_embeddings(embedding::lookup(&self.embed_tokens, ids)?)
    }

    /// Embeddings × the family's scale (Gemma: √hidden, rounded to the activations' dtype as
    /// transformers' normalizer tensor is).
    fn scale_embeddings(&self, x: Tensor) -> Result<Tensor> {
        let Some(s) = self.config.embed_scale else { return Ok(x) };
        let s = Tensor::new(s as f32, x.device())?.to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&s)?)
    }

    /// Final norm and LM head: f32 logits for the hidden states `x` `[..., hidden]`.
    pub(crate) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        let cap = self.config.final_logit_softcapping;
        match &self.lm_head {
            Some(head) => lm_head::capped_logits(head, &x, cap),
            None => lm_head::capped_logits(&Linear::new(self.embed_tokens.clone(), None), &x, cap),
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.config.num_parameters()
    }

    /// Forward and backward of one batch: the summed loss, the number of trained tokens and the
    /// adapters' gradients (of `grad_scale · loss_sum`).
    pub fn forward_backward(&self, batch: &TrainBatch, opts: &StepOptions, rng: &mut StdRng) -> Result<StepOutput> {
        let keep = if opts.gradient_checkpointing { Keep::Inputs { offload: opts.offload_checkpoints } } else { Keep::All };
        let out = on_pool(|| self.train_step(batch, opts, rng, keep));
        // Tensors parked last (a step cut short) let go of their device memory.
        offload::settle(&self.device)?;
        out
    }

    /// Loss only (evaluation): no activations are kept.
    pub fn loss(&self, batch: &TrainBatch) -> Result<StepOutput> {
        let opts = StepOptions { train: false, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
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
        // Checked here, not by the gathers: an index past a table is a device-side assert on a GPU.
        let (vocab, positions) = (self.embed_tokens.dim(0)?, self.rope.max_positions()?);
        anyhow::ensure!((batch.max_id as usize) < vocab, "batch: token id {} is outside the model's vocabulary ({vocab} tokens)", batch.max_id);
        anyhow::ensure!(
            (batch.max_position as usize) < positions,
            "batch: position {} is beyond the model's max_position_embeddings ({positions}); raise it in config.json or train shorter rows",
            batch.max_position
        );
        let tables = || -> Result<_> { Ok((self.rope.gather(&batch.positions)?, self.scale_embeddings(embedding::forward(&self.embed_tokens, &batch.input_ids.flatten_all()?)?)?)) };
        let (rope, mut x) = profile::time("embedding+rope tables", tables)?; // x [n, h]
        let mut kept = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            crate::check_cancel()?;
            // The RNG before the layer: a checkpointed layer's recompute draws the same dropout.
            let state = rng.clone();
            // Parked before the layer runs: an offloaded input's copy out overlaps the layer.
            let parked = match keep {
                Keep::Inputs { offload } => Some(offload::park(x.clone(), offload)?),
                _ => None,
            };
            let (y, acts) = layer.forward_train(&x, batch, &rope, train, rng)?;
            match (keep, parked) {
                (Keep::All, _) => kept.push(Kept::All(acts)),
                (_, Some(p)) => kept.push(Kept::Input(p, state)),
                _ => {}
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
        let chunk = lm_head::chunk_rows(hn.device(), head.dim(0)?);
        let cap = self.config.final_logit_softcapping;
        let ce = profile::time("lm_head+cross_entropy", || lm_head::forward_backward_capped(&hn, &head, &batch.targets, grad_scale, chunk, cap))?;
        let mut out = StepOutput { loss_sum: ce.loss_sum, n_tokens: ce.n_tokens, grads: Vec::new() };
        let Some(dh) = ce.dh else { return Ok(out) };
        let dx = self.norm.backward(&final_norm, &dh)?;
        self.backward_layers(batch, &rope, kept, dx, opts.train, &mut out.grads)?;
        Ok(out)
    }

    /// The decoder layers' backward, last first, each recomputed first if only its input was kept.
    /// An offloaded input comes back from host memory while the layer above runs its attention
    /// backward (after its MLP's, the layer's memory peak).
    fn backward_layers(&self, batch: &TrainBatch, rope: &RopeAt, kept: Vec<Kept>, mut dx: Tensor, train: bool, grads: &mut Vec<LoraGrad>) -> Result<()> {
        let mut kept: Vec<Option<Kept>> = kept.into_iter().map(Some).collect();
        for (li, layer) in self.layers.iter().enumerate().rev() {
            crate::check_cancel()?;
            let acts = match kept.get_mut(li).and_then(Option::take).context("backward: a layer's activations are missing")? {
                Kept::All(a) => a,
                Kept::Input(xin, mut state) => layer.forward_train(&offload::unpark(xin)?, batch, rope, train, &mut state)?.1,
            };
            let below = li.checked_sub(1).and_then(|i| kept.get_mut(i)).and_then(Option::as_mut);
            let prefetch = || match below {
                Some(Kept::Input(p, _)) => p.prefetch(),
                _ => Ok(()),
            };
            dx = layer.backward(acts, batch, rope, &dx, li, grads, prefetch)?;
        }
        Ok(())
    }
}

/// Decoder layer `i` of config `c`: its projections (separate or fused, biases as the family
/// says), norms (the family's), attention parameters and window.
fn load_block(c: &Config, i: usize, linear: &mut impl FnMut(&str, usize, usize, bool) -> Result<Linear>, norm: &impl Fn(&str, usize) -> Result<RmsNorm>) -> Result<Block> {
    let (hd, h, kvh, d, inter) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size);
    let family = c.family;
    let mut lin = |proj: Proj, out: usize, inp: usize| linear(&ModuleId { layer: i, proj }.path(), out, inp, c.has_bias(proj));
    let qkv = match family.position(Proj::Qkv) {
        Some(_) => QkvProj::Fused { qkv_proj: lin(Proj::Qkv, (h + 2 * kvh) * d, hd)? },
        None => QkvProj::Split { q_proj: lin(Proj::Q, h * d, hd)?, k_proj: lin(Proj::K, kvh * d, hd)?, v_proj: lin(Proj::V, kvh * d, hd)? },
    };
    let o_proj = lin(Proj::O, hd, h * d)?;
    let gate_up = match family.position(Proj::GateUp) {
        Some(_) => GateUpProj::Fused { gate_up_proj: lin(Proj::GateUp, 2 * inter, hd)? },
        None => GateUpProj::Split { gate_proj: lin(Proj::Gate, inter, hd)?, up_proj: lin(Proj::Up, inter, hd)? },
    };
    let down_proj = lin(Proj::Down, hd, inter)?;
    // This layer's norm `n` (sized for its input), if the family has it.
    let n = |which: Norm| -> Result<Option<RmsNorm>> {
        let size = if matches!(which, Norm::QNorm | Norm::KNorm) { d } else { hd };
        family.has_norm(which).then(|| norm(&NormId { layer: i, norm: which }.path(), size)).transpose()
    };
    let window = c.window(i);
    let params = AttnParams { scale: c.attn_scale as f32, softcap: c.attn_logit_softcapping.map(|x| x as f32), window };
    let sliding = c.layer_types.get(i) == Some(&super::config::LayerType::Sliding);
    let self_attn = Attention { qkv, o_proj, q_norm: n(Norm::QNorm)?, k_norm: n(Norm::KNorm)?, n_heads: h, n_kv_heads: kvh, head_dim: d, params, sliding };
    Ok(Block {
        input_layernorm: norm(&NormId { layer: i, norm: Norm::Input }.path(), hd)?,
        self_attn,
        post_attention_layernorm: norm(&NormId { layer: i, norm: Norm::PostAttention }.path(), hd)?,
        pre_feedforward_layernorm: n(Norm::PreFeedforward)?,
        post_feedforward_layernorm: n(Norm::PostFeedforward)?,
        mlp: Mlp { gate_up, down_proj, act: c.hidden_act },
    })
}

/// What the training forward keeps of each layer for a backward.
#[derive(Clone, Copy)]
enum Keep {
    /// Nothing: no backward follows (loss, logits).
    Nothing,
    All,
    /// Gradient checkpointing: only each layer's input, in host memory with `offload` (on a GPU).
    Inputs { offload: bool },
}

/// What one layer kept between forward and backward (one per layer: the size difference of
/// the variants does not matter).
#[allow(clippy::large_enum_variant)]
enum Kept {
    All(super::layers::block::LayerActs),
    /// Gradient checkpointing: the layer input (parked: in host memory when offloaded) and the
    /// RNG as it was, to recompute identically.
    Input(Parked, StdRng),
}

/// Runs `f` on one of rayon's worker threads: a forward's serial parts then run where its
/// parallel kernels fork, instead of the caller's thread handing every kernel over to the pool
/// and sleeping (two context switches per kernel, ~9k a second).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}
