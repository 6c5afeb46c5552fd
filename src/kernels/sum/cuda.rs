//! `sum.cu`'s launches (feature `cuda`).

use crate::kernels::launch::{self, device_of, grid_stride, ptx_module, view, wrap, Module};
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Device, Tensor};

const MODULE: Module = ptx_module!("sum");

/// The kernel's sum when it takes these tensors (see the module doc), else `None`.
pub fn sum(ts: &[&Tensor]) -> Result<Option<Tensor>> {
    let a = ts[0];
    let n = a.elem_count();
    let takes = matches!(a.device(), Device::Cuda(_))
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && n % 8 == 0
        && ts.iter().all(|t| {
            t.dims() == a.dims()
                && t.dtype() == a.dtype()
                && t.device().same_device(a.device())
                && t.is_contiguous()
                && t.layout().start_offset() * t.dtype().size_in_bytes() % 16 == 0
        });
    if !takes {
        return Ok(None);
    }
    Ok(Some(match a.dtype() {
        DType::F32 => sum_t::<f32>(ts, "sum_f32")?,
        _ => sum_t::<half::bf16>(ts, "sum_bf16")?,
    }))
}

fn sum_t<T: CudaDType + DeviceRepr>(ts: &[&Tensor], name: &str) -> Result<Tensor> {
    let dev = device_of(ts[0])?;
    let n = ts[0].elem_count();
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards.iter().map(|(g, l)| view::<T>(g, l, "sum operand")).collect::<Result<Vec<_>>>()?;
    let null: u64 = 0;
    // SAFETY: the kernel writes all n elements.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let n8 = (n / 8) as i64;
    let (func, stream) = (MODULE.function(&dev, name)?, dev.cuda_stream());
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
    Ok(wrap(out, &dev, ts[0].shape()))
}
