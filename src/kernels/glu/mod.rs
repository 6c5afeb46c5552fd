//! Gated activations of a gated MLP, `h = act(g)·u`: SwiGLU (`act` = SiLU, Llama, Qwen,
//! Mistral, Phi-3) and GeGLU with the tanh GELU (`gelu_pytorch_tanh`, Gemma). Dispatch order:
//! the CUDA kernel (f32, bf16), the CPU kernel (contiguous f32), candle's ops (GeGLU's in the
//! statistics dtype, then cast) — for both activations.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{cuda_float, f32_view, stat_dtype};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// The gate's activation (config.json's `hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (= swish).
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_tanh` / `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluTanh,
}

impl Activation {
    /// transformers' name of the activation (`ACT2FN` keys).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => Activation::GeluTanh,
            other => bail!("unsupported activation \"{other}\" (supported: silu, gelu_pytorch_tanh)"),
        })
    }

    /// The kernels' name of the gate (swiglu.cu's `<gate>_fwd_*`, `<gate>_bwd_*`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn gate(self) -> &'static str {
        match self {
            Activation::Silu => "swiglu",
            Activation::GeluTanh => "geglu",
        }
    }
}

/// `act(g)·u` as a candle op, forward only: the CPU kernels (f32) and the CUDA kernels (f32,
/// bf16); both inputs contiguous, of one shape and dtype.
pub struct Glu(pub Activation);

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Silu => "swiglu",
            Activation::GeluTanh => "geglu",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (s1, s2) else { candle_core::bail!("{} on the CPU: f32 only", self.name()) };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("{}: inputs must be contiguous", self.name())
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: shapes {:?} and {:?} differ", self.name(), l1.shape(), l2.shape())
        }
        let h = match self.0 {
            Activation::Silu => cpu::swiglu_fwd(&g[a1..b1], &u[a2..b2]),
            Activation::GeluTanh => cpu::geglu_fwd(&g[a1..b1], &u[a2..b2]),
        };
        Ok((CpuStorage::F32(h), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: shapes {:?} and {:?} differ", self.name(), l1.shape(), l2.shape())
        }
        Ok((cuda::forward(self.0.gate(), s1, l1, s2, l2).map_err(super::launch::candle_err)?, l1.shape().clone()))
    }
}

/// Training forward `act(g)·u` (same shape and dtype).
pub fn forward(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if cuda_float(g) || (f32_view(g).is_some() && f32_view(u).is_some()) {
        return Ok(g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &Glu(act))?);
    }
    match act {
        Activation::Silu => Ok((candle_nn::ops::silu(g)? * u)?),
        Activation::GeluTanh => {
            let sd = stat_dtype(g.dtype());
            let (gf, uf) = (g.to_dtype(sd)?, u.to_dtype(sd)?);
            Ok((gelu_tanh(&gf)?.0 * uf)?.to_dtype(g.dtype())?)
        }
    }
}

/// Backward: `dg = dh·u·act'(g)`, `du = dh·act(g)`.
pub fn backward(g: &Tensor, u: &Tensor, dh: &Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    let dh = &dh.contiguous()?;
    #[cfg(feature = "cuda")]
    if cuda_float(g) {
        return cuda::backward(act.gate(), &g.contiguous()?, &u.contiguous()?, dh);
    }
    if let (Some(gv), Some(uv), Some(dhv)) = (f32_view(g), f32_view(u), f32_view(dh)) {
        let (dg, du) = match act {
            Activation::Silu => cpu::swiglu_bwd(gv.slice(), uv.slice(), dhv.slice()),
            Activation::GeluTanh => cpu::geglu_bwd(gv.slice(), uv.slice(), dhv.slice()),
        };
        return Ok((Tensor::from_vec(dg, g.shape(), g.device())?, Tensor::from_vec(du, g.shape(), g.device())?));
    }
    match act {
        Activation::Silu => silu_backward(g, u, dh),
        Activation::GeluTanh => {
            let sd = stat_dtype(g.dtype());
            let (gf, uf, dhf) = (g.to_dtype(sd)?, u.to_dtype(sd)?, dh.to_dtype(sd)?);
            let (a, da) = gelu_tanh(&gf)?;
            let dg = (&dhf * uf)?.mul(&da)?;
            let du = (dhf * a)?;
            Ok((dg.to_dtype(g.dtype())?, du.to_dtype(u.dtype())?))
        }
    }
}

/// `(gelu_tanh(x), gelu_tanh'(x))` in `x`'s dtype: with `z = √(2/π)·(x + 0.044715·x³)`,
/// `t = tanh z`, `gelu = 0.5·x·(1 + t)`, `gelu' = 0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)`.
fn gelu_tanh(x: &Tensor) -> Result<(Tensor, Tensor)> {
    const C: f64 = 0.044715;
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let x2 = x.sqr()?;
    let t = ((x * ((&x2 * C)? + 1.0)?)? * k)?.tanh()?;
    let one_t = (&t + 1.0)?;
    let y = ((x * &one_t)? * 0.5)?;
    let sech2 = (1.0 - t.sqr()?)?;
    let dz = (((&x2 * (3.0 * C))? + 1.0)? * k)?;
    let dy = ((one_t * 0.5)? + ((x * sech2)?.mul(&dz)? * 0.5)?)?;
    Ok((y, dy))
}

/// candle's `dg = dh·u·silu'(g)`, `du = dh·silu(g)` with `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
fn silu_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let dsilu = (&sig * ((g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = (dh * u)?.mul(&dsilu)?;
    let du = (dh * silu)?;
    Ok((dg, du))
}
