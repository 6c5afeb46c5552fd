//! The CPU kernels of the model families' features against candle's reference path (the same
//! dispatch in f64, where the kernels decline): attention with soft-capping, a caller's scale
//! and a sliding window (the fused f32 kernel), GeGLU (tanh GELU), final-logit soft-capping in
//! the fused LM-head cross-entropy, and Gemma's (1 + w) RMSNorm. Each test also checks that the
//! feature changes the result, so that a kernel ignoring it would fail.

mod common;
use common::values;

use candle_core::{DType, Device, Tensor};
use qscript::kernels::attention::AttnParams;
use qscript::kernels::glu::{self, Activation};
use qscript::model::layers::{attention, lm_head, norm};

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |got − want| / max |want|.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (host(got), host(want));
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    g.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn tensor(v: &[f32], shape: &[usize], dt: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

/// The fused CPU attention (f32) against candle's tiles (f64, tiles of 16 rows): output and the
/// three gradients, grouped-query, two packed examples and padding, for Llama's scores and for
/// Gemma 2's (a query_pre_attn_scalar scale, soft-capping, a sliding window of 7 < t).
#[test]
fn fused_attention_with_family_params_matches_candle() {
    let (b, nh, kvh, t, d) = (2, 4, 2, 37, 16);
    let seg: Vec<u32> = (0..b * t).map(|i| (i / t, i % t)).map(|(r, i)| if r == 0 { if i < 15 { 1 } else if i < t - 4 { 2 } else { 0 } } else { 1 }).collect();
    let (q, k, v, d_o) = (values(b * nh * t * d, 1), values(b * kvh * t * d, 2), values(b * kvh * t * d, 3), values(b * nh * t * d, 4));
    // Values of ±4 so that a cap of 5 bends the logits.
    let q: Vec<f32> = q.iter().map(|x| x * 4.0).collect();
    let gemma = AttnParams { scale: 0.125, softcap: Some(5.0), window: Some(7) };
    let mut outs = Vec::new();
    for p in [AttnParams::plain(d), gemma, AttnParams { window: None, ..gemma }, AttnParams { softcap: None, ..gemma }] {
        let run = |dt: DType| {
            let mask = attention::build_window_mask(&seg, b, t, p.window, &Device::Cpu).unwrap();
            let (o, s) = attention::forward_with(&tensor(&q, &[b, nh, t, d], dt), &tensor(&k, &[b, kvh, t, d], dt), &tensor(&v, &[b, kvh, t, d], dt), &mask, &p, 16).unwrap();
            assert_eq!(s.p.is_some(), dt == DType::F32, "the fused kernel runs exactly in f32");
            let (dq, dk, dv) = attention::backward(&s, &tensor(&d_o, &[b, nh, t, d], dt)).unwrap();
            [o, dq, dk, dv]
        };
        let (got, want) = (run(DType::F32), run(DType::F64));
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let e = rel_err(g, w);
            assert!(e <= 2e-6, "{p:?}: {name} off by {e:e} of its max");
        }
        outs.push(got[0].clone());
    }
    // Each feature changes the output.
    for (i, what) in [(2, "the window"), (3, "the soft-cap")] {
        assert!(rel_err(&outs[1], &outs[i]) > 1e-3, "{what} changed nothing");
    }
}

/// GeGLU (tanh GELU) forward and backward: the CPU kernel (f32, several parallel tasks and a
/// vector tail) against candle's ops in f64, and unlike SwiGLU.
#[test]
fn geglu_kernel_matches_candle() {
    let (rows, cols) = (70, 1031);
    let g: Vec<f32> = values(rows * cols, 5).iter().map(|x| x * 6.0).collect();
    let (u, dh) = (values(rows * cols, 6), values(rows * cols, 7));
    let run = |dt: DType, act: Activation| {
        let (g, u, dh) = (tensor(&g, &[rows, cols], dt), tensor(&u, &[rows, cols], dt), tensor(&dh, &[rows, cols], dt));
        let h = glu::forward(&g, &u, act).unwrap();
        let (dg, du) = glu::backward(&g, &u, &dh, act).unwrap();
        [h, dg, du]
    };
    let (got, want) = (run(DType::F32, Activation::GeluTanh), run(DType::F64, Activation::GeluTanh));
    for (name, (g, w)) in ["h", "dg", "du"].iter().zip(got.iter().zip(&want)) {
        let e = rel_err(g, w);
        assert!(e <= 1e-6, "GeGLU {name} off by {e:e} of its max");
    }
    assert!(rel_err(&run(DType::F32, Activation::Silu)[0], &want[0]) > 1e-2, "GeGLU and SwiGLU agree");
}

/// The fused LM head + cross-entropy (f32) with Gemma 2's final-logit cap against candle's
/// chunks in f64: loss and `dh`, untrained rows, several chunks; and the cap matters.
#[test]
fn capped_cross_entropy_kernel_matches_candle() {
    let (n, hidden, vocab) = (50, 32, 700);
    let h: Vec<f32> = values(n * hidden, 8).iter().map(|x| x * 3.0).collect();
    let head = values(vocab * hidden, 9);
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -100 } else { (i * 7919) % vocab as i64 }).collect();
    let run = |dt: DType, cap: Option<f64>| lm_head::forward_backward_capped(&tensor(&h, &[n, hidden], dt), &tensor(&head, &[vocab, hidden], dt), &targets, Some(0.02), 16, cap).unwrap();
    let (got, want) = (run(DType::F32, Some(4.0)), run(DType::F64, Some(4.0)));
    assert_eq!(got.n_tokens, want.n_tokens);
    assert!((got.loss_sum - want.loss_sum).abs() <= 1e-6 * want.loss_sum.abs(), "loss {} vs {}", got.loss_sum, want.loss_sum);
    let e = rel_err(got.dh.as_ref().unwrap(), want.dh.as_ref().unwrap());
    assert!(e <= 1e-5, "dh off by {e:e} of its max");
    let plain = run(DType::F32, None);
    assert!((plain.loss_sum - got.loss_sum).abs() > 1e-2 * got.loss_sum.abs(), "the cap changed nothing");
}

/// Gemma's (1 + w) RMSNorm on the CPU kernels (f32) against candle in f64, forward and backward.
#[test]
fn plus_one_norm_matches_candle() {
    let (rows, hdim) = (9, 300);
    let (x, w, dy) = (values(rows * hdim, 10), values(hdim, 11), values(rows * hdim, 12));
    let run = |dt: DType, plus_one: bool| {
        let wt = tensor(&w, &[hdim], dt);
        let (y, s) = norm::forward_with(&tensor(&x, &[rows, hdim], dt), &wt, 1e-6, plus_one).unwrap();
        [y.clone(), norm::backward(&s, &wt, &tensor(&dy, &[rows, hdim], dt)).unwrap()]
    };
    let (got, want) = (run(DType::F32, true), run(DType::F64, true));
    for (name, (g, w)) in ["y", "dx"].iter().zip(got.iter().zip(&want)) {
        let e = rel_err(g, w);
        assert!(e <= 1e-6, "(1+w) norm {name} off by {e:e} of its max");
    }
    assert!(rel_err(&run(DType::F32, false)[0], &want[0]) > 1e-2, "plus_one changed nothing");
}
