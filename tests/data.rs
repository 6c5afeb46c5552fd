//! Datasets: formats, bad input, golden template renders through the data path, hand-checked
//! label masks (SmolLM2 / Llama-3 / Llama-3.1 templates), lints, truncation, padding, packing,
//! deterministic and resumable batch order, and the Rhai API.

mod common;
use common::chat::{chat_tokenizer, msgs, owned, runs};

use qscript::data::load::Reason;
use qscript::data::tokenize::{tokenize_example, ChatTokenizer};
use qscript::data::*;
use qscript::data::chat_template::ChatTemplate;
use qscript::model::hub::{resolve, ModelSource, DEFAULT_MODEL};
use qscript::model::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name).display().to_string()
}

fn load(spec: &str) -> (Dataset, LoadReport) {
    load_dataset(spec, &LoadOptions::default()).unwrap_or_else(|e| panic!("{spec}: {e:#}"))
}

fn model_dir() -> PathBuf {
    match resolve(DEFAULT_MODEL, None).expect("resolve default model") {
        ModelSource::HfDir(d) => d,
        other => panic!("expected an HF dir, got {other:?}"),
    }
}

/// SmolLM2-135M-Instruct's tokenizer (ChatML template, pad = eos = `<|im_end|>`).
fn smol() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_dir(&model_dir()).unwrap().expect("tokenizer.json"))
}

fn golden() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/templates/renders.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn golden_template_src(name: &str) -> (String, String, String) {
    let g = golden();
    let t = &g["templates"][name];
    (t["chat_template"].as_str().unwrap().into(), t["bos_token"].as_str().unwrap().into(), t["eos_token"].as_str().unwrap().into())
}

