//! Linear layer with a frozen weight and an optional LoRA adapter (peft semantics):
//! `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`, `A` `[r, in]`, `B` `[out, r]`, `s` = lora_alpha / r
//! (or / √r with rsLoRA). Only `A` and `B` get gradients; `W` — dense or dequantized from 4 bits
//! by the caller, in forward and again in backward — never does. The arithmetic is
//! `kernels::lora`'s (CUDA kernels, the fused CPU kernel, candle's ops).

use crate::kernels::lora::{Adapter, Dropout};
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

/// The adapter as the kernels take it.
fn adapter(l: &Lora) -> Adapter<'_> {
    Adapter { a: &l.a, b: &l.b, scaling: l.scaling }
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
        Ok(Some(crate::kernels::lora::dropout_mask(x, dr, dtype)?))
    }
}

/// `x` `[n, in]`, `w` `[out, in]`. `train` turns dropout on (one seed drawn from `rng`).
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
    let dropout = match lora {
        Some(l) if train && l.dropout > 0.0 => {
            Some(Dropout { seed: rng.next_u64(), threshold: crate::kernels::lora::dropout_threshold(l.dropout), scale: (1.0 / (1.0 - l.dropout)) as f32 })
        }
        _ => None,
    };
    let (y, u) = crate::kernels::lora::forward(x, w, bias, lora.map(adapter), dropout.as_ref())?;
    Ok((y, Saved { x: lora.map(|_| x.clone()), dropout, u }))
}

/// Returns `dx` and, with an adapter, `(dA, dB)`.
pub fn backward(s: &Saved, w: &Tensor, lora: Option<&Lora>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    crate::kernels::lora::backward(s.x.as_ref(), s.u.as_ref(), s.dropout.as_ref(), w, lora.map(adapter), dy)
}
