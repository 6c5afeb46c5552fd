//! Grouped-query causal attention's kernels, for training and inference alike
//! (`model::layers::attention` runs the tiles): the CUDA flash kernels (bf16, head size 64,
//! 128 or 256) take the whole forward and backward; else the fused CPU kernel (f32, as many keys as
//! queries) that keeps the probabilities; else query tiles of candle matmuls around
//! [`masked_softmax`] / [`softmax_backward`] (a CUDA kernel for f32 and bf16, candle's ops as
//! the reference). Decoding on the CPU: the single-query attention over the cache buffer
//! ([`cpu::decode_attention`]).
//!
//! Every entry takes the layer's [`AttnParams`]: the score scale, Gemma 2's attention-logit
//! soft-capping and the sliding window. The training/prefill mask already hides keys outside a
//! window (so the fused CPU kernel, which reads the mask, takes windows); the flash kernels
//! build their mask from segment ids and so get the window as a parameter. All kernels take
//! the scale and soft-capping; one that cannot do a feature declines (`None` / `false`) and the
//! candle tiles run it.

pub mod cpu;
pub mod cpu_train;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod flash;

use super::{cuda_float, f32_view, stat_dtype};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

/// What a layer's attention computes beyond `softmax(QKᵀ + mask)`: scores are `scale · QKᵀ`,
/// then `cap · tanh(s / cap)` with `softcap` (Gemma 2), then masked; with `window`, query `i`
/// sees key `j` only when `i − j < window` (transformers' `kv_idx > q_idx − sliding_window`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

impl AttnParams {
    /// Llama's attention for head size `d`: scale `1/√d`, no cap, no window.
    pub fn plain(d: usize) -> Self {
        Self { scale: (1.0 / (d as f64).sqrt()) as f32, softcap: None, window: None }
    }

    /// Whether this is [`AttnParams::plain`] for head size `d`.
    pub fn is_plain(&self, d: usize) -> bool {
        *self == Self::plain(d)
    }
}

/// Whether the flash kernels take this attention: CUDA, bf16, head size 64, 128 or 256 (any
/// scale, soft-cap > 0 and window ≥ 1).
pub fn flash_fits(q: &Tensor, p: &AttnParams) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    let params_ok = p.window != Some(0) && p.softcap.is_none_or(|c| c > 0.0);
    q.device().is_cuda() && q.dtype() == DType::BF16 && matches!(d, 64 | 128 | 256) && params_ok
}

/// Flash attention forward when [`flash_fits`]: `(o, lse)`, `o = softmax(L + mask) V` with the
/// logits `L` of `p` (scaled, soft-capped) and the mask given by the segment ids `[b, t]` (u32)
/// and `p`'s window, and its log-sum-exp (f32 `[b, nh, t]`, base 2, for [`flash_backward`]).
/// `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn flash_forward(q: &Tensor, k: &Tensor, v: &Tensor, segments: &Tensor, p: &AttnParams) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if flash_fits(q, p) {
        return Ok(Some(flash::forward(q, k, v, segments, p)?));
    }
    Ok(None)
}

/// `(dq, dk, dv)` of [`flash_forward`] from its inputs, output `o`, log-sum-exp `lse` and the
/// output's gradient `d_o` (bf16).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn flash_backward(q: &Tensor, k: &Tensor, v: &Tensor, segments: &Tensor, o: &Tensor, lse: &Tensor, d_o: &Tensor, p: &AttnParams) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    {
        anyhow::ensure!(flash_fits(q, p), "flash attention backward: {p:?} is not what the flash kernels take");
        return flash::backward(q, k, v, segments, o, lse, d_o, p);
    }
    #[cfg(not(feature = "cuda"))]
    anyhow::bail!("flash attention backward: this qscript was built without CUDA")
}

/// The fused forward that keeps the probabilities, when a kernel takes these tensors (the CPU
/// kernel: all contiguous f32, as many keys as queries): `(o [b, nh, t, d], p [b, nh, t, t])`.
/// `mask` `[b, 1, t, t]`, causal (a window is in the mask); `p`'s scale and soft-cap.
pub fn fused_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, p: &AttnParams) -> Result<Option<(Tensor, Tensor)>> {
    let (b, nh, t, d) = q.dims4()?;
    if k.dim(2)? != t {
        return Ok(None);
    }
    let (scale, softcap) = (p.scale, p.softcap);
    let (Some(qv), Some(kv), Some(vv), Some(mv)) = (f32_view(q), f32_view(k), f32_view(v), f32_view(mask)) else { return Ok(None) };
    let dims = cpu_train::Dims { b, nh, kvh: k.dim(1)?, t, d };
    let (o, p) = cpu_train::forward(dims, qv.slice(), kv.slice(), vv.slice(), mv.slice(), scale, softcap);
    let dev = q.device();
    Ok(Some((Tensor::from_vec(o, (b, nh, t, d), dev)?, Tensor::from_vec(p, (b, nh, t, t), dev)?)))
}

