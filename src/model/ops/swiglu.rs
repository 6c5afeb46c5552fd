//! SwiGLU gate: `h = silu(g) · u`.

use anyhow::Result;
use candle_core::Tensor;

pub struct Saved {
    pub g: Tensor,
    pub u: Tensor,
}

pub fn forward(g: Tensor, u: Tensor) -> Result<(Tensor, Saved)> {
    let h = (candle_nn::ops::silu(&g)? * &u)?;
    Ok((h, Saved { g, u }))
}

/// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`; `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(&s.g)?;
    let silu = (&s.g * &sig)?;
    let dsilu = (&sig * ((&s.g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = (dh * &s.u)?.mul(&dsilu)?;
    let du = (dh * silu)?;
    Ok((dg, du))
}
