//! PEFT adapter files against peft 0.21's golden output (tests/golden/peft/1), merging, and
//! saving plain models as HF directories.

use candle_core::{DType, Device, Tensor};
use qscript::model::adapter::{self, config_from_json, config_to_json, load_adapter, merge_and_unload, save_adapter};
use qscript::model::names::{Proj, LLAMA};
use qscript::model::lora::{self, LoraConfig, TargetModules};
use qscript::model::save::{save_model_dir, write_safetensors};
use qscript::model::{LoadOptions, Model};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn golden(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1").join(p)
}

fn load_base(dtype: DType) -> Model {
    let opts = LoadOptions { dtype, ..Default::default() };
    Model::load_hf_dir("peft-base", &golden("base"), &opts).unwrap()
}

fn golden_logits(name: &str) -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(golden("logits.safetensors"), &Device::Cpu).unwrap();
    (t["ids"].to_dtype(DType::U32).unwrap(), t[name].clone())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn logits(m: &Model) -> Tensor {
    let (ids, _) = golden_logits("logits_base");
    m.llama.forward(&ids, None, false).unwrap()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// name → (dtype, shape, bytes) of every tensor, and the metadata.
type StTensors = std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;
fn read_st(p: &Path) -> (StTensors, Option<std::collections::HashMap<String, String>>) {
    let bytes = std::fs::read(p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let map = st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    (map, meta.metadata().clone())
}

/// A copy of the golden adapter directory to edit.
fn adapter_copy(tmp: &Path) -> PathBuf {
    let d = tmp.join("adapter");
    std::fs::create_dir_all(&d).unwrap();
    for f in [adapter::ADAPTER_CONFIG, adapter::ADAPTER_WEIGHTS] {
        std::fs::copy(golden("adapter").join(f), d.join(f)).unwrap();
    }
    d
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = dir.join(adapter::ADAPTER_CONFIG);
    let mut v = read_json(&p);
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join(adapter::ADAPTER_WEIGHTS);
    let map = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
    f(&mut v);
    write_safetensors(&p, &v).unwrap();
}

fn load_err(dir: &Path) -> String {
    let mut m = load_base(DType::F32);
    let e = format!("{:#}", load_adapter(&mut m.llama, dir).unwrap_err());
    assert!(!e.contains('\n'), "multi-line error: {e}");
    // A failed load leaves the model as it was.
    assert!(max_abs_diff(&logits(&m), &golden_logits("logits_base").1) <= 1e-4);
    e
}

#[test]
fn golden_adapter_reproduces_peft_logits() {
    let mut m = load_base(DType::F32);
    let (_, base) = golden_logits("logits_base");
    let d = max_abs_diff(&logits(&m), &base);
    assert!(d <= 1e-4, "base: max abs diff {d}");
    let cfg = load_adapter(&mut m.llama, &golden("adapter")).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (8, 16.0, false));
    // Per layer: q/o 8·64 + 64·8, k/v 8·64 + 32·8, gate/up 8·64 + 128·8, down 8·128 + 64·8.
    assert_eq!(lora::parameter_counts(&m.llama).0, 2 * (2 * 1024 + 2 * 768 + 3 * 1536));
    for layer in &m.llama.layers {
        for &p in LLAMA.projs {
            let l = layer.proj(p).lora.as_ref().expect("adapter on every projection");
            assert_eq!(l.scaling, 2.0);
        }
    }
    let (_, want) = golden_logits("logits_adapted");
    let d = max_abs_diff(&logits(&m), &want);
    assert!(d <= 1e-4, "adapted: max abs diff {d}");
}

#[test]
fn save_then_load_gives_identical_files() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load_base(DType::F32);
    let cfg = load_adapter(&mut m.llama, &golden("adapter")).unwrap();
    let out = tmp.path().join("saved");
    // The golden adapter came from a model without a name: peft wrote null.
    save_adapter(&m.llama, &cfg, "", &out).unwrap();

    let (want, want_meta) = read_st(&golden("adapter").join(adapter::ADAPTER_WEIGHTS));
    let (got, got_meta) = read_st(&out.join(adapter::ADAPTER_WEIGHTS));
    assert_eq!(got_meta, want_meta);
    assert_eq!(got_meta.unwrap()["format"], "pt");
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (k, v) in &want {
        assert!(got[k] == *v, "tensor {k} differs");
    }
    assert_eq!(read_json(&out.join(adapter::ADAPTER_CONFIG)), read_json(&golden("adapter").join(adapter::ADAPTER_CONFIG)));
    #[cfg(unix)]
    for f in [adapter::ADAPTER_CONFIG, adapter::ADAPTER_WEIGHTS] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777, 0o644, "{f}");
    }

    // With a name, only base_model_name_or_path differs.
    save_adapter(&m.llama, &cfg, "peft-base", &out).unwrap();
    let mut got = read_json(&out.join(adapter::ADAPTER_CONFIG));
    assert_eq!(got["base_model_name_or_path"], "peft-base");
    got["base_model_name_or_path"] = Value::Null;
    assert_eq!(got, read_json(&golden("adapter").join(adapter::ADAPTER_CONFIG)));

    // Reload into a fresh base: same logits, same config.
    let mut m2 = load_base(DType::F32);
    let cfg2 = load_adapter(&mut m2.llama, &out).unwrap();
    assert_eq!(cfg2, cfg);
    assert_eq!(max_abs_diff(&logits(&m2), &logits(&m)), 0.0);

    // An existing directory: the two files are replaced, other files kept, no temp left over.
    std::fs::write(out.join("README.md"), "notes").unwrap();
    save_adapter(&m.llama, &cfg, "", &out).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("README.md")).unwrap(), "notes");
    let mut names: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["saved"]);
    let (got, _) = read_st(&out.join(adapter::ADAPTER_WEIGHTS));
    assert!(got == want);
}

