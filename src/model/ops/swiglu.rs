//! SwiGLU gate: `h = silu(g) · u`.

use anyhow::Result;
use candle_core::Tensor;

pub struct Saved {
    pub g: Tensor,
    pub u: Tensor,
}

pub fn forward(g: Tensor, u: Tensor) -> Result<(Tensor, Saved)> {
    let h = crate::kernels::swiglu::forward(&g, &u)?;
    Ok((h, Saved { g, u }))
}

/// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`; `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    crate::kernels::swiglu::backward(&s.g, &s.u, dh)
}
