//! Runs that cannot mix, and interrupting them: an output_dir holding a run is refused (or
//! replaced whole with overwrite_output_dir), the manifest records the `--set` values and the
//! build, Ctrl-C (SIGINT to a child qscript) writes a checkpoint and prints the command that
//! resumes it bit-identically, the best checkpoint and early stopping.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn qscript() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    // The test's recipes read and write a temp folder outside the working directory: granted
    // (issue 17's permissions; the printed resume command repeats the flag).
    c.env("QSCRIPT_QUIET", "1").arg("--allow-all");
    c
}

/// A training recipe writing into `dir/out`; `args` are extra TrainingArguments keys, `callbacks`
/// the body of the callbacks map.
fn recipe(dir: &Path, model: &Path, data: &Path, args: &str, callbacks: &str) -> PathBuf {
    let src = format!(
        r#"
const OUT = "{out}";
const MAX_STEPS = 10;
const SAVE_STEPS = 500;
let model = load_model("{model}");
let model = get_peft_model(model, LoraConfig(#{{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: "all-linear" }}));
let data = load_dataset("{data}");
let args = TrainingArguments(#{{ output_dir: OUT, max_steps: MAX_STEPS, per_device_train_batch_size: 4,
    learning_rate: 1e-3, logging_steps: 1, save_steps: SAVE_STEPS {args} }});
let trainer = SFTTrainer(model, data, args, #{{ eval_dataset: data, callbacks: #{{ {callbacks} }} }});
let s = trainer.train();
print("STEP:" + s.global_step);
print("STOPPED:" + s.stopped_early);
model.save_pretrained(OUT + "/adapter");
"#,
        out = dir.join("out").display(),
        model = model.display(),
        data = data.display()
    );
    let p = dir.join("train.rhai");
    std::fs::write(&p, src).unwrap();
    p
}

fn run(recipe: &Path, extra: &[&str]) -> (i32, String, String) {
    let o = qscript().arg(recipe).args(extra).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn an_output_dir_holding_a_run_is_refused_or_replaced_whole() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", "");
    let out = tmp.path().join("out");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=4", "--set", "SAVE_STEPS=2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("checkpoint-4").is_dir() && out.join("loss.png").is_file());
    // A second run into the same folder: one line, naming the folder and both ways out.
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=1"]);
    assert_eq!(code, 1, "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(last.contains(&out.display().to_string()) && last.contains("already holds a run"), "{err}");
    assert!(last.contains("overwrite_output_dir: true") && last.contains("--resume"), "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before, "a refused run wrote nothing");
    // With overwrite_output_dir: the old run's files do not survive beside the new ones.
    std::fs::write(out.join("adapter/stale.txt"), "old").unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = recipe(tmp.path(), &model, &data, ", overwrite_output_dir: true", "");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=1", "--set", "SAVE_STEPS=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("overwrite_output_dir: removed the earlier run"), "{err}");
    assert!(!out.join("checkpoint-2").exists() && !out.join("checkpoint-4").exists() && out.join("checkpoint-1").is_dir());
    assert!(!out.join("adapter/stale.txt").exists() && out.join("adapter/adapter_model.safetensors").is_file());
    assert_eq!(common::metrics(&out).len(), 1);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine", "files that are not the run's stay");
}

#[test]
fn the_manifest_records_set_values_and_the_build_and_resume_warns_when_they_change() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", "");
    let out = tmp.path().join("out");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=2", "--set", "SAVE_STEPS=2"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["overrides"], serde_json::json!([["MAX_STEPS", "2"], ["SAVE_STEPS", "2"]]), "{m}");
    assert!(m["command"].as_array().unwrap().iter().any(|a| a == "MAX_STEPS=2"), "{m}");
    assert_eq!((m["device"].as_str(), m["dtype"].as_str(), m["adapter_dtype"].as_str()), (Some("cpu"), Some("float32"), Some("float32")), "{m}");
    let commit = m["git_commit"].as_str().unwrap();
    assert!(commit == "unknown" || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{m}");
    assert_eq!(m["base_weights_sha256"].as_str().unwrap().len(), 64, "{m}");
    assert!(m["base_weights_hash"].as_str().unwrap().starts_with("sha256"), "{m}");
    assert_eq!(m["qscript_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["recipe_file"], "train.rhai");
    assert!(out.join("train.rhai").is_file());
    assert!(m["checkpoint_offload"].is_null(), "no checkpointing, nothing to record: {m}");
    // The checkpoint's manifest is the same record.
    let ck: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-2/manifest.json")).unwrap()).unwrap();
    assert_eq!(ck["overrides"], m["overrides"]);
    // Resuming with other --set values: told so, and the run goes on.
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=3", "--set", "SAVE_STEPS=2", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resumed from") && err.contains("--set values changed"), "{err}");
    assert!(err.contains("MAX_STEPS=2") && err.contains("MAX_STEPS=3"), "{err}");
    assert_eq!(common::metrics(&out).iter().filter(|e| e.get("loss").is_some()).count(), 3);
}

/// With gradient checkpointing the manifest says whether the kept inputs went to host memory:
/// never on the CPU, whatever the kwargs ask.
#[test]
fn the_manifest_records_whether_checkpoints_were_offloaded() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, ", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ offload: true }", "");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=1"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["checkpoint_offload"], false, "{m}");
}

