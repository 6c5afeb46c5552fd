//! Fused kernels of batch-1 decoding with 4-bit weights (feature `cuda`), from `decode.cu`:
//! per layer RMSNorm + q/k/v + RoPE + KV append, attention, o_proj + residual, RMSNorm +
//! gate/up + SwiGLU, down_proj + residual: five launches (`decode::layer` chains them).
//! Activations f32 or bf16, statistics and sums f32.
//!
//! The launchers write in place into tensors the caller owns (the residual stream, the KV cache,
//! scratch vectors): those must not share their storage with any other tensor. They only enqueue
//! work on the device's stream (no host synchronisation).

use crate::kernels::launch::{self, addr, config, float_name, ptx_module, Module};
use super::{GpuKv, LayerWeights, Pos, Scratch};
use crate::kernels::quant4::{gemv_blocks, gemv_lanes, Quant4Gpu};
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaFunction, CudaGraph, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;
use candle_core::{CudaDevice, DType, Storage, Tensor};
use half::bf16;

const MODULE: Module = ptx_module!("decode");
/// Dynamic shared memory the norm-fused kernels may use without opting in (the normed row, f32).
const MAX_SHARED: usize = 48 * 1024;
/// Threads per block of the attention kernel (`ATT_WARPS` warps in decode.cu).
const ATT_THREADS: u32 = 256;

/// A 4-bit weight as the kernels take it, by value (`W4` in decode.cu, the same layout):
/// device addresses of the codes, table and statistics (as `Quant4Gpu::push_stats` orders them),
/// then the numbers.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct W4Arg {
    pub packed: u64,
    pub lut: u64,
    pub absmax: u64,
    pub absmax_q: u64,
    pub nested_absmax: u64,
    pub nested_code: u64,
    pub offset: f32,
    pub log2_nested: i32,
    pub log2_bs: i32,
    pub pad: i32,
    pub rows: i32,
    pub cols: i32,
}
const _: () = assert!(std::mem::size_of::<W4Arg>() == 72);
// SAFETY: plain numbers, laid out as decode.cu's W4 (checked by the static asserts on both sides).
unsafe impl DeviceRepr for W4Arg {}

/// The kernel `name` of decode.ptx on `dev` (cached per thread).
fn kernel(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    MODULE.function(dev, name)
}

/// "f32" or "bf16": the kernel name part of the activations' dtype.
fn act_name(dtype: DType) -> Result<&'static str> {
    float_name(dtype, "fused decode activations")
}

/// The device address of a contiguous tensor on `dev` with `n` elements of `dtype`.
fn tensor_addr(t: &Tensor, dtype: DType, n: usize, dev: &CudaDevice, what: &str) -> Result<u64> {
    ensure!(t.dtype() == dtype, "{what}: {:?}, expected {dtype:?}", t.dtype());
    ensure!(t.elem_count() == n, "{what}: shape {:?}, expected {n} elements", t.dims());
    let (g, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*g else { bail!("{what}: not on a CUDA device") };
    ensure!(cs.device.id() == dev.id(), "{what}: on another CUDA device than the weights");
    let (a, b) = l.contiguous_offsets().with_context(|| format!("{what}: not contiguous"))?;
    let stream = dev.cuda_stream();
    Ok(match dtype {
        DType::F32 => addr(&cs.as_cuda_slice::<f32>()?.slice(a..b), &stream),
        DType::BF16 => addr(&cs.as_cuda_slice::<bf16>()?.slice(a..b), &stream),
        DType::U32 => addr(&cs.as_cuda_slice::<u32>()?.slice(a..b), &stream),
        other => bail!("{what}: {other:?}"),
    })
}

/// The GEMVs' weights: fast-kernel layout and one scales layout (it picks the kernel).
fn check_weights(ws: &[&Quant4Gpu]) -> Result<&'static str> {
    let kind = ws[0].kind();
    for w in ws {
        ensure!(w.fused_ok(), "fused decode: 4-bit weight {:?} needs whole 32-element chunks per row", w.shape());
        ensure!(w.kind() == kind && w.cuda_device().id() == ws[0].cuda_device().id(), "fused decode: weights with mixed scale layouts or devices");
    }
    Ok(kind)
}

/// The launch of a GEMV kernel over `groups` thread groups for rows of `cols` inputs, with the
/// normed row in shared memory when `norm`: (lanes per group, config).
fn gemv_launch(w: &Quant4Gpu, groups: usize, cols: usize, norm: bool) -> Result<(usize, LaunchConfig)> {
    let lanes = gemv_lanes(cols / 32);
    let mut cfg = gemv_blocks(groups * lanes, w.sms());
    if norm {
        ensure!(4 * cols <= MAX_SHARED, "fused decode: hidden size {cols} too large for the shared-memory norm");
        cfg.shared_mem_bytes = (4 * cols) as u32;
    }
    Ok((lanes, cfg))
}

