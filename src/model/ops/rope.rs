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
    crate::kernels::rope::rotate(x, cos, sin)
}

/// The rotation is orthogonal: its transpose rotates by the opposite angle.
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::kernels::rope::rotate_back(dy, cos, sin)
}

/// A projection's rows `[b·t, heads·d]` → `[b, heads, t, d]`, rotated when `rope` (the gathered
/// cos/sin) is given.
pub fn split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    crate::kernels::rope::split_heads(x, b, t, heads, d, rope)
}

/// The transpose of [`split_heads`] (for its gradient): `[b, heads, t, d]` → `[b·t, heads·d]`,
/// rotated back when `rope` is given.
pub fn merge_heads(y: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    crate::kernels::rope::merge_heads(y, rope)
}
