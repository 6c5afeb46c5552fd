//! AdamW semantics, gradient clipping, and an overfitting run of the whole engine.

use candle_core::{DType, Device, Tensor};
use qscript::model::engine::{self, LoraGrad, StepOptions, TrainBatch};
use qscript::model::names::Proj;
use qscript::model::llama::Weight;
use qscript::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use qscript::model::{LoadOptions, Model};
use qscript::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, SeedableRng};
use std::path::Path;

fn tiny() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
    Model::load_hf_dir("tiny", &dir, &LoadOptions::default()).unwrap()
}

fn all_linear(r: usize, alpha: f64, init: InitLoraWeights) -> LoraConfig {
    LoraConfig { r, lora_alpha: alpha, target_modules: TargetModules::AllLinear, init_lora_weights: init, ..Default::default() }
}

/// AdamW as torch.optim.AdamW documents it, in f64, for one scalar.
fn reference_adamw(w0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let (mut w, mut m, mut v) = (w0, 0.0, 0.0);
    for (t, &g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        w *= 1.0 - lr * wd;
        m = b1 * m + (1.0 - b1) * g;
        v = b2 * v + (1.0 - b2) * g * g;
        let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
        w -= lr / (1.0 - b1.powi(t)) * m / denom;
    }
    w
}

#[test]
fn adamw_follows_pytorch_semantics() {
    let mut m = tiny();
    lora::attach(&mut m.llama, &LoraConfig { r: 2, target_modules: TargetModules::Names(vec!["q_proj".into()]), init_lora_weights: InitLoraWeights::Random, ..Default::default() }, 0).unwrap();
    let (lr, wd) = (1e-2, 0.1);
    let mut opt = AdamW::new(&m.llama, AdamWConfig { lr, weight_decay: wd, ..Default::default() }).unwrap();
    assert_eq!(opt.params.len(), 4); // 2 layers × (A, B)
    let a0 = m.llama.layers[1].proj(Proj::Q).lora.as_ref().unwrap().a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let seq = [0.5f64, -1.25, 0.75, 2.0, -0.1];
    let shape = |p: Proj, l: usize, b: bool| {
        let lo = m.llama.layers[l].proj(p).lora.as_ref().unwrap();
        if b { lo.b.dims2().unwrap() } else { lo.a.dims2().unwrap() }
    };
    let (sa, sb) = (shape(Proj::Q, 1, false), shape(Proj::Q, 1, true));
    for &g in &seq {
        // Element i of every gradient is g · (i + 1) / 10.
        let grad = |s: (usize, usize)| Tensor::from_vec((0..s.0 * s.1).map(|i| (g * (i + 1) as f64 / 10.0) as f32).collect::<Vec<_>>(), s, &Device::Cpu).unwrap();
        let grads: Vec<LoraGrad> = (0..2).map(|layer| LoraGrad { layer, proj: Proj::Q, da: grad(sa), db: grad(sb) }).collect();
        opt.step(&mut m.llama, &grads, lr).unwrap();
    }
    let a = m.llama.layers[1].proj(Proj::Q).lora.as_ref().unwrap().a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in [0usize, 5, 17] {
        let gs: Vec<f64> = seq.iter().map(|g| g * (i + 1) as f64 / 10.0).collect();
        let want = reference_adamw(a0[i] as f64, &gs, lr, wd);
        assert!((a[i] as f64 - want).abs() < 1e-6, "element {i}: {} vs {want}", a[i]);
    }
    assert_eq!(opt.step, 5);
}

#[test]
fn clipping_scales_to_max_norm() {
    let t = |v: Vec<f32>| Tensor::from_vec(v, (1, 2), &Device::Cpu).unwrap();
    let mut grads = vec![LoraGrad { layer: 0, proj: Proj::Q, da: t(vec![3.0, 0.0]), db: t(vec![0.0, 4.0]) }];
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let after = qscript::train::optim::grad_norm(&grads).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    // Below the limit nothing changes.
    let n2 = clip_grad_norm(&mut grads, 10.0).unwrap();
    assert!((n2 - after).abs() < 1e-12);
    // Not f32 on the CPU (as on a GPU): one flat vector; the scaled gradients are views of it.
    let t64 = |v: Vec<f64>| Tensor::from_vec(v, (1, 2), &Device::Cpu).unwrap();
    let mut grads = vec![
        LoraGrad { layer: 0, proj: Proj::Q, da: t64(vec![3.0, 0.0]), db: t64(vec![0.0, 0.0]) },
        LoraGrad { layer: 1, proj: Proj::V, da: t64(vec![0.0, 0.0]), db: t64(vec![0.0, 4.0]) },
    ];
    assert!((qscript::train::optim::grad_norm(&grads).unwrap() - 5.0).abs() < 1e-12);
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let got: Vec<Vec<f32>> = grads.iter().flat_map(|g| [&g.da, &g.db]).map(|t| t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    let want = [[0.6f32, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.8]];
    for (g, w) in got.iter().zip(&want) {
        assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?}");
    }
    // Below the limit the gradients are left as they are.
    let mut small = vec![LoraGrad { layer: 0, proj: Proj::Q, da: t64(vec![0.3, 0.0]), db: t64(vec![0.0, 0.4]) }];
    assert!((clip_grad_norm(&mut small, 1.0).unwrap() - 0.5).abs() < 1e-12);
    assert_eq!(small[0].da.dtype(), candle_core::DType::F64);
}