/// SmolLM2's BPE with Llama-3's special tokens added, a post-processor that adds
/// `<|begin_of_text|>` (as Llama-3's does), and the given golden template.
fn llama_tokenizer(template: &str) -> Tokenizer {
    let mut t = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
    let specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"];
    let _ = t.inner.add_special_tokens(specials.iter().map(|s| tokenizers::AddedToken::from(*s, true)).collect::<Vec<_>>());
    let bos = t.token_to_id("<|begin_of_text|>").unwrap();
    let tp = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<|begin_of_text|> $A")
        .unwrap()
        .special_tokens(vec![("<|begin_of_text|>", bos)])
        .build()
        .unwrap();
    t.inner.with_post_processor(Some(tp));
    let (src, _, _) = golden_template_src(template);
    t.chat_template = Some(src);
    t.bos_token = Some("<|begin_of_text|>".into());
    t.eos_token = Some("<|eot_id|>".into());
    t.pad_token = Some("<|end_of_text|>".into());
    t
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

fn load_err(spec: &str, opts: LoadOptions) -> String {
    format!("{:#}", load_dataset(spec, &opts).expect_err("must fail"))
}

fn skip() -> LoadOptions {
    LoadOptions { on_error: OnError::Skip, ..Default::default() }
}

// ---------------------------------------------------------------- formats

#[test]
fn sharegpt_jsonl_normalises_roles_and_keeps_extra_fields() {
    let (ds, rep) = load(&fixture("sharegpt.jsonl"));
    assert_eq!(ds.len(), 2);
    assert_eq!(
        ds.get(0).unwrap().record,
        Record::Messages(vec![
            Message { role: "system".into(), content: "Be brief.".into() },
            Message { role: "user".into(), content: "Hi!".into() },
            Message { role: "assistant".into(), content: "Hello.".into() },
        ])
    );
    let Record::Messages(m) = &ds.get(1).unwrap().record else { panic!() };
    assert_eq!(m.iter().map(|x| x.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "user", "assistant"]);
    assert_eq!(ds.get(1).unwrap().extra["id"], json!("a2"));
    assert_eq!(rep.by_format[&Format::Conversations], 2);
    assert!(rep.summary().starts_with("loaded 2 records from ") && rep.summary().contains("(conversations 2); skipped 0"), "{}", rep.summary());
}

#[test]
fn messages_alpaca_prompt_completion_text() {
    let (ds, _) = load(&fixture("messages.jsonl"));
    assert_eq!(ds.get(1).unwrap().to_json(), json!({"messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "Yes."}], "source": "parts"}));

    let (ds, rep) = load(&fixture("alpaca.json"));
    assert_eq!(rep.by_format[&Format::Alpaca], 2);
    assert_eq!(ds.get(0).unwrap().to_json()["messages"], json!([
        {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]));
    assert_eq!(ds.get(1).unwrap().to_json(), json!({"messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], "category": "greeting"}));

    let (ds, _) = load(&fixture("prompt_completion.csv"));
    assert_eq!(ds.get(0).unwrap().to_json(), json!({"messages": [
        {"role": "user", "content": "Say \"hi\", please"}, {"role": "assistant", "content": "Hi"}], "lang": "en"}));
    assert_eq!(ds.get(1).unwrap().to_json()["messages"][1]["content"], json!("2, 3"));

    let (ds, rep) = load(&fixture("text.tsv"));
    assert_eq!(rep.by_format[&Format::Text], 2);
    assert_eq!(ds.get(1).unwrap().to_json(), json!({"text": "Jumps over the lazy dog.", "source": "book"}));
}

#[test]
fn json_object_holding_arrays_needs_split_when_ambiguous() {
    let e = load_err(&fixture("nested.json"), LoadOptions::default());
    assert!(e.contains("pick the array with `split:`") && e.contains("test, train"), "{e}");
    // Skipped and counted when skipping (alpaca.json loads, nested.json does not).
    let (ds, rep) = load_dataset(&fixture("*.json"), &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::FileStructure]), (2, 1));
    assert!(rep.summary().contains("skipped 1: unusable file 1"), "{}", rep.summary());
    let (ds, _) = load_dataset(&fixture("nested.json"), &LoadOptions { split: Some("test".into()), ..Default::default() }).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.get(1).unwrap().to_json()["messages"][1]["content"], json!("Madrid."));
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "one.json", br#"{"data": [{"text": "a"}, {"text": "b"}], "version": 2}"#);
    assert_eq!(load(&p).0.len(), 2);
    // A .json file that is really JSON Lines.
    let p = write(tmp.path(), "lines.json", b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
    assert_eq!(load(&p).0.len(), 2);
}

#[test]
fn directory_and_glob() {
    let (ds, rep) = load(&fixture("dir"));
    assert_eq!(ds.len(), 4);
    assert_eq!(rep.files.len(), 2);
    assert_eq!(rep.ignored_files, 1);
    assert!(rep.summary().contains("from 2 files (messages 2, text 2)") && rep.summary().contains("ignored 1"), "{}", rep.summary());
    let (ds, rep) = load(&fixture("*.jsonl"));
    assert_eq!((ds.len(), rep.files.len()), (4, 2));
    assert!(load_err(&fixture("*.nothing"), LoadOptions::default()).contains("no files match"));
    assert!(load_err(&fixture("missing.jsonl"), LoadOptions::default()).contains("no such file"));
    assert!(load_err(&fixture("dir/README.md"), LoadOptions::default()).contains("unsupported file type"));
}

#[test]
fn forced_format() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "x.jsonl", b"{\"text\": \"hello\", \"messages\": 3}\n");
    let (ds, _) = load_dataset(&p, &LoadOptions { format: Some(Format::Text), ..Default::default() }).unwrap();
    assert_eq!(ds.get(0).unwrap().record, Record::Text("hello".into()));
    let e = load_err(&p, LoadOptions::default());
    assert!(e.contains("`messages` must be an array"), "{e}");
    let e = load_err(&fixture("alpaca.json"), LoadOptions { format: Some(Format::Messages), ..Default::default() });
    assert!(e.contains("alpaca.json:2: record 0: record looks like `alpaca`, not the requested format `messages`"), "{e}");
}

// ---------------------------------------------------------------- bad input

fn sixty_lines_with_bad_57(bad: &str) -> Vec<u8> {
    let mut s = String::new();
    for i in 1..=60 {
        if i == 57 {
            s.push_str(bad);
        } else {
            s.push_str(&format!(r#"{{"messages": [{{"role": "user", "content": "q{i}"}}, {{"role": "assistant", "content": "a{i}"}}]}}"#));
        }
        s.push('\n');
    }
    s.into_bytes()
}

#[test]
fn malformed_json_line_names_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "data.jsonl", &sixty_lines_with_bad_57(r#"{"messages": [{"role": "user", "content": "x"} {"role": "assistant"}]}"#));
    let e = load_err(&p, LoadOptions::default());
    assert_eq!(e, format!("{p}:57:48: invalid JSON: expected `,` or `]`"));
    let (ds, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::InvalidJson]), (59, 1));
    let s = rep.summary();
    assert!(s.contains("loaded 59 records") && s.contains("skipped 1: invalid JSON 1") && s.contains("data.jsonl:57:48"), "{s}");
}

#[test]
fn missing_field_names_record_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "data.jsonl", &sixty_lines_with_bad_57(r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}"#));
    let e = load_err(&p, LoadOptions::default());
    assert_eq!(e, format!("{p}:57: record 56: `messages` message 1: missing field `content`"));
    let p = write(tmp.path(), "alp.json", b"[\n {\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": \"c\", \"outptu\": \"d\"}\n]");
    let e = load_err(&p, LoadOptions::default());
    assert_eq!(e, format!("{p}:3: record 1: missing field `output` (format `alpaca`)"));
    let (ds, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::MissingField]), (1, 1));
    // Wrong types are named too.
    let p = write(tmp.path(), "t.jsonl", b"{\"text\": 5}\n");
    assert!(load_err(&p, LoadOptions::default()).ends_with(":1: record 0: `text` must be a string, got a number"));
}

#[test]
fn unknown_role() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "c.jsonl", b"{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"bot\", \"value\": \"yo\"}]}\n{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}]}\n");
    let e = load_err(&p, LoadOptions::default());
    assert_eq!(e, format!("{p}:1: record 0: `conversations` message 1: unknown role \"bot\" (expected one of: human, user, gpt, assistant, system, tool)"));
    let (ds, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::UnknownRole]), (1, 1));
    // `gpt` is a ShareGPT role, not an OpenAI one.
    let p = write(tmp.path(), "m.jsonl", b"{\"messages\": [{\"role\": \"gpt\", \"content\": \"x\"}]}\n");
    assert!(load_err(&p, LoadOptions::default()).contains("unknown role \"gpt\" (expected one of: system, user, assistant, tool)"));
}

#[test]
fn empty_files() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, body) in [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"), ("e.csv", "text\n"), ("w.json", " \n")] {
        let p = write(tmp.path(), name, body.as_bytes());
        assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}: empty file (no records)"), "{name}");
    }
    // Skipped and counted in a directory with good files.
    let d = tmp.path().join("d");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.jsonl", b"");
    write(&d, "b.jsonl", b"{\"text\": \"x\"}\n");
    let (ds, rep) = load_dataset(&d.display().to_string(), &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::EmptyFile]), (1, 1));
    // Nothing at all left is an error even when skipping.
    let p = write(tmp.path(), "only.jsonl", b"");
    assert!(load_err(&p, skip()).contains("no records"));
}