/// Starts `recipe`, sends SIGINT (a terminal's Ctrl-C) once the line of step `k` appears, and
/// returns the exit code and stderr.
fn interrupt_at(recipe: &Path, extra: &[&str], k: usize) -> (i32, String) {
    let mut child = qscript().arg(recipe).args(extra).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err.push_str(&line);
        err.push('\n');
        if line.starts_with(&format!("step {k}/")) {
            break;
        }
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    for line in lines {
        err.push_str(&line.unwrap());
        err.push('\n');
    }
    (child.wait().unwrap().code().unwrap_or(-1), err)
}

#[test]
fn ctrl_c_checkpoints_and_the_printed_command_resumes_bit_identically() {
    let (tmp, model, data) = common::chat_fixture();
    // A callback that takes a while, so the signal lands mid-run.
    let slow = "on_step_end: |s| { let i = 0; while i < 300000 { i += 1; } }";
    let ref_dir = tmp.path().join("ref");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let r = recipe(&ref_dir, &model, &data, "", slow);
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=12"]);
    assert_eq!(code, 0, "{err}");
    let want_adapter = std::fs::read(ref_dir.join("out/adapter/adapter_model.safetensors")).unwrap();
    let want_metrics = common::metrics_without_timing(&ref_dir.join("out"));
    assert_eq!(want_metrics.len(), 12);

    let dir = tmp.path().join("cut");
    std::fs::create_dir_all(&dir).unwrap();
    let r = recipe(&dir, &model, &data, "", slow);
    let (code, err) = interrupt_at(&r, &["--set", "MAX_STEPS=12"], 4);
    assert_eq!(code, 130, "{err}");
    let out = dir.join("out");
    let at = err.lines().find_map(|l| l.strip_prefix("interrupted at step ")).unwrap_or_else(|| panic!("{err}"));
    let step: usize = at.split('/').next().unwrap().parse().unwrap();
    assert!((4..12).contains(&step), "{err}");
    assert!(out.join(format!("checkpoint-{step}/optimizer.safetensors")).is_file() && out.join("loss.png").is_file(), "{err}");
    assert_eq!(common::metrics(&out).len(), step, "{err}");
    assert!(!out.join("adapter").exists(), "the recipe stopped at train()");
    // The printed command resumes (it is the same command with --resume).
    let cmd = err.lines().find_map(|l| l.strip_prefix("resume with: ")).unwrap_or_else(|| panic!("{err}"));
    let words: Vec<&str> = cmd.split(' ').collect();
    assert_eq!(words[0], env!("CARGO_BIN_EXE_qscript"), "{cmd}");
    assert!(cmd.ends_with(" --resume") && cmd.contains("MAX_STEPS=12"), "{cmd}");
    let o = Command::new(words[0]).args(&words[1..]).env("QSCRIPT_QUIET", "1").output().unwrap();
    let err2 = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err2}");
    assert!(err2.contains(&format!("resumed from {}", out.join(format!("checkpoint-{step}")).display())), "{err2}");
    assert_eq!(common::metrics_without_timing(&out), want_metrics, "losses, learning rates and gradient norms of every step");
    assert!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap() == want_adapter, "resumed adapter differs from the uninterrupted run");
}