#[test]
fn print_trainable_parameters_counts_like_peft() {
    let mut m = tiny();
    lora::attach(&mut m.llama, &all_linear(8, 16.0, InitLoraWeights::Default), 0).unwrap();
    // hidden 64, inter 128, q 64, kv 32 (2 heads × 16): per layer r·(in+out) summed over 7 projections.
    let per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64));
    let (t, all) = lora::parameter_counts(&m.llama);
    assert_eq!(t, 2 * per_layer);
    assert_eq!(all, m.llama.num_parameters() + t);
    let line = lora::trainable_parameters_line(&m.llama);
    assert!(line.starts_with(&format!("trainable params: {},{} ||", t / 1000, t % 1000)), "{line}");
    // Default init: B = 0, so the adapted model equals the base.
    let base = tiny();
    let ids = [1u32, 5, 9, 200];
    assert_eq!(m.forward_ids(&ids).unwrap(), base.forward_ids(&ids).unwrap());
}

#[test]
fn smollm2_r16_all_projections_counts_like_peft() {
    let dir = match qscript::model::hub::resolve(qscript::model::hub::DEFAULT_MODEL, None).unwrap() {
        qscript::model::hub::ModelSource::HfDir(d) => d,
        other => panic!("{other:?}"),
    };
    let mut m = Model::load_hf_dir("smollm2", &dir, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: TargetModules::Names(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec()),
        ..Default::default()
    };
    assert_eq!(lora::attach(&mut m.llama, &cfg, 0).unwrap(), 30 * 7);
    assert_eq!(lora::parameter_counts(&m.llama), (4_884_480, 139_399_488));
    assert_eq!(lora::trainable_parameters_line(&m.llama), "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039");
}

#[test]
fn lora_overfits_fixed_sequences() {
    let mut m = tiny();
    // The golden tiny model is freshly initialised (std 0.02): behind the final RMSNorm its
    // frozen head cannot give any token a logit margin above ~1.3, so no adapter could fit
    // anything. Scale the head as training would have (logits of a few units).
    let head = m.llama.lm_head.as_mut().unwrap();
    head.weight = Weight::Dense((head.dense_weight().unwrap() * 8.0).unwrap());
    let cfg = LoraConfig { lora_dropout: 0.05, ..all_linear(8, 16.0, InitLoraWeights::Default) };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    let (b, t) = (8, 16);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % 256) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let batch = TrainBatch::new(b, t, &ids, &labels, None, None, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(&m.llama, AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let first = engine::loss(&m.llama, &batch).unwrap().mean_loss();
    let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
    for _ in 0..100 {
        let mut out = engine::forward_backward(&m.llama, &batch, &opts, &mut rng).unwrap();
        clip_grad_norm(&mut out.grads, 1.0).unwrap();
        opt.step(&mut m.llama, &out.grads, 1e-2).unwrap();
    }
    let last = engine::loss(&m.llama, &batch).unwrap().mean_loss();
    assert!(last < 0.1 * first, "loss {first} -> {last}: did not fall by 90%");
    let _ = DType::F32;
}

/// `gradient_checkpointing_kwargs` reaches the step: TrainingArguments' map → the step state →
/// the options every micro-batch's forward and backward gets.
#[test]
fn checkpoint_offload_reaches_the_step_options() {
    let mut m = tiny();
    lora::attach(&mut m.llama, &all_linear(2, 4.0, InitLoraWeights::Random), 0).unwrap();
    let opts = |map: &str| {
        let map = rhai::Engine::new().eval::<rhai::Map>(map).unwrap();
        let args = qscript::script::train_api::training_arguments(&map).unwrap();
        qscript::train::StepState::new(&m, args, 10).unwrap().step_options(8)
    };
    let o = opts(r#"#{ output_dir: "o", gradient_checkpointing: true }"#);
    assert!(o.gradient_checkpointing && o.offload_checkpoints, "checkpointing offloads by default");
    assert_eq!(o.grad_scale, Some(1.0 / 8.0));
    let o = opts(r#"#{ output_dir: "o", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ offload: false } }"#);
    assert!(o.gradient_checkpointing && !o.offload_checkpoints);
    let o = opts(r#"#{ output_dir: "o", gradient_checkpointing: true, gradient_checkpointing_kwargs: #{ offload: true, use_reentrant: false } }"#);
    assert!(o.offload_checkpoints);
    // Without checkpointing nothing is kept to offload.
    let o = opts(r#"#{ output_dir: "o", gradient_checkpointing_kwargs: #{ offload: true } }"#);
    assert!(!o.gradient_checkpointing && !o.offload_checkpoints);
}
