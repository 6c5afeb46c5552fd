//! Gradient checks of the training engine: every op against candle autograd on differentiable
//! reference formulas, and the whole 2-layer model with LoRA on all seven projections against
//! autograd and central finite differences — with and without checkpointing, packing, padding.

use candle_core::{DType, Device, Tensor, Var, D};
use qscript::model::engine::{self, StepOptions, TrainBatch};
use qscript::model::layers::{attention, embedding, linear, lm_head as cross_entropy, mlp::swiglu, norm as rms_norm, rope};
use qscript::model::names::{Proj, LLAMA};
use qscript::model::{LoadOptions, Model};
use rand::{rngs::StdRng, SeedableRng};
use std::path::Path;

mod common;
use common::autograd::{adapter_vars, assert_close, attention_ref, randn, reference_loss};

const DEV: Device = Device::Cpu;

// ---------- per-op checks against autograd ----------

#[test]
fn rms_norm_backward_matches_autograd() {
    let x = Var::from_tensor(&randn(1, &[6, 16], DType::F32)).unwrap();
    let w = randn(2, &[16], DType::F32);
    let r = randn(3, &[6, 16], DType::F32);
    let y_ref = candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5).unwrap();
    let grads = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (y, saved) = rms_norm::forward(x.as_tensor(), &w, 1e-5).unwrap();
    assert_close("rms_norm y", &y, &y_ref, 1e-6);
    assert_close("rms_norm dx", &rms_norm::backward(&saved, &w, &r).unwrap(), grads.get(x.as_tensor()).unwrap(), 1e-5);
}

fn rope_tables(t: usize, d: usize) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
    let f: Vec<f32> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
    let f = Tensor::from_vec(f, (t, d / 2), &DEV).unwrap();
    (f.cos().unwrap(), f.sin().unwrap())
}

#[test]
fn rope_backward_matches_autograd() {
    let (b, h, t, d) = (2, 3, 5, 8);
    let (cos, sin) = rope_tables(t, d);
    let x = Var::from_tensor(&randn(4, &[b, h, t, d], DType::F32)).unwrap();
    let r = randn(5, &[b, h, t, d], DType::F32);
    let y_ref = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin).unwrap();
    let grads = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let pos = Tensor::from_vec((0..b * t).map(|i| (i % t) as u32).collect::<Vec<_>>(), (b, t), &DEV).unwrap();
    let (c, s) = rope::gather(&cos, &sin, &pos).unwrap();
    assert_close("rope y", &rope::forward(x.as_tensor(), &c, &s).unwrap(), &y_ref, 1e-6);
    assert_close("rope dx", &rope::backward(&r, &c, &s).unwrap(), grads.get(x.as_tensor()).unwrap(), 1e-6);
}

