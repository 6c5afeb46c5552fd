//! A linear layer with a frozen weight — dense, or bitsandbytes 4-bit dequantized on every use
//! — and an optional LoRA adapter (peft semantics): `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`, `A`
//! `[r, in]`, `B` `[out, r]`, `s` = lora_alpha / r (or / √r with rsLoRA). Only `A` and `B` get
//! gradients; `W` never does.
//!
//! One arithmetic for training and inference: [`Linear::forward`] (inference) is
//! [`Linear::forward_train`] without dropout, except decoding's batch-1 GEMV. A 4-bit weight
//! multiplies as bitsandbytes' `Linear4bit`: the input goes to the compute dtype, the product
//! (and bias) is taken there, the output goes back to the input's dtype — and backward's
//! `dy·W` likewise, as bnb's `MatMul4Bit` (its `dy` in the compute dtype). The LoRA term stays
//! in the adapter's dtype, as peft. f32 on the CPU runs the fused kernel of
//! `kernels::lora_cpu`; CUDA its LoRA kernels; other devices and dtypes the candle formulation.

use crate::kernels::lora_cpu::{self, Dims, Dropout};
use crate::kernels::{f32_view, F32View};
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

/// The frozen weight of a [`Linear`]: dense, or bitsandbytes 4-bit (packed codes + statistics).
/// A 4-bit weight is dequantized on every use and never cached, so memory stays at 4 bits.
// With `cuda`, `Device::Cuda` alone is large; a Weight exists once per layer.
#[cfg_attr(feature = "cuda", allow(clippy::large_enum_variant))]
pub enum Weight {
    Dense(Tensor),
    Quant4 {
        /// The host copy (what checkpoints save; the CPU path dequantizes from it).
        q: crate::quant::Quantized4bit,
        /// bnb's `bnb_4bit_compute_dtype`: the dtype the weight is dequantized to and the
        /// product runs in.
        bnb_compute_dtype: DType,
        /// The dtype of the activations around the layer (and of its adapters).
        dtype: DType,
        device: Device,
        /// With `device` a GPU: the codes and statistics uploaded once (by [`Linear::new_4bit`]),
        /// so dequantization and the batch-1 GEMV run there without a host round trip.
        #[cfg(feature = "cuda")]
        gpu: Option<Box<crate::kernels::cuda::Quant4Gpu>>,
    },
}

impl Weight {
    /// A 4-bit weight dequantized to bnb's compute dtype on its device (`None` if dense): on the
    /// GPU from its device copy, else on the CPU and then moved.
    fn dequantize4(&self) -> Result<Option<Tensor>> {
        let Weight::Quant4 { q, bnb_compute_dtype, device, .. } = self else { return Ok(None) };
        #[cfg(feature = "cuda")]
        if let Weight::Quant4 { gpu: Some(g), .. } = self {
            return Ok(Some(g.dequantize(*bnb_compute_dtype)?));
        }
        Ok(Some(crate::quant::dequantize_4bit(q, *bnb_compute_dtype)?.to_device(device)?))
    }
}

