//! The fused AdamW update on CUDA (feature `cuda`), from `adamw.cu`: one pass over the flat f32
//! state.

use super::Coeffs;
use crate::kernels::launch::{self, device_of, grid_stride, ptx_module, view, wrap, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor};

const MODULE: Module = ptx_module!("adamw");

/// `(w', m', v')` of flat f32 `w`, `m`, `v` and gradients `g` (all `[n]`, contiguous).
pub fn step(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: &Coeffs) -> Result<(Tensor, Tensor, Tensor)> {
    let n = w.elem_count();
    anyhow::ensure!([m, v, g].iter().all(|t| t.elem_count() == n && t.dtype() == DType::F32) && w.dtype() == DType::F32, "AdamW on CUDA: f32 vectors of one length");
    let dev = device_of(w)?;
    let (wg, wl) = w.storage_and_layout();
    let (mg, ml) = m.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (gg, gl) = g.storage_and_layout();
    let (ws, ms, vs, gs) = (view::<f32>(&wg, wl, "w")?, view::<f32>(&mg, ml, "m")?, view::<f32>(&vg, vl, "v")?, view::<f32>(&gg, gl, "g")?);
    // SAFETY: the kernel writes all n elements of each output.
    let (mut w2, mut m2, mut v2) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?) };
    let (func, stream) = (MODULE.function(&dev, "adamw_f32")?, dev.cuda_stream());
    let n64 = n as i64;
    let mut b = stream.launch_builder(&func);
    b.arg(&ws).arg(&ms).arg(&vs).arg(&gs).arg(&mut w2).arg(&mut m2).arg(&mut v2).arg(&n64);
    b.arg(&c.decay).arg(&c.one_minus_b1).arg(&c.b2).arg(&c.one_minus_b2).arg(&c.eps).arg(&c.bc2_sqrt).arg(&c.step_size);
    // SAFETY: arguments as adamw.cu's adamw_f32.
    unsafe { launch::launch(&mut b, grid_stride(n)) }?;
    drop(b);
    Ok((wrap(w2, &dev, n), wrap(m2, &dev, n), wrap(v2, &dev, n)))
}
