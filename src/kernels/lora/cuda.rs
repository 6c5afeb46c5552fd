//! The LoRA side products on CUDA (feature `cuda`), from `lora.cu`: the forward and backward
//! of a LoRA linear around cuBLAS's two big matmuls, and the dropout mask (`dropout.cu`) for
//! the candle reference path. The candle formulation in `lora::forward`/`backward` is the
//! reference the GPU tests compare with.

use super::{Adapter, Dropout};
use crate::kernels::launch::{self, aligned16, config, device_of, grid_stride, ptx_module, view, wrap, Module};
use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Tensor};
use half::bf16;

const MODULE: Module = ptx_module!("lora");
const DROPOUT: Module = ptx_module!("dropout");

/// The dropout as the kernels take it (`Mask` in lora.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct MaskArg {
    k1: u32,
    k2: u32,
    thr: u32,
    scale: f32,
    on: i32,
}

// SAFETY: a plain #[repr(C)] struct of 4-byte scalars, laid out as lora.cu's `Mask`.
unsafe impl DeviceRepr for MaskArg {}

impl MaskArg {
    fn of(d: Option<&Dropout>) -> Self {
        match d {
            Some(d) => MaskArg { k1: d.seed as u32, k2: (d.seed >> 32) as u32, thr: d.threshold, scale: d.scale, on: 1 },
            None => MaskArg { k1: 0, k2: 0, thr: 0, scale: 1.0, on: 0 },
        }
    }
}

/// The compiled rank a kernel uses for rank `r` (≤ 32), or `None`.
fn compiled_rank(r: usize) -> Option<usize> {
    [8, 16, 32].into_iter().find(|&c| r <= c && r > 0)
}

/// Can the kernels run this adapter: CUDA, f32 or bf16 throughout, rank ≤ 32?
pub fn supported(x: &Tensor, l: &Adapter) -> bool {
    crate::kernels::cuda_float(x) && l.a.dtype() == x.dtype() && l.b.dtype() == x.dtype() && compiled_rank(l.a.dim(0).unwrap_or(0)).is_some()
}

/// The LoRA linear's forward: cuBLAS for `x Wᵀ`, then one kernel for `u = drop(x) Aᵀ` and one
/// adding `s·u Bᵀ`: `(y, u)`.
pub fn linear_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, l: &Adapter, dropout: Option<&Dropout>) -> Result<(Tensor, Tensor)> {
    let y = crate::profile::time("·lin fwd base matmul", || x.matmul(&w.t()?))?;
    let _p = crate::profile::scope("·lin fwd lora");
    let u = project(x, l.a, false, dropout, 1.0)?;
    let mut y = expand(&y, &u, l.b, false, None, l.scaling as f32)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok((y, u))
}

/// The LoRA linear's backward: cuBLAS for `dy W`; kernels for `du = s·dy B`, `dx += mask ⊙ (du
/// A)`, `dA = duᵀ drop(x)` and `dB = s·dyᵀ u`: `(dx, (dA, dB))`.
pub fn linear_backward(dropout: Option<&Dropout>, x: &Tensor, u: &Tensor, w: &Tensor, l: &Adapter, dy: &Tensor) -> Result<(Tensor, (Tensor, Tensor))> {
    let dx = crate::profile::time("·lin bwd base matmul", || dy.matmul(w))?;
    let _p = crate::profile::scope("·lin bwd lora");
    let s = l.scaling as f32;
    let du = project(dy, l.b, true, None, s)?;
    let dx = expand(&dx, &du, l.a, true, dropout, 1.0)?;
    // f32, as the kernels sum them: the optimizer's master weights are f32 (no round trip
    // through the adapters' dtype).
    let da = grad(&du, x, dropout, 1.0, false)?;
    let db = grad(u, dy, None, s, true)?;
    Ok((dx, (da, db)))
}

/// The scaled dropout keep-mask (0 or `1/(1−p)`) of `n` elements on `dev`, element for element
/// the CPU's [`super::cpu::scaled_mask`], in bf16 or f32.
pub fn dropout_mask(dev: &CudaDevice, n: usize, bf16: bool, dr: &Dropout) -> Result<CudaStorage> {
    if bf16 {
        mask_t::<bf16>(dev, "dropout_mask_bf16", n, dr)
    } else {
        mask_t::<f32>(dev, "dropout_mask_f32", n, dr)
    }
}