/// The device address of the position `p` holds (checked against its host copy's bounds by the
/// caller).
fn pos_addr(p: &Pos, dev: &CudaDevice) -> Result<u64> {
    tensor_addr(p.dev, DType::U32, 1, dev, "position")
}

/// RMSNorm of `x` [hidden] (weight `norm_w`, `eps`), then its q, k, v projections; q and k
/// rotated for position `pos` (tables `cos`/`sin` [positions, d/2]); q into `q_out` [heads·d],
/// k and v into the caches [kv_heads, cap, d] at `pos`.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope(x: &Tensor, norm_w: &Tensor, eps: f32, w: [&Quant4Gpu; 3], cos: &Tensor, sin: &Tensor, pos: &Pos, d: usize, q_out: &Tensor, k_cache: &Tensor, v_cache: &Tensor) -> Result<()> {
    let (pos_p, pos) = (pos_addr(pos, w[0].cuda_device())?, pos.at);
    let (dt, t) = (x.dtype(), act_name(x.dtype())?);
    let kind = check_weights(&w)?;
    let dev = w[0].cuda_device();
    let (&[rq, cols], &[rk, ck], &[rv, cv]) = (w[0].shape(), w[1].shape(), w[2].shape()) else { unreachable!("fused_ok: 2-D") };
    ensure!(ck == cols && cv == cols && rk == rv, "qkv: weights {:?} {:?} {:?}", w[0].shape(), w[1].shape(), w[2].shape());
    ensure!(d % 4 == 0 && rq % d == 0 && rk % d == 0, "qkv: head_dim {d} does not fit q {rq} / kv {rk} rows");
    let (kvh, cap, d2) = k_cache.dims3()?;
    ensure!(d2 == d && kvh * d == rk && v_cache.dims() == k_cache.dims() && pos < cap, "qkv: cache {:?} for position {pos}", k_cache.dims());
    let (positions, half) = cos.dims2()?;
    ensure!(half * 2 == d && pos < positions && sin.dims() == cos.dims(), "qkv: rope tables {:?} for position {pos}", cos.dims());
    let x_p = tensor_addr(x, dt, cols, dev, "x")?;
    let n_p = tensor_addr(norm_w, dt, cols, dev, "norm weight")?;
    let cos_p = tensor_addr(cos, dt, positions * half, dev, "cos")?;
    let sin_p = tensor_addr(sin, dt, positions * half, dev, "sin")?;
    let q_p = tensor_addr(q_out, dt, rq, dev, "q")?;
    let k_p = tensor_addr(k_cache, dt, kvh * cap * d, dev, "k cache")?;
    let v_p = tensor_addr(v_cache, dt, kvh * cap * d, dev, "v cache")?;
    let (lanes, cfg) = gemv_launch(w[0], (rq + rk + rv) / 4, cols, true)?;
    let args = w.map(Quant4Gpu::decode_arg);
    let (d, cap) = (d as i32, cap as i32);
    let (func, stream) = (kernel(dev, &format!("dec_qkv_{t}_{kind}_l{lanes}"))?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&x_p).arg(&n_p).arg(&eps).arg(&cos_p).arg(&sin_p);
    b.arg(&pos_p).arg(&d).arg(&cap).arg(&q_p).arg(&k_p).arg(&v_p);
    // SAFETY: arguments as decode.cu's dec_qkv_*; every buffer's size checked above.
    unsafe { launch::launch(&mut b, cfg) }?;
    Ok(())
}

/// Attention of the query `q` [heads·d] at position `pos` over positions `0..=pos` of the caches
/// [kv_heads, cap, d] (query head h reads KV head h / (heads / kv_heads)), into `out` [heads·d].
pub fn attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, pos: &Pos, out: &Tensor) -> Result<()> {
    let (dt, t) = (q.dtype(), act_name(q.dtype())?);
    let dev = match &*q.storage_and_layout().0 {
        Storage::Cuda(cs) => cs.device.clone(),
        _ => bail!("attention: q is not on a CUDA device"),
    };
    let (kvh, cap, d) = k_cache.dims3()?;
    let h = q.elem_count() / d.max(1);
    ensure!(matches!(d, 32 | 64 | 128 | 256), "attention: head_dim {d} (32, 64, 128 or 256)");
    ensure!(h * d == q.elem_count() && kvh > 0 && h % kvh == 0, "attention: q {:?} for {kvh} KV heads of {d}", q.dims());
    let len = pos.at + 1;
    ensure!(v_cache.dims() == k_cache.dims() && len <= cap, "attention: {len} positions in a cache {:?}", k_cache.dims());
    let pos_p = pos_addr(pos, &dev)?;
    let q_p = tensor_addr(q, dt, h * d, &dev, "q")?;
    let k_p = tensor_addr(k_cache, dt, kvh * cap * d, &dev, "k cache")?;
    let v_p = tensor_addr(v_cache, dt, kvh * cap * d, &dev, "v cache")?;
    let o_p = tensor_addr(out, dt, h * d, &dev, "attention output")?;
    let (cap, rep) = (cap as i32, (h / kvh) as i32);
    let scale = 1.0 / (d as f32).sqrt();
    let cfg = config((h as u32, 1, 1), ATT_THREADS, 0);
    let (func, stream) = (kernel(&dev, &format!("dec_attn_{t}_d{d}"))?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&q_p).arg(&k_p).arg(&v_p).arg(&o_p).arg(&cap).arg(&pos_p).arg(&rep).arg(&scale);
    // SAFETY: arguments as decode.cu's dec_attn_*; sizes checked above.
    unsafe { launch::launch(&mut b, cfg) }?;
    Ok(())
}

