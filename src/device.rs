//! Devices: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (CUDA when this binary was built with the
//! `cuda` feature and a GPU answers, else the CPU); which one a `load_model` gets (its own
//! `device` / `device_map`, `qscript --device` over every load of a run, "auto" otherwise) and the
//! compute dtype that follows from it; the CUDA allocator's peak memory (what
//! `torch.cuda.max_memory_allocated` reports for PyTorch).

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::sync::Mutex;

/// Parses a device name.
pub fn parse(s: &str) -> Result<Device> {
    match check_name(s)? {
        Name::Cpu => Ok(Device::Cpu),
        Name::Auto => Ok(auto()),
        Name::Cuda(n) => cuda(n, s),
    }
}

/// A device name, checked but not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Cpu,
    Auto,
    Cuda(usize),
}

/// Checks the spelling of a device name without touching a GPU (command-line flags, `check`).
pub fn check_name(s: &str) -> Result<Name> {
    match s {
        "cpu" => Ok(Name::Cpu),
        "auto" => Ok(Name::Auto),
        "cuda" => Ok(Name::Cuda(0)),
        s if s.starts_with("cuda:") => match s["cuda:".len()..].parse::<usize>() {
            Ok(n) => Ok(Name::Cuda(n)),
            Err(_) => bail!("device \"{s}\": expected cuda:N with N a GPU index"),
        },
        other => bail!("unknown device \"{other}\" (expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\")"),
    }
}

/// `qscript --device`: the device every `load_model` of this run uses, whatever the recipe says.
static OVERRIDE: Mutex<Option<String>> = Mutex::new(None);

/// Sets (or clears) the run-wide device; the name is checked now, opened at the first load.
pub fn set_override(name: Option<&str>) -> Result<()> {
    if let Some(n) = name {
        check_name(n).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    }
    *OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = name.map(String::from);
    Ok(())
}

pub fn override_name() -> Option<String> {
    OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The device name a load asks for: `--device` first, then the recipe's `device`, then "auto".
pub fn requested(recipe: Option<&str>, cli: Option<&str>) -> String {
    cli.or(recipe).unwrap_or("auto").to_string()
}

/// The compute dtype where the recipe leaves it to us (or says "auto"): bfloat16 on a GPU, as the
/// Python stack's QLoRA recipes choose, float32 on the CPU (bf16 matmuls there are slow and
/// lose precision for nothing).
pub fn default_dtype(d: &Device) -> DType {
    if d.is_cuda() { DType::BF16 } else { DType::F32 }
}

/// The first GPU when this binary has CUDA and one is present, else the CPU.
pub fn auto() -> Device {
    if cfg!(feature = "cuda") {
        if let Ok(d) = open_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

fn cuda(n: usize, name: &str) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!("device \"{name}\": this qscript was built without CUDA (build with `--features cuda`)");
    }
    open_cuda(n).map_err(|e| anyhow::anyhow!("device \"{name}\": no usable CUDA GPU ({e})"))
}

/// The device with its GPU's name, for the line that says where a model went: `cuda:0 (NVIDIA
/// H200)`, `cpu`.
pub fn describe(d: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = d {
        if let Ok(gpu) = c.cuda_stream().context().name() {
            return format!("{} ({gpu})", name(d));
        }
    }
    name(d)
}

/// GPU `n` with one stream of its own that every host thread launches on. candle's
/// `Device::new_cuda` uses the per-thread default stream: work that the training step queues from
/// a rayon worker and the optimizer then queues from the caller's thread would run unordered (a
/// race that showed as NaN losses once the GPU ran behind the host).
///
/// cudarc's event tracking (events recorded around every buffer use, so that other streams can
/// wait on them) is turned off: there is one stream. The memory pool keeps what is freed (as
/// PyTorch's caching allocator does): by default it hands it back to the driver at every
/// synchronisation, and each training step would map its activations afresh.
pub fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let d = Device::new_cuda_with_stream(n)?;
    // SAFETY: nothing was allocated on this device yet, and all its work goes to one stream, in
    // the order it is issued, so no buffer is used or freed out of order.
    #[cfg(feature = "cuda")]
    unsafe {
        d.as_cuda_device()?.disable_event_tracking()
    };
    #[cfg(feature = "cuda")]
    cuda_pool::keep_freed(&d).map_err(candle_core::Error::wrap)?;
    Ok(d)
}

/// The short name of a device (`cpu`, `cuda:0`).
pub fn name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Peak bytes the device's memory pool held in use since the last [`reset_peak_memory`]
/// (`None` on the CPU). Candle allocates with `cuMemAllocAsync` from the device's default pool,
/// whose high-water mark the driver keeps.
pub fn peak_memory(d: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = d {
        return Ok(Some(cuda_pool::attr(d, cuda_pool::USED_HIGH)?));
    }
    let _ = d;
    Ok(None)
}

/// Restarts the peak count from the memory in use now.
pub fn reset_peak_memory(d: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = d {
        cuda_pool::reset_high(d)?;
    }
    let _ = d;
    Ok(())
}

/// GPU time for `profile`'s scopes: CUDA events recorded on the timed device's stream, read
/// back when the counters are folded in. Without the `cuda` feature no GPU is ever timed.
pub mod timer {
    use candle_core::Device;

    /// An event recorded on the timed stream (none without the `cuda` feature).
    #[cfg(feature = "cuda")]
    pub use candle_core::cuda_backend::cudarc::driver::CudaEvent as Event;
    #[cfg(not(feature = "cuda"))]
    pub enum Event {}

