//! CUDA kernels of the training engine (feature `cuda`), from `src/kernels/cuda/train.cu`; the
//! CPU twins live beside the CPU kernels (`lora_cpu`).

use super::lora_cpu::Dropout;
use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Storage, Tensor};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/train.ptx"));
const MODULE: &str = "qscript_train";

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The scaled dropout keep-mask (0 or `1/(1−p)`) of `shape` on `dev`, element for element the
/// CPU's [`super::lora_cpu::scaled_mask`] (F32 or BF16).
pub fn dropout_mask(dev: &CudaDevice, shape: &[usize], dtype: DType, dr: &Dropout) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (k1, k2) = (dr.seed as u32, (dr.seed >> 32) as u32);
    let n64 = n as i64;
    let storage = match dtype {
        DType::F32 => launch::<f32>(dev, "dropout_mask_f32", k1, k2, dr, n64)?,
        DType::BF16 => launch::<bf16>(dev, "dropout_mask_bf16", k1, k2, dr, n64)?,
        other => bail!("dropout mask in {other:?}: f32 or bf16 only"),
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

fn launch<T: CudaDType + DeviceRepr>(dev: &CudaDevice, name: &str, k1: u32, k2: u32, dr: &Dropout, n: i64) -> Result<candle_core::CudaStorage> {
    // SAFETY: the kernel writes all n elements.
    let mut out = unsafe { dev.alloc::<T>(n as usize)? };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&k1).arg(&k2).arg(&dr.threshold).arg(&dr.scale).arg(&n).arg(&mut out);
    // SAFETY: the arguments match the kernel's signature in train.cu.
    unsafe { b.launch(grid(n as usize)) }.w()?;
    drop(b);
    Ok(T::wrap_cuda_slice(out, dev.clone()))
}

/// A contiguous CUDA tensor's buffer as a typed slice view.
pub(super) fn slice<'a, T: CudaDType>(g: &'a candle_core::StorageRef<'_>, l: &candle_core::Layout, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Storage::Cuda(cs) = &**g else { bail!("{what}: not a CUDA tensor") };
    let Some((a, b)) = l.contiguous_offsets() else { bail!("{what}: not contiguous") };
    Ok(cs.as_cuda_slice::<T>()?.slice(a..b))
}