fn mask_t<T: CudaDType + DeviceRepr>(dev: &CudaDevice, name: &str, n: usize, dr: &Dropout) -> Result<CudaStorage> {
    let (k1, k2, n64) = (dr.seed as u32, (dr.seed >> 32) as u32, n as i64);
    // SAFETY: the kernel writes all n elements.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let (func, stream) = (DROPOUT.function(dev, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&k1).arg(&k2).arg(&dr.threshold).arg(&dr.scale).arg(&n64).arg(&mut out);
    // SAFETY: the arguments match dropout.cu's dropout_mask.
    unsafe { launch::launch(&mut b, grid_stride(n)) }?;
    drop(b);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

fn name(kind: &str, dtype: DType, r: usize) -> Result<String> {
    let t = launch::float_name(dtype, "LoRA kernels")?;
    let Some(c) = compiled_rank(r) else { bail!("LoRA kernels: rank {r} (at most 32)") };
    Ok(format!("lora_{kind}_{t}_r{c}"))
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("LoRA kernels: {what} = {v} exceeds i32"))
}

/// `U = scale · drop(X) · W(r, k)ᵀ` → `[n, r]` in X's dtype. `x` `[n, K]`; `w` `[r, K]`, or with
/// `wt` `[K, r]` (B used as Bᵀ).
pub fn project(x: &Tensor, w: &Tensor, wt: bool, dropout: Option<&Dropout>, scale: f32) -> Result<Tensor> {
    let _p = crate::profile::scope("·· lora project");
    let (n, k) = x.dims2()?;
    let r = if wt { w.dim(1)? } else { w.dim(0)? };
    anyhow::ensure!(w.elem_count() == r * k, "LoRA project: x {:?}, w {:?}", x.dims(), w.dims());
    match x.dtype() {
        DType::F32 => project_t::<f32>(x, w, wt, dropout, scale, n, k, r),
        _ => project_t::<bf16>(x, w, wt, dropout, scale, n, k, r),
    }
}

#[allow(clippy::too_many_arguments)]
fn project_t<T: CudaDType + DeviceRepr>(x: &Tensor, w: &Tensor, wt: bool, dropout: Option<&Dropout>, scale: f32, n: usize, k: usize, r: usize) -> Result<Tensor> {
    let dev = device_of(x)?;
    let x = x.contiguous()?;
    let elem = std::mem::size_of::<T>();
    let stream = dev.cuda_stream();
    let (m, ni, ki, ri) = (MaskArg::of(dropout), i32_of(n, "rows")?, i32_of(k, "inner")?, r as i32);
    // SAFETY: either kernel writes all n·r outputs.
    let mut u = unsafe { dev.alloc::<T>(n * r)? };
    // bf16 on tensor cores when rows are whole 16-byte chunks; W as [r, K] (B transposed, tiny).
    if x.dtype() == DType::BF16 && k % 8 == 0 {
        let w = if wt { transpose_bf16(&w.contiguous()?)? } else { w.contiguous()? };
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let (xs, ws) = (view::<T>(&xg, xl, "x")?, view::<T>(&wg, wl, "w")?);
        if aligned16(&xs, &stream) && aligned16(&ws, &stream) {
            let func = MODULE.function(&dev, &format!("lora_project_tc_r{}", compiled_rank(r).unwrap_or(32)))?;
            let mut b = stream.launch_builder(&func);
            b.arg(&xs).arg(&ws).arg(&m).arg(&scale).arg(&mut u).arg(&ni).arg(&ki).arg(&ri);
            // 16 rows a block, its K split between 16 warps (lora.cu's TPW).
            let cfg = config((n.div_ceil(16) as u32, 1, 1), 512, 0);
            // SAFETY: arguments as lora.cu's lora_project_tc.
            unsafe { launch::launch(&mut b, cfg) }?;
            drop(b);
            drop((xg, wg));
            return Ok(wrap(u, &dev, (n, r)));
        }
    }
    let w = w.contiguous()?;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (xs, ws) = (view::<T>(&xg, xl, "x")?, view::<T>(&wg, wl, "w")?);
    let func = MODULE.function(&dev, &name("project", x.dtype(), r)?)?;
    let wt = i32::from(wt);
    // 16-byte loads of x need rows that start 16-byte aligned.
    let vec = i32::from((k * elem) % 16 == 0 && aligned16(&xs, &stream));
    let mut b = stream.launch_builder(&func);
    b.arg(&xs).arg(&ws).arg(&wt).arg(&m).arg(&scale).arg(&mut u).arg(&ni).arg(&ki).arg(&ri).arg(&vec);
    // 16 warps of two rows each per block (lora.cu's PW).
    let cfg = config((n.div_ceil(32) as u32, 1, 1), 512, 0);
    // SAFETY: arguments as lora.cu's lora_project.
    unsafe { launch::launch(&mut b, cfg) }?;
    drop(b);
    Ok(wrap(u, &dev, (n, r)))
}

