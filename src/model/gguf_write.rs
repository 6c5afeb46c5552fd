//! Writing a model as a GGUF file llama.cpp runs: the inverse of `gguf.rs`. The metadata is what
//! llama.cpp's converter writes for the family (`{arch}.*` hyper-parameters, the tokenizer, the
//! chat template), the tensors carry llama.cpp's names and the converter's transformations
//! (Llama's q/k row permutation, Gemma's `1 + w` norms, RoPE factors as tensors), and the
//! 2-D weights are quantized with candle's ggml quantizers following llama.cpp's mixes
//! (`q4_k_m`, `q5_k_m`: which tensors get more bits). Adapters are merged on the fly: the
//! model in memory is not changed.

use super::gguf::permute_qk;
use super::layers::rope::ScalingKind;
use super::llama::{Linear, Llama};
use super::names::{self, Proj};
use super::tokenizer::GgufVocab;
use super::Model;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value as G;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// `save_gguf`'s `quantization`: the file type, as llama.cpp's tools name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    F32,
    F16,
    BF16,
    Q8_0,
    /// llama.cpp's `Q4_K_M`: q4_K, with q6_K for half of the v and down projections and the output.
    Q4KM,
    /// `Q5_K_M`: q5_K, with the same q6_K tensors as `Q4_K_M`.
    Q5KM,
    Q6K,
}

pub const QUANTIZATIONS: &str = "f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k";

impl Quantization {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Self::F32,
            "f16" | "float16" => Self::F16,
            "bf16" | "bfloat16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            "q5_k_m" => Self::Q5KM,
            "q6_k" => Self::Q6K,
            _ => bail!("unsupported GGUF quantization `{s}` (supported: {QUANTIZATIONS})"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }

    /// Whether the weights are stored as floats (the reload equals the model up to rounding).
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::BF16 => 32,
        }
    }

    /// The type of most 2-D weights.
    fn base(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }
}

/// What the quantization mix needs to know of a tensor.
struct Slot<'a> {
    name: &'a str,
    /// `[rows, cols]` (cols: the dimension blocks run along).
    dims: &'a [usize],
    layer: Option<usize>,
    n_layers: usize,
    /// No `output.weight`: the embedding is also the output projection.
    tied: bool,
}

/// llama.cpp's choice for one tensor (`llama_tensor_get_type`, for the mixes qscript writes):
/// 1-D tensors stay f32; in the `_M` mixes the output (or a tied embedding) gets q6_K, and so
/// do the v (or fused qkv) and down projections of the layers where `more_bits` says; a type
/// whose blocks do not divide the rows falls back as llama.cpp falls back.
fn tensor_type(q: Quantization, s: &Slot) -> GgmlDType {
    if s.dims.len() < 2 {
        return GgmlDType::F32;
    }
    let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2;
    let is_output = s.name == "output.weight" || (s.tied && s.name == "token_embd.weight");
    let mut t = q.base();
    if matches!(q, Quantization::Q4KM | Quantization::Q5KM | Quantization::Q6K) && is_output {
        t = GgmlDType::Q6K;
    } else if matches!(q, Quantization::Q4KM | Quantization::Q5KM) {
        let v_like = s.name.ends_with(".attn_v.weight") || s.name.ends_with(".attn_qkv.weight");
        let down = s.name.ends_with(".ffn_down.weight");
        if (v_like || down) && s.layer.is_some_and(|i| more_bits(i, s.n_layers)) {
            t = GgmlDType::Q6K;
        }
    }
    fallback(t, s.dims[s.dims.len() - 1])
}

/// llama.cpp's fallbacks for rows its blocks do not divide: q4_K → q5_0, q5_K → q5_1,
/// q6_K → q8_0, then f16.
fn fallback(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let t = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        t => t,
    };
    if cols.is_multiple_of(t.block_size()) { t } else { GgmlDType::F16 }
}

/// What a written file holds, for reports.
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub bytes: u64,
    /// Tensors per ggml type (`q4_K: 120`), sorted by name.
    pub types: Vec<(String, usize)>,
}

/// Write `model` (adapters merged in, the model unchanged) to `path` as a GGUF file of type `q`,
/// atomically: an error leaves nothing at `path`.
pub fn write_model(model: &Model, path: &Path, q: Quantization) -> Result<Written> {
    write_model_checked(model, path, q, |_| Ok(()))
}

