//! RMSNorm: `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` over the last dim, and Gemma's
//! variant `y = x · rstd · (1 + w)` (`plus_one`, the product in f32, then cast). Statistics in
//! f32 (as transformers). The norm weight is frozen, so backward returns only `dx`. Inference
//! is the training forward with nothing kept. The weight is stored as the checkpoint has it
//! (Gemma's `w`, not `1 + w`), so saving writes it back unchanged.

use anyhow::Result;
use candle_core::Tensor;

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma's `(1 + w)`.
    pub plus_one: bool,
}

impl RmsNorm {
    /// Inference: the training forward, its saved activations dropped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        forward_with(x, &self.weight, self.eps, self.plus_one)
    }

    pub fn backward(&self, s: &Saved, dy: &Tensor) -> Result<Tensor> {
        backward(s, &self.weight, dy)
    }

    /// `residual + ` [`RmsNorm::backward`], the add fused into the kernel (a pre-norm block's
    /// input gradient: the residual path's plus the norm's).
    pub fn backward_plus(&self, s: &Saved, dy: &Tensor, residual: &Tensor) -> Result<Tensor> {
        crate::kernels::norm::backward(&s.x, &s.rstd, &self.weight, dy, s.plus_one, Some(residual))
    }

    /// The norm over each head of rows `x` `[n, heads·d]` (the weight `[d]`): Qwen3's and Gemma
    /// 3's q/k norms.
    pub fn forward_heads(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let d = self.weight.dim(0)?;
        let (y, s) = self.forward_train(&x.reshape(((), d))?)?;
        Ok((y.reshape(x.shape())?, s))
    }

    /// The backward of [`RmsNorm::forward_heads`].
    pub fn backward_heads(&self, s: &Saved, dy: &Tensor) -> Result<Tensor> {
        let d = self.weight.dim(0)?;
        Ok(self.backward(s, &dy.reshape(((), d))?)?.reshape(dy.shape())?)
    }
}

/// What backward needs: the input, the per-row reciprocal RMS and the variant.
pub struct Saved {
    pub x: Tensor,
    pub rstd: Tensor,
    pub plus_one: bool,
}

/// Llama's norm (`x̂ · w`).
pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Saved)> {
    forward_with(x, w, eps, false)
}

/// Either variant.
pub fn forward_with(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Result<(Tensor, Saved)> {
    let (y, x, rstd) = crate::kernels::norm::forward(x, w, eps, plus_one)?;
    Ok((y, Saved { x, rstd, plus_one }))
}

/// `dx = rstd · (g − x̂ · mean(g · x̂))` with `g = dy · w` (`dy · (1 + w)`), `x̂ = x · rstd`.
pub fn backward(s: &Saved, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    crate::kernels::norm::backward(&s.x, &s.rstd, w, dy, s.plus_one, None)
}