/// The backward of [`fused_forward`] from its probabilities `p`, when a kernel takes these
/// tensors: `(dq, dk, dv)`.
pub fn fused_backward(q: &Tensor, k: &Tensor, v: &Tensor, p: Option<&Tensor>, d_o: &Tensor, params: &AttnParams) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (b, nh, t, d) = q.dims4()?;
    let (Some(qv), Some(kv), Some(vv), Some(pv), Some(dov)) = (f32_view(q), f32_view(k), f32_view(v), p.and_then(f32_view), f32_view(d_o)) else {
        return Ok(None);
    };
    let dims = cpu_train::Dims { b, nh, kvh: k.dim(1)?, t, d };
    let (dq, dk, dv) = cpu_train::backward(dims, qv.slice(), kv.slice(), vv.slice(), pv.slice(), dov.slice(), params.scale, params.softcap);
    let dev = d_o.device();
    Ok(Some((Tensor::from_vec(dq, q.shape(), dev)?, Tensor::from_vec(dk, k.shape(), dev)?, Tensor::from_vec(dv, v.shape(), dev)?)))
}

/// `softmax(softcap(scale · scores) + mask)` over the last axis as a candle op: the CUDA kernel
/// only (`softcap` 0: none).
pub struct MaskedSoftmax {
    pub scale: f32,
    pub softcap: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked softmax: no CPU kernel (masked_softmax runs candle's ops there)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, sl: &Layout, m: &candle_core::CudaStorage, ml: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::forward((s, sl), (m, ml), self.scale, self.softcap).map_err(super::launch::candle_err)?, sl.shape().clone()))
    }
}

/// The tiled path's `softmax(softcap(scale · scores) + mask)` over the last axis, scores
/// `[b, nh, c, s]` with the mask `[b, 1, c, s]`, in the scores' dtype with f32 statistics.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, p: &AttnParams) -> Result<Tensor> {
    if cuda_float(scores) && p.softcap.is_none_or(|c| c > 0.0) {
        let op = MaskedSoftmax { scale: p.scale, softcap: p.softcap.unwrap_or(0.0) };
        return Ok(scores.contiguous()?.apply_op2_no_bwd(&mask.contiguous()?, &op)?);
    }
    let sd = stat_dtype(scores.dtype());
    let mut x = (scores.to_dtype(sd)? * p.scale as f64)?;
    if let Some(cap) = p.softcap {
        x = ((x / cap as f64)?.tanh()? * cap as f64)?;
    }
    let x = x.broadcast_add(&mask.to_dtype(sd)?)?;
    Ok(candle_nn::ops::softmax_last_dim(&x)?.to_dtype(scores.dtype())?)
}

/// The soft-capping's part of the scores' gradient: `dS ⊙ (1 − tanh²(scale · scores / cap))`
/// (the gradient of `softcap(scale · scores)` before the `scale` factor, which the caller's
/// products apply); `dS` unchanged without a cap.
pub fn softcap_backward(ds: &Tensor, scores: &Tensor, p: &AttnParams) -> Result<Tensor> {
    let Some(cap) = p.softcap else { return Ok(ds.clone()) };
    if cuda_float(ds) && ds.dtype() == scores.dtype() && cap > 0.0 {
        return Ok(ds.contiguous()?.apply_op2_no_bwd(&scores.contiguous()?, &SoftcapBackward { scale: p.scale, softcap: cap })?);
    }
    let sd = stat_dtype(scores.dtype());
    let th = ((scores.to_dtype(sd)? * p.scale as f64)? / cap as f64)?.tanh()?;
    Ok((ds.to_dtype(sd)? * (1.0 - th.sqr()?)?)?.to_dtype(ds.dtype())?)
}

/// `dS ⊙ (1 − tanh²(scale · scores / cap))` as a candle op: the CUDA kernel only.
pub struct SoftcapBackward {
    pub scale: f32,
    pub softcap: f32,
}

impl CustomOp2 for SoftcapBackward {
    fn name(&self) -> &'static str {
        "softcap-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("soft-cap backward: no CPU kernel (softcap_backward runs candle's ops there)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, ds: &candle_core::CudaStorage, dl: &Layout, s: &candle_core::CudaStorage, sl: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::softcap_backward((ds, dl), (s, sl), self.scale, self.softcap).map_err(super::launch::candle_err)?, dl.shape().clone()))
    }
}

/// Softmax backward `dS = P ⊙ (dP − Σ_j dP·P)` as a candle op: the CUDA kernel only.
pub struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("softmax backward: no CPU kernel (softmax_backward runs candle's ops there)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, p: &candle_core::CudaStorage, pl: &Layout, dp: &candle_core::CudaStorage, dl: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::backward((p, pl), (dp, dl)).map_err(super::launch::candle_err)?, pl.shape().clone()))
    }
}

/// The tiled path's softmax backward: `dS = P ⊙ (dP − Σ_j dP·P)` over the last axis.
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    if cuda_float(p) {
        return Ok(p.contiguous()?.apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBackward)?);
    }
    let dot = (dp * p)?.sum_keepdim(D::Minus1)?;
    Ok((p * dp.broadcast_sub(&dot)?)?)
}
