//! RMSNorm forward and backward on CUDA (feature `cuda`), from `norm.cu`: one block per row,
//! f32 statistics, f32 or bf16 storage.

use crate::kernels::launch::{self, device_of, per_row, ptx_module, view, with_float, wrap, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{Tensor, D};

const MODULE: Module = ptx_module!("norm");

/// Forward over the last axis: `(y, rstd [rows, 1] f32)`, `y = x̂·(offset + w)` (Gemma's
/// `1 + w` with offset 1, added in f32); `x` and `w` contiguous, the same dtype (f32 or bf16).
pub fn forward(x: &Tensor, w: &Tensor, eps: f32, offset: f32) -> Result<(Tensor, Tensor)> {
    with_float!(x.dtype(), "RMSNorm", T, t => forward_t::<T>(x, w, eps, offset, &format!("rms_fwd_{t}")))
}

fn forward_t<T: CudaDType + DeviceRepr>(x: &Tensor, w: &Tensor, eps: f32, offset: f32, name: &str) -> Result<(Tensor, Tensor)> {
    let dev = device_of(x)?;
    let h = x.dim(D::Minus1)?;
    let rows = x.elem_count() / h.max(1);
    let h32 = h as i32;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (xs, ws) = (view::<T>(&xg, xl, "x")?, view::<T>(&wg, wl, "w")?);
    // SAFETY: the kernel writes every element of y and every row's rstd.
    let (mut y, mut r) = unsafe { (dev.alloc::<T>(rows * h)?, dev.alloc::<f32>(rows)?) };
    let (func, stream) = (MODULE.function(&dev, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&xs).arg(&ws).arg(&mut y).arg(&mut r).arg(&h32).arg(&eps).arg(&offset);
    // SAFETY: arguments as norm.cu's rms_fwd.
    unsafe { launch::launch(&mut b, per_row(rows, 256)) }?;
    drop(b);
    Ok((wrap(y, &dev, x.shape()), wrap(r, &dev, (rows, 1))))
}

/// Backward: `dx` (plus `res` when given: the residual stream's gradient, added in f32 before
/// the one rounding) from the saved `x`, `rstd` (f32) and `dy` (the weight `offset + w`); all
/// contiguous.
pub fn backward(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor, res: Option<&Tensor>, offset: f32) -> Result<Tensor> {
    with_float!(x.dtype(), "RMSNorm backward", T, t => backward_t::<T>(x, rstd, w, dy, res, offset, t))
}

fn backward_t<T: CudaDType + DeviceRepr>(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor, res: Option<&Tensor>, offset: f32, t: &str) -> Result<Tensor> {
    let dev = device_of(x)?;
    let h = x.dim(D::Minus1)?;
    let rows = x.elem_count() / h.max(1);
    let h32 = h as i32;
    if let Some(r) = res {
        anyhow::ensure!(r.dims() == dy.dims() && r.dtype() == x.dtype(), "RMSNorm backward: residual {:?} {:?} for dy {:?}", r.dims(), r.dtype(), dy.dims());
    }
    let (xg, xl) = x.storage_and_layout();
    let (rg, rl) = rstd.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (dg, dl) = dy.storage_and_layout();
    let (xs, rs, ws, ds) = (view::<T>(&xg, xl, "x")?, view::<f32>(&rg, rl, "rstd")?, view::<T>(&wg, wl, "w")?, view::<T>(&dg, dl, "dy")?);
    let resg = res.map(|r| r.storage_and_layout());
    let res_view = match &resg {
        Some((g, l)) => Some(view::<T>(g, l, "residual")?),
        None => None,
    };
    let stream = dev.cuda_stream();
    let threads = 256;
    // Registers hold a thread's groups of 8: 1, 2 or 4 of them a thread.
    let nv = (h / 8).div_ceil(threads);
    let aligned = [&xs, &ws, &ds].into_iter().chain(res_view.as_ref()).all(|v| launch::aligned16(v, &stream));
    let name = if h % 8 == 0 && nv <= 4 && aligned { format!("rms_bwd_{t}_v{}", nv.next_power_of_two()) } else { format!("rms_bwd_{t}") };
    let null: u64 = 0;
    // SAFETY: the kernel writes every element of dx.
    let mut dx = unsafe { dev.alloc::<T>(rows * h)? };
    let func = MODULE.function(&dev, &name)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&xs).arg(&rs).arg(&ws).arg(&ds);
    match &res_view {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&mut dx).arg(&h32).arg(&offset);
    // SAFETY: arguments as norm.cu's rms_bwd / rms_bwd_vec (a null residual pointer: none).
    unsafe { launch::launch(&mut b, per_row(rows, threads as u32)) }?;
    drop(b);
    Ok(wrap(dx, &dev, x.shape()))
}