/// [`write_model`], with `check` run on the complete file under its temporary name before it
/// is moved to `path`: a file that fails the check never appears there.
pub fn write_model_checked(model: &Model, path: &Path, q: Quantization, check: impl FnOnce(&Path) -> Result<()>) -> Result<Written> {
    let llama = &model.llama;
    let family = llama.family();
    let arch = family.gguf_arch().with_context(|| format!("GGUF export: no llama.cpp architecture for the {} family", family.name))?;
    let mut md = Metadata::default();
    md.push("general.architecture", G::String(arch.into()));
    md.push("general.type", G::String("model".into()));
    md.push("general.name", G::String(model_name(&model.name_or_path)));
    hparams(&mut md, llama, arch)?;
    md.push("general.file_type", G::U32(q.file_type()));
    match &model.tokenizer {
        Some(t) => vocab(&mut md, &t.to_gguf_vocab(llama.config.vocab_size)?),
        None => {
            // What the converter writes for a model without a vocabulary (`--no-vocab`).
            md.push("tokenizer.ggml.model", G::String("none".into()));
            md.push(&format!("{arch}.vocab_size"), G::U32(llama.config.vocab_size as u32));
        }
    }
    md.push("general.quantization_version", G::U32(2));
    let sources = tensor_sources(llama, arch)?;
    let tied = llama.lm_head.is_none();
    let n_layers = llama.layers.len();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(sources.len());
    for (name, make) in &sources {
        crate::check_cancel()?;
        let t = make().with_context(|| format!("GGUF export: tensor `{name}`"))?;
        let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
        let ty = tensor_type(q, &Slot { name, dims: t.dims(), layer, n_layers, tied });
        let qt = QTensor::quantize(&t, ty).map_err(|e| anyhow::anyhow!("GGUF export: tensor `{name}`: cannot quantize to {ty:?}: {e}"))?;
        tensors.push((name.clone(), qt));
    }
    let mut types = std::collections::BTreeMap::new();
    for (_, t) in &tensors {
        *types.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
    }
    let mut bytes = 0;
    write_file(path, &md, &tensors, |tmp| {
        bytes = std::fs::metadata(tmp).map(|m| m.len()).unwrap_or(0);
        check(tmp)
    })?;
    Ok(Written { bytes, types: types.into_iter().collect() })
}

/// The file's metadata in the order it is written.
#[derive(Default)]
pub(crate) struct Metadata(pub(crate) Vec<(String, G)>);

impl Metadata {
    /// Set `key` (a second push of a key replaces its value: a GGUF key appears once, and
    /// llama.cpp's gguf-py refuses a file that repeats one).
    pub(crate) fn push(&mut self, key: &str, v: G) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }
}

/// Write a GGUF file atomically (`util::fs`), `check` run on the finished temporary file; the
/// temporary is removed on any error.
pub(crate) fn write_file(path: &Path, md: &Metadata, tensors: &[(String, QTensor)], check: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let md: Vec<(&str, &G)> = md.0.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    crate::util::fs::install_file(path, crate::util::fs::Existing::Replace, |tmp| {
        let f = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        candle_core::quantized::gguf_file::write(&mut w, &md, &ts).map_err(|e| anyhow::anyhow!("{}: cannot write GGUF: {e}", path.display()))?;
        std::io::Write::flush(&mut w).with_context(|| format!("{}: write failed", path.display()))?;
        drop(w);
        check(tmp)
    })
}

/// `general.name`: the last part of the model's id or path, without `.gguf`.
fn model_name(name_or_path: &str) -> String {
    let last = name_or_path.trim_end_matches('/').rsplit('/').next().unwrap_or(name_or_path);
    last.strip_suffix(".gguf").unwrap_or(last).to_string()
}

/// A tensor made when it is written (one f32 CPU copy at a time).
type Source<'a> = (String, Box<dyn Fn() -> Result<Tensor> + 'a>);

