//! Autograd references for the engine's gradient tests: seeded normal tensors, error
//! measures, and the whole model written with differentiable candle ops.

use candle_core::{DType, Device, Tensor, Var, D};
use qscript::model::engine::TrainBatch;
use qscript::model::layers::{attention, rope};
use qscript::model::names::{Proj, LLAMA};
use qscript::model::Model;
use rand::{rngs::StdRng, SeedableRng};

const DEV: Device = Device::Cpu;

pub fn randn(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    // Deterministic pseudo-normal values without touching candle's global RNG.
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (a, b): (f64, f64) = (rand::Rng::random(&mut rng), rand::Rng::random(&mut rng));
            (-2.0 * (a.max(1e-12)).ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap().to_dtype(dtype).unwrap()
}

/// max |a − b| / max(|b|) over all elements.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    diff / scale.max(1e-30)
}

pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let e = rel_err(got, want);
    assert!(e <= tol, "{name}: relative error {e:e} > {tol:e}");
}

/// Differentiable reference attention: K/V repeated per query head, explicit mask, ops::softmax.
pub fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let (b, nh, t, d) = q.dims4().unwrap();
    let kvh = k.dim(1).unwrap();
    let rep = nh / kvh;
    let expand = |x: &Tensor| x.unsqueeze(2).unwrap().broadcast_as((b, kvh, rep, t, d)).unwrap().reshape((b, nh, t, d)).unwrap();
    let (k, v) = (expand(k), expand(v));
    let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap().broadcast_add(mask).unwrap();
    candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(&v).unwrap()
}

/// The whole model with differentiable candle ops; LoRA matrices as Vars.
/// Every adapter's A and B as autograd Vars, layer-major in `LLAMA.projs` order (the order
/// `reference_loss` expects).
pub fn adapter_vars(m: &Model) -> Vec<(Var, Var)> {
    m.llama
        .layers
        .iter()
        .flat_map(|layer| LLAMA.projs.iter().map(move |&p| {
            let lo = layer.proj(p).lora.as_ref().unwrap();
            (Var::from_tensor(&lo.a).unwrap(), Var::from_tensor(&lo.b).unwrap())
        }))
        .collect()
}

pub fn reference_loss(m: &Model, vars: &[(Var, Var)], ids: &[u32], labels: &[i64], pos: &[u32], seg: &[u32], b: usize, t: usize) -> Tensor {
    let l = &m.llama;
    let c = &l.config;
    let (nh, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let dt = l.embed_tokens.dtype();
    let mask = attention::build_mask(seg, b, t, &DEV).unwrap().to_dtype(dt).unwrap();
    let posv = Tensor::from_vec(pos.to_vec(), (b, t), &DEV).unwrap();
    let (cos, sin) = rope::gather(&l.rope.cos, &l.rope.sin, &posv).unwrap();
    let cos2 = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
    let sin2 = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
    let rot = |x: &Tensor| {
        let h = x.dim(D::Minus1).unwrap() / 2;
        let x1 = x.narrow(D::Minus1, 0, h).unwrap();
        let x2 = x.narrow(D::Minus1, h, h).unwrap();
        let rh = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&cos2).unwrap() + rh.broadcast_mul(&sin2).unwrap()).unwrap()
    };
    let lin = |li: usize, p: Proj, x: &Tensor| {
        let k = li * 7 + LLAMA.projs.iter().position(|&q| q == p).unwrap();
        let lw = l.layers[li].proj(p);
        let (a, bb) = &vars[k];
        let s = lw.lora.as_ref().unwrap().scaling;
        (x.matmul(&lw.dense_weight().unwrap().t().unwrap()).unwrap() + (x.matmul(&a.as_tensor().t().unwrap()).unwrap().matmul(&bb.as_tensor().t().unwrap()).unwrap() * s).unwrap()).unwrap()
    };
    let heads = |x: Tensor, n: usize| x.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let mut x = l.embed_tokens.index_select(&Tensor::new(ids, &DEV).unwrap(), 0).unwrap();
    for (li, layer) in l.layers.iter().enumerate() {
        let h1 = candle_nn::ops::rms_norm_slow(&x, &layer.input_layernorm.weight, c.rms_norm_eps as f32).unwrap();
        let q = rot(&heads(lin(li, Proj::Q, &h1), nh));
        let k = rot(&heads(lin(li, Proj::K, &h1), kvh));
        let v = heads(lin(li, Proj::V, &h1), kvh);
        let o = attention_ref(&q, &k, &v, &mask).transpose(1, 2).unwrap().reshape((b * t, nh * d)).unwrap();
        let x2 = (&x + lin(li, Proj::O, &o)).unwrap();
        let h2 = candle_nn::ops::rms_norm_slow(&x2, &layer.post_attention_layernorm.weight, c.rms_norm_eps as f32).unwrap();
        let g = lin(li, Proj::Gate, &h2);
        let silu = (&g / (g.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
        let hm = (silu * lin(li, Proj::Up, &h2)).unwrap();
        x = (x2 + lin(li, Proj::Down, &hm)).unwrap();
    }
    let hn = candle_nn::ops::rms_norm_slow(&x, &l.norm.weight, c.rms_norm_eps as f32).unwrap();
    let head = l.lm_head.as_ref().map(|h| h.dense_weight().unwrap()).unwrap_or_else(|| l.embed_tokens.clone());
    let batch = TrainBatch::new(b, t, ids, labels, Some(pos), Some(seg), &DEV).unwrap();
    let keep: Vec<u32> = (0..(b * t) as u32).filter(|&i| batch.targets[i as usize] >= 0).collect();
    let tg: Vec<u32> = keep.iter().map(|&i| batch.targets[i as usize] as u32).collect();
    let logits = hn.index_select(&Tensor::new(keep.as_slice(), &DEV).unwrap(), 0).unwrap().matmul(&head.t().unwrap()).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let picked = logp.gather(&Tensor::new(tg.as_slice(), &DEV).unwrap().unsqueeze(1).unwrap(), 1).unwrap();
    (picked.sum_all().unwrap().neg().unwrap() / keep.len() as f64).unwrap()
}

