//! Random-weight models of real shapes, for benchmarks (`qscript bench ... --shape NAME`): the
//! configurations of the Python reference (`hf_qlora_anchor.py`), weights drawn without files —
//! uniform with transformers' init std 0.02, norms at 1 — quantized while loading like any
//! checkpoint when asked.

use super::config::Config;
use super::llama::{Llama, TensorSource};
use super::{LoadOptions, Model};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// The benchmark shapes and their configs: Llama's, then one real shape per other family (the
/// anchor's `FAMILY_SHAPES`, same keys, so both sides build the same network).
pub const SHAPES: [&str; 7] = ["smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-3b", "qwen3-4b", "gemma-3-4b", "mistral-7b"];

pub fn shape_config(name: &str) -> Result<Config> {
    use serde_json::json;
    let (model_type, v) = match name {
        "smollm2-135m" => ("llama", json!({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": true})),
        "llama-3.2-1b" => ("llama", json!({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": true, "head_dim": 64})),
        "llama-3.2-3b" => ("llama", json!({"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
            "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": true, "head_dim": 128})),
        "qwen2.5-3b" => ("qwen2", json!({"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": true})),
        "qwen3-4b" => ("qwen3", json!({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": true})),
        "mistral-7b" => ("mistral", json!({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768, "rope_theta": 1000000.0, "sliding_window": null})),
        "gemma-3-4b" => ("gemma3_text", json!({"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "query_pre_attn_scalar": 256,
            "sliding_window": 1024, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "tie_word_embeddings": true, "hidden_activation": "gelu_pytorch_tanh"})),
        other => bail!("unknown shape \"{other}\" (expected one of {})", SHAPES.join(", ")),
    };
    let mut v = v;
    let o = v.as_object_mut().expect("a JSON object");
    o.insert("model_type".into(), model_type.into());
    o.insert("rms_norm_eps".into(), 1e-5.into());
    // The real checkpoints' context lengths (long-context benchmarks train at up to 32k).
    let max_pos = match name {
        "llama-3.2-1b" | "llama-3.2-3b" | "gemma-3-4b" => 131072,
        "qwen2.5-3b" | "mistral-7b" => 32768,
        "qwen3-4b" => 40960,
        _ => 8192,
    };
    o.insert("max_position_embeddings".into(), max_pos.into());
    Config::from_json(&v)
}

/// Weights made on request: a hash of (seed, name, index) per element, so the same name always
/// gives the same tensor and no file or RNG state is involved.
pub struct RandomSource {
    pub seed: u64,
}

impl RandomSource {
    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        if name.ends_with("norm.weight") {
            return vec![1.0; n];
        }
        let key = name.bytes().fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        // Uniform on [-a, a] with std 0.02: a = 0.02·√3.
        let a = 0.02 * 3f32.sqrt();
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
            for (i, x) in chunk.iter_mut().enumerate() {
                let bits = crate::kernels::lora::dropout_bits(key, c * (1 << 16) + i);
                *x = (bits as f32 / 32768.0 - 1.0) * a;
            }
        });
        v
    }
}

impl TensorSource for RandomSource {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.values(name, n), shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }
    fn has(&self, name: &str) -> bool {
        // Only plain weights exist: no biases, no bitsandbytes quantization states.
        name.ends_with(".weight")
    }
    fn stored(&self, _name: &str) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

impl Model {
    /// A random-weight model of a benchmark shape (see [`SHAPES`]), no tokenizer.
    pub fn random(shape: &str, opts: &LoadOptions) -> Result<Self> {
        let config = shape_config(shape)?;
        let llama = Llama::load_with(&config, &RandomSource { seed: 0 }, opts.dtype, &opts.device, opts.quantization.as_ref())?;
        Ok(Self {
            llama,
            tokenizer: None,
            generation_config: serde_json::json!({}),
            name_or_path: format!("random:{shape}"),
            source_path: std::path::PathBuf::new(),
            lora_config: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_reference_trainable_counts() {
        // peft's counts for r=16 on all seven projections (shared/bench/README.md).
        for (shape, want) in [("smollm2-135m", 4_884_480), ("llama-3.2-1b", 11_272_192), ("llama-3.2-3b", 24_313_856)] {
            let c = shape_config(shape).unwrap();
            let (h, q, kv, m) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
            let per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)].iter().map(|(i, o)| 16 * (i + o)).sum::<usize>();
            assert_eq!(per_layer * c.num_hidden_layers, want, "{shape}");
        }
        assert!(shape_config("llama-7b").unwrap_err().to_string().contains("smollm2-135m"));
    }

    #[test]
    fn random_weights_are_deterministic_with_the_init_scale() {
        let src = RandomSource { seed: 0 };
        let a = src.values("model.layers.0.mlp.up_proj.weight", 100_000);
        assert_eq!(a, src.values("model.layers.0.mlp.up_proj.weight", 100_000));
        assert_ne!(a, src.values("model.layers.1.mlp.up_proj.weight", 100_000));
        let std = (a.iter().map(|x| (x * x) as f64).sum::<f64>() / a.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 5e-4, "std {std}");
        assert!(src.values("model.norm.weight", 8).iter().all(|&x| x == 1.0));
    }
}