#[test]
fn early_stopping_and_the_best_checkpoint_loaded_at_the_end() {
    let (tmp, model, data) = common::chat_fixture();
    // Training on the eval data lowers eval_loss at every step; with greater_is_better the first
    // evaluation stays the best, so patience 2 stops at step 3 and step 1's adapters come back.
    let args = ", eval_strategy: \"steps\", eval_steps: 1, load_best_model_at_end: true, \
                metric_for_best_model: \"loss\", greater_is_better: true, early_stopping_patience: 2";
    let r = recipe(tmp.path(), &model, &data, args, "");
    let (code, out_text, err) = run(&r, &["--set", "SAVE_STEPS=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out_text.contains("STEP:3") && out_text.contains("STOPPED:true"), "{out_text}\n{err}");
    assert!(err.contains("early stopping") && err.contains("load_best_model_at_end: loaded"), "{err}");
    let out = tmp.path().join("out");
    let evals: Vec<f64> = common::metrics(&out).iter().filter_map(|e| e.get("eval_loss")?.as_f64()).collect();
    assert!(evals.len() == 3 && evals[0] > evals[1] && evals[1] > evals[2], "{evals:?}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-3/trainer_state.json")).unwrap()).unwrap();
    assert!(state["best_model_checkpoint"].as_str().unwrap().ends_with("checkpoint-1"), "{state}");
    let best = std::fs::read(out.join("checkpoint-1/adapter_model.safetensors")).unwrap();
    let last = std::fs::read(out.join("checkpoint-3/adapter_model.safetensors")).unwrap();
    assert!(best != last);
    assert!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap() == best, "adapter/ holds the best checkpoint");
    // The rules transformers enforces.
    let bad = recipe(tmp.path(), &model, &data, ", load_best_model_at_end: true", "");
    let (code, _, err) = run(&bad, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("load_best_model_at_end") && err.contains("eval_strategy"), "{err}");
}

#[test]
fn train_takes_resume_from_checkpoint_as_transformers() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", "");
    let out = tmp.path().join("out");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=2", "--set", "SAVE_STEPS=1"]);
    assert_eq!(code, 0, "{err}");
    let ck1 = out.join("checkpoint-1");
    let src = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, src.replace("trainer.train()", &format!("trainer.train(#{{ resume_from_checkpoint: \"{}\" }})", ck1.display()))).unwrap();
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=3", "--set", "SAVE_STEPS=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("resumed from {} at step 1", ck1.display())), "{err}");
    assert_eq!(common::metrics(&out).iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3]);
    // A misspelt key is an error with the recipe's position and a hint.
    std::fs::write(&r, src.replace("trainer.train()", "trainer.train(#{ resume_from_checkpont: true })")).unwrap();
    let (code, _, err) = run(&r, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("train.rhai:11:") && err.contains("did you mean `resume_from_checkpoint`"), "{err}");
}

