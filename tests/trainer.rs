//! The SFT trainer: accumulation equivalence, exact resume after SIGKILL, callbacks, records,
//! and bad input.

mod common;

use qscript::data::{load_dataset, LoadOptions as DataLoadOptions};
use qscript::model::lora::{self, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::{NoCallbacks, SftTrainer, TrainingArguments};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn qscript() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qscript"));
    c.env("QSCRIPT_QUIET", "1");
    c
}

fn adapter_after_one_step(model_dir: &Path, data: &Path, out: &Path, batch: usize, accum: usize) -> Vec<Vec<f32>> {
    let mut m = Model::load_hf_dir("tiny", model_dir, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, target_modules: TargetModules::AllLinear, ..Default::default() };
    // Random B so that every adapter receives gradient at step 1.
    let cfg = LoraConfig { init_lora_weights: lora::InitLoraWeights::Random, ..cfg };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    m.lora_config = Some(cfg);
    let (ds, _) = load_dataset(data.to_str().unwrap(), &DataLoadOptions::default()).unwrap();
    let mut args = TrainingArguments::new(out);
    args.per_device_train_batch_size = batch;
    args.gradient_accumulation_steps = accum;
    args.max_steps = Some(1);
    args.learning_rate = 1e-3;
    args.save_strategy = qscript::train::args::Strategy::No;
    let mut t = SftTrainer::new(&m, &ds, None, args, None, Box::new(|_, _| Ok(()))).unwrap();
    t.train(&mut m, &mut NoCallbacks).unwrap();
    m.llama.layers.iter().flat_map(|l| qscript::model::names::LLAMA.projs.iter().map(move |&p| {
        let lo = l.proj(p).lora.as_ref().unwrap();
        let mut v = lo.a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.extend(lo.b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        v
    })).collect()
}

#[test]
fn accumulation_4x1_equals_batch_4() {
    let (tmp, model, data) = common::chat_fixture();
    let a = adapter_after_one_step(&model, &data, &tmp.path().join("a"), 4, 1);
    let b = adapter_after_one_step(&model, &data, &tmp.path().join("b"), 1, 4);
    let mut max_rel = 0f32;
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            max_rel = max_rel.max((p - q).abs() / q.abs().max(1e-3));
        }
    }
    assert!(max_rel < 1e-4, "accumulated update differs: {max_rel}");
    // And the step did change the adapters (the comparison is not vacuous).
    let c = adapter_after_one_step(&model, &data, &tmp.path().join("c"), 2, 1);
    assert!(a.iter().zip(&c).any(|(x, y)| x != y));
}