/// `[M, r]` → `[r, M]` (bf16, contiguous).
fn transpose_bf16(w: &Tensor) -> Result<Tensor> {
    let (m, r) = w.dims2()?;
    let dev = device_of(w)?;
    let (wg, wl) = w.storage_and_layout();
    let ws = view::<bf16>(&wg, wl, "w")?;
    // SAFETY: the kernel writes all m·r outputs.
    let mut out = unsafe { dev.alloc::<bf16>(m * r)? };
    let func = MODULE.function(&dev, "lora_transpose_bf16")?;
    let (mi, ri) = (i32_of(m, "rows")?, r as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&ws).arg(&mut out).arg(&mi).arg(&ri);
    let cfg = config(((m * r).div_ceil(256).min(4096) as u32, 1, 1), 256, 0);
    // SAFETY: arguments as lora.cu's lora_transpose_bf16.
    unsafe { launch::launch(&mut b, cfg) }?;
    drop(b);
    Ok(wrap(out, &dev, (r, m)))
}

/// `Y + scale · mask ⊙ (U · V(j, r)ᵀ)` as a new tensor: `y` `[n, M]`, `u` `[n, r]`; `v` `[M, r]`,
/// or with `vt` `[r, M]` (A used as Aᵀ). The mask (when given) is over `[n, M]`.
pub fn expand(y: &Tensor, u: &Tensor, v: &Tensor, vt: bool, dropout: Option<&Dropout>, scale: f32) -> Result<Tensor> {
    let _p = crate::profile::scope("·· lora expand");
    let (n, m) = y.dims2()?;
    let r = u.dim(1)?;
    anyhow::ensure!(u.dim(0)? == n && v.elem_count() == m * r, "LoRA expand: y {:?}, u {:?}, v {:?}", y.dims(), u.dims(), v.dims());
    match y.dtype() {
        DType::F32 => expand_t::<f32>(y, u, v, vt, dropout, scale, n, m, r),
        _ => expand_t::<bf16>(y, u, v, vt, dropout, scale, n, m, r),
    }
}

#[allow(clippy::too_many_arguments)]
fn expand_t<T: CudaDType + DeviceRepr>(y: &Tensor, u: &Tensor, v: &Tensor, vt: bool, dropout: Option<&Dropout>, scale: f32, n: usize, m: usize, r: usize) -> Result<Tensor> {
    let dev = device_of(y)?;
    let (y, u, v) = (y.contiguous()?, u.contiguous()?, v.contiguous()?);
    let (yg, yl) = y.storage_and_layout();
    let (ug, ul) = u.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (ys, us, vs) = (view::<T>(&yg, yl, "y")?, view::<T>(&ug, ul, "u")?, view::<T>(&vg, vl, "v")?);
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes all n·m outputs.
    let mut out = unsafe { dev.alloc::<T>(n * m)? };
    let (vt, mk, ni, mi, ri) = (i32::from(vt), MaskArg::of(dropout), i32_of(n, "rows")?, i32_of(m, "cols")?, r as i32);
    // bf16 with whole 16-byte rows: the rank-r product on tensor cores (rank padded to 16 or 32).
    let tc = y.dtype() == DType::BF16 && m % 8 == 0 && aligned16(&ys, &stream);
    let (func, cfg) = if tc {
        let func = MODULE.function(&dev, &format!("lora_expand_tc_r{}", if r <= 16 { 16 } else { 32 }))?;
        // 4 warps of 64 columns, 64 rows a block (lora.cu's ETW, ETR).
        (func, config((m.div_ceil(256) as u32, n.div_ceil(64) as u32, 1), 128, 0))
    } else {
        let func = MODULE.function(&dev, &name("expand", y.dtype(), r)?)?;
        (func, config((m.div_ceil(256) as u32, n.div_ceil(32) as u32, 1), 256, 0))
    };
    let mut b = stream.launch_builder(&func);
    b.arg(&ys).arg(&us).arg(&vs).arg(&vt).arg(&mk).arg(&scale).arg(&mut out).arg(&ni).arg(&mi).arg(&ri);
    // SAFETY: arguments as lora.cu's lora_expand / lora_expand_tc.
    unsafe { launch::launch(&mut b, cfg) }?;
    drop(b);
    Ok(wrap(out, &dev, (n, m)))
}

