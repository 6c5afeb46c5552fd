//! Linear layer with a frozen weight and an optional LoRA adapter (peft semantics):
//! `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`, `A` `[r, in]`, `B` `[out, r]`, `s` = lora_alpha / r
//! (or / √r with rsLoRA). Only `A` and `B` get gradients; `W` — dense or dequantized from 4 bits
//! by the caller, in forward and again in backward — never does. f32 on the CPU runs the fused
//! kernel of `kernels::lora_cpu`; other devices and dtypes the candle formulation below.

use crate::kernels::lora_cpu::{self, Dims, Dropout};
use crate::kernels::{f32_view, F32View};
use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::Rng;

/// A LoRA adapter's trainable matrices and hyper-parameters.
#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }
}

/// What backward needs for the LoRA gradients: the layer input (shared, not copied, with the
/// sibling projections reading the same activation), the dropout's seed (the mask is
/// regenerated, never stored) and `u = drop(x) Aᵀ`.
pub struct Saved {
    pub x: Option<Tensor>,
    pub dropout: Option<Dropout>,
    pub u: Option<Tensor>,
}

impl Saved {
    /// The inverted-dropout multiplier `[n, in]` (0 or 1/(1−p)), when dropout was applied.
    pub fn scaled_mask(&self, dtype: DType) -> Result<Option<Tensor>> {
        let (Some(x), Some(dr)) = (&self.x, &self.dropout) else { return Ok(None) };
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = x.device() {
            let md = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
            return Ok(Some(crate::kernels::cuda_train::dropout_mask(dev, x.dims(), md, dr)?.to_dtype(dtype)?));
        }
        let m = lora_cpu::scaled_mask(x.elem_count(), dr);
        Ok(Some(Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(dtype)?))
    }

    /// `drop(x)` as the forward used it.
    fn dropped_input(&self) -> Result<Option<Tensor>> {
        let Some(x) = &self.x else { return Ok(None) };
        Ok(Some(match self.scaled_mask(x.dtype())? {
            Some(m) => (x * m)?,
            None => x.clone(),
        }))
    }
}

/// Views of the given tensors when all are contiguous CPU f32 (the fused kernel's inputs).
fn views<'a, const N: usize>(ts: [&'a Tensor; N]) -> Option<[F32View<'a>; N]> {
    let v: Vec<F32View<'a>> = ts.iter().map(|t| f32_view(t)).collect::<Option<_>>()?;
    v.try_into().ok()
}

/// `x` `[n, in]`, `w` `[out, in]`. `train` turns dropout on (one seed drawn from `rng`).
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
    let dropout = match lora {
        Some(l) if train && l.dropout > 0.0 => {
            Some(Dropout { seed: rng.next_u64(), threshold: lora_cpu::dropout_threshold(l.dropout), scale: (1.0 / (1.0 - l.dropout)) as f32 })
        }
        _ => None,
    };
    #[cfg(feature = "cuda")]
    if let Some(l) = lora.filter(|l| crate::kernels::cuda_lora::supported(x, &l.a, &l.b)) {
        return cuda_forward(x, w, bias, l, dropout);
    }
    let (n, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let dev = x.device();
    let fused = match (views([x, w]), lora) {
        (Some([xv, wv]), None) => Some(lora_cpu::forward(Dims { n, inp, out, r: 0 }, xv.slice(), wv.slice(), None, None)),
        (Some([xv, wv]), Some(l)) => views([&l.a, &l.b]).map(|[a, b]| {
            let d = Dims { n, inp, out, r: l.rank() };
            lora_cpu::forward(d, xv.slice(), wv.slice(), Some((a.slice(), b.slice(), l.scaling as f32)), dropout.as_ref())
        }),
        _ => None,
    };
    let (mut y, saved) = match fused {
        Some((y, u)) => {
            let r = lora.map_or(0, |l| l.rank());
            let u = u.map(|u| Tensor::from_vec(u, (n, r), dev)).transpose()?;
            (Tensor::from_vec(y, (n, out), dev)?, Saved { x: lora.map(|_| x.clone()), dropout, u })
        }
        None => {
            let p = crate::profile::scope("·lin fwd base matmul");
            let y = x.matmul(&w.t()?)?;
            drop(p);
            let _p = crate::profile::scope("·lin fwd lora");
            match lora {
                None => (y, Saved { x: None, dropout: None, u: None }),
                Some(l) => {
                    let mut saved = Saved { x: Some(x.clone()), dropout, u: None };
                    let xd = saved.dropped_input()?.unwrap_or_else(|| x.clone());
                    // The scaling goes on the small [n, r] product, not on the [n, out] output.
                    let u = xd.matmul(&l.a.t()?)?;
                    let y = (y + (&u * l.scaling)?.matmul(&l.b.t()?)?)?;
                    saved.u = Some(u);
                    (y, saved)
                }
            }
        }
    };
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok((y, saved))
}