/// A linear layer `y = x Wᵀ + b` (`W` is `[out, in]` as in PyTorch), plus an optional LoRA
/// adapter.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Dense(weight), bias, lora: None }
    }

    /// A 4-bit layer; `q` must hold a 2-D `[out, in]` weight.
    pub fn new_4bit(q: crate::quant::Quantized4bit, bnb_compute_dtype: DType, dtype: DType, device: &Device, bias: Option<Tensor>) -> Result<Self> {
        anyhow::ensure!(q.state.shape.len() == 2, "4-bit linear weight has shape {:?}, expected [out, in]", q.state.shape);
        #[cfg(feature = "cuda")]
        let gpu = match device {
            Device::Cuda(d) => Some(Box::new(crate::kernels::cuda::Quant4Gpu::upload(&q, d)?)),
            _ => None,
        };
        let weight = Weight::Quant4 {
            q,
            bnb_compute_dtype,
            dtype,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            gpu,
        };
        Ok(Self { weight, bias, lora: None })
    }

    /// The frozen weight as a dense tensor in the activations' dtype (merging, saving).
    /// 4-bit: dequantized now (bnb's compute dtype, then the activations' dtype), every call.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quant4 { dtype, .. } => Ok(self.product_weight()?.to_dtype(*dtype)?),
        }
    }

    /// The frozen weight as the product uses it: dense as stored; 4-bit dequantized now to bnb's
    /// compute dtype (every call: nothing of it is kept between forward and backward).
    fn product_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quant4 { .. } => Ok(self.weight.dequantize4()?.expect("4-bit")),
        }
    }

    /// The 4-bit weight, if this layer is quantized.
    pub fn quantized(&self) -> Option<&crate::quant::Quantized4bit> {
        match &self.weight {
            Weight::Quant4 { q, .. } => Some(q),
            Weight::Dense(_) => None,
        }
    }

    /// `(out, in)` of the weight.
    pub fn weight_shape(&self) -> Result<(usize, usize)> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.dims2()?),
            Weight::Quant4 { q, .. } => Ok((q.state.shape[0], q.state.shape[1])),
        }
    }

    pub fn device(&self) -> &Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            Weight::Quant4 { device, .. } => device,
        }
    }

    /// The dtype activations and adapters use with this layer.
    pub fn compute_dtype(&self) -> DType {
        match &self.weight {
            Weight::Dense(w) => w.dtype(),
            Weight::Quant4 { dtype, .. } => *dtype,
        }
    }

    /// Number of weights (a 4-bit weight counts its logical elements, as transformers does).
    pub fn num_parameters(&self) -> usize {
        let w = match &self.weight {
            Weight::Dense(w) => w.elem_count(),
            Weight::Quant4 { q, .. } => q.numel(),
        };
        w + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// Inference, `x` `[..., in]` → `[..., out]`: the training forward without dropout, except
    /// that one row (decoding) takes the batch-1 GEMV where it applies.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let inner = x.dim(D::Minus1)?;
        let rows = x.elem_count() / inner;
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().unwrap() = self.weight_shape()?.0;
        let x2 = x.reshape((rows, inner))?;
        let y = match if rows == 1 { self.gemv(&x2)? } else { None } {
            Some(xw) => self.finish_gemv(xw, &x2)?,
            None => self.forward_with(&x2, None)?.0,
        };
        Ok(y.reshape(out_shape)?)
    }

    /// Training forward, `x` `[n, in]`; `train` turns the adapter's dropout on (one seed drawn
    /// from `rng`).
    pub fn forward_train(&self, x: &Tensor, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
        self.forward_with(x, draw_dropout(self.lora.as_ref(), train, rng))
    }

    fn forward_with(&self, x: &Tensor, dropout: Option<Dropout>) -> Result<(Tensor, Saved)> {
        let w = profile::time("dequantize", || self.product_weight())?;
        let _p = profile::scope("linear+lora fwd");
        if w.dtype() == x.dtype() {
            return product(x, &w, self.bias.as_ref(), self.lora.as_ref(), dropout);
        }
        // bnb's Linear4bit: x and the bias in the compute dtype, the output back in x's dtype.
        let bias = self.bias.as_ref().map(|b| b.to_dtype(w.dtype())).transpose()?;
        let y = product(&x.to_dtype(w.dtype())?, &w, bias.as_ref(), None, None)?.0.to_dtype(x.dtype())?;
        match &self.lora {
            Some(l) => add_lora(y, x, l, dropout),
            None => Ok((y, Saved::default())),
        }
    }

    /// Returns `dx` and, with an adapter, `(dA, dB)`; a 4-bit weight is dequantized again.
    pub fn backward(&self, s: &Saved, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let w = profile::time("dequantize", || self.product_weight())?;
        let _p = profile::scope("linear+lora bwd");
        if w.dtype() == dy.dtype() {
            return backward(s, &w, self.lora.as_ref(), dy);
        }
        // bnb's MatMul4Bit: dy·W in the compute dtype, back to the activations' dtype.
        let dx = backward(&Saved::default(), &w, None, &dy.to_dtype(w.dtype())?)?.0.to_dtype(dy.dtype())?;
        match &self.lora {
            Some(l) => add_lora_grads(dx, s, l, &dy.contiguous()?),
            None => Ok((dx, None)),
        }
    }

    /// The GEMV's `x Wᵀ` completed as the training forward completes the product: the LoRA
    /// term (no dropout), then the bias.
    fn finish_gemv(&self, xw: Tensor, x: &Tensor) -> Result<Tensor> {
        let y = match &self.lora {
            Some(l) => add_lora(xw, x, l, None)?.0,
            None => xw,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// Batch-1 fast path (decoding): f32 weights on the CPU go through our GEMV kernel; a 4-bit
    /// weight with f32 compute is dequantized into a scratch vector first. A 4-bit weight on the
    /// GPU uses the fused dequantize-GEMV kernel (the weight is never materialised).
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Weight::Quant4 { gpu: Some(g), bnb_compute_dtype, .. } = &self.weight {
            // As bnb: x in the compute dtype, y back in x's dtype.
            return Ok(Some(g.gemv(&x.to_dtype(*bnb_compute_dtype)?)?.to_dtype(x.dtype())?));
        }
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let w = match &self.weight {
            Weight::Dense(w) => w,
            Weight::Quant4 { q, bnb_compute_dtype: DType::F32, device, .. } if device.is_cpu() => {
                let mut w = vec![0f32; q.numel()];
                crate::quant::dequantize_4bit_f32(q, &mut w)?;
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let mut y = vec![0f32; q.state.shape[0]];
                crate::kernels::gemv::gemv_f32(&w, &xv, &mut y);
                return Ok(Some(Tensor::from_vec(y, (1, q.state.shape[0]), x.device())?));
            }
            Weight::Quant4 { .. } => return Ok(None),
        };
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Ok(None);
        }
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else { return Ok(None) };
        let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
        let ws = &cpu.as_slice::<f32>()?[start..end];
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; w.dim(0)?];
        crate::kernels::gemv::gemv_f32(ws, &xv, &mut y);
        Ok(Some(Tensor::from_vec(y, (1, w.dim(0)?), x.device())?))
    }
}

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
#[derive(Default)]
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
    product(x, w, bias, lora, draw_dropout(lora, train, rng))
}

