//! Grouped-query causal attention: the sub-layer (q/k/v projections, RoPE, attention, output
//! projection) for inference — prefill and decoding against the KV cache
//! (`layers/kv_cache.rs`) — and for training, forward and backward; the masks; and the
//! attention op on heads that both run.
//!
//! The op: the `nh/kvh` query heads that share a key/value head are folded into the time axis
//! (`[b, kvh, rep·t, d]`), so K and V are never copied per query head and their gradients sum
//! over the group for free. The CPU f32 path keeps the probabilities for backward (its fused
//! kernel, memory is cheap there). Elsewhere (CUDA, and the f64 gradient checks) attention runs
//! in query tiles of [`TILE`] rows against only the keys the tile can see (causal), and
//! backward recomputes each tile's probabilities instead of keeping `[b, nh, t, t]` per layer —
//! flash attention's memory at tile granularity, the products in cuBLAS. On CUDA in bf16 the
//! flash kernels take the whole op. Inference runs the same op (queries after cached positions
//! see them through the mask); only decoding one token on the CPU in f32 takes its own path,
//! on slices of the cache buffer.

use super::kv_cache::{f32_vec, KvBuf, LayerKv};
use super::linear::{self, Linear};
use super::rope::{merge_heads, split_heads, Rope, RopeAt};
use crate::model::engine::TrainBatch;
use crate::model::names::Proj;
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::Rng;

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// What every layer's attention shares in one inference call: the first new position, RoPE at
/// the new positions, the causal mask `[b, 1, t, s]` over cached + new positions, and (nothing
/// cached before) the segment ids `[b, t]` the flash kernels take.
pub struct Step {
    pub pos: usize,
    pub rope: RopeAt,
    pub mask: Tensor,
    pub segments: Option<Tensor>,
}

impl Step {
    /// `b` rows of `t` new tokens after `pos` cached positions.
    pub fn new(rope: &Rope, b: usize, t: usize, pos: usize, device: &Device) -> Result<Self> {
        let segments = if pos == 0 { Some(Tensor::ones((b, t), DType::U32, device)?) } else { None };
        Ok(Self { pos, rope: rope.span(b, pos, t)?, mask: causal_mask(b, t, pos + t, device)?, segments })
    }
}

/// What the sub-layer's training backward needs.
pub struct Acts {
    pub q: linear::Saved,
    pub k: linear::Saved,
    pub v: linear::Saved,
    pub core: Saved,
    pub o: linear::Saved,
}

impl Attention {
    /// Inference: `x` `[b, t, hidden]` (normed) holds new tokens at positions `step.pos..`,
    /// which attend causally to the cache and themselves; the cache grows by `t`.
    pub fn forward(&self, x: &Tensor, rope: &Rope, step: &Step, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let Some(slot) = cache else {
            let (q, k, v) = self.qkv(x, step)?;
            return self.attend(&q, &k, &v, step);
        };
        // Generation on the CPU in f32: the cache is a preallocated buffer.
        if b == 1 && x.device().is_cpu() && x.dtype() == DType::F32 && matches!(slot, LayerKv::Empty) {
            *slot = LayerKv::Buf(KvBuf::new(self.n_kv_heads, self.head_dim));
        }
        if let (LayerKv::Buf(buf), 1) = (&mut *slot, t) {
            if let Some(y) = self.decode_step(x, rope, step.pos, buf)? {
                return Ok(y);
            }
        }
        let (q, k, v) = self.qkv(x, step)?;
        let (k, v) = slot.extend(k, v)?;
        self.attend(&q, &k, &v, step)
    }

