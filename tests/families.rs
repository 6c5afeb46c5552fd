//! Every model family against transformers + peft (`tests/golden/families/<family>/`, see the
//! README there): a tiny random checkpoint of each (llama as the control, qwen2, qwen3,
//! mistral, gemma2, gemma3, phi3) loads, its base and adapted logits, masked loss and every
//! LoRA gradient match the golden ones; the adapter saved by qscript reloads to the same
//! logits; merge_and_unload gives the adapted logits and its save_pretrained reloads to them;
//! NF4 loading stays close to the dense model; decoding through the KV cache gives the full
//! forward's logits (sliding windows and per-layer RoPE included).

use candle_core::{DType, Device, Tensor};
use qscript::model::engine::{StepOptions, TrainBatch};
use qscript::model::quantized::BnbConfig;
use qscript::model::{adapter, names, save, Config, LoadOptions, Model};
use qscript::quant::QuantType;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::autograd::{assert_close, randn};

const FAMILIES: [&str; 7] = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"];
const LOGIT_TOL: f32 = 1e-4;

fn dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/families").join(family)
}

struct Golden {
    t: HashMap<String, Tensor>,
    ids: Vec<u32>,
    labels: Vec<i64>,
    /// Row 1's real tokens (the rest is padding).
    len1: usize,
}

