//! The binary as a user meets it: the REPL and `qscript chat` on a pseudo-terminal
//! (tests/common/pty.rs), training logs without one, and where `load_model` puts a model
//! (`device` / `device_map` / `dtype` "auto", `--device`) in the CPU build.

mod common;

use common::pty::Pty;
use qscript::script::{Host, Limits};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn qscript(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    // The REPL's history goes to $XDG_DATA_HOME/qscript/history.txt. The load lines are part of
    // what is tested: no QSCRIPT_QUIET from the environment.
    c.env("XDG_DATA_HOME", home.join("data")).env_remove("QSCRIPT_QUIET");
    // Run where the files are: recipes and the REPL may write only inside the working directory
    // and read the recipe's folder (issue 17's permissions).
    c.current_dir(home);
    c
}

/// The tiny chat model (SmolLM2's tokenizer and template, random weights), with room for long
/// answers.
fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    common::tiny_chat_model(&m);
    let cfg = m.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["max_position_embeddings"] = 8192.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    m
}

fn run_script(src: &str) -> Result<(), String> {
    let host = Host::new(None, &Limits::default());
    host.engine.run(src).map_err(|e| e.to_string())
}

#[test]
fn repl_on_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let mut p = Pty::spawn({
        let mut c = qscript(tmp.path());
        // The CPU whatever the build (the GPU default is tests/gpu.rs's).
        c.args(["repl", "--device", "cpu"]).env("QSCRIPT_QUIET", "1");
        c
    });
    p.expect(">> ", 30);
    p.line(&format!("let m = load_model(\"{}\");", model.display()));
    p.expect(">> ", 60);
    // A value prints as its summary line, not a Rust type name.
    p.line("m");
    let out = p.expect(">> ", 30);
    assert!(out.contains("Model(") && out.contains(": llama, ") && out.contains("float32 on cpu"), "{out}");
    assert!(!out.contains("Handle") && !out.contains("qscript::"), "{out}");
    // So do a dataset (size, kind) and a trainer (data, run length).
    let data = tmp.path().join("data.jsonl");
    common::write_conversations(&data, 12);
    p.line(&format!("let ds = load_dataset(\"{}\"); ds", data.display()));
    let out = p.expect(">> ", 30);
    assert!(out.contains("Dataset(12 conversations"), "{out}");
    p.line(&format!("let pm = get_peft_model(load_model(\"{}\"), LoraConfig(#{{ r: 2, lora_alpha: 4, target_modules: [\"q_proj\"] }})); pm", model.display()));
    let out = p.expect(">> ", 30);
    assert!(out.contains("LoRA r=2 ("), "{out}");
    p.line(&format!("let t = SFTTrainer(pm, ds, TrainingArguments(#{{ output_dir: \"{}\", max_steps: 2 }})); t", tmp.path().join("out").display()));
    let out = p.expect(">> ", 30);
    assert!(out.contains("SFTTrainer(12 train examples; max_steps 2, batch 8"), "{out}");
    // An open bracket continues on a `.. ` prompt.
    p.line("let xs = [1,");
    p.expect(".. ", 10);
    p.line("2, 3];");
    p.expect(">> ", 10);
    p.line("xs.len() * 7");
    assert!(p.expect(">> ", 10).contains("21"));
    // History is on disk already, before the REPL exits.
    let hist = std::fs::read_to_string(tmp.path().join("data/qscript/history.txt")).unwrap();
    assert!(hist.contains("xs.len() * 7") && hist.contains("let xs = [1,"), "{hist}");
    // Tab after `m.` completes the Model's methods.
    p.send("m.apply_cha\t");
    p.expect("apply_chat_template", 10);
    p.line("(\"hi\", #{ tokenize: false, add_generation_prompt: true })");
    assert!(p.expect(">> ", 10).contains("<|im_start|>user\nhi<|im_end|>"));
    // A streamed answer is printed once, not streamed and then returned again.
    p.line("let a = m.chat(\"hi\", #{ max_new_tokens: 16 }); \"[[\" + a + \"]]\"");
    let out = p.expect(">> ", 30);
    let answer = out[out.rfind("[[").unwrap() + 2..out.rfind("]]").unwrap()].trim().to_string();
    assert!(answer.len() >= 4, "answer too short to count: {answer:?}");
    p.line("m.chat(\"hi\", #{ max_new_tokens: 16, stream: true })");
    let out = p.expect(">> ", 30);
    assert_eq!(out.matches(answer.as_str()).count(), 1, "{out}");
    // Ctrl-C stops the evaluation, not the REPL.
    p.line("loop { }");
    std::thread::sleep(Duration::from_millis(300));
    p.send("\x03");
    p.expect("interrupted", 10);
    p.expect(">> ", 10);
    p.line("40 + 2");
    assert!(p.expect(">> ", 10).contains("42"));
    p.send("\x04");
    assert!(p.wait(10).success(), "{}", p.transcript);
}

