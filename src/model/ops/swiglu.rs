//! SwiGLU gate: `h = silu(g) · u`.

use anyhow::Result;
use candle_core::Tensor;

pub struct Saved {
    pub g: Tensor,
    pub u: Tensor,
}

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

pub fn forward(g: Tensor, u: Tensor) -> Result<(Tensor, Saved)> {
    if cpu_f32(&g) {
        let h = crate::kernels::train_cpu::swiglu_fwd(&flat(&g)?, &flat(&u)?);
        let h = Tensor::from_vec(h, g.shape(), g.device())?;
        return Ok((h, Saved { g, u }));
    }
    let h = (candle_nn::ops::silu(&g)? * &u)?;
    Ok((h, Saved { g, u }))
}

/// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`; `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if cpu_f32(&s.g) {
        let (dg, du) = crate::kernels::train_cpu::swiglu_bwd(&flat(&s.g)?, &flat(&s.u)?, &flat(dh)?);
        return Ok((Tensor::from_vec(dg, s.g.shape(), s.g.device())?, Tensor::from_vec(du, s.g.shape(), s.g.device())?));
    }
    let sig = candle_nn::ops::sigmoid(&s.g)?;
    let silu = (&s.g * &sig)?;
    let dsilu = (&sig * ((&s.g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = (dh * &s.u)?.mul(&dsilu)?;
    let du = (dh * silu)?;
    Ok((dg, du))
}
