//! The LoRA linear `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ` (peft semantics) with a frozen `W`,
//! forward and backward, and its inverted dropout (a keyed hash of the element index: the same
//! mask on every device, regenerated from the seed, never stored). Dispatch order: the CUDA
//! kernels around cuBLAS's two big matmuls (f32, bf16, rank ≤ 32), the fused CPU kernel
//! (contiguous f32), candle's ops as the reference.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

pub use cpu::{dropout_bits, dropout_threshold, Dropout};

use super::{f32_view, F32View};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A LoRA adapter as the kernels take it: `A` `[r, in]`, `B` `[out, r]`, and the scale `s`.
#[derive(Clone, Copy)]
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
}

/// The scaled dropout keep-mask (0 or `1/(1−p)`) over the input's shape as a candle op: f32
/// from the CPU kernel, bf16 (with `bf16`) or f32 from the CUDA one.
pub struct DropoutMask {
    pub dropout: Dropout,
    pub bf16: bool,
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(&self, _: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(cpu::scaled_mask(layout.shape().elem_count(), &self.dropout)), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let m = cuda::dropout_mask(&s.device, layout.shape().elem_count(), self.bf16, &self.dropout).map_err(super::launch::candle_err)?;
        Ok((m, layout.shape().clone()))
    }
}

/// The inverted-dropout multiplier over `x`'s shape and device, in `dtype`.
pub fn dropout_mask(x: &Tensor, dropout: &Dropout, dtype: DType) -> Result<Tensor> {
    Ok(x.apply_op1_no_bwd(&DropoutMask { dropout: *dropout, bf16: dtype == DType::BF16 })?.to_dtype(dtype)?)
}

/// Views of the given tensors when all are contiguous CPU f32 (the fused kernel's inputs).
fn views<'a, const N: usize>(ts: [&'a Tensor; N]) -> Option<[F32View<'a>; N]> {
    let v: Vec<F32View<'a>> = ts.iter().map(|t| f32_view(t)).collect::<Option<_>>()?;
    v.try_into().ok()
}

/// Forward: `x` `[n, in]`, `w` `[out, in]` → `(y [n, out], u = drop(x) Aᵀ [n, r] with an
/// adapter)`, `u` being what backward needs besides `x` and the dropout's seed.
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<Adapter>, dropout: Option<&Dropout>) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if let Some(l) = lora.filter(|l| cuda::supported(x, l)) {
        let (y, u) = cuda::linear_forward(x, w, bias, &l, dropout)?;
        return Ok((y, Some(u)));
    }
    let (mut y, u) = match cpu_forward(x, w, lora, dropout)? {
        Some(yu) => yu,
        None => candle_forward(x, w, lora, dropout)?,
    };
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok((y, u))
}

/// The fused CPU kernel's forward, when it takes these tensors.
fn cpu_forward(x: &Tensor, w: &Tensor, lora: Option<Adapter>, dropout: Option<&Dropout>) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let (n, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let fused = match (views([x, w]), lora) {
        (Some([xv, wv]), None) => Some(cpu::forward(cpu::Dims { n, inp, out, r: 0 }, xv.slice(), wv.slice(), None, None)),
        (Some([xv, wv]), Some(l)) => views([l.a, l.b]).map(|[a, b]| {
            let d = cpu::Dims { n, inp, out, r: l.a.dim(0).unwrap_or(0) };
            cpu::forward(d, xv.slice(), wv.slice(), Some((a.slice(), b.slice(), l.scaling as f32)), dropout)
        }),
        _ => None,
    };
    let Some((y, u)) = fused else { return Ok(None) };
    let r = lora.map_or(0, |l| l.a.dim(0).unwrap_or(0));
    let u = u.map(|u| Tensor::from_vec(u, (n, r), x.device())).transpose()?;
    Ok(Some((Tensor::from_vec(y, (n, out), x.device())?, u)))
}

/// candle's forward (the reference).
fn candle_forward(x: &Tensor, w: &Tensor, lora: Option<Adapter>, dropout: Option<&Dropout>) -> Result<(Tensor, Option<Tensor>)> {
    let y = crate::profile::time("·lin fwd base matmul", || x.matmul(&w.t()?))?;
    let _p = crate::profile::scope("·lin fwd lora");
    let Some(l) = lora else { return Ok((y, None)) };
    let (y, u) = add(y, x, l, dropout)?;
    Ok((y, Some(u)))
}

