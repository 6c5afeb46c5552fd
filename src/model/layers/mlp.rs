//! SwiGLU gate: `h = silu(g) · u`.

use anyhow::Result;
use crate::kernels::{f32_view, train_cpu};
use candle_core::Tensor;

pub struct Saved {
    pub g: Tensor,
    pub u: Tensor,
}

pub fn forward(g: Tensor, u: Tensor) -> Result<(Tensor, Saved)> {
    let fused = match (f32_view(&g), f32_view(&u)) {
        (Some(gv), Some(uv)) => Some(train_cpu::swiglu_fwd(gv.slice(), uv.slice())),
        _ => None,
    };
    if let Some(h) = fused {
        let h = Tensor::from_vec(h, g.shape(), g.device())?;
        return Ok((h, Saved { g, u }));
    }
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() && matches!(g.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        let (g, u) = (g.contiguous()?, u.contiguous()?);
        let h = crate::kernels::cuda_train::swiglu_fwd(&g, &u)?;
        return Ok((h, Saved { g, u }));
    }
    let h = (candle_nn::ops::silu(&g)? * &u)?;
    Ok((h, Saved { g, u }))
}

/// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`; `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let dh = &dh.contiguous()?;
    if let (Some(gv), Some(uv), Some(dhv)) = (f32_view(&s.g), f32_view(&s.u), f32_view(dh)) {
        let (dg, du) = train_cpu::swiglu_bwd(gv.slice(), uv.slice(), dhv.slice());
        return Ok((Tensor::from_vec(dg, s.g.shape(), s.g.device())?, Tensor::from_vec(du, s.g.shape(), s.g.device())?));
    }
    #[cfg(feature = "cuda")]
    if s.g.device().is_cuda() && matches!(s.g.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) {
        return crate::kernels::cuda_train::swiglu_bwd(&s.g, &s.u, dh);
    }
    let sig = candle_nn::ops::sigmoid(&s.g)?;
    let silu = (&s.g * &sig)?;
    let dsilu = (&sig * ((&s.g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = (dh * &s.u)?.mul(&dsilu)?;
    let du = (dh * silu)?;
    Ok((dg, du))
}