#[test]
fn swiglu_backward_matches_autograd() {
    let g = Var::from_tensor(&randn(6, &[7, 12], DType::F32)).unwrap();
    let u = Var::from_tensor(&randn(7, &[7, 12], DType::F32)).unwrap();
    let r = randn(8, &[7, 12], DType::F32);
    // silu(g) = g / (1 + e^−g), from differentiable primitives.
    let silu = (g.as_tensor() / (g.as_tensor().neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
    let h_ref = (silu * u.as_tensor()).unwrap();
    let grads = (&h_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (h, saved) = swiglu::forward(g.as_tensor().clone(), u.as_tensor().clone()).unwrap();
    assert_close("swiglu h", &h, &h_ref, 1e-6);
    let (dg, du) = swiglu::backward(&saved, &r).unwrap();
    assert_close("swiglu dg", &dg, grads.get(g.as_tensor()).unwrap(), 1e-5);
    assert_close("swiglu du", &du, grads.get(u.as_tensor()).unwrap(), 1e-5);
}

#[test]
fn lora_linear_backward_matches_autograd_with_dropout() {
    let (n, i, o, rank) = (9, 16, 12, 4);
    let x = Var::from_tensor(&randn(9, &[n, i], DType::F32)).unwrap();
    let w = randn(10, &[o, i], DType::F32);
    let bias = randn(11, &[o], DType::F32);
    let a = Var::from_tensor(&randn(12, &[rank, i], DType::F32)).unwrap();
    let bm = Var::from_tensor(&randn(13, &[o, rank], DType::F32)).unwrap();
    let lora = linear::Lora { a: a.as_tensor().clone(), b: bm.as_tensor().clone(), scaling: 2.0, dropout: 0.3 };
    let r = randn(14, &[n, o], DType::F32);
    let mut rng = StdRng::seed_from_u64(0);
    let (y, saved) = linear::forward(x.as_tensor(), &w, Some(&bias), Some(&lora), true, &mut rng).unwrap();
    let mask = saved.scaled_mask(DType::F32).unwrap().expect("dropout mask in training");
    let zeros = mask.eq(0.0).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(zeros > 0.0 && zeros < (n * i) as f32, "dropout must drop some, not all");
    let xd = (x.as_tensor() * &mask).unwrap();
    let y_ref = (x.as_tensor().matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap()
        + (xd.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&bm.as_tensor().t().unwrap()).unwrap() * 2.0).unwrap())
    .unwrap();
    assert_close("linear y", &y, &y_ref, 1e-6);
    let grads = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (dx, g) = linear::backward(&saved, &w, Some(&lora), &r).unwrap();
    let (da, db) = g.unwrap();
    assert_close("linear dx", &dx, grads.get(x.as_tensor()).unwrap(), 1e-5);
    assert_close("linear dA", &da, grads.get(a.as_tensor()).unwrap(), 1e-5);
    assert_close("linear dB", &db, grads.get(bm.as_tensor()).unwrap(), 1e-5);
    // Frozen weight: no gradient is even computed for it (backward returns only dx, dA, dB).
}

#[test]
fn attention_backward_matches_autograd_with_gqa_packing_and_padding() {
    let (b, nh, kvh, t, d) = (2, 4, 2, 6, 8);
    // Row 0: two packed examples (3 + 2 tokens) and one pad; row 1: one example, 2 pads.
    let seg = [1, 1, 1, 2, 2, 0, 1, 1, 1, 1, 0, 0];
    let mask = attention::build_mask(&seg, b, t, &DEV).unwrap();
    let q = Var::from_tensor(&randn(20, &[b, nh, t, d], DType::F32)).unwrap();
    let k = Var::from_tensor(&randn(21, &[b, kvh, t, d], DType::F32)).unwrap();
    let v = Var::from_tensor(&randn(22, &[b, kvh, t, d], DType::F32)).unwrap();
    let r = randn(23, &[b, nh, t, d], DType::F32);
    let o_ref = attention_ref(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask);
    let grads = (&o_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (o, saved) = attention::forward(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask).unwrap();
    assert_close("attn o", &o, &o_ref, 1e-5);
    let (dq, dk, dv) = attention::backward(&saved, &r).unwrap();
    assert_close("attn dq", &dq, grads.get(q.as_tensor()).unwrap(), 1e-5);
    assert_close("attn dk", &dk, grads.get(k.as_tensor()).unwrap(), 1e-5);
    assert_close("attn dv", &dv, grads.get(v.as_tensor()).unwrap(), 1e-5);
    // The tiled path (f64 here: tiles of 4 query rows, probabilities recomputed in backward).
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (o2, s2) = attention::forward_tiled(&f64_(q.as_tensor()), &f64_(k.as_tensor()), &f64_(v.as_tensor()), &mask, 4).unwrap();
    assert!(s2.p.is_none(), "the tiled path keeps no probabilities");
    let (dq2, dk2, dv2) = attention::backward(&s2, &f64_(&r)).unwrap();
    for (name, got, want) in [("o", &o2, &o_ref), ("dq", &dq2, grads.get(q.as_tensor()).unwrap()), ("dk", &dk2, grads.get(k.as_tensor()).unwrap()), ("dv", &dv2, grads.get(v.as_tensor()).unwrap())] {
        assert_close(&format!("tiled attn {name}"), &got.to_dtype(DType::F32).unwrap(), want, 1e-5);
    }
    // No attention across packed examples: token 3 (example 2) ignores tokens 0..3.
    let p = saved.p.as_ref().expect("the CPU f32 path keeps P").to_dtype(DType::F32).unwrap();
    let row = p.get(0).unwrap().get(0).unwrap().get(3).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(&row[..3], &[0.0, 0.0, 0.0]);
}

#[test]
fn cross_entropy_matches_autograd_and_ignores_labels() {
    let (n, hdim, vocab) = (10, 8, 50);
    let h = Var::from_tensor(&randn(30, &[n, hdim], DType::F32)).unwrap();
    let head = randn(31, &[vocab, hdim], DType::F32);
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 3 == 0 { -100 } else { (i * 7) % vocab as i64 }).collect();
    let keep: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] >= 0).collect();
    let tg: Vec<u32> = keep.iter().map(|&i| targets[i as usize] as u32).collect();
    let logits = h.as_tensor().index_select(&Tensor::new(keep.as_slice(), &DEV).unwrap(), 0).unwrap().matmul(&head.t().unwrap()).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let picked = logp.gather(&Tensor::new(tg.as_slice(), &DEV).unwrap().unsqueeze(1).unwrap(), 1).unwrap();
    let loss_ref = (picked.sum_all().unwrap().neg().unwrap() / keep.len() as f64).unwrap();
    let grads = loss_ref.backward().unwrap();
    // Chunks of 3 rows: the result must not depend on chunking.
    let out = cross_entropy::forward_backward(h.as_tensor(), &head, &targets, Some(1.0 / keep.len() as f64), 3).unwrap();
    assert_eq!(out.n_tokens, keep.len());
    let loss = out.loss_sum / out.n_tokens as f64;
    assert!((loss - loss_ref.to_scalar::<f32>().unwrap() as f64).abs() < 1e-5, "{loss}");
    assert_close("ce dh", out.dh.as_ref().unwrap(), grads.get(h.as_tensor()).unwrap(), 1e-5);
    let dh_ignored = out.dh.unwrap().get(0).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(dh_ignored, 0.0, "ignored rows get no gradient");
}

