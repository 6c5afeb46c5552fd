//! The Llama forward against transformers' logits, KV-cache consistency, and bad checkpoints.

use candle_core::{DType, Device, Tensor};
use qscript::model::{LoadOptions, Model};
use std::path::{Path, PathBuf};

fn golden(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(p)
}

fn load_base(dtype: DType) -> Model {
    let opts = LoadOptions { dtype, ..Default::default() };
    Model::load_hf_dir("peft-base", &golden("peft/1/base"), &opts).unwrap()
}

fn golden_logits(name: &str) -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(golden("peft/1/logits.safetensors"), &Device::Cpu).unwrap();
    (t["ids"].to_dtype(DType::U32).unwrap(), t[name].clone())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn logits_match_transformers_f32() {
    let m = load_base(DType::F32);
    let (ids, want) = golden_logits("logits_base");
    let got = m.llama.forward(&ids, None, false).unwrap();
    assert_eq!(got.dims(), want.dims());
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "max abs diff {d}");
}

#[test]
fn forward_ids_matches_batched_forward() {
    let m = load_base(DType::F32);
    let (ids, want) = golden_logits("logits_base");
    let row: Vec<u32> = ids.get(1).unwrap().to_vec1().unwrap();
    let got = m.forward_ids(&row).unwrap();
    let got = Tensor::new(got, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got, &want.get(1).unwrap()) <= 1e-4);
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let m = load_base(DType::F32);
    let (ids, _) = golden_logits("logits_base");
    let ids = ids.get(0).unwrap().unsqueeze(0).unwrap(); // [1, 16]
    let full = m.llama.forward(&ids, None, false).unwrap(); // [1, 16, V]
    let mut cache = m.llama.new_cache();
    // Prefill 10 tokens, then decode the remaining 6 one at a time.
    let first = m.llama.forward(&ids.narrow(1, 0, 10).unwrap(), Some(&mut cache), true).unwrap();
    assert!(max_abs_diff(&first.squeeze(1).unwrap(), &full.get_on_dim(1, 9).unwrap()) < 1e-5);
    for t in 10..16 {
        let step = m.llama.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache), true).unwrap();
        let d = max_abs_diff(&step.squeeze(1).unwrap(), &full.get_on_dim(1, t).unwrap());
        assert!(d < 1e-5, "position {t}: {d}");
    }
    assert_eq!(cache.len(), 16);
}

#[test]
fn bf16_forward_stays_close() {
    let m = load_base(DType::BF16);
    let (ids, want) = golden_logits("logits_base");
    let got = m.llama.forward(&ids, None, false).unwrap();
    let d = max_abs_diff(&got, &want);
    // bf16 keeps 8 bits of mantissa: relative error ~4e-3 per op over two layers.
    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d <= 0.05 * scale.max(1.0), "bf16 max abs diff {d} (logit scale {scale})");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match Model::load_hf_dir("x", dir, &LoadOptions::default()) {
        Ok(_) => panic!("expected an error loading {}", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&golden("peft/1/base"), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn config_without_required_field_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&golden("peft/1/base"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&golden("peft/1/base"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["model_type"] = "gpt2".into();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("GPT2LMHeadModel") && e.contains("unsupported architecture"), "{e}");
}

#[test]
fn wrong_tensor_shape_names_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&golden("peft/1/base"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["intermediate_size"] = 96.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"), "{e}");
}

#[test]
fn missing_directory_is_a_clear_error() {
    let e = load_err(Path::new("/nonexistent/model/dir"));
    assert!(e.contains("/nonexistent/model/dir"), "{e}");
}

#[test]
fn llama3_rope_scaling_is_applied() {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("peft/1/base/config.json")).unwrap()).unwrap();
    v["head_dim"] = 64.into();
    v["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let c = qscript::model::Config::from_json(&v).unwrap();
    let s = c.rope_scaling.as_ref().expect("llama3 scaling parsed");
    assert_eq!(s.factor, 32.0);
    let inv = c.rope_inv_freq();
    // High frequencies unchanged, low frequencies divided by the factor (transformers' formula).
    let plain = |i: usize| 1.0f32 / 500000f32.powf((2 * i) as f32 / 64.0);
    assert!((inv[0] - plain(0)).abs() < 1e-7);
    assert!((inv[31] - plain(31) / 32.0).abs() / inv[31] < 1e-5);
}

/// Forward `ids` `[1, n]` through a KV cache in the given chunk sizes; logits of every position.
fn chunked_logits(m: &Model, ids: &Tensor, chunks: &[usize]) -> Vec<Tensor> {
    let mut cache = m.llama.new_cache();
    let mut out = Vec::new();
    let mut pos = 0;
    for &c in chunks {
        let logits = m.llama.forward(&ids.narrow(1, pos, c).unwrap(), Some(&mut cache), false).unwrap();
        pos += c;
        assert_eq!(cache.len(), pos);
        for i in 0..c {
            out.push(logits.get_on_dim(1, i).unwrap().squeeze(0).unwrap());
        }
    }
    out
}

#[test]
fn kv_cache_chunks_after_cached_positions_equal_full_forward() {
    // Prefill chunks that start after cached positions (causal mask with an offset), single
    // decode steps in between, and a cache that outgrows its first buffer (64 positions).
    let m = load_base(DType::F32);
    let ids: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 256).collect();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = m.llama.forward(&ids, None, false).unwrap().squeeze(0).unwrap(); // [100, V]
    let chunks = [5, 4, 1, 1, 50, 1, 30, 1, 1, 6];
    assert_eq!(chunks.iter().sum::<usize>(), 100);
    for (i, got) in chunked_logits(&m, &ids, &chunks).iter().enumerate() {
        let d = max_abs_diff(got, &full.get(i).unwrap());
        assert!(d < 1e-5, "position {i}: {d}");
    }
}

#[test]
fn bf16_kv_cache_decode_equals_full_forward() {
    // bf16 keeps the tensor cache (concatenation) and candle's mask + softmax.
    let m = load_base(DType::BF16);
    let (ids, _) = golden_logits("logits_base");
    let ids = ids.get(0).unwrap().unsqueeze(0).unwrap(); // [1, 16]
    let full = m.llama.forward(&ids, None, false).unwrap().squeeze(0).unwrap();
    let scale = full.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    for (i, got) in chunked_logits(&m, &ids, &[6, 1, 1, 5, 1, 1, 1]).iter().enumerate() {
        let d = max_abs_diff(got, &full.get(i).unwrap());
        assert!(d <= 0.02 * scale.max(1.0), "position {i}: {d} (logit scale {scale})");
    }
}

#[test]
fn long_prefill_equals_token_by_token_decode() {
    // 300 tokens in one forward, and as a 260-token chunk after 40 cached positions (the KV
    // buffer grows mid-way); single-token decoding (the slice kernels) is the reference.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&golden("peft/1/base"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["max_position_embeddings"] = 512.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let m = Model::load_hf_dir("long", tmp.path(), &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 61 + 7) % 256).collect();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let steps = chunked_logits(&m, &ids, &[1; 300]);
    let full = m.llama.forward(&ids, None, false).unwrap().squeeze(0).unwrap();
    let chunked = chunked_logits(&m, &ids, &[40, 260]);
    for (i, want) in steps.iter().enumerate() {
        let d = max_abs_diff(&full.get(i).unwrap(), want);
        assert!(d < 1e-5, "full forward, position {i}: {d}");
        let d = max_abs_diff(&chunked[i], want);
        assert!(d < 1e-5, "40 + 260 chunks, position {i}: {d}");
    }
}
