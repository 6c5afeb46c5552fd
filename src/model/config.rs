//! `config.json` of a decoder model, parsed strictly into what the layers read: the family
//! (`model_type`, see `names.rs`), the shapes, and each family's variants — biases, the MLP's
//! activation, Gemma's `(1 + w)` norms, embedding scale, soft-capping and attention scale,
//! sliding windows per layer, RoPE per layer type. Missing required fields, unknown
//! architectures and bad values are errors naming the field. `raw` keeps the JSON as given
//! (`save_pretrained` writes it back).

use super::names::{Family, Proj, Windows};
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub use super::layers::rope::{Llama3Scaling, RopeParams, RopeScaling};
pub use crate::kernels::glu::Activation;

/// What kind of attention a decoder layer has (config.json's `layer_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    /// Attends through `sliding_window` and uses the sliding layers' RoPE.
    Sliding,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: String,
    pub model_type: String,
    pub family: &'static Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// RoPE of full-attention layers (every layer unless `sliding_rope`).
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// RoPE of sliding layers when it differs (Gemma 3's local base).
    pub sliding_rope: Option<RopeParams>,
    /// The share of each head that is rotated (Phi-4-mini: 0.75).
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o.
    pub attention_bias: bool,
    /// Bias on q/k/v only (Qwen2).
    pub qkv_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    /// Gemma's norms: `x̂ · (1 + w)`.
    pub norm_plus_one: bool,
    /// Embeddings × this (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// Attention scores × this (default `head_dim^-0.5`; Gemma: `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    /// One per layer.
    pub layer_types: Vec<LayerType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// dtype the checkpoint was saved in (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// A `gemma3` (multimodal) checkpoint: the language model's weights sit under another
    /// prefix (`model.language_model.` or `language_model.model.`).
    pub nested_text_config: bool,
    /// The raw JSON, kept so `save_pretrained` and `model.config()` lose nothing (for a
    /// multimodal checkpoint: its text config, as a text-only model's config.json).
    pub raw: Map<String, Value>,
}

/// Field readers over one JSON object, errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    /// Sizes are checked against [`bound`] before anything is allocated from them (a
    /// `num_hidden_layers` of 10^12 once sized a Vec).
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        let n = self.get(k).map(|v| v.as_u64().map(|x| x as usize).with_context(|| format!("field `{k}` must be a non-negative integer, got {v}"))).transpose()?;
        match n {
            Some(n) if n > bound(k) => bail!("field `{k}` = {n} is larger than qscript supports ({})", bound(k)),
            n => Ok(n),
        }
    }
    fn f64(&self, k: &str) -> Result<Option<f64>> {
        self.get(k).map(|v| v.as_f64().with_context(|| format!("field `{k}` must be a number, got {v}"))).transpose()
    }
    fn bool(&self, k: &str, d: bool) -> Result<bool> {
        self.get(k).map_or(Ok(d), |v| v.as_bool().with_context(|| format!("field `{k}` must be true or false, got {v}")))
    }
    fn str(&self, k: &str) -> Result<Option<&str>> {
        self.get(k).map(|v| v.as_str().with_context(|| format!("field `{k}` must be a string, got {v}"))).transpose()
    }
    fn required(&self, k: &str) -> Result<usize> {
        self.usize(k)?.with_context(|| format!("missing required field `{k}`"))
    }
    fn ids(&self, k: &str) -> Vec<u32> {
        match self.get(k) {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        }
    }
}

/// The largest value qscript accepts for a size field of config.json (or GGUF metadata): a
/// few times the largest supported model's, small enough that tables sized from them fit.
pub fn bound(field: &str) -> usize {
    match field {
        "hidden_size" => 1 << 16,
        "intermediate_size" => 1 << 18,
        "num_hidden_layers" => 1024,
        "num_attention_heads" | "num_key_value_heads" | "head_dim" => 1024,
        "vocab_size" => 1 << 22,
        "max_position_embeddings" => 1 << 24,
        _ => usize::MAX,
    }
}