/// Every tensor of the file in llama.cpp's names, with the converter's transformations.
fn tensor_sources<'a>(llama: &'a Llama, arch: &str) -> Result<Vec<Source<'a>>> {
    let family = llama.family();
    let c = &llama.config;
    let name = |hf: &str| family.gguf_key(hf).with_context(|| format!("GGUF export: no llama.cpp name for `{hf}`"));
    let mut out: Vec<Source<'a>> = Vec::new();
    if let Some(freqs) = rope_freqs(c) {
        out.push(("rope_freqs.weight".into(), Box::new(move || Ok(Tensor::new(freqs.as_slice(), &Device::Cpu)?))));
    }
    if let Some(ScalingKind::LongRope { long_factor, short_factor, .. }) = c.rope_scaling.as_ref().map(|s| &s.kind) {
        for (n, f) in [("rope_factors_long.weight", long_factor), ("rope_factors_short.weight", short_factor)] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            out.push((n.into(), Box::new(move || Ok(Tensor::new(v.as_slice(), &Device::Cpu)?))));
        }
    }
    out.push((name(&names::weight_key(names::EMBED_TOKENS))?, Box::new(move || f32_cpu(&llama.embed_tokens))));
    let plus_one = family.gemma;
    for (id, n) in llama.norms() {
        out.push((name(&names::weight_key(&id.path()))?, Box::new(move || norm_weight(&n.weight, plus_one))));
    }
    // llama.cpp's `llama` architecture rotates pairs of adjacent dimensions: q/k rows permuted.
    let heads = |p: Proj| match (arch, p) {
        ("llama", Proj::Q) => Some(c.num_attention_heads),
        ("llama", Proj::K) => Some(c.num_key_value_heads),
        _ => None,
    };
    for (id, lin) in llama.linears() {
        let path = id.path();
        let h = heads(id.proj);
        out.push((name(&names::weight_key(&path))?, Box::new(move || permuted(merged_weight(lin)?, h))));
        if let Some(b) = &lin.bias {
            out.push((name(&names::bias_key(&path))?, Box::new(move || permuted(f32_cpu(b)?, h))));
        }
    }
    out.push((name(&names::weight_key(names::FINAL_NORM))?, Box::new(move || norm_weight(&llama.norm.weight, plus_one))));
    if let Some(head) = &llama.lm_head {
        out.push((name(&names::weight_key(names::LM_HEAD))?, Box::new(move || merged_weight(head))));
    }
    Ok(out)
}

fn f32_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// A linear's weight with its adapter merged (`W + scaling · B·A`, in f32), on the CPU.
fn merged_weight(lin: &Linear) -> Result<Tensor> {
    f32_cpu(&super::adapter::merged_weight(lin)?)
}

fn permuted(t: Tensor, heads: Option<usize>) -> Result<Tensor> {
    match heads {
        Some(h) => permute_qk(&t, h),
        None => Ok(t),
    }
}

/// Gemma's norms multiply by `1 + w`; llama.cpp's multiply by the stored weight.
fn norm_weight(w: &Tensor, plus_one: bool) -> Result<Tensor> {
    let w = f32_cpu(w)?;
    Ok(if plus_one { w.affine(1.0, 1.0)? } else { w })
}

/// Llama 3's RoPE scaling as llama.cpp stores it: one divisor per frequency.
fn rope_freqs(c: &super::Config) -> Option<Vec<f32>> {
    let Some(ScalingKind::Llama3(s)) = c.rope_scaling.as_ref().map(|s| &s.kind) else { return None };
    let hd = c.head_dim;
    Some((0..hd / 2).map(|i| {
        let f = c.rope_theta.powf(-((2 * i) as f64) / hd as f64);
        (f / s.apply(f)) as f32
    }).collect())
}

