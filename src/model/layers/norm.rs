//! RMSNorm: `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` over the last dim. Statistics in
//! f32 (as transformers). The norm weight is frozen, so backward returns only `dx`. Inference
//! is the training forward with nothing kept.

use anyhow::Result;
use candle_core::Tensor;

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// Inference: the training forward, its saved activations dropped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        forward(x, &self.weight, self.eps)
    }

    pub fn backward(&self, s: &Saved, dy: &Tensor) -> Result<Tensor> {
        backward(s, &self.weight, dy)
    }
}

/// What backward needs: the input and the per-row reciprocal RMS.
pub struct Saved {
    pub x: Tensor,
    pub rstd: Tensor,
}

pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Saved)> {
    let (y, x, rstd) = crate::kernels::norm::forward(x, w, eps)?;
    Ok((y, Saved { x, rstd }))
}

/// `dx = rstd · (g − x̂ · mean(g · x̂))` with `g = dy · w`, `x̂ = x · rstd`.
pub fn backward(s: &Saved, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    crate::kernels::norm::backward(&s.x, &s.rstd, w, dy)
}
