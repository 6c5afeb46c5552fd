//! CUDA kernels of the training engine (feature `cuda`), from `src/kernels/cuda/train.cu`; the
//! CPU twins live beside the CPU kernels (`lora_cpu`).

use super::lora_cpu::Dropout;
use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Storage, Tensor};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
const MODULE: &str = "qscript_train";

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The scaled dropout keep-mask (0 or `1/(1−p)`) of `shape` on `dev`, element for element the
/// CPU's [`super::lora_cpu::scaled_mask`] (F32 or BF16).
pub fn dropout_mask(dev: &CudaDevice, shape: &[usize], dtype: DType, dr: &Dropout) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (k1, k2) = (dr.seed as u32, (dr.seed >> 32) as u32);
    let n64 = n as i64;
    let storage = match dtype {
        DType::F32 => launch::<f32>(dev, "dropout_mask_f32", k1, k2, dr, n64)?,
        DType::BF16 => launch::<bf16>(dev, "dropout_mask_bf16", k1, k2, dr, n64)?,
        other => bail!("dropout mask in {other:?}: f32 or bf16 only"),
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(dev: &CudaDevice, name: &str, k1: u32, k2: u32, dr: &Dropout, n: i64) -> Result<candle_core::CudaStorage> {
    // SAFETY: the kernel writes all n elements.
    let mut out = unsafe { dev.alloc::<T>(n as usize)? };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&k1).arg(&k2).arg(&dr.threshold).arg(&dr.scale).arg(&n).arg(&mut out);
    // SAFETY: the arguments match the kernel's signature in train.cu.
    unsafe { b.launch(grid(n as usize)) }.w()?;
    drop(b);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}
