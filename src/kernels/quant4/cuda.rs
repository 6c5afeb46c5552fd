//! bitsandbytes 4-bit weights resident on a CUDA device (feature `cuda`), from `quant4.cu`.
//!
//! [`Quant4Gpu`] is the device copy of a [`Quantized4bit`]: the packed codes, the per-block
//! scales as the checkpoint stores them (f32, or under double quantization u8 codes plus the
//! nested statistics, rebuilt on the fly inside the kernels: 1 byte per block on the device and
//! in the GEMV's memory traffic, not 4), and the 16-entry dequantization table. Its
//! [`dequantize`](Quant4Gpu::dequantize) is bit-identical with the CPU's
//! [`crate::quant::dequantize_4bit`]; [`gemv`](Quant4Gpu::gemv) is the fused batch-1 product that
//! never materialises the weight. The kernels' argument order is mirrored here.

use crate::kernels::launch::{self, addr, aligned16, blocks, Module, ptx_module};
use crate::quant::codebook::dequant_table;
use crate::quant::{Absmax, Quantized4bit, QuantType};
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

const MODULE: Module = ptx_module!("quant4");
/// Threads per block of the dequantization kernel (each thread does 32 elements).
const DEQUANT_THREADS: usize = 256;
/// Threads per block of the GEMV kernels (at most; see [`gemv_blocks`]).
const GEMV_THREADS: usize = 128;
/// Rows per thread group in the fast GEMV (`ROWS` in quant4.cu).
const GEMV_ROWS: usize = 4;

/// Per-block scales on the device.
enum Scales {
    Plain(CudaSlice<f32>),
    Double { q: CudaSlice<u8>, nested: CudaSlice<f32>, code: CudaSlice<f32>, offset: f32, log2_nested: i32 },
}

/// A 4-bit weight on a CUDA device (see the module docs).
pub struct Quant4Gpu {
    dev: CudaDevice,
    shape: Vec<usize>,
    numel: usize,
    log2_bs: i32,
    packed: CudaSlice<u8>,
    lut: CudaSlice<f32>,
    scales: Scales,
    /// Multiprocessors of the device (sizes the GEMV's blocks).
    sms: usize,
}

/// The GEMV's launch over `threads` threads: blocks of 128, halved (down to one warp) while
/// that leaves fewer than two blocks per multiprocessor, so small layers (e.g. 1024 rows: 256
/// row groups) still spread over the whole GPU instead of a few dozen SMs.
pub(crate) fn gemv_blocks(threads: usize, sms: usize) -> LaunchConfig {
    let mut per_block = GEMV_THREADS;
    while per_block > 32 && threads.div_ceil(per_block) < 2 * sms {
        per_block /= 2;
    }
    blocks(threads, per_block)
}

/// Lanes per row group of the fast GEMV for a row of `chunks` 32-element chunks: the group size
/// (32, 16 or 8) that leaves the fewest lanes idle on the last pass, the widest on ties.
pub(crate) fn gemv_lanes(chunks: usize) -> usize {
    [32, 16, 8].into_iter().min_by_key(|&l| l * chunks.div_ceil(l)).expect("non-empty")
}

impl Quant4Gpu {
    /// Copy the codes, scales and dequantization table of `q` to `dev`.
    pub fn upload(q: &Quantized4bit, dev: &CudaDevice) -> Result<Self> {
        q.validate()?;
        ensure!(q.numel() > 0, "empty 4-bit weight (shape {:?})", q.state.shape);
        ensure!(q.numel() / 32 < (u32::MAX as usize) * DEQUANT_THREADS, "4-bit weight too large for one launch: {:?}", q.state.shape);
        let s = &q.state;
        let sms = dev.cuda_stream().context().attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()?;
        let scales = match &s.absmax {
            Absmax::Plain(a) => Scales::Plain(dev.clone_htod(a.as_slice())?),
            Absmax::Double { absmax_q, offset, nested_blocksize, nested_absmax, nested_code } => Scales::Double {
                q: dev.clone_htod(absmax_q.as_slice())?,
                nested: dev.clone_htod(nested_absmax.as_slice())?,
                code: dev.clone_htod(&nested_code[..])?,
                offset: *offset,
                log2_nested: nested_blocksize.trailing_zeros() as i32,
            },
        };
        Ok(Self {
            dev: dev.clone(),
            shape: s.shape.clone(),
            numel: q.numel(),
            log2_bs: s.blocksize.trailing_zeros() as i32,
            packed: dev.clone_htod(q.packed.as_slice())?,
            lut: dev.clone_htod(&dequant_table(s.quant_type)[..])?,
            scales,
            sms: sms.max(1) as usize,
        })
    }

