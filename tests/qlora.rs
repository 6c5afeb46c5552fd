//! QLoRA: the training engine on a 4-bit base. Gradients of the adapters match candle autograd
//! run on the dequantized weights (and the engine on a dense copy of them), with and without
//! checkpointing; a tiny 4-bit model with LoRA overfits fixed sequences.

use candle_core::{DType, Device};
use qscript::model::engine::{self, StepOptions, TrainBatch};
use qscript::model::names::LLAMA;
use qscript::model::llama::Weight;
use qscript::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use qscript::model::layers::linear;
use qscript::model::quantized::BnbConfig;
use qscript::model::{LoadOptions, Model};
use qscript::quant::QuantType;
use qscript::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rand::{rngs::StdRng, SeedableRng};
use std::path::Path;

mod common;
use common::autograd::{adapter_vars, randn, reference_loss, rel_err};

const DEV: Device = Device::Cpu;

/// The tiny golden model (2 layers, hidden 64, f32) with its decoder linears quantized to NF4 +
/// double quant while loading.
fn tiny_4bit() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
    let q = BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: DType::F32, ..Default::default() };
    Model::load_hf_dir("tiny-4bit", &dir, &LoadOptions { quantization: Some(q), ..Default::default() }).unwrap()
}

/// Random adapters on all seven projections of every layer (B ≠ 0, so every path matters).
fn with_adapters(mut m: Model) -> Model {
    let mut seed = 100;
    for layer in m.llama.layers.iter_mut() {
        for &p in LLAMA.projs {
            let lin = layer.proj_mut(p);
            let (o, i) = lin.weight_shape().unwrap();
            seed += 2;
            lin.lora = Some(linear::Lora { a: (randn(seed, &[4, i], DType::F32) * 0.2).unwrap(), b: (randn(seed + 1, &[o, 4], DType::F32) * 0.2).unwrap(), scaling: 2.0, dropout: 0.0 });
        }
    }
    m
}

#[test]
fn engine_gradients_with_4bit_base_match_autograd_on_dequantized_weights() {
    let m = with_adapters(tiny_4bit());
    assert!(LLAMA.projs.iter().all(|&p| m.llama.layers[1].proj(p).quantized().is_some()));
    let (b, t) = (2, 8);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 53 + 7) % 256).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let vars = adapter_vars(&m);
    let pos: Vec<u32> = (0..b * t).map(|i| (i % t) as u32).collect();
    let loss_ref = reference_loss(&m, &vars, &ids, &labels, &pos, &vec![1; b * t], b, t);
    let grads_ref = loss_ref.backward().unwrap();
    let batch = TrainBatch::new(b, t, &ids, &labels, None, None, &DEV).unwrap();

    // The same adapters on a dense copy of the dequantized weights: the engine must not care.
    let mut dense = with_adapters(tiny_4bit());
    for layer in dense.llama.layers.iter_mut() {
        for &p in LLAMA.projs {
            let lin = layer.proj_mut(p);
            lin.weight = Weight::Dense(lin.dense_weight().unwrap());
        }
    }
    for ckpt in [false, true] {
        let opts = StepOptions { train: true, gradient_checkpointing: ckpt, offload_checkpoints: false, grad_scale: None };
        let out = engine::forward_backward(&m.llama, &batch, &opts, &mut StdRng::seed_from_u64(0)).unwrap();
        let want = loss_ref.to_scalar::<f32>().unwrap() as f64;
        assert!((out.mean_loss() - want).abs() / want < 1e-5, "loss {} vs {want}", out.mean_loss());
        assert_eq!(out.grads.len(), 14);
        for g in &out.grads {
            let k = g.layer * 7 + LLAMA.projs.iter().position(|&q| q == g.proj).unwrap();
            let (a, bv) = &vars[k];
            let (ea, eb) = (rel_err(&g.da, grads_ref.get(a.as_tensor()).unwrap()), rel_err(&g.db, grads_ref.get(bv.as_tensor()).unwrap()));
            assert!(ea < 1e-5 && eb < 1e-5, "layer {} {:?}: dA {ea:e}, dB {eb:e} (checkpointing {ckpt})", g.layer, g.proj);
        }
        let d = engine::forward_backward(&dense.llama, &batch, &opts, &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(d.loss_sum, out.loss_sum);
        for (x, y) in out.grads.iter().zip(&d.grads) {
            assert_eq!(x.da.to_vec2::<f32>().unwrap(), y.da.to_vec2::<f32>().unwrap());
            assert_eq!(x.db.to_vec2::<f32>().unwrap(), y.db.to_vec2::<f32>().unwrap());
        }
    }
}

#[test]
fn lora_on_4bit_base_overfits_fixed_sequences() {
    let mut m = tiny_4bit();
    // As in tests/train.rs: the freshly initialised golden model's frozen head gives no token a
    // logit margin above ~1.3 behind the final RMSNorm; scale it as training would have. The
    // head stays dense in a 4-bit model (transformers keeps lm_head unquantized).
    let head = m.llama.lm_head.as_mut().unwrap();
    assert!(head.quantized().is_none());
    head.weight = Weight::Dense((head.dense_weight().unwrap() * 8.0).unwrap());
    let cfg = LoraConfig { r: 8, lora_alpha: 16.0, lora_dropout: 0.05, target_modules: TargetModules::AllLinear, init_lora_weights: InitLoraWeights::Default, ..Default::default() };
    lora::attach(&mut m.llama, &cfg, 0).unwrap();
    let (b, t) = (8, 16);
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % 256) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let batch = TrainBatch::new(b, t, &ids, &labels, None, None, &DEV).unwrap();
    let mut opt = AdamW::new(&m.llama, AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let first = engine::loss(&m.llama, &batch).unwrap().mean_loss();
    let opts = StepOptions { train: true, gradient_checkpointing: true, offload_checkpoints: false, grad_scale: None };
    for _ in 0..100 {
        let mut out = engine::forward_backward(&m.llama, &batch, &opts, &mut rng).unwrap();
        clip_grad_norm(&mut out.grads, 1.0).unwrap();
        opt.step(&mut m.llama, &out.grads, 1e-2).unwrap();
    }
    let last = engine::loss(&m.llama, &batch).unwrap().mean_loss();
    eprintln!("4-bit base + LoRA: loss {first:.4} -> {last:.4}");
    assert!(last < 0.1 * first, "loss {first} -> {last}: did not fall by 90%");
    // Inference (Linear::forward: dequantize + matmul, LoRA term added) agrees with the engine.
    let row = &ids[..t];
    let logits = m.forward_ids(row).unwrap();
    let mut nll = 0.0;
    for i in 0..t - 1 {
        let l = &logits[i];
        let mx = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + l.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        nll += lse - l[row[i + 1] as usize] as f64;
    }
    let one = TrainBatch::new(1, t, row, &labels[..t], None, None, &DEV).unwrap();
    let want = engine::loss(&m.llama, &one).unwrap().mean_loss();
    assert!((nll / (t - 1) as f64 - want).abs() < 1e-4 * want.max(1.0), "inference {} vs engine {want}", nll / (t - 1) as f64);
    // The base never changed: still 4-bit.
    assert!(m.llama.layers.iter().all(|l| LLAMA.projs.iter().all(|&p| l.proj(p).quantized().is_some())));
}
