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
//! in the adapter's dtype, as peft. The arithmetic is `kernels::lora`'s (CUDA kernels, the
//! fused CPU kernel, candle's ops).

use crate::kernels::lora::{Adapter, Dropout};
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

/// The frozen weight of a [`Linear`]: dense, or bitsandbytes 4-bit (packed codes + statistics).
/// A 4-bit weight is dequantized on every use and never cached, so memory stays at 4 bits.
// With `cuda`, `Device::Cuda` alone is large; a Weight exists once per layer.
#[allow(clippy::large_enum_variant)]
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
        gpu: crate::kernels::quant4::DeviceCopy,
    },
}

impl Weight {
    /// A 4-bit weight dequantized to bnb's compute dtype on its device (`None` if dense): on the
    /// GPU from its device copy, else on the CPU and then moved.
    fn dequantize4(&self) -> Result<Option<Tensor>> {
        let Weight::Quant4 { q, bnb_compute_dtype, device, gpu, .. } = self else { return Ok(None) };
        Ok(Some(crate::kernels::quant4::dequantize(q, gpu, *bnb_compute_dtype, device)?))
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
        let gpu = crate::kernels::quant4::upload(&q, device)?;
        let weight = Weight::Quant4 { q, bnb_compute_dtype, dtype, device: device.clone(), gpu };
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
        let Some(l) = &self.lora else { return Ok((y, Saved::default())) };
        let (y, u) = crate::kernels::lora::add(y, x, adapter(l), dropout.as_ref())?;
        Ok((y, Saved { x: Some(x.clone()), dropout, u: Some(u) }))
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
        let (Some(l), Some(x), Some(u)) = (&self.lora, &s.x, &s.u) else { return Ok((dx, None)) };
        let (dx, g) = crate::kernels::lora::add_backward(dx, x, u, s.dropout.as_ref(), adapter(l), &dy.contiguous()?)?;
        Ok((dx, Some(g)))
    }

    /// The GEMV's `x Wᵀ` completed as the training forward completes the product: the LoRA
    /// term (no dropout), then the bias.
    fn finish_gemv(&self, xw: Tensor, x: &Tensor) -> Result<Tensor> {
        let y = match &self.lora {
            Some(l) => crate::kernels::lora::add(xw, x, adapter(l), None)?.0,
            None => xw,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// Batch-1 fast path (decoding): the GEMV kernels' `x Wᵀ` where one takes this weight (f32 on
    /// the CPU, a 4-bit weight computing in f32 there or on the GPU), else `None`.
    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match &self.weight {
            Weight::Dense(w) => crate::kernels::gemv::dense(x, w),
            Weight::Quant4 { q, bnb_compute_dtype, device, gpu, .. } => crate::kernels::gemv::quant4(x, q, gpu, *bnb_compute_dtype, device),
        }
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

/// The adapter as the kernels take it.
fn adapter(l: &Lora) -> Adapter<'_> {
    Adapter { a: &l.a, b: &l.b, scaling: l.scaling }
}

impl Saved {
    /// These activations with the layer input `x` put back (a caller that dropped it to save
    /// memory and remade it for backward).
    pub fn with_input(&self, x: Option<Tensor>) -> Saved {
        Saved { x: x.or_else(|| self.x.clone()), dropout: self.dropout, u: self.u.clone() }
    }

    /// The inverted-dropout multiplier `[n, in]` (0 or 1/(1−p)), when dropout was applied.
    pub fn scaled_mask(&self, dtype: DType) -> Result<Option<Tensor>> {
        let (Some(x), Some(dr)) = (&self.x, &self.dropout) else { return Ok(None) };
        Ok(Some(crate::kernels::lora::dropout_mask(x, dr, dtype)?))
    }
}

/// `x` `[n, in]`, `w` `[out, in]`. `train` turns dropout on (one seed drawn from `rng`).
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
    product(x, w, bias, lora, draw_dropout(lora, train, rng))
}

/// The adapter's dropout for one forward: with `train` and a rate, one seed drawn from `rng`.
fn draw_dropout(lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Option<Dropout> {
    match lora {
        Some(l) if train && l.dropout > 0.0 => {
            Some(Dropout { seed: rng.next_u64(), threshold: crate::kernels::lora::dropout_threshold(l.dropout), scale: (1.0 / (1.0 - l.dropout)) as f32 })
        }
        _ => None,
    }
}

/// [`forward`] with the dropout drawn (`w` in `x`'s dtype).
fn product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, dropout: Option<Dropout>) -> Result<(Tensor, Saved)> {
    let (y, u) = crate::kernels::lora::forward(x, w, bias, lora.map(adapter), dropout.as_ref())?;
    Ok((y, Saved { x: lora.map(|_| x.clone()), dropout, u }))
}

/// Returns `dx` and, with an adapter, `(dA, dB)`.
pub fn backward(s: &Saved, w: &Tensor, lora: Option<&Lora>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    crate::kernels::lora::backward(s.x.as_ref(), s.u.as_ref(), s.dropout.as_ref(), w, lora.map(adapter), dy)
}