#[test]
fn chat_command_streams_resets_and_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    // An adapter folder names its base model: `qscript chat ADAPTER_DIR`.
    let adapter = tmp.path().join("adapter");
    run_script(&format!(
        "let m = get_peft_model(load_model(\"{}\"), LoraConfig(#{{ r: 2, lora_alpha: 4, target_modules: [\"q_proj\"] }})); m.save_pretrained(\"{}\");",
        model.display(),
        adapter.display()
    ))
    .unwrap();
    let mut p = Pty::spawn({
        let mut c = qscript(tmp.path());
        c.args(["chat", &adapter.display().to_string(), "--device", "cpu", "--max-new-tokens", "6000", "--temperature", "0"]);
        c
    });
    let out = p.expect("you> ", 60);
    assert!(out.contains("on cpu") && out.contains("adapter") && out.contains("applied"), "{out}");
    p.line("hello");
    p.expect("hello", 10);
    // Let the answer run, then stop it.
    assert!(p.output_beyond(400, 30), "no answer streamed:\n{}", p.transcript);
    assert!(!p.transcript.ends_with("you> "), "the answer ended before Ctrl-C:\n{}", p.transcript);
    p.send("\x03");
    p.expect("[stopped]", 10);
    p.expect("you> ", 10);
    p.line("/system Answer in one word.");
    p.expect("(system message set; conversation cleared)", 10);
    p.line("/reset");
    p.expect("(conversation cleared)", 10);
    p.line("/quit");
    assert!(p.wait(10).success(), "{}", p.transcript);
}

