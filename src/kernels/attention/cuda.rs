//! The tiled training attention's softmax on CUDA (feature `cuda`), from `softmax.cu`: forward
//! with scale, soft-cap and additive mask, and backward, one block per score row; the
//! soft-cap's backward factor elementwise.

use crate::kernels::launch::{self, grid_stride, per_row, ptx_module, storage_view, with_float, Module};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout};

const MODULE: Module = ptx_module!("softmax");

/// `softmax(softcap(scale · s) + mask)` over the last axis of scores `s` `[b, nh, c, t]`
/// (contiguous, f32 or bf16) with the f32 mask `[b, 1, c, t]`, `softcap(x) = cap·tanh(x/cap)`
/// unless `cap` is 0; the result in `s`'s dtype.
pub fn forward(s: (&CudaStorage, &Layout), mask: (&CudaStorage, &Layout), scale: f32, cap: f32) -> Result<CudaStorage> {
    let (b, _, c, t) = s.1.shape().dims4()?;
    ensure!(mask.1.shape().dims4()? == (b, 1, c, t) && mask.0.dtype() == DType::F32, "attention softmax: scores {:?}, mask {:?}", s.1.dims(), mask.1.dims());
    with_float!(s.0.dtype(), "attention softmax", T, n => forward_t::<T>(s, mask, scale, cap, &format!("attn_softmax_fwd_{n}")))
}

fn forward_t<T: CudaDType + DeviceRepr>(s: (&CudaStorage, &Layout), mask: (&CudaStorage, &Layout), scale: f32, cap: f32, name: &str) -> Result<CudaStorage> {
    let dev = &s.0.device;
    let (_, nh, c, t) = s.1.shape().dims4()?;
    let rows = s.1.shape().elem_count() / t.max(1);
    let (t32, rows_per_b, c32) = (t as i32, (nh * c) as i64, c as i32);
    let (x, m) = (storage_view::<T>(s.0, s.1, "scores")?, storage_view::<f32>(mask.0, mask.1, "mask")?);
    // SAFETY: the kernel writes every element of its row.
    let mut out = unsafe { dev.alloc::<T>(rows * t)? };
    let (func, stream) = (MODULE.function(dev, name)?, dev.cuda_stream());
    let mut bld = stream.launch_builder(&func);
    bld.arg(&x).arg(&m).arg(&mut out).arg(&scale).arg(&t32).arg(&rows_per_b).arg(&c32).arg(&cap);
    // SAFETY: arguments as softmax.cu's attn_softmax_fwd.
    unsafe { launch::launch(&mut bld, per_row(rows, 256)) }?;
    drop(bld);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

/// Backward over the last axis: `dS = P ⊙ (dP − Σ_j dP·P)`; `p`, `dp` contiguous, one shape and
/// dtype (f32 or bf16).
pub fn backward(p: (&CudaStorage, &Layout), dp: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    ensure!(p.1.dims() == dp.1.dims() && p.0.dtype() == dp.0.dtype(), "softmax backward: {:?} vs {:?}", p.1.dims(), dp.1.dims());
    with_float!(p.0.dtype(), "softmax backward", T, n => backward_t::<T>(p, dp, &format!("attn_softmax_bwd_{n}")))
}

fn backward_t<T: CudaDType + DeviceRepr>(p: (&CudaStorage, &Layout), dp: (&CudaStorage, &Layout), name: &str) -> Result<CudaStorage> {
    let dev = &p.0.device;
    let t = *p.1.dims().last().unwrap_or(&1);
    let rows = p.1.shape().elem_count() / t.max(1);
    let t32 = t as i32;
    let (a, d) = (storage_view::<T>(p.0, p.1, "p")?, storage_view::<T>(dp.0, dp.1, "dp")?);
    // SAFETY: the kernel writes every element of its row.
    let mut out = unsafe { dev.alloc::<T>(rows * t)? };
    let (func, stream) = (MODULE.function(dev, name)?, dev.cuda_stream());
    let mut bld = stream.launch_builder(&func);
    bld.arg(&a).arg(&d).arg(&mut out).arg(&t32);
    // SAFETY: arguments as softmax.cu's attn_softmax_bwd.
    unsafe { launch::launch(&mut bld, per_row(rows, 256)) }?;
    drop(bld);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

/// The soft-cap's backward factor: `ds·(1 − tanh²(scale·s/cap))` elementwise; `ds`, `s`
/// contiguous, one shape and dtype (f32 or bf16).
pub fn softcap_backward(ds: (&CudaStorage, &Layout), s: (&CudaStorage, &Layout), scale: f32, cap: f32) -> Result<CudaStorage> {
    ensure!(ds.1.dims() == s.1.dims() && ds.0.dtype() == s.0.dtype(), "soft-cap backward: {:?} vs {:?}", ds.1.dims(), s.1.dims());
    with_float!(ds.0.dtype(), "soft-cap backward", T, n => softcap_backward_t::<T>(ds, s, scale, cap, &format!("attn_softcap_bwd_{n}")))
}

fn softcap_backward_t<T: CudaDType + DeviceRepr>(ds: (&CudaStorage, &Layout), s: (&CudaStorage, &Layout), scale: f32, cap: f32, name: &str) -> Result<CudaStorage> {
    let dev = &ds.0.device;
    let n = ds.1.shape().elem_count();
    let (a, b) = (storage_view::<T>(ds.0, ds.1, "dS")?, storage_view::<T>(s.0, s.1, "scores")?);
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let (func, stream) = (MODULE.function(dev, name)?, dev.cuda_stream());
    let n64 = n as i64;
    let mut bld = stream.launch_builder(&func);
    bld.arg(&a).arg(&b).arg(&mut out).arg(&scale).arg(&cap).arg(&n64);
    // SAFETY: arguments as softmax.cu's attn_softcap_bwd.
    unsafe { launch::launch(&mut bld, grid_stride(n)) }?;
    drop(bld);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}
