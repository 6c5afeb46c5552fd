//! Porting a notebook: the transformers / trl names of TrainingArguments and SFTConfig, TensorBoard
//! event files, key order of maps that go to JSON, `load_dataset` columns and parquet, tool-call
//! rows, and the data lints.

mod common;

use qscript::train::tensorboard::{crc32c, masked_crc};
use std::path::{Path, PathBuf};
use std::process::Command;

fn qscript() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.env("QSCRIPT_QUIET", "1");
    c
}

fn run_script(dir: &Path, src: &str) -> (i32, String, String) {
    let p = dir.join("recipe.rhai");
    std::fs::write(&p, src).unwrap();
    // Issue 17's permissions: the test's folder is granted for writing (files go straight into
    // it, which an undeclared recipe may not do), the repository's test data for reading.
    let grants = [format!("--allow-write={}", dir.display()), format!("--allow-read={}", Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").display())];
    let o = qscript().current_dir(dir).arg(&p).args(grants).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// A recipe that trains 4 steps with `args` added to TrainingArguments (or SFTConfig).
fn train_recipe(model: &Path, data: &Path, out: &Path, ctor: &str, args: &str) -> String {
    format!(
        r#"
let model = load_model("{model}");
let model = get_peft_model(model, LoraConfig(#{{ r: 4, lora_alpha: 8, target_modules: "all-linear" }}));
let data = load_dataset("{data}");
let args = {ctor}(#{{ output_dir: "{out}", max_steps: 4, per_device_train_batch_size: 4, learning_rate: 1e-3,
    logging_steps: 1, save_steps: 2 {args} }});
let trainer = SFTTrainer(model, data, args);
let s = trainer.train();
print("STEP:" + s.global_step);
"#,
        model = model.display(),
        data = data.display(),
        out = out.display()
    )
}

// ---------------------------------------------------------------------------------------------
// TensorBoard event files

/// The records of a TFRecord file, every frame's CRCs checked.
fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc(len_bytes), "length CRC of the record at byte {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked_crc(data), "data CRC of the record at byte {at}");
        out.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    out
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*at];
        *at += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields as (number, raw bytes): varints as their 8 LE bytes, fixed as their bytes.
fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < b.len() {
        let key = varint(b, &mut at);
        let v = match key & 7 {
            0 => varint(b, &mut at).to_le_bytes().to_vec(),
            1 => { at += 8; b[at - 8..at].to_vec() }
            2 => { let n = varint(b, &mut at) as usize; at += n; b[at - n..at].to_vec() }
            5 => { at += 4; b[at - 4..at].to_vec() }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, v));
    }
    out
}

/// (step, tag, value) of every scalar in an event file; checks the file-version event first.
fn scalars(path: &Path) -> Vec<(i64, String, f32)> {
    let records = read_records(&std::fs::read(path).unwrap());
    let first = fields(&records[0]);
    assert!(first.iter().any(|(n, v)| *n == 3 && v == b"brain.Event:2"), "first event is the file version");
    let mut out = Vec::new();
    for r in &records[1..] {
        let f = fields(r);
        let wall = f.iter().find(|(n, _)| *n == 1).map(|(_, v)| f64::from_le_bytes(v[..8].try_into().unwrap())).unwrap();
        assert!(wall > 1.6e9, "wall_time is seconds since the epoch");
        let step = f.iter().find(|(n, _)| *n == 2).map(|(_, v)| i64::from_le_bytes(v[..8].try_into().unwrap())).unwrap_or(0);
        let summary = &f.iter().find(|(n, _)| *n == 5).expect("a summary").1;
        for (_, value) in fields(summary) {
            let vf = fields(&value);
            let tag = String::from_utf8(vf.iter().find(|(n, _)| *n == 1).unwrap().1.clone()).unwrap();
            let x = f32::from_le_bytes(vf.iter().find(|(n, _)| *n == 2).unwrap().1[..4].try_into().unwrap());
            out.push((step, tag, x));
        }
    }
    out
}

#[test]
fn crc32c_matches_the_standard_check_values() {
    // RFC 3720's CRC-32C test vectors.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    // A masked CRC is the rotation plus TFRecord's constant.
    assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
}

