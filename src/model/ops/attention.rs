//! Grouped-query causal attention with padding and packing masks. The `nh/kvh` query heads
//! that share a key/value head are folded into the time axis (`[b, kvh, rep·t, d]`), so K and V
//! are never copied per query head and their gradients sum over the group for free.

use anyhow::Result;
use crate::kernels::{attention_train, f32_view};
use candle_core::{Device, Tensor, D};

/// Additive mask `[b, 1, t, t]` from per-token segment ids `[b·t]`: token `i` attends to `j`
/// when `j ≤ i` and both belong to the same example (`segment` > 0). Padding (`segment` 0)
/// attends only to itself, so no row is empty (its loss is ignored anyway).
pub fn build_mask(segment_ids: &[u32], b: usize, t: usize, device: &Device) -> Result<Tensor> {
    anyhow::ensure!(segment_ids.len() == b * t, "segment ids: {} for a {b}×{t} batch", segment_ids.len());
    let mut m = vec![f32::NEG_INFINITY; b * t * t];
    for r in 0..b {
        let seg = &segment_ids[r * t..(r + 1) * t];
        for i in 0..t {
            let row = &mut m[(r * t + i) * t..(r * t + i + 1) * t];
            for j in 0..=i {
                if j == i || (seg[i] != 0 && seg[i] == seg[j]) {
                    row[j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, t), device)?)
}

pub struct Saved {
    /// Queries as given `[b, nh, t, d]` (unscaled), keys and values `[b, kvh, t, d]`.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Softmax probabilities `[b, nh, t, t]` (the same memory as `[b, kvh, rep·t, t]`).
    pub p: Tensor,
}

fn scale_of(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
}

/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`, `mask` `[b, 1, t, t]` → `o` `[b, nh, t, d]`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, Saved)> {
    let (b, nh, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let rep = nh / kvh;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let fused = match (f32_view(&q), f32_view(&k), f32_view(&v), f32_view(mask)) {
        (Some(qv), Some(kv), Some(vv), Some(mv)) => {
            let dims = attention_train::Dims { b, nh, kvh, t, d };
            Some(attention_train::forward(dims, qv.slice(), kv.slice(), vv.slice(), mv.slice(), scale_of(d) as f32))
        }
        _ => None,
    };
    if let Some((o, p)) = fused {
        let dev = q.device();
        let (o, p) = (Tensor::from_vec(o, (b, nh, t, d), dev)?, Tensor::from_vec(p, (b, nh, t, t), dev)?);
        return Ok((o, Saved { q, k, v, p }));
    }
    let pr = crate::profile::scope("·attn fwd QK matmul");
    let scores = q.reshape((b, kvh, rep * t, d))?.matmul(&k.t()?)?.reshape((b, nh, t, t))?;
    drop(pr);
    let pr = crate::profile::scope("·attn fwd softmax");
    let p = softmax_fwd(&scores, mask, scale_of(d))?;
    drop(pr);
    let _pr = crate::profile::scope("·attn fwd PV matmul");
    let o = p.reshape((b, kvh, rep * t, t))?.matmul(&v)?.reshape((b, nh, t, d))?;
    Ok((o, Saved { q, k, v, p }))
}

/// `softmax(scale · scores + mask)` over the last axis, scores `[b, nh, t, t]`, in the scores'
/// dtype with f32 statistics; one fused kernel on CUDA.
fn softmax_fwd(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() && matches!(scores.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        return crate::kernels::cuda_train::attn_softmax_fwd(&scores.contiguous()?, &mask.contiguous()?, scale as f32);
    }
    let sd = super::stat_dtype(scores.dtype());
    let x = (scores.to_dtype(sd)? * scale)?.broadcast_add(&mask.to_dtype(sd)?)?;
    Ok(candle_nn::ops::softmax_last_dim(&x)?.to_dtype(scores.dtype())?)
}

/// Softmax backward: `dS = P ⊙ (dP − Σ_j dP·P)`; one fused kernel on CUDA.
fn softmax_bwd(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() && matches!(p.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        return crate::kernels::cuda_train::attn_softmax_bwd(&p.contiguous()?, &dp.contiguous()?);
    }
    let dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    Ok((p * dp.broadcast_sub(&dot)?)?)
}

/// Returns `(dq, dk, dv)` in the shapes of the forward's inputs.
pub fn backward(s: &Saved, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, d) = s.q.dims4()?;
    let kvh = s.k.dim(1)?;
    let rep = nh / kvh;
    let scale = scale_of(d);
    let d_o = d_o.contiguous()?;
    if let (Some(qv), Some(kv), Some(vv), Some(pv), Some(dov)) = (f32_view(&s.q), f32_view(&s.k), f32_view(&s.v), f32_view(&s.p), f32_view(&d_o)) {
        let dims = attention_train::Dims { b, nh, kvh, t, d };
        let (dq, dk, dv) = attention_train::backward(dims, qv.slice(), kv.slice(), vv.slice(), pv.slice(), dov.slice(), scale as f32);
        let dev = d_o.device();
        return Ok((Tensor::from_vec(dq, s.q.shape(), dev)?, Tensor::from_vec(dk, s.k.shape(), dev)?, Tensor::from_vec(dv, s.v.shape(), dev)?));
    }
    let d_o = d_o.reshape((b, kvh, rep * t, d))?;
    let p = s.p.reshape((b, kvh, rep * t, t))?;
    let pr = crate::profile::scope("·attn bwd dV dP matmuls");
    let dv = p.t()?.matmul(&d_o)?; // [b, kvh, t, d]
    let dp = d_o.matmul(&s.v.t()?)?; // [b, kvh, rt, t]
    drop(pr);
    // Softmax backward: dS = P ⊙ (dP − Σ_j dP·P).
    let pr = crate::profile::scope("·attn bwd softmax");
    let ds = softmax_bwd(&p, &dp)?;
    drop(pr);
    let _pr = crate::profile::scope("·attn bwd dQ dK matmuls");
    let dq = (ds.matmul(&s.k)? * scale)?.reshape((b, nh, t, d))?;
    let dk = (ds.t()?.matmul(&s.q.reshape((b, kvh, rep * t, d))?)? * scale)?;
    Ok((dq, dk, dv))
}