/// Returns `dx` and, with an adapter, `(dA, dB)`.
pub fn backward(s: &Saved, w: &Tensor, lora: Option<&Lora>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dy = &dy.contiguous()?;
    #[cfg(feature = "cuda")]
    if let (Some(l), Some(x), Some(u)) = (lora, &s.x, &s.u) {
        if crate::kernels::cuda_lora::supported(dy, &l.a, &l.b) {
            return cuda_backward(s.dropout.as_ref(), x, u, w, l, dy);
        }
    }
    let (n, out) = dy.dims2()?;
    let inp = w.dim(1)?;
    let dev = dy.device();
    let fused = match (views([dy, w]), lora, &s.x, &s.u) {
        (Some([dyv, wv]), None, _, _) => Some(lora_cpu::backward(Dims { n, inp, out, r: 0 }, &[], wv.slice(), None, None, dyv.slice())),
        (Some([dyv, wv]), Some(l), Some(x), Some(u)) => views([&l.a, &l.b, x, u]).map(|[a, b, x, u]| {
            let d = Dims { n, inp, out, r: l.rank() };
            lora_cpu::backward(d, x.slice(), wv.slice(), Some((a.slice(), b.slice(), l.scaling as f32, u.slice())), s.dropout.as_ref(), dyv.slice())
        }),
        _ => None,
    };
    if let Some((dx, g)) = fused {
        let r = lora.map_or(0, |l| l.rank());
        let g = match g {
            Some((da, db)) => Some((Tensor::from_vec(da, (r, inp), dev)?, Tensor::from_vec(db, (out, r), dev)?)),
            None => None,
        };
        return Ok((Tensor::from_vec(dx, (n, inp), dev)?, g));
    }
    let p = crate::profile::scope("·lin bwd base matmul");
    let dx = dy.matmul(w)?;
    drop(p);
    let _p = crate::profile::scope("·lin bwd lora");
    let (Some(l), Some(x), Some(u)) = (lora, &s.x, &s.u) else { return Ok((dx, None)) };
    // One mask for both uses: drop(x) for dA, and masking dx's LoRA term.
    let mask = s.scaled_mask(x.dtype())?;
    let xd = match &mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    let db = (dy.t()?.matmul(u)? * l.scaling)?; // [out, r]
    let du = (dy.matmul(&l.b)? * l.scaling)?; // [n, r]
    let da = du.t()?.matmul(&xd)?; // [r, in]
    let mut dxd = du.matmul(&l.a)?; // [n, in]
    if let Some(m) = &mask {
        dxd = (dxd * m)?;
    }
    Ok(((dx + dxd)?, Some((da, db))))
}

/// CUDA: cuBLAS for `x Wᵀ`, then one kernel for `u = drop(x) Aᵀ` and one adding `s·u Bᵀ`.
#[cfg(feature = "cuda")]
fn cuda_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, l: &Lora, dropout: Option<Dropout>) -> Result<(Tensor, Saved)> {
    use crate::kernels::cuda_lora::{expand, project};
    let p = crate::profile::scope("·lin fwd base matmul");
    let y = x.matmul(&w.t()?)?;
    drop(p);
    let _p = crate::profile::scope("·lin fwd lora");
    let u = project(x, &l.a, false, dropout.as_ref(), 1.0)?;
    let mut y = expand(&y, &u, &l.b, false, None, l.scaling as f32)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok((y, Saved { x: Some(x.clone()), dropout, u: Some(u) }))
}

/// CUDA: cuBLAS for `dy W`; kernels for `du = s·dy B`, `dx += mask ⊙ (du A)`, `dA = duᵀ drop(x)`
/// and `dB = s·dyᵀ u`.
#[cfg(feature = "cuda")]
fn cuda_backward(dropout: Option<&Dropout>, x: &Tensor, u: &Tensor, w: &Tensor, l: &Lora, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    use crate::kernels::cuda_lora::{expand, grad, project};
    let p = crate::profile::scope("·lin bwd base matmul");
    let dx = dy.matmul(w)?;
    drop(p);
    let _p = crate::profile::scope("·lin bwd lora");
    let s = l.scaling as f32;
    let du = project(dy, &l.b, true, None, s)?;
    let dx = expand(&dx, &du, &l.a, true, dropout, 1.0)?;
    // f32, as the kernels sum them: the optimizer's master weights are f32 (no round trip
    // through the adapters' dtype).
    let da = grad(&du, x, dropout, 1.0, false)?;
    let db = grad(u, dy, None, s, true)?;
    Ok((dx, Some((da, db))))
}
