//! `config.json` of a Llama-family model, parsed strictly: missing required fields and other
//! architectures are errors naming the file and field.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub use super::layers::rope::Llama3Scaling;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// dtype the checkpoint was saved in (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// The raw JSON, kept so `save_pretrained` and `model.config()` lose nothing.
    pub raw: Map<String, Value>,
}

const SUPPORTED: &[&str] = &["llama"];

/// The largest value qscript accepts for a size field of config.json (or GGUF metadata): a
/// few times the largest Llama-family model's, small enough that tables sized from them fit.
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
        let arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        let is_llama = SUPPORTED.contains(&model_type) || (model_type.is_empty() && arch == "LlamaForCausalLM");
        if !is_llama {
            let name = if arch.is_empty() { model_type } else { arch };
            if name.is_empty() {
                bail!("missing required field `model_type` (expected \"llama\")");
            }
            bail!("unsupported architecture `{name}` (model_type `{model_type}`): qscript supports Llama-family models (model_type \"llama\")");
        }
        let usize_field = |k: &str| -> Result<Option<usize>> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(|x| Some(x as usize)).with_context(|| format!("field `{k}` must be a non-negative integer, got {v}")),
            }
        };
        let f64_field = |k: &str| -> Result<Option<f64>> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).with_context(|| format!("field `{k}` must be a number, got {v}")),
            }
        };
        let bool_field = |k: &str, d: bool| -> Result<bool> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_bool().with_context(|| format!("field `{k}` must be true or false, got {v}")),
            }
        };
        let required = |k: &str| -> Result<usize> {
            usize_field(k)?.with_context(|| format!("missing required field `{k}`"))
        };
        // Sizes are checked against stated bounds before anything is allocated from them (a
        // `num_hidden_layers` of 10^12 once sized a Vec; the largest Llama has 126 layers).
        let bounded = |k: &str, v: Option<usize>| -> Result<Option<usize>> {
            let max = bound(k);
            match v {
                Some(n) if n > max => bail!("field `{k}` = {n} is larger than qscript supports ({max})"),
                v => Ok(v),
            }
        };
        let required = |k: &str| -> Result<usize> { bounded(k, Some(required(k)?)).map(|v| v.unwrap_or(0)) };
        let usize_field = |k: &str| -> Result<Option<usize>> { bounded(k, usize_field(k)?) };
        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_hidden_layers = required("num_hidden_layers")?;
        let intermediate_size = required("intermediate_size")?;
        let vocab_size = required("vocab_size")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            bail!("`hidden_size` and `num_attention_heads` must be positive");
        }
        let num_key_value_heads = usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("`num_attention_heads` ({num_attention_heads}) must be a multiple of `num_key_value_heads` ({num_key_value_heads})");
        }
        let head_dim = usize_field("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim % 2 != 0 {
            bail!("`head_dim` ({head_dim}) must be even for rotary embeddings");
        }
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("unsupported `hidden_act` \"{act}\" (Llama uses \"silu\")");
            }
        }
        // transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        let rope_params = raw.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t,
            None => f64_field("rope_theta")?.unwrap_or(10000.0),
        };
        let scaling = rope_params
            .filter(|p| p.get("rope_type").and_then(Value::as_str).is_some_and(|t| t != "default"))
            .or_else(|| raw.get("rope_scaling").and_then(Value::as_object));
        let rope_scaling = scaling.map(super::layers::rope::parse_scaling).transpose()?.flatten();
        let ids = |k: &str| -> Vec<u32> {
            match raw.get(k) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
                _ => vec![],
            }
        };
        Ok(Config {
            architecture: if arch.is_empty() { "LlamaForCausalLM".into() } else { arch.into() },
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f64_field("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: bool_field("tie_word_embeddings", false)?,
            attention_bias: bool_field("attention_bias", false)?,
            mlp_bias: bool_field("mlp_bias", false)?,
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
            pad_token_id: ids("pad_token_id").first().copied(),
            torch_dtype: raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(Value::as_str).map(String::from),
            raw: raw.clone(),
        })
    }

    /// Parameter count of the model this config describes (LM head counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.attention_bias {
            attn += q + 2 * kv + h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let per_layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}