/// `x += W h`: `h` [in], `x` [out] (the residual stream after o_proj or down_proj).
pub fn residual(w: &Quant4Gpu, h: &Tensor, x: &Tensor) -> Result<()> {
    let (dt, t) = (x.dtype(), act_name(x.dtype())?);
    let kind = check_weights(&[w])?;
    let dev = w.cuda_device();
    let &[rows, cols] = w.shape() else { unreachable!("fused_ok: 2-D") };
    let h_p = tensor_addr(h, dt, cols, dev, "GEMV input")?;
    let x_p = tensor_addr(x, dt, rows, dev, "residual")?;
    let (lanes, cfg) = gemv_launch(w, rows.div_ceil(4), cols, false)?;
    let arg = w.decode_arg();
    let (func, stream) = (kernel(dev, &format!("dec_residual_{t}_{kind}_l{lanes}"))?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&arg).arg(&h_p).arg(&x_p);
    // SAFETY: arguments as decode.cu's dec_residual_*; sizes checked above.
    unsafe { launch::launch(&mut b, cfg) }?;
    Ok(())
}

/// RMSNorm of `x` [hidden] (weight `norm_w`, `eps`), then `h = silu(W_gate x̂) · (W_up x̂)` into
/// `h` [intermediate].
pub fn gate_up(x: &Tensor, norm_w: &Tensor, eps: f32, gate: &Quant4Gpu, up: &Quant4Gpu, h: &Tensor) -> Result<()> {
    let (dt, t) = (x.dtype(), act_name(x.dtype())?);
    let kind = check_weights(&[gate, up])?;
    let dev = gate.cuda_device();
    let &[rows, cols] = gate.shape() else { unreachable!("fused_ok: 2-D") };
    ensure!(up.shape() == gate.shape(), "gate/up: weights {:?} and {:?}", gate.shape(), up.shape());
    let x_p = tensor_addr(x, dt, cols, dev, "x")?;
    let n_p = tensor_addr(norm_w, dt, cols, dev, "norm weight")?;
    let h_p = tensor_addr(h, dt, rows, dev, "SwiGLU output")?;
    let (lanes, cfg) = gemv_launch(gate, rows.div_ceil(2), cols, true)?;
    let (ga, ua) = (gate.decode_arg(), up.decode_arg());
    let (func, stream) = (kernel(dev, &format!("dec_gate_up_{t}_{kind}_l{lanes}"))?, dev.cuda_stream());
    let mut b = stream.launch_builder(&func);
    b.arg(&ga).arg(&ua).arg(&x_p).arg(&n_p).arg(&eps).arg(&h_p);
    // SAFETY: arguments as decode.cu's dec_gate_up_*; sizes checked above.
    unsafe { launch::launch(&mut b, cfg) }?;
    Ok(())
}

/// A decode step's layer launches captured as a CUDA graph, and what the capture baked in:
/// every buffer address the launches read or write and the caches' capacity ([`step_key`]).
/// The graph replays while that key holds (the position is read from device memory); a new key
/// (the caches grew, another scratch or weights) runs the step eagerly, and the next step with
/// it is captured: by then every kernel is loaded, which a capture may not do.
#[derive(Default)]
pub struct Replay {
    key: Vec<u64>,
    graph: Option<Graph>,
    /// Steps run by launching a captured graph.
    pub replays: u64,
}

struct Graph(CudaGraph);
// SAFETY: the graph is launched only through `&mut Replay`, by the thread that holds the cache it
// belongs to, never concurrently; CUDA graph handles are not tied to a thread.
unsafe impl Send for Graph {}