    /// Rotated queries `[b, nh, t, d]`, rotated keys and values `[b, kvh, t, d]`.
    fn qkv(&self, x: &Tensor, step: &Step) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?, self.v_proj.forward(x)?);
        self.heads(&q, &k, &v, b, t, &step.rope)
    }

    /// The projections' rows → heads, queries and keys rotated.
    fn heads(&self, q: &Tensor, k: &Tensor, v: &Tensor, b: usize, t: usize, rope: &RopeAt) -> Result<(Tensor, Tensor, Tensor)> {
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        Ok((split_heads(q, b, t, h, d, rope.pair())?, split_heads(k, b, t, kvh, d, rope.pair())?, split_heads(v, b, t, kvh, d, None)?))
    }

    /// Queries `[b, nh, t, d]` against all `s` keys/values `[b, kvh, s, d]` (the queries being
    /// the last `t` positions), then the output projection.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, step: &Step) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let (o, _) = op(q, k, v, &step.mask, step.segments.as_ref())?;
        self.o_proj.forward(&merge_heads(&o, None)?.reshape((b, t, ()))?)
    }

    /// One new position (decoding) against a buffered cache, on plain slices: rope on the q/k
    /// rows, append k/v in place, fused scores/softmax/weighted sum per head. `None` when the
    /// rope tables are not CPU f32 (the caller takes the tensor path).
    fn decode_step(&self, x: &Tensor, rope: &Rope, pos: usize, buf: &mut KvBuf) -> Result<Option<Tensor>> {
        let Some(row) = rope.row_f32(pos) else { return Ok(None) };
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let mut q = f32_vec(&self.q_proj.forward(x)?)?;
        let mut k = f32_vec(&self.k_proj.forward(x)?)?;
        let v = f32_vec(&self.v_proj.forward(x)?)?;
        row.rotate(&mut q, d);
        row.rotate(&mut k, d);
        buf.append(&k, &v, 1);
        let mut out = vec![0f32; h * d];
        let scale = 1.0 / (d as f32).sqrt();
        crate::kernels::attention::cpu::decode_attention(&q, &buf.k, &buf.v, buf.cap * d, buf.len, h, kvh, d, scale, &mut out);
        let out = Tensor::from_vec(out, (1, 1, h * d), x.device())?;
        Ok(Some(self.o_proj.forward(&out)?))
    }

    /// Training forward on the normed rows `h` `[b·t, hidden]` of `batch`, RoPE at its
    /// positions, under its mask.
    pub fn forward_train(&self, h: &Tensor, batch: &TrainBatch, rope: &RopeAt, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Acts)> {
        let (q, sq) = self.q_proj.forward_train(h, train, rng)?;
        let (k, sk) = self.k_proj.forward_train(h, train, rng)?;
        let (v, sv) = self.v_proj.forward_train(h, train, rng)?;
        let (q, k, v) = profile::time("rope fwd", || self.heads(&q, &k, &v, batch.b, batch.t, rope))?;
        let (o, core) = profile::time("attention fwd", || op(&q, &k, &v, &batch.mask, Some(&batch.segments)))?;
        let o = profile::time("heads+residual fwd", || merge_heads(&o, None))?;
        let (y, so) = self.o_proj.forward_train(&o, train, rng)?;
        Ok((y, Acts { q: sq, k: sk, v: sv, core, o: so }))
    }

    /// The input rows' gradient; each adapter's `(dA, dB)` goes to `push`.
    pub fn backward(&self, s: &Acts, batch: &TrainBatch, rope: &RopeAt, dy: &Tensor, push: &mut impl FnMut(Proj, Option<(Tensor, Tensor)>)) -> Result<Tensor> {
        let (do_, go) = self.o_proj.backward(&s.o, dy)?;
        push(Proj::O, go);
        let do_ = profile::time("heads bwd", || split_heads(&do_, batch.b, batch.t, self.n_heads, self.head_dim, None))?;
        let (dq, dk, dv) = profile::time("attention bwd", || backward(&s.core, &do_))?;
        let merged = || -> Result<_> { Ok((merge_heads(&dq, rope.pair())?, merge_heads(&dk, rope.pair())?, merge_heads(&dv, None)?)) };
        let (dq, dk, dv) = profile::time("rope bwd", merged)?;
        let (dhq, gq) = self.q_proj.backward(&s.q, &dq)?;
        push(Proj::Q, gq);
        let (dhk, gk) = self.k_proj.backward(&s.k, &dk)?;
        push(Proj::K, gk);
        let (dhv, gv) = self.v_proj.backward(&s.v, &dv)?;
        push(Proj::V, gv);
        profile::time("rms_norm+residual bwd", || Ok(((dhq + dhk)? + dhv)?))
    }
}

/// The attention op on heads, through the flash kernels' entry (segment ids) when the queries
/// are the whole sequence, else the mask's.
fn op(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, segments: Option<&Tensor>) -> Result<(Tensor, Saved)> {
    match segments {
        Some(s) => forward_segments(q, k, v, mask, s),
        None => forward(q, k, v, mask),
    }
}

/// Additive mask `[b, 1, t, s]` (0 or −∞): query `i` of row `r` sees key `j` when `sees(r, i, j)`.
fn additive_mask(b: usize, t: usize, s: usize, device: &Device, sees: impl Fn(usize, usize, usize) -> bool) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; b * t * s];
    for (row, out) in m.chunks_exact_mut(s.max(1)).enumerate() {
        let (r, i) = (row / t, row % t);
        for (j, x) in out.iter_mut().enumerate() {
            if sees(r, i, j) {
                *x = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, s), device)?)
}

