//! Chat templates of the model families with their real tokenizers: hand-checked assistant
//! masks (exact trained text and token ids), end-of-turn and stop tokens.
//!
//! Tokenizers: `tests/data/tokenizers/{mistral,phi3}` are committed (see the README there);
//! Qwen3's and Gemma 3's are fetched by `tests/data/tokenizers/fetch.sh` (CI runs it). A test
//! whose tokenizer is absent prints why and returns. The template under test is always the
//! golden one of `tests/golden/templates/families.json` (as the models ship it).

mod common;
use common::chat::{chat_tokenizer, msgs, owned, runs};

use qscript::data::tokenize::{tokenize_dataset, tokenize_example, ChatTokenizer, TokenizeOptions, TokenizedExample};
use qscript::data::{Dataset, Row};
use qscript::model::Tokenizer;
use serde_json::Value;
use std::path::Path;

fn golden_template(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/templates/families.json");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    g["templates"][name]["chat_template"].as_str().unwrap().to_string()
}

/// The real tokenizer of `family` with the golden `template`; None (and a printed reason) when
/// it was not fetched.
fn tokenizer(family: &str, template: &str) -> Option<Tokenizer> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizers");
    let dir = [base.join(family), base.join("fetched").join(family)].into_iter().find(|d| d.join("tokenizer.json").is_file());
    let Some(dir) = dir else {
        eprintln!("SKIP: no {family} tokenizer (run tests/data/tokenizers/fetch.sh)");
        return None;
    };
    let mut t = Tokenizer::from_dir(&dir).unwrap().unwrap();
    t.chat_template = Some(golden_template(template));
    Some(t)
}

/// The trained ids must be exactly each answer tokenized alone plus the end-of-turn token:
/// no prompt token leaks in, no answer token is lost at a boundary.
fn assert_trained_ids(ex: &TokenizedExample, tok: &Tokenizer, answers: &[&str], eot: &str) {
    let eot = tok.token_to_id(eot).unwrap();
    let trained: Vec<u32> = ex.input_ids.iter().zip(&ex.trained).filter(|(_, &t)| t).map(|(&id, _)| id).collect();
    let mut want = Vec::new();
    for a in answers {
        want.extend(tok.encode(a, false).unwrap());
        want.push(eot);
    }
    assert_eq!(trained, want);
}

fn lint_kinds(tok: &Tokenizer, rows: Vec<Row>) -> Vec<&'static str> {
    let t = tokenize_dataset(&Dataset::new(rows), &chat_tokenizer(tok), &TokenizeOptions::default()).unwrap();
    t.report.lints.iter().map(|l| l.kind).collect()
}

const CONVO: &[(&str, &str)] = &[("system", "S"), ("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Goodbye")];

const QWEN_SYS: &str = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";

#[test]
fn qwen25_masks_content_and_im_end() {
    let Some(tok) = tokenizer("qwen3", "qwen2.5") else { return };
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Hello there<|im_end|>"),
            (false, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Goodbye<|im_end|>"),
            (false, "\n"),
        ])
    );
    assert_trained_ids(&ex, &tok, &["Hello there", "Goodbye"], "<|im_end|>");
    // The default system prompt the template adds is never trained.
    let ex = tokenize_example(&msgs(&CONVO[1..3]), &ct, false).unwrap();
    assert_eq!(runs(&ex, &tok)[0], (false, format!("{QWEN_SYS}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")));
    assert!(lint_kinds(&tok, vec![msgs(CONVO)]).is_empty());
}

#[test]
fn qwen3_masks_what_the_whole_conversation_renders() {
    let Some(tok) = tokenizer("qwen3", "qwen3") else { return };
    let ct = chat_tokenizer(&tok);
    // No reasoning: the template adds an empty think block to the turn after the last user
    // message (the model writes it after `<|im_start|>assistant\n`, so it is trained) and not
    // to earlier turns.
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Hello there<|im_end|>"),
            (false, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
            (true, "<think>\n\n</think>\n\nGoodbye<|im_end|>"),
            (false, "\n"),
        ])
    );
    assert_trained_ids(&ex, &tok, &["Hello there", "<think>\n\n</think>\n\nGoodbye"], "<|im_end|>");
    // Reasoning in both turns: the template drops the first turn's, keeps the last one's.
    let think = [("user", "Hi"), ("assistant", "<think>\nplan A\n</think>\n\nHello"), ("user", "Bye"), ("assistant", "<think>\nplan B\n</think>\n\nGoodbye")];
    let ex = tokenize_example(&msgs(&think), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Hello<|im_end|>"),
            (false, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
            (true, "<think>\nplan B\n</think>\n\nGoodbye<|im_end|>"),
            (false, "\n"),
        ])
    );
    let think_id = tok.token_to_id("<think>").unwrap();
    assert_eq!(ex.input_ids.iter().filter(|&&i| i == think_id).count(), 1, "plan A must not be in the sequence");
    // A tool round trip: the answer before the tool result loses its empty think block.
    let tools = [("user", "Weather?"), ("assistant", "Calling."), ("tool", "sunny"), ("assistant", "It is sunny.")];
    let ex = tokenize_example(&msgs(&tools), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Calling.<|im_end|>"),
            (false, "\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
            (true, "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"),
            (false, "\n"),
        ])
    );
    // Each re-rendered turn is counted in a lint; a single turn is not re-rendered.
    assert_eq!(lint_kinds(&tok, vec![msgs(&think), msgs(&CONVO[1..3])]), ["template-rewrites-turns"]);
    assert!(lint_kinds(&tok, vec![msgs(&CONVO[1..3])]).is_empty());
}

