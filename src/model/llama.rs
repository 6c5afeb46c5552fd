//! The Llama-family decoder with explicit layers: embedding, RMSNorm, RoPE, grouped-query
//! causal attention, SwiGLU MLP, LM head (tied or not). Inference forward with a KV cache; the
//! training engine extends these same layers with saved activations and backward.

use super::config::Config;
use super::weights::WeightFiles;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};

mod decode_cuda;

/// The frozen weight of a [`Linear`]: dense, or bitsandbytes 4-bit (packed codes + statistics).
/// A 4-bit weight is dequantized on every use and never cached, so memory stays at 4 bits.
// With `cuda`, `Device::Cuda` alone is large; a Weight exists once per layer.
#[allow(clippy::large_enum_variant)]
pub enum Weight {
    Dense(Tensor),
    Quant4 {
        /// The host copy (what checkpoints save; the CPU path dequantizes from it).
        q: crate::quant::Quantized4bit,
        /// bnb's `bnb_4bit_compute_dtype`: the dtype the weight is dequantized to and the
        /// inference matmul runs in.
        bnb_compute_dtype: DType,
        /// The dtype of the activations around the layer (and of its adapters).
        dtype: DType,
        device: Device,
        /// With `device` a GPU: the codes and statistics uploaded once (by [`Linear::new_4bit`]),
        /// so dequantization and the batch-1 GEMV run there without a host round trip.
        gpu: crate::kernels::quant4::DeviceCopy,
    },
}

impl Weight {
    /// A 4-bit weight dequantized to bnb's compute dtype on its device (`None` if dense): on the
    /// GPU from its device copy, else on the CPU and then moved.
    fn dequantize4(&self) -> Result<Option<Tensor>> {
        let Weight::Quant4 { q, bnb_compute_dtype, device, gpu, .. } = self else { return Ok(None) };
        Ok(Some(crate::kernels::quant4::dequantize(q, gpu, *bnb_compute_dtype, device)?))
    }
}

/// A linear layer `y = x Wᵀ + b` (`W` is `[out, in]` as in PyTorch), plus an optional LoRA
/// adapter whose term is added at inference (no dropout).
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<super::ops::linear::Lora>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Dense(weight), bias, lora: None }
    }

    /// A 4-bit layer; `q` must hold a 2-D `[out, in]` weight.
    pub fn new_4bit(q: crate::quant::Quantized4bit, bnb_compute_dtype: DType, dtype: DType, device: &Device, bias: Option<Tensor>) -> Result<Self> {
        anyhow::ensure!(q.state.shape.len() == 2, "4-bit linear weight has shape {:?}, expected [out, in]", q.state.shape);
        let gpu = crate::kernels::quant4::upload(&q, device)?;
        let weight = Weight::Quant4 { q, bnb_compute_dtype, dtype, device: device.clone(), gpu };
        Ok(Self { weight, bias, lora: None })
    }

    /// The frozen weight as a dense tensor in the compute dtype (what matmuls and backward use).
    /// 4-bit: dequantized now (bnb's compute dtype, then the activations' dtype), every call.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quant4 { dtype, .. } => Ok(self.weight.dequantize4()?.expect("4-bit").to_dtype(*dtype)?),
        }
    }

    /// The 4-bit weight, if this layer is quantized.
    pub fn quantized(&self) -> Option<&crate::quant::Quantized4bit> {
        match &self.weight {
            Weight::Quant4 { q, .. } => Some(q),
            Weight::Dense(_) => None,
        }
    }

    /// `(out, in)` of the weight.
    pub fn weight_shape(&self) -> Result<(usize, usize)> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.dims2()?),
            Weight::Quant4 { q, .. } => Ok((q.state.shape[0], q.state.shape[1])),
        }
    }

    pub fn device(&self) -> &Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            Weight::Quant4 { device, .. } => device,
        }
    }

    /// The dtype activations and adapters use with this layer.
    pub fn compute_dtype(&self) -> DType {
        match &self.weight {
            Weight::Dense(w) => w.dtype(),
            Weight::Quant4 { dtype, .. } => *dtype,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let u = x.to_dtype(l.a.dtype())?.broadcast_matmul(&l.a.t()?)?;
        Ok((y + (u.broadcast_matmul(&l.b.t()?)? * l.scaling)?.to_dtype(x.dtype())?)?)
    }

    fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, inner) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().unwrap() = self.weight_shape()?.0;
        let x2 = x.reshape((rows, inner))?;
        let y = if rows == 1 { self.gemv(&x2)? } else { None };
        let y = match (y, &self.weight) {
            (Some(y), _) => y,
            (None, Weight::Dense(w)) => x2.matmul(&w.t()?)?,
            // bnb: the input goes to the compute dtype, the output back to the input's dtype.
            (None, Weight::Quant4 { bnb_compute_dtype, .. }) => {
                let w = self.weight.dequantize4()?.expect("4-bit");
                x2.to_dtype(*bnb_compute_dtype)?.matmul(&w.t()?)?.to_dtype(x.dtype())?
            }
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        Ok(y.reshape(out_shape)?)
    }

    /// Number of weights (a 4-bit weight counts its logical elements, as transformers does).
    pub fn num_parameters(&self) -> usize {
        let w = match &self.weight {
            Weight::Dense(w) => w.elem_count(),
            Weight::Quant4 { q, .. } => q.numel(),
        };
        w + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Batch-1 fast path (decoding): f32 weights on the CPU go through our GEMV kernel; a 4-bit
    /// weight with f32 compute is dequantized into a scratch vector first. A 4-bit weight on the
    /// GPU uses the fused dequantize-GEMV kernel (the weight is never materialised).
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.weight {
            Weight::Dense(w) => crate::kernels::gemv::dense(x, w),
            Weight::Quant4 { q, bnb_compute_dtype, device, gpu, .. } => crate::kernels::gemv::quant4(x, q, gpu, *bnb_compute_dtype, device),
        }
    }
}

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 (as transformers' LlamaRMSNorm), result in the input dtype.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let w = self.weight.to_dtype(DType::F32)?;
        let y = candle_nn::ops::rms_norm(&xf.contiguous()?, &w, self.eps as f32)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// cos/sin tables for rotary embeddings, `[max_pos, head_dim/2]` in the compute dtype.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Config, max_pos: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut freqs = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in &inv {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (max_pos, half), device)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Rotate `x` `[b, heads, t, d]` for positions `pos..pos+t` (HF's rotate_half layout).
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        crate::kernels::rope::rotate_at(x, &self.cos, &self.sin, pos)
    }

    /// cos/sin at one position as f32 slices (CPU f32 tables only), for the decode path.
    fn row_f32(&self, pos: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        crate::kernels::rope::row_f32(&self.cos, &self.sin, pos)
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        self.down_proj.forward(&crate::kernels::swiglu::silu_mul(g, &u)?)
    }
}

pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Key/value cache for generation, one entry per layer.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// CUDA: the fused decode path's scratch vectors (made at its first step).
    decode: Option<crate::kernels::decode::Scratch>,
    /// CUDA: keep to the generic path (what the fused one is tested against).
    unfused: bool,
}

/// One layer's cached keys and values. With batch 1 in f32 on the CPU (generation) they live
/// in preallocated buffers that decoding appends to in place, and likewise in GPU buffers when
/// CUDA decodes through the fused path; otherwise they are tensors `[b, kvh, s, d]` grown by
/// concatenation.
#[derive(Default)]
pub enum LayerKv {
    #[default]
    Empty,
    Tensors(Tensor, Tensor),
    Buf(KvBuf),
    Gpu(crate::kernels::decode::GpuKv),
}

/// Keys and values as `[kvh, cap, d]` f32 buffers (per head: positions `0..len` in use).
pub struct KvBuf {
    k: Vec<f32>,
    v: Vec<f32>,
    kvh: usize,
    d: usize,
    len: usize,
    cap: usize,
}

impl KvBuf {
    fn new(kvh: usize, d: usize) -> Self {
        Self { k: Vec::new(), v: Vec::new(), kvh, d, len: 0, cap: 0 }
    }

    /// Append `t` positions from `k`/`v` laid out `[kvh, t, d]`.
    fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let (kvh, d) = (self.kvh, self.d);
        assert!(k.len() == kvh * t * d && v.len() == kvh * t * d);
        if self.len + t > self.cap {
            let cap = (self.len + t).max(2 * self.cap).max(64);
            let relayout = |old: &[f32]| {
                let mut new = vec![0f32; kvh * cap * d];
                for h in 0..kvh {
                    new[h * cap * d..(h * cap + self.len) * d].copy_from_slice(&old[h * self.cap * d..(h * self.cap + self.len) * d]);
                }
                new
            };
            self.k = relayout(&self.k);
            self.v = relayout(&self.v);
            self.cap = cap;
        }
        for h in 0..kvh {
            let dst = (h * self.cap + self.len) * d..(h * self.cap + self.len + t) * d;
            self.k[dst.clone()].copy_from_slice(&k[h * t * d..(h + 1) * t * d]);
            self.v[dst].copy_from_slice(&v[h * t * d..(h + 1) * t * d]);
        }
        self.len += t;
    }

    /// All cached positions as tensors `[1, kvh, len, d]`.
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (kvh, d, len) = (self.kvh, self.d, self.len);
        let gather = |buf: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(kvh * len * d);
            for h in 0..kvh {
                out.extend_from_slice(&buf[h * self.cap * d..(h * self.cap + len) * d]);
            }
            Ok(Tensor::from_vec(out, (1, kvh, len, d), device)?)
        };
        Ok((gather(&self.k)?, gather(&self.v)?))
    }
}