#[test]
fn training_logs_without_a_terminal_carry_time_and_say_notes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let data = tmp.path().join("data.jsonl");
    common::write_conversations(&data, 12);
    let recipe = tmp.path().join("train.rhai");
    std::fs::write(
        &recipe,
        format!(
            r#"let model = get_peft_model(load_model("{m}"), LoraConfig(#{{ r: 2, lora_alpha: 4, target_modules: "all-linear" }}));
let data = load_dataset("{d}");
let args = TrainingArguments(#{{ output_dir: "{o}", max_steps: 3, per_device_train_batch_size: 4, logging_steps: 1, save_strategy: "no", eval_strategy: "steps", eval_steps: 2 }});
SFTTrainer(model, data, args, #{{ eval_dataset: data }}).train();
"#,
            m = model.display(),
            d = data.display(),
            o = tmp.path().join("out").display()
        ),
    )
    .unwrap();
    let out = qscript(tmp.path()).arg(&recipe).args(["--device", "cpu"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(steps.len() >= 3, "{err}");
    for l in &steps {
        assert!(l.contains(" | elapsed ") && l.contains(" | eta "), "{l}");
    }
    assert!(steps.iter().any(|l| l.contains("tok/s")), "{err}");
    assert_eq!(err.matches("note: the pad token").count(), 1, "train and eval sets: one note\n{err}");
    assert!(!err.contains("steps ["), "no progress bar off a terminal:\n{err}");
    assert!(err.contains("on cpu in "), "the load line names the device:\n{err}");
}

#[test]
fn load_model_device_and_dtype_auto_on_the_cpu_build() {
    if cfg!(feature = "cuda") {
        return; // "auto" is the GPU there: tests/gpu.rs
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny(tmp.path());
    let m = model.display();
    run_script(&format!(
        r#"let a = load_model("{m}", #{{ device_map: "auto", dtype: "auto" }});
if !a.to_string().contains("float32 on cpu") {{ throw a.to_string(); }}
let c = BitsAndBytesConfig(#{{ load_in_4bit: true, bnb_4bit_quant_type: "nf4" }});
if c.to_dict().bnb_4bit_compute_dtype != "auto" {{ throw c.to_dict(); }}
let q = load_model("{m}", #{{ quantization_config: c, torch_dtype: "auto" }});
if !q.summary().contains("compute float32") {{ throw q.summary(); }}
if !q.to_string().contains("nf4 4-bit") {{ throw q.to_string(); }}"#
    ))
    .unwrap();
    let e = run_script(&format!(r#"load_model("{m}", #{{ device: "cpu", device_map: "cuda:1" }})"#)).unwrap_err();
    assert!(e.contains("disagree"), "{e}");
    let e = run_script(&format!(r#"load_model("{m}", #{{ device_map: #{{ "": 0 }} }})"#)).unwrap_err();
    assert!(e.contains("one device"), "{e}");
    // `--device` is checked before the recipe runs, and a GPU in the CPU build is one line.
    let recipe = tmp.path().join("r.rhai");
    std::fs::write(&recipe, format!("let m = load_model(\"{m}\", #{{ device: \"cpu\" }});\nprint(m.to_string());\n")).unwrap();
    let out = qscript(tmp.path()).args(["--device", "gpu"]).arg(&recipe).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--device: unknown device \"gpu\""), "{err}");
    if !cfg!(feature = "cuda") {
        let out = qscript(tmp.path()).args(["--device", "cuda"]).arg(&recipe).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("built without CUDA") && err.lines().count() == 1, "--device beats the recipe's cpu:\n{err}");
    }
    let out = qscript(tmp.path()).args(["--device", "cpu"]).arg(&recipe).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("float32 on cpu"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn completion_after_a_dot_offers_the_types_methods() {
    use qscript::cli::repl::ReplHelper;
    use std::cell::RefCell;
    use std::rc::Rc;
    let host = Host::new(None, &Limits::default());
    let vars = Rc::new(RefCell::new(vec![("m".to_string(), "Model".to_string()), ("ds".to_string(), "Dataset".to_string()), ("s".to_string(), "string".to_string())]));
    let h = ReplHelper::new(&host.docs, vars);
    let (start, c) = h.candidates("x = m.", 6);
    assert_eq!(start, 6);
    for want in ["chat", "generate", "tokenize", "save_pretrained", "summary"] {
        assert!(c.iter().any(|n| n == want), "{want} missing from {c:?}");
    }
    assert!(!c.iter().any(|n| n == "load_dataset" || n == "train_test_split"), "{c:?}");
    let (_, c) = h.candidates("ds.tr", 5);
    assert!(c.iter().any(|n| n == "train_test_split") && !c.iter().any(|n| n == "train"), "{c:?}");
    let (_, c) = h.candidates("s.to_u", 6);
    assert_eq!(c, ["to_upper"]);
    // A name that is no variable: every function, as before.
    let (_, c) = h.candidates("load_d", 6);
    assert_eq!(c, ["load_dataset"]);
}

#[test]
fn a_dataset_prints_its_size_kind_and_other_fields() {
    let tmp = tempfile::tempdir().unwrap();
    // Two files of two formats: a folder loads both.
    let data = tmp.path().join("d");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}], \"id\": 1, \"topic\": \"x\"}\n").unwrap();
    std::fs::write(data.join("b.jsonl"), "{\"text\": \"plain\", \"id\": 2}\n").unwrap();
    let host = Host::new(None, &Limits::default());
    let shown = host.engine.eval::<String>(&format!("load_dataset(\"{}\").to_string()", data.display())).unwrap();
    assert_eq!(shown, "Dataset(2 records: 1 conversations, 1 texts; other fields: id, topic)");
}