/// Additive mask `[b, 1, t, t]` from per-token segment ids `[b·t]`: token `i` attends to `j`
/// when `j ≤ i` and both belong to the same example (`segment` > 0). Padding (`segment` 0)
/// attends only to itself, so no row is empty (its loss is ignored anyway).
pub fn build_mask(segment_ids: &[u32], b: usize, t: usize, device: &Device) -> Result<Tensor> {
    anyhow::ensure!(segment_ids.len() == b * t, "segment ids: {} for a {b}×{t} batch", segment_ids.len());
    additive_mask(b, t, t, device, |r, i, j| {
        let seg = &segment_ids[r * t..(r + 1) * t];
        j == i || (j < i && seg[i] != 0 && seg[i] == seg[j])
    })
}

/// Additive causal mask `[b, 1, t, s]` for `t` queries that follow `s − t` cached positions.
pub fn causal_mask(b: usize, t: usize, s: usize, device: &Device) -> Result<Tensor> {
    additive_mask(b, t, s, device, |_, i, j| j <= s - t + i)
}

pub struct Saved {
    /// Queries as given `[b, nh, t, d]` (unscaled), keys and values `[b, kvh, s, d]` (`s = t`
    /// in training; at inference the queries are the last `t` of `s` positions).
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// The additive mask `[b, 1, t, s]`.
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

/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, s, d]`, `mask` `[b, 1, t, s]` → `o` `[b, nh, t, d]`;
/// the queries are the last `t` of the `s` positions (all of them in training, `s = t`).
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
        let _pr = profile::scope("·attn fwd PV matmul");
        outs.push(tile.p.reshape((b, kvh, rep * c, tile.k.dim(2)?))?.matmul(&tile.v)?.reshape((b, nh, c, d))?);
    }
    let o = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 2)? };
    Ok((o, s))
}

/// `(first query, rows)` of each tile.
fn tiles(t: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(tile.max(1)).map(move |q0| (q0, tile.min(t - q0)))
}

/// One query tile's operands and probabilities: queries `q0..q0+c` against the keys up to the
/// tile's last query, `0..end` with `end = s − t + q0 + c` (the causal mask hides every later
/// key from the whole tile).
struct Tile {
    /// `[b, kvh, rep·c, d]`
    q: Tensor,
    /// `[b, kvh, end, d]`
    k: Tensor,
    v: Tensor,
    /// `[b, nh, c, end]`
    p: Tensor,
}

impl Tile {
    fn new(s: &Saved, q0: usize, c: usize) -> Result<Self> {
        let (b, nh, t, d) = s.q.dims4()?;
        let kvh = s.k.dim(1)?;
        let end = s.k.dim(2)? - t + q0 + c;
        let whole = c == t;
        let q = if whole { s.q.clone() } else { s.q.narrow(2, q0, c)?.contiguous()? }.reshape((b, kvh, nh / kvh * c, d))?;
        let (k, v) = if whole { (s.k.clone(), s.v.clone()) } else { (s.k.narrow(2, 0, end)?.contiguous()?, s.v.narrow(2, 0, end)?.contiguous()?) };
        let mask = if whole { s.mask.clone() } else { s.mask.narrow(2, q0, c)?.narrow(3, 0, end)?.contiguous()? };
        let scores = profile::time("·attn QK matmul", || q.matmul(&k.t()?)?.reshape((b, nh, c, end)))?;
        let p = profile::time("·attn softmax", || crate::kernels::attention::masked_softmax(&scores, &mask, scale_of(d)))?;
        Ok(Self { q, k, v, p })
    }
}

/// Returns `(dq, dk, dv)` in the shapes of the forward's inputs.
pub fn backward(s: &Saved, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(f) = &s.flash {
        return crate::kernels::attention::flash_backward(&s.q, &s.k, &s.v, &f.segments, &f.o, &f.lse, &d_o.to_dtype(s.q.dtype())?);
    }
    let (b, nh, t, d) = s.q.dims4()?;
    anyhow::ensure!(s.k.dim(2)? == t, "attention backward: queries after cached positions (inference only)");
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
        // dV_c [b, kvh, end, d], dP [b, kvh, rep·c, end].
        let (dv_c, dp) = profile::time("·attn bwd dV dP matmuls", || -> Result<_> { Ok((p.t()?.matmul(&do_c)?, do_c.matmul(&tile.v.t()?)?)) })?;
        let ds = profile::time("·attn bwd softmax", || crate::kernels::attention::softmax_backward(&p, &dp))?;
        let _pr = profile::scope("·attn bwd dQ dK matmuls");
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