fn golden(family: &str) -> Golden {
    let t = candle_core::safetensors::load(dir(family).join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = t["ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    let labels = t["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
    let len1 = t["lengths"].to_vec1::<i64>().unwrap()[1] as usize;
    Golden { t, ids, labels, len1 }
}

fn load(path: &Path, quantization: Option<BnbConfig>) -> Model {
    Model::load_hf_dir("golden", path, &LoadOptions { quantization, ..Default::default() }).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

fn logits(m: &Model, g: &Golden) -> Tensor {
    let ids = Tensor::from_vec(g.ids.clone(), (2, g.ids.len() / 2), &Device::Cpu).unwrap();
    m.llama.forward(&ids, None, false).unwrap()
}

/// The largest |a − b| over the positions users see: row 0, and row 1 before its padding.
fn max_diff(a: &Tensor, b: &Tensor, len1: usize) -> f32 {
    let d = |r: usize, n: usize| -> f32 {
        let x = a.get(r).unwrap().narrow(0, 0, n).unwrap();
        let y = b.get(r).unwrap().narrow(0, 0, n).unwrap();
        (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    d(0, a.dim(1).unwrap()).max(d(1, len1))
}

fn check_logits(what: &str, got: &Tensor, want: &Tensor, len1: usize, tol: f32) -> f32 {
    let e = max_diff(got, want, len1);
    assert!(e <= tol, "{what}: logits differ by {e} (tolerance {tol})");
    e
}

#[test]
fn base_and_adapted_logits_match_transformers() {
    for f in FAMILIES {
        let g = golden(f);
        let mut m = load(&dir(f).join("base"), None);
        assert_eq!(m.llama.family().name, f, "family of {f}");
        let eb = check_logits(&format!("{f} base"), &logits(&m, &g), &g.t["logits_base"], g.len1, LOGIT_TOL);
        adapter::load_adapter(&mut m.llama, &dir(f).join("adapter")).unwrap();
        let ea = check_logits(&format!("{f} adapted"), &logits(&m, &g), &g.t["logits_adapted"], g.len1, LOGIT_TOL);
        eprintln!("{f}: base logits max |Δ| {eb:.2e}, adapted {ea:.2e}");
    }
}

/// The golden batch as a training batch: HF's shift, row 1's padding as segment 0.
fn batch(g: &Golden) -> TrainBatch {
    let t = g.ids.len() / 2;
    let seg: Vec<u32> = (0..2 * t).map(|i| u32::from(i < t || i - t < g.len1)).collect();
    TrainBatch::new(2, t, &g.ids, &g.labels, None, Some(&seg), &Device::Cpu).unwrap()
}

#[test]
fn loss_and_lora_gradients_match_peft() {
    for f in FAMILIES {
        let g = golden(f);
        let mut m = load(&dir(f).join("base"), None);
        adapter::load_adapter(&mut m.llama, &dir(f).join("adapter")).unwrap();
        for checkpointing in [false, true] {
            let opts = StepOptions { train: true, gradient_checkpointing: checkpointing, offload_checkpoints: false, grad_scale: None };
            let out = m.llama.forward_backward(&batch(&g), &opts, &mut rand::rngs::StdRng::seed_from_u64(0)).unwrap();
            let want = g.t["loss"].to_vec1::<f32>().unwrap()[0] as f64;
            let el = (out.mean_loss() - want).abs();
            assert!(el <= 1e-5, "{f}: loss {} vs {want}", out.mean_loss());
            let n_adapters = m.llama.adapters().count();
            assert_eq!(out.grads.len(), n_adapters, "{f}: one gradient per adapter");
            let mut worst: f64 = 0.0;
            for lg in &out.grads {
                let path = lg.id().path();
                for (half, got) in [(names::LoraHalf::A, &lg.da), (names::LoraHalf::B, &lg.db)] {
                    let key = format!("grad.{}", names::peft_key(&path, half).trim_start_matches(names::PEFT_PREFIX));
                    let want = g.t.get(&key).unwrap_or_else(|| panic!("{f}: no golden {key}"));
                    let diff = (got.to_dtype(DType::F32).unwrap() - want).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                    let norm = want.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                    let rel = (diff / norm.max(1e-12)) as f64;
                    assert!(rel <= 1e-4, "{f}: gradient {key} differs by {rel:.2e} of its norm");
                    worst = worst.max(rel);
                }
            }
            eprintln!("{f} (checkpointing {checkpointing}): loss |Δ| {el:.2e}, worst gradient {worst:.2e} of its norm");
        }
    }
}

#[test]
fn adapters_save_reload_merge_and_save_pretrained() {
    for f in FAMILIES {
        let g = golden(f);
        let mut m = load(&dir(f).join("base"), None);
        let cfg = adapter::load_adapter(&mut m.llama, &dir(f).join("adapter")).unwrap();
        let adapted = logits(&m, &g);
        // qscript's adapter files reload to the same logits, and hold peft's keys.
        let tmp = tempfile::tempdir().unwrap();
        adapter::save_adapter(&m.llama, &cfg, "", &tmp.path().join("adapter")).unwrap();
        let theirs = candle_core::safetensors::load(dir(f).join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
        let ours = candle_core::safetensors::load(tmp.path().join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
        let mut keys: Vec<&String> = ours.keys().collect();
        let mut want: Vec<&String> = theirs.keys().collect();
        keys.sort();
        want.sort();
        assert_eq!(keys, want, "{f}: adapter keys");
        let mut back = load(&dir(f).join("base"), None);
        adapter::load_adapter(&mut back.llama, &tmp.path().join("adapter")).unwrap();
        check_logits(&format!("{f} reloaded adapter"), &logits(&back, &g), &adapted, g.len1, 1e-6);
        // Merged: the adapted logits; its save_pretrained reloads to them.
        let n = adapter::merge_and_unload(&mut m.llama).unwrap();
        assert_eq!(n, theirs.len() / 2, "{f}: every adapter merged");
        let em = check_logits(&format!("{f} merged"), &logits(&m, &g), &g.t["logits_adapted"], g.len1, LOGIT_TOL);
        save::save_model_dir(&m, &tmp.path().join("merged")).unwrap();
        let merged = load(&tmp.path().join("merged"), None);
        check_logits(&format!("{f} merged, saved, reloaded"), &logits(&merged, &g), &logits(&m, &g), g.len1, 1e-6);
        assert_eq!(merged.config().raw.get("model_type"), m.config().raw.get("model_type"));
        eprintln!("{f}: merged logits max |Δ| {em:.2e}");
    }
}

/// NF4 and FP4 (double quant, f32 compute) while loading, every decoder linear (fused ones
/// too): the 4-bit model's logits and QLoRA step (loss, every LoRA gradient) are the dense
/// model's on its dequantized weights; its save_pretrained reloads in 4 bits; and NF4 logits
/// stay near the original's. That bound is loose on purpose: these random models have
/// logits of ±0.7 and 4-bit rounding of their N(0, 0.02)-like weights moves them by 0.09–0.29
/// (measured, largest |Δ| / largest |logit|: llama 0.14, qwen2 0.16, qwen3 0.18, mistral 0.17,
/// gemma2 0.33, gemma3 0.45, phi3 0.13); the bound is 0.6.
#[test]
fn four_bit_bases_quantize_every_linear_train_and_save() {
    for f in FAMILIES {
        let g = golden(f);
        for quant_type in [QuantType::Nf4, QuantType::Fp4] {
            let q = BnbConfig { quant_type, double_quant: true, compute_dtype: DType::F32, ..Default::default() };
            let mut m = load(&dir(f).join("base"), Some(q));
            assert!(m.llama.linears().all(|(_, l)| l.quantized().is_some()), "{f}: every decoder linear in 4 bits");
            let got = logits(&m, &g);
            let mut dense = load(&dir(f).join("base"), None);
            let deq: Vec<Tensor> = m.llama.linears().map(|(_, l)| l.dense_weight().unwrap()).collect();
            for ((_, l), w) in dense.llama.linears_mut().zip(deq) {
                l.weight = qscript::model::llama::Weight::Dense(w);
            }
            let what = format!("{f} {quant_type:?}");
            check_logits(&format!("{what} vs its dequantized weights"), &got, &logits(&dense, &g), g.len1, 1e-5);
            // QLoRA: the training step on the 4-bit base is the dense one on its dequantized weights.
            for model in [&mut m, &mut dense] {
                adapter::load_adapter(&mut model.llama, &dir(f).join("adapter")).unwrap();
            }
            let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
            let run = |model: &Model| model.llama.forward_backward(&batch(&g), &opts, &mut rand::rngs::StdRng::seed_from_u64(0)).unwrap();
            let (oq, od) = (run(&m), run(&dense));
            assert!((oq.mean_loss() - od.mean_loss()).abs() < 1e-5, "{what}: QLoRA loss {} vs {}", oq.mean_loss(), od.mean_loss());
            for (a, b) in oq.grads.iter().zip(&od.grads) {
                assert_eq!(a.id(), b.id());
                assert_close(&format!("{what} {:?} dB", a.id()), &a.db, &b.db, 1e-4);
                assert_close(&format!("{what} {:?} dA", a.id()), &a.da, &b.da, 1e-4);
            }
            if quant_type == QuantType::Nf4 {
                let e = max_diff(&got, &g.t["logits_base"], g.len1);
                let scale = g.t["logits_base"].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                eprintln!("{f}: nf4 logits max |Δ| {e:.3} (largest logit {scale:.2}, ratio {:.2})", e / scale);
                assert!(e <= 0.6 * scale, "{f}: nf4 logits differ by {e}");
            }
            // Its save_pretrained (bnb layout; a model without adapters) reloads in 4 bits to the same logits.
            let m = load(&dir(f).join("base"), Some(BnbConfig { quant_type, double_quant: true, compute_dtype: DType::F32, ..Default::default() }));
            let tmp = tempfile::tempdir().unwrap();
            save::save_model_dir(&m, tmp.path()).unwrap();
            let back = load(tmp.path(), None);
            assert!(back.llama.linears().all(|(_, l)| l.quantized().is_some_and(|q| q.state.quant_type == quant_type)), "{what}: reloaded in 4 bits");
            check_logits(&format!("{what} saved and reloaded"), &logits(&back, &g), &got, g.len1, 1e-6);
        }
    }
}

/// Row 0 through the KV cache — a prefill of 5, then one token at a time (the CPU decode
/// step on the buffered cache, or the tensor path where it declines) — against the full
/// forward: windows of 8 and the sliding layers' RoPE show past position 8.
#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    for f in FAMILIES {
        let g = golden(f);
        let mut m = load(&dir(f).join("base"), None);
        adapter::load_adapter(&mut m.llama, &dir(f).join("adapter")).unwrap();
        let full = logits(&m, &g);
        let t = g.ids.len() / 2;
        let row = Tensor::from_vec(g.ids[..t].to_vec(), (1, t), &Device::Cpu).unwrap();
        let mut cache = m.llama.new_cache();
        let pre = m.llama.forward(&row.narrow(1, 0, 5).unwrap(), Some(&mut cache), false).unwrap();
        let want = full.get(0).unwrap().narrow(0, 0, 5).unwrap();
        let mut worst = (pre.squeeze(0).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(worst <= LOGIT_TOL, "{f}: prefill differs by {worst}");
        for p in 5..t {
            let got = m.llama.forward(&row.narrow(1, p, 1).unwrap(), Some(&mut cache), true).unwrap();
            let want = full.get(0).unwrap().narrow(0, p, 1).unwrap();
            let e = (got.squeeze(0).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(e <= LOGIT_TOL, "{f}: decoded position {p} differs by {e}");
            worst = worst.max(e);
        }
        eprintln!("{f}: decode max |Δ| {worst:.2e}");
    }
}

#[test]
fn unknown_model_types_name_the_supported_list() {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir("llama").join("base/config.json")).unwrap()).unwrap();
    v["model_type"] = "falcon".into();
    v["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    let e = Config::from_json(&v).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    for want in ["falcon", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"] {
        assert!(e.contains(want), "{want} missing from: {e}");
    }
}

/// The families' config mapping: biases, windows per layer, attention scale, RoPE per layer
/// type, peft's default targets.
#[test]
fn configs_map_to_the_family_variants() {
    let cfg = |f: &str| Config::from_file(&dir(f).join("base/config.json")).unwrap();
    let q2 = cfg("qwen2");
    assert!(q2.has_bias(names::Proj::Q) && q2.has_bias(names::Proj::V) && !q2.has_bias(names::Proj::O));
    assert_eq!((0..3).map(|i| q2.window(i)).collect::<Vec<_>>(), [None; 3], "qwen2 without use_sliding_window");
    assert_eq!((0..3).map(|i| cfg("mistral").window(i)).collect::<Vec<_>>(), [Some(8); 3]);
    let g2 = cfg("gemma2");
    assert_eq!((0..3).map(|i| g2.window(i)).collect::<Vec<_>>(), [Some(8), None, Some(8)]);
    assert_eq!((g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.embed_scale), (Some(50.0), Some(30.0), Some(8.0)));
    let g3 = cfg("gemma3");
    assert_eq!((0..3).map(|i| g3.window(i)).collect::<Vec<_>>(), [Some(8), Some(8), None]);
    assert_eq!((g3.rope_theta, g3.sliding_rope.as_ref().map(|r| r.theta)), (1e6, Some(1e4)));
    assert_eq!(cfg("qwen3").head_dim, 32);
    assert_eq!(cfg("phi3").family.default_target_names(), ["qkv_proj"]);
    assert_eq!(cfg("gemma3").family.default_target_names(), ["q_proj", "v_proj"]);
    // Older Gemma 3 configs: `rope_local_base_freq` and linear scaling on global layers.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir("gemma3").join("base/config.json")).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.insert("rope_theta".into(), 1e6.into());
    o.insert("rope_local_base_freq".into(), 1e4.into());
    o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 8.0}));
    let c = Config::from_json(&v).unwrap();
    assert_eq!(c.sliding_rope.as_ref().map(|r| r.theta), Some(1e4));
    let inv = c.rope_inv_freq();
    assert!((inv[1] - 1.0 / 1e6f32.powf(2.0 / 16.0) / 8.0).abs() < 1e-9, "linear scaling divides the frequencies");
}

/// A `gemma3` (multimodal) checkpoint: `text_config` parses (with Gemma3TextConfig's defaults
/// for what it leaves out) and the language model's weights load from under
/// `model.language_model.` (transformers 5) or `language_model.model.` (older), the vision
/// tower skipped; logits are the text model's.
#[test]
fn gemma3_multimodal_checkpoints_load_their_language_model() {
    let g = golden("gemma3");
    let text: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir("gemma3").join("base/config.json")).unwrap()).unwrap();
    let mut text_config = text.as_object().unwrap().clone();
    text_config.remove("vocab_size"); // not given by many multimodal configs: the default applies
    let c = Config::from_json(&serde_json::json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_config.clone()})).unwrap();
    assert_eq!((c.family.name, c.vocab_size, c.nested_text_config), ("gemma3", 262208, true));
    text_config.insert("vocab_size".into(), 512.into());
    let base = candle_core::safetensors::load(dir("gemma3").join("base/model.safetensors"), &Device::Cpu).unwrap();
    for (prefix, vision) in [("model.language_model.", "model.vision_tower.x.weight"), ("language_model.model.", "vision_tower.x.weight")] {
        let tmp = tempfile::tempdir().unwrap();
        let mut tensors: Vec<(String, Tensor)> = base.iter().map(|(k, t)| (format!("{prefix}{}", k.trim_start_matches("model.")), t.clone())).collect();
        tensors.push((vision.into(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()));
        save::write_safetensors(&tmp.path().join("model.safetensors"), &tensors).unwrap();
        let cfg = serde_json::json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_config});
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let m = load(tmp.path(), None);
        check_logits(&format!("gemma3 under {prefix}"), &logits(&m, &g), &g.t["logits_base"], g.len1, LOGIT_TOL);
        // peft's adapter of the multimodal model: its keys under the language model's path
        // (and one of the vision tower, skipped) load onto the same modules; saved back, the
        // keys are the multimodal model's again, and load to the same logits.
        let ad = candle_core::safetensors::load(dir("gemma3").join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
        let mut keys: Vec<(String, Tensor)> = ad.iter().map(|(k, t)| (k.replacen("base_model.model.model.", &format!("base_model.model.{prefix}"), 1), t.clone())).collect();
        keys.push(("base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight".into(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()));
        let mm_adapter = tmp.path().join("mm-adapter");
        std::fs::create_dir_all(&mm_adapter).unwrap();
        save::write_safetensors(&mm_adapter.join("adapter_model.safetensors"), &keys).unwrap();
        std::fs::copy(dir("gemma3").join("adapter/adapter_config.json"), mm_adapter.join("adapter_config.json")).unwrap();
        let mut am = load(tmp.path(), None);
        let cfg = adapter::load_adapter(&mut am.llama, &mm_adapter).unwrap();
        check_logits(&format!("gemma3 under {prefix}, multimodal adapter"), &logits(&am, &g), &g.t["logits_adapted"], g.len1, LOGIT_TOL);
        adapter::save_adapter(&am.llama, &cfg, "", &tmp.path().join("saved")).unwrap();
        let saved = candle_core::safetensors::load(tmp.path().join("saved/adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert!(!saved.is_empty() && saved.keys().all(|k| k.starts_with("base_model.model.model.language_model.layers.")), "{:?}", saved.keys().next());
        let mut again = load(tmp.path(), None);
        adapter::load_adapter(&mut again.llama, &tmp.path().join("saved")).unwrap();
        check_logits("gemma3 multimodal adapter saved and loaded", &logits(&again, &g), &g.t["logits_adapted"], g.len1, LOGIT_TOL);
        // save_pretrained writes the language model as a text-only gemma3_text checkpoint.
        save::save_model_dir(&m, &tmp.path().join("text")).unwrap();
        let text = load(&tmp.path().join("text"), None);
        assert_eq!(text.config().raw["model_type"], "gemma3_text");
        check_logits("gemma3 language model saved alone", &logits(&text, &g), &g.t["logits_base"], g.len1, LOGIT_TOL);
    }
}

/// peft's default `target_modules` per family (none given): Phi-3's `qkv_proj`, the others'
/// `q_proj` and `v_proj` — when attaching and when loading an adapter_config.json without them.
#[test]
fn default_lora_targets_follow_the_family() {
    use qscript::model::lora::{self, LoraConfig, TargetModules};
    for (f, want) in [("phi3", vec!["qkv_proj"]), ("gemma3", vec!["q_proj", "v_proj"]), ("qwen2", vec!["q_proj", "v_proj"])] {
        let mut m = load(&dir(f).join("base"), None);
        let cfg = LoraConfig { target_modules: TargetModules::FamilyDefault, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        let mut got: Vec<&str> = m.llama.adapters().filter(|(id, _)| id.layer == 0).map(|(id, _)| id.proj.name()).collect();
        got.sort();
        assert_eq!(got, want, "{f}");
        // An adapter_config.json without target_modules loads onto the same modules.
        let tmp = tempfile::tempdir().unwrap();
        adapter::save_adapter(&m.llama, &cfg.for_family(m.llama.family()), "", tmp.path()).unwrap();
        let path = tmp.path().join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("target_modules");
        std::fs::write(&path, v.to_string()).unwrap();
        let mut back = load(&dir(f).join("base"), None);
        let read = adapter::load_adapter(&mut back.llama, tmp.path()).unwrap();
        assert_eq!(read.target_modules, TargetModules::Names(want.iter().map(|s| s.to_string()).collect()), "{f}");
        assert_eq!(back.llama.adapters().count(), m.llama.adapters().count());
    }
}

/// Phi-4-mini's partial rotary (0.75 of each head) on the phi3 checkpoint: the training
/// forward equals inference, and decoding through the cache the full forward.
#[test]
fn partial_rotary_runs_through_training_and_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir("phi3").join("base/config.json")).unwrap()).unwrap();
    v["rope_parameters"]["partial_rotary_factor"] = 0.75.into();
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    std::fs::copy(dir("phi3").join("base/model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    let (g, m) = (golden("phi3"), load(tmp.path(), None));
    assert_eq!(m.config().rotary_dim(), 12);
    let full = logits(&m, &g);
    let base = load(&dir("phi3").join("base"), None);
    assert!(max_diff(&full, &logits(&base, &g), g.len1) > 1e-3, "a partial rotation changes the logits");
    check_logits("phi3 partial rotary: training forward", &m.llama.train_logits(&batch(&g)).unwrap(), &full, g.len1, 1e-5);
    let t = g.ids.len() / 2;
    let row = Tensor::from_vec(g.ids[..t].to_vec(), (1, t), &Device::Cpu).unwrap();
    let mut cache = m.llama.new_cache();
    for p in 0..t {
        let got = m.llama.forward(&row.narrow(1, p, 1).unwrap(), Some(&mut cache), true).unwrap();
        let e = (got.squeeze(0).unwrap() - full.get(0).unwrap().narrow(0, p, 1).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(e <= LOGIT_TOL, "phi3 partial rotary: decoded position {p} differs by {e}");
    }
}

// ---------- the families' ops (candle reference paths) against autograd ----------

/// GeGLU with the tanh GELU (`gelu_pytorch_tanh`): forward and backward against autograd.
#[test]
fn geglu_backward_matches_autograd() {
    use candle_core::Var;
    use qscript::model::layers::mlp::glu;
    let g = Var::from_tensor(&randn(1, &[7, 12], DType::F32)).unwrap();
    let u = Var::from_tensor(&randn(2, &[7, 12], DType::F32)).unwrap();
    let r = randn(3, &[7, 12], DType::F32);
    let x = g.as_tensor();
    let inner = ((x + (x.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * (2.0 / std::f64::consts::PI).sqrt()).unwrap();
    let h_ref = ((x * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap().mul(u.as_tensor()).unwrap();
    let grads = (&h_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (h, saved) = glu::forward(x.clone(), u.as_tensor().clone(), qscript::kernels::glu::Activation::GeluTanh).unwrap();
    assert_close("geglu h", &h, &h_ref, 1e-6);
    let (dg, du) = glu::backward(&saved, &r).unwrap();
    assert_close("geglu dg", &dg, grads.get(x).unwrap(), 1e-5);
    assert_close("geglu du", &du, grads.get(u.as_tensor()).unwrap(), 1e-5);
}

/// Gemma's `x̂·(1 + w)` norm, forward and backward, f32 (kernels on 1 + w) and f64 (candle).
#[test]
fn gemma_norm_backward_matches_autograd() {
    use candle_core::Var;
    use qscript::model::layers::norm;
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&randn(4, &[6, 16], dtype)).unwrap();
        let w = (randn(5, &[16], dtype) * 0.2).unwrap();
        let r = randn(6, &[6, 16], dtype);
        let y_ref = candle_nn::ops::rms_norm_slow(x.as_tensor(), &(&w + 1.0).unwrap(), 1e-6).unwrap();
        let grads = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (y, saved) = norm::forward_with(x.as_tensor(), &w, 1e-6, true).unwrap();
        assert_close(&format!("{dtype:?} (1+w) norm y"), &y, &y_ref, 1e-6);
        assert_close(&format!("{dtype:?} (1+w) norm dx"), &norm::backward(&saved, &w, &r).unwrap(), grads.get(x.as_tensor()).unwrap(), 1e-5);
    }
}

/// Attention with Gemma 2's soft-capping, its scale and a sliding window over packed
/// examples, against autograd (the fused CPU kernel; its candle tiles in f64 are held to it by
/// tests/family_kernels.rs), with and without the cap.
#[test]
fn softcapped_windowed_attention_backward_matches_autograd() {
    use candle_core::Var;
    use qscript::model::layers::attention::{self, AttnParams};
    let (b, nh, kvh, t, d) = (2, 4, 2, 11, 8);
    let seg = [[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0], [1; 11]].concat();
    let mask = attention::build_window_mask(&seg, b, t, Some(3), &Device::Cpu).unwrap();
    for (softcap, tile) in [(Some(2.0f32), 4), (Some(2.0), t), (None, t)] {
        let p = AttnParams { scale: 0.3, softcap, window: Some(3) };
        let q = Var::from_tensor(&(randn(7, &[b, nh, t, d], DType::F32) * 2.0).unwrap()).unwrap();
        let k = Var::from_tensor(&randn(8, &[b, kvh, t, d], DType::F32)).unwrap();
        let v = Var::from_tensor(&randn(9, &[b, kvh, t, d], DType::F32)).unwrap();
        let r = randn(10, &[b, nh, t, d], DType::F32);
        let expand = |x: &Tensor| x.unsqueeze(2).unwrap().broadcast_as((b, kvh, nh / kvh, t, d)).unwrap().reshape((b, nh, t, d)).unwrap();
        let mut s = (q.as_tensor().matmul(&expand(k.as_tensor()).t().unwrap()).unwrap() * 0.3).unwrap();
        if let Some(c) = softcap {
            s = ((s / c as f64).unwrap().tanh().unwrap() * c as f64).unwrap();
        }
        let probs = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), candle_core::D::Minus1).unwrap();
        let o_ref = probs.matmul(&expand(v.as_tensor())).unwrap();
        let grads = (&o_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (o, saved) = attention::forward_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &p, tile).unwrap();
        assert!(saved.p.is_some(), "the fused CPU kernel takes the window and the cap");
        let name = format!("cap {softcap:?}, tile {tile}");
        assert_close(&format!("{name}: o"), &o, &o_ref, 1e-5);
        let (dq, dk, dv) = attention::backward(&saved, &r).unwrap();
        assert_close(&format!("{name}: dq"), &dq, grads.get(q.as_tensor()).unwrap(), 1e-5);
        assert_close(&format!("{name}: dk"), &dk, grads.get(k.as_tensor()).unwrap(), 1e-5);
        assert_close(&format!("{name}: dv"), &dv, grads.get(v.as_tensor()).unwrap(), 1e-5);
    }
}

/// Cross-entropy of soft-capped logits (Gemma 2's final cap): loss and gradient against
/// autograd, through the LM head's chunks.
#[test]
fn softcapped_cross_entropy_matches_autograd() {
    use candle_core::Var;
    use qscript::model::layers::lm_head;
    let (n, hidden, vocab) = (9, 16, 40);
    let h = Var::from_tensor(&randn(11, &[n, hidden], DType::F32)).unwrap();
    let head = randn(12, &[vocab, hidden], DType::F32);
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 4 == 3 { -100 } else { (i * 7) % vocab as i64 }).collect();
    let keep: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] >= 0).collect();
    let z = h.as_tensor().matmul(&head.t().unwrap()).unwrap();
    let z = ((z / 3.0).unwrap().tanh().unwrap() * 3.0).unwrap();
    let idx = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
    let tg = Tensor::new(keep.iter().map(|&i| targets[i as usize] as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let logp = candle_nn::ops::log_softmax(&z.index_select(&idx, 0).unwrap(), candle_core::D::Minus1).unwrap();
    let loss_ref = (logp.gather(&tg.unsqueeze(1).unwrap(), 1).unwrap().sum_all().unwrap() * -1.0).unwrap();
    let grads = (&loss_ref / keep.len() as f64).unwrap().backward().unwrap();
    let out = lm_head::forward_backward_capped(h.as_tensor(), &head, &targets, Some(1.0 / keep.len() as f64), 3, Some(3.0)).unwrap();
    let want = loss_ref.to_scalar::<f32>().unwrap() as f64;
    assert!((out.loss_sum - want).abs() < 1e-4 * want.abs(), "loss {} vs {want}", out.loss_sum);
    assert_close("softcapped dh", &out.dh.unwrap(), grads.get(h.as_tensor()).unwrap(), 1e-5);
    // The fused CPU kernel (no cap) is not what ran: without the cap the loss differs.
    let plain = lm_head::forward_backward(h.as_tensor(), &head, &targets, None, 3).unwrap();
    assert!((plain.loss_sum - out.loss_sum).abs() > 1e-3);
}
