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

/// What backward needs: the dropped-out input and `u = drop(x) Aᵀ` for the LoRA gradients,
/// and the dropout mask (already scaled by 1/(1−p)) to route `dx` back through dropout.
pub struct Saved {
    pub xd: Option<Tensor>,
    pub u: Option<Tensor>,
    pub mask: Option<Tensor>,
}

/// Inverted-dropout mask `[n, in]`: 0 with probability `p`, else `1/(1−p)`. The caller's RNG
/// seeds a fast generator (one draw), so masks stay a pure function of the caller's seed.
fn dropout_mask(shape: (usize, usize), p: f64, rng: &mut impl Rng, like: &Tensor) -> Result<Tensor> {
    use rand::{RngCore, SeedableRng};
    let keep = 1.0 / (1.0 - p) as f32;
    let threshold = (p * u32::MAX as f64) as u32;
    let mut fast = rand::rngs::SmallRng::seed_from_u64(rng.next_u64());
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| if fast.next_u32() < threshold { 0.0 } else { keep }).collect();
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

/// `x` `[n, in]`, `w` `[out, in]`. `train` turns dropout on (it draws from `rng`).
pub fn forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&Lora>, train: bool, rng: &mut impl Rng) -> Result<(Tensor, Saved)> {
    let mut y = x.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let Some(l) = lora else { return Ok((y, Saved { xd: None, u: None, mask: None })) };
    let mask = if train && l.dropout > 0.0 { Some(dropout_mask(x.dims2()?, l.dropout, rng, x)?) } else { None };
    let xd = match &mask {
        Some(m) => (x * m)?,
        None => x.clone(),
    };
    // The scaling goes on the small [n, r] product, not on the [n, out] output.
    let u = xd.matmul(&l.a.t()?)?;
    let y = (y + (&u * l.scaling)?.matmul(&l.b.t()?)?)?;
    Ok((y, Saved { xd: Some(xd), u: Some(u), mask }))
}

/// Returns `dx` and, with an adapter, `(dA, dB)`.
pub fn backward(s: &Saved, w: &Tensor, lora: Option<&Lora>, dy: &Tensor) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dx = dy.matmul(w)?;
    let (Some(l), Some(xd), Some(u)) = (lora, &s.xd, &s.u) else { return Ok((dx, None)) };
    let db = (dy.t()?.matmul(u)? * l.scaling)?; // [out, r]
    let du = (dy.matmul(&l.b)? * l.scaling)?; // [n, r]
    let da = du.t()?.matmul(xd)?; // [r, in]
    let mut dxd = du.matmul(&l.a)?; // [n, in]
    if let Some(m) = &s.mask {
        dxd = (dxd * m)?;
    }
    Ok(((dx + dxd)?, Some((da, db))))
}