/// The adapter's dropout for one forward: with `train` and a rate, one seed drawn from `rng`.
fn draw_dropout(lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Option<Dropout> {
    match lora {
        Some(l) if train && l.dropout > 0.0 => {
            Some(Dropout { seed: rng.next_u64(), threshold: lora_cpu::dropout_threshold(l.dropout), scale: (1.0 / (1.0 - l.dropout)) as f32 })
        }
        _ => None,
    }
}

/// [`forward`] with the dropout drawn (`w` in `x`'s dtype).
fn product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, dropout: Option<Dropout>) -> Result<(Tensor, Saved)> {
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
            let y = profile::time("·lin fwd base matmul", || x.matmul(&w.t()?))?;
            let _p = profile::scope("·lin fwd lora");
            match lora {
                None => (y, Saved::default()),
                Some(l) => add_lora(y, x, l, dropout)?,
            }
        }
    };
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok((y, saved))
}

/// `y + s · (drop(x) Aᵀ) Bᵀ` in candle ops, and what backward needs.
fn add_lora(y: Tensor, x: &Tensor, l: &Lora, dropout: Option<Dropout>) -> Result<(Tensor, Saved)> {
    let mut saved = Saved { x: Some(x.clone()), dropout, u: None };
    let xd = saved.dropped_input()?.unwrap_or_else(|| x.clone());
    // The scaling goes on the small [n, r] product, not on the [n, out] output.
    let u = xd.matmul(&l.a.t()?)?;
    let y = (y + (&u * l.scaling)?.matmul(&l.b.t()?)?)?;
    saved.u = Some(u);
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
    let dx = profile::time("·lin bwd base matmul", || dy.matmul(w))?;
    let _p = profile::scope("·lin bwd lora");
    match lora {
        Some(l) => add_lora_grads(dx, s, l, dy),
        None => Ok((dx, None)),
    }
}

/// `dx` plus the LoRA term's input gradient, and `(dA, dB)`, in candle ops (`dy` contiguous).
fn add_lora_grads(dx: Tensor, s: &Saved, l: &Lora, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (Some(x), Some(u)) = (&s.x, &s.u) else { return Ok((dx, None)) };
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
    let y = profile::time("·lin fwd base matmul", || x.matmul(&w.t()?))?;
    let _p = profile::scope("·lin fwd lora");
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
    let dx = profile::time("·lin bwd base matmul", || dy.matmul(w))?;
    let _p = profile::scope("·lin bwd lora");
    let s = l.scaling as f32;
    let du = project(dy, &l.b, true, None, s)?;
    let dx = expand(&dx, &du, &l.a, true, dropout, 1.0)?;
    // f32, as the kernels sum them: the optimizer's master weights are f32 (no round trip
    // through the adapters' dtype).
    let da = grad(&du, x, dropout, 1.0, false)?;
    let db = grad(u, dy, None, s, true)?;
    Ok((dx, Some((da, db))))
}
