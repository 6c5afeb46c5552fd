//! Each layer's inference path against its training path (`src/model/layers/`). Inference runs
//! the training forward's ops, so on the same rows the two agree exactly (tolerance 0). Where a
//! decode-only fast path runs (the batch-1 GEMV, the CPU decode attention on the buffered
//! cache), or the same op on a different number of rows (a product's summation may depend on
//! it), f32 agrees to 1e-5 and bf16 to 1e-2 (about two bf16 roundings), relative to the largest
//! value; 4-bit layers are held to the bound of their activations' dtype. And the case that
//! used to differ: a 4-bit layer with bf16 compute and f32 activations multiplies as
//! bitsandbytes does, in both paths.

use candle_core::{DType, Device, Tensor, D};
use qscript::model::engine::TrainBatch;
use qscript::model::layers::attention::Step;
use qscript::model::layers::kv_cache::LayerKv;
use qscript::model::layers::linear::{Linear, Lora};
use qscript::model::quantized::BnbConfig;
use qscript::model::{LoadOptions, Model};
use qscript::quant::{self, QuantType};
use rand::{rngs::StdRng, SeedableRng};
use std::path::Path;

mod common;
use common::autograd::{assert_close, randn, rel_err};

const DEV: Device = Device::Cpu;
/// Where the paths run different code or row counts: relative to the largest value.
const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { F32_TOL } else { BF16_TOL }
}

/// The 2-layer test Llama (hidden 64, 4 heads of 16, 2 KV heads), optionally quantized to NF4
/// with `compute` as bnb's compute dtype, with LoRA adapters on every projection.
fn tiny(dtype: DType, compute: Option<DType>) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
    let quantization = compute.map(|c| BnbConfig { quant_type: QuantType::Nf4, double_quant: true, compute_dtype: c, ..Default::default() });
    let mut m = Model::load_hf_dir("tiny", &dir, &LoadOptions { dtype, quantization, ..Default::default() }).unwrap();
    let mut seed = 500;
    for layer in m.llama.layers.iter_mut() {
        for &p in qscript::model::names::LLAMA.projs {
            let lin = layer.proj_mut(p);
            let (o, i) = lin.weight_shape().unwrap();
            seed += 2;
            let a = (randn(seed, &[4, i], dtype) * 0.2).unwrap();
            let b = (randn(seed + 1, &[o, 4], dtype) * 0.2).unwrap();
            lin.lora = Some(Lora { a, b, scaling: 2.0, dropout: 0.1 });
        }
    }
    m
}

fn ids(b: usize, t: usize) -> Vec<u32> {
    (0..(b * t) as u32).map(|i| (i * 37 + 11) % 256).collect()
}