#[test]
fn report_to_tensorboard_writes_event_files_with_the_metrics() {
    let (tmp, model, data) = common::chat_fixture();
    let out = tmp.path().join("out");
    let tb = tmp.path().join("tb");
    let src = train_recipe(&model, &data, &out, "SFTConfig", &format!(r#", report_to: ["tensorboard"], logging_dir: "{}", eval_strategy: "steps", eval_steps: 2"#, tb.display()))
        .replace("SFTTrainer(model, data, args)", "SFTTrainer(model, data, args, #{ eval_dataset: data.select(0..4) })");
    let (code, stdout, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("STEP:4"));
    let files: Vec<PathBuf> = std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let got = scalars(&files[0]);
    // The same numbers as metrics.jsonl, at the same steps, under transformers' tags.
    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let logged: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("loss").is_some()).collect();
    assert_eq!(logged.len(), 4);
    for m in logged {
        let step = m["step"].as_i64().unwrap();
        for (k, tag) in [("loss", "train/loss"), ("learning_rate", "train/learning_rate"), ("grad_norm", "train/grad_norm"), ("epoch", "train/epoch")] {
            let want = m[k].as_f64().unwrap() as f32;
            let v = got.iter().find(|(s, t, _)| *s == step && t == tag).unwrap_or_else(|| panic!("{tag} at step {step}: {got:?}"));
            assert_eq!(v.2, want, "{tag} at step {step}");
        }
    }
    // Evaluations under eval/, as transformers' TensorBoardCallback tags them.
    let evals: Vec<&serde_json::Value> = metrics.iter().filter(|m| m.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2, "{metrics:?}");
    for m in evals {
        let step = m["step"].as_i64().unwrap();
        let v = got.iter().find(|(s, t, _)| *s == step && t == "eval/loss").unwrap_or_else(|| panic!("eval/loss at step {step}: {got:?}"));
        assert_eq!(v.2, m["eval_loss"].as_f64().unwrap() as f32);
    }
    // Opened by the `tensorboard` package itself when it is installed (bench/tensorboard_read.py).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/tensorboard_read.py");
    match Command::new("python3").arg(&script).arg(&tb).output() {
        Ok(o) if o.status.code() == Some(0) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("train/loss 4") && text.contains("eval/loss 2"), "tensorboard read: {text}");
            eprintln!("tensorboard read:\n{text}");
        }
        Ok(o) if o.status.code() == Some(3) => eprintln!("tensorboard package not installed; skipped its read"),
        Ok(o) => panic!("tensorboard could not read the events: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        Err(_) => eprintln!("python3 not found; skipped the tensorboard read"),
    }
}

// ---------------------------------------------------------------------------------------------
// TrainingArguments / SFTConfig names

fn args_error(tmp: &Path, ctor: &str, map: &str) -> String {
    let src = format!("let a = {ctor}(#{{ output_dir: \"{}\", {map} }}); print(\"OK\");", tmp.join("o").display());
    let (code, stdout, stderr) = run_script(tmp, &src);
    if code == 0 {
        assert!(stdout.contains("OK"));
        String::new()
    } else {
        stderr
    }
}

#[test]
fn notebook_names_are_accepted_with_their_meaning() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = [
        "bf16: true, optim: \"adamw_torch_fused\", report_to: \"none\", save_only_model: true, eval_steps: 5",
        "max_length: 512, dataset_text_field: \"text\", optim: \"paged_adamw_8bit\", report_to: [\"jsonl\", \"tensorboard\"]",
        "evaluation_strategy: \"no\", optim: \"paged_adamw_32bit\", fp16: false",
    ];
    for m in ok {
        assert_eq!(args_error(tmp.path(), "SFTConfig", m), "", "{m}");
        assert_eq!(args_error(tmp.path(), "TrainingArguments", m), "", "{m}");
    }
    // Errors name the map as the recipe called it, and the key.
    let e = args_error(tmp.path(), "SFTConfig", "optim: \"adafactor\"");
    assert!(e.contains("SFTConfig") && e.contains("optim"), "{e}");
    let e = args_error(tmp.path(), "SFTConfig", "max_lenght: 3");
    assert!(e.contains("did you mean `max_length`"), "{e}");
    let e = args_error(tmp.path(), "TrainingArguments", "report_to: \"wandb\"");
    assert!(e.contains("report_to") && e.contains("tensorboard"), "{e}");
    let e = args_error(tmp.path(), "SFTConfig", "max_length: 256, max_seq_length: 512");
    assert!(e.contains("max_length") && e.contains("same setting"), "{e}");
}

