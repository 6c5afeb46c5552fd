//! RMSNorm: `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` over the last dim. Statistics in
//! f32 (as transformers). The norm weight is frozen, so backward returns only `dx`. Inference
//! is the training forward with nothing kept.

use anyhow::Result;
use crate::kernels::{f32_view, train_cpu};
use candle_core::{Tensor, D};

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// Inference: the training forward, its saved activations dropped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        forward(x, &self.weight, self.eps)
    }

    pub fn backward(&self, s: &Saved, dy: &Tensor) -> Result<Tensor> {
        backward(s, &self.weight, dy)
    }
}

/// What backward needs: the input and the per-row reciprocal RMS.
pub struct Saved {
    pub x: Tensor,
    pub rstd: Tensor,
}

pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Saved)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        let x = x.contiguous()?;
        let (y, rstd) = crate::kernels::cuda_train::rms_norm_fwd(&x, &w.to_dtype(x.dtype())?.contiguous()?, eps as f32)?;
        return Ok((y, Saved { x, rstd }));
    }
    if let (Some(xv), Some(wv)) = (f32_view(x), f32_view(w)) {
        let (y, rstd) = train_cpu::rms_norm_fwd(xv.slice(), wv.slice(), eps as f32);
        let rows = rstd.len();
        let y = Tensor::from_vec(y, x.shape(), x.device())?;
        return Ok((y, Saved { x: x.clone(), rstd: Tensor::from_vec(rstd, (rows, 1), x.device())? }));
    }
    let sd = super::stat_dtype(x.dtype());
    let xf = x.to_dtype(sd)?;
    let rstd = ((xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip())?;
    let y = xf.broadcast_mul(&rstd)?.broadcast_mul(&w.to_dtype(sd)?)?.to_dtype(x.dtype())?;
    Ok((y, Saved { x: xf, rstd }))
}

/// `dx = rstd · (g − x̂ · mean(g · x̂))` with `g = dy · w`, `x̂ = x · rstd`.
pub fn backward(s: &Saved, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dy = &dy.contiguous()?;
    #[cfg(feature = "cuda")]
    if s.x.device().is_cuda() && matches!(s.x.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) && dy.dtype() == s.x.dtype() {
        return crate::kernels::cuda_train::rms_norm_bwd(&s.x, &s.rstd, &w.to_dtype(s.x.dtype())?.contiguous()?, dy);
    }
    if let (Some(xv), Some(rv), Some(wv), Some(dyv)) = (f32_view(&s.x), f32_view(&s.rstd), f32_view(w), f32_view(dy)) {
        let dx = train_cpu::rms_norm_bwd(xv.slice(), rv.slice(), wv.slice(), dyv.slice());
        return Ok(Tensor::from_vec(dx, dy.shape(), dy.device())?);
    }
    let sd = s.x.dtype();
    let g = dy.to_dtype(sd)?.broadcast_mul(&w.to_dtype(sd)?)?;
    let xhat = s.x.broadcast_mul(&s.rstd)?;
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&s.rstd)?;
    Ok(dx.to_dtype(dy.dtype())?)
}
