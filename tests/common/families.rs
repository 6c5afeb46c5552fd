//! Tiny random checkpoints of each family with its REAL tokenizer: the golden family's config
//! and weights (`tests/golden/families/<family>/base`) with the embedding and LM head redrawn
//! for the tokenizer's vocabulary (tests/families_e2e.rs trains them, tests/export.rs exports
//! them). Tokenizers come from `tests/data/tokenizers` (Qwen3's and Gemma 3's fetched by
//! `fetch.sh`).

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The golden tiny checkpoint of `family`: vendored in tests/golden, else the shared golden data
/// beside the repository.
pub fn golden_base(family: &str) -> Option<PathBuf> {
    let rel = format!("golden/families/{family}/base");
    [root().join("tests").join(&rel), root().join("../shared").join(&rel), root().join("../../shared").join(&rel)]
        .into_iter()
        .find(|d| d.join("config.json").is_file())
}

pub fn tokenizer_dir(name: &str) -> Option<PathBuf> {
    let base = root().join("tests/data/tokenizers");
    [base.join(name), base.join("fetched").join(name)].into_iter().find(|d| d.join("tokenizer.json").is_file())
}

pub fn golden_template(name: &str) -> String {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/templates/families.json")).unwrap()).unwrap();
    g["templates"][name]["chat_template"].as_str().unwrap().to_string()
}

/// Uniform values with std 0.5 from a fixed hash (no RNG crate state): large enough that the
/// frozen LM head can express what 20 LoRA steps learn (at 0.02 the logits stay near uniform).
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let a = 0.5 * 3f32.sqrt();
    (0..n as u64)
        .map(|i| {
            let h = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

/// Write a checkpoint of `family` with `vocab` tokens into `dir`: the golden config and weights,
/// the vocabulary-sized tensors redrawn, the tokenizer files with `template`.
pub fn make_checkpoint(family: &str, tokenizer: &Path, template: &str, dir: &Path) -> anyhow::Result<()> {
    let base = golden_base(family).expect("checked by the caller");
    let tok = qscript::model::Tokenizer::from_dir(tokenizer)?.expect("tokenizer.json");
    let vocab = tok.inner.get_vocab_size(true);
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t)).map(Value::from).unwrap_or(Value::Null);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(base.join("config.json"))?)?;
    config["vocab_size"] = vocab.into();
    config["bos_token_id"] = id(&tok.bos_token);
    config["eos_token_id"] = id(&tok.eos_token);
    config["pad_token_id"] = id(&tok.pad_token);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let golden = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in golden {
        let t = match name.as_str() {
            "model.embed_tokens.weight" | "lm_head.weight" => {
                let hidden = t.dim(1)?;
                let seed = if name == "lm_head.weight" { 2 } else { 1 };
                Tensor::from_vec(random(vocab * hidden, seed), (vocab, hidden), &Device::Cpu)?
            }
            _ => t.to_dtype(DType::F32)?,
        };
        tensors.insert(name, t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;

    std::fs::copy(tokenizer.join("tokenizer.json"), dir.join("tokenizer.json"))?;
    let mut tc: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer.join("tokenizer_config.json"))?)?;
    tc["chat_template"] = template.into();
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string(&tc)?)?;
    Ok(())
}