impl LayerKv {
    pub fn len(&self) -> usize {
        match self {
            LayerKv::Empty => 0,
            LayerKv::Tensors(k, _) => k.dim(2).unwrap_or(0),
            LayerKv::Buf(b) => b.len,
            LayerKv::Gpu(g) => g.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::Empty).collect(),
            decode: None,
            unfused: false,
        }
    }

    /// This cache never takes the fused CUDA decode path (the reference in tests).
    pub fn unfused(mut self) -> Self {
        self.unfused = true;
        self
    }

    /// Whether the fused CUDA decode path holds this cache (it has run a step).
    pub fn is_fused(&self) -> bool {
        matches!(self.layers.first(), Some(LayerKv::Gpu(_)))
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An f32 CPU tensor's elements, contiguous (a copy).
fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Attention {
    /// `x` `[b, t, hidden]`; queries at positions `pos..pos+t` attend causally to the cache plus
    /// themselves.
    pub fn forward(&self, x: &Tensor, rope: &Rope, pos: usize, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (kvh, d) = (self.n_kv_heads, self.head_dim);
        // Generation on the CPU in f32: the cache is a preallocated buffer.
        let buffered = b == 1 && x.device().is_cpu() && x.dtype() == DType::F32;
        if let Some(slot) = cache {
            if buffered && matches!(slot, LayerKv::Empty) {
                *slot = LayerKv::Buf(KvBuf::new(kvh, d));
            }
            if let LayerKv::Buf(buf) = slot {
                if t == 1 {
                    if let Some(y) = self.decode_step(x, rope, pos, buf)? {
                        return Ok(y);
                    }
                }
                let (q, k, v) = self.qkv(x, rope, pos)?;
                buf.append(&f32_vec(&k)?, &f32_vec(&v)?, t);
                let (k, v) = if buf.len == t { (k, v) } else { buf.tensors(x.device())? };
                return self.attend(&q, &k, &v);
            }
            let (q, k, v) = self.qkv(x, rope, pos)?;
            let (k, v) = match std::mem::take(slot) {
                LayerKv::Tensors(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                LayerKv::Gpu(g) => {
                    let (pk, pv) = g.tensors()?;
                    (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
                }
                _ => (k, v),
            };
            *slot = LayerKv::Tensors(k.clone(), v.clone());
            return self.attend(&q, &k, &v);
        }
        let (q, k, v) = self.qkv(x, rope, pos)?;
        self.attend(&q, &k, &v)
    }

    /// Rotated queries `[b, h, t, d]`, rotated keys and values `[b, kvh, t, d]`, contiguous.
    fn qkv(&self, x: &Tensor, rope: &Rope, pos: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?, self.v_proj.forward(x)?);
        let heads = |y: &Tensor, n: usize, rotate: bool| crate::kernels::rope::split_heads_at(y, n, d, &rope.cos, &rope.sin, pos, rotate);
        Ok((heads(&q, h, true)?, heads(&k, kvh, true)?, heads(&v, kvh, false)?))
    }

    /// Queries `[b, h, t, d]` against all `s` keys/values `[b, kvh, s, d]`, the `t` queries being
    /// the last `t` positions; then the output projection.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = q.dims4()?;
        let kvh = self.n_kv_heads;
        // Grouped-query attention without copying K/V: fold the query heads that share a KV
        // head into the time axis, [b, kvh, rep*t, d].
        let rep = h / kvh;
        let q = q.reshape((b, kvh, rep * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = q.matmul(&k.t()?)?; // [b, kvh, rep*t, s]
        let probs = crate::kernels::attention::causal_softmax(scores, t, scale, v.dtype())?;
        let out = probs.matmul(v)?; // [b, kvh, rep*t, d]
        let out = out.reshape((b, h, t, d))?.transpose(1, 2)?.reshape((b, t, h * d))?;
        self.o_proj.forward(&out)
    }

    /// One new position (decoding) against a buffered cache, on plain slices: rope on the q/k
    /// rows, append k/v in place, fused scores/softmax/weighted sum per head. `None` when the
    /// rope tables are not CPU f32 (the caller takes the tensor path).
    fn decode_step(&self, x: &Tensor, rope: &Rope, pos: usize, buf: &mut KvBuf) -> Result<Option<Tensor>> {
        let Some((cos, sin)) = rope.row_f32(pos) else { return Ok(None) };
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let mut q = f32_vec(&self.q_proj.forward(x)?)?;
        let mut k = f32_vec(&self.k_proj.forward(x)?)?;
        let v = f32_vec(&self.v_proj.forward(x)?)?;
        crate::kernels::rope::cpu::rope_row_inplace(&mut q, d, &cos, &sin);
        crate::kernels::rope::cpu::rope_row_inplace(&mut k, d, &cos, &sin);
        buf.append(&k, &v, 1);
        let mut out = vec![0f32; h * d];
        let scale = 1.0 / (d as f32).sqrt();
        crate::kernels::attention::cpu::decode_attention(&q, &buf.k, &buf.v, buf.cap * d, buf.len, h, kvh, d, scale, &mut out);
        let out = Tensor::from_vec(out, (1, 1, h * d), x.device())?;
        Ok(Some(self.o_proj.forward(&out)?))
    }
}

impl Block {
    pub fn forward(&self, x: &Tensor, rope: &Rope, pos: usize, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, pos, cache)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

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
    pub quantization: Option<super::quantized::BnbConfig>,
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
    if !["nf4", "fp4"].iter().any(|q| src.has(&format!("{name}.quant_state.bitsandbytes__{q}"))) {
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
    pub fn load_with(config: &Config, src: &dyn TensorSource, dtype: DType, device: &Device, quant: Option<&super::quantized::BnbConfig>) -> Result<Self> {
        let c = config;
        let (hd, h, kvh, d, inter) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size);
        let mut any_4bit = false;
        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = format!("{name}.weight");
            let bias = if bias { Some(src.tensor(&format!("{name}.bias"), &[out], dtype, device)?) } else { None };
            let compute = quant.map_or(dtype, |q| q.compute_dtype);
            if let Some(q) = load_bnb_weight(src, &w, out, inp)? {
                any_4bit = true;
                return Linear::new_4bit(q, compute, dtype, device, bias);
            }
            if let Some(cfg) = quant.filter(|q| name != "lm_head" && q.quantizes(name)) {
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
            Ok(RmsNorm { weight: src.tensor(&format!("{name}.weight"), &[hd], dtype, device)?, eps: c.rms_norm_eps })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            crate::check_cancel()?;
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), h * d, hd, c.attention_bias)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), kvh * d, hd, c.attention_bias)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), kvh * d, hd, c.attention_bias)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), hd, h * d, c.attention_bias)?,
                    n_heads: h,
                    n_kv_heads: kvh,
                    head_dim: d,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, hd, c.mlp_bias)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"), inter, hd, c.mlp_bias)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), hd, inter, c.mlp_bias)?,
                },
            });
        }
        let embed_tokens = src.tensor("model.embed_tokens.weight", &[c.vocab_size, hd], dtype, device)?;
        // Some checkpoints mark tied embeddings only by omitting lm_head.
        let lm_head = if c.tie_word_embeddings || !src.has("lm_head.weight") {
            None
        } else {
            Some(linear("lm_head", c.vocab_size, hd, false)?)
        };
        let quantization = match (any_4bit, quant) {
            (false, _) => None,
            (true, Some(q)) => Some(q.clone()),
            // 4-bit tensors without a quantization_config: describe what was found.
            (true, None) => layers.iter().flat_map(|b: &Block| [&b.self_attn.q_proj, &b.self_attn.k_proj, &b.self_attn.v_proj, &b.self_attn.o_proj, &b.mlp.gate_proj, &b.mlp.up_proj, &b.mlp.down_proj])
                .find_map(|l| l.quantized())
                .map(|q| super::quantized::BnbConfig {
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
            norm: norm("model.norm")?,
            lm_head,
            rope: Rope::new(c, c.max_position_embeddings.max(1), dtype, device)?,
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
            // Run on a rayon worker, so the many short parallel kernels of a forward (GEMVs while
            // decoding) are joined by this thread instead of each waking a blocked caller.
            return rayon::scope(|_| self.forward_inner(ids, cache, last_only));
        }
        self.forward_inner(ids, cache, last_only)
    }

    fn forward_inner(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, last_only: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = cache.as_ref().map_or(0, |c| c.len());
        anyhow::ensure!(
            pos + t <= self.rope.cos.dim(0)?,
            "sequence of {} tokens exceeds max_position_embeddings ({})",
            pos + t,
            self.rope.cos.dim(0)?
        );
        if let Some(c) = cache.as_deref_mut() {
            if let Some(logits) = decode_cuda::forward(self, ids, c)? {
                return Ok(logits);
            }
        }
        let mut x = candle_nn::Embedding::new(self.embed_tokens.clone(), self.config.hidden_size).forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &self.rope, pos, slot)?;
        }
        let x = if last_only && t > 1 { x.narrow(1, t - 1, 1)? } else { x };
        let _ = b;
        self.logits(&x)
    }

    /// Final norm and LM head: f32 logits for the hidden states `x` `[b, t, hidden]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&x)?,
            None => Linear::new(self.embed_tokens.clone(), None).forward(&x)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    pub fn num_parameters(&self) -> usize {
        self.config.num_parameters()
    }
}