#[test]
fn invalid_utf8_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut body = b"{\"text\": \"ok\"}\n{\"text\": \"caf".to_vec();
    body.extend_from_slice(&[0xC3, 0x28]);
    body.extend_from_slice(b"\"}\n{\"text\": \"fine\"}\n");
    let p = write(tmp.path(), "u.jsonl", &body);
    assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}:2: invalid UTF-8 at byte column 14"));
    let (ds, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::InvalidUtf8]), (2, 1));
    let p = write(tmp.path(), "u.json", &[b"[\n{\"text\": \"a\"},\n{\"text\": \"".as_slice(), &[0xFF], b"\"}]"].concat());
    assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}:3: invalid UTF-8 at byte column 11"));
    let p = write(tmp.path(), "u.csv", &[b"text\nok\nbad ".as_slice(), &[0xFF], b"\n"].concat());
    assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}:3: invalid UTF-8 in column `text` at byte 5"));
}

#[test]
fn mixed_formats_in_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "mix.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"instruction\": \"b\", \"output\": \"c\"}\n");
    let e = load_err(&p, LoadOptions::default());
    assert_eq!(e, format!("{p}:2: record 1: record looks like `alpaca` but the file's first record is `messages` (mixed formats in one file; split the file or pass `format:`)"));
    let (_, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!(rep.skipped[&Reason::MixedFormats], 1);
    // A record of no known format.
    let p = write(tmp.path(), "none.jsonl", b"{\"question\": \"a\", \"answer\": \"b\"}\n");
    assert!(load_err(&p, LoadOptions::default()).contains("none of the fields of a known format") && load_err(&p, LoadOptions::default()).contains("question, answer"));
}

#[test]
fn malformed_csv_and_json_document() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "r.csv", b"prompt,completion\na,b\nc,d,e\n");
    assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}:3: found 3 fields, expected 2 (as in the header)"));
    let (ds, rep) = load_dataset(&p, &skip()).unwrap();
    assert_eq!((ds.len(), rep.skipped[&Reason::Csv]), (1, 1));
    let p = write(tmp.path(), "bad.json", b"[\n {\"text\": \"a\"},\n {\"text\": }\n]");
    assert_eq!(load_err(&p, LoadOptions::default()), format!("{p}:3:11: invalid JSON: expected value"));
}

// ---------------------------------------------------------------- dataset ops

#[test]
fn shuffle_select_split_concat_roundtrip() {
    let rows: Vec<Row> = (0..10).map(|i| Row::text(format!("t{i}"))).collect();
    let ds = Dataset::new(rows);
    let a = ds.shuffle(7);
    assert_eq!(a.rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(), ds.shuffle(7).rows.iter().map(|r| r.to_json()).collect::<Vec<_>>());
    assert_ne!(a.rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(), ds.rows.iter().map(|r| r.to_json()).collect::<Vec<_>>());
    assert_eq!(ds.select(&[3, 1]).unwrap().get(0).unwrap().record, Record::Text("t3".into()));
    assert!(ds.select(&[10]).unwrap_err().to_string().contains("out of range"));
    let (train, test) = ds.train_test_split(3, 1, true).unwrap();
    assert_eq!((train.len(), test.len()), (7, 3));
    let all = train.concat(&test);
    let mut texts: Vec<String> = all.rows.iter().map(|r| r.to_json()["text"].as_str().unwrap().to_string()).collect();
    texts.sort();
    assert_eq!(texts, (0..10).map(|i| format!("t{i}")).collect::<Vec<_>>());
    assert!(ds.train_test_split(10, 1, true).is_err());

    let tmp = tempfile::tempdir().unwrap();
    let (orig, _) = load(&fixture("sharegpt.jsonl"));
    let out = tmp.path().join("out.jsonl");
    orig.to_jsonl(&out).unwrap();
    let (back, rep) = load(&out.display().to_string());
    assert_eq!(rep.by_format[&Format::Messages], 2);
    assert_eq!(back.rows, orig.rows);
}

// ---------------------------------------------------------------- templates and masks

#[test]
fn golden_renders_through_the_data_path() {
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 72);
    let tmp = tempfile::tempdir().unwrap();
    let mut body = String::new();
    for c in cases {
        body.push_str(&serde_json::to_string(&json!({"messages": c["messages"]})).unwrap());
        body.push('\n');
    }
    let p = write(tmp.path(), "cases.jsonl", body.as_bytes());
    let (ds, _) = load(&p);
    assert_eq!(ds.len(), 72);
    let smol_ct = chat_tokenizer(smol());
    for (i, c) in cases.iter().enumerate() {
        let (src, bos, eos) = golden_template_src(c["template"].as_str().unwrap());
        let tpl = ChatTemplate::new(&src, &bos, &eos).unwrap();
        let Record::Messages(m) = &ds.get(i).unwrap().record else { panic!() };
        let out = tpl.render(&Row::messages_json(m), c["add_generation_prompt"].as_bool().unwrap(), &Default::default()).unwrap();
        assert_eq!(out, c["rendered"].as_str().unwrap(), "case {i}");
        // The tokenized example is the tokenization of exactly that text.
        if c["template"] == "smollm2" && c["add_generation_prompt"] == false {
            let ex = tokenize_example(ds.get(i).unwrap(), &smol_ct, true).unwrap();
            assert_eq!(ex.input_ids, smol().encode(&out, false).unwrap(), "case {i}");
        }
    }
}