/// The `{arch}.*` hyper-parameters, as llama.cpp's converter writes them per family and as
/// `gguf.rs` reads them back (its defaults where the converter is silent).
fn hparams(md: &mut Metadata, llama: &Llama, arch: &str) -> Result<()> {
    let c = &llama.config;
    let k = |key: &str| format!("{arch}.{key}");
    let u = |n: usize| G::U32(n as u32);
    // The converter writes key/value lengths when config.json has `head_dim`; written here when
    // it is not llama.cpp's default (hidden / heads), and always for Gemma (as the converter).
    let own_head_dim = c.head_dim != c.hidden_size / c.num_attention_heads;
    let family = llama.family();
    if c.partial_rotary_factor != 1.0 && arch != "phi3" {
        bail!("GGUF export: partial rotary embeddings are written for phi3 only, not {arch}");
    }
    md.push(&k("context_length"), u(c.max_position_embeddings));
    if arch == "phi3" {
        let original = match c.rope_scaling.as_ref().map(|s| &s.kind) {
            Some(ScalingKind::LongRope { original_max_position_embeddings, .. }) => *original_max_position_embeddings,
            _ => c.raw.get("original_max_position_embeddings").and_then(|v| v.as_u64()).map_or(c.max_position_embeddings, |n| n as usize),
        };
        md.push(&k("rope.scaling.original_context_length"), u(original));
    }
    md.push(&k("embedding_length"), u(c.hidden_size));
    md.push(&k("block_count"), u(c.num_hidden_layers));
    md.push(&k("feed_forward_length"), u(c.intermediate_size));
    md.push(&k("attention.head_count"), u(c.num_attention_heads));
    md.push(&k("attention.head_count_kv"), u(c.num_key_value_heads));
    if arch != "gemma2" || c.rope_theta != 10000.0 {
        md.push(&k("rope.freq_base"), G::F32(c.rope_theta as f32));
    }
    md.push(&k("attention.layer_norm_rms_epsilon"), G::F32(c.rms_norm_eps as f32));
    if own_head_dim || family.gemma {
        md.push(&k("attention.key_length"), u(c.head_dim));
        md.push(&k("attention.value_length"), u(c.head_dim));
    }
    match arch {
        "llama" => {
            md.push(&k("vocab_size"), u(c.vocab_size));
            md.push(&k("rope.dimension_count"), u(c.head_dim));
        }
        "phi3" => {
            md.push(&k("rope.dimension_count"), u((c.partial_rotary_factor * c.head_dim as f64).round() as usize));
            md.push(&k("attention.sliding_window"), u(c.sliding_window.unwrap_or(0)));
        }
        "gemma2" | "gemma3" => gemma_hparams(md, llama, arch)?,
        _ => {}
    }
    rope_scaling(md, c, arch)
}

/// Gemma's soft-caps, window and layer pattern (written only when it is not llama.cpp's
/// default period: 2 for Gemma 2, 6 for Gemma 3), Gemma 3's local RoPE base.
fn gemma_hparams(md: &mut Metadata, llama: &Llama, arch: &str) -> Result<()> {
    let c = &llama.config;
    let k = |key: &str| format!("{arch}.{key}");
    if let Some(cap) = c.attn_logit_softcapping.filter(|_| arch == "gemma2") {
        md.push(&k("attn_logit_softcapping"), G::F32(cap as f32));
    }
    if let Some(cap) = c.final_logit_softcapping {
        md.push(&k("final_logit_softcapping"), G::F32(cap as f32));
    }
    md.push(&k("attention.sliding_window"), G::U32(c.sliding_window.unwrap_or(0) as u32));
    let sliding: Vec<bool> = c.layer_types.iter().map(|t| *t == super::config::LayerType::Sliding).collect();
    let pattern = |n: usize| (0..sliding.len()).map(|i| n == 0 || i % n < n - 1).collect::<Vec<_>>();
    let default = if arch == "gemma2" { 2 } else { 6 };
    if sliding != pattern(default) {
        match (0..=sliding.len()).find(|&n| pattern(n) == sliding) {
            Some(n) => md.push(&k("attention.sliding_window_pattern"), G::U32(n as u32)),
            None => md.push(&k("attention.sliding_window_pattern"), G::Array(sliding.iter().map(|&b| G::Bool(b)).collect())),
        }
    }
    if arch == "gemma3" {
        let local = c.sliding_rope.as_ref().map_or(10000.0, |r| r.theta);
        if local != 10000.0 {
            md.push(&k("rope.freq_base_swa"), G::F32(local as f32));
        }
    }
    Ok(())
}

/// `{arch}.rope.scaling.*` for the scalings llama.cpp keeps in metadata (Llama 3's and
/// longrope's travel as tensors); what `gguf.rs` cannot read back is refused here.
fn rope_scaling(md: &mut Metadata, c: &super::Config, arch: &str) -> Result<()> {
    let Some(s) = &c.rope_scaling else { return Ok(()) };
    match (&s.kind, arch) {
        (ScalingKind::Llama3(_), "llama") | (ScalingKind::LongRope { .. }, "phi3") => Ok(()),
        (ScalingKind::Linear, "qwen2" | "qwen3" | "gemma3") => {
            md.push(&format!("{arch}.rope.scaling.type"), G::String("linear".into()));
            md.push(&format!("{arch}.rope.scaling.factor"), G::F32(s.factor as f32));
            Ok(())
        }
        (kind, _) => bail!("GGUF export: RoPE scaling {kind:?} of a {arch} model is not written yet"),
    }
}

