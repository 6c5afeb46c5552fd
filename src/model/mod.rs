//! Decoder models of every supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3): config,
//! weights, the explicit forward, tokenizer, loading.

pub mod adapter;
pub mod bnb_config;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod gguf_adapter;
pub mod gguf_write;
pub mod hub;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod names;
pub mod quantized;
pub mod random;
pub mod save;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

pub use config::Config;
pub use llama::Llama;
pub use tokenizer::Tokenizer;

/// Options of `load_model` (the script layer checks the user's keys and fills this).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of the weights: F32 (default on CPU) or BF16 / F16.
    pub dtype: DType,
    pub device: Device,
    pub revision: Option<String>,
    /// `quantization_config`: quantize the decoder linears to 4 bits while loading.
    pub quantization: Option<bnb_config::BnbConfig>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, revision: None, quantization: None }
    }
}

/// A loaded model: the network, its tokenizer (optional: tiny test checkpoints have none) and
/// generation defaults.
pub struct Model {
    pub llama: Llama,
    pub tokenizer: Option<Tokenizer>,
    /// generation_config.json (empty object when absent).
    pub generation_config: serde_json::Value,
    /// What the user passed to `load_model` (hub id or path).
    pub name_or_path: String,
    /// Local directory or GGUF file the weights came from.
    pub source_path: PathBuf,
    /// The LoRA configuration of the attached adapters (`get_peft_model` / `load_adapter`).
    pub lora_config: Option<lora::LoraConfig>,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "float32" | "fp32" | "f32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        other => bail!("unknown dtype \"{other}\" (expected float32, bfloat16 or float16)"),
    })
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "other",
    }
}

fn read_json_opt(path: &Path) -> Result<serde_json::Value> {
    if !path.exists() {
        return Ok(serde_json::json!({}));
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))
}

impl Model {
    /// `load_model(id_or_path)`: an HF directory, a GGUF file, or a hub id.
    pub fn load(id_or_path: &str, opts: &LoadOptions) -> Result<Self> {
        if let Some(shape) = id_or_path.strip_prefix("random:") {
            return Self::random(shape, opts);
        }
        match hub::resolve(id_or_path, opts.revision.as_deref())? {
            hub::ModelSource::HfDir(dir) => Self::load_hf_dir(id_or_path, &dir, opts),
            hub::ModelSource::Gguf(path) => Self::load_gguf(id_or_path, &path, opts),
        }
    }

    /// The tokenizer of a model id or path (an HF directory's tokenizer files or a GGUF's
    /// vocabulary), without its weights: `load_model("random:SHAPE", #{tokenizer: ID})`.
    pub fn load_tokenizer(id_or_path: &str, revision: Option<&str>) -> Result<Tokenizer> {
        let tok = match hub::resolve(id_or_path, revision)? {
            hub::ModelSource::HfDir(dir) => Tokenizer::from_dir(&dir)?,
            hub::ModelSource::Gguf(path) => Some(gguf::read_tokenizer(&path)?),
        };
        tok.ok_or_else(|| anyhow::anyhow!("{id_or_path}: has no tokenizer"))
    }