#[test]
fn save_refuses_a_config_that_does_not_describe_the_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load_base(DType::F32);
    let cfg = load_adapter(&mut m.llama, &golden("adapter")).unwrap();
    let mut c = cfg.clone();
    c.target_modules = TargetModules::Names(vec!["q_proj".into()]);
    let e = save_adapter(&m.llama, &c, "", &tmp.path().join("a")).unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.k_proj") && e.contains("target_modules"), "{e}");
    let mut c = cfg.clone();
    c.lora_alpha = 32.0;
    let e = save_adapter(&m.llama, &c, "", &tmp.path().join("a")).unwrap_err().to_string();
    assert!(e.contains("scaling"), "{e}");
    let plain = load_base(DType::F32);
    let e = save_adapter(&plain.llama, &cfg, "", &tmp.path().join("a")).unwrap_err().to_string();
    assert!(e.contains("no LoRA adapters"), "{e}");
    assert!(!tmp.path().join("a").exists());
}

#[test]
fn fresh_config_has_peft_field_set() {
    let golden_cfg = read_json(&golden("adapter").join(adapter::ADAPTER_CONFIG));
    let cfg = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.1, ..Default::default() };
    let v = config_to_json(&cfg, "HuggingFaceTB/SmolLM2-135M-Instruct");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v), keys(&golden_cfg), "same keys, same (sorted) order");
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["inference_mode"], true);
    assert_eq!(v["init_lora_weights"], true);
    assert_eq!(v["lora_alpha"], 32);
    assert_eq!(v["lora_dropout"], 0.1);
    assert_eq!(v["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert_eq!(v["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(v["peft_version"], adapter::PEFT_VERSION);
    let (back, ignored) = config_from_json(&v, "x").unwrap();
    assert!(ignored.is_empty());
    assert_eq!(LoraConfig { extra: Default::default(), ..back }, cfg);

    for (t, json) in [(TargetModules::AllLinear, serde_json::json!("all-linear")), (TargetModules::Regex(r".*\.(q|v)_proj".into()), serde_json::json!(r".*\.(q|v)_proj"))] {
        let c = LoraConfig { target_modules: t.clone(), ..Default::default() };
        let v = config_to_json(&c, "");
        assert_eq!(v["target_modules"], json);
        assert_eq!(config_from_json(&v, "x").unwrap().0.target_modules, t);
    }
}

#[test]
fn rslora_and_patterns_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_copy(tmp.path());
    edit_config(&dir, |c| {
        c.insert("use_rslora".into(), true.into());
        c.insert("rank_pattern".into(), serde_json::json!({"model.layers.0.self_attn.q_proj": 4}));
        c.insert("alpha_pattern".into(), serde_json::json!({"down_proj": 32}));
    });
    // Without the rank-4 tensors the shapes are wrong, and the error says so.
    let e = load_err(&dir);
    assert!(e.contains("model.layers.0.self_attn.q_proj.lora_A.weight") && e.contains("expected [4, 64]"), "{e}");
    edit_tensors(&dir, |ts| {
        for (k, t) in ts.iter_mut() {
            if k.contains("layers.0.self_attn.q_proj.lora_A") {
                *t = t.narrow(0, 0, 4).unwrap();
            } else if k.contains("layers.0.self_attn.q_proj.lora_B") {
                *t = t.narrow(1, 0, 4).unwrap().contiguous().unwrap();
            }
        }
    });
    let mut m = load_base(DType::F32);
    let cfg = load_adapter(&mut m.llama, &dir).unwrap();
    let s = |i: usize, p: Proj| m.llama.layers[i].proj(p).lora.as_ref().unwrap().scaling;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(s(0, Proj::Q), 16.0 / 2.0));
    assert_eq!(m.llama.layers[0].proj(Proj::Q).lora.as_ref().unwrap().rank(), 4);
    assert!(close(s(1, Proj::Q), 16.0 / 8f64.sqrt()));
    assert!(close(s(0, Proj::Down), 32.0 / 8f64.sqrt()));
    assert!(close(s(1, Proj::Up), 16.0 / 8f64.sqrt()));
    // And it saves back to the same files.
    let out = tmp.path().join("out");
    save_adapter(&m.llama, &cfg, "", &out).unwrap();
    assert_eq!(read_json(&out.join(adapter::ADAPTER_CONFIG)), read_json(&dir.join(adapter::ADAPTER_CONFIG)));
    assert!(read_st(&out.join(adapter::ADAPTER_WEIGHTS)).0 == read_st(&dir.join(adapter::ADAPTER_WEIGHTS)).0);
}

