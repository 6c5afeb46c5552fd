//! Flash attention for training on CUDA (feature `cuda`), from `flash.cu`: bf16, head size 64,
//! 128 or 256, causal with segment (packing/padding) masks and an optional sliding window,
//! grouped-query, the caller's softmax scale, optional logit soft-capping. The CPU's f32
//! attention is the reference the GPU tests compare with.

use crate::kernels::launch::{self, addr, config, device_of, ptx_module, view, wrap, Module};
use super::AttnParams;
use anyhow::{ensure, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};
use half::bf16;

const MODULE: Module = ptx_module!("flash");
/// Query or key rows per block (flash.cu's BR), 4 warps of 16.
const BR: usize = 64;

/// The kernel `name`_d`d` with room for `tiles` staged 64-row tiles and `extra` bytes.
fn kernel(q: &Tensor, name: &str, d: usize, tiles: usize, extra: usize) -> Result<(CudaFunction, u32)> {
    let func = MODULE.function(&device_of(q)?, &format!("{name}_d{d}"))?;
    let bytes = (tiles * BR * (d + 8) * 2 + extra) as u32;
    // Above 48 KiB of shared memory a kernel has to ask for it.
    func.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).w()?;
    Ok((func, bytes))
}

/// The kernels' window argument (1 ≤ w ≤ t; t for none), scale arguments `(sl2, scale, capl2,
/// scap)` (flash.cu's `Scales`) and the kernel name part of soft-capping, for `p`.
fn args(p: &AttnParams, t: usize, d: usize) -> Result<(i32, [f32; 4], &'static str)> {
    ensure!(p.window != Some(0), "flash attention: a sliding window of 0 keys");
    ensure!(p.softcap.is_none_or(|c| c > 0.0), "flash attention: soft-cap {:?} (must be > 0)", p.softcap);
    let w = p.window.map_or(t, |w| w.min(t)).max(1) as i32;
    // Llama's 1/√d in f64 (the f32 field rounded would move its scale by an ulp).
    let scale = if p.is_plain(d) { 1.0 / (d as f64).sqrt() } else { p.scale as f64 };
    let l2 = std::f64::consts::LOG2_E;
    let cap = p.softcap.unwrap_or(1.0) as f64;
    let s = [(scale * l2) as f32, scale as f32, (cap * l2) as f32, (scale / cap) as f32];
    Ok((w, s, if p.softcap.is_some() { "_cap" } else { "" }))
}

fn dims(q: &Tensor, k: &Tensor, v: &Tensor, seg: &Tensor, p: &AttnParams) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, nh, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    ensure!(k.dims() == [b, kvh, t, d] && v.dims() == k.dims() && kvh > 0 && nh % kvh == 0, "flash attention: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    ensure!(seg.dims() == [b, t] && seg.dtype() == DType::U32, "flash attention: segment ids {:?} {:?} for b {b}, t {t}", seg.dims(), seg.dtype());
    ensure!(super::flash_fits(q, p) && [k, v].iter().all(|x| x.dtype() == DType::BF16), "flash attention: bf16 with head size 64, 128 or 256 only, {p:?}");
    ensure!(i32::try_from(t).is_ok() && (b * nh * t * d) < (1 << 40), "flash attention: too long");
    Ok((b, nh, kvh, t, d))
}

/// `o = softmax(L + mask) V` with the logits `L` of the scores `QKᵀ` under `p` (scale,
/// soft-cap, sliding window: with the segments, the mask) and its log-sum-exp (f32 `[b, nh, t]`, base 2, for
/// [`backward`]). `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`, `seg` u32 `[b, t]`.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, seg: &Tensor, p: &AttnParams) -> Result<(Tensor, Tensor)> {
    let (b, nh, kvh, t, d) = dims(q, k, v, seg, p)?;
    let (w, [sl2, scale, capl2, scap], cap) = args(p, t, d)?;
    let dev = device_of(q)?;
    let (q, k, v, seg) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, seg.contiguous()?);
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (sg, sl) = seg.storage_and_layout();
    let (qs, ks, vs, ss) = (view::<bf16>(&qg, ql, "q")?, view::<bf16>(&kg, kl, "k")?, view::<bf16>(&vg, vl, "v")?, view::<u32>(&sg, sl, "segments")?);
    let stream = dev.cuda_stream();
    ensure!([addr(&qs, &stream), addr(&ks, &stream), addr(&vs, &stream)].iter().all(|p| p % 16 == 0), "flash attention: unaligned operands");
    // SAFETY: the kernel writes every row of o and lse.
    let (mut o, mut lse) = unsafe { (dev.alloc::<bf16>(b * nh * t * d)?, dev.alloc::<f32>(b * nh * t)?) };
    let (func, shm) = kernel(&q, &format!("flash_fwd{cap}"), d, 5, 3 * BR * 4)?;
    let (nhi, kvhi, ti) = (nh as i32, kvh as i32, t as i32);
    let mut bld = stream.launch_builder(&func);
    bld.arg(&qs).arg(&ks).arg(&vs).arg(&ss).arg(&mut o).arg(&mut lse).arg(&nhi).arg(&kvhi).arg(&ti).arg(&w);
    bld.arg(&sl2).arg(&scale).arg(&capl2).arg(&scap);
    // SAFETY: arguments as flash.cu's flash_fwd.
    unsafe { launch::launch(&mut bld, config((t.div_ceil(BR) as u32, nh as u32, b as u32), 128, shm)) }?;
    drop(bld);
    Ok((wrap(o, &dev, (b, nh, t, d)), wrap(lse, &dev, (b, nh, t))))
}