/// `Gemma3TextConfig`'s defaults: a multimodal checkpoint's `text_config` leaves many out.
fn gemma3_text_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 4096,
        "max_position_embeddings": 131072, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
    });
    v.as_object().cloned().unwrap_or_default()
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column())
        })?;
        Self::from_json(&value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let Some(raw) = value.as_object() else { bail!("config must be a JSON object") };
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = raw.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("");
        // A Gemma 3 multimodal checkpoint: the language model's config is `text_config`.
        if model_type == "gemma3" {
            let text = raw.get("text_config").and_then(Value::as_object).context("model_type `gemma3`: missing `text_config` (the language model's config)")?;
            let mut text = text.clone();
            text.insert("model_type".into(), "gemma3_text".into());
            text.insert("architectures".into(), serde_json::json!(["Gemma3ForCausalLM"]));
            for k in ["torch_dtype", "dtype", "quantization_config", "eos_token_id", "bos_token_id", "pad_token_id"] {
                if let (false, Some(v)) = (text.contains_key(k), raw.get(k)) {
                    text.insert(k.into(), v.clone());
                }
            }
            let mut c = Self::from_json(&Value::Object(text)).context("`text_config`")?;
            c.nested_text_config = true;
            return Ok(c);
        }
        let model_type = if model_type.is_empty() && arch == "LlamaForCausalLM" { "llama" } else { model_type };
        let Some(family) = Family::named(model_type) else {
            if model_type.is_empty() {
                bail!("missing required field `model_type` (supported: {})", Family::supported());
            }
            let name = if arch.is_empty() { String::new() } else { format!("`{arch}` ") };
            bail!("unsupported architecture {name}(model_type `{model_type}`): qscript supports model_type {}", Family::supported());
        };
        let mut filled = raw.clone();
        if model_type == "gemma3_text" {
            for (k, v) in gemma3_text_defaults() {
                filled.entry(k).or_insert(v);
            }
        }
        let mut c = Self::parse(&Fields(&filled), family)?;
        c.architecture = if arch.is_empty() { "LlamaForCausalLM".into() } else { arch.into() };
        c.model_type = model_type.into();
        c.raw = raw.clone();
        Ok(c)
    }

    /// The fields every family shares, then the family's own.
    fn parse(f: &Fields, family: &'static Family) -> Result<Self> {
        let hidden_size = f.required("hidden_size")?;
        let num_attention_heads = f.required("num_attention_heads")?;
        let num_hidden_layers = f.required("num_hidden_layers")?;
        let intermediate_size = f.required("intermediate_size")?;
        let vocab_size = f.required("vocab_size")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            bail!("`hidden_size` and `num_attention_heads` must be positive");
        }
        let num_key_value_heads = f.usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})");
        }
        let head_dim = f.usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            bail!("`head_dim` ({head_dim}) must be even for rotary embeddings");
        }
        let act_key = if f.get("hidden_activation").is_some() { "hidden_activation" } else { "hidden_act" };
        let hidden_act = match f.str(act_key)? {
            Some(a) => Activation::parse(a).with_context(|| format!("field `{act_key}`"))?,
            None if family.gemma => Activation::GeluTanh,
            None => Activation::Silu,
        };
        let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(2048);
        let (rope, sliding_rope, partial_rotary_factor) = super::layers::rope::parse_config(f.0, head_dim, max_position_embeddings)?;
        let (sliding_window, layer_types) = windows(f, family, num_hidden_layers)?;
        let gemma = family.gemma;
        let softcap = |k: &str| -> Result<Option<f64>> { Ok(if gemma { f.f64(k)? } else { None }) };
        let attn_scale = match f.f64("query_pre_attn_scalar")? {
            Some(s) if gemma && s > 0.0 => s.powf(-0.5),
            Some(s) if gemma => bail!("field `query_pre_attn_scalar` must be positive, got {s}"),
            _ => (head_dim as f64).powf(-0.5),
        };
        Ok(Config {
            architecture: String::new(),
            model_type: String::new(),
            family,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            sliding_rope,
            partial_rotary_factor,
            max_position_embeddings,
            tie_word_embeddings: f.bool("tie_word_embeddings", gemma)?,
            attention_bias: f.bool("attention_bias", false)?,
            qkv_bias: family.qkv_bias,
            mlp_bias: f.bool("mlp_bias", false)?,
            hidden_act,
            norm_plus_one: gemma,
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            attn_scale,
            attn_logit_softcapping: softcap("attn_logit_softcapping")?,
            final_logit_softcapping: softcap("final_logit_softcapping")?,
            sliding_window,
            layer_types,
            bos_token_id: f.ids("bos_token_id").first().copied(),
            eos_token_ids: f.ids("eos_token_id"),
            pad_token_id: f.ids("pad_token_id").first().copied(),
            torch_dtype: f.str("torch_dtype").ok().flatten().or_else(|| f.str("dtype").ok().flatten()).map(String::from),
            nested_text_config: false,
            raw: Map::new(),
        })
    }

    /// Whether projection `p` has a bias.
    pub fn has_bias(&self, p: Proj) -> bool {
        match p {
            Proj::Q | Proj::K | Proj::V | Proj::Qkv => self.attention_bias || self.qkv_bias,
            Proj::O => self.attention_bias,
            Proj::Gate | Proj::Up | Proj::Down | Proj::GateUp => self.mlp_bias,
        }
    }

    /// The sliding window of layer `i` (`None`: full attention).
    pub fn window(&self, i: usize) -> Option<usize> {
        (self.layer_types.get(i) == Some(&LayerType::Sliding)).then_some(self.sliding_window).flatten()
    }

    /// Whether this is a plain Llama network (what the fused CUDA decode runs).
    pub fn is_plain_llama(&self) -> bool {
        let f = self.family;
        f.projs == super::names::LLAMA.projs
            && f.norms == super::names::LLAMA.norms
            && !self.qkv_bias
            && self.hidden_act == Activation::Silu
            && !self.norm_plus_one
            && self.embed_scale.is_none()
            && (self.attn_scale - (self.head_dim as f64).powf(-0.5)).abs() < 1e-12
            && self.attn_logit_softcapping.is_none()
            && self.final_logit_softcapping.is_none()
            && (0..self.num_hidden_layers).all(|i| self.window(i).is_none())
            && self.sliding_rope.is_none()
            && self.partial_rotary_factor == 1.0
            && self.rope_scaling.as_ref().is_none_or(|s| s.is_static())
    }

    /// Parameter count of the model this config describes (LM head counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.has_bias(Proj::Q) {
            attn += q + 2 * kv;
        }
        if self.has_bias(Proj::O) {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let norms: usize = self.family.norms.iter().map(|n| if matches!(n, super::names::Norm::QNorm | super::names::Norm::KNorm) { self.head_dim } else { h }).sum();
        let per_layer = attn + mlp + norms;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}

