//! The SwiGLU MLP, `down(silu(gate(x)) · up(x))`: inference, training forward and backward, and
//! its gate op. Inference is the training forward with nothing kept (its projections taking
//! decoding's GEMV on one row).

use super::linear::{self, Linear};
use crate::model::engine::Proj;
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
}