/// Blocks `grad`'s tensor-core kernel aims for (about three per SM of an H100/H200): enough to
/// keep memory busy, few per-split partials to add up.
const GRAD_TC_BLOCKS: usize = 396;
/// Rows each block of the f32 `grad` kernel sums.
const GRAD_ROWS: usize = 128;

/// `scale · Uᵀ · drop(X)` → f32 `[r, K]`, or with `tr` `[K, r]`: `u` `[n, r]`, `x` `[n, K]`.
/// Summed over row splits in a fixed order (deterministic).
pub fn grad(u: &Tensor, x: &Tensor, dropout: Option<&Dropout>, scale: f32, tr: bool) -> Result<Tensor> {
    let _p = crate::profile::scope("·· lora grad");
    let (n, k) = x.dims2()?;
    let r = u.dim(1)?;
    anyhow::ensure!(u.dim(0)? == n, "LoRA grad: u {:?}, x {:?}", u.dims(), x.dims());
    match x.dtype() {
        DType::F32 => grad_t::<f32>(u, x, dropout, scale, tr, n, k, r),
        _ => grad_t::<bf16>(u, x, dropout, scale, tr, n, k, r),
    }
}

#[allow(clippy::too_many_arguments)]
fn grad_t<T: CudaDType + DeviceRepr>(u: &Tensor, x: &Tensor, dropout: Option<&Dropout>, scale: f32, tr: bool, n: usize, k: usize, r: usize) -> Result<Tensor> {
    let dev = device_of(x)?;
    let (u, x) = (u.contiguous()?, x.contiguous()?);
    let (ug, ul) = u.storage_and_layout();
    let (xg, xl) = x.storage_and_layout();
    let (us, xs) = (view::<T>(&ug, ul, "u")?, view::<T>(&xg, xl, "x")?);
    let stream = dev.cuda_stream();
    let (mk, ni, ki, ri) = (MaskArg::of(dropout), i32_of(n, "rows")?, i32_of(k, "cols")?, r as i32);
    let tc = x.dtype() == DType::BF16 && k % 8 == 0 && aligned16(&xs, &stream);
    // Rows per split: a multiple of the kernels' row step (32).
    let cols = k.div_ceil(256);
    let rows = if tc { n.div_ceil(GRAD_TC_BLOCKS.div_ceil(cols).clamp(1, n.div_ceil(32))).div_ceil(32) * 32 } else { GRAD_ROWS };
    let splits = n.div_ceil(rows).max(1);
    // SAFETY: the kernel writes every (split, r, k) partial.
    let mut g = unsafe { dev.alloc::<f32>(splits * r * k)? };
    let func = if tc {
        MODULE.function(&dev, &format!("lora_grad_tc_r{}", compiled_rank(r).unwrap_or(32)))?
    } else {
        MODULE.function(&dev, &name("grad", x.dtype(), r)?)?
    };
    let rows_i = rows as i32;
    let mut b = stream.launch_builder(&func);
    b.arg(&us).arg(&xs).arg(&mk).arg(&scale).arg(&mut g).arg(&ni).arg(&ki).arg(&ri).arg(&rows_i);
    // tc: 4 warps of 64 columns (lora.cu's GTW); f32: one column per thread.
    let block = if tc { 128 } else { 256 };
    let cfg = config((cols as u32, splits as u32, 1), block, 0);
    // SAFETY: arguments as lora.cu's lora_grad_tc / lora_grad.
    unsafe { launch::launch(&mut b, cfg) }?;
    drop(b);
    // SAFETY: lora_sum_splits writes all r·k outputs.
    let mut out = unsafe { dev.alloc::<f32>(r * k)? };
    let func = MODULE.function(&dev, "lora_sum_splits")?;
    let (si, tri) = (splits as i32, i32::from(tr));
    let mut b = stream.launch_builder(&func);
    b.arg(&g).arg(&mut out).arg(&si).arg(&ri).arg(&ki).arg(&tri);
    let cfg = config(((r * k).div_ceil(256).min(4096) as u32, 1, 1), 256, 0);
    // SAFETY: arguments as lora.cu's lora_sum_splits.
    unsafe { launch::launch(&mut b, cfg) }?;
    drop(b);
    Ok(if tr { wrap(out, &dev, (k, r)) } else { wrap(out, &dev, (r, k)) })
}