    /// Where the closed scopes' seconds go.
    pub type Add = fn(&'static str, f64);

    #[cfg(feature = "cuda")]
    mod events {
        use super::{Add, Event};
        use candle_core::cuda_backend::cudarc::driver::{sys::CUevent_flags, CudaStream};
        use std::sync::{Arc, Mutex, MutexGuard};

        pub struct Gpu {
            pub stream: Arc<CudaStream>,
            /// Closed scopes whose events are not read yet.
            pub pending: Vec<(&'static str, Event, Event)>,
        }

        static GPU: Mutex<Option<Gpu>> = Mutex::new(None);

        pub fn lock() -> MutexGuard<'static, Option<Gpu>> {
            GPU.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub fn record(g: &Gpu) -> Option<Event> {
            g.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()
        }

        /// Wait for the queue, fold the pending scopes into `add`.
        pub fn drain(g: &mut Gpu, add: Add) {
            let _ = g.stream.synchronize();
            for (name, a, b) in g.pending.drain(..) {
                if let Ok(ms) = a.elapsed_ms(&b) {
                    add(name, ms as f64 / 1e3);
                }
            }
        }
    }

    /// Time on `d`'s stream from now on when it is a CUDA device, else no GPU; the previous
    /// GPU's closed scopes are folded into `add` first.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn set(d: Option<Device>, add: Add) {
        #[cfg(feature = "cuda")]
        {
            let mut g = events::lock();
            if let Some(g) = g.as_mut() {
                events::drain(g, add);
            }
            *g = match d {
                Some(Device::Cuda(c)) => Some(events::Gpu { stream: c.cuda_stream(), pending: Vec::new() }),
                _ => None,
            };
        }
    }

    /// `None` when no GPU is timed; else an event recorded now (`None` if recording failed).
    pub fn mark() -> Option<Option<Event>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = events::lock().as_ref() {
            return Some(events::record(g));
        }
        None
    }

    /// The scope `name` that began at `start` ends now (its time is read at [`drain`]).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn close(name: &'static str, start: Event, add: Add) {
        #[cfg(feature = "cuda")]
        {
            let mut g = events::lock();
            if let Some(g) = g.as_mut() {
                if let Some(end) = events::record(g) {
                    g.pending.push((name, start, end));
                }
                // Bound the events alive at once.
                if g.pending.len() >= 100_000 {
                    events::drain(g, add);
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        match start {}
    }

    /// Wait for the timed GPU and fold its closed scopes into `add`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn drain(add: Add) {
        #[cfg(feature = "cuda")]
        if let Some(g) = events::lock().as_mut() {
            events::drain(g, add);
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use anyhow::{ensure, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    pub const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    fn pool(d: &Device) -> Result<sys::CUmemoryPool> {
        let gpu = match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id as i32,
            _ => anyhow::bail!("not a CUDA device"),
        };
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver queries with valid out-pointers; the context exists (d is open).
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, gpu) };
        ensure!(r == sys::CUresult::CUDA_SUCCESS, "cuDeviceGetDefaultMemPool: {r:?}");
        Ok(pool)
    }

    pub fn attr(d: &Device, a: sys::CUmemPool_attribute) -> Result<u64> {
        d.synchronize()?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t, written through a valid pointer.
        let r = unsafe { sys::cuMemPoolGetAttribute(pool(d)?, a, &mut v as *mut u64 as *mut std::ffi::c_void) };
        ensure!(r == sys::CUresult::CUDA_SUCCESS, "cuMemPoolGetAttribute: {r:?}");
        Ok(v)
    }

    /// No release threshold: freed memory stays in the pool for the next allocation.
    pub fn keep_freed(d: &Device) -> Result<()> {
        let mut all = u64::MAX;
        // SAFETY: the release threshold is a cuuint64_t, passed through a valid pointer.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(pool(d)?, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut all as *mut u64 as *mut std::ffi::c_void)
        };
        ensure!(r == sys::CUresult::CUDA_SUCCESS, "cuMemPoolSetAttribute: {r:?}");
        Ok(())
    }

    pub fn reset_high(d: &Device) -> Result<()> {
        d.synchronize()?;
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark takes a zero cuuint64_t.
        let r = unsafe { sys::cuMemPoolSetAttribute(pool(d)?, USED_HIGH, &mut zero as *mut u64 as *mut std::ffi::c_void) };
        ensure!(r == sys::CUresult::CUDA_SUCCESS, "cuMemPoolSetAttribute: {r:?}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_explain() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert_eq!(name(&parse("cpu").unwrap()), "cpu");
        let e = parse("gpu").unwrap_err().to_string();
        assert!(e.contains("unknown device \"gpu\"") && e.contains("cuda:N"), "{e}");
        let e = parse("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
        if !cfg!(feature = "cuda") {
            assert!(parse("auto").unwrap().is_cpu());
            let e = parse("cuda:1").unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
        }
    }

    #[test]
    fn cli_device_beats_recipe_beats_auto() {
        assert_eq!(requested(None, None), "auto");
        assert_eq!(requested(Some("cpu"), None), "cpu");
        assert_eq!(requested(Some("cpu"), Some("cuda:1")), "cuda:1");
        assert_eq!(requested(None, Some("cpu")), "cpu");
    }

    #[test]
    fn names_check_without_opening() {
        assert_eq!(check_name("cuda").unwrap(), Name::Cuda(0));
        assert_eq!(check_name("cuda:3").unwrap(), Name::Cuda(3));
        assert_eq!(check_name("auto").unwrap(), Name::Auto);
        assert!(set_override(Some("gpu0")).unwrap_err().to_string().starts_with("--device: unknown device"));
    }

    #[test]
    fn dtype_follows_device() {
        assert_eq!(default_dtype(&Device::Cpu), DType::F32);
        // The CPU build's "auto" is the CPU, so its default dtype stays float32.
        if !cfg!(feature = "cuda") {
            assert_eq!(default_dtype(&parse("auto").unwrap()), DType::F32);
        }
    }
}
