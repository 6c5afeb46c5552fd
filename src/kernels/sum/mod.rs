//! Sums of two or three tensors of one shape, `a + b (+ c)`: the residual stream's adds in the
//! training forward and backward. Dispatch order: the CUDA kernel (f32, bf16; contiguous,
//! 16-byte aligned, a multiple of 8 elements: one pass, rounded once), candle's adds in order
//! (`(a + b) + c`, every other case; on the CPU bit-identical to writing them out).

#[cfg(feature = "cuda")]
mod cuda;

use anyhow::{ensure, Result};
use candle_core::Tensor;

/// `a + b (+ c)` over 2 or 3 tensors of one shape and dtype.
pub fn sum(ts: &[&Tensor]) -> Result<Tensor> {
    ensure!((2..=3).contains(&ts.len()), "sum: 2 or 3 tensors, not {}", ts.len());
    #[cfg(feature = "cuda")]
    if let Some(s) = cuda::sum(ts)? {
        return Ok(s);
    }
    let mut acc = (ts[0] + ts[1])?;
    if let Some(c) = ts.get(2) {
        acc = (acc + *c)?;
    }
    Ok(acc)
}