#[test]
fn gemma3_masks_model_turns_and_end_of_turn() {
    let Some(tok) = tokenizer("gemma3", "gemma3") else { return };
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    // The system message goes into the first user turn; `assistant` is rendered as `model`.
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\n"),
            (true, "Hello there<end_of_turn>"),
            (false, "\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
            (true, "Goodbye<end_of_turn>"),
            (false, "\n"),
        ])
    );
    assert_trained_ids(&ex, &tok, &["Hello there", "Goodbye"], "<end_of_turn>");
    // One BOS (the template writes it; rendered text is tokenized without specials), and the
    // template trims the answer.
    assert_eq!(ex.input_ids.iter().filter(|&&i| Some(i) == tok.token_to_id("<bos>")).count(), 1);
    let ex = tokenize_example(&msgs(&[("user", "a"), ("assistant", "  b  ")]), &ct, false).unwrap();
    assert_eq!(runs(&ex, &tok)[1], (true, "b<end_of_turn>".to_string()));
    assert!(lint_kinds(&tok, vec![msgs(CONVO)]).is_empty());
}

#[test]
fn phi3_masks_content_and_end() {
    let Some(tok) = tokenizer("phi3", "phi3") else { return };
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(&CONVO[1..]), &ct, false).unwrap();
    // Phi-3's chat tokens strip the whitespace after them (rstrip): the "\n" the template writes
    // after `<|end|>` and `<|assistant|>` is part of those tokens, and " Hi" is SentencePiece's
    // word-initial "▁Hi".
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|user|> Hi<|end|><|assistant|>"),
            (true, "Hello there<|end|>"),
            (false, "<|user|> Bye<|end|><|assistant|>"),
            (true, "Goodbye<|end|>"),
        ])
    );
    assert_trained_ids(&ex, &tok, &["Hello there", "Goodbye"], "<|end|>");
    // A system turn is rendered as `<|system|>` and never trained.
    let ex = tokenize_example(&msgs(&CONVO[..3]), &ct, false).unwrap();
    assert_eq!(runs(&ex, &tok)[0], (false, "<|system|> S<|end|><|user|> Hi<|end|><|assistant|>".to_string()));
}

#[test]
fn mistral_masks_content_and_eos() {
    let Some(tok) = tokenizer("mistral", "mistral") else { return };
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(&CONVO[1..]), &ct, false).unwrap();
    let inst = |s: &str| tok.decode(&tok.encode(&format!("[INST] {s} [/INST]"), false).unwrap(), false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        vec![
            (false, format!("<s>{}", inst("Hi"))),
            (true, "Hello there</s>".into()),
            (false, inst("Bye")),
            (true, "Goodbye</s>".into()),
        ]
    );
    assert_trained_ids(&ex, &tok, &["Hello there", "Goodbye"], "</s>");
    // `[INST]`, `[/INST]` are control tokens, never trained; the system message joins the
    // first user turn.
    let ex = tokenize_example(&msgs(&CONVO[..3]), &ct, false).unwrap();
    assert_eq!(ex.input_ids[..2], [tok.token_to_id("<s>").unwrap(), tok.token_to_id("[INST]").unwrap()]);
    assert_eq!(runs(&ex, &tok)[1], (true, "Hello there</s>".to_string()));
}

#[test]
fn phi4_masks_content_and_im_end() {
    // Phi-4's ChatML with `<|im_sep|>`: Qwen's byte-level BPE with that token added stands in
    // for Phi-4's tokenizer (same kind of BPE; no registry ships Phi-4's).
    let Some(mut tok) = tokenizer("qwen3", "phi4") else { return };
    tok.inner.add_special_tokens(vec![tokenizers::AddedToken::from("<|im_sep|>", true)]).unwrap();
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, &tok),
        owned(&[
            (false, "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"),
            (true, "Hello there<|im_end|>"),
            (false, "<|im_start|>user<|im_sep|>Bye<|im_end|><|im_start|>assistant<|im_sep|>"),
            (true, "Goodbye<|im_end|>"),
        ])
    );
}

/// The end-of-turn token each template writes after an answer, and chat generation's stop
/// ids (eos ids + that token) even when the model's eos is another token.
#[test]
fn end_of_turn_and_stop_tokens() {
    for (family, template, eot) in [
        ("qwen3", "qwen2.5", "<|im_end|>"),
        ("qwen3", "qwen3", "<|im_end|>"),
        ("gemma3", "gemma3", "<end_of_turn>"),
        ("phi3", "phi3", "<|end|>"),
        ("mistral", "mistral", "</s>"),
    ] {
        let Some(tok) = tokenizer(family, template) else { continue };
        let eot_id = tok.token_to_id(eot).unwrap();
        let ct = chat_tokenizer(&tok);
        assert_eq!(ct.end_of_turn, Some(eot_id), "{template}");
        assert_eq!(ct.chat_stop_ids(), vec![eot_id], "{template}");
        // A checkpoint whose generation_config stops on the end-of-text token only (Gemma's
        // `<eos>`, Phi-3's `<|endoftext|>`) still stops chat answers at the end of the turn.
        let other = ["<|endoftext|>", "<eos>", "<unk>"].into_iter().find_map(|t| tok.token_to_id(t).filter(|&i| i != eot_id)).unwrap();
        let ct = ChatTokenizer::new(&tok, chat_tokenizer(&tok).template, vec![other]);
        assert_eq!(ct.chat_stop_ids(), vec![other, eot_id], "{template}");
    }
}