#[test]
fn max_length_sets_max_seq_length() {
    let m = |src: &str| {
        let map = rhai::Engine::new().eval::<rhai::Map>(src).unwrap();
        qscript::script::train_api::training_arguments(&map).unwrap()
    };
    assert_eq!(m(r#"#{ output_dir: "o", max_length: 77 }"#).max_seq_length, 77);
    assert_eq!(m(r#"#{ output_dir: "o" }"#).max_seq_length, 1024);
    let a = m(r#"#{ output_dir: "o", evaluation_strategy: "steps", eval_steps: 3, report_to: "all", optim: "adamw_8bit" }"#);
    assert_eq!(a.eval_strategy, qscript::train::args::Strategy::Steps);
    assert_eq!(a.eval_steps, Some(3));
    assert!(a.report_to.tensorboard);
    assert_eq!(a.optim, qscript::train::args::Optim::Adamw8bit { paged: false });
}

#[test]
fn gradient_checkpointing_kwargs_offload_and_refusals() {
    let args = |src: &str| {
        let map = rhai::Engine::new().eval::<rhai::Map>(src).unwrap();
        qscript::script::train_api::training_arguments(&map).map_err(|e| format!("{e:#}"))
    };
    // Checkpointing offloads by default (Unsloth's "unsloth" checkpointing); the kwargs turn it off.
    assert!(args(r#"#{ output_dir: "o", gradient_checkpointing: true }"#).unwrap().offload_checkpoints);
    let a = args(r#"#{ output_dir: "o", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ offload: false } }"#).unwrap();
    assert!(a.gradient_checkpointing && !a.offload_checkpoints);
    // transformers' own key, carried by ported notebooks, is accepted.
    assert!(args(r#"#{ output_dir: "o", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ use_reentrant: false } }"#).unwrap().offload_checkpoints);
    assert!(args(r#"#{ output_dir: "o", gradient_checkpointing_kwargs: #{} }"#).is_ok());
    // Unknown keys and wrong types: one line naming the map and the key.
    let e = args(r#"#{ output_dir: "o", gradient_checkpointing_kwargs: #{ ofload: false } }"#).unwrap_err();
    assert_eq!(e, "TrainingArguments: gradient_checkpointing_kwargs: unknown key `ofload`; did you mean `offload`?");
    let e = args(r#"#{ output_dir: "o", gradient_checkpointing_kwargs: #{ offload: "no" } }"#).unwrap_err();
    assert!(e.contains("gradient_checkpointing_kwargs: `offload` must be true or false"), "{e}");
    let e = args(r#"#{ output_dir: "o", gradient_checkpointing_kwargs: true }"#).unwrap_err();
    assert!(e.contains("`gradient_checkpointing_kwargs` must be a map"), "{e}");
    // Through a recipe: the error names the file and line, the run stops (SFTConfig's name).
    let tmp = tempfile::tempdir().unwrap();
    let e = args_error(tmp.path(), "SFTConfig", "gradient_checkpointing: true,\n gradient_checkpointing_kwargs: #{ preserve_rng_state: true }");
    assert!(e.contains("recipe.rhai:1:") && e.contains("SFTConfig: gradient_checkpointing_kwargs: unknown key `preserve_rng_state`"), "{e}");
    assert!(e.contains("valid keys: offload, use_reentrant") || e.contains("did you mean"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn fp16_on_the_cpu_is_an_error_that_says_why() {
    let (tmp, model, data) = common::chat_fixture();
    let src = train_recipe(&model, &data, &tmp.path().join("out"), "TrainingArguments", ", fp16: true");
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_ne!(code, 0);
    assert!(stderr.contains("fp16: true") && stderr.contains("GPU") && stderr.contains("CPU"), "{stderr}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
}

#[test]
fn eight_bit_optimizers_run_adamw_and_say_what_they_would_save() {
    let (tmp, model, data) = common::chat_fixture();
    let src = train_recipe(&model, &data, &tmp.path().join("out"), "SFTConfig", ", optim: \"paged_adamw_8bit\", bf16: true");
    let (code, stdout, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("STEP:4"));
    let note: Vec<&str> = stderr.lines().filter(|l| l.contains("paged_adamw_8bit")).collect();
    assert_eq!(note.len(), 1, "one line: {stderr}");
    assert!(note[0].contains("32-bit") && note[0].contains("would have saved"), "{}", note[0]);
    // bf16 on a float32 model: said, not failed.
    assert!(stderr.lines().any(|l| l.starts_with("bf16: true") && l.contains("float32")), "{stderr}");
}

#[test]
fn optimizer_note_counts_bitsandbytes_state() {
    use qscript::train::args::Optim;
    // 2 moments × (4 - 1) bytes per element minus the absmax per 256; tensors under 4096 stay 32-bit.
    let n = 1 << 20;
    let note = Optim::Adamw8bit { paged: true }.note(&[n, 100]).unwrap();
    let saved = (2 * 4 * n - 2 * (n + 4 * n / 256)) as f64 / (1 << 20) as f64;
    assert!(note.contains(&format!("would have saved {saved:.1} MiB")), "{note}");
    assert!(Optim::AdamwTorch.note(&[n]).is_none());
    assert!(Optim::PagedAdamw32bit.note(&[n]).unwrap().contains("same 32-bit state"));
}

#[test]
fn save_only_model_checkpoints_have_no_optimizer_and_refuse_to_resume() {
    let (tmp, model, data) = common::chat_fixture();
    let out = tmp.path().join("out");
    let src = train_recipe(&model, &data, &out, "TrainingArguments", ", save_only_model: true");
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    let ck = out.join("checkpoint-2");
    assert!(ck.join("adapter_model.safetensors").is_file() && ck.join("trainer_state.json").is_file());
    assert!(!ck.join("optimizer.safetensors").exists());
    let e = qscript::train::checkpoint::load(&ck).err().expect("cannot resume").to_string();
    assert!(e.contains("save_only_model"), "{e}");
}

#[test]
fn dataset_text_field_trains_on_that_field() {
    let (tmp, model, _) = common::chat_fixture();
    let data = tmp.path().join("notes.jsonl");
    let lines: Vec<String> = (0..8).map(|i| serde_json::json!({"body": format!("note {i}: restart the router"), "text": ""}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let src = train_recipe(&model, &data, &tmp.path().join("out"), "SFTConfig", ", dataset_text_field: \"body\"");
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    let src = train_recipe(&model, &data, &tmp.path().join("out2"), "SFTConfig", ", dataset_text_field: \"missing\"");
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_ne!(code, 0);
    assert!(stderr.contains("dataset_text_field \"missing\""), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Key order, tool-call rows (golden: tests/golden/templates/tools.json, transformers' renderer)

fn tool_golden() -> Vec<serde_json::Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/templates/tools.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn template(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/templates/families.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["templates"][name]["chat_template"].as_str().unwrap().to_string()
}

/// A JSON value as the Rhai literal a user would write, keys in the JSON's order.
fn rhai_literal(v: &serde_json::Value) -> String {
    use serde_json::Value as V;
    match v {
        V::Null => "()".into(),
        V::Bool(b) => b.to_string(),
        V::Number(n) => n.to_string(),
        V::String(s) => serde_json::to_string(s).unwrap(),
        V::Array(a) => format!("[{}]", a.iter().map(rhai_literal).collect::<Vec<_>>().join(", ")),
        V::Object(o) => format!("#{{ {} }}", o.iter().map(|(k, v)| format!("{}: {}", serde_json::to_string(k).unwrap(), rhai_literal(v))).collect::<Vec<_>>().join(", ")),
    }
}

#[test]
fn tool_schemas_written_in_a_recipe_render_as_transformers_renders_them() {
    let (tmp, model, _) = common::chat_fixture();
    let cases = tool_golden();
    let mut src = format!("let model = load_model(\"{}\");\n", model.display());
    for (i, c) in cases.iter().enumerate() {
        src.push_str(&format!(
            "model.set_chat_template({});\nlet tools = {};\nlet msgs = {};\nprint(\"CASE{i}:\" + to_json(model.apply_chat_template(msgs, #{{ tools: tools, tokenize: false }})));\n",
            serde_json::to_string(&template(c["template"].as_str().unwrap())).unwrap(),
            rhai_literal(&c["tools"]),
            rhai_literal(&c["messages"]),
        ));
    }
    // to_json keeps the written order too.
    src.push_str("print(\"JSON:\" + to_json(#{ type: \"function\", function: #{ name: \"f\", description: \"d\", parameters: #{} } }));\n");
    let (code, stdout, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    let mut differ = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let line = stdout.lines().find_map(|l| l.strip_prefix(&format!("CASE{i}:"))).unwrap();
        let got: String = serde_json::from_str(line).unwrap();
        if got != c["rendered"].as_str().unwrap() {
            differ.push(format!("case {i} ({}):\n--- got\n{got}\n--- transformers\n{}", c["template"], c["rendered"].as_str().unwrap()));
        }
    }
    assert!(differ.is_empty(), "{} of {} differ:\n{}", differ.len(), cases.len(), differ.join("\n"));
    assert!(stdout.contains(r#"JSON:{"type":"function","function":{"name":"f","description":"d","parameters":{}}}"#), "{stdout}");
}

/// The golden conversations as dataset rows (`messages` + `tools`), a tiny model with `tpl`.
fn tool_rows(tpl: &str) -> (tempfile::TempDir, qscript::model::Model, qscript::data::Dataset, Vec<serde_json::Value>) {
    let (tmp, model_dir, _) = common::chat_fixture();
    let cases: Vec<serde_json::Value> = tool_golden().into_iter().filter(|c| c["template"] == tpl).collect();
    let data = tmp.path().join("tools.jsonl");
    let lines: Vec<String> = cases.iter().map(|c| serde_json::json!({"messages": c["messages"], "tools": c["tools"]}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let (ds, _) = qscript::data::load_dataset(data.to_str().unwrap(), &Default::default()).unwrap();
    let mut m = qscript::model::Model::load_hf_dir("tiny", &model_dir, &Default::default()).unwrap();
    m.tokenizer.as_mut().unwrap().chat_template = Some(template(tpl));
    (tmp, m, ds, cases)
}

#[test]
fn tool_call_rows_render_and_mask_as_transformers() {
    for tpl in ["qwen2.5", "qwen3"] {
        let (_tmp, m, ds, cases) = tool_rows(tpl);
        let ct = qscript::data::tokenize::ChatTokenizer::for_model(&m).unwrap();
        let opts = qscript::data::TokenizeOptions { max_seq_length: None, ..Default::default() };
        let t = qscript::data::tokenize_dataset(&ds, &ct, &opts).unwrap();
        let tok = m.tokenizer().unwrap();
        for (ex, c) in t.examples.iter().zip(&cases) {
            // The whole rendering, tokens and all, is transformers'.
            assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), c["rendered"].as_str().unwrap(), "{tpl}");
            // Trained: each assistant turn (its tool call included), never the tool's result or the user.
            let trained: Vec<u32> = ex.input_ids.iter().zip(&ex.trained).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
            let trained = tok.decode(&trained, false).unwrap();
            for m in c["messages"].as_array().unwrap() {
                let content = m["content"].as_str().unwrap_or("");
                match m["role"].as_str().unwrap() {
                    "assistant" if !content.is_empty() => assert!(trained.contains(content), "{tpl}: {content} in {trained}"),
                    "assistant" => {
                        let name = m["tool_calls"][0]["function"]["name"].as_str().unwrap();
                        assert!(trained.contains(&format!("<tool_call>\n{{\"name\": \"{name}\"")), "{tpl}: the call is trained: {trained}");
                    }
                    // (a tool result the answer quotes may appear in the answer)
                    _ if !content.is_empty() && !trained.replace("I opened ticket 4711", "").contains(content) => {}
                    _ if !content.is_empty() => panic!("{tpl}: {content} is trained: {trained}"),
                    _ => {}
                }
            }
            assert!(!trained.contains("tool_response"), "{tpl}: {trained}");
        }
    }
}

#[test]
fn rows_through_a_recipe_map_keep_their_field_order() {
    let (tmp, model, _) = common::chat_fixture();
    let _ = model;
    let cases = tool_golden();
    let data = tmp.path().join("tools.jsonl");
    std::fs::write(&data, serde_json::json!({"messages": cases[1]["messages"], "tools": cases[1]["tools"]}).to_string()).unwrap();
    let out = tmp.path().join("out.jsonl");
    let src = format!(
        "let d = load_dataset(\"{}\").map(|r| r); d.to_jsonl(\"{}\");",
        data.display(),
        out.display()
    );
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    let row: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(row["tools"].to_string(), cases[1]["tools"].to_string());
    assert_eq!(row["messages"][2]["tool_calls"].to_string(), cases[1]["messages"][2]["tool_calls"].to_string());
}

// ---------------------------------------------------------------------------------------------
// load_dataset columns, data lints

#[test]
fn load_dataset_columns_map_other_field_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("qa.jsonl");
    std::fs::write(&data, "{\"question\": \"How do I reset?\", \"answer\": \"Open Settings.\", \"id\": 7}\n").unwrap();
    let out = tmp.path().join("out.jsonl");
    let src = format!(
        "let d = load_dataset(\"{}\", #{{ columns: #{{ prompt: \"question\", completion: \"answer\" }} }}); d.to_jsonl(\"{}\");",
        data.display(),
        out.display()
    );
    let (code, _, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    let row: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(row["messages"][0]["content"], "How do I reset?");
    assert_eq!(row["messages"][1]["role"], "assistant");
    assert_eq!(row["messages"][1]["content"], "Open Settings.");
    assert_eq!(row["id"], 7);
    // Without the mapping, the error says how to map.
    let (code, _, stderr) = run_script(tmp.path(), &format!("load_dataset(\"{}\");", data.display()));
    assert_ne!(code, 0);
    assert!(stderr.contains("columns:"), "{stderr}");
    // A standard name qscript does not read is refused, with the nearest one.
    let (code, _, stderr) = run_script(tmp.path(), &format!("load_dataset(\"{}\", #{{ columns: #{{ promt: \"question\" }} }});", data.display()));
    assert_ne!(code, 0);
    assert!(stderr.contains("did you mean `prompt`"), "{stderr}");
}

fn lint_kinds(rows: &[serde_json::Value], max: Option<usize>) -> Vec<(String, Vec<usize>)> {
    let (tmp, model_dir, _) = common::chat_fixture();
    let m = qscript::model::Model::load_hf_dir("tiny", &model_dir, &Default::default()).unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, rows.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    let (ds, _) = qscript::data::load_dataset(data.to_str().unwrap(), &Default::default()).unwrap();
    let ct = qscript::data::tokenize::ChatTokenizer::for_model(&m).unwrap();
    let opts = qscript::data::TokenizeOptions { max_seq_length: max, ..Default::default() };
    let t = qscript::data::tokenize_dataset(&ds, &ct, &opts).unwrap();
    t.report.lints.iter().map(|l| (l.kind.to_string(), l.examples.clone())).collect()
}

#[test]
fn lints_name_empty_replies_turn_order_and_duplicate_systems() {
    use serde_json::json;
    let turn = |r: &str, c: &str| json!({"role": r, "content": c});
    let rows = vec![
        json!({"messages": [turn("user", "hi"), turn("assistant", "hello")]}),
        json!({"messages": [turn("user", "hi"), turn("assistant", "  ")]}),
        json!({"messages": [turn("user", "hi"), turn("user", "again"), turn("assistant", "yes")]}),
        json!({"messages": [turn("system", "a"), turn("user", "hi"), turn("system", "b"), turn("assistant", "ok")]}),
        json!({"messages": [turn("user", "hi"), turn("tool", "42"), turn("assistant", "ok")]}),
        // A tool call and its result are in order.
        json!({"messages": [turn("user", "hi"), {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}, turn("tool", "42"), turn("assistant", "ok")]}),
    ];
    let lints = lint_kinds(&rows, None);
    let get = |k: &str| lints.iter().find(|(kind, _)| kind == k).map(|(_, e)| e.clone()).unwrap_or_default();
    assert_eq!(get("empty-reply"), vec![1], "{lints:?}");
    assert_eq!(get("turn-order"), vec![2, 3, 4], "{lints:?}");
    assert_eq!(get("duplicate-system"), vec![3], "{lints:?}");
}

#[test]
fn a_template_without_tool_support_fails_naming_the_tool_calls() {
    use serde_json::json;
    // The tiny model's SmolLM2 template concatenates `content`: a call's null content fails there
    // (as in transformers); the error says what the row holds.
    let (tmp, model_dir, _) = common::chat_fixture();
    let m = qscript::model::Model::load_hf_dir("tiny", &model_dir, &Default::default()).unwrap();
    let data = tmp.path().join("d.jsonl");
    let row = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]});
    std::fs::write(&data, row.to_string()).unwrap();
    let (ds, _) = qscript::data::load_dataset(data.to_str().unwrap(), &Default::default()).unwrap();
    let ct = qscript::data::tokenize::ChatTokenizer::for_model(&m).unwrap();
    let e = qscript::data::tokenize_dataset(&ds, &ct, &Default::default()).expect_err("the template cannot render it").to_string();
    assert!(e.starts_with("example 0:") && e.contains("tool_calls"), "{e}");
}

#[test]
fn lint_names_examples_whose_last_answer_truncation_removes() {
    use serde_json::json;
    let turn = |r: &str, c: &str| json!({"role": r, "content": c});
    let long = "word ".repeat(60);
    let rows = vec![
        // The first answer survives 48 tokens, the second (after a long question) does not.
        json!({"messages": [turn("user", "hi"), turn("assistant", "hello"), turn("user", &long), turn("assistant", "the answer")]}),
        json!({"messages": [turn("user", "hi"), turn("assistant", "hello")]}),
    ];
    let lints = lint_kinds(&rows, Some(48));
    let got: Vec<&(String, Vec<usize>)> = lints.iter().filter(|(k, _)| k == "answer-truncated").collect();
    assert_eq!(got.len(), 1, "{lints:?}");
    assert_eq!(got[0].1, vec![0]);
    assert!(lint_kinds(&rows, None).iter().all(|(k, _)| k != "answer-truncated"));
}

#[test]
fn lint_names_single_answers_truncation_removes_and_drops_them() {
    use serde_json::json;
    let turn = |r: &str, c: &str| json!({"role": r, "content": c});
    let long = "word ".repeat(60);
    let rows = vec![
        json!({"messages": [turn("user", &long), turn("assistant", "the answer")]}),
        json!({"messages": [turn("user", "hi"), turn("assistant", "hello")]}),
    ];
    let lints = lint_kinds(&rows, Some(48));
    let got: Vec<&(String, Vec<usize>)> = lints.iter().filter(|(k, _)| k == "nothing-trained").collect();
    assert_eq!(got.len(), 1, "{lints:?}");
    assert_eq!(got[0].1, vec![0]);
}

// ---------------------------------------------------------------------------------------------
// load_dataset of parquet (fixtures: tests/data/parquet/make_parquet.py, written by pyarrow)

fn parquet_fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parquet").join(name).to_str().unwrap().to_string()
}

#[test]
fn load_dataset_reads_parquet_as_datasets_writes_it() {
    let (ds, report) = qscript::data::load_dataset(&parquet_fixture("chat.parquet"), &Default::default()).unwrap();
    assert_eq!(report.records, 2);
    let rows: Vec<serde_json::Value> = ds.rows.iter().map(|r| r.to_json()).collect();
    // Nested list<struct> columns are messages; the struct's null fields are absent, as in JSON.
    assert_eq!(rows[0]["messages"][0], serde_json::json!({"role": "system", "content": "You are a support agent."}));
    assert_eq!(rows[0]["messages"][2]["content"], "Open Settings > Security and choose Reset.");
    assert_eq!(rows[0]["id"], 1);
    assert_eq!(rows[0]["source"], "tickets");
    // The tool call (content null) and the tool's result.
    let call = &rows[1]["messages"][1];
    assert_eq!(call["tool_calls"][0]["function"]["name"], "open_ticket");
    assert_eq!(call["tool_calls"][0]["function"]["arguments"], "{\"topic\": \"router\"}");
    assert!(call["content"].is_null(), "{call}");
    assert!(ds.rows[1].has_tool_calls(1));
    assert_eq!(rows[1]["messages"][2], serde_json::json!({"role": "tool", "content": "ticket 4711"}));
    assert_eq!(rows[1]["id"], 2);
}

#[test]
fn parquet_with_columns_and_a_codec_it_lacks_through_a_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    // gzip, two row groups, mapped columns.
    let src = format!(
        "let d = load_dataset(\"{}\", #{{ columns: #{{ prompt: \"question\", completion: \"answer\" }} }}); print(\"N:\" + d.len()); d.to_jsonl(\"{}\");",
        parquet_fixture("qa.parquet"),
        out.display()
    );
    let (code, stdout, stderr) = run_script(tmp.path(), &src);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("N:4"), "{stdout}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows[3]["messages"][0]["content"], "How do I enable 2FA?");
    assert_eq!(rows[3]["messages"][1]["content"], "To enable 2FA, open Settings.");
    // zstd (polars' default) reads.
    let (code, stdout, stderr) = run_script(tmp.path(), &format!("let d = load_dataset(\"{}\"); print(\"T:\" + d[0].text);", parquet_fixture("zstd.parquet")));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("T:hello"), "{stdout}");
    // A brotli file: one line naming the file and the codecs that are read; no panic.
    let (code, _, stderr) = run_script(tmp.path(), &format!("load_dataset(\"{}\");", parquet_fixture("brotli.parquet")));
    assert_ne!(code, 0);
    assert!(stderr.contains("brotli.parquet") && stderr.contains("snappy") && stderr.contains("zstd"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Not a parquet file at all.
    let bad = tmp.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet").unwrap();
    let (code, _, stderr) = run_script(tmp.path(), &format!("load_dataset(\"{}\");", bad.display()));
    assert_ne!(code, 0);
    assert!(stderr.contains("bad.parquet") && stderr.contains("parquet"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn parquet_tool_rows_train_their_calls() {
    // The parquet tool conversation through a Qwen2.5 template: the call is trained, the result is not.
    let (_tmp, model_dir, _) = common::chat_fixture();
    let (ds, _) = qscript::data::load_dataset(&parquet_fixture("chat.parquet"), &Default::default()).unwrap();
    let mut m = qscript::model::Model::load_hf_dir("tiny", &model_dir, &Default::default()).unwrap();
    m.tokenizer.as_mut().unwrap().chat_template = Some(template("qwen2.5"));
    let ct = qscript::data::tokenize::ChatTokenizer::for_model(&m).unwrap();
    let t = qscript::data::tokenize_dataset(&ds, &ct, &qscript::data::TokenizeOptions { max_seq_length: None, ..Default::default() }).unwrap();
    let tok = m.tokenizer().unwrap();
    let ex = &t.examples[1];
    let trained: Vec<u32> = ex.input_ids.iter().zip(&ex.trained).filter(|(_, &t)| t).map(|(&i, _)| i).collect();
    let trained = tok.decode(&trained, false).unwrap();
    assert!(trained.contains("\"name\": \"open_ticket\""), "{trained}");
    assert!(trained.contains("I opened ticket 4711 for you."), "{trained}");
    assert!(!trained.contains("tool_response") && !trained.contains("broken router"), "{trained}");
}