#[test]
fn embedding_backward_matches_autograd() {
    let table = Var::from_tensor(&randn(40, &[11, 4], DType::F32)).unwrap();
    let ids = Tensor::new(&[3u32, 7, 3, 0], &DEV).unwrap();
    let r = randn(41, &[4, 4], DType::F32);
    let y = embedding::forward(table.as_tensor(), &ids).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close("embedding dtable", &embedding::backward(table.as_tensor(), &ids, &r).unwrap(), grads.get(table.as_tensor()).unwrap(), 1e-6);
}

// ---------- the whole model ----------

fn tiny_model(dtype: DType, rank: usize) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
    let mut m = Model::load_hf_dir("tiny", &dir, &LoadOptions { dtype, ..Default::default() }).unwrap();
    let mut seed = 100;
    for layer in m.llama.layers.iter_mut() {
        for &p in LLAMA.projs {
            let lin = layer.proj_mut(p);
            let (o, i) = lin.weight_shape().unwrap();
            seed += 2;
            lin.lora = Some(linear::Lora {
                a: (randn(seed, &[rank, i], dtype) * 0.2).unwrap(),
                b: (randn(seed + 1, &[o, rank], dtype) * 0.2).unwrap(),
                scaling: 2.0,
                dropout: 0.0,
            });
        }
    }
    m
}

struct Case {
    ids: Vec<u32>,
    labels: Vec<i64>,
    pos: Vec<u32>,
    seg: Vec<u32>,
    b: usize,
    t: usize,
}

