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
//!
//! Family variants, chosen by the config: q/k/v as one fused linear (Phi-3's `qkv_proj`, rows
//! q, k, v: narrowed in forward, the three gradients concatenated in backward); per-head q/k
//! norms before RoPE (Qwen3, Gemma 3); the score scale, Gemma 2's soft-capping and a sliding
//! window ([`AttnParams`], carried to the op); a sliding layer's own RoPE tables (Gemma 3).

use super::kv_cache::{f32_vec, KvBuf, LayerKv};
use super::linear::{self, Linear};
use super::norm::{self, RmsNorm};
use super::rope::{merge_heads, split_heads, Rope, RopeAt};
use crate::model::engine::TrainBatch;
use crate::model::names::Proj;
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;
use std::sync::OnceLock;

pub use crate::kernels::attention::AttnParams;

/// The q/k/v projections: three linears, or one fused (Phi-3's `qkv_proj`, rows q, k, v).
#[allow(clippy::large_enum_variant)]
pub enum QkvProj {
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused { qkv_proj: Linear },
}

pub struct Attention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    /// Per-head norms of queries and keys before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Scale, soft-capping and window of the scores.
    pub params: AttnParams,
    /// A sliding-window layer: it rotates by the sliding layers' RoPE tables where they differ.
    pub sliding: bool,
}

/// What every layer's attention shares in one inference call: the first new position, RoPE at
/// the new positions, the causal mask `[b, 1, t, s]` over cached + new positions (and, made on
/// first use, the sliding layers' windowed one), and (nothing cached before) the segment ids
/// `[b, t]` the flash kernels take.
pub struct Step {
    pub pos: usize,
    pub rope: RopeAt,
    pub mask: Tensor,
    pub segments: Option<Tensor>,
    windowed: OnceLock<(usize, Tensor)>,
}

impl Step {
    /// `b` rows of `t` new tokens after `pos` cached positions.
    pub fn new(rope: &Rope, b: usize, t: usize, pos: usize, device: &Device) -> Result<Self> {
        let segments = if pos == 0 { Some(Tensor::ones((b, t), DType::U32, device)?) } else { None };
        Ok(Self { pos, rope: rope.span(b, pos, t)?, mask: causal_mask(b, t, pos + t, device)?, segments, windowed: OnceLock::new() })
    }

    /// The mask of a layer with this `window` (the KV cache keeps every position; the mask
    /// hides those out of the window).
    pub fn mask_for(&self, window: Option<usize>) -> Result<&Tensor> {
        let Some(w) = window else { return Ok(&self.mask) };
        if self.windowed.get().is_none() {
            let (b, _, t, s) = self.mask.dims4()?;
            let m = additive_mask(b, t, s, self.mask.device(), |_, i, j| j <= s - t + i && s - t + i - j < w)?;
            let _ = self.windowed.set((w, m));
        }
        let (w0, m) = self.windowed.get().expect("set above");
        anyhow::ensure!(*w0 == w, "one sliding window per model ({w0} and {w})");
        Ok(m)
    }
}

/// What the q/k/v projections' backward needs.
pub enum QkvSaved {
    Split { q: linear::Saved, k: linear::Saved, v: linear::Saved },
    Fused(linear::Saved),
}

