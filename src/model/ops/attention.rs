//! Grouped-query causal attention with padding and packing masks. The `nh/kvh` query heads
//! that share a key/value head are folded into the time axis (`[b, kvh, rep·t, d]`), so K and V
//! are never copied per query head and their gradients sum over the group for free.
//!
//! The CPU f32 path keeps the probabilities for backward (its fused kernel, memory is cheap
//! there). Elsewhere (CUDA, and the f64 gradient checks) attention runs in query tiles of
//! [`TILE`] rows against only the keys the tile can see (causal), and backward recomputes each
//! tile's probabilities instead of keeping `[b, nh, t, t]` per layer — flash attention's
//! memory at tile granularity, the products in cuBLAS.

use anyhow::Result;
use candle_core::{Device, Tensor};

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
    /// The additive mask `[b, 1, t, t]`.
    pub mask: Tensor,
    /// Softmax probabilities `[b, nh, t, t]`: kept by the CPU f32 path only (the tiled path
    /// recomputes them).
    pub p: Option<Tensor>,
    /// Query rows per tile.
    pub tile: usize,
    /// What the flash kernels' backward needs (CUDA, bf16), which then took the forward.
    pub flash: Option<Flash>,
}

/// The flash forward's output, its log-sum-exp `[b, nh, t]` and the segment ids `[b, t]`.
pub struct Flash {
    pub o: Tensor,
    pub lse: Tensor,
    pub segments: Tensor,
}

/// Query rows per tile of the tiled path: `[b, nh, TILE, t]` scores exist at once.
pub const TILE: usize = 256;

fn scale_of(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
}

