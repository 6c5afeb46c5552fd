//! The SwiGLU MLP, `down(silu(gate(x)) · up(x))`: inference, training forward and backward, and
//! its gate op. Inference is the training forward with nothing kept (its projections taking
//! decoding's GEMV on one row).

use super::linear::{self, Linear};
use crate::model::names::Proj;
use crate::profile;
use anyhow::Result;
use candle_core::Tensor;
use rand::Rng;

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// What the MLP's training backward needs.
pub struct Acts {
    pub gate: linear::Saved,
    pub up: linear::Saved,
    pub swiglu: swiglu::Saved,
    pub down: linear::Saved,
}

impl Mlp {
    /// Inference, `x` `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, _) = swiglu::forward(self.gate_proj.forward(x)?, self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }

    /// Training forward on normed rows `x` `[n, hidden]`.
    pub fn forward_train(&self, x: &Tensor, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Acts)> {
        let (g, gate) = self.gate_proj.forward_train(x, train, rng)?;
        let (u, up) = self.up_proj.forward_train(x, train, rng)?;
        let (h, swiglu) = profile::time("swiglu fwd", || swiglu::forward(g, u))?;
        let (y, down) = self.down_proj.forward_train(&h, train, rng)?;
        Ok((y, Acts { gate, up, swiglu, down }))
    }

    /// The input rows' gradient; each adapter's `(dA, dB)` goes to `push`.
    pub fn backward(&self, s: &Acts, dy: &Tensor, push: &mut impl FnMut(Proj, Option<(Tensor, Tensor)>)) -> Result<Tensor> {
        let (dh, gd) = self.down_proj.backward(&s.down, dy)?;
        push(Proj::Down, gd);
        let (dg, du) = profile::time("swiglu bwd", || swiglu::backward(&s.swiglu, &dh))?;
        let (dxg, gg) = self.gate_proj.backward(&s.gate, &dg)?;
        push(Proj::Gate, gg);
        let (dxu, gu) = self.up_proj.backward(&s.up, &du)?;
        push(Proj::Up, gu);
        profile::time("rms_norm+residual bwd", || Ok((dxg + dxu)?))
    }
}

/// SwiGLU gate: `h = silu(g) · u`.
pub mod swiglu {
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
}