fn row_blocks(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// `softmax(scale · s + mask)` over the last axis of attention scores `s` `[b, nh, c, t]` (a
/// tile of c query rows; f32 or bf16, contiguous), `mask` `[b, 1, c, t]` f32 additive; the
/// result in `s`'s dtype.
pub fn attn_softmax_fwd(s: &Tensor, mask: &Tensor, scale: f32) -> Result<Tensor> {
    let (b, nh, c, t) = s.dims4()?;
    anyhow::ensure!(mask.dims4()? == (b, 1, c, t) && mask.dtype() == DType::F32, "attention softmax: scores {:?}, mask {:?}", s.dims(), mask.dims());
    match s.dtype() {
        DType::F32 => softmax_fwd_t::<f32>(s, mask, scale, nh, "attn_softmax_fwd_f32"),
        DType::BF16 => softmax_fwd_t::<bf16>(s, mask, scale, nh, "attn_softmax_fwd_bf16"),
        other => bail!("attention softmax on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn softmax_fwd_t<T: CudaDType + DeviceRepr>(s: &Tensor, mask: &Tensor, scale: f32, nh: usize, name: &str) -> Result<Tensor> {
    let dev = cuda_dev(s)?;
    let (c, t) = (s.dim(2)?, s.dim(3)?);
    let rows = s.elem_count() / t.max(1);
    let (t32, rows_per_b, c32) = (t as i32, (nh * c) as i64, c as i32);
    let (sg, sl) = s.storage_and_layout();
    let (mg, ml) = mask.storage_and_layout();
    let (x, m) = (slice::<T>(&sg, sl, "scores")?, slice::<f32>(&mg, ml, "mask")?);
    // SAFETY: the kernel writes every element of its row.
    let mut out = unsafe { dev.alloc::<T>(rows * t)? };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut bld = stream.launch_builder(&func);
    bld.arg(&x).arg(&m).arg(&mut out).arg(&scale).arg(&t32).arg(&rows_per_b).arg(&c32);
    // SAFETY: arguments as in train.cu.
    unsafe { bld.launch(row_blocks(rows)) }.w()?;
    drop(bld);
    Ok(wrap(out, &dev, s.shape()))
}

/// Softmax backward over the last axis: `dS = P ⊙ (dP − Σ_j dP·P)`; `p`, `dp` contiguous, same
/// shape and dtype (f32 or bf16).
pub fn attn_softmax_bwd(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    anyhow::ensure!(p.dims() == dp.dims() && p.dtype() == dp.dtype(), "softmax backward: {:?} vs {:?}", p.dims(), dp.dims());
    match p.dtype() {
        DType::F32 => softmax_bwd_t::<f32>(p, dp, "attn_softmax_bwd_f32"),
        DType::BF16 => softmax_bwd_t::<bf16>(p, dp, "attn_softmax_bwd_bf16"),
        other => bail!("softmax backward on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn softmax_bwd_t<T: CudaDType + DeviceRepr>(p: &Tensor, dp: &Tensor, name: &str) -> Result<Tensor> {
    let dev = cuda_dev(p)?;
    let t = p.dim(candle_core::D::Minus1)?;
    let rows = p.elem_count() / t.max(1);
    let t32 = t as i32;
    let (pg, pl) = p.storage_and_layout();
    let (dg, dl) = dp.storage_and_layout();
    let (a, d) = (slice::<T>(&pg, pl, "p")?, slice::<T>(&dg, dl, "dp")?);
    // SAFETY: the kernel writes every element of its row.
    let mut out = unsafe { dev.alloc::<T>(rows * t)? };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut bld = stream.launch_builder(&func);
    bld.arg(&a).arg(&d).arg(&mut out).arg(&t32);
    // SAFETY: arguments as in train.cu.
    unsafe { bld.launch(row_blocks(rows)) }.w()?;
    drop(bld);
    Ok(wrap(out, &dev, p.shape()))
}

pub(super) fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("not a CUDA tensor"),
    }
}

/// A new tensor of `shape` owning the device buffer `s`.
pub(super) fn wrap<T: CudaDType>(s: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>, dev: &CudaDevice, shape: impl Into<candle_core::Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(T::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// RMSNorm forward over the last axis: `(y, rstd [rows, 1] f32)`; `x` and `w` contiguous, the
/// same dtype (f32 or bf16).
pub fn rms_norm_fwd(x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    match x.dtype() {
        DType::F32 => rms_fwd_t::<f32>(x, w, eps, "rms_fwd_f32"),
        DType::BF16 => rms_fwd_t::<bf16>(x, w, eps, "rms_fwd_bf16"),
        other => bail!("RMSNorm on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn rms_fwd_t<T: CudaDType + DeviceRepr>(x: &Tensor, w: &Tensor, eps: f32, name: &str) -> Result<(Tensor, Tensor)> {
    let dev = cuda_dev(x)?;
    let h = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / h.max(1);
    let h32 = h as i32;
    let (xg, xl) = x.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (xs, ws) = (slice::<T>(&xg, xl, "x")?, slice::<T>(&wg, wl, "w")?);
    // SAFETY: the kernel writes every element of y and every row's rstd.
    let (mut y, mut r) = unsafe { (dev.alloc::<T>(rows * h)?, dev.alloc::<f32>(rows)?) };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&xs).arg(&ws).arg(&mut y).arg(&mut r).arg(&h32).arg(&eps);
    // SAFETY: arguments as in train.cu.
    unsafe { b.launch(row_blocks(rows)) }.w()?;
    drop(b);
    Ok((wrap(y, &dev, x.shape()), wrap(r, &dev, (rows, 1))))
}

/// RMSNorm backward: `dx` from the saved `x`, `rstd` (f32) and `dy`; all contiguous.
pub fn rms_norm_bwd(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 => rms_bwd_t::<f32>(x, rstd, w, dy, "rms_bwd_f32"),
        DType::BF16 => rms_bwd_t::<bf16>(x, rstd, w, dy, "rms_bwd_bf16"),
        other => bail!("RMSNorm backward on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn rms_bwd_t<T: CudaDType + DeviceRepr>(x: &Tensor, rstd: &Tensor, w: &Tensor, dy: &Tensor, name: &str) -> Result<Tensor> {
    let dev = cuda_dev(x)?;
    let h = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / h.max(1);
    let h32 = h as i32;
    let (xg, xl) = x.storage_and_layout();
    let (rg, rl) = rstd.storage_and_layout();
    let (wg, wl) = w.storage_and_layout();
    let (dg, dl) = dy.storage_and_layout();
    let (xs, rs, ws, ds) = (slice::<T>(&xg, xl, "x")?, slice::<f32>(&rg, rl, "rstd")?, slice::<T>(&wg, wl, "w")?, slice::<T>(&dg, dl, "dy")?);
    // SAFETY: the kernel writes every element of dx.
    let mut dx = unsafe { dev.alloc::<T>(rows * h)? };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&xs).arg(&rs).arg(&ws).arg(&ds).arg(&mut dx).arg(&h32);
    // SAFETY: arguments as in train.cu.
    unsafe { b.launch(row_blocks(rows)) }.w()?;
    drop(b);
    Ok(wrap(dx, &dev, x.shape()))
}

/// SwiGLU forward `silu(g)·u` (contiguous, same shape and dtype).
pub fn swiglu_fwd(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    match g.dtype() {
        DType::F32 => swiglu_fwd_t::<f32>(g, u, "swiglu_fwd_f32"),
        DType::BF16 => swiglu_fwd_t::<bf16>(g, u, "swiglu_fwd_bf16"),
        other => bail!("SwiGLU on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn swiglu_fwd_t<T: CudaDType + DeviceRepr>(g: &Tensor, u: &Tensor, name: &str) -> Result<Tensor> {
    let dev = cuda_dev(g)?;
    let n = g.elem_count();
    let n64 = n as i64;
    let (gg, gl) = g.storage_and_layout();
    let (ug, ul) = u.storage_and_layout();
    let (gs, us) = (slice::<T>(&gg, gl, "g")?, slice::<T>(&ug, ul, "u")?);
    // SAFETY: the kernel writes all n elements.
    let mut h = unsafe { dev.alloc::<T>(n)? };
    let stream = dev.cuda_stream();
    let x8 = by8::<T>(n, &[gs.device_ptr(&stream).0, us.device_ptr(&stream).0, h.device_ptr(&stream).0]);
    let func = super::cuda::function(&dev, MODULE, PTX, if x8 { "swiglu_fwd_bf16x8" } else { name })?;
    let n64 = if x8 { n64 / 8 } else { n64 };
    let mut b = stream.launch_builder(&func);
    b.arg(&gs).arg(&us).arg(&mut h).arg(&n64);
    // SAFETY: arguments as in train.cu.
    unsafe { b.launch(grid(n64 as usize)) }.w()?;
    drop(b);
    Ok(wrap(h, &dev, g.shape()))
}

/// Can an elementwise bf16 kernel take its `n` elements 8 at a time (16-byte accesses)? (The
/// kernels here are f32 or bf16, so a 2-byte `T` is bf16.)
fn by8<T>(n: usize, ptrs: &[u64]) -> bool {
    std::mem::size_of::<T>() == 2 && n % 8 == 0 && ptrs.iter().all(|p| p % 16 == 0)
}

/// SwiGLU backward: `(dg, du)`.
pub fn swiglu_bwd(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    match g.dtype() {
        DType::F32 => swiglu_bwd_t::<f32>(g, u, dh, "swiglu_bwd_f32"),
        DType::BF16 => swiglu_bwd_t::<bf16>(g, u, dh, "swiglu_bwd_bf16"),
        other => bail!("SwiGLU backward on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn swiglu_bwd_t<T: CudaDType + DeviceRepr>(g: &Tensor, u: &Tensor, dh: &Tensor, name: &str) -> Result<(Tensor, Tensor)> {
    let dev = cuda_dev(g)?;
    let n = g.elem_count();
    let n64 = n as i64;
    let (gg, gl) = g.storage_and_layout();
    let (ug, ul) = u.storage_and_layout();
    let (hg, hl) = dh.storage_and_layout();
    let (gs, us, hs) = (slice::<T>(&gg, gl, "g")?, slice::<T>(&ug, ul, "u")?, slice::<T>(&hg, hl, "dh")?);
    // SAFETY: the kernel writes all n elements of both outputs.
    let (mut dg, mut du) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
    let stream = dev.cuda_stream();
    let ptrs = [gs.device_ptr(&stream).0, us.device_ptr(&stream).0, hs.device_ptr(&stream).0, dg.device_ptr(&stream).0, du.device_ptr(&stream).0];
    let x8 = by8::<T>(n, &ptrs);
    let func = super::cuda::function(&dev, MODULE, PTX, if x8 { "swiglu_bwd_bf16x8" } else { name })?;
    let n64 = if x8 { n64 / 8 } else { n64 };
    let mut b = stream.launch_builder(&func);
    b.arg(&gs).arg(&us).arg(&hs).arg(&mut dg).arg(&mut du).arg(&n64);
    // SAFETY: arguments as in train.cu.
    unsafe { b.launch(grid(n64 as usize)) }.w()?;
    drop(b);
    Ok((wrap(dg, &dev, g.shape()), wrap(du, &dev, g.shape())))
}

/// Cross-entropy of logits `[c, V]` (f32 or bf16, contiguous) against `targets` `[c]` (u32, all
/// in range): per-row losses `[c]` f32 and, with `grad_scale`, `grad_scale · (softmax − onehot)`
/// in the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, grad_scale: Option<f32>) -> Result<(Tensor, Option<Tensor>)> {
    match logits.dtype() {
        DType::F32 => xent_t::<f32>(logits, targets, grad_scale, "xent_f32"),
        DType::BF16 => xent_t::<bf16>(logits, targets, grad_scale, "xent_bf16"),
        other => bail!("cross-entropy on CUDA: {other:?} (f32 or bf16)"),
    }
}

fn xent_t<T: CudaDType + DeviceRepr>(logits: &Tensor, targets: &Tensor, grad_scale: Option<f32>, name: &str) -> Result<(Tensor, Option<Tensor>)> {
    let dev = cuda_dev(logits)?;
    let (c, v) = logits.dims2()?;
    anyhow::ensure!(targets.dims() == [c] && targets.dtype() == DType::U32, "cross-entropy: logits {:?}, targets {:?}", logits.dims(), targets.dims());
    let (lg, ll) = logits.storage_and_layout();
    let (tg, tl) = targets.storage_and_layout();
    let (ls, ts) = (slice::<T>(&lg, ll, "logits")?, slice::<u32>(&tg, tl, "targets")?);
    let g = grad_scale.unwrap_or(0.0);
    // SAFETY: the kernel writes every row's loss, and every gradient element when g ≠ 0 (the
    // buffer is one element when there is no gradient, and never touched).
    let (mut loss, mut dl) = unsafe { (dev.alloc::<f32>(c)?, dev.alloc::<T>(if g != 0.0 { c * v } else { 1 })?) };
    let v32 = v as i32;
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&ls).arg(&ts).arg(&g).arg(&mut dl).arg(&mut loss).arg(&v32);
    let cfg = LaunchConfig { grid_dim: (c as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: arguments as in train.cu.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    let dl = (g != 0.0).then(|| wrap(dl, &dev, (c, v)));
    Ok((wrap(loss, &dev, c), dl))
}

/// Rows `[b·t, h·d]` → heads `[b, h, t, d]` (or back with `merge`), rotated by RoPE with the
/// per-token `rope` tables `[b, t, d/2]` when given (backward when merging). `x` contiguous, f32
/// or bf16, the tables in its dtype.
#[allow(clippy::too_many_arguments)]
pub fn heads_rope(x: &Tensor, rope: Option<(&Tensor, &Tensor)>, b: usize, t: usize, h: usize, d: usize, merge: bool) -> Result<Tensor> {
    anyhow::ensure!(x.elem_count() == b * t * h * d && d % 2 == 0, "heads/RoPE: {:?} as {b}×{t}×{h}×{d}", x.dims());
    if let Some((c, s)) = rope {
        anyhow::ensure!(c.elem_count() == b * t * d / 2 && s.elem_count() == c.elem_count(), "RoPE tables {:?} for {b}×{t} tokens of head dim {d}", c.dims());
    }
    match x.dtype() {
        DType::F32 => heads_rope_t::<f32>(x, rope, b, t, h, d, merge, "heads_rope_f32"),
        DType::BF16 => heads_rope_t::<bf16>(x, rope, b, t, h, d, merge, "heads_rope_bf16"),
        other => bail!("heads/RoPE on CUDA: {other:?} (f32 or bf16)"),
    }
}

#[allow(clippy::too_many_arguments)]
fn heads_rope_t<T: CudaDType + DeviceRepr>(x: &Tensor, rope: Option<(&Tensor, &Tensor)>, b: usize, t: usize, h: usize, d: usize, merge: bool, name: &str) -> Result<Tensor> {
    let dev = cuda_dev(x)?;
    // Without a rotation the tables are never read: x stands in for them.
    let (cos, sin) = match rope {
        Some((c, s)) => (c.contiguous()?, s.contiguous()?),
        None => (x.clone(), x.clone()),
    };
    let (xg, xl) = x.storage_and_layout();
    let (cg, cl) = cos.storage_and_layout();
    let (sg, sl) = sin.storage_and_layout();
    let (xs, cs, ss) = (slice::<T>(&xg, xl, "x")?, slice::<T>(&cg, cl, "cos")?, slice::<T>(&sg, sl, "sin")?);
    let n = b * t * h * d;
    // SAFETY: every (token, head, pair) writes both of its elements.
    let mut y = unsafe { dev.alloc::<T>(n)? };
    let (t32, h32, d32, rot, mg, pairs) = (t as i32, h as i32, d as i32, i32::from(rope.is_some()), i32::from(merge), (n / 2) as i64);
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, name)?, dev.cuda_stream());
    let mut bl = stream.launch_builder(&func);
    bl.arg(&xs).arg(&cs).arg(&ss).arg(&mut y).arg(&t32).arg(&h32).arg(&d32).arg(&rot).arg(&mg).arg(&pairs);
    // SAFETY: arguments as in train.cu.
    unsafe { bl.launch(grid(n / 2)) }.w()?;
    drop(bl);
    Ok(if merge { wrap(y, &dev, (b * t, h * d)) } else { wrap(y, &dev, (b, h, t, d)) })
}

/// The AdamW update of flat f32 `w`, `m`, `v` with gradients `g` (all `[n]`, contiguous):
/// `(w', m', v')`, bit for bit the host's update (`train::optim`). `c` = (decay, 1 − β1, β2,
/// 1 − β2, eps, √(bias correction 2), step size), as f32.
pub fn adamw(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: [f32; 7]) -> Result<(Tensor, Tensor, Tensor)> {
    let n = w.elem_count();
    anyhow::ensure!([m, v, g].iter().all(|t| t.elem_count() == n && t.dtype() == DType::F32) && w.dtype() == DType::F32, "AdamW on CUDA: f32 vectors of one length");
    let dev = cuda_dev(w)?;
    let (wg, wl) = w.storage_and_layout();
    let (mg, ml) = m.storage_and_layout();
    let (vg, vl) = v.storage_and_layout();
    let (gg, gl) = g.storage_and_layout();
    let (ws, ms, vs, gs) = (slice::<f32>(&wg, wl, "w")?, slice::<f32>(&mg, ml, "m")?, slice::<f32>(&vg, vl, "v")?, slice::<f32>(&gg, gl, "g")?);
    // SAFETY: the kernel writes all n elements of each output.
    let (mut w2, mut m2, mut v2) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?) };
    let (func, stream) = (super::cuda::function(&dev, MODULE, PTX, "adamw_f32")?, dev.cuda_stream());
    let n64 = n as i64;
    let mut b = stream.launch_builder(&func);
    b.arg(&ws).arg(&ms).arg(&vs).arg(&gs).arg(&mut w2).arg(&mut m2).arg(&mut v2).arg(&n64);
    for x in &c {
        b.arg(x);
    }
    // SAFETY: arguments as train.cu's adamw_f32.
    unsafe { b.launch(grid(n)) }.w()?;
    drop(b);
    Ok((wrap(w2, &dev, n), wrap(m2, &dev, n), wrap(v2, &dev, n)))
}
