//! Tokenizer: golden ids for SmolLM2 (from the converted HF dir and straight from the GGUF),
//! round trips through save/load, and tokenizer_config.json variants.

use qscript::model::gguf;
use qscript::model::hub::{default_model_gguf, resolve, ModelSource, DEFAULT_MODEL};
use qscript::model::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    let t = std::time::Instant::now();
    match resolve(DEFAULT_MODEL, None).expect("resolve default model") {
        ModelSource::HfDir(d) => {
            eprintln!("resolve({DEFAULT_MODEL}) took {:.2?}", t.elapsed());
            d
        }
        other => panic!("expected an HF dir, got {other:?}"),
    }
}

fn golden() -> Vec<(String, Vec<u32>)> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2/tokenizer_ids.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let ids = e["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            (e["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn check_golden(tok: &Tokenizer, what: &str) {
    let cases = golden();
    assert!(cases.len() >= 5);
    for (text, ids) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), ids, "{what}: ids of {text:?}");
        assert_eq!(&tok.decode(ids, false).unwrap(), text, "{what}: decode of {text:?}");
    }
}

#[test]
fn converted_dir_matches_golden_ids() {
    let dir = model_dir();
    let t = std::time::Instant::now();
    let tok = Tokenizer::from_dir(&dir).unwrap().expect("tokenizer.json");
    eprintln!("Tokenizer::from_dir took {:.2?}", t.elapsed());
    check_golden(&tok, "converted dir");
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.unk_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(tok.model_max_length, Some(8192));
    assert!(tok.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.vocab_size(), 49152);
    // No BOS added by the post-processor (add_bos_token false in the GGUF).
    assert_eq!(tok.encode("Hello", true).unwrap(), tok.encode("Hello", false).unwrap());
    // Control tokens are skipped when decoding without specials.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");

    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["add_bos_token"], false);
    assert_eq!(cfg["add_eos_token"], false);
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["model_max_length"], 8192);
    assert_eq!(cfg["added_tokens_decoder"]["1"]["content"], "<|im_start|>");
    assert_eq!(cfg["added_tokens_decoder"]["1"]["special"], true);
    assert_eq!(cfg["added_tokens_decoder"].as_object().unwrap().len(), 17);
}

#[test]
fn gguf_tokenizer_matches_golden_ids() {
    let gguf_path = default_model_gguf().unwrap();
    let tok = gguf::read_tokenizer(&gguf_path).unwrap();
    check_golden(&tok, "GGUF");
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.unk_token.as_deref(), Some("<|endoftext|>"));
}

#[test]
fn save_and_reload_round_trip() {
    let tok = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    tok.save(tmp.path()).unwrap();
    let back = Tokenizer::from_dir(tmp.path()).unwrap().unwrap();
    check_golden(&back, "saved copy");
    assert_eq!(back.chat_template, tok.chat_template);
    assert_eq!((back.bos_token, back.eos_token, back.pad_token, back.unk_token), (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token));
    assert_eq!(back.model_max_length, Some(8192));
}

#[test]
fn config_variants_added_token_dicts_template_lists_and_jinja() {
    let src = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "lstrip": false, "special": true},
        "eos_token": "<|im_end|>",
        "pad_token": null,
        "model_max_length": 1e30,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    });
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap().unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token, None);
    assert_eq!(tok.model_max_length, None);
    assert_eq!(tok.chat_template.as_deref(), Some("D"));
    // transformers 5 layout: the template in its own file.
    std::fs::write(tmp.path().join("chat_template.jinja"), "J").unwrap();
    let tok = Tokenizer::from_dir(tmp.path()).unwrap().unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some("J"));
}

#[test]
fn missing_and_malformed_files() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(Tokenizer::from_dir(tmp.path()).unwrap().is_none());
    std::fs::write(tmp.path().join("tokenizer.json"), "{\n  \"version\": \"1.0\",\n  oops\n}").unwrap();
    let err = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json:3:"), "{err}");
    std::fs::copy(model_dir().join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    std::fs::write(tmp.path().join("tokenizer_config.json"), "{\"bos_token\": }").unwrap();
    let err = Tokenizer::from_dir(tmp.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json:1:"), "{err}");
}