/// `sliding_window` (when some layer uses it) and each layer's type, by the family's rule.
fn windows(f: &Fields, family: &Family, n_layers: usize) -> Result<(Option<usize>, Vec<LayerType>)> {
    let window = f.usize("sliding_window")?.filter(|&w| w > 0);
    let enabled = match family.windows {
        Windows::Never => false,
        Windows::WhenEnabled => f.bool("use_sliding_window", false)?,
        Windows::AllLayers | Windows::Pattern(_) => true,
    };
    let Some(window) = window.filter(|_| enabled) else { return Ok((None, vec![LayerType::Full; n_layers])) };
    let types = match f.get("layer_types") {
        Some(Value::Array(a)) => {
            if a.len() != n_layers {
                bail!("field `layer_types` has {} entries for {n_layers} layers", a.len());
            }
            a.iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(LayerType::Full),
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    _ => bail!("field `layer_types`: unsupported entry {t} (expected \"full_attention\" or \"sliding_attention\")"),
                })
                .collect::<Result<Vec<_>>>()?
        }
        Some(v) => bail!("field `layer_types` must be a list, got {v}"),
        None => (0..n_layers).map(|i| default_layer_type(f, family, i)).collect::<Result<_>>()?,
    };
    Ok((Some(window), types))
}

/// transformers' default `layer_types` entry of layer `i`.
fn default_layer_type(f: &Fields, family: &Family, i: usize) -> Result<LayerType> {
    let sliding = match family.windows {
        Windows::Never => false,
        Windows::AllLayers => true,
        Windows::WhenEnabled => i >= f.usize("max_window_layers")?.unwrap_or(28),
        Windows::Pattern(default) => {
            let n = f.usize("sliding_window_pattern")?.or(f.usize("_sliding_window_pattern")?).unwrap_or(default).max(1);
            !(i + 1).is_multiple_of(n)
        }
    };
    Ok(if sliding { LayerType::Sliding } else { LayerType::Full })
}
