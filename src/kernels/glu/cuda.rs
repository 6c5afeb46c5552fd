//! The gated MLP's gates (SwiGLU, GeGLU) forward and backward on CUDA (feature `cuda`), from
//! `swiglu.cu`: f32, or bf16 8 elements a thread (16-byte accesses) when the buffers allow.
//! `gate` names the kernels: "swiglu" (silu) or "geglu" (tanh GELU).

use crate::kernels::launch::{self, addr, device_of, grid_stride, ptx_module, storage_view, view, with_float, wrap, Module};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Tensor};

const MODULE: Module = ptx_module!("swiglu");

/// Can an elementwise bf16 kernel take its `n` elements 8 at a time (16-byte accesses)? (The
/// kernels here are f32 or bf16, so a 2-byte `T` is bf16.)
fn by8<T>(n: usize, ptrs: &[u64]) -> bool {
    std::mem::size_of::<T>() == 2 && n % 8 == 0 && ptrs.iter().all(|p| p % 16 == 0)
}

/// `act(g)·u` of two contiguous storages of one dtype (f32 or bf16) and element count.
pub fn forward(gate: &str, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<CudaStorage> {
    with_float!(g.dtype(), gate, T, t => forward_t::<T>(g, gl, u, ul, gate, &format!("{gate}_fwd_{t}")))
}

fn forward_t<T: CudaDType + DeviceRepr>(g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout, gate: &str, name: &str) -> Result<CudaStorage> {
    let dev = &g.device;
    let n = gl.shape().elem_count();
    let (gs, us) = (storage_view::<T>(g, gl, "g")?, storage_view::<T>(u, ul, "u")?);
    // SAFETY: the kernel writes all n elements.
    let mut h = unsafe { dev.alloc::<T>(n)? };
    let stream = dev.cuda_stream();
    let x8 = by8::<T>(n, &[addr(&gs, &stream), addr(&us, &stream), addr(&h, &stream)]);
    let func = MODULE.function(dev, &if x8 { format!("{gate}_fwd_bf16x8") } else { name.to_string() })?;
    let n64 = if x8 { n as i64 / 8 } else { n as i64 };
    let mut b = stream.launch_builder(&func);
    b.arg(&gs).arg(&us).arg(&mut h).arg(&n64);
    // SAFETY: arguments as swiglu.cu's <gate>_fwd.
    unsafe { launch::launch(&mut b, grid_stride(n64 as usize)) }?;
    drop(b);
    Ok(T::wrap_cuda_slice(h, dev.clone()))
}

/// Backward: `(dg, du)`; all contiguous, one dtype.
pub fn backward(gate: &str, g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    with_float!(g.dtype(), gate, T, t => backward_t::<T>(g, u, dh, gate, &format!("{gate}_bwd_{t}")))
}

fn backward_t<T: CudaDType + DeviceRepr>(g: &Tensor, u: &Tensor, dh: &Tensor, gate: &str, name: &str) -> Result<(Tensor, Tensor)> {
    let dev = device_of(g)?;
    let n = g.elem_count();
    let (gg, gl) = g.storage_and_layout();
    let (ug, ul) = u.storage_and_layout();
    let (hg, hl) = dh.storage_and_layout();
    let (gs, us, hs) = (view::<T>(&gg, gl, "g")?, view::<T>(&ug, ul, "u")?, view::<T>(&hg, hl, "dh")?);
    // SAFETY: the kernel writes all n elements of both outputs.
    let (mut dg, mut du) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
    let stream = dev.cuda_stream();
    let x8 = by8::<T>(n, &[addr(&gs, &stream), addr(&us, &stream), addr(&hs, &stream), addr(&dg, &stream), addr(&du, &stream)]);
    let func = MODULE.function(&dev, &if x8 { format!("{gate}_bwd_bf16x8") } else { name.to_string() })?;
    let n64 = if x8 { n as i64 / 8 } else { n as i64 };
    let mut b = stream.launch_builder(&func);
    b.arg(&gs).arg(&us).arg(&hs).arg(&mut dg).arg(&mut du).arg(&n64);
    // SAFETY: arguments as swiglu.cu's <gate>_bwd.
    unsafe { launch::launch(&mut b, grid_stride(n64 as usize)) }?;
    drop(b);
    Ok((wrap(dg, &dev, g.shape()), wrap(du, &dev, g.shape())))
}