/// `(y + s · (drop(x) Aᵀ) Bᵀ, u = drop(x) Aᵀ)` in candle's ops: the adapter's term alone, in its
/// dtype (the scaling goes on the small `[n, r]` product).
pub fn add(y: Tensor, x: &Tensor, l: Adapter, dropout: Option<&Dropout>) -> Result<(Tensor, Tensor)> {
    let xd = match dropout {
        Some(dr) => (x * dropout_mask(x, dr, x.dtype())?)?,
        None => x.clone(),
    };
    let u = xd.matmul(&l.a.t()?)?;
    let y = (y + (&u * l.scaling)?.matmul(&l.b.t()?)?)?;
    Ok((y, u))
}

/// Backward: `dx` and, with an adapter, `(dA, dB)` (f32 from the CUDA kernels). `x`, `u` and
/// `dropout` as the forward saw and returned them.
pub fn backward(x: Option<&Tensor>, u: Option<&Tensor>, dropout: Option<&Dropout>, w: &Tensor, lora: Option<Adapter>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dy = &dy.contiguous()?;
    #[cfg(feature = "cuda")]
    if let (Some(l), Some(x), Some(u)) = (lora, x, u) {
        if cuda::supported(dy, &l) {
            let (dx, g) = cuda::linear_backward(dropout, x, u, w, &l, dy)?;
            return Ok((dx, Some(g)));
        }
    }
    if let Some(r) = cpu_backward(x, u, dropout, w, lora, dy)? {
        return Ok(r);
    }
    let dx = crate::profile::time("·lin bwd base matmul", || dy.matmul(w))?;
    let _p = crate::profile::scope("·lin bwd lora");
    let (Some(l), Some(x), Some(u)) = (lora, x, u) else { return Ok((dx, None)) };
    let (dx, g) = add_backward(dx, x, u, dropout, l, dy)?;
    Ok((dx, Some(g)))
}

/// The backward of [`add`] in candle's ops: `dx` plus the term's input gradient, and `(dA, dB)`
/// (`dy` contiguous).
pub fn add_backward(dx: Tensor, x: &Tensor, u: &Tensor, dropout: Option<&Dropout>, l: Adapter, dy: &Tensor) -> Result<(Tensor, (Tensor, Tensor))> {
    // One mask for both uses: drop(x) for dA, and masking dx's LoRA term.
    let mask = dropout.map(|dr| dropout_mask(x, dr, x.dtype())).transpose()?;
    let xd = match &mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let db = (dy.t()?.matmul(u)? * l.scaling)?; // [out, r]
    let du = (dy.matmul(l.b)? * l.scaling)?; // [n, r]
    let da = du.t()?.matmul(&xd)?; // [r, in]
    let mut dxd = du.matmul(l.a)?; // [n, in]
    if let Some(m) = &mask {
        dxd = (dxd * m)?;
    }
    Ok(((dx + dxd)?, (da, db)))
}

/// The fused CPU kernel's backward, when it takes these tensors.
#[allow(clippy::type_complexity)]
fn cpu_backward(x: Option<&Tensor>, u: Option<&Tensor>, dropout: Option<&Dropout>, w: &Tensor, lora: Option<Adapter>, dy: &Tensor) -> Result<Option<(Tensor, Option<(Tensor, Tensor)>)>> {
    let (n, out) = dy.dims2()?;
    let inp = w.dim(1)?;
    let fused = match (views([dy, w]), lora, x, u) {
        (Some([dyv, wv]), None, _, _) => Some(cpu::backward(cpu::Dims { n, inp, out, r: 0 }, &[], wv.slice(), None, None, dyv.slice())),
        (Some([dyv, wv]), Some(l), Some(x), Some(u)) => views([l.a, l.b, x, u]).map(|[a, b, x, u]| {
            let d = cpu::Dims { n, inp, out, r: l.a.dim(0).unwrap_or(0) };
            cpu::backward(d, x.slice(), wv.slice(), Some((a.slice(), b.slice(), l.scaling as f32, u.slice())), dropout, dyv.slice())
        }),
        _ => None,
    };
    let Some((dx, g)) = fused else { return Ok(None) };
    let r = lora.map_or(0, |l| l.a.dim(0).unwrap_or(0));
    let dev = dy.device();
    let g = match g {
        Some((da, db)) => Some((Tensor::from_vec(da, (r, inp), dev)?, Tensor::from_vec(db, (out, r), dev)?)),
        None => None,
    };
    Ok(Some((Tensor::from_vec(dx, (n, inp), dev)?, g)))
}
