//! GGUF files (llama.cpp): metadata → HF config, tensors dequantized to f32 with llama.cpp's
//! q/k row permutation undone, tokenizer rebuilt from the vocabulary and merges.

use super::config::Config;
use super::tokenizer::Tokenizer;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// A GGUF model read into memory under HF names (`model.layers.0.self_attn.q_proj.weight`, ...).
pub struct GgufModel {
    /// HF `config.json` equivalent (as JSON, so it can be written out verbatim).
    pub config_json: serde_json::Value,
    pub config: Config,
    /// f32 tensors on the CPU, keyed by HF names.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// generation_config.json equivalent (bos/eos/pad ids).
    pub generation_config: serde_json::Value,
}

pub fn read_gguf(_path: &Path) -> Result<GgufModel> {
    todo!("helper: GGUF reading")
}

/// Convert a GGUF file into an HF model directory (`model.safetensors` f32, `config.json`,
/// `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`), atomically.
pub fn convert_to_hf_dir(_gguf: &Path, _out: &Path) -> Result<()> {
    todo!("helper: GGUF conversion")
}
