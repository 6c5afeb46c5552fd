//! The REPL's pause: Ctrl-C (the same cancel flag) pauses `train()` at a step boundary with the
//! run kept in memory; evaluating, generating and changing the callbacks in between leave no
//! trace, and `resume_paused` ends bit-identical to a run that was never paused. One test in its
//! own binary: the cancel flag is process-wide.

mod common;

use qscript::data::{load_dataset, LoadOptions as DataLoadOptions};
use qscript::model::lora::{self, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::{Callbacks, Control, NoCallbacks, OnInterrupt, SftTrainer, TrainingArguments};
use std::path::Path;
use std::sync::atomic::Ordering;

/// Presses Ctrl-C (sets the cancel flag) when step `at` ends.
struct CtrlCAt(usize);

impl Callbacks for CtrlCAt {
    fn on_step_end(&mut self, _: &Model, state: &serde_json::Value) -> anyhow::Result<Control> {
        if state["global_step"].as_u64() == Some(self.0 as u64) {
            qscript::CANCEL.store(true, Ordering::SeqCst);
        }
        Ok(Control::Continue)
    }
}

fn setup(model_dir: &Path, data: &Path, out: &Path) -> (Model, SftTrainer) {
    let mut m = Model::load_hf_dir("tiny", model_dir, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.1, target_modules: TargetModules::AllLinear, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    m.lora_config = Some(cfg);
    let (ds, _) = load_dataset(data.to_str().unwrap(), &DataLoadOptions::default()).unwrap();
    let mut args = TrainingArguments::new(out);
    args.per_device_train_batch_size = 4;
    args.max_steps = Some(9);
    args.learning_rate = 1e-3;
    args.logging_steps = 2;
    args.save_steps = 3;
    args.lr_scheduler_type = qscript::train::args::Schedule::Cosine;
    args.warmup_steps = 2;
    let mut t = SftTrainer::new(&m, &ds, Some(&ds), args, None, Box::new(|_, _| Ok(()))).unwrap();
    t.on_interrupt = OnInterrupt::Pause;
    (m, t)
}

fn adapters(m: &Model) -> Vec<Vec<u32>> {
    m.llama.adapters().flat_map(|(_, lo)| [&lo.a, &lo.b]).map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()).collect()
}

#[test]
fn a_paused_run_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("tiny");
    common::tiny_chat_model(&model_dir);
    let data = tmp.path().join("data.jsonl");
    common::write_conversations(&data, 24);

    let (mut m, mut t) = setup(&model_dir, &data, &tmp.path().join("ref"));
    let whole = t.train(&mut m, &mut NoCallbacks).unwrap();
    assert!(!whole.paused && whole.global_step == 9);
    let (want, want_metrics) = (adapters(&m), common::metrics_without_timing(&tmp.path().join("ref")));

    // Paused after step 4 (between a log at 4 and a save at 6, mid-window of nothing pending).
    let out = tmp.path().join("paused");
    let (mut m, mut t) = setup(&model_dir, &data, &out);
    let s = t.train(&mut m, &mut CtrlCAt(4)).unwrap();
    assert!(s.paused && s.global_step == 4, "{s:?}");
    assert!(!qscript::CANCEL.load(Ordering::SeqCst), "the pause consumed the Ctrl-C");
    assert_eq!(t.paused_at(), Some((4, 9)));
    let at_pause = adapters(&m);
    assert_ne!(at_pause, want, "the run really stopped early");
    // What a user does while paused: evaluate, generate, start another train() by mistake.
    let e = t.evaluate(&m).unwrap();
    assert!(e.loss.is_finite());
    let opts = qscript::generate::GenerateOptions { max_new_tokens: 3, sampling: qscript::generate::sampling::SamplingParams::greedy(), stop: vec![], eos_token_ids: vec![] };
    qscript::generate::generate(&m, &[1, 5, 9], &opts, &mut |_| {}).unwrap();
    let err = t.train(&mut m, &mut NoCallbacks).unwrap_err().to_string();
    assert!(err.contains("paused at step 4") && err.contains("trainer.resume()"), "{err}");
    assert_eq!(adapters(&m), at_pause, "nothing in between changed the adapters");
    // Pause again mid-way (at 7, a log step's neighbour), then to the end with other callbacks.
    let s = t.resume_paused(&mut m, &mut CtrlCAt(7)).unwrap();
    assert!(s.paused && s.global_step == 7, "{s:?}");
    let s = t.resume_paused(&mut m, &mut NoCallbacks).unwrap();
    assert!(!s.paused && s.global_step == 9, "{s:?}");
    assert_eq!(t.paused_at(), None);
    assert!(t.resume_paused(&mut m, &mut NoCallbacks).unwrap_err().to_string().contains("not paused"));
    assert!(adapters(&m) == want, "paused and resumed adapters differ from the uninterrupted run");
    assert_eq!(common::metrics_without_timing(&out), want_metrics);
}
