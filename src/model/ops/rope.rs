//! Rotary position embedding (HF rotate-half layout) with per-token positions, so packed rows
//! restart positions per example. Backward is the inverse rotation: the same op with `-sin`.

use anyhow::Result;
use candle_core::Tensor;

/// cos/sin tables gathered at `positions` `[b, t]` (u32) from `[max_pos, d/2]` tables → `[b, t, d/2]`.
pub fn gather(cos: &Tensor, sin: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t) = positions.dims2()?;
    let flat = positions.flatten_all()?;
    let half = cos.dim(1)?;
    Ok((
        cos.index_select(&flat, 0)?.reshape((b, t, half))?,
        sin.index_select(&flat, 0)?.reshape((b, t, half))?,
    ))
}

/// Rotate `x` `[b, heads, t, d]`; nothing needs saving beyond the tables.
pub fn forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
}

/// The rotation is orthogonal: its transpose rotates by the opposite angle.
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&dy.contiguous()?, cos, &sin.neg()?)?)
}
