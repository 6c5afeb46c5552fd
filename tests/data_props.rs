//! Property tests over random conversations: the label mask never marks a token outside an
//! assistant turn (its content + end-of-turn token), and marks every token inside one.
//! The oracle builds the rendering by hand, piece by piece, so it knows each turn's bytes.

use proptest::prelude::*;
use qscript::data::tokenize::{tokenize_example, ChatTokenizer};
use qscript::data::{Message, Row};
use qscript::data::chat_template::ChatTemplate;
use qscript::model::hub::{resolve, ModelSource, DEFAULT_MODEL};
use qscript::model::Tokenizer;
use std::ops::Range;
use std::sync::OnceLock;

fn model_dir() -> std::path::PathBuf {
    match resolve(DEFAULT_MODEL, None).expect("resolve default model") {
        ModelSource::HfDir(d) => d,
        other => panic!("expected an HF dir, got {other:?}"),
    }
}

fn smol() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_dir(&model_dir()).unwrap().unwrap())
}

/// SmolLM2's BPE with Llama-3's special tokens and its BOS-adding post-processor.
fn llama() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
        let specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];
        let _ = t.inner.add_special_tokens(specials.iter().map(|s| tokenizers::AddedToken::from(*s, true)).collect::<Vec<_>>());
        let bos = t.token_to_id("<|begin_of_text|>").unwrap();
        let tp = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("<|begin_of_text|> $A")
            .unwrap()
            .special_tokens(vec![("<|begin_of_text|>", bos)])
            .build()
            .unwrap();
        t.inner.with_post_processor(Some(tp));
        let g: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/templates/renders.json")).unwrap(),
        )
        .unwrap();
        t.chat_template = Some(g["templates"]["llama3"]["chat_template"].as_str().unwrap().into());
        t.bos_token = Some("<|begin_of_text|>".into());
        t.eos_token = Some("<|eot_id|>".into());
        t
    })
}

fn chat_tokenizer(tok: &Tokenizer) -> ChatTokenizer<'_> {
    let tpl = ChatTemplate::new(tok.chat_template.as_deref().unwrap(), tok.bos_token.as_deref().unwrap(), tok.eos_token.as_deref().unwrap()).unwrap();
    let eos = vec![tok.token_to_id(tok.eos_token.as_deref().unwrap()).unwrap()];
    ChatTokenizer::new(tok, Some(tpl), eos)
}

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// SmolLM2's ChatML rendering and the byte ranges that must be trained.
fn chatml(msgs: &[Message]) -> (String, Vec<Range<usize>>) {
    let mut s = String::new();
    let mut spans = Vec::new();
    if msgs[0].role != "system" {
        s.push_str(SMOL_SYSTEM);
    }
    for m in msgs {
        s.push_str(&format!("<|im_start|>{}\n", m.role));
        let a = s.len();
        s.push_str(&m.content);
        s.push_str("<|im_end|>");
        if m.role == "assistant" {
            spans.push(a..s.len());
        }
        s.push('\n');
    }
    (s, spans)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace())
}

/// The golden Llama-3 template's rendering (content trimmed) and its trained ranges.
fn llama3(msgs: &[Message]) -> (String, Vec<Range<usize>>) {
    let mut s = String::from("<|begin_of_text|>");
    let mut spans = Vec::new();
    for m in msgs {
        s.push_str(&format!("<|start_header_id|>{}<|end_header_id|>\n\n", m.role));
        let a = s.len();
        s.push_str(py_strip(&m.content));
        s.push_str("<|eot_id|>");
        if m.role == "assistant" {
            spans.push(a..s.len());
        }
    }
    (s, spans)
}

fn content() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9 .,!?'\"-]{1,16}",
        1 => "[ \n\t]{1,3}",
        1 => "[éß漢字😀]{1,3}",
        1 => Just("<|im_end|>".to_string()),
        1 => Just("<|eot_id|>".to_string()),
        1 => "[0-9]{1,6}",
    ];
    prop::collection::vec(piece, 0..5).prop_map(|v| v.concat())
}

fn conversation() -> impl Strategy<Value = Vec<Message>> {
    let role = prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("assistant"), Just("user")];
    prop::collection::vec((role, content()), 1..7)
        .prop_map(|v| v.into_iter().map(|(r, c)| Message { role: r.into(), content: c }).collect())
}

/// The mask agrees with the oracle's spans: a trained token overlaps an assistant span, and a
/// token wholly inside one is trained.
fn check(tok: &Tokenizer, oracle: fn(&[Message]) -> (String, Vec<Range<usize>>), msgs: Vec<Message>) -> Result<(), TestCaseError> {
    let ct = chat_tokenizer(tok);
    let (text, spans) = oracle(&msgs);
    let rendered = ct.template.as_ref().unwrap().render(&Row::messages_json(&msgs), false, &Default::default()).unwrap();
    prop_assert_eq!(&rendered, &text);
    let ex = tokenize_example(&Row::messages(msgs), &ct, false).unwrap();
    let enc = tok.inner.encode(text.as_str(), false).unwrap();
    prop_assert_eq!(&ex.input_ids, &enc.get_ids().to_vec());
    for (k, &(a, b)) in enc.get_offsets().iter().enumerate() {
        let overlaps = spans.iter().any(|s| a < s.end && b > s.start);
        let inside = spans.iter().any(|s| a >= s.start && b <= s.end);
        if ex.trained[k] {
            prop_assert!(overlaps, "token {} {:?} at {}..{} is trained outside every assistant turn in {:?}", k, &text[a..b], a, b, text);
        } else {
            prop_assert!(!inside, "token {} {:?} inside an assistant turn is not trained in {:?}", k, &text[a..b], text);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn smollm2_mask_marks_only_assistant_tokens(msgs in conversation()) {
        check(smol(), chatml, msgs)?;
    }

    #[test]
    fn llama3_mask_marks_only_assistant_tokens(msgs in conversation()) {
        check(llama(), llama3, msgs)?;
    }
}