    /// Shape of the weight (`[out, in]` for a linear layer).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Bytes held on the device (codes, scales, tables).
    pub fn device_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::Plain(a) => 4 * a.len(),
            Scales::Double { q, nested, code, .. } => q.len() + 4 * nested.len() + 4 * code.len(),
        };
        self.packed.len() + 4 * self.lut.len() + scales
    }

    /// Kernel name suffix for the scales' layout.
    pub(crate) fn kind(&self) -> &'static str {
        match self.scales {
            Scales::Plain(_) => "plain",
            Scales::Double { .. } => "dq",
        }
    }

    /// The statistics arguments every kernel takes: (absmax, absmax_q, nested_absmax,
    /// nested_code, offset, log2_nested). Slots a kernel does not read get any valid buffer.
    fn push_stats<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match &self.scales {
            Scales::Plain(a) => b.arg(a).arg(a).arg(a).arg(a).arg(&0f32).arg(&0i32),
            Scales::Double { q, nested, code, offset, log2_nested } => {
                b.arg(nested).arg(q).arg(nested).arg(code).arg(offset).arg(log2_nested)
            }
        };
    }

    /// Whether the fused decode kernels (`kernels::decode`) take this weight: a 2-D
    /// `[out, in]` weight with whole 32-element chunks per row (what their GEMV reads).
    pub fn fused_ok(&self) -> bool {
        matches!(self.shape[..], [rows, cols] if cols % 32 == 0 && rows <= i32::MAX as usize && cols <= i32::MAX as usize)
            && aligned16(&self.packed, &self.dev.cuda_stream())
    }

    pub(crate) fn cuda_device(&self) -> &CudaDevice {
        &self.dev
    }

    pub(crate) fn sms(&self) -> usize {
        self.sms
    }

    /// The weight as the fused decode kernels take it (device addresses of its buffers, valid
    /// while `self` lives; the statistics slots as in [`Self::push_stats`]). Needs [`Self::fused_ok`].
    pub(crate) fn decode_arg(&self) -> crate::kernels::decode::W4Arg {
        let stream = self.dev.cuda_stream();
        let (absmax, absmax_q, nested_absmax, nested_code, offset, log2_nested) = match &self.scales {
            Scales::Plain(a) => (addr(a, &stream), addr(a, &stream), addr(a, &stream), addr(a, &stream), 0.0, 0),
            Scales::Double { q, nested, code, offset, log2_nested } => {
                (addr(nested, &stream), addr(q, &stream), addr(nested, &stream), addr(code, &stream), *offset, *log2_nested)
            }
        };
        crate::kernels::decode::W4Arg {
            packed: addr(&self.packed, &stream),
            lut: addr(&self.lut, &stream),
            absmax,
            absmax_q,
            nested_absmax,
            nested_code,
            offset,
            log2_nested,
            log2_bs: self.log2_bs,
            pad: 0,
            rows: self.shape[0] as i32,
            cols: self.shape[1] as i32,
        }
    }

    /// Dequantize to a new tensor of the weight's shape on its device, in `dtype` (F32, BF16 or
    /// F16): bit for bit what [`crate::quant::dequantize_4bit`] gives on the CPU.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.dequantize_timed(dtype, false)?.0)
    }

    fn dequantize_timed(&self, dtype: DType, timed: bool) -> Result<(Tensor, Option<f32>)> {
        let kernel = |t: &str| format!("dequant4_{t}_{}", self.kind());
        let (storage, ms) = match dtype {
            DType::F32 => self.launch_dequant::<f32>(&kernel("f32"), timed)?,
            DType::BF16 => self.launch_dequant::<bf16>(&kernel("bf16"), timed)?,
            DType::F16 => self.launch_dequant::<f16>(&kernel("f16"), timed)?,
            other => bail!("cannot dequantize to {other:?}: choose f32, bf16 or f16"),
        };
        Ok((Tensor::from_storage(Storage::Cuda(storage), self.shape.clone(), BackpropOp::none(), false), ms))
    }

    fn launch_dequant<T: CudaDType + DeviceRepr>(&self, kernel: &str, timed: bool) -> Result<(CudaStorage, Option<f32>)> {
        let stream = self.dev.cuda_stream();
        // SAFETY: the kernel writes all `numel` elements before anything reads them.
        let mut out = unsafe { self.dev.alloc::<T>(self.numel)? };
        let vec = i32::from(aligned16(&self.packed, &stream) && aligned16(&out, &stream));
        let n = self.numel as i64;
        let func = MODULE.function(&self.dev, kernel)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&self.packed).arg(&self.lut);
        self.push_stats(&mut b);
        b.arg(&self.log2_bs).arg(&n).arg(&mut out).arg(&vec);
        // SAFETY: the arguments of quant4.cu's dequant4 kernels; `upload` validated the weight.
        let ms = unsafe { launch::launch_timed(&mut b, blocks(self.numel.div_ceil(32), DEQUANT_THREADS), timed) }?;
        drop(b);
        Ok((T::wrap_cuda_slice(out, self.dev.clone()), ms))
    }

    /// `y = W x` for batch-1 decoding: x `[1, in]` (any shape with `in` elements) in f32, bf16 or
    /// f16 on this device → y `[1, out]` in x's dtype, accumulated in f32 (f16 goes through f32).
    pub fn gemv(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.gemv_timed(x, false)?.0)
    }

    fn gemv_timed(&self, x: &Tensor, timed: bool) -> Result<(Tensor, Option<f32>)> {
        let &[rows, cols] = self.shape.as_slice() else { bail!("GEMV needs a 2-D [out, in] weight, not {:?}", self.shape) };
        ensure!(x.elem_count() == cols, "GEMV: x has shape {:?}, expected [1, {cols}]", x.dims());
        ensure!(rows <= i32::MAX as usize && cols <= i32::MAX as usize, "GEMV: weight {:?} too large", self.shape);
        match x.device() {
            Device::Cuda(d) if d.id() == self.dev.id() => {}
            other => bail!("GEMV: x is on {other:?}, the 4-bit weight on {:?}", self.dev),
        }
        let xc = match x.dtype() {
            DType::F32 | DType::BF16 => x.contiguous()?,
            DType::F16 => x.to_dtype(DType::F32)?.contiguous()?,
            other => bail!("GEMV: x is {other:?}; expected f32, bf16 or f16"),
        };
        let (storage, ms) = match xc.dtype() {
            DType::F32 => self.launch_gemv::<f32>(&xc, "f32", timed)?,
            _ => self.launch_gemv::<bf16>(&xc, "bf16", timed)?,
        };
        let y = Tensor::from_storage(Storage::Cuda(storage), (1, rows), BackpropOp::none(), false);
        Ok((y.to_dtype(x.dtype())?, ms))
    }

    fn launch_gemv<T: CudaDType + DeviceRepr>(&self, x: &Tensor, xname: &str, timed: bool) -> Result<(CudaStorage, Option<f32>)> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let (guard, layout) = x.storage_and_layout();
        let xs = launch::view::<T>(&guard, layout, "GEMV: x")?;
        let stream = self.dev.cuda_stream();
        // SAFETY: the kernel writes all `rows` outputs.
        let mut y = unsafe { self.dev.alloc::<T>(rows)? };
        // The fast kernel needs whole 16-byte chunks of codes per row and an aligned x.
        let (kernel, cfg) = if cols % 32 == 0 && aligned16(&self.packed, &stream) && aligned16(&xs, &stream) {
            let lanes = gemv_lanes(cols / 32);
            (format!("gemv4_{xname}_{}_l{lanes}", self.kind()), gemv_blocks(rows.div_ceil(GEMV_ROWS) * lanes, self.sms))
        } else {
            (format!("gemv4_generic_{xname}_{}", self.kind()), gemv_blocks(rows * 32, self.sms))
        };
        let (rows_i, cols_i) = (rows as i32, cols as i32);
        let func = MODULE.function(&self.dev, &kernel)?;
        let mut b = stream.launch_builder(&func);
        b.arg(&self.packed).arg(&self.lut);
        self.push_stats(&mut b);
        b.arg(&self.log2_bs).arg(&rows_i).arg(&cols_i).arg(&xs).arg(&mut y);
        // SAFETY: the arguments of quant4.cu's gemv4 kernels, x's length checked against the shape.
        let ms = unsafe { launch::launch_timed(&mut b, cfg, timed) }?;
        drop(b);
        Ok((T::wrap_cuda_slice(y, self.dev.clone()), ms))
    }
}