#[test]
fn merged_model_matches_adapted_logits_and_saves_as_hf_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load_base(DType::F32);
    load_adapter(&mut m.llama, &golden("adapter")).unwrap();
    let e = save_model_dir(&m, &tmp.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("merge_and_unload"), "{e}");
    assert_eq!(merge_and_unload(&mut m.llama).unwrap(), 14);
    assert_eq!(lora::parameter_counts(&m.llama).0, 0);
    let (_, want) = golden_logits("logits_adapted");
    let d = max_abs_diff(&logits(&m), &want);
    assert!(d <= 1e-4, "merged: max abs diff {d}");

    let out = tmp.path().join("merged");
    save_model_dir(&m, &out).unwrap();
    let m2 = Model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(max_abs_diff(&logits(&m2), &logits(&m)), 0.0);
    // Same config keys and values as the golden base (written by transformers).
    assert_eq!(read_json(&out.join("config.json")), read_json(&golden("base/config.json")));
    assert_eq!(read_json(&out.join("generation_config.json")), read_json(&golden("base/generation_config.json")));
    let (got, meta) = read_st(&out.join("model.safetensors"));
    let (base, _) = read_st(&golden("base/model.safetensors"));
    assert_eq!(meta.unwrap()["format"], "pt");
    assert_eq!(got.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
    for (k, (dt, shape, _)) in &base {
        assert_eq!((&got[k].0, &got[k].1), (dt, shape), "{k}");
    }
}