const CONVO: &[(&str, &str)] = &[("system", "S"), ("user", "Hi"), ("assistant", "Hello there"), ("user", "Bye"), ("assistant", "Goodbye")];

#[test]
fn smollm2_mask_is_assistant_content_and_im_end() {
    let tok = smol();
    let ct = chat_tokenizer(tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    assert_eq!(
        runs(&ex, tok),
        owned(&[
            (false, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Hello there<|im_end|>"),
            (false, "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
            (true, "Goodbye<|im_end|>"),
            (false, "\n"),
        ])
    );
    // Ids: the trained tokens are exactly `Hello`, ` there`, <|im_end|>, `Good`, `bye`, <|im_end|>.
    let im_end = tok.token_to_id("<|im_end|>").unwrap() as i64;
    let trained: Vec<i64> = ex.labels().into_iter().filter(|&l| l != IGNORE_INDEX).collect();
    let mut expect: Vec<i64> = tok.encode("Hello there", false).unwrap().iter().map(|&x| x as i64).collect();
    expect.push(im_end);
    expect.extend(tok.encode("Goodbye", false).unwrap().iter().map(|&x| x as i64));
    expect.push(im_end);
    assert_eq!(trained, expect);

    // The default system prompt the template adds is never trained; train_on_inputs trains all.
    let ex = tokenize_example(&msgs(&[("user", "Hi"), ("assistant", "Yo")]), &ct, false).unwrap();
    assert_eq!(runs(&ex, tok)[1], (true, "Yo<|im_end|>".to_string()));
    assert!(runs(&ex, tok)[0].1.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    // An assistant turn first: the generation prompt rendered alone lacks the default system
    // prompt, so the probe renders locate the content.
    let ex = tokenize_example(&msgs(&[("assistant", "Welcome!"), ("user", "Hi"), ("assistant", "Yo")]), &ct, false).unwrap();
    let sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    assert_eq!(
        runs(&ex, tok),
        vec![
            (false, format!("{sys}<|im_start|>assistant\n")),
            (true, "Welcome!<|im_end|>".into()),
            (false, "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n".into()),
            (true, "Yo<|im_end|>".into()),
            (false, "\n".into()),
        ]
    );
    let all = tokenize_example(&msgs(CONVO), &ct, true).unwrap();
    assert!(all.trained.iter().all(|&t| t));
    assert_eq!(all.input_ids, ex_ids(&ct, CONVO));
}

fn ex_ids(ct: &ChatTokenizer, turns: &[(&str, &str)]) -> Vec<u32> {
    tokenize_example(&msgs(turns), ct, false).unwrap().input_ids
}

#[test]
fn llama3_mask_is_assistant_content_and_eot() {
    let tok = llama_tokenizer("llama3");
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    let h = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
    assert_eq!(
        runs(&ex, &tok),
        vec![
            (false, format!("<|begin_of_text|>{}S<|eot_id|>{}Hi<|eot_id|>{}", h("system"), h("user"), h("assistant"))),
            (true, "Hello there<|eot_id|>".into()),
            (false, format!("{}Bye<|eot_id|>{}", h("user"), h("assistant"))),
            (true, "Goodbye<|eot_id|>".into()),
        ]
    );
    // One BOS: the template writes it and the rendered text is tokenized without specials.
    let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
    assert_eq!(ex.input_ids.iter().filter(|&&i| i == bos).count(), 1);
    // The template trims content; the trimmed spaces are nowhere.
    let ex = tokenize_example(&msgs(&[("user", " a "), ("assistant", "  b  ")]), &ct, false).unwrap();
    assert_eq!(runs(&ex, &tok)[1], (true, "b<|eot_id|>".to_string()));
}

#[test]
fn llama31_mask_is_assistant_content_and_eot() {
    let tok = llama_tokenizer("llama3.1");
    let ct = chat_tokenizer(&tok);
    let ex = tokenize_example(&msgs(CONVO), &ct, false).unwrap();
    let h = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
    let sys = format!("<|begin_of_text|>{}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nS<|eot_id|>", h("system"));
    assert_eq!(
        runs(&ex, &tok),
        vec![
            (false, format!("{sys}{}Hi<|eot_id|>{}", h("user"), h("assistant"))),
            (true, "Hello there<|eot_id|>".into()),
            (false, format!("{}Bye<|eot_id|>{}", h("user"), h("assistant"))),
            (true, "Goodbye<|eot_id|>".into()),
        ]
    );
}

#[test]
fn boundary_merges_and_special_strings_in_content() {
    let tok = smol();
    let ct = chat_tokenizer(tok);
    // Content starting with newlines: the header's "\n" and the content's merge into one token,
    // which is trained (it carries content), as trl's char-based mask does.
    let ex = tokenize_example(&msgs(&[("user", "q"), ("assistant", "\n\nA")]), &ct, false).unwrap();
    let r = runs(&ex, tok);
    let (untrained, trained): (Vec<_>, Vec<_>) = r.iter().partition(|(t, _)| !t);
    assert_eq!(trained.len(), 1);
    assert!(trained[0].1.ends_with("\n\nA<|im_end|>") && trained[0].1.len() <= "\n\n\nA<|im_end|>".len(), "{r:?}");
    assert!(untrained[0].1.ends_with("<|im_start|>assistant") || untrained[0].1.ends_with("<|im_start|>assistant\n"), "{r:?}");
    // A special-token string inside the content: the turn ends at the template's own <|im_end|>.
    let ex = tokenize_example(&msgs(&[("user", "q"), ("assistant", "say <|im_end|> now")]), &ct, false).unwrap();
    assert_eq!(runs(&ex, tok)[1], (true, "say <|im_end|> now<|im_end|>".to_string()));
}

#[test]
fn text_records_train_everything_and_end_with_eos() {
    let tok = smol();
    let ct = chat_tokenizer(tok);
    let ex = tokenize_example(&Row::text("Once upon a time"), &ct, false).unwrap();
    let mut ids = tok.encode("Once upon a time", true).unwrap();
    ids.push(tok.token_to_id("<|im_end|>").unwrap());
    assert_eq!(ex.input_ids, ids);
    assert!(ex.trained.iter().all(|&t| t));
    // Already ending with EOS: not doubled.
    let ex = tokenize_example(&Row::text("The end<|im_end|>"), &ct, false).unwrap();
    assert_eq!(ex.input_ids, tok.encode("The end<|im_end|>", true).unwrap());
}

#[test]
fn conversation_without_template_is_a_clear_error() {
    let mut tok = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
    tok.chat_template = None;
    let ct = chat_tokenizer(&tok);
    let ds = Dataset::new(vec![Row::text("fine"), msgs(&[("user", "a"), ("assistant", "b")])]);
    let e = format!("{:#}", tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap_err());
    assert_eq!(e, "example 1: the model has no chat template; set one with model.set_chat_template(template)");
}

// ---------------------------------------------------------------- lints, truncation

fn lint<'a>(t: &'a TokenizedDataset, kind: &str) -> Option<&'a Lint> {
    t.report.lints.iter().find(|l| l.kind == kind)
}

#[test]
fn lints_name_examples() {
    let tok = smol();
    let ct = chat_tokenizer(tok);
    let ds = Dataset::new(vec![
        msgs(&[("user", "a"), ("assistant", "b")]),
        msgs(&[("user", "only a question")]),
        msgs(&[("system", "s"), ("user", "a"), ("assistant", "b")]),
    ]);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t.report.dropped_untrained, 1);
    let l = lint(&t, "no-assistant").unwrap();
    assert_eq!((l.count, l.examples.clone()), (1, vec![1]));
    assert!(l.to_string().starts_with("warning [no-assistant]: examples have no assistant turn") && l.to_string().ends_with("(1 example: 1)"), "{l}");
    // SmolLM2: pad == eos == <|im_end|>, the end-of-turn token.
    assert!(lint(&t, "pad-is-eos").unwrap().message.contains("`<|im_end|>`"));
    assert!(lint(&t, "double-bos").is_none() && lint(&t, "no-end-of-turn").is_none() && lint(&t, "end-not-eos").is_none());
    assert!(lint(&t, "template-drops-role").is_none());

    // A template that drops system messages and ends turns with no special token.
    let mut plain = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
    plain.chat_template = Some("{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}".into());
    let ct = chat_tokenizer(&plain);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap();
    let l = lint(&t, "template-drops-role").unwrap();
    assert!(l.message.contains("`system`") && l.examples == vec![2], "{l}");
    assert_eq!(lint(&t, "no-end-of-turn").unwrap().examples, vec![0, 2]);

    // ChatML turns but an EOS that is not <|im_end|>: generation would not stop.
    let mut other = Tokenizer::from_dir(&model_dir()).unwrap().unwrap();
    other.eos_token = Some("<|endoftext|>".into());
    let ct = chat_tokenizer(&other);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap();
    assert!(lint(&t, "end-not-eos").unwrap().message.contains("end with `<|im_end|>`, which does not stop generation (stop tokens: `<|endoftext|>`)"));

    // Double BOS: a text that starts with BOS, tokenized by a tokenizer that adds one.
    let ll = llama_tokenizer("llama3");
    let ct = chat_tokenizer(&ll);
    let ds = Dataset::new(vec![Row::text("plain"), Row::text("<|begin_of_text|>Once")]);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap();
    assert_eq!(lint(&t, "double-bos").unwrap().examples, vec![1]);
    // No pad token: falls back to EOS, with a lint.
    let mut nopad = llama_tokenizer("llama3");
    nopad.pad_token = None;
    let t = tokenize_dataset(&ds, &chat_tokenizer(&nopad), &TokenizeOptions::default()).unwrap();
    assert_eq!(t.pad_id, nopad.token_to_id("<|eot_id|>").unwrap());
    assert!(lint(&t, "no-pad-token").is_some());
}

#[test]
fn truncation_policies_are_counted() {
    let tok = smol();
    let ct = chat_tokenizer(tok);
    let long = "word ".repeat(50);
    let ds = Dataset::new(vec![msgs(&[("user", "hi"), ("assistant", &long)]), msgs(&[("user", "hi"), ("assistant", "short")]), msgs(&[("user", &long), ("assistant", "x")])]);
    let full: Vec<usize> = (0..3).map(|i| tokenize_example(ds.get(i).unwrap(), &ct, false).unwrap().len()).collect();
    let max = 40;
    assert!(full[0] > max && full[1] < max && full[2] > max);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions { max_seq_length: Some(max), ..Default::default() }).unwrap();
    // Example 2 loses its only assistant token to truncation: dropped, and said so.
    assert_eq!((t.len(), t.report.truncated, t.report.dropped_untrained), (2, 2, 1));
    assert_eq!(t.examples[0].len(), max);
    assert_eq!(t.examples[0].truncated_from, Some(full[0]));
    assert_eq!(lint(&t, "nothing-trained").unwrap().examples, vec![2]);
    let t = tokenize_dataset(&ds, &ct, &TokenizeOptions { max_seq_length: Some(max), truncation: Truncation::Drop, ..Default::default() }).unwrap();
    assert_eq!((t.len(), t.report.dropped_too_long, t.examples[0].index), (1, 2, 1));
    assert_eq!(t.report.summary(), format!("tokenized 3 records: 1 examples, {} tokens ({} trained); truncated 0, dropped 2 (too long 2, nothing to train 0)", full[1], t.examples[0].num_trained()));
    let s = stats(&ds, &ct, Some(max), false).unwrap();
    let mut sorted = full.clone();
    sorted.sort();
    assert_eq!((s.count, s.min, s.p50, s.max, s.over_max_seq_length), (3, sorted[0], sorted[1], sorted[2], 2));
}