impl Replay {
    /// The step's launches (`enqueue`, all on `stream`) for `key`: the graph's replay, a capture
    /// then its first launch, or the launches themselves (see the type).
    pub fn run(&mut self, stream: &Arc<CudaStream>, key: Vec<u64>, enqueue: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.key != key {
            self.key = key;
            self.graph = None;
            return enqueue();
        }
        if self.graph.is_none() {
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let launched = enqueue();
            // Always ended: a stream left capturing fails every later launch.
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            launched?;
            self.graph = Some(Graph(graph?.context("fused decode: the captured step is empty")?));
        }
        let Some(Graph(g)) = &self.graph else { unreachable!("captured above") };
        g.launch()?;
        self.replays += 1;
        Ok(())
    }
}

/// What a captured step depends on besides the position: the addresses of `tensors` (residual
/// stream, scratch, caches, norms, RoPE tables), of every 4-bit weight's buffers, and `numbers`
/// (capacities, eps bits).
pub fn step_key(tensors: &[&Tensor], weights: &[&Quant4Gpu], numbers: &[u64]) -> Result<Vec<u64>> {
    let mut key = Vec::with_capacity(tensors.len() + 3 * weights.len() + numbers.len());
    for t in tensors {
        let dev = launch::device_of(t)?;
        key.push(tensor_addr(t, t.dtype(), t.elem_count(), &dev, "decode step buffer")?);
    }
    for w in weights {
        let a = w.decode_arg();
        key.extend([a.packed, a.absmax, a.absmax_q]);
    }
    key.extend_from_slice(numbers);
    Ok(key)
}

/// `dst` = `src` (same dtype and element count, contiguous), and the position's device copy set
/// to `pos`: the step's inputs written into the buffers a captured graph reads.
pub fn set_inputs(src: &Tensor, dst: &Tensor, pos: &Pos) -> Result<()> {
    let dev = launch::device_of(dst)?;
    let n = dst.elem_count();
    ensure!(src.elem_count() == n && src.dtype() == dst.dtype(), "decode step input: {:?} into {:?}", src.shape(), dst.shape());
    let (s, d) = (tensor_addr(src, src.dtype(), n, &dev, "embedding")?, tensor_addr(dst, dst.dtype(), n, &dev, "residual stream")?);
    let p = pos_addr(pos, &dev)?;
    let at = [u32::try_from(pos.at).context("decode position")?];
    let stream = dev.cuda_stream();
    // SAFETY: both addresses hold n elements of the dtype (checked above); `at` is copied to a
    // staging buffer before the call returns (pageable memory), into the position's 4 bytes.
    unsafe {
        result::memcpy_dtod_async(d, s, n * src.dtype().size_in_bytes(), stream.cu_stream())?;
        result::memcpy_htod_async(p, &at, stream.cu_stream())?;
    }
    Ok(())
}

/// [`super::layers`] on CUDA: the inputs written into the scratch buffers, then the layers'
/// launches through the step's [`Replay`].
#[allow(clippy::too_many_arguments)]
pub(super) fn layers(emb: &Tensor, layers: &[LayerWeights], cos: &Tensor, sin: &Tensor, pos: usize, d: usize, kvs: &mut [&mut GpuKv], s: &mut Scratch) -> Result<Tensor> {
    let p = Pos { at: pos, dev: &s.pos };
    set_inputs(emb, &s.x, &p)?;
    let mut tensors = vec![&s.x, &s.q, &s.att, &s.mlp, &s.pos, cos, sin];
    let mut numbers = Vec::with_capacity(3 * layers.len());
    for (l, kv) in layers.iter().zip(kvs.iter()) {
        tensors.extend([&kv.k, &kv.v, l.attn_norm.0, l.mlp_norm.0]);
        numbers.extend([kv.k.dim(1)? as u64, l.attn_norm.1.to_bits() as u64, l.mlp_norm.1.to_bits() as u64]);
    }
    let weights: Vec<&Quant4Gpu> = layers.iter().flat_map(|l| l.proj).collect();
    let key = step_key(&tensors, &weights, &numbers)?;
    let stream = launch::device_of(&s.x)?.cuda_stream();
    let (x, q, att, mlp) = (&s.x, &s.q, &s.att, &s.mlp);
    s.replay.run(&stream, key, || {
        for (l, kv) in layers.iter().zip(kvs.iter()) {
            let w = &l.proj;
            let ((n1, e1), (n2, e2)) = (l.attn_norm, l.mlp_norm);
            qkv_rope(x, n1, e1, [w[0], w[1], w[2]], cos, sin, &p, d, q, &kv.k, &kv.v)?;
            attention(q, &kv.k, &kv.v, &p, att)?;
            residual(w[3], att, x)?;
            gate_up(x, n2, e2, w[4], w[5], mlp)?;
            residual(w[6], mlp, x)?;
        }
        Ok(())
    })?;
    for kv in kvs.iter_mut() {
        kv.len = pos + 1;
    }
    Ok(s.x.clone())
}