fn batch(b: usize, t: usize) -> TrainBatch {
    let ids = ids(b, t);
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    TrainBatch::new(b, t, &ids, &labels, None, None, &DEV).unwrap()
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

// ---------- linear ----------

/// A `[out, in]` layer: dense in `dtype`, or NF4 computing in `compute` around `dtype`
/// activations; with bias and a LoRA adapter.
fn linear(dtype: DType, compute: Option<DType>) -> Linear {
    let (out, inp) = (96, 128);
    let w = (randn(1, &[out, inp], DType::F32) * 0.05).unwrap();
    let bias = Some(randn(2, &[out], dtype));
    let mut l = match compute {
        None => Linear::new(w.to_dtype(dtype).unwrap(), bias),
        Some(c) => {
            let q = quant::quantize_4bit(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &[out, inp], QuantType::Nf4, 64, true).unwrap();
            Linear::new_4bit(q, c, dtype, &DEV, bias).unwrap()
        }
    };
    let a = (randn(3, &[8, inp], dtype) * 0.1).unwrap();
    let b = (randn(4, &[out, 8], dtype) * 0.1).unwrap();
    l.lora = Some(Lora { a, b, scaling: 2.0, dropout: 0.1 });
    l
}

/// Inference (`[1, t, in]`) against the training forward (`[t, in]`, no dropout), batched and
/// for one row (decoding's GEMV where it applies).
fn check_linear(name: &str, l: &Linear, dtype: DType) {
    let x = randn(5, &[5, 128], dtype);
    let (want, _) = l.forward_train(&x, false, &mut rng()).unwrap();
    let got = l.forward(&x.unsqueeze(0).unwrap()).unwrap();
    assert_close(&format!("{name}: batched"), &got.squeeze(0).unwrap(), &want, 0.0);
    for r in 0..5 {
        let row = x.narrow(0, r, 1).unwrap();
        let got = l.forward(&row.unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_close(&format!("{name}: row {r}"), &got, &want.narrow(0, r, 1).unwrap(), tol(dtype));
    }
}

#[test]
fn linear_inference_equals_training() {
    // f32 rows take the GEMV (dense, and 4-bit computing in f32); the others the same code.
    check_linear("dense f32", &linear(DType::F32, None), DType::F32);
    check_linear("dense bf16", &linear(DType::BF16, None), DType::BF16);
    check_linear("nf4 f32", &linear(DType::F32, Some(DType::F32)), DType::F32);
    check_linear("nf4 bf16", &linear(DType::BF16, Some(DType::BF16)), DType::BF16);
    check_linear("nf4 bf16 compute, f32 activations", &linear(DType::F32, Some(DType::BF16)), DType::F32);
}

/// bitsandbytes' Linear4bit with f32 activations and bf16 compute: x to bf16, W dequantized to
/// bf16, the product and bias in bf16, the result to f32; backward's dy·W likewise (bnb's
/// MatMul4Bit); the LoRA term in the adapter's dtype (f32), as peft. Training and inference.
#[test]
fn nf4_with_bf16_compute_and_f32_activations_follows_bitsandbytes() {
    let l = linear(DType::F32, Some(DType::BF16));
    let q = l.quantized().unwrap();
    let w16 = quant::dequantize_4bit(q, DType::BF16).unwrap();
    let lo = l.lora.as_ref().unwrap();
    let x = randn(6, &[7, 128], DType::F32);
    let b16 = l.bias.as_ref().unwrap().to_dtype(DType::BF16).unwrap();
    let base = x.to_dtype(DType::BF16).unwrap().matmul(&w16.t().unwrap()).unwrap().broadcast_add(&b16).unwrap().to_dtype(DType::F32).unwrap();
    let u = x.matmul(&lo.a.t().unwrap()).unwrap();
    let want = (&base + (u * lo.scaling).unwrap().matmul(&lo.b.t().unwrap()).unwrap()).unwrap();
    let (y, saved) = l.forward_train(&x, false, &mut rng()).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    assert_close("training forward", &y, &want, 0.0);
    assert_close("inference forward", &l.forward(&x.unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap(), &want, 0.0);
    // Not what the activations' dtype gives (W rounded to bf16, then an f32 product).
    let f32_product = x.matmul(&w16.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
    assert!(rel_err(&base, &f32_product) > 1e-4, "the test must tell the two apart");

    let dy = randn(7, &[7, 96], DType::F32);
    let (dx, g) = l.backward(&saved, &dy).unwrap();
    let dx_base = dy.to_dtype(DType::BF16).unwrap().matmul(&w16).unwrap().to_dtype(DType::F32).unwrap();
    let du = (dy.matmul(&lo.b).unwrap() * lo.scaling).unwrap();
    assert_close("backward dx", &dx, &(dx_base + du.matmul(&lo.a).unwrap()).unwrap(), 1e-6);
    let (da, db) = g.unwrap();
    assert_close("backward dA", &da, &du.t().unwrap().matmul(&x).unwrap(), 1e-6);
    let u = x.matmul(&lo.a.t().unwrap()).unwrap();
    assert_close("backward dB", &db, &(dy.t().unwrap().matmul(&u).unwrap() * lo.scaling).unwrap(), 1e-6);
}

/// Activations in the compute dtype (every recipe but the one above): the 4-bit layer's
/// training forward and backward are the dense layer's on the dequantized weight, bit for bit.
#[test]
fn nf4_in_the_compute_dtype_is_the_dense_layer_on_its_dequantized_weight() {
    for dtype in [DType::F32, DType::BF16] {
        let l = linear(dtype, Some(dtype));
        let mut dense = Linear::new(l.dense_weight().unwrap(), l.bias.clone());
        dense.lora = l.lora.clone();
        let x = randn(8, &[6, 128], dtype);
        let (y, s) = l.forward_train(&x, true, &mut rng()).unwrap();
        let (yd, sd) = dense.forward_train(&x, true, &mut rng()).unwrap();
        assert_close(&format!("{dtype:?} forward"), &y, &yd, 0.0);
        let dy = randn(9, &[6, 96], dtype);
        let ((dx, g), (dxd, gd)) = (l.backward(&s, &dy).unwrap(), dense.backward(&sd, &dy).unwrap());
        assert_close(&format!("{dtype:?} dx"), &dx, &dxd, 0.0);
        assert_close(&format!("{dtype:?} dA"), &g.as_ref().unwrap().0, &gd.as_ref().unwrap().0, 0.0);
    }
}

// ---------- norm, rope ----------

#[test]
fn rms_norm_inference_equals_training() {
    for dtype in [DType::F32, DType::BF16] {
        let m = tiny(dtype, None);
        let n = &m.llama.layers[0].input_layernorm;
        let x = randn(10, &[2, 5, 64], dtype);
        let (want, _) = n.forward_train(&x.reshape((10, 64)).unwrap()).unwrap();
        assert_close(&format!("{dtype:?}"), &n.forward(&x).unwrap().reshape((10, 64)).unwrap(), &want, 0.0);
    }
}

#[test]
fn rope_tables_and_decode_row_equal_the_training_rotation() {
    let m = tiny(DType::F32, None);
    let rope = &m.llama.rope;
    let (b, t, pos, heads, d) = (2, 5, 7, 4, 16);
    // An inference span is the training gather at positions pos..pos+t.
    let positions = Tensor::from_vec((0..b * t).map(|i| (pos + i % t) as u32).collect::<Vec<_>>(), (b, t), &DEV).unwrap();
    let (span, gathered) = (rope.span(b, pos, t).unwrap(), rope.gather(&positions).unwrap());
    assert_close("cos", &span.cos, &gathered.cos, 0.0);
    assert_close("sin", &span.sin, &gathered.sin, 0.0);
    // Decoding's one-row rotation on slices against the rotation of a one-token step.
    let x = randn(11, &[1, heads * d], DType::F32);
    let at = rope.span(1, pos, 1).unwrap();
    let want = qscript::model::layers::rope::split_heads(&x, 1, 1, heads, d, at.pair()).unwrap();
    let mut row = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    rope.row_f32(pos).unwrap().rotate(&mut row, d);
    assert_close("decode row", &Tensor::from_vec(row, (1, heads, 1, d), &DEV).unwrap(), &want, F32_TOL);
}

// ---------- attention, mlp, block ----------

/// Training forward of layer 0's attention (or MLP, or the whole block) on the normed rows of
/// a `b × t` batch, and the inference forward of the same rows without a cache.
fn attention_pair(m: &Model, b: usize, t: usize, x: &Tensor) -> (Tensor, Tensor) {
    let l = &m.llama;
    let tb = batch(b, t);
    let (want, _) = l.layers[0].self_attn.forward_train(&x.reshape((b * t, ())).unwrap(), &tb, &l.rope.gather(&tb.positions).unwrap(), false, &mut rng()).unwrap();
    let step = Step::new(&l.rope, b, t, 0, &DEV).unwrap();
    let got = l.layers[0].self_attn.forward(x, &l.rope, &step, None).unwrap();
    (got.reshape((b * t, ())).unwrap(), want)
}

#[test]
fn attention_prefill_equals_the_training_forward() {
    for dtype in [DType::F32, DType::BF16] {
        let m = tiny(dtype, None);
        let x = randn(12, &[2, 9, 64], dtype);
        let (got, want) = attention_pair(&m, 2, 9, &x);
        assert_close(&format!("{dtype:?}"), &got, &want, 0.0);
    }
}

/// Each position decoded one at a time through the cache (CPU f32: the slice kernels on the
/// buffer; bf16: the attention op with the queries after the cached positions) against one
/// prefill of the whole sequence.
#[test]
fn attention_decode_steps_equal_the_prefill() {
    for dtype in [DType::F32, DType::BF16] {
        let m = tiny(dtype, None);
        let l = &m.llama;
        let attn = &l.layers[0].self_attn;
        let t = 12;
        let x = randn(13, &[1, t, 64], dtype);
        let full = attn.forward(&x, &l.rope, &Step::new(&l.rope, 1, t, 0, &DEV).unwrap(), None).unwrap();
        let mut slot = LayerKv::Empty;
        for p in 0..t {
            let step = Step::new(&l.rope, 1, 1, p, &DEV).unwrap();
            let got = attn.forward(&x.narrow(1, p, 1).unwrap(), &l.rope, &step, Some(&mut slot)).unwrap();
            assert_close(&format!("{dtype:?} position {p}"), &got, &full.narrow(1, p, 1).unwrap(), tol(dtype));
        }
    }
}

#[test]
fn mlp_inference_equals_training() {
    for (dtype, compute) in [(DType::F32, None), (DType::BF16, None), (DType::F32, Some(DType::F32)), (DType::F32, Some(DType::BF16))] {
        let m = tiny(dtype, compute);
        let mlp = &m.llama.layers[1].mlp;
        let x = randn(14, &[1, 6, 64], dtype);
        let (want, _) = mlp.forward_train(&x.squeeze(0).unwrap(), false, &mut rng()).unwrap();
        let got = mlp.forward(&x).unwrap().squeeze(0).unwrap();
        assert_close(&format!("{dtype:?}/{compute:?} batched"), &got, &want, 0.0);
        // One row: f32 through the GEMV (dense, and 4-bit computing in f32).
        let row = mlp.forward(&x.narrow(1, 2, 1).unwrap()).unwrap().squeeze(0).unwrap();
        assert_close(&format!("{dtype:?}/{compute:?} one row"), &row, &want.narrow(0, 2, 1).unwrap(), tol(dtype));
    }
}

#[test]
fn block_inference_equals_training() {
    for (dtype, compute) in [(DType::F32, None), (DType::BF16, None), (DType::F32, Some(DType::BF16))] {
        let m = tiny(dtype, compute);
        let l = &m.llama;
        let (b, t) = (2, 7);
        let tb = batch(b, t);
        let x = randn(15, &[b, t, 64], dtype);
        let (want, _) = l.layers[1].forward_train(&x.reshape((b * t, 64)).unwrap(), &tb, &l.rope.gather(&tb.positions).unwrap(), false, &mut rng()).unwrap();
        let got = l.layers[1].forward(&x, &l.rope, &Step::new(&l.rope, b, t, 0, &DEV).unwrap(), None).unwrap();
        assert_close(&format!("{dtype:?}/{compute:?}"), &got.reshape((b * t, 64)).unwrap(), &want, 0.0);
    }
}

// ---------- the whole model ----------

/// `Llama::forward` (no cache, and prefill + decode through the cache) against the training
/// forward's logits, for dense and 4-bit models.
#[test]
fn model_forward_equals_the_training_forward() {
    for (dtype, compute) in [(DType::F32, None), (DType::BF16, None), (DType::F32, Some(DType::F32)), (DType::F32, Some(DType::BF16))] {
        let (m, tol) = (tiny(dtype, compute), tol(dtype));
        let l = &m.llama;
        let (b, t) = (2, 10);
        let want = l.train_logits(&batch(b, t)).unwrap();
        let ids = Tensor::from_vec(ids(b, t), (b, t), &DEV).unwrap();
        let name = format!("{dtype:?}/{compute:?}");
        assert_close(&format!("{name} forward"), &l.forward(&ids, None, false).unwrap(), &want, 0.0);
        // Row 0 through the cache: a prefill of 6, then single steps.
        let row = ids.narrow(0, 0, 1).unwrap();
        let mut cache = l.new_cache();
        let got = l.forward(&row.narrow(1, 0, 6).unwrap(), Some(&mut cache), false).unwrap();
        assert_close(&format!("{name} prefill"), &got.squeeze(0).unwrap(), &want.get(0).unwrap().narrow(0, 0, 6).unwrap(), tol);
        for p in 6..t {
            let got = l.forward(&row.narrow(1, p, 1).unwrap(), Some(&mut cache), true).unwrap().squeeze(0).unwrap();
            assert_close(&format!("{name} decode {p}"), &got, &want.get(0).unwrap().narrow(0, p, 1).unwrap(), tol);
        }
        let argmax = |x: &Tensor| x.argmax(D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(argmax(&l.forward(&ids, None, false).unwrap()), argmax(&want), "{name}: greedy tokens");
    }
}
