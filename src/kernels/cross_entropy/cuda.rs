//! Cross-entropy of a chunk of LM-head logits on CUDA (feature `cuda`), from `xent.cu`: one
//! block per row, f32 statistics, the gradient in the logits' dtype.

use crate::kernels::launch::{self, config, device_of, ptx_module, view, with_float, wrap, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Tensor};

const MODULE: Module = ptx_module!("xent");

/// Logits `[c, V]` (f32 or bf16, contiguous) against `targets` `[c]` (u32, all in range):
/// per-row losses `[c]` f32 and, with `grad_scale`, `grad_scale · (softmax − onehot)` in the
/// logits' dtype; with `softcap` of the logits `cap·tanh(z/cap)`, the gradient chained to `z`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, grad_scale: Option<f32>, softcap: Option<f32>) -> Result<(Tensor, Option<Tensor>)> {
    anyhow::ensure!(softcap.is_none_or(|c| c > 0.0), "cross-entropy: soft-cap {softcap:?} (must be > 0)");
    with_float!(logits.dtype(), "cross-entropy", T, t => xent_t::<T>(logits, targets, grad_scale, softcap.unwrap_or(0.0), &format!("xent_{t}")))
}

fn xent_t<T: CudaDType + DeviceRepr>(logits: &Tensor, targets: &Tensor, grad_scale: Option<f32>, cap: f32, name: &str) -> Result<(Tensor, Option<Tensor>)> {
    let dev = device_of(logits)?;
    let (c, v) = logits.dims2()?;
    anyhow::ensure!(targets.dims() == [c] && targets.dtype() == DType::U32, "cross-entropy: logits {:?}, targets {:?}", logits.dims(), targets.dims());
    let (lg, ll) = logits.storage_and_layout();
    let (tg, tl) = targets.storage_and_layout();
    let (ls, ts) = (view::<T>(&lg, ll, "logits")?, view::<u32>(&tg, tl, "targets")?);
    let g = grad_scale.unwrap_or(0.0);
    // SAFETY: the kernel writes every row's loss, and every gradient element when g ≠ 0 (the
    // buffer is one element when there is no gradient, and never touched).
    let (mut loss, mut dl) = unsafe { (dev.alloc::<f32>(c)?, dev.alloc::<T>(if g != 0.0 { c * v } else { 1 })?) };
    let v32 = v as i32;
    let (func, stream) = (MODULE.function(&dev, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&ls).arg(&ts).arg(&g).arg(&mut dl).arg(&mut loss).arg(&v32).arg(&cap);
    // SAFETY: arguments as xent.cu's xent.
    unsafe { launch::launch(&mut b, config((c as u32, 1, 1), 512, 0)) }?;
    drop(b);
    let dl = (g != 0.0).then(|| wrap(dl, &dev, (c, v)));
    Ok((wrap(loss, &dev, c), dl))
}