/// What the sub-layer's training backward needs.
pub struct Acts {
    pub qkv: QkvSaved,
    /// The q/k norms' saved inputs (when the layer has them).
    pub q_norm: Option<norm::Saved>,
    pub k_norm: Option<norm::Saved>,
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
            if let Some(y) = self.decode_step(x, rope.layer(self.sliding), step.pos, buf)? {
                return Ok(y);
            }
        }
        let (q, k, v) = self.qkv(x, step)?;
        let (k, v) = slot.extend(k, v)?;
        self.attend(&q, &k, &v, step)
    }

    /// The projections' rows of `x` `[..., hidden]`: `(q, k, v)` `[..., heads·d]`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => Ok((q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?)),
            QkvProj::Fused { qkv_proj } => self.thirds(&qkv_proj.forward(x)?),
        }
    }

    /// A fused q/k/v output `[..., (h + 2·kvh)·d]` → q, k, v.
    fn thirds(&self, y: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, kv) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        Ok((y.narrow(D::Minus1, 0, q)?.contiguous()?, y.narrow(D::Minus1, q, kv)?.contiguous()?, y.narrow(D::Minus1, q + kv, kv)?.contiguous()?))
    }

    /// The per-head q/k norms of projection rows (identity without them).
    fn norm_qk(&self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor, Option<norm::Saved>, Option<norm::Saved>)> {
        let one = |n: &Option<RmsNorm>, x: Tensor| -> Result<(Tensor, Option<norm::Saved>)> {
            match n {
                Some(n) => profile::time("rms_norm fwd", || n.forward_heads(&x)).map(|(y, s)| (y, Some(s))),
                None => Ok((x, None)),
            }
        };
        let (q, sq) = one(&self.q_norm, q)?;
        let (k, sk) = one(&self.k_norm, k)?;
        Ok((q, k, sq, sk))
    }

    /// Rotated queries `[b, nh, t, d]`, rotated keys and values `[b, kvh, t, d]`.
    fn qkv(&self, x: &Tensor, step: &Step) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x)?;
        let (q, k, _, _) = self.norm_qk(q, k)?;
        self.heads(&q, &k, &v, b, t, step.rope.layer(self.sliding))
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
        let (o, _) = op(q, k, v, step.mask_for(self.params.window)?, step.segments.as_ref(), &self.params)?;
        self.o_proj.forward(&merge_heads(&o, None)?.reshape((b, t, ()))?)
    }

    /// One new position (decoding) against a buffered cache, on plain slices: q/k norms, rope
    /// on the q/k rows, append k/v in place, fused scores/softmax/weighted sum per head over
    /// the window, soft-capped scores as Gemma 2's. `None` when the rope tables are not CPU f32
    /// (the caller takes the tensor path).
    fn decode_step(&self, x: &Tensor, rope: &Rope, pos: usize, buf: &mut KvBuf) -> Result<Option<Tensor>> {
        let Some(row) = rope.row_f32(pos) else { return Ok(None) };
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x)?;
        let (q, k, _, _) = self.norm_qk(q, k)?;
        let (mut q, mut k, v) = (f32_vec(&q)?, f32_vec(&k)?, f32_vec(&v)?);
        row.rotate(&mut q, d);
        row.rotate(&mut k, d);
        buf.append(&k, &v, 1);
        let mut out = vec![0f32; h * d];
        // A window hides the oldest positions: start the slices past them.
        let first = self.params.window.map_or(0, |w| buf.len.saturating_sub(w));
        let (ks, vs) = (&buf.k[first * d..], &buf.v[first * d..]);
        crate::kernels::attention::cpu::decode_attention_capped(&q, ks, vs, buf.cap * d, buf.len - first, h, kvh, d, self.params.scale, self.params.softcap, &mut out);
        let out = Tensor::from_vec(out, (1, 1, h * d), x.device())?;
        Ok(Some(self.o_proj.forward(&out)?))
    }

    /// Training forward on the normed rows `h` `[b·t, hidden]` of `batch`, RoPE at its
    /// positions, under its mask.
    pub fn forward_train(&self, h: &Tensor, batch: &TrainBatch, rope: &RopeAt, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Acts)> {
        let (q, k, v, qkv) = match &self.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => {
                let (q, sq) = q_proj.forward_train(h, train, rng)?;
                let (k, sk) = k_proj.forward_train(h, train, rng)?;
                let (v, sv) = v_proj.forward_train(h, train, rng)?;
                (q, k, v, QkvSaved::Split { q: sq, k: sk, v: sv })
            }
            QkvProj::Fused { qkv_proj } => {
                let (y, s) = qkv_proj.forward_train(h, train, rng)?;
                let (q, k, v) = self.thirds(&y)?;
                (q, k, v, QkvSaved::Fused(s))
            }
        };
        let (q, k, q_norm, k_norm) = self.norm_qk(q, k)?;
        let rope = rope.layer(self.sliding);
        let (q, k, v) = profile::time("rope fwd", || self.heads(&q, &k, &v, batch.b, batch.t, rope))?;
        let mask = || Ok(batch.mask_for(self.params.window)?.clone());
        let (o, core) = profile::time("attention fwd", || forward_segments_lazy(&q, &k, &v, &mask, &batch.segments, &self.params))?;
        let o = profile::time("heads+residual fwd", || merge_heads(&o, None))?;
        let (y, mut so) = self.o_proj.forward_train(&o, train, rng)?;
        if core.flash.is_some() {
            // o_proj's input is the flash output (kept) with its heads merged: remade in backward.
            so.x = None;
        }
        Ok((y, Acts { qkv, q_norm, k_norm, core, o: so }))
    }

    /// The input rows' gradient; each adapter's `(dA, dB)` goes to `push`.
    pub fn backward(&self, s: &Acts, batch: &TrainBatch, rope: &RopeAt, dy: &Tensor, push: &mut impl FnMut(Proj, Option<(Tensor, Tensor)>)) -> Result<Tensor> {
        let o = match (&self.o_proj.lora, &s.o.x, &s.core.flash) {
            (Some(_), None, Some(f)) => Some(profile::time("heads+residual fwd", || merge_heads(&f.o, None))?),
            _ => None,
        };
        let (do_, go) = self.o_proj.backward(&s.o.with_input(o), dy)?;
        push(Proj::O, go);
        let do_ = profile::time("heads bwd", || split_heads(&do_, batch.b, batch.t, self.n_heads, self.head_dim, None))?;
        let (dq, dk, dv) = profile::time("attention bwd", || backward(&s.core, &do_))?;
        let rope = rope.layer(self.sliding);
        let merged = || -> Result<_> { Ok((merge_heads(&dq, rope.pair())?, merge_heads(&dk, rope.pair())?, merge_heads(&dv, None)?)) };
        let (dq, dk, dv) = profile::time("rope bwd", merged)?;
        let (dq, dk) = self.norm_qk_backward(s, dq, dk)?;
        match (&self.qkv, &s.qkv) {
            (QkvProj::Split { q_proj, k_proj, v_proj }, QkvSaved::Split { q, k, v }) => {
                let (dhq, gq) = q_proj.backward(q, &dq)?;
                push(Proj::Q, gq);
                let (dhk, gk) = k_proj.backward(k, &dk)?;
                push(Proj::K, gk);
                let (dhv, gv) = v_proj.backward(v, &dv)?;
                push(Proj::V, gv);
                profile::time("rms_norm+residual bwd", || crate::kernels::sum::sum(&[&dhq, &dhk, &dhv]))
            }
            (QkvProj::Fused { qkv_proj }, QkvSaved::Fused(saved)) => {
                let (dx, g) = qkv_proj.backward(saved, &Tensor::cat(&[dq, dk, dv], D::Minus1)?)?;
                push(Proj::Qkv, g);
                Ok(dx)
            }
            _ => anyhow::bail!("attention backward: activations saved by another layout"),
        }
    }

    /// The q/k norms' backward (identity without them).
    fn norm_qk_backward(&self, s: &Acts, dq: Tensor, dk: Tensor) -> Result<(Tensor, Tensor)> {
        let one = |n: &Option<RmsNorm>, saved: &Option<norm::Saved>, d: Tensor| -> Result<Tensor> {
            match (n, saved) {
                (Some(n), Some(saved)) => profile::time("rms_norm bwd", || n.backward_heads(saved, &d)),
                _ => Ok(d),
            }
        };
        Ok((one(&self.q_norm, &s.q_norm, dq)?, one(&self.k_norm, &s.k_norm, dk)?))
    }
}