// ---------------------------------------------------------------- batches

/// Examples with given lengths; ids are 100·(example) + position, the first half untrained.
fn synthetic(lens: &[usize], max: Option<usize>) -> Arc<TokenizedDataset> {
    let examples = lens
        .iter()
        .enumerate()
        .map(|(e, &l)| TokenizedExample {
            index: e,
            input_ids: (0..l).map(|p| (100 * (e + 1) + p) as u32).collect(),
            trained: (0..l).map(|p| p >= l / 2).collect(),
            truncated_from: None,
        })
        .collect();
    Arc::new(TokenizedDataset { examples, pad_id: 7, max_seq_length: max, report: Default::default() })
}

fn row<T: Copy>(v: &[T], b: &Batch, r: usize) -> Vec<T> {
    v[r * b.seq..(r + 1) * b.seq].to_vec()
}

#[test]
fn padding_layout() {
    let data = synthetic(&[3, 5, 2], None);
    let it = BatchIterator::new(data, BatchOptions { batch_size: 2, shuffle: false, ..Default::default() }).unwrap();
    let ep = it.epoch(0);
    assert_eq!(ep.len(), 2);
    let b = &ep[0];
    assert_eq!((b.batch, b.seq), (2, 5));
    assert_eq!(row(&b.input_ids, b, 0), [100, 101, 102, 7, 7]);
    assert_eq!(row(&b.labels, b, 0), [-100, 101, 102, -100, -100]);
    assert_eq!(row(&b.attention_mask, b, 0), [1, 1, 1, 0, 0]);
    assert_eq!(row(&b.position_ids, b, 0), [0, 1, 2, 0, 0]);
    assert_eq!(row(&b.segment_ids, b, 0), [1, 1, 1, 0, 0]);
    assert_eq!(row(&b.input_ids, b, 1), [200, 201, 202, 203, 204]);
    assert_eq!(row(&b.labels, b, 1), [-100, -100, 202, 203, 204]);
    assert_eq!(b.examples, vec![vec![0], vec![1]]);
    // The last batch is padded to its own longest row only.
    assert_eq!((ep[1].batch, ep[1].seq), (1, 2));
    let it = BatchIterator::new(synthetic(&[3, 5, 2], None), BatchOptions { batch_size: 2, shuffle: false, drop_last: true, ..Default::default() }).unwrap();
    assert_eq!(it.batches_per_epoch(), 1);
}

