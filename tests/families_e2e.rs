//! End to end per model family on the CPU: a tiny random checkpoint of the family (the golden
//! family's config and weights, `tests/golden/families/<family>/base`, with the embedding and
//! LM head redrawn for the vocabulary of the family's REAL tokenizer) plus that tokenizer and the
//! family's chat template runs `recipes/any_family.rhai` unchanged: 4-bit base, LoRA on
//! all-linear, 20 steps on `recipes/data/customer_support.jsonl`. The loss falls, and the adapter
//! qscript saved, loaded again on a fresh base, gives the same logits.
//!
//! Tokenizers come from `tests/data/tokenizers` (see its README; Qwen3's and Gemma 3's are
//! fetched by `fetch.sh`); a family whose tokenizer or golden checkpoint is absent prints why
//! and passes.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The golden tiny checkpoint of `family`: vendored in tests/golden, else the shared golden data
/// beside the repository.
fn golden_base(family: &str) -> Option<PathBuf> {
    let rel = format!("golden/families/{family}/base");
    [root().join("tests").join(&rel), root().join("../shared").join(&rel), root().join("../../shared").join(&rel)]
        .into_iter()
        .find(|d| d.join("config.json").is_file())
}

fn tokenizer_dir(name: &str) -> Option<PathBuf> {
    let base = root().join("tests/data/tokenizers");
    [base.join(name), base.join("fetched").join(name)].into_iter().find(|d| d.join("tokenizer.json").is_file())
}

fn golden_template(name: &str) -> String {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/golden/templates/families.json")).unwrap()).unwrap();
    g["templates"][name]["chat_template"].as_str().unwrap().to_string()
}

/// Uniform values with std 0.5 from a fixed hash (no RNG crate state): large enough that the
/// frozen LM head can express what 20 LoRA steps learn (at 0.02 the logits stay near uniform).
fn random(n: usize, seed: u64) -> Vec<f32> {
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
fn make_checkpoint(family: &str, tokenizer: &Path, template: &str, dir: &Path) -> anyhow::Result<()> {
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

/// Training losses in step order, from metrics.jsonl.
fn losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("eval_loss").is_none())
        .filter_map(|v| v.get("loss").and_then(Value::as_f64))
        .collect()
}

/// Build the family's checkpoint, run the recipe, check the loss and the reload.
fn run_family(family: &str, tokenizer: &str, template: &str) {
    let (Some(_), Some(tok)) = (golden_base(family), tokenizer_dir(tokenizer)) else {
        eprintln!("SKIP {family}: no golden checkpoint or no {tokenizer} tokenizer (tests/data/tokenizers/fetch.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    make_checkpoint(family, &tok, &golden_template(template), &model).unwrap();
    let out = tmp.path().join("run");
    let set = |k: &str, v: &str| ["--set".to_string(), format!("{k}={v}")];
    let run = Command::new(env!("CARGO_BIN_EXE_qscript"))
        .current_dir(root())
        .env("QSCRIPT_QUIET", "1")
        .arg(root().join("recipes/any_family.rhai"))
        .args(set("MODEL", model.to_str().unwrap()))
        .args(set("OUT", out.to_str().unwrap()))
        .args(set("MAX_STEPS", "20"))
        .args(set("MAX_SEQ_LENGTH", "64"))
        .args(set("LEARNING_RATE", "0.01"))
        // The model and the run folder live outside the repository (issue 17's permissions).
        .arg(format!("--allow-read={}", tmp.path().display()))
        .arg(format!("--allow-write={}", tmp.path().display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{family}: stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&run.stderr));
    let l = losses(&out);
    assert_eq!(l.len(), 20, "{family}: {l:?}");
    let (first, last) = (l[..5].iter().sum::<f64>() / 5.0, l[15..].iter().sum::<f64>() / 5.0);
    assert!(last < first - 0.1, "{family}: loss must fall over 20 steps: {l:?}");
    let diff: f64 = stdout
        .lines()
        .find_map(|s| s.split("max |logit difference| at the last position ").nth(1))
        .unwrap_or_else(|| panic!("{family}: no reload line in\n{stdout}"))
        .trim()
        .parse()
        .unwrap();
    assert!(diff <= 1e-4, "{family}: reloaded adapter changes the logits by {diff}");
    eprintln!("{family}: loss {first:.3} -> {last:.3} (first/last 5 steps), reload max |Δlogit| {diff:e}");
}

/// The control: a Llama with Mistral's tokenizer and template (committed, always present).
#[test]
fn llama() {
    run_family("llama", "mistral", "mistral");
}


#[test]
fn qwen2_with_qwen25_tokenizer_and_template() {
    // Qwen2.5's BPE is Qwen3's without the 4 last added tokens: Qwen3's file stands in.
    run_family("qwen2", "qwen3", "qwen2.5");
}

#[test]
fn qwen3() {
    run_family("qwen3", "qwen3", "qwen3");
}

#[test]
fn mistral() {
    run_family("mistral", "mistral", "mistral");
}

#[test]
fn gemma2_with_gemma3_tokenizer() {
    // No registry ships Gemma 2's tokenizer; Gemma 3's (same family of SentencePiece BPE,
    // larger vocabulary) and template stand in.
    run_family("gemma2", "gemma3", "gemma3");
}

#[test]
fn gemma3() {
    run_family("gemma3", "gemma3", "gemma3");
}

#[test]
fn phi3() {
    run_family("phi3", "phi3", "phi3");
}
