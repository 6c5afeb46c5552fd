//! Batch-1 products `y = W x` (decoding, where every weight byte is read once per token).
//! Dispatch order: the fused 4-bit CUDA kernel on the weight's device copy (never materialises
//! the weight), the CPU kernel for f32 (a 4-bit weight with f32 compute dequantized into a
//! scratch vector first); otherwise `None`, and the caller runs its matmul.

pub mod cpu;

use super::f32_view;
use super::quant4::DeviceCopy;
use crate::quant::Quantized4bit;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// `x Wᵀ` for a dense `w` `[out, in]` and `x` `[1, in]`: `[1, out]` from the CPU kernel when
/// both are f32 on the CPU (`w` contiguous), else `None`.
pub fn dense(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(wv) = f32_view(w) else { return Ok(None) };
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; w.dim(0)?];
    cpu::gemv_f32(wv.slice(), &xv, &mut y);
    Ok(Some(Tensor::from_vec(y, (1, w.dim(0)?), x.device())?))
}

/// `x Wᵀ` for a 4-bit `q` `[out, in]` (bnb's `compute` dtype, on `device`, with its device copy
/// `gpu`) and `x` `[1, in]`: `[1, out]` in x's dtype, else `None`. As bnb, `x` goes to the
/// compute dtype and `y` back to x's.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn quant4(x: &Tensor, q: &Quantized4bit, gpu: &DeviceCopy, compute: DType, device: &Device) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(g) = gpu {
        return Ok(Some(g.gemv(&x.to_dtype(compute)?)?.to_dtype(x.dtype())?));
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 || compute != DType::F32 || !device.is_cpu() {
        return Ok(None);
    }
    let mut w = vec![0f32; q.numel()];
    crate::quant::dequantize_4bit_f32(q, &mut w)?;
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; q.state.shape[0]];
    cpu::gemv_f32(&w, &xv, &mut y);
    Ok(Some(Tensor::from_vec(y, (1, q.state.shape[0]), x.device())?))
}