#[test]
fn a_second_ctrl_c_exits_at_once() {
    let (tmp, model, data) = common::chat_fixture();
    // on_step_end prints 1.3 MB to a stdout nobody reads: the recipe blocks inside train(), in
    // work that the first Ctrl-C cannot cut short (as a stuck callback or a hung write would).
    let stuck = "on_step_end: |s| { let x = \"xxxxxxxxxx\"; for i in 0..17 { x += x; } print(x); }";
    let r = recipe(tmp.path(), &model, &data, "", stuck);
    let mut child = qscript().arg(&r).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let _stdout = child.stdout.take().unwrap(); // kept open, never read
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let mut err = String::new();
    let wait_for = |pat: &str, err: &mut String| loop {
        let line = rx.recv_timeout(std::time::Duration::from_secs(120)).unwrap_or_else(|_| panic!("no {pat:?} line; stderr:\n{err}"));
        err.push_str(&line);
        err.push('\n');
        if line.starts_with(pat) {
            return line;
        }
    };
    wait_for("step 1/", &mut err);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = child.id().to_string();
    let sigint = || assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    sigint();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the first Ctrl-C waits for the work in flight; stderr:\n{err}");
    sigint();
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            panic!("a second Ctrl-C did not end the process; stderr:\n{err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert_eq!(wait_for("interrupted", &mut err), "interrupted", "ended by the handler, not by the checkpointing path; stderr:\n{err}");
}

#[test]
fn ctrl_c_inside_the_work_after_a_step_is_finished_by_the_resumed_run() {
    let (tmp, model, data) = common::chat_fixture();
    // on_log of step SPIN_AT spins until Ctrl-C cuts it: the step's evaluation and checkpoint
    // (due at step 4) did not run yet; the resumed run must do them as the uninterrupted one did.
    let spin = "on_log: |e| { if e.step == SPIN_AT { let i = 0; while i < 200000000 { i += 1; } } }";
    let args = ", eval_strategy: \"steps\", eval_steps: 2";
    let make = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        let r = recipe(dir, &model, &data, args, spin);
        let src = std::fs::read_to_string(&r).unwrap().replace("const MAX_STEPS = 10;", "const MAX_STEPS = 6;\nconst SPIN_AT = 0;");
        std::fs::write(&r, src).unwrap();
        r
    };
    let ref_dir = tmp.path().join("ref");
    let (code, _, err) = run(&make(&ref_dir), &["--set", "SAVE_STEPS=4"]);
    assert_eq!(code, 0, "{err}");
    let want_metrics = common::metrics_without_timing(&ref_dir.join("out"));
    assert_eq!(want_metrics.iter().filter(|e| e.get("eval_loss").is_some()).count(), 3);

    let dir = tmp.path().join("cut");
    let r = make(&dir);
    let (code, err) = interrupt_at(&r, &["--set", "SAVE_STEPS=4", "--set", "SPIN_AT=4"], 4);
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("interrupted at step 4/6"), "{err}");
    let out = dir.join("out");
    assert_eq!(common::metrics(&out).iter().filter(|e| e.get("eval_loss").is_some()).count(), 1, "step 4's evaluation was cut: {err}");
    let (code, _, err) = run(&r, &["--set", "SAVE_STEPS=4", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(common::metrics_without_timing(&out), want_metrics, "the evaluation at step 4 ran on resume");
    for f in ["checkpoint-4/adapter_model.safetensors", "checkpoint-4/trainer_state.json", "adapter/adapter_model.safetensors"] {
        let (a, b) = (std::fs::read(out.join(f)).unwrap(), std::fs::read(ref_dir.join("out").join(f)).unwrap());
        if f.ends_with(".json") {
            let strip = |b: &[u8]| {
                let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
                for e in v["log_history"].as_array_mut().unwrap() {
                    e.as_object_mut().unwrap().remove("tokens_per_sec");
                }
                v.as_object_mut().unwrap().remove("best_model_checkpoint");
                v
            };
            assert_eq!(strip(&a), strip(&b), "{f}");
        } else {
            assert!(a == b, "{f} differs from the uninterrupted run");
        }
    }
}

#[test]
fn the_checkpoint_ctrl_c_writes_resumes_even_with_save_only_model() {
    let (tmp, model, data) = common::chat_fixture();
    let slow = "on_step_end: |s| { let i = 0; while i < 300000 { i += 1; } }";
    let r = recipe(tmp.path(), &model, &data, ", save_only_model: true", slow);
    let (code, err) = interrupt_at(&r, &["--set", "MAX_STEPS=8", "--set", "SAVE_STEPS=2"], 3);
    assert_eq!(code, 130, "{err}");
    let at = err.lines().find_map(|l| l.strip_prefix("interrupted at step ")).unwrap_or_else(|| panic!("{err}"));
    let step: usize = at.split('/').next().unwrap().parse().unwrap();
    let out = tmp.path().join("out");
    assert!(out.join(format!("checkpoint-{step}/optimizer.safetensors")).is_file(), "{err}");
    let (code, _, err) = run(&r, &["--set", "MAX_STEPS=8", "--set", "SAVE_STEPS=2", "--resume"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("at step {step}")), "{err}");
    assert!(!out.join("checkpoint-8/optimizer.safetensors").exists(), "the scheduled checkpoints stay model-only");
}
