//! Heads split/merge with RoPE on CUDA (feature `cuda`), from `rope.cu`: one thread per
//! rotated pair, f32 or bf16.

use super::HeadsRope;
use crate::kernels::launch::{self, grid_stride, ptx_module, storage_view, with_float, Module};
use anyhow::{ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout};

const MODULE: Module = ptx_module!("rope");

/// `op` on `x` (contiguous) with the per-token tables `cos`/`sin` `[b, t, d/2]` in x's dtype
/// (any buffers when `op.rotate` is off: they are not read).
pub fn heads_rope(op: &HeadsRope, x: (&CudaStorage, &Layout), cos: (&CudaStorage, &Layout), sin: (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let HeadsRope { b, t, h, d, .. } = *op;
    ensure!(x.1.shape().elem_count() == b * t * h * d && d % 2 == 0, "heads/RoPE: {:?} as {b}×{t}×{h}×{d}", x.1.dims());
    if op.rotate {
        let n = cos.1.shape().elem_count();
        ensure!(n == b * t * d / 2 && sin.1.shape().elem_count() == n, "RoPE tables {:?} for {b}×{t} tokens of head dim {d}", cos.1.dims());
    }
    with_float!(x.0.dtype(), "heads/RoPE", T, t => heads_rope_t::<T>(op, x, cos, sin, &format!("heads_rope_{t}")))
}

fn heads_rope_t<T: CudaDType + DeviceRepr>(op: &HeadsRope, x: (&CudaStorage, &Layout), cos: (&CudaStorage, &Layout), sin: (&CudaStorage, &Layout), name: &str) -> Result<CudaStorage> {
    let HeadsRope { b, t, h, d, merge, rotate } = *op;
    let dev = &x.0.device;
    let (xs, cs, ss) = (storage_view::<T>(x.0, x.1, "x")?, storage_view::<T>(cos.0, cos.1, "cos")?, storage_view::<T>(sin.0, sin.1, "sin")?);
    let n = b * t * h * d;
    // SAFETY: every (token, head, pair) writes both of its elements.
    let mut y = unsafe { dev.alloc::<T>(n)? };
    let (t32, h32, d32, rot, mg, pairs) = (t as i32, h as i32, d as i32, i32::from(rotate), i32::from(merge), (n / 2) as i64);
    let (func, stream) = (MODULE.function(dev, name)?, dev.cuda_stream());
    let mut bl = stream.launch_builder(&func);
    bl.arg(&xs).arg(&cs).arg(&ss).arg(&mut y).arg(&t32).arg(&h32).arg(&d32).arg(&rot).arg(&mg).arg(&pairs);
    // SAFETY: arguments as rope.cu's heads_rope.
    unsafe { launch::launch(&mut bl, grid_stride(n / 2)) }?;
    drop(bl);
    Ok(T::wrap_cuda_slice(y, dev.clone()))
}
