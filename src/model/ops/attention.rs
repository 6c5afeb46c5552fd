//! Grouped-query causal attention with padding and packing masks. The `nh/kvh` query heads
//! that share a key/value head are folded into the time axis (`[b, kvh, rep·t, d]`), so K and V
//! are never copied per query head and their gradients sum over the group for free.

use anyhow::Result;
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
    /// Folded, scaled queries `[b, kvh, rep·t, d]`.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Softmax probabilities `[b, kvh, rep·t, t]`.
    pub p: Tensor,
    pub n_heads: usize,
}

/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`, `mask` `[b, 1, t, t]` → `o` `[b, nh, t, d]`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, Saved)> {
    let (b, nh, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let rep = nh / kvh;
    let q = (q.reshape((b, kvh, rep * t, d))? * (1.0 / (d as f64).sqrt()))?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let scores = q.matmul(&k.t()?)?;
    let scores = scores
        .reshape((b, kvh, rep, t, t))?
        .broadcast_add(&mask.to_dtype(scores.dtype())?.unsqueeze(1)?)?
        .reshape((b, kvh, rep * t, t))?;
    let p = candle_nn::ops::softmax_last_dim(&scores.to_dtype(super::stat_dtype(v.dtype()))?)?.to_dtype(v.dtype())?;
    let o = p.matmul(&v)?.reshape((b, nh, t, d))?;
    Ok((o, Saved { q, k, v, p, n_heads: nh }))
}

/// Returns `(dq, dk, dv)` in the shapes of the forward's inputs.
pub fn backward(s: &Saved, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, kvh, rt, d) = s.q.dims4()?;
    let t = s.k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let d_o = d_o.reshape((b, kvh, rt, d))?;
    let dv = s.p.t()?.matmul(&d_o)?; // [b, kvh, t, d]
    let dp = d_o.matmul(&s.v.t()?)?; // [b, kvh, rt, t]
    // Softmax backward: dS = P ⊙ (dP − Σ_j dP·P).
    let dot = (&dp * &s.p)?.sum_keepdim(D::Minus1)?;
    let ds = (&s.p * dp.broadcast_sub(&dot)?)?;
    let dq = (ds.matmul(&s.k)? * scale)?.reshape((b, s.n_heads, t, d))?;
    let dk = ds.t()?.matmul(&s.q)?; // q is already scaled
    Ok((dq, dk, dv))
}