/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`, `mask` `[b, 1, t, t]` → `o` `[b, nh, t, d]`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, Saved)> {
    forward_tiled(q, k, v, mask, TILE)
}

/// [`forward`] given also the segment ids `[b, t]` (u32) the mask was built from: on CUDA in
/// bf16 with head size 64 or 128 the flash kernels run, from those instead of the mask.
pub fn forward_segments(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, segments: &Tensor) -> Result<(Tensor, Saved)> {
    if let Some((o, lse)) = crate::kernels::attention::flash_forward(q, k, v, segments)? {
        let flash = Some(Flash { o: o.clone(), lse, segments: segments.clone() });
        return Ok((o, Saved { q: q.clone(), k: k.clone(), v: v.clone(), mask: mask.clone(), p: None, tile: TILE, flash }));
    }
    forward(q, k, v, mask)
}

/// [`forward`] with query tiles of `tile` rows (tests use small ones).
pub fn forward_tiled(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, tile: usize) -> Result<(Tensor, Saved)> {
    let (b, nh, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let rep = nh / kvh;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if let Some((o, p)) = crate::kernels::attention::fused_forward(&q, &k, &v, mask, scale_of(d) as f32)? {
        return Ok((o, Saved { q, k, v, mask: mask.clone(), p: Some(p), tile, flash: None }));
    }
    let s = Saved { q, k, v, mask: mask.clone(), p: None, tile, flash: None };
    let mut outs = Vec::new();
    for (q0, c) in tiles(t, tile) {
        let tile = Tile::new(&s, q0, c)?;
        let _pr = crate::profile::scope("·attn fwd PV matmul");
        outs.push(tile.p.reshape((b, kvh, rep * c, q0 + c))?.matmul(&tile.v)?.reshape((b, nh, c, d))?);
    }
    let o = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 2)? };
    Ok((o, s))
}

/// `(first query, rows)` of each tile.
fn tiles(t: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(tile.max(1)).map(move |q0| (q0, tile.min(t - q0)))
}

/// One query tile's operands and probabilities: queries `q0..q0+c` against keys `0..q0+c` (the
/// causal mask hides every later key from the whole tile).
struct Tile {
    /// `[b, kvh, rep·c, d]`
    q: Tensor,
    /// `[b, kvh, q0+c, d]`
    k: Tensor,
    v: Tensor,
    /// `[b, nh, c, q0+c]`
    p: Tensor,
}

impl Tile {
    fn new(s: &Saved, q0: usize, c: usize) -> Result<Self> {
        let (b, nh, t, d) = s.q.dims4()?;
        let kvh = s.k.dim(1)?;
        let end = q0 + c;
        let whole = c == t;
        let q = if whole { s.q.clone() } else { s.q.narrow(2, q0, c)?.contiguous()? }.reshape((b, kvh, nh / kvh * c, d))?;
        let (k, v) = if whole { (s.k.clone(), s.v.clone()) } else { (s.k.narrow(2, 0, end)?.contiguous()?, s.v.narrow(2, 0, end)?.contiguous()?) };
        let mask = if whole { s.mask.clone() } else { s.mask.narrow(2, q0, c)?.narrow(3, 0, end)?.contiguous()? };
        let pr = crate::profile::scope("·attn QK matmul");
        let scores = q.matmul(&k.t()?)?.reshape((b, nh, c, end))?;
        drop(pr);
        let _pr = crate::profile::scope("·attn softmax");
        let p = crate::kernels::attention::masked_softmax(&scores, &mask, scale_of(d))?;
        Ok(Self { q, k, v, p })
    }
}

/// Returns `(dq, dk, dv)` in the shapes of the forward's inputs.
pub fn backward(s: &Saved, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(f) = &s.flash {
        return crate::kernels::attention::flash_backward(&s.q, &s.k, &s.v, &f.segments, &f.o, &f.lse, &d_o.to_dtype(s.q.dtype())?);
    }
    let (b, nh, t, d) = s.q.dims4()?;
    let kvh = s.k.dim(1)?;
    let rep = nh / kvh;
    let scale = scale_of(d);
    let d_o = d_o.contiguous()?;
    if let Some(grads) = crate::kernels::attention::fused_backward(&s.q, &s.k, &s.v, s.p.as_ref(), &d_o, scale as f32)? {
        return Ok(grads);
    }
    // Per tile: dV += Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − Σ_j dP·P), dQ = s·dS K, dK += s·dSᵀ Q.
    // dK and dV add up over tiles in f32 (each tile covers a prefix of the keys).
    let acc = super::stat_dtype(s.q.dtype());
    let (mut dk, mut dv) = (Tensor::zeros(s.k.shape(), acc, d_o.device())?, Tensor::zeros(s.v.shape(), acc, d_o.device())?);
    let mut dqs = Vec::new();
    for (q0, c) in tiles(t, s.tile) {
        let end = q0 + c;
        let tile = Tile::new(s, q0, c)?;
        let do_c = if c == t { d_o.clone() } else { d_o.narrow(2, q0, c)?.contiguous()? }.reshape((b, kvh, rep * c, d))?;
        let p = tile.p.reshape((b, kvh, rep * c, end))?;
        let pr = crate::profile::scope("·attn bwd dV dP matmuls");
        let dv_c = p.t()?.matmul(&do_c)?; // [b, kvh, end, d]
        let dp = do_c.matmul(&tile.v.t()?)?; // [b, kvh, rep·c, end]
        drop(pr);
        let pr = crate::profile::scope("·attn bwd softmax");
        let ds = crate::kernels::attention::softmax_backward(&p, &dp)?;
        drop(pr);
        let _pr = crate::profile::scope("·attn bwd dQ dK matmuls");
        dqs.push((ds.matmul(&tile.k)? * scale)?.reshape((b, nh, c, d))?);
        let dk_c = (ds.t()?.matmul(&tile.q)? * scale)?;
        let pad = |x: Tensor| -> Result<Tensor> { Ok(x.to_dtype(acc)?.pad_with_zeros(2, 0, t - end)?) };
        dk = (dk + pad(dk_c)?)?;
        dv = (dv + pad(dv_c)?)?;
    }
    let dq = if dqs.len() == 1 { dqs.remove(0) } else { Tensor::cat(&dqs, 2)? };
    Ok((dq, dk.to_dtype(s.k.dtype())?, dv.to_dtype(s.v.dtype())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Tiles of 3 rows against one tile of the whole sequence (f64, so both run the tiled
    /// path): outputs and all three gradients equal to rounding, with GQA, packing and padding.
    #[test]
    fn query_tiles_give_the_untiled_result() {
        let (b, nh, kvh, t, d) = (2, 4, 2, 11, 8);
        let dev = Device::Cpu;
        let rnd = |n: usize, seed: u64| -> Tensor {
            let v: Vec<f64> = (0..n as u64).map(|i| ((i * 2654435761 + seed * 97) % 1000) as f64 / 500.0 - 1.0).collect();
            Tensor::from_vec(v, n, &dev).unwrap()
        };
        let q = rnd(b * nh * t * d, 1).reshape((b, nh, t, d)).unwrap();
        let k = rnd(b * kvh * t * d, 2).reshape((b, kvh, t, d)).unwrap();
        let v = rnd(b * kvh * t * d, 3).reshape((b, kvh, t, d)).unwrap();
        let d_o = rnd(b * nh * t * d, 4).reshape((b, nh, t, d)).unwrap();
        let seg = [[1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]].concat();
        let mask = build_mask(&seg, b, t, &dev).unwrap();
        let run = |tile| {
            let (o, s) = forward_tiled(&q, &k, &v, &mask, tile).unwrap();
            let (dq, dk, dv) = backward(&s, &d_o).unwrap();
            [o, dq, dk, dv]
        };
        let (tiled, whole) = (run(3), run(t));
        for (name, (a, w)) in ["o", "dq", "dk", "dv"].iter().zip(tiled.iter().zip(&whole)) {
            assert_eq!(a.dtype(), DType::F64);
            let diff = (a - w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(diff < 1e-12, "{name}: tiled differs by {diff}");
        }
    }
}