    pub fn load_hf_dir(name: &str, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: no config.json (not an HF model directory)", dir.display());
        }
        let config = Config::from_file(&cfg_path)?;
        let weights = weights::WeightFiles::open_dir(dir)?;
        let quant = Self::checkpoint_quantization(&config, &cfg_path, opts)?;
        let llama = if config.nested_text_config {
            // A multimodal checkpoint: its language model only (the vision tower is skipped).
            let lm = llama::LanguageModel::new(&weights).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            Llama::load_with(&config, &lm, opts.dtype, &opts.device, quant.as_ref())?
        } else {
            Llama::load_with(&config, &weights, opts.dtype, &opts.device, quant.as_ref())?
        };
        let tokenizer = Tokenizer::from_dir(dir)?;
        let generation_config = read_json_opt(&dir.join("generation_config.json"))?;
        Ok(Self { llama, tokenizer, generation_config, name_or_path: name.to_string(), source_path: dir.to_path_buf(), lora_config: None })
    }

    pub fn load_gguf(name: &str, path: &Path, opts: &LoadOptions) -> Result<Self> {
        let g = gguf::read_gguf(path)?;
        let llama = Llama::load_with(&g.config, &g.tensors, opts.dtype, &opts.device, opts.quantization.as_ref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            llama,
            tokenizer: g.tokenizer,
            generation_config: g.generation_config,
            name_or_path: name.to_string(),
            source_path: path.to_path_buf(),
            lora_config: None,
        })
    }

    /// The 4-bit settings to load with: a checkpoint saved in 4 bits (config.json's
    /// `quantization_config`) keeps its own, except that a compute dtype the caller asked for
    /// wins; otherwise the caller's options (quantize while loading) or none.
    fn checkpoint_quantization(config: &Config, cfg_path: &Path, opts: &LoadOptions) -> Result<Option<bnb_config::BnbConfig>> {
        let Some(v) = config.raw.get("quantization_config").filter(|v| !v.is_null()) else {
            return Ok(opts.quantization.clone());
        };
        let mut q = bnb_config::BnbConfig::from_transformers_json(v).map_err(|e| anyhow::anyhow!("{}: {e:#}", cfg_path.display()))?;
        if let Some(user) = &opts.quantization {
            q.compute_dtype = user.compute_dtype;
        }
        Ok(Some(q))
    }

    pub fn config(&self) -> &Config {
        &self.llama.config
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| format!("model `{}` has no tokenizer (no tokenizer.json next to its weights)", self.name_or_path))
    }

    /// Token ids that end generation: generation_config's `eos_token_id` (int or list), else
    /// config.json's, plus the tokenizer's eos token.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = match self.generation_config.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|x| x as u32).collect(),
            _ => self.config().eos_token_ids.clone(),
        };
        if let Some(t) = &self.tokenizer {
            if let Some(id) = t.eos_token.as_deref().and_then(|e| t.token_to_id(e)) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Check token ids against the vocabulary before they reach the embedding.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
            bail!("token id {bad} is out of range for vocab_size {v}");
        }
        Ok(())
    }

    /// Logits `[seq, vocab]` (f32) of one sequence, no cache.
    pub fn forward_ids(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        anyhow::ensure!(!ids.is_empty(), "forward: empty id list");
        self.check_ids(ids)?;
        let t = candle_core::Tensor::new(ids, &self.llama.device)?.unsqueeze(0)?;
        let logits = self.llama.forward(&t, None, false)?;
        Ok(logits.squeeze(0)?.to_vec2::<f32>()?)
    }

    /// Bytes held by weights, by kind (4-bit decoder linears: packed codes and statistics
    /// apart; kinds the model does not have are left out, except the first four).
    pub fn memory_by_kind(&self) -> Vec<(&'static str, usize)> {
        let bytes = |t: &candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let l = &self.llama;
        let (mut linear, mut packed, mut stats, mut adapters) = (0, 0, 0, 0);
        let norm = bytes(&l.norm.weight) + l.norms().map(|(_, n)| bytes(&n.weight)).sum::<usize>();
        for (_, lin) in l.linears() {
            let (d, p, s) = quantized::weight_bytes(lin);
            linear += d + lin.bias.as_ref().map_or(0, bytes);
            packed += p;
            stats += s;
            adapters += lin.lora.as_ref().map_or(0, |o| bytes(&o.a) + bytes(&o.b));
        }
        let head = l.lm_head.as_ref().map_or(0, |h| {
            let (d, p, s) = quantized::weight_bytes(h);
            d + p + s + h.bias.as_ref().map_or(0, bytes)
        });
        let mut out = vec![("embeddings", bytes(&l.embed_tokens)), ("decoder linears", linear), ("norms", norm), ("lm_head", head)];
        if packed > 0 {
            out.insert(2, ("4-bit weights", packed));
            out.insert(3, ("4-bit stats", stats));
        }
        if adapters > 0 {
            out.push(("lora adapters", adapters));
        }
        out
    }

    /// transformers' `get_memory_footprint()`: bytes of all parameters and buffers. A 4-bit
    /// weight counts as its packed bytes (the parameter bnb holds); its statistics live in
    /// the quant state, which is neither, so they are not counted (see `memory_by_kind`).
    /// The one buffer of a Llama is RoPE's `inv_freq` (f32, head_dim / 2).
    pub fn memory_footprint(&self) -> usize {
        let kinds = self.memory_by_kind();
        let params: usize = kinds.iter().filter(|(k, _)| *k != "4-bit stats").map(|(_, b)| b).sum();
        params + 4 * (self.config().head_dim / 2)
    }
}