#[test]
fn packing_layout() {
    let data = synthetic(&[5, 3, 2, 6], Some(8));
    let it = BatchIterator::new(data, BatchOptions { batch_size: 2, shuffle: false, packing: true, ..Default::default() }).unwrap();
    assert_eq!(it.rows_per_epoch(), 2);
    let b = &it.epoch(0)[0];
    // Best fit decreasing: [6, 2] and [5, 3].
    assert_eq!(b.examples, vec![vec![3, 2], vec![0, 1]]);
    assert_eq!((b.batch, b.seq), (2, 8));
    assert_eq!(row(&b.input_ids, b, 0), [400, 401, 402, 403, 404, 405, 300, 301]);
    assert_eq!(row(&b.position_ids, b, 0), [0, 1, 2, 3, 4, 5, 0, 1]);
    assert_eq!(row(&b.segment_ids, b, 0), [1, 1, 1, 1, 1, 1, 2, 2]);
    // The second example's first token is never a target of the first example's last token.
    assert_eq!(row(&b.labels, b, 0), [-100, -100, -100, 403, 404, 405, -100, 301]);
    assert_eq!(row(&b.input_ids, b, 1), [100, 101, 102, 103, 104, 200, 201, 202]);
    assert_eq!(row(&b.position_ids, b, 1), [0, 1, 2, 3, 4, 0, 1, 2]);
    assert_eq!(row(&b.segment_ids, b, 1), [1, 1, 1, 1, 1, 2, 2, 2]);
    assert_eq!(row(&b.labels, b, 1), [-100, -100, 102, 103, 104, -100, 201, 202]);
    assert!(b.attention_mask.iter().all(|&m| m == 1));
    // Rows that are not full are padded with segment 0.
    let it = BatchIterator::new(synthetic(&[5, 4], Some(8)), BatchOptions { batch_size: 2, shuffle: false, packing: true, ..Default::default() }).unwrap();
    let b = &it.epoch(0)[0];
    assert_eq!(row(&b.segment_ids, b, 1), [1, 1, 1, 1, 0]);
    // An example longer than the row is an error, not a silent cut.
    let e = BatchIterator::new(synthetic(&[9], Some(8)), BatchOptions { packing: true, ..Default::default() }).err().unwrap().to_string();
    assert!(e.contains("9 tokens, more than the packed row length 8"), "{e}");
    // Every example lands in exactly one row.
    let lens: Vec<usize> = (0..500).map(|i| 1 + (i * 37) % 300).collect();
    let rows = qscript::data::batch::pack(&lens, 512);
    let mut seen: Vec<usize> = rows.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..500).collect::<Vec<_>>());
    assert!(rows.iter().all(|r| r.iter().map(|&i| lens[i]).sum::<usize>() <= 512));
    let total: usize = lens.iter().sum();
    assert!(rows.len() <= total / 512 + 2, "{} rows for {total} tokens", rows.len());
}

