//! SwiGLU `h = silu(g)·u` (the gate of a gated MLP; GeGLU would sit beside it). Dispatch order:
//! the CUDA kernel (f32, bf16), the CPU kernel (contiguous f32), candle's ops.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{cuda_float, f32_view};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// `silu(g)·u` as a candle op, forward only: the CPU kernel (f32) and the CUDA kernel (f32,
/// bf16); both inputs contiguous, of one shape and dtype.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (s1, s2) else { candle_core::bail!("swiglu on the CPU: f32 only") };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("swiglu: inputs must be contiguous")
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        Ok((CpuStorage::F32(cpu::swiglu_fwd(&g[a1..b1], &u[a2..b2])), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        Ok((cuda::forward("swiglu", s1, l1, s2, l2).map_err(super::launch::candle_err)?, l1.shape().clone()))
    }
}

/// Training forward `silu(g)·u` (same shape and dtype).
pub fn forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if cuda_float(g) || (f32_view(g).is_some() && f32_view(u).is_some()) {
        return Ok(g.contiguous()?.apply_op2_no_bwd(&u.contiguous()?, &SwiGlu)?);
    }
    Ok((candle_nn::ops::silu(g)? * u)?)
}

/// Backward: `dg = dh·u·silu'(g)`, `du = dh·silu(g)` with `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
pub fn backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let dh = &dh.contiguous()?;
    #[cfg(feature = "cuda")]
    if cuda_float(g) {
        return cuda::backward("swiglu", &g.contiguous()?, &u.contiguous()?, dh);
    }
    if let (Some(gv), Some(uv), Some(dhv)) = (f32_view(g), f32_view(u), f32_view(dh)) {
        let (dg, du) = cpu::swiglu_bwd(gv.slice(), uv.slice(), dhv.slice());
        return Ok((Tensor::from_vec(dg, g.shape(), g.device())?, Tensor::from_vec(du, g.shape(), g.device())?));
    }
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let dsilu = (&sig * ((g * (1.0 - &sig)?)? + 1.0)?)?;
    let dg = (dh * u)?.mul(&dsilu)?;
    let du = (dh * silu)?;
    Ok((dg, du))
}
