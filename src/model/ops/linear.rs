//! Linear layer with a frozen weight and an optional LoRA adapter (peft semantics):
//! `y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`, `A` `[r, in]`, `B` `[out, r]`, `s` = lora_alpha / r
//! (or / √r with rsLoRA). Only `A` and `B` get gradients; `W` — dense or dequantized from 4 bits
//! by the caller, in forward and again in backward — never does.

use anyhow::Result;
use candle_core::Tensor;
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
/// sibling projections reading the same activation), the dropout mask as one byte per element
/// (a quarter of an f32 mask; the dropped input is recomputed from it) and `u = drop(x) Aᵀ`.
pub struct Saved {
    pub x: Option<Tensor>,
    /// 1 = kept, 0 = dropped; kept values are scaled by `keep_scale` = 1/(1−p).
    pub mask: Option<Tensor>,
    pub keep_scale: f64,
    pub u: Option<Tensor>,
}

impl Saved {
    /// The inverted-dropout multiplier `[n, in]` (0 or 1/(1−p)), when dropout was applied.
    pub fn scaled_mask(&self, dtype: candle_core::DType) -> Result<Option<Tensor>> {
        Ok(match &self.mask {
            Some(m) => Some((m.to_dtype(dtype)? * self.keep_scale)?),
            None => None,
        })
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

/// Dropout keep-mask `[n, in]` as bytes: 0 with probability `p`, else 1. The caller's RNG seeds
/// a fast generator (one draw), so masks stay a pure function of the caller's seed.
fn dropout_mask(shape: (usize, usize), p: f64, rng: &mut impl Rng, like: &Tensor) -> Result<Tensor> {
    use rand::{RngCore, SeedableRng};
    let threshold = (p * u32::MAX as f64) as u32;
    let mut fast = rand::rngs::SmallRng::seed_from_u64(rng.next_u64());
    let v: Vec<u8> = (0..shape.0 * shape.1).map(|_| (fast.next_u32() >= threshold) as u8).collect();
    Ok(Tensor::from_vec(v, shape, like.device())?)
}

/// `x` `[n, in]`, `w` `[out, in]`. `train` turns dropout on (it draws from `rng`).
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
    let mut y = x.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let Some(l) = lora else { return Ok((y, Saved { x: None, mask: None, keep_scale: 1.0, u: None })) };
    let mask = if train && l.dropout > 0.0 { Some(dropout_mask(x.dims2()?, l.dropout, rng, x)?) } else { None };
    let mut saved = Saved { x: Some(x.clone()), mask, keep_scale: 1.0 / (1.0 - l.dropout), u: None };
    let xd = saved.dropped_input()?.unwrap_or_else(|| x.clone());
    // The scaling goes on the small [n, r] product, not on the [n, out] output.
    let u = xd.matmul(&l.a.t()?)?;
    let y = (y + (&u * l.scaling)?.matmul(&l.b.t()?)?)?;
    saved.u = Some(u);
    Ok((y, saved))
}

/// Returns `dx` and, with an adapter, `(dA, dB)`.
pub fn backward(s: &Saved, w: &Tensor, lora: Option<&Lora>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dx = dy.matmul(w)?;
    let (Some(l), Some(xd), Some(u)) = (lora, s.dropped_input()?, &s.u) else { return Ok((dx, None)) };
    let db = (dy.t()?.matmul(u)? * l.scaling)?; // [out, r]
    let du = (dy.matmul(&l.b)? * l.scaling)?; // [n, r]
    let da = du.t()?.matmul(&xd)?; // [r, in]
    let mut dxd = du.matmul(&l.a)?; // [n, in]
    if let Some(m) = s.scaled_mask(dxd.dtype())? {
        dxd = (dxd * m)?;
    }
    Ok(((dx + dxd)?, Some((da, db))))
}