#[test]
fn order_is_deterministic_and_resumes_exactly() {
    let lens: Vec<usize> = (0..23).map(|i| 2 + i % 7).collect();
    let opts = BatchOptions { batch_size: 4, seed: 3, ..Default::default() };
    let mut a = BatchIterator::new(synthetic(&lens, None), opts.clone()).unwrap();
    let mut b = BatchIterator::new(synthetic(&lens, None), opts.clone()).unwrap();
    assert_eq!(a.batches_per_epoch(), 6);
    let first: Vec<Batch> = (0..15).map(|_| a.next_batch()).collect();
    let again: Vec<Batch> = (0..15).map(|_| b.next_batch()).collect();
    assert_eq!(first, again);
    // Epochs differ; every example appears once per epoch.
    let e0: Vec<usize> = first[..6].iter().flat_map(|b| b.examples.concat()).collect();
    let e1: Vec<usize> = first[6..12].iter().flat_map(|b| b.examples.concat()).collect();
    assert_ne!(e0, e1);
    let mut s = e0.clone();
    s.sort();
    assert_eq!(s, (0..23).collect::<Vec<_>>());
    assert_ne!(e0, (0..23).collect::<Vec<_>>());
    // Another seed, another order.
    let c = BatchIterator::new(synthetic(&lens, None), BatchOptions { seed: 4, ..opts.clone() }).unwrap();
    assert_ne!(c.epoch(0), a.epoch(0));
    // Resume mid-epoch 2 from a saved position.
    let pos = a.position();
    assert_eq!(pos, Position { epoch: 2, index: 3 });
    let json = serde_json::to_string(&pos).unwrap();
    let cont: Vec<Batch> = (0..8).map(|_| a.next_batch()).collect();
    let mut r = BatchIterator::new(synthetic(&lens, None), opts).unwrap();
    r.seek(serde_json::from_str(&json).unwrap()).unwrap();
    let resumed: Vec<Batch> = (0..8).map(|_| r.next_batch()).collect();
    assert_eq!(cont, resumed);
    assert!(r.seek(Position { epoch: 0, index: 7 }).is_err());
}

#[test]
fn group_by_length_batches_similar_lengths() {
    let lens: Vec<usize> = (0..64).map(|i| 1 + (i * 29) % 64).collect();
    let opts = BatchOptions { batch_size: 4, group_by_length: true, ..Default::default() };
    let it = BatchIterator::new(synthetic(&lens, None), opts).unwrap();
    let ep = it.epoch(0);
    assert_eq!(ep[0].seq, 64, "the longest batch comes first");
    let padding: usize = ep.iter().map(|b| b.batch * b.seq - b.num_tokens()).sum();
    let plain = BatchIterator::new(synthetic(&lens, None), BatchOptions { batch_size: 4, ..Default::default() }).unwrap();
    let plain_padding: usize = plain.epoch(0).iter().map(|b| b.batch * b.seq - b.num_tokens()).sum();
    assert!(padding * 4 < plain_padding, "{padding} vs {plain_padding}");
}

#[test]
fn batches_from_real_tokenization() {
    let (ds, _) = load(&fixture("sharegpt.jsonl"));
    let ct = chat_tokenizer(smol());
    let t = Arc::new(tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap());
    let pad = smol().token_to_id("<|im_end|>").unwrap();
    assert_eq!(t.pad_id, pad);
    let it = BatchIterator::new(t.clone(), BatchOptions { batch_size: 2, shuffle: false, ..Default::default() }).unwrap();
    let b = &it.epoch(0)[0];
    for r in 0..2 {
        let ex = &t.examples[r];
        assert_eq!(&row(&b.input_ids, b, r)[..ex.len()], ex.input_ids.as_slice());
        assert_eq!(&row(&b.labels, b, r)[..ex.len()], ex.labels().as_slice());
    }
    assert_eq!(b.num_trained(), t.report.trained_tokens);
}

// ---------------------------------------------------------------- Rhai

