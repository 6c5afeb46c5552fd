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

mod common;

use common::families::{golden_base, golden_template, make_checkpoint, root, tokenizer_dir};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

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