/// The `tokenizer.*` metadata, as llama.cpp's converter writes a byte-level BPE (`gpt2`) or a
/// SentencePiece (`llama`: scores, no merges) vocabulary.
fn vocab(md: &mut Metadata, v: &GgufVocab) {
    md.push("tokenizer.ggml.model", G::String(v.model.clone()));
    if let Some(pre) = &v.pre {
        md.push("tokenizer.ggml.pre", G::String(pre.clone()));
    }
    md.push("tokenizer.ggml.tokens", G::Array(v.tokens.iter().map(|t| G::String(t.clone())).collect()));
    if v.model == "llama" {
        md.push("tokenizer.ggml.scores", G::Array(v.scores.iter().map(|&s| G::F32(s)).collect()));
    }
    md.push("tokenizer.ggml.token_type", G::Array(v.token_types.iter().map(|&t| G::I32(t)).collect()));
    if v.model != "llama" {
        md.push("tokenizer.ggml.merges", G::Array(v.merges.iter().map(|m| G::String(m.clone())).collect()));
    }
    for (key, id) in [("bos_token_id", v.bos_id), ("eos_token_id", v.eos_id), ("unknown_token_id", v.unk_id), ("padding_token_id", v.pad_id)] {
        if let Some(id) = id {
            md.push(&format!("tokenizer.ggml.{key}"), G::U32(id));
        }
    }
    md.push("tokenizer.ggml.add_bos_token", G::Bool(v.add_bos));
    if v.add_eos {
        md.push("tokenizer.ggml.add_eos_token", G::Bool(true));
    }
    // SentencePiece's default is to prepend; the converter writes the key when it does not.
    if v.add_space_prefix == Some(false) {
        md.push("tokenizer.ggml.add_space_prefix", G::Bool(false));
    }
    if let Some(t) = &v.chat_template {
        md.push("tokenizer.chat_template", G::String(t.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot<'a>(name: &'a str, dims: &'a [usize], layer: Option<usize>) -> Slot<'a> {
        Slot { name, dims, layer, n_layers: 16, tied: false }
    }

    /// llama.cpp's Q4_K_M on a 16-layer model: q6_K for v/down of layers 0, 1, 4, 7, 10, 13,
    /// 14, 15 and the output, q4_K elsewhere; rows its blocks do not divide fall back.
    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let d = [4096, 4096];
        let q6: Vec<usize> = (0..16).filter(|&i| tensor_type(Quantization::Q4KM, &slot(&format!("blk.{i}.attn_v.weight"), &d, Some(i))) == GgmlDType::Q6K).collect();
        assert_eq!(q6, [0, 1, 4, 7, 10, 13, 14, 15]);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("blk.4.ffn_down.weight", &d, Some(4))), GgmlDType::Q6K);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("blk.5.ffn_down.weight", &d, Some(5))), GgmlDType::Q4K);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("blk.4.attn_q.weight", &d, Some(4))), GgmlDType::Q4K);
        assert_eq!(tensor_type(Quantization::Q5KM, &slot("blk.5.attn_q.weight", &d, Some(5))), GgmlDType::Q5K);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("output.weight", &d, None)), GgmlDType::Q6K);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("token_embd.weight", &d, None)), GgmlDType::Q4K);
        let tied = Slot { tied: true, ..slot("token_embd.weight", &[49152, 576], None) };
        assert_eq!(tensor_type(Quantization::Q4KM, &tied), GgmlDType::Q8_0, "576 columns: q6_K falls back to q8_0");
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("blk.2.attn_q.weight", &[576, 576], Some(2))), GgmlDType::Q5_0);
        assert_eq!(tensor_type(Quantization::Q5KM, &slot("blk.2.attn_q.weight", &[576, 576], Some(2))), GgmlDType::Q5_1);
        assert_eq!(tensor_type(Quantization::Q8_0, &slot("blk.2.attn_q.weight", &[64, 48], Some(2))), GgmlDType::F16);
        assert_eq!(tensor_type(Quantization::Q4KM, &slot("blk.2.attn_norm.weight", &[4096], Some(2))), GgmlDType::F32);
        assert_eq!(tensor_type(Quantization::F16, &slot("blk.2.attn_q.weight", &d, Some(2))), GgmlDType::F16);
    }

    #[test]
    fn quantization_names() {
        for s in QUANTIZATIONS.split(", ") {
            assert_eq!(Quantization::parse(s).unwrap().name(), s);
        }
        let e = Quantization::parse("q3_k_s").unwrap_err().to_string();
        assert_eq!(e, format!("unsupported GGUF quantization `q3_k_s` (supported: {QUANTIZATIONS})"));
    }
}