/// Row 0: two packed examples (5 + 4 tokens) and a pad; row 1: one example of 7 and 3 pads.
/// Prompt tokens are −100 (not trained), as in SFT.
fn packed_padded_case() -> Case {
    let (b, t) = (2, 10);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 37 + 11) % 256).collect();
    let seg = vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0];
    let pos = vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0];
    let mut labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    for i in [0, 1, 5, 10, 11, 12, 9, 17, 18, 19] {
        labels[i] = -100;
    }
    Case { ids, labels, pos, seg, b, t }
}

fn simple_case() -> Case {
    let (b, t) = (2, 8);
    let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 53 + 7) % 256).collect();
    let labels = ids.iter().map(|&i| i as i64).collect();
    let pos = (0..b * t).map(|i| (i % t) as u32).collect();
    Case { ids, labels, pos, seg: vec![1; b * t], b, t }
}

fn check_model_grads(case: &Case, checkpointing: bool) {
    let m = tiny_model(DType::F32, 4);
    let vars = adapter_vars(&m);
    let loss_ref = reference_loss(&m, &vars, &case.ids, &case.labels, &case.pos, &case.seg, case.b, case.t);
    let grads_ref = loss_ref.backward().unwrap();
    let batch = TrainBatch::new(case.b, case.t, &case.ids, &case.labels, Some(&case.pos), Some(&case.seg), &DEV).unwrap();
    let opts = StepOptions { train: true, gradient_checkpointing: checkpointing, offload_checkpoints: false, grad_scale: None };
    let out = engine::forward_backward(&m.llama, &batch, &opts, &mut StdRng::seed_from_u64(0)).unwrap();
    let loss = out.mean_loss();
    let want = loss_ref.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - want).abs() / want < 1e-5, "loss {loss} vs {want}");
    assert_eq!(out.grads.len(), 14, "one gradient pair per adapter");
    for g in &out.grads {
        let k = g.layer * 7 + LLAMA.projs.iter().position(|&q| q == g.proj).unwrap();
        let (a, b) = &vars[k];
        assert_close(&format!("layer {} {:?} dA", g.layer, g.proj), &g.da, grads_ref.get(a.as_tensor()).unwrap(), 1e-5);
        assert_close(&format!("layer {} {:?} dB", g.layer, g.proj), &g.db, grads_ref.get(b.as_tensor()).unwrap(), 1e-5);
    }
}

#[test]
fn model_gradients_match_autograd() {
    check_model_grads(&simple_case(), false);
}

#[test]
fn model_gradients_match_autograd_with_checkpointing() {
    check_model_grads(&simple_case(), true);
}

#[test]
fn model_gradients_match_autograd_packed_and_padded() {
    check_model_grads(&packed_padded_case(), false);
    check_model_grads(&packed_padded_case(), true);
}

