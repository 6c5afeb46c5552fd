//! RMSNorm `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` over the last axis, statistics
//! in f32 (as transformers); Gemma's variant (`plus_one`) scales by `1 + w`, the whole
//! product in f32 and then cast (`Gemma2RMSNorm`). Dispatch order: the CUDA kernels (f32,
//! bf16; they add the 1 in f32), the CPU kernels (contiguous f32, given `1 + w` in f32),
//! candle's ops in the statistics dtype.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{f32_view, stat_dtype};
use anyhow::Result;
use candle_core::{Tensor, D};

/// The scale the kernels multiply by: `w`, or `1 + w` in f32 (`plus_one`).
fn scale(w: &Tensor, plus_one: bool) -> Result<Tensor> {
    if plus_one {
        return Ok((w.to_dtype(stat_dtype(w.dtype()))? + 1.0)?);
    }
    Ok(w.clone())
}

/// Whether the CUDA kernels take this norm: f32 or bf16 activations; with `plus_one` a weight in
/// the activations' dtype (the kernels add the 1 in f32, as `Gemma2RMSNorm`).
#[cfg(feature = "cuda")]
fn cuda_takes(x: &Tensor, w: &Tensor, plus_one: bool) -> bool {
    super::cuda_float(x) && (!plus_one || w.dtype() == x.dtype())
}

/// The CUDA kernels' weight offset: they scale by `offset + w` in f32.
#[cfg(feature = "cuda")]
fn offset(plus_one: bool) -> f32 {
    if plus_one { 1.0 } else { 0.0 }
}

/// Training forward: `(y, x as saved for backward, rstd [rows, 1])`.
pub fn forward(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if cuda_takes(x, w, plus_one) {
        let x = x.contiguous()?;
        let (y, rstd) = cuda::forward(&x, &w.to_dtype(x.dtype())?.contiguous()?, eps as f32, offset(plus_one))?;
        return Ok((y, x, rstd));
    }
    let w = &scale(w, plus_one)?;
    if let (Some(xv), Some(wv)) = (f32_view(x), f32_view(w)) {
        let (y, rstd) = cpu::rms_norm_fwd(xv.slice(), wv.slice(), eps as f32);
        let rows = rstd.len();
        let y = Tensor::from_vec(y, x.shape(), x.device())?;
        return Ok((y, x.clone(), Tensor::from_vec(rstd, (rows, 1), x.device())?));
    }
    let sd = stat_dtype(x.dtype());
    let xf = x.to_dtype(sd)?;
    let rstd = ((xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip())?;
    let y = xf.broadcast_mul(&rstd)?.broadcast_mul(&w.to_dtype(sd)?)?.to_dtype(x.dtype())?;
    Ok((y, xf, rstd))
}

/// Backward: `dx = rstd · (g − x̂ · mean(g · x̂))` with `g = dy · w`, `x̂ = x · rstd`, from the
/// forward's saved `x` and `rstd` (`g = dy · (1 + w)` with `plus_one`); plus `residual` when
/// given (the residual stream's gradient: fused into the CUDA kernel, one rounding).
pub fn backward(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor, plus_one: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    let dy = &dy.contiguous()?;
    #[cfg(feature = "cuda")]
    if cuda_takes(x, w, plus_one) && dy.dtype() == x.dtype() && residual.is_none_or(|r| r.dtype() == x.dtype()) {
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        return cuda::backward(x, rstd, &w.to_dtype(x.dtype())?.contiguous()?, dy, residual.as_ref(), offset(plus_one));
    }
    let plus = |dx: Tensor| -> Result<Tensor> {
        Ok(match residual {
            Some(r) => (r + dx)?,
            None => dx,
        })
    };
    let w = &scale(w, plus_one)?;
    if let (Some(xv), Some(rv), Some(wv), Some(dyv)) = (f32_view(x), f32_view(rstd), f32_view(w), f32_view(dy)) {
        let dx = cpu::rms_norm_bwd(xv.slice(), rv.slice(), wv.slice(), dyv.slice());
        return plus(Tensor::from_vec(dx, dy.shape(), dy.device())?);
    }
    let sd = x.dtype();
    let g = dy.to_dtype(sd)?.broadcast_mul(&w.to_dtype(sd)?)?;
    let xhat = x.broadcast_mul(rstd)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(rstd)?;
    plus(dx.to_dtype(dy.dtype())?)
}
