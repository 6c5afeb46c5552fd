//! The gated MLP, `down(act(gate(x)) · up(x))` — SwiGLU (`act` = SiLU) or GeGLU with the tanh
//! GELU (Gemma) — with gate and up as two linears or Phi-3's fused `gate_up_proj` (rows: gate,
//! then up): inference, training forward and backward, and its gate op. Inference is the
//! training forward with nothing kept (its projections taking decoding's GEMV on one row).

use super::linear::{self, Linear};
use crate::kernels::glu::Activation;
use crate::model::names::Proj;
use crate::profile;
use anyhow::Result;
use candle_core::{Tensor, D};
use rand::Rng;

/// Gate and up: two linears, or one fused linear `[2·inter, hidden]` (Phi-3).
#[allow(clippy::large_enum_variant)]
pub enum GateUpProj {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

pub struct Mlp {
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
    pub act: Activation,
}

/// What the gate/up projections' backward needs.
pub enum GateUpSaved {
    Split { gate: linear::Saved, up: linear::Saved },
    Fused(linear::Saved),
}

/// What the MLP's training backward needs.
pub struct Acts {
    pub gate_up: GateUpSaved,
    pub glu: glu::Saved,
    pub down: linear::Saved,
}

impl Mlp {
    /// Inference, `x` `[..., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
            GateUpProj::Fused { gate_up_proj } => halves(&gate_up_proj.forward(x)?)?,
        };
        let (h, _) = glu::forward(g, u, self.act)?;
        self.down_proj.forward(&h)
    }

    /// Training forward on normed rows `x` `[n, hidden]`.
    pub fn forward_train(&self, x: &Tensor, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Acts)> {
        let (g, u, gate_up) = match &self.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => {
                let (g, gate) = gate_proj.forward_train(x, train, rng)?;
                let (u, up) = up_proj.forward_train(x, train, rng)?;
                (g, u, GateUpSaved::Split { gate, up })
            }
            GateUpProj::Fused { gate_up_proj } => {
                let (gu, s) = gate_up_proj.forward_train(x, train, rng)?;
                let (g, u) = halves(&gu)?;
                (g, u, GateUpSaved::Fused(s))
            }
        };
        let (h, glu) = profile::time("swiglu fwd", || glu::forward(g, u, self.act))?;
        let (y, mut down) = self.down_proj.forward_train(&h, train, rng)?;
        // down's input h = act(g)·u is not kept: backward remakes it from g and u (one
        // elementwise pass), sparing an [n, intermediate] activation per layer (1.75 GiB of a
        // 3B 4×1024 step).
        down.x = None;
        Ok((y, Acts { gate_up, glu, down }))
    }

    /// The input rows' gradient; each adapter's `(dA, dB)` goes to `push`. Takes the
    /// activations: each is freed once its last use is done (with checkpointing this backward is
    /// a 3B step's memory peak; g, u, dh, dg and du are [n, intermediate] each).
    pub fn backward(&self, s: Acts, dy: &Tensor, push: &mut impl FnMut(Proj, Option<(Tensor, Tensor)>)) -> Result<Tensor> {
        let Acts { gate_up, glu, mut down } = s;
        if self.down_proj.lora.is_some() {
            down.x = Some(profile::time("swiglu fwd", || crate::kernels::glu::forward(&glu.g, &glu.u, glu.act))?);
        }
        let (dh, gd) = self.down_proj.backward(&down, dy)?;
        drop(down);
        push(Proj::Down, gd);
        let (dg, du) = profile::time("swiglu bwd", || glu::backward(&glu, &dh))?;
        drop((glu, dh));
        match (&self.gate_up, gate_up) {
            (GateUpProj::Split { gate_proj, up_proj }, GateUpSaved::Split { gate, up }) => {
                let (dxg, gg) = gate_proj.backward(&gate, &dg)?;
                drop((gate, dg));
                push(Proj::Gate, gg);
                let (dxu, gu) = up_proj.backward(&up, &du)?;
                drop((up, du));
                push(Proj::Up, gu);
                profile::time("rms_norm+residual bwd", || crate::kernels::sum::sum(&[&dxg, &dxu]))
            }
            (GateUpProj::Fused { gate_up_proj }, GateUpSaved::Fused(saved)) => {
                let (dx, g) = gate_up_proj.backward(&saved, &Tensor::cat(&[dg, du], D::Minus1)?)?;
                push(Proj::GateUp, g);
                Ok(dx)
            }
            _ => anyhow::bail!("MLP backward: activations saved by another layout"),
        }
    }
}

/// A fused gate/up output `[..., 2·inter]` → `(gate, up)`, each contiguous.
fn halves(gu: &Tensor) -> Result<(Tensor, Tensor)> {
    let inter = gu.dim(D::Minus1)? / 2;
    Ok((gu.narrow(D::Minus1, 0, inter)?.contiguous()?, gu.narrow(D::Minus1, inter, inter)?.contiguous()?))
}

/// The gate `h = act(g) · u`.
pub mod glu {
    use crate::kernels::glu::Activation;
    use anyhow::Result;
    use candle_core::Tensor;

    pub struct Saved {
        pub g: Tensor,
        pub u: Tensor,
        pub act: Activation,
    }

    pub fn forward(g: Tensor, u: Tensor, act: Activation) -> Result<(Tensor, Saved)> {
        let h = crate::kernels::glu::forward(&g, &u, act)?;
        Ok((h, Saved { g, u, act }))
    }

    /// `dg = dh·u·act'(g)`, `du = dh·act(g)`.
    pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
        crate::kernels::glu::backward(&s.g, &s.u, dh, s.act)
    }
}

/// SwiGLU: [`glu`] with SiLU.
pub mod swiglu {
    use super::glu;
    use crate::kernels::glu::Activation;
    use anyhow::Result;
    use candle_core::Tensor;

    pub use glu::Saved;

    pub fn forward(g: Tensor, u: Tensor) -> Result<(Tensor, Saved)> {
        glu::forward(g, u, Activation::Silu)
    }

    /// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`; `dg = dh·u·silu'(g)`, `du = dh·silu(g)`.
    pub fn backward(s: &Saved, dh: &Tensor) -> Result<(Tensor, Tensor)> {
        glu::backward(s, dh)
    }
}