fn recipe(dir: &Path, model: &Path, data: &Path, extra_args: &str, callbacks: &str) -> PathBuf {
    let src = format!(
        r#"
const OUT = "{out}";
const RESUME = false;
const MAX_STEPS = 10;
let model = load_model("{model}");
let model = get_peft_model(model, LoraConfig(#{{ r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: "all-linear" }}));
let data = load_dataset("{data}");
let args = TrainingArguments(#{{ output_dir: OUT, max_steps: MAX_STEPS, per_device_train_batch_size: 4,
    learning_rate: 1e-3, logging_steps: 1, save_steps: 1, resume_from_checkpoint: RESUME {extra_args} }});
let trainer = SFTTrainer(model, data, args, #{{ callbacks: #{{ {callbacks} }} }});
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

/// The fixture's folder (model, data, runs), granted to its recipes.
fn grants(recipe: &Path) -> [String; 2] {
    let tmp = recipe.parent().unwrap().parent().unwrap().display().to_string();
    [format!("--allow-read={tmp}"), format!("--allow-write={tmp}")]
}

fn run(recipe: &Path, sets: &[&str]) -> (i32, String, String) {
    let mut c = qscript();
    c.arg(recipe).args(grants(recipe));
    for s in sets {
        c.args(["--set", s]);
    }
    let o = c.output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn resume_after_sigkill_is_bit_identical() {
    let (tmp, model, data) = common::chat_fixture();
    // Uninterrupted reference run.
    let ref_dir = tmp.path().join("ref");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let r = recipe(&ref_dir, &model, &data, "", "");
    let (code, out, err) = run(&r, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let want = std::fs::read(ref_dir.join("out/adapter/adapter_model.safetensors")).unwrap();
    assert!(ref_dir.join("out/metrics.jsonl").is_file() && ref_dir.join("out/loss.png").is_file());
    // Kill at different points (after the k-th logged step, plus a delay that sometimes lands
    // inside a checkpoint write), resume, compare.
    for (trial, (k, delay_ms)) in [(2usize, 0u64), (5, 3), (8, 1)].into_iter().enumerate() {
        let dir = tmp.path().join(format!("trial{trial}"));
        std::fs::create_dir_all(&dir).unwrap();
        let r = recipe(&dir, &model, &data, "", "");
        let mut child = qscript().arg(&r).args(grants(&r)).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.starts_with(&format!("step {k}/")) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (code, out, err) = run(&r, &["RESUME=true"]);
        assert_eq!(code, 0, "trial {trial}: {out}\n{err}");
        assert!(err.contains("resumed from"), "trial {trial}: {err}");
        let got = std::fs::read(dir.join("out/adapter/adapter_model.safetensors")).unwrap();
        assert!(got == want, "trial {trial}: resumed adapter differs from the uninterrupted run");
        // No half-written checkpoint is left looking valid.
        for e in std::fs::read_dir(dir.join("out")).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-") {
                assert!(p.join("trainer_state.json").is_file() && p.join("optimizer.safetensors").is_file(), "{}", p.display());
            }
        }
    }
}

#[test]
fn callback_returning_stop_ends_training() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", r#"on_log: |m| if m.step >= 3 { "stop" } else { () }"#);
    let (code, out, err) = run(&r, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("STEP:3") && out.contains("STOPPED:true"), "{out}");
    let metrics = std::fs::read_to_string(tmp.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
}

#[test]
fn callback_error_points_at_the_recipe_line() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", r#"on_log: |m| throw "callback exploded""#);
    let (code, _, err) = run(&r, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("train.rhai:10:") && err.contains("callback exploded"), "{err}");
}

#[test]
fn callbacks_may_read_the_model_but_not_change_it() {
    // train() holds the model: a callback reads it through the trainer's (as transformers
    // passes `model` to callbacks: evaluate, generate a sample), and a change is an error, not a
    // panic.
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", r#"on_log: |m| print("TOKENS:" + model.tokenize("hi").len() + ":" + model.generate("hi", #{ max_new_tokens: 2 }).len())"#);
    let (code, out, err) = run(&r, &["MAX_STEPS=2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("TOKENS:").count(), 2, "{out}");
    let r = recipe(tmp.path(), &model, &data, "", r#"on_step_end: |s| model.merge_and_unload()"#);
    // A fresh output_dir: the first run's holds a run.
    let (code, _, err) = run(&r, &[&format!("OUT={}", tmp.path().join("out2").display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the model is being trained") && err.contains("train.rhai:10:"), "{err}");
}

#[test]
fn bad_training_input_is_a_clear_error_and_overwrites_nothing() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, "", "");
    // Missing checkpoint.
    let (code, _, err) = run(&r, &["RESUME=true"]);
    assert_eq!(code, 1);
    assert!(err.contains("no checkpoint"), "{err}");
    // max_steps 0.
    let (code, _, err) = run(&r, &["MAX_STEPS=0"]);
    assert_eq!(code, 1);
    assert!(err.contains("max_steps"), "{err}");
    // A real run, then a corrupt checkpoint: the error names the file, nothing is rewritten.
    let (code, _, err) = run(&r, &["MAX_STEPS=2"]);
    assert_eq!(code, 0, "{err}");
    let state = tmp.path().join("out/checkpoint-2/trainer_state.json");
    std::fs::write(&state, "{ not json").unwrap();
    let before: Vec<_> = std::fs::read_dir(tmp.path().join("out/checkpoint-2")).unwrap().map(|e| {
        let p = e.unwrap().path();
        (p.clone(), std::fs::read(&p).unwrap())
    }).collect();
    let (code, _, err) = run(&r, &["RESUME=true"]);
    assert_eq!(code, 1);
    assert!(err.contains("trainer_state.json") && err.contains("corrupt"), "{err}");
    for (p, bytes) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
    // output_dir is a file.
    let file_out = tmp.path().join("file_out");
    std::fs::write(&file_out, "keep me").unwrap();
    let (code, _, err) = run(&r, &[&format!("OUT={}", file_out.display())]);
    assert_eq!(code, 1);
    assert!(err.contains("is a file"), "{err}");
    assert_eq!(std::fs::read_to_string(&file_out).unwrap(), "keep me");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn batch_larger_than_dataset_is_an_error() {
    let (tmp, model, _) = common::chat_fixture();
    let small = tmp.path().join("small.jsonl");
    common::write_conversations(&small, 3);
    let r = recipe(tmp.path(), &model, &small, "", "");
    let (code, _, err) = run(&r, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("larger than the training set"), "{err}");
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint() {
    let (tmp, model, data) = common::chat_fixture();
    let r = recipe(tmp.path(), &model, &data, ", max_grad_norm: 0.0", "");
    // A learning rate this large makes the adapters infinite after the first update.
    let src = std::fs::read_to_string(&r).unwrap().replace("learning_rate: 1e-3", "learning_rate: 1e38");
    std::fs::write(&r, src).unwrap();
    let (code, _, err) = run(&r, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("non-finite") && err.contains("step "), "{err}");
    assert!(tmp.path().join("out/checkpoint-1/optimizer.safetensors").is_file(), "{err}");
}
