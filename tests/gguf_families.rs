//! GGUF files of the model families, written as llama.cpp's converter writes them
//! (`tests/data/gguf/make_family_gguf.py` from the golden tiny checkpoints): the synthesised
//! config.json against the checkpoint's, every tensor against the checkpoint's under its HF
//! name, and clean errors for what qscript does not read.

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::{DType, Device, Tensor};
use qscript::model::{gguf, LoadOptions, Model};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Golden folder name → llama.cpp architecture.
const FAMILIES: [(&str, &str); 6] = [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma2", "gemma2"), ("gemma3", "gemma3"), ("phi3", "phi3"), ("mistral", "llama")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn fixture(family: &str) -> PathBuf {
    root().join(format!("tests/data/gguf/{family}.gguf"))
}

fn golden(family: &str) -> PathBuf {
    root().join(format!("tests/golden/families/{family}"))
}

fn hf_config(family: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(family).join("base/config.json")).unwrap()).unwrap()
}

fn hf_tensors(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(family).join("base/model.safetensors"), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    flat(a).iter().zip(flat(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every tensor of the checkpoint comes back under its HF name with its values: names per
/// family (`ffn_norm`, Phi-3's fused `attn_qkv` / `ffn_up`), Llama's q/k rows un-permuted,
/// Gemma's `1 + w` norms back to `w`, a tied head absent.
#[test]
fn tensors_equal_the_checkpoint() {
    for (family, arch) in FAMILIES {
        let (config, ours) = gguf::read_weights(&fixture(family)).unwrap();
        let theirs = hf_tensors(family);
        let tied = config["tie_word_embeddings"].as_bool().unwrap();
        let mut want: Vec<&String> = theirs.keys().filter(|k| !(tied && *k == "lm_head.weight")).collect();
        let mut got: Vec<&String> = ours.keys().collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{family}: tensor names");
        for (key, t) in &theirs {
            let Some(o) = ours.get(key) else { continue };
            assert_eq!(o.dims(), t.dims(), "{family} {key}");
            // (1 + w) - 1 in f32 rounds; everything else is the stored f32 bit for bit.
            let tol = if key.ends_with("norm.weight") && arch.starts_with("gemma") { 1e-6 } else { 0.0 };
            let d = max_diff(o, t);
            assert!(d <= tol, "{family} {key}: max |diff| {d}");
        }
        assert_eq!(tied, family.starts_with("gemma"), "{family}: the golden Gemmas tie their embeddings, the others do not");
    }
}

/// The raw GGUF holds what the converter wrote, so the checks above can fail: Gemma's norms
/// are 1 + w and Mistral's q/k rows are permuted in the file.
#[test]
fn the_files_hold_the_converters_transformations() {
    let raw = |family: &str, name: &str| {
        let mut f = std::fs::File::open(fixture(family)).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        c.tensor(&mut f, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap()
    };
    for family in ["gemma2", "gemma3"] {
        let hf = hf_tensors(family);
        for (name, key) in [("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"), ("output_norm.weight", "model.norm.weight")] {
            let plus_one = (&hf[key] + 1.0).unwrap();
            assert!(max_diff(&raw(family, name), &plus_one) < 1e-6, "{family} {name}");
        }
    }
    let hf = hf_tensors("gemma3");
    let q_norm = (&hf["model.layers.0.self_attn.q_norm.weight"] + 1.0).unwrap();
    assert!(max_diff(&raw("gemma3", "blk.0.attn_q_norm.weight"), &q_norm) < 1e-6);
    let hf = hf_tensors("mistral");
    for (name, key, heads) in [("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight", 4), ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", 2)] {
        let r = raw("mistral", name);
        assert!(max_diff(&r, &hf[key]) > 1e-3, "{name} is not permuted in the file");
        assert_eq!(flat(&gguf::permute_qk(&hf[key], heads).unwrap()), flat(&r), "{name}");
    }
    // Qwen3's q/k norms are plain RMSNorm weights: no shift.
    let hf = hf_tensors("qwen3");
    assert_eq!(flat(&raw("qwen3", "blk.0.attn_q_norm.weight")), flat(&hf["model.layers.0.self_attn.q_norm.weight"]));
}

/// The synthesised config.json says what the checkpoint's says, on every field the model's
/// arithmetic depends on.
#[test]
fn config_matches_the_checkpoint() {
    const SAME: [&str; 13] = [
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "hidden_act", "hidden_activation",
    ];
    for (family, arch) in FAMILIES {
        let ours = gguf::read_config_json(&fixture(family)).unwrap();
        let theirs = hf_config(family);
        for key in SAME {
            assert_eq!(ours.get(key), theirs.get(key), "{family}: `{key}`");
        }
        // Exactly the f64 the checkpoint says (the file holds an f32).
        assert_eq!(ours["rms_norm_eps"].as_f64(), theirs["rms_norm_eps"].as_f64(), "{family}");
        let hd = |c: &Value| c["head_dim"].as_u64().unwrap_or(c["hidden_size"].as_u64().unwrap() / c["num_attention_heads"].as_u64().unwrap());
        assert_eq!(hd(&ours), hd(&theirs), "{family}: head_dim");
        if arch == "llama" {
            // llama.cpp runs Mistral as Llama: the model type and the window are not in the file.
            assert_eq!(ours["model_type"], "llama");
            assert_eq!(ours["rope_theta"].as_f64(), theirs["rope_parameters"]["rope_theta"].as_f64());
            assert!(ours.get("sliding_window").is_none());
            continue;
        }
        for key in ["model_type", "architectures", "rope_parameters", "sliding_window", "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "attention_bias", "original_max_position_embeddings"] {
            if theirs.get(key).is_some_and(|v| !v.is_null()) || ours.get(key).is_some_and(|v| !v.is_null()) {
                let (o, t) = (ours.get(key).unwrap_or(&Value::Null), theirs.get(key).unwrap_or(&Value::Null));
                // Qwen's all-full `layer_types` is transformers' default; the file has no window.
                if family.starts_with("qwen") && key == "layer_types" {
                    assert!(t.as_array().unwrap().iter().all(|l| l == "full_attention"));
                    continue;
                }
                assert_eq!(o, t, "{family}: `{key}`");
            }
        }
    }
}

/// What llama.cpp assumes where the file is silent: Gemma 3 has five sliding layers per
/// global one, Gemma 2 alternates; a per-layer flag array overrides either.
#[test]
fn gemma_layer_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    let layer_types = |family: &str, pattern: Option<GValue>| {
        let path = rewrite(family, &tmp.path().join("p.gguf"), |md| {
            let key = format!("{family}.attention.sliding_window_pattern");
            md.remove(&key);
            if let Some(p) = pattern.clone() {
                md.insert(key, p);
            }
        });
        let c = gguf::read_config_json(&path).unwrap();
        c["layer_types"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().starts_with("sliding")).collect::<Vec<bool>>()
    };
    assert_eq!(layer_types("gemma3", None), [true, true, true]);
    assert_eq!(layer_types("gemma3", Some(GValue::U32(2))), [true, false, true]);
    assert_eq!(layer_types("gemma3", Some(GValue::U32(0))), [true, true, true]);
    assert_eq!(layer_types("gemma3", Some(GValue::U32(1))), [false, false, false]);
    let flags = GValue::Array(vec![GValue::Bool(false), GValue::Bool(true), GValue::Bool(false)]);
    assert_eq!(layer_types("gemma3", Some(flags)), [false, true, false]);
    assert_eq!(layer_types("gemma2", None), [true, false, true]);
    let err = gguf::read_config_json(&rewrite("gemma3", &tmp.path().join("w.gguf"), |md| {
        md.insert("gemma3.attention.sliding_window_pattern".into(), GValue::Array(vec![GValue::Bool(true)]));
    }))
    .unwrap_err();
    assert!(format!("{err:#}").contains("`gemma3.attention.sliding_window_pattern` has 1 entries for 3 layers"), "{err:#}");
}

/// Gemma's query scale follows llama.cpp: 1/sqrt(head_dim), except the 27B models.
#[test]
fn gemma_query_scale_and_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let c = gguf::read_config_json(&rewrite("gemma2", &tmp.path().join("g.gguf"), |md| {
        md.insert("gemma2.block_count".into(), GValue::U32(46));
        md.insert("gemma2.attention.key_length".into(), GValue::U32(32));
        for k in ["attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window"] {
            md.remove(&format!("gemma2.{k}"));
        }
    }))
    .unwrap();
    assert_eq!((c["head_dim"].as_u64(), c["query_pre_attn_scalar"].as_u64()), (Some(32), Some(64 / 4)));
    assert_eq!((c["attn_logit_softcapping"].as_f64(), c["final_logit_softcapping"].as_f64()), (Some(50.0), Some(30.0)));
    assert_eq!(c["sliding_window"], 4096);
    let c = gguf::read_config_json(&rewrite("gemma3", &tmp.path().join("g3.gguf"), |md| {
        md.insert("gemma3.attention.key_length".into(), GValue::U32(32));
        md.insert("gemma3.rope.scaling.type".into(), GValue::String("linear".into()));
        md.insert("gemma3.rope.scaling.factor".into(), GValue::F32(8.0));
        md.insert("gemma3.rope.freq_base_swa".into(), GValue::F32(20000.0));
    }))
    .unwrap();
    assert_eq!(c["query_pre_attn_scalar"], 32);
    assert_eq!(c["rope_parameters"]["full_attention"], serde_json::json!({"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}));
    assert_eq!(c["rope_parameters"]["sliding_attention"], serde_json::json!({"rope_type": "default", "rope_theta": 20000.0}));
}

/// Each family's GGUF loads in qscript, and its logits are transformers' for the checkpoint it
/// was converted from (row 1 is padded past `lengths[1]`). Mistral runs as llama.cpp runs it:
/// as Llama, without its sliding window of 8, so the logits agree where the window has no
/// effect (the first 8 positions).
#[test]
fn logits_equal_transformers() {
    for (family, arch) in FAMILIES {
        let m = Model::load_gguf(family, &fixture(family), &LoadOptions::default()).unwrap();
        let g = candle_core::safetensors::load(golden(family).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = g["ids"].to_dtype(DType::U32).unwrap();
        let want = &g["logits_base"];
        let got = m.llama.forward(&ids, None, false).unwrap();
        assert_eq!(got.dims(), want.dims(), "{family}");
        let lengths = g["lengths"].to_vec1::<i64>().unwrap();
        let mut worst = 0f32;
        for (row, &len) in lengths.iter().enumerate() {
            let len = if arch == "llama" { 8 } else { len as usize };
            let (a, b) = (got.get(row).unwrap().narrow(0, 0, len).unwrap(), want.get(row).unwrap().narrow(0, 0, len).unwrap());
            worst = worst.max(max_diff(&a, &b));
        }
        eprintln!("{family}: max |logit diff| {worst:.2e}");
        assert!(worst <= 1e-4, "{family}: max |logit diff| {worst}");
    }
}

#[test]
fn unknown_architecture_and_missing_keys_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = rewrite("qwen2", &tmp.path().join("mamba.gguf"), |md| {
        md.insert("general.architecture".into(), GValue::String("mamba".into()));
    });
    for err in [gguf::read_config_json(&path).unwrap_err(), gguf::read_gguf(&path).err().unwrap(), gguf::read_weights(&path).unwrap_err()] {
        let msg = format!("{err:#}");
        assert!(msg.contains("mamba.gguf") && msg.contains("GGUF architecture `mamba` is not supported"), "{msg}");
        assert!(msg.contains("supported: llama, qwen2, qwen3, gemma2, gemma3, phi3"), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
    for (family, key) in [("qwen2", "qwen2.block_count"), ("qwen3", "qwen3.attention.head_count"), ("gemma3", "gemma3.attention.sliding_window"), ("phi3", "phi3.embedding_length"), ("gemma2", "gemma2.attention.layer_norm_rms_epsilon")] {
        let path = rewrite(family, &tmp.path().join(format!("{family}.gguf")), |md| {
            md.remove(key).unwrap();
        });
        let msg = format!("{:#}", gguf::read_weights(&path).unwrap_err());
        assert!(msg.contains(&format!("missing GGUF key `{key}`")), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
    // A tensor the architecture does not have (Phi-3 fuses q, k and v).
    let path = rewrite("phi3", &tmp.path().join("extra.gguf"), |_| {});
    let path = add_tensor(&path, "blk.0.attn_q.weight");
    let msg = format!("{:#}", gguf::read_weights(&path).unwrap_err());
    assert!(msg.contains("unexpected tensor `blk.0.attn_q.weight` for a phi3 GGUF"), "{msg}");
}

/// A copy of `family`'s fixture at `out` with its metadata edited by `edit`.
fn rewrite(family: &str, out: &Path, edit: impl FnOnce(&mut HashMap<String, GValue>)) -> PathBuf {
    let mut f = std::fs::File::open(fixture(family)).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md = c.metadata.clone();
    edit(&mut md);
    let tensors: Vec<(String, _)> = c.tensor_infos.keys().map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    write(out, &md, &tensors);
    out.to_path_buf()
}

/// The file at `path` plus a copy of its `token_embd.weight` named `name`.
fn add_tensor(path: &Path, name: &str) -> PathBuf {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors: Vec<(String, _)> = c.tensor_infos.keys().map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap())).collect();
    tensors.push((name.to_string(), c.tensor(&mut f, "token_embd.weight", &Device::Cpu).unwrap()));
    let out = path.with_extension("more.gguf");
    write(&out, &c.metadata, &tensors);
    out
}

fn write(out: &Path, md: &HashMap<String, GValue>, tensors: &[(String, candle_core::quantized::QTensor)]) {
    let md: Vec<(&str, &GValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut w = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut w, &md, &tensors).unwrap();
}

/// Real Qwen GGUFs say `tokenizer.ggml.pre = qwen2`: Llama-3's split, but one digit at a time
/// (checked against Qwen3's tokenizer.json on mixed text: identical ids).
#[test]
fn qwen2_pre_tokenizer_splits_digits() {
    use qscript::model::tokenizer::{GgufVocab, Tokenizer};
    let vocab = |pre: &str| GgufVocab {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens: ["1", "2", "12", "a"].map(String::from).to_vec(),
        token_types: vec![1; 4],
        merges: vec!["1 2".into()],
        bos_id: None,
        eos_id: None,
        unk_id: None,
        pad_id: None,
        add_bos: false,
        add_eos: false,
        chat_template: None,
        model_max_length: None,
    };
    let ids = |pre: &str| Tokenizer::from_gguf_vocab(&vocab(pre)).unwrap().encode("a12", false).unwrap();
    assert_eq!(ids("qwen2"), [3, 0, 1]);
    assert_eq!(ids("llama-bpe"), [3, 2]);
}
