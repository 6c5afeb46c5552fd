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

/// A projection's rows `[b·t, heads·d]` → `[b, heads, t, d]`, rotated when `rope` (the gathered
/// cos/sin) is given: one fused kernel on CUDA, the copy and then [`forward`] elsewhere.
pub fn split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda_fused(x, rope) {
        return crate::kernels::cuda_train::heads_rope(&x.contiguous()?, rope, b, t, heads, d, false);
    }
    let y = x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?;
    match rope {
        Some((cos, sin)) => forward(&y, cos, sin),
        None => Ok(y),
    }
}

/// The transpose of [`split_heads`] (for its gradient): `[b, heads, t, d]` → `[b·t, heads·d]`,
/// rotated back when `rope` is given.
pub fn merge_heads(y: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, heads, t, d) = y.dims4()?;
    #[cfg(feature = "cuda")]
    if cuda_fused(y, rope) {
        return crate::kernels::cuda_train::heads_rope(&y.contiguous()?, rope, b, t, heads, d, true);
    }
    let y = match rope {
        Some((cos, sin)) => backward(y, cos, sin)?,
        None => y.clone(),
    };
    Ok(y.transpose(1, 2)?.contiguous()?.reshape((b * t, heads * d))?)
}

#[cfg(feature = "cuda")]
fn cuda_fused(x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::BF16) && rope.is_none_or(|(c, s)| c.dtype() == x.dtype() && s.dtype() == x.dtype())
}
