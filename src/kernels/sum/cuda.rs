//! `sum.cu`'s launches (feature `cuda`).

use crate::kernels::launch::{self, device_of, grid_stride, ptx_module, view, with_float, wrap, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Device, Tensor};

const MODULE: Module = ptx_module!("sum");

/// The kernel's sum when it takes these tensors (see the module doc), else `None`.
pub fn sum(ts: &[&Tensor]) -> Result<Option<Tensor>> {
    let a = ts[0];
    let takes = matches!(a.device(), Device::Cuda(_))
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && a.elem_count() % 8 == 0
        && ts.iter().all(|t| t.dims() == a.dims() && t.dtype() == a.dtype() && t.device().same_device(a.device()) && t.is_contiguous());
    if !takes {
        return Ok(None);
    }
    with_float!(a.dtype(), "sum", T, t => sum_t::<T>(ts, &format!("sum_{t}")))
}

fn sum_t<T: CudaDType + DeviceRepr>(ts: &[&Tensor], name: &str) -> Result<Option<Tensor>> {
    let dev = device_of(ts[0])?;
    let n = ts[0].elem_count();
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards.iter().map(|(g, l)| view::<T>(g, l, "sum operand")).collect::<Result<Vec<_>>>()?;
    let stream = dev.cuda_stream();
    if !views.iter().all(|v| launch::aligned16(v, &stream)) {
        return Ok(None);
    }
    let null: u64 = 0;
    // SAFETY: the kernel writes all n elements.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let n8 = (n / 8) as i64;
    let func = MODULE.function(&dev, name)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&views[0]).arg(&views[1]);
    match views.get(2) {
        Some(c) => b.arg(c),
        None => b.arg(&null),
    };
    b.arg(&mut out).arg(&n8);
    // SAFETY: arguments as sum.cu's sum_<t> (a null third operand: two terms).
    unsafe { launch::launch(&mut b, grid_stride(n8 as usize)) }?;
    drop(b);
    Ok(Some(wrap(out, &dev, ts[0].shape())))
}