#[test]
fn rhai_dataset_api() {
    use qscript::script::{Host, Limits};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let src = format!(
        r#"
let ds = load_dataset("{sharegpt}");
if ds.len() != 2 {{ throw "len"; }}
if ds[0].messages[2].content != "Hello." {{ throw "index"; }}
if ds[-1].id != "a2" {{ throw "extra field"; }}
let more = ds.concat(load_dataset("{alpaca}", #{{ format: "alpaca", on_error: "raise" }}));
if more.len() != 4 {{ throw "concat"; }}
let short = more.filter(|r| r.messages.len() <= 3);
if short.len() != 3 {{ throw "filter " + short.len(); }}
let upper = short.map(|r| {{ r.messages[0].content = "X"; r }});
if upper[1].messages[0].content != "X" {{ throw "map"; }}
let s = more.train_test_split(0.25, #{{ seed: 1 }});
if s.train.len() != 3 || s.test.len() != 1 {{ throw "split"; }}
if more.select(1..3).len() != 2 || more.select(0..=3).len() != 4 || more.select([3, 0])[1].id != "a1" {{ throw "select"; }}
if more.shuffle(5).len() != 4 {{ throw "shuffle"; }}
let own = Dataset([#{{ text: "hello" }}, #{{ prompt: "p", completion: "c" }}]);
if own[1].messages[1].role != "assistant" {{ throw "from list"; }}
more.to_jsonl("{out}");
let back = load_dataset("{out}");
if back.len() != 4 {{ throw "to_jsonl"; }}
let model = load_model("{model}");
let st = ds.stats(model, #{{ max_seq_length: 30 }});
if st.count != 2 || st.over_max_seq_length < 1 || st.p50 < st.min {{ throw "stats " + st; }}
let p = ds.preview(model, 0, #{{ color: false }});
if !p.contains("[[Hello.<|im_end|>]]") {{ throw "preview " + p; }}
let t = ds.tokenized(model, #{{ max_seq_length: 128 }});
if t.len() != 2 || t[0].labels.len() != t[0].input_ids.len() {{ throw "tokenized"; }}
let bs = t.batches(#{{ batch_size: 2, packing: true, shuffle: false }});
if bs.len() != 1 || bs[0].segment_ids[0].contains(2) == false {{ throw "packing " + bs[0].segment_ids; }}
if t.lints().len() == 0 {{ throw "lints"; }}
"#,
        sharegpt = fixture("sharegpt.jsonl"),
        alpaca = fixture("alpaca.json"),
        out = out.display(),
        model = model_dir().display(),
    );
    let p = tmp.path().join("recipe.rhai");
    std::fs::write(&p, &src).unwrap();
    std::env::set_var("QSCRIPT_QUIET", "1");
    let host = Host::for_recipe(&p, &Limits::default());
    host.run_file(&p, &[]).unwrap_or_else(|e| panic!("{e:#}"));

    // Errors point at the recipe line; strict option maps.
    std::fs::write(&p, "let a = 1;\nlet ds = load_dataset(\"/no/such.jsonl\");\n").unwrap();
    let e = format!("{:#}", host.run_file(&p, &[]).unwrap_err());
    assert!(e.contains("recipe.rhai:2:") && e.contains("/no/such.jsonl: no such file or directory"), "{e}");
    std::fs::write(&p, format!("let ds = load_dataset(\"{}\", #{{ on_eror: \"skip\" }});\n", fixture("sharegpt.jsonl"))).unwrap();
    let e = format!("{:#}", host.run_file(&p, &[]).unwrap_err());
    assert!(e.contains("load_dataset options: unknown key `on_eror`; did you mean `on_error`?"), "{e}");
    let e = format!("{:#}", host.check_file(&p, &[]).unwrap_err());
    assert!(e.contains("unknown key `on_eror`"), "{e}");
    std::fs::write(&p, "fn f(d, m) { d.tokenized(m, #{ max_seq_length: 8, packing: true }) }\n").unwrap();
    let e = format!("{:#}", host.check_file(&p, &[]).unwrap_err());
    assert!(e.contains("tokenization options: unknown key `packing`"), "{e}");
    for f in ["load_dataset", "shuffle", "select", "filter", "map", "train_test_split", "concat", "to_jsonl", "stats", "preview", "tokenized", "batches", "index", "Dataset"] {
        assert!(host.docs.iter().any(|d| d.name == f), "{f} undocumented");
    }
}

// ---------------------------------------------------------------- with the training engine

/// Batches as the engine consumes them: the summed loss of a packed row (and of a padded batch)
/// equals the sum of each example's loss run alone, so no attention or label crosses examples.
#[test]
fn packed_and_padded_batches_lose_nothing_in_the_engine() {
    use qscript::model::engine::{self, TrainBatch};
    use qscript::model::{LoadOptions, Model};
    let model = Model::load_hf_dir(DEFAULT_MODEL, &model_dir(), &LoadOptions::default()).unwrap();
    let ct = ChatTokenizer::for_model(&model).unwrap();
    let ds = Dataset::new(vec![msgs(CONVO), msgs(&[("user", "2+2?"), ("assistant", "4")]), Row::text("Once upon a time")]);
    let t = Arc::new(tokenize_dataset(&ds, &ct, &TokenizeOptions::default()).unwrap());
    let dev = &model.llama.device;
    let (mut alone_sum, mut alone_n) = (0.0, 0);
    for ex in &t.examples {
        let b = TrainBatch::new(1, ex.len(), &ex.input_ids, &ex.labels(), None, None, dev).unwrap();
        let o = engine::loss(&model.llama, &b).unwrap();
        alone_sum += o.loss_sum;
        alone_n += o.n_tokens;
    }
    for packing in [true, false] {
        let opts = BatchOptions { batch_size: 3, shuffle: false, packing, max_seq_length: Some(256), ..Default::default() };
        let b = &BatchIterator::new(t.clone(), opts).unwrap().epoch(0)[0];
        assert_eq!(b.examples.concat().len(), 3);
        assert_eq!(b.batch, if packing { 1 } else { 3 });
        let tb = TrainBatch::new(b.batch, b.seq, &b.input_ids, &b.labels, Some(&b.position_ids), Some(&b.segment_ids), dev).unwrap();
        let o = engine::loss(&model.llama, &tb).unwrap();
        assert_eq!(o.n_tokens, alone_n, "packing {packing}");
        assert!((o.loss_sum - alone_sum).abs() < 1e-4 * alone_sum.abs(), "packing {packing}: {} vs {alone_sum}", o.loss_sum);
    }
}