/// `(dq, dk, dv)` (bf16, the inputs' shapes) from the forward's inputs, its output `o` and
/// log-sum-exp `lse`, and the output's gradient `d_o`.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &Tensor, k: &Tensor, v: &Tensor, seg: &Tensor, o: &Tensor, lse: &Tensor, d_o: &Tensor, p: &AttnParams) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, kvh, t, d) = dims(q, k, v, seg, p)?;
    let (w, [sl2, scale, capl2, scap], cap) = args(p, t, d)?;
    ensure!(o.dims() == q.dims() && d_o.dims() == q.dims() && d_o.dtype() == DType::BF16 && lse.dims() == [b, nh, t], "flash attention backward: o {:?}, dO {:?}, lse {:?}", o.dims(), d_o.dims(), lse.dims());
    let dev = device_of(q)?;
    let (q, k, v, seg, o, lse, d_o) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, seg.contiguous()?, o.contiguous()?, lse.contiguous()?, d_o.contiguous()?);
    let (qg, ql) = q.storage_and_layout();
    let (kg, kl) = k.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (sg, sl) = seg.storage_and_layout();
    let (og, ol) = o.storage_and_layout();
    let (lg, ll) = lse.storage_and_layout();
    let (dg, dl) = d_o.storage_and_layout();
    let (qs, ks, vs, ss) = (view::<bf16>(&qg, ql, "q")?, view::<bf16>(&kg, kl, "k")?, view::<bf16>(&vg, vl, "v")?, view::<u32>(&sg, sl, "segments")?);
    let (os, ls, ds) = (view::<bf16>(&og, ol, "o")?, view::<f32>(&lg, ll, "lse")?, view::<bf16>(&dg, dl, "dO")?);
    let stream = dev.cuda_stream();
    ensure!(
        [addr(&qs, &stream), addr(&ks, &stream), addr(&vs, &stream), addr(&ds, &stream)].iter().all(|p| p % 16 == 0),
        "flash attention: unaligned operands"
    );
    let rows = (b * nh * t) as i64;
    // SAFETY: each kernel writes every element of its output.
    let (mut delta, mut dq, mut dk, mut dv) = unsafe { (dev.alloc::<f32>(b * nh * t)?, dev.alloc::<bf16>(q.elem_count())?, dev.alloc::<bf16>(k.elem_count())?, dev.alloc::<bf16>(v.elem_count())?) };
    let func = MODULE.function(&dev, &format!("flash_bwd_delta_d{d}"))?;
    let mut bld = stream.launch_builder(&func);
    bld.arg(&os).arg(&ds).arg(&mut delta).arg(&rows);
    // SAFETY: arguments as flash.cu's flash_bwd_delta.
    unsafe { launch::launch(&mut bld, config(((b * nh * t).div_ceil(8) as u32, 1, 1), 256, 0)) }?;
    drop(bld);
    let (nhi, kvhi, ti) = (nh as i32, kvh as i32, t as i32);
    // dK and dV in one kernel, or (head size 256: registers) one kernel each.
    let dkdv: &[&str] = if d > 128 { &["flash_bwd_dk", "flash_bwd_dv"] } else { &["flash_bwd_dkdv"] };
    for name in dkdv {
        let (func, shm) = kernel(&q, &format!("{name}{cap}"), d, 6, 7 * BR * 4)?;
        let mut bld = stream.launch_builder(&func);
        bld.arg(&qs).arg(&ks).arg(&vs).arg(&ss).arg(&ds).arg(&ls).arg(&delta).arg(&mut dk).arg(&mut dv).arg(&nhi).arg(&kvhi).arg(&ti).arg(&w);
        bld.arg(&sl2).arg(&scale).arg(&capl2).arg(&scap);
        // SAFETY: arguments as flash.cu's flash_bwd_dkdv.
        unsafe { launch::launch(&mut bld, config((t.div_ceil(BR) as u32, kvh as u32, b as u32), 128, shm)) }?;
    }
    let (func, shm) = kernel(&q, &format!("flash_bwd_dq{cap}"), d, 6, 3 * BR * 4)?;
    let mut bld = stream.launch_builder(&func);
    bld.arg(&qs).arg(&ks).arg(&vs).arg(&ss).arg(&ds).arg(&ls).arg(&delta).arg(&mut dq).arg(&nhi).arg(&kvhi).arg(&ti).arg(&w);
    bld.arg(&sl2).arg(&scale).arg(&capl2).arg(&scap);
    // SAFETY: arguments as flash.cu's flash_bwd_dq.
    unsafe { launch::launch(&mut bld, config((t.div_ceil(BR) as u32, nh as u32, b as u32), 128, shm)) }?;
    drop(bld);
    Ok((wrap(dq, &dev, (b, nh, t, d)), wrap(dk, &dev, (b, kvh, t, d)), wrap(dv, &dev, (b, kvh, t, d))))
}