#[test]
fn save_model_dir_bf16_tied_and_existing_dir() {
    let tmp = tempfile::tempdir().unwrap();
    // bf16 weights: dtype recorded in the config and the header.
    let m = load_base(DType::BF16);
    let out = tmp.path().join("bf16");
    save_model_dir(&m, &out).unwrap();
    assert_eq!(read_json(&out.join("config.json"))["dtype"], "bfloat16");
    let (got, _) = read_st(&out.join("model.safetensors"));
    assert!(got.values().all(|(dt, _, _)| *dt == safetensors::Dtype::BF16));
    let m2 = Model::load(out.to_str().unwrap(), &LoadOptions { dtype: DType::BF16, ..Default::default() }).unwrap();
    assert_eq!(max_abs_diff(&logits(&m2), &logits(&m)), 0.0);

    // Tied embeddings: no lm_head.weight, tie_word_embeddings true.
    let mut m = load_base(DType::F32);
    m.llama.lm_head = None;
    let out = tmp.path().join("tied");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    save_model_dir(&m, &out).unwrap();
    assert_eq!(read_json(&out.join("config.json"))["tie_word_embeddings"], true);
    assert!(!read_st(&out.join("model.safetensors")).0.contains_key("lm_head.weight"));
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
    let m2 = Model::load(out.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert!(m2.llama.lm_head.is_none());
    assert_eq!(max_abs_diff(&logits(&m2), &logits(&m)), 0.0);
    // Saving again over it works (file by file).
    save_model_dir(&m2, &out).unwrap();
    let entries = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(entries, 2, "no temp directories left");
}

#[test]
fn bad_adapters_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();

    // Missing files.
    let e = load_err(&tmp.path().join("nope"));
    assert!(e.contains("nope/adapter_config.json") && e.contains("not found"), "{e}");
    let dir = adapter_copy(tmp.path());
    std::fs::remove_file(dir.join(adapter::ADAPTER_WEIGHTS)).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("adapter_model.safetensors: not found"), "{e}");

    // Wrong shape.
    let dir = adapter_copy(&tmp.path().join("shape"));
    edit_tensors(&dir, |ts| {
        for (k, t) in ts.iter_mut() {
            if k == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" {
                *t = t.narrow(0, 0, 100).unwrap();
            }
        }
    });
    let e = load_err(&dir);
    assert!(e.contains("`base_model.model.model.layers.1.mlp.up_proj.lora_B.weight` has shape [100, 8], expected [128, 8]"), "{e}");

    // Target modules the model lacks.
    let dir = adapter_copy(&tmp.path().join("target"));
    edit_config(&dir, |c| {
        c.insert("target_modules".into(), serde_json::json!(["q_proj", "c_attn"]));
    });
    let e = load_err(&dir);
    assert!(e.contains("target module `c_attn` matches no module"), "{e}");
    let dir = adapter_copy(&tmp.path().join("layer"));
    edit_tensors(&dir, |ts| {
        let extra: Vec<(String, Tensor)> =
            ts.iter().filter(|(k, _)| k.contains("layers.1.self_attn.q_proj")).map(|(k, t)| (k.replace("layers.1.", "layers.7."), t.clone())).collect();
        ts.extend(extra);
    });
    let e = load_err(&dir);
    assert!(e.contains("`base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight`") && e.contains("no module"), "{e}");
    let dir = adapter_copy(&tmp.path().join("half"));
    edit_tensors(&dir, |ts| ts.retain(|(k, _)| !k.ends_with("layers.0.mlp.up_proj.lora_B.weight")));
    let e = load_err(&dir);
    assert!(e.contains("model.layers.0.mlp.up_proj") && e.contains("lora_B"), "{e}");

    // Fields that would change behaviour.
    for (k, v, what) in [
        ("use_dora", serde_json::json!(true), "`use_dora: true` is not supported"),
        ("modules_to_save", serde_json::json!(["lm_head"]), "`modules_to_save: [\"lm_head\"]` is not supported"),
        ("bias", serde_json::json!("all"), "`bias: \"all\"` is not supported"),
        ("init_lora_weights", serde_json::json!("pissa"), "not supported"),
        ("peft_type", serde_json::json!("IA3"), "not supported"),
    ] {
        let dir = adapter_copy(&tmp.path().join(k));
        edit_config(&dir, |c| {
            c.insert(k.into(), v);
        });
        let e = load_err(&dir);
        assert!(e.contains(what) && e.contains("adapter_config.json"), "{e}");
    }
}

#[test]
fn ignored_fields_are_listed_and_kept() {
    let mut v = read_json(&golden("adapter").join(adapter::ADAPTER_CONFIG));
    let o = v.as_object_mut().unwrap();
    o.insert("layers_to_transform".into(), serde_json::json!([0, 1]));
    o.insert("some_future_field".into(), serde_json::json!({"x": 1}));
    o.insert("another_future_field".into(), Value::Null);
    let (cfg, ignored) = config_from_json(&v, "adapter_config.json").unwrap();
    assert_eq!(ignored, ["layers_to_transform", "some_future_field"]);
    let back = config_to_json(&cfg, "");
    assert_eq!(back, v, "extra fields are written back unchanged");
}

/// The saved model directory as Python's `safetensors` sees it (skipped without python3 +
/// safetensors).
#[test]
fn python_safetensors_reads_saved_model_dir() {
    let ok = std::process::Command::new("python3").args(["-c", "import safetensors"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3 with safetensors not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut m = load_base(DType::F32);
    let cfg = load_adapter(&mut m.llama, &golden("adapter")).unwrap();
    save_adapter(&m.llama, &cfg, "", &tmp.path().join("a")).unwrap();
    merge_and_unload(&mut m.llama).unwrap();
    save_model_dir(&m, &tmp.path().join("m")).unwrap();
    let script = r#"
import sys, json
from safetensors import safe_open
d = sys.argv[1]
with safe_open(d + "/m/model.safetensors", "np") as f, safe_open(sys.argv[2] + "/base/model.safetensors", "np") as g:
    assert f.metadata() == {"format": "pt"}, f.metadata()
    assert sorted(f.keys()) == sorted(g.keys())
    for k in g.keys():
        a, b = f.get_tensor(k), g.get_tensor(k)
        assert a.dtype == b.dtype and a.shape == b.shape, k
with safe_open(d + "/a/adapter_model.safetensors", "np") as f, safe_open(sys.argv[2] + "/adapter/adapter_model.safetensors", "np") as g:
    assert f.metadata() == g.metadata()
    assert sorted(f.keys()) == sorted(g.keys())
    for k in g.keys():
        assert (f.get_tensor(k) == g.get_tensor(k)).all(), k
print("ok")
"#;
    let out = std::process::Command::new("python3").args(["-c", script, tmp.path().to_str().unwrap(), golden("").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