/// The attention op on heads, through the flash kernels' entry (segment ids) when the queries
/// are the whole sequence, else the mask's.
fn op(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, segments: Option<&Tensor>, p: &AttnParams) -> Result<(Tensor, Saved)> {
    match segments {
        Some(s) => forward_segments_with(q, k, v, mask, s, p),
        None => forward_with(q, k, v, mask, p, TILE),
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
    build_window_mask(segment_ids, b, t, None, device)
}

/// [`build_mask`] of a sliding-window layer: also `i − j < window`.
pub fn build_window_mask(segment_ids: &[u32], b: usize, t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    anyhow::ensure!(segment_ids.len() == b * t, "segment ids: {} for a {b}×{t} batch", segment_ids.len());
    let w = window.unwrap_or(usize::MAX);
    additive_mask(b, t, t, device, |r, i, j| {
        let seg = &segment_ids[r * t..(r + 1) * t];
        j == i || (j < i && i - j < w && seg[i] != 0 && seg[i] == seg[j])
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
    /// The additive mask `[b, 1, t, s]` (`None` under the flash kernels, which never need it).
    pub mask: Option<Tensor>,
    /// Softmax probabilities `[b, nh, t, t]`: kept by the CPU f32 path only (the tiled path
    /// recomputes them).
    pub p: Option<Tensor>,
    /// Query rows per tile.
    pub tile: usize,
    /// What the flash kernels' backward needs (CUDA, bf16), which then took the forward.
    pub flash: Option<Flash>,
    /// Scale, soft-capping and window of the scores.
    pub params: AttnParams,
}

/// The flash forward's output, its log-sum-exp `[b, nh, t]` and the segment ids `[b, t]`.
pub struct Flash {
    pub o: Tensor,
    pub lse: Tensor,
    pub segments: Tensor,
}

/// Query rows per tile of the tiled path: `[b, nh, TILE, t]` scores exist at once.
pub const TILE: usize = 256;

/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, s, d]`, `mask` `[b, 1, t, s]` → `o` `[b, nh, t, d]`;
/// the queries are the last `t` of the `s` positions (all of them in training, `s = t`).
/// Llama's scores (`1/√d`, no cap).
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, Saved)> {
    forward_tiled(q, k, v, mask, TILE)
}

/// [`forward`] given also the segment ids `[b, t]` (u32) the mask was built from: on CUDA in
/// bf16 with head size 64 or 128 the flash kernels run, from those instead of the mask.
pub fn forward_segments(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, segments: &Tensor) -> Result<(Tensor, Saved)> {
    forward_segments_with(q, k, v, mask, segments, &AttnParams::plain(q.dim(3)?))
}

/// [`forward_segments`] with a layer's scale, soft-capping and window (`mask` holds the window).
pub fn forward_segments_with(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, segments: &Tensor, p: &AttnParams) -> Result<(Tensor, Saved)> {
    forward_segments_lazy(q, k, v, &|| Ok(mask.clone()), segments, p)
}

/// [`forward_segments_with`] with the mask made only when a path needs it (not the flash one).
pub fn forward_segments_lazy(q: &Tensor, k: &Tensor, v: &Tensor, mask: &dyn Fn() -> Result<Tensor>, segments: &Tensor, p: &AttnParams) -> Result<(Tensor, Saved)> {
    if let Some((o, lse)) = crate::kernels::attention::flash_forward(q, k, v, segments, p)? {
        let flash = Some(Flash { o: o.clone(), lse, segments: segments.clone() });
        return Ok((o, Saved { q: q.clone(), k: k.clone(), v: v.clone(), mask: None, p: None, tile: TILE, flash, params: *p }));
    }
    forward_with(q, k, v, &mask()?, p, TILE)
}

/// [`forward`] with query tiles of `tile` rows (tests use small ones).
pub fn forward_tiled(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, tile: usize) -> Result<(Tensor, Saved)> {
    forward_with(q, k, v, mask, &AttnParams::plain(q.dim(3)?), tile)
}

/// [`forward_tiled`] with a layer's scale, soft-capping and window (`mask` holds the window).
pub fn forward_with(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, params: &AttnParams, tile: usize) -> Result<(Tensor, Saved)> {
    let (b, nh, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let rep = nh / kvh;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if let Some((o, p)) = crate::kernels::attention::fused_forward(&q, &k, &v, mask, params)? {
        return Ok((o, Saved { q, k, v, mask: Some(mask.clone()), p: Some(p), tile, flash: None, params: *params }));
    }
    let s = Saved { q, k, v, mask: Some(mask.clone()), p: None, tile, flash: None, params: *params };
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
    /// The raw scores `[b, nh, c, end]`, kept when soft-capped (backward's `1 − tanh²`).
    scores: Option<Tensor>,
}

impl Tile {
    fn new(s: &Saved, q0: usize, c: usize) -> Result<Self> {
        let (b, nh, t, d) = s.q.dims4()?;
        let kvh = s.k.dim(1)?;
        let end = s.k.dim(2)? - t + q0 + c;
        let whole = c == t;
        let q = if whole { s.q.clone() } else { s.q.narrow(2, q0, c)?.contiguous()? }.reshape((b, kvh, nh / kvh * c, d))?;
        let (k, v) = if whole { (s.k.clone(), s.v.clone()) } else { (s.k.narrow(2, 0, end)?.contiguous()?, s.v.narrow(2, 0, end)?.contiguous()?) };
        let m = s.mask.as_ref().ok_or_else(|| anyhow::anyhow!("attention: no mask saved (flash activations)"))?;
        let mask = if whole { m.clone() } else { m.narrow(2, q0, c)?.narrow(3, 0, end)?.contiguous()? };
        let scores = profile::time("·attn QK matmul", || q.matmul(&k.t()?)?.reshape((b, nh, c, end)))?;
        let p = profile::time("·attn softmax", || crate::kernels::attention::masked_softmax(&scores, &mask, &s.params))?;
        let scores = s.params.softcap.map(|_| scores);
        Ok(Self { q, k, v, p, scores })
    }
}

/// Returns `(dq, dk, dv)` in the shapes of the forward's inputs.
pub fn backward(s: &Saved, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(f) = &s.flash {
        return crate::kernels::attention::flash_backward(&s.q, &s.k, &s.v, &f.segments, &f.o, &f.lse, &d_o.to_dtype(s.q.dtype())?, &s.params);
    }
    let (b, nh, t, d) = s.q.dims4()?;
    anyhow::ensure!(s.k.dim(2)? == t, "attention backward: queries after cached positions (inference only)");
    let kvh = s.k.dim(1)?;
    let rep = nh / kvh;
    let scale = s.params.scale as f64;
    let d_o = d_o.contiguous()?;
    if let Some(grads) = crate::kernels::attention::fused_backward(&s.q, &s.k, &s.v, s.p.as_ref(), &d_o, &s.params)? {
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
        let ds = match &tile.scores {
            Some(sc) => crate::kernels::attention::softcap_backward(&ds, &sc.reshape(ds.shape())?, &s.params)?,
            None => ds,
        };
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
