//! The AdamW update with PyTorch's semantics (decoupled weight decay first, bias corrections,
//! eps outside the square root), in f32 with every operation rounded on its own, so that every
//! path gives the same bits. The host update runs per parameter ([`cpu::update`]); the flat
//! device state goes through [`step`]: the fused CUDA kernel, else candle's ops.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use anyhow::Result;
use candle_core::Tensor;

/// One step's constants, in f32 as the update uses them.
#[derive(Clone, Copy, Debug)]
pub struct Coeffs {
    /// `1 − lr · weight_decay`.
    pub decay: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    /// `√(1 − β2^step)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 − β1^step)`.
    pub step_size: f32,
}

impl Coeffs {
    /// The constants of (1-based) step `step` with learning rate `lr`.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, step: u64) -> Self {
        let bc1 = 1.0 - beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        Self {
            decay: (1.0 - lr * weight_decay) as f32,
            one_minus_b1: 1.0 - b1,
            b2,
            one_minus_b2: 1.0 - b2,
            eps: eps as f32,
            bc2_sqrt: bc2_sqrt as f32,
            step_size: (lr / bc1) as f32,
        }
    }
}

/// The update of flat f32 `w`, `m`, `v` (all `[n]`, on one device) with gradients `g`:
/// `(w', m', v')`, bit for bit [`cpu::update`].
pub fn step(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: &Coeffs) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return cuda::step(w, m, v, &g.contiguous()?, c);
    }
    // f32 constants passed through f64 exactly (affine casts them back to f32).
    let w = if c.decay == 1.0 { w.clone() } else { w.affine(c.decay as f64, 0.0)? };
    // m += (g - m)(1 - β1)
    let m = (m + (g - m)?.affine(c.one_minus_b1 as f64, 0.0)?)?;
    // v = v·β2 + ((1 - β2)·g)·g
    let v = (v.affine(c.b2 as f64, 0.0)? + (g.affine(c.one_minus_b2 as f64, 0.0)? * g)?)?;
    // denom = sqrt(v) / bc2_sqrt + eps (a true division, as on the host)
    let denom = v.sqrt()?.broadcast_div(&Tensor::new(c.bc2_sqrt, g.device())?)?.affine(1.0, c.eps as f64)?;
    // w -= (step_size·m) / denom
    let w = (w - (m.affine(c.step_size as f64, 0.0)? / denom)?)?;
    Ok((w, m, v))
}
