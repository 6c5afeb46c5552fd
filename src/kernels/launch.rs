//! The CUDA launch helper every launcher shares (feature `cuda`): the PTX modules build.rs
//! makes from the `.cu` files and their kernels (looked up once per thread), device views of
//! tensors and storages, new tensors around device buffers, the launch shapes, the launch.
//!
//! All work goes to the device's one stream (`device::open_cuda`): launchers only enqueue.

use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchArgs, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, StorageRef, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;

/// A PTX module built by build.rs from one `.cu` file (see [`ptx_module!`]).
pub struct Module {
    /// The module's name in candle's per-device cache of custom modules.
    pub name: &'static str,
    pub ptx: &'static str,
}

/// The [`Module`] built from `src/kernels/<op>/<stem>.cu`.
macro_rules! ptx_module {
    ($stem:literal) => {
        $crate::kernels::launch::Module { name: concat!("qscript_", $stem), ptx: include_str!(concat!(env!("OUT_DIR"), "/", $stem, ".ptx")) }
    };
}
pub(crate) use ptx_module;

impl Module {
    /// The kernel `name` on `dev`, looked up once per thread, device and module (candle's
    /// lookup takes locks, a string copy and a driver call on every launch).
    pub fn function(&self, dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        type Cache = HashMap<(DeviceId, &'static str), HashMap<String, CudaFunction>>;
        thread_local! {
            static FUNCTIONS: RefCell<Cache> = RefCell::new(HashMap::new());
        }
        let key = (dev.id(), self.name);
        if let Some(f) = FUNCTIONS.with_borrow(|c| c.get(&key).and_then(|m| m.get(name)).cloned()) {
            return Ok(f);
        }
        let f = dev.get_or_load_custom_func(name, self.name, self.ptx)?.into_cuda_function();
        FUNCTIONS.with_borrow_mut(|c| c.entry(key).or_default().insert(name.to_string(), f.clone()));
        Ok(f)
    }
}

/// The CUDA device `t` lives on.
pub fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("not a CUDA tensor"),
    }
}

/// A contiguous CUDA tensor's elements (`g`, `l`: its `storage_and_layout()`) as a typed view.
pub fn view<'a, T: CudaDType>(g: &'a StorageRef<'_>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(cs) = &**g else { bail!("{what}: not a CUDA tensor") };
    storage_view(cs, l, what)
}

/// A contiguous CUDA storage's elements under `l` as a typed view (what custom ops get).
pub fn storage_view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("{what}: not contiguous") };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// A new tensor of `shape` owning the device buffer `s`.
pub fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(T::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// The device address of a buffer or view.
pub fn addr<T, S: DevicePtr<T>>(s: &S, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Whether a device buffer starts on a 16-byte boundary (what vector loads need).
pub fn aligned16<T, S: DevicePtr<T>>(s: &S, stream: &CudaStream) -> bool {
    addr(s, stream) % 16 == 0
}

/// "f32" or "bf16": the kernel name part of a dtype the kernels take.
pub fn float_name(dtype: DType, what: &str) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("{what} on CUDA: {other:?} (f32 or bf16)"),
    }
}

/// `$body` with `$t` the element type of `$dtype` (f32 or bf16) and `$name` its kernel name
/// part ("f32", "bf16"); another dtype is an error about `$what`.
macro_rules! with_float {
    ($dtype:expr, $what:expr, $t:ident, $name:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                let $name = "f32";
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                let $name = "bf16";
                $body
            }
            other => anyhow::bail!("{} on CUDA: {other:?} (f32 or bf16)", $what),
        }
    };
}
pub(crate) use with_float;

/// A launch of `grid` blocks of `threads` threads with `shared` bytes of dynamic shared memory.
pub fn config(grid: (u32, u32, u32), threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: shared }
}

/// Enough blocks of `threads` to give each of `n` items a thread.
pub fn blocks(n: usize, threads: usize) -> LaunchConfig {
    config((n.div_ceil(threads) as u32, 1, 1), threads as u32, 0)
}

/// A grid-stride loop over `n` items: blocks of 256, at most 65 535 · 8 of them.
pub fn grid_stride(n: usize) -> LaunchConfig {
    config((n.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1), 256, 0)
}

/// One block of `threads` per row.
pub fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    config((rows as u32, 1, 1), threads, 0)
}

/// Launch a kernel whose arguments `b` holds.
///
/// # Safety
/// `b` holds exactly the kernel's arguments, in its order and types, and every buffer is as
/// large as the kernel reads and writes under `cfg`.
pub unsafe fn launch(b: &mut LaunchArgs, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// [`launch`]; with `timed`, the kernel's own time in ms from CUDA events around it (this
/// waits for it).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_timed(b: &mut LaunchArgs, cfg: LaunchConfig, timed: bool) -> Result<Option<f32>> {
    if timed {
        b.record_kernel_launch(sys::CUevent_flags::CU_EVENT_DEFAULT);
    }
    // SAFETY: the caller's contract.
    let events = unsafe { b.launch(cfg) }.w()?;
    Ok(match events {
        Some((start, end)) => Some(start.elapsed_ms(&end).w()?),
        None => None,
    })
}

/// An anyhow error as candle's (for custom ops' CUDA sides).
pub fn candle_err(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}