// ------------------------------------------------------------------------------ benchmarks

/// A `rows × cols` NF4 weight (blocksize 64, double quantization: what QLoRA loads) of
/// deterministic pseudo-random values, uploaded to CUDA device 0.
fn bench_weight(rows: usize, cols: usize) -> Result<(Quant4Gpu, Device)> {
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let h = (i as u64 ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    let q = crate::quant::quantize_4bit(&data, &[rows, cols], QuantType::Nf4, 64, true)?;
    let dev = crate::device::open_cuda(0)?;
    let g = Quant4Gpu::upload(&q, dev.as_cuda_device()?)?;
    Ok((g, dev))
}

/// Mean kernel time in ms of `iters` timed runs of `f` after 3 untimed ones.
fn mean_ms(iters: usize, mut f: impl FnMut(bool) -> Result<Option<f32>>) -> Result<f64> {
    for _ in 0..3 {
        f(false)?;
    }
    let iters = iters.max(1);
    let mut total = 0.0;
    for _ in 0..iters {
        total += f64::from(f(true)?.context("no kernel time recorded")?);
    }
    Ok(total / iters as f64)
}

/// Dequantization of a `rows × cols` NF4 weight (bs 64, double quant) to bf16 on CUDA device 0,
/// GB/s counting 0.5 B read + 2 B written per weight: (GB/s and ms per call of the kernel alone,
/// timed with CUDA events, mean of `iters` calls; GB/s of `iters` calls back to back, output
/// allocation included, timed by the host: how the Python reference times bitsandbytes).
pub fn bench_dequant(rows: usize, cols: usize, iters: usize) -> Result<(f64, f64, f64)> {
    let (g, dev) = bench_weight(rows, cols)?;
    let gbs = |ms: f64| (rows * cols) as f64 * 2.5 / (ms * 1e-3) / 1e9;
    let ms = mean_ms(iters, |timed| Ok(g.dequantize_timed(DType::BF16, timed)?.1))?;
    dev.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..iters.max(1) {
        drop(g.dequantize(DType::BF16)?);
    }
    dev.synchronize()?;
    let back_to_back = t.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64;
    Ok((gbs(ms), ms, gbs(back_to_back)))
}

/// The fused GEMV `[1, cols] x [rows, cols]ᵀ` with bf16 x and y on CUDA device 0, same weight as
/// [`bench_dequant`]: (GB/s counting every byte the kernel must read or write: codes, u8 scales,
/// nested scales, x, y; ms per call), kernel alone, mean of `iters` calls.
pub fn bench_gemv(rows: usize, cols: usize, iters: usize) -> Result<(f64, f64)> {
    let (g, dev) = bench_weight(rows, cols)?;
    let x: Vec<bf16> = (0..cols).map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0)).collect();
    let x = Tensor::from_vec(x, (1, cols), &dev)?;
    let ms = mean_ms(iters, |timed| Ok(g.gemv_timed(&x, timed)?.1))?;
    let bytes = g.device_bytes() + 2 * cols + 2 * rows;
    Ok((bytes as f64 / (ms * 1e-3) / 1e9, ms))
}