#[test]
fn model_gradients_match_finite_differences_f64() {
    let case = packed_padded_case();
    let mut m = tiny_model(DType::F64, 2);
    let batch = TrainBatch::new(case.b, case.t, &case.ids, &case.labels, Some(&case.pos), Some(&case.seg), &DEV).unwrap();
    let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
    let out = engine::forward_backward(&m.llama, &batch, &opts, &mut StdRng::seed_from_u64(0)).unwrap();
    let eps = 1e-5;
    let mut checked = 0;
    for (gi, (li, p, which, idx)) in [(0, Proj::Q, 'a', 3), (1, Proj::Down, 'b', 17), (0, Proj::V, 'b', 5), (1, Proj::Gate, 'a', 40), (1, Proj::K, 'a', 9)].into_iter().enumerate() {
        let g = out.grads.iter().find(|g| g.layer == li && g.proj == p).unwrap();
        let analytic = if which == 'a' { &g.da } else { &g.db }.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
        let mut loss_at = |delta: f64| {
            let lo = m.llama.layers[li].proj_mut(p).lora.as_mut().unwrap();
            let t = if which == 'a' { &mut lo.a } else { &mut lo.b };
            let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[idx] += delta;
            *t = Tensor::from_vec(v, t.dims(), &DEV).unwrap();
            let l = engine::loss(&m.llama, &batch).unwrap().mean_loss();
            let lo = m.llama.layers[li].proj_mut(p).lora.as_mut().unwrap();
            let t = if which == 'a' { &mut lo.a } else { &mut lo.b };
            let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[idx] -= delta;
            *t = Tensor::from_vec(v, t.dims(), &DEV).unwrap();
            l
        };
        let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        assert!(err < 1e-6, "case {gi}: analytic {analytic} vs numeric {numeric} (rel {err:e})");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn packed_row_loss_equals_examples_run_alone() {
    // The engine's packing is exact: a packed row's loss is the sum of its examples' losses.
    let m = tiny_model(DType::F32, 4);
    let c = packed_padded_case();
    let packed = TrainBatch::new(1, c.t, &c.ids[..c.t], &c.labels[..c.t], Some(&c.pos[..c.t]), Some(&c.seg[..c.t]), &DEV).unwrap();
    let lp = engine::loss(&m.llama, &packed).unwrap();
    let mut sum = 0.0;
    let mut n = 0;
    for (s, e) in [(0, 5), (5, 9)] {
        let alone = TrainBatch::new(1, e - s, &c.ids[s..e], &c.labels[s..e], None, None, &DEV).unwrap();
        let o = engine::loss(&m.llama, &alone).unwrap();
        sum += o.loss_sum;
        n += o.n_tokens;
    }
    assert_eq!(lp.n_tokens, n);
    assert!((lp.loss_sum - sum).abs() < 1e-4 * sum.abs(), "{} vs {sum}", lp.loss_sum);
}

#[test]
fn checkpointing_recomputes_the_same_dropout_masks() {
    let mut m = tiny_model(DType::F32, 4);
    for layer in m.llama.layers.iter_mut() {
        for &p in LLAMA.projs {
            layer.proj_mut(p).lora.as_mut().unwrap().dropout = 0.1;
        }
    }
    let c = packed_padded_case();
    let batch = TrainBatch::new(c.b, c.t, &c.ids, &c.labels, Some(&c.pos), Some(&c.seg), &DEV).unwrap();
    let run = |ckpt: bool, offload: bool| {
        let opts = StepOptions { train: true, gradient_checkpointing: ckpt, offload_checkpoints: offload, grad_scale: None };
        engine::forward_backward(&m.llama, &batch, &opts, &mut StdRng::seed_from_u64(7)).unwrap()
    };
    // Without checkpointing, with it, and with its inputs offloaded (nothing to offload on the
    // CPU: the parked tensors stay, and the path runs).
    let a = run(false, false);
    for b in [run(true, false), run(true, true)] {
        assert_eq!(a.loss_sum, b.loss_sum);
        assert_eq!(a.grads.len(), b.grads.len());
        for (ga, gb) in a.grads.iter().zip(&b.grads) {
            assert_eq!(ga.da.to_vec2::<f32>().unwrap(), gb.da.to_vec2::<f32>().unwrap(), "layer {} {:?}", ga.layer, ga.proj);
            assert_eq!(ga.db.to_vec2::<f32>().unwrap(), gb.db.to_vec2::<f32>().unwrap());
        }
    }
    // Dropout is on: a different seed changes the gradients.
    let opts = StepOptions { train: true, gradient_checkpointing: false, offload_checkpoints: false, grad_scale: None };
    let c2 = engine::forward_backward(&m.llama, &batch, &opts, &mut StdRng::seed_from_u64(8)).unwrap();
    assert_ne!(a.grads[0].da.to_vec2::<f32>().unwrap(), c2.grads[0].da.to_vec2::<f32>().unwrap());
}

#[test]
fn packed_row_logits_equal_each_example_alone() {
    // Issue 4's packing guarantee, through the data layer's batches: a packed row's logits, per
    // example, equal the logits of that example run alone.
    use qscript::data::{BatchIterator, BatchOptions, TokenizedDataset, TokenizedExample};
    let m = tiny_model(DType::F32, 4);
    let lens = [5usize, 3, 6, 2];
    let examples: Vec<TokenizedExample> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| TokenizedExample {
            index: k,
            input_ids: (0..n as u32).map(|i| (i * 31 + k as u32 * 57 + 3) % 256).collect(),
            trained: vec![true; n],
            truncated_from: None,
        })
        .collect();
    let data = std::sync::Arc::new(TokenizedDataset { examples: examples.clone(), pad_id: 0, max_seq_length: Some(8), report: Default::default() });
    let opts = BatchOptions { batch_size: 4, packing: true, max_seq_length: Some(8), shuffle: false, ..Default::default() };
    let batch = BatchIterator::new(data, opts).unwrap().next_batch();
    assert!(batch.examples.iter().any(|r| r.len() > 1), "some row must hold several examples: {:?}", batch.examples);
    let tb = TrainBatch::new(batch.batch, batch.seq, &batch.input_ids, &batch.labels, Some(&batch.position_ids), Some(&batch.segment_ids), &DEV).unwrap();
    let packed = engine::logits(&m.llama, &tb).unwrap();
    let mut checked = 0;
    for (r, row) in batch.examples.iter().enumerate() {
        let mut at = 0;
        for &k in row {
            let ex = &examples[k];
            let n = ex.len();
            let alone = TrainBatch::new(1, n, &ex.input_ids, &ex.labels(), None, None, &DEV).unwrap();
            let want = engine::logits(&m.llama, &alone).unwrap().squeeze(0).unwrap();
            let got = packed.get(r).unwrap().narrow(0, at, n).unwrap();
            assert_close(&format!("row {r} example {k}"), &got, &want, 1e-5);
            // And the inference forward (no packing) agrees with the training forward.
            let inf = Tensor::new(m.forward_ids(&ex.input_ids).unwrap(), &DEV).unwrap();
            assert_close("inference vs training forward", &inf, &want, 1e-5);
            at += n;
            checked += 1;
        }
    }
    assert_eq!(checked, lens.len());
}

#[test]
fn ids_and_positions_past_the_tables_are_one_line_errors() {
    // On a GPU these gathers would be device-side asserts that kill the process.
    let m = tiny_model(DType::F32, 4);
    let (vocab, max_pos) = (m.config().vocab_size as u32, m.config().max_position_embeddings as u32);
    let ids = [1u32, vocab, 2];
    let err = engine::loss(&m.llama, &TrainBatch::new(1, 3, &ids, &[1, 2, 3], None, None, &DEV).unwrap()).err().unwrap().to_string();
    assert!(err.contains(&format!("token id {vocab}")) && err.contains("vocabulary"), "{err}");
    let pos = [0u32, 1, max_pos];
    let err = engine::loss(&m.llama, &TrainBatch::new(1, 3, &[1, 2, 3], &[1, 2, 3], Some(&pos), None, &DEV).unwrap()).err().unwrap().to_string();
    assert!(err.contains(&format!("position {max_pos}")) && err.contains("max_position_embeddings"), "{err}");
    let pos = [0u32, 1, max_pos - 1];
    assert!(engine::loss(&m.llama, &TrainBatch::new(1, 3, &[1, 2, 3], &[1, 2, 3], Some(&pos), None, &DEV).unwrap()).is_ok());
}

#[test]
fn norm_backward_plus_adds_the_residual() {
    use qscript::model::layers::norm::RmsNorm;
    let (rows, h) = (3, 16);
    let x = randn(201, &[rows, h], DType::F32);
    let n = RmsNorm { weight: (randn(202, &[h], DType::F32) + 1.0).unwrap(), eps: 1e-6, plus_one: false };
    let (_, s) = n.forward_train(&x).unwrap();
    let (dy, res) = (randn(203, &[rows, h], DType::F32), randn(204, &[rows, h], DType::F32));
    let want: Vec<f32> = (&res + n.backward(&s, &dy).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = n.backward_plus(&s, &dy, &res).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(got.iter().zip(&n.backward(&s, &dy).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).any(|(a, b)| a != b));
}
