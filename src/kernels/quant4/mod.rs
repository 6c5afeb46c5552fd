//! bitsandbytes 4-bit (NF4 / FP4) weights: dequantization and the weight's device copy. The
//! CPU kernels are `crate::quant` (blockwise dequantization, bit-identical to bnb); the CUDA
//! kernels (`quant4.cu`) run on a copy uploaded once, [`Quant4Gpu`]. Dispatch order: the device
//! copy's kernel, else the CPU's dequantization moved to the weight's device. The batch-1
//! product is `kernels::gemv`.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::Quant4Gpu;
#[cfg(feature = "cuda")]
pub(crate) use cuda::{gemv_blocks, gemv_lanes};

use crate::quant::Quantized4bit;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// A 4-bit weight on a CUDA device; without the `cuda` feature there is none (no values).
#[cfg(not(feature = "cuda"))]
pub enum Quant4Gpu {}

/// A 4-bit weight's device copy: its codes and statistics uploaded once to the GPU it lives on,
/// so dequantization and the batch-1 GEMV run there without a host round trip; `None` for a
/// weight on the CPU (and always without the `cuda` feature).
pub type DeviceCopy = Option<Box<Quant4Gpu>>;

/// The device copy of `q` for a weight on `device`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn upload(q: &Quantized4bit, device: &Device) -> Result<DeviceCopy> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return Ok(Some(Box::new(Quant4Gpu::upload(q, d)?)));
    }
    Ok(None)
}

/// `q` dequantized to `dtype` (f32, bf16 or f16) on `device`, bit for bit the same everywhere:
/// on the GPU from its device copy, else on the CPU and then moved.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn dequantize(q: &Quantized4bit, gpu: &DeviceCopy, dtype: DType, device: &Device) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(g) = gpu {
        return g.dequantize(dtype);
    }
    Ok(crate::quant::dequantize_4bit(q, dtype)?.to_device(device)?)
}

/// `bench dequant` on CUDA device 0: (GB/s, ms per call) of dequantizing a `rows × cols` NF4
/// weight to bf16, the kernel alone.
pub fn bench_dequant(rows: usize, cols: usize, iters: usize) -> Result<(f64, f64, f64)> {
    #[cfg(feature = "cuda")]
    return cuda::bench_dequant(rows, cols, iters);
    #[cfg(not(feature = "cuda"))]
    no_cuda(rows, cols, iters)
}

/// `bench dequant` on CUDA device 0: (GB/s, ms per call) of the fused batch-1 GEMV with the
/// weight of [`bench_dequant`].
pub fn bench_gemv(rows: usize, cols: usize, iters: usize) -> Result<(f64, f64)> {
    #[cfg(feature = "cuda")]
    return cuda::bench_gemv(rows, cols, iters);
    #[cfg(not(feature = "cuda"))]
    no_cuda(rows, cols, iters)
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>(_rows: usize, _cols: usize, _iters: usize) -> Result<T> {
    anyhow::bail!("this qscript was built without CUDA")
}
