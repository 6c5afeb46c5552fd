//! NCCL for the gradient bucket on the GPU (feature `cuda`): `libnccl.so.2` loaded at run time
//! with `libloading`, so the binary neither links NCCL nor needs it for one GPU. (cudarc's own
//! `nccl` feature would link it: candle turns on cudarc's `dynamic-linking`, which cannot be
//! combined with `dynamic-loading`.) Five entry points are used: `ncclGetUniqueId`,
//! `ncclCommInitRank`, `ncclAllReduce`, `ncclCommDestroy`, `ncclGetErrorString`.
//!
//! One communicator per group: made at the first GPU reduction (every rank reaches it at the same
//! step), with the unique id rank 0 draws and sends over the group (its rendezvous sockets). The all-reduce is
//! enqueued on the device's one stream (`device::open_cuda`), in order with the step's kernels.

use super::Group;
use crate::kernels::launch;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type NcclComm = *mut c_void;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

struct Lib {
    _lib: libloading::Library,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int,
    comm_destroy: unsafe extern "C" fn(NcclComm) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

/// Where NCCL is looked for: `QSCRIPT_NCCL_LIBRARY` (a path), else the loader's search.
fn open() -> Result<Lib> {
    let name = std::env::var("QSCRIPT_NCCL_LIBRARY").unwrap_or_else(|_| "libnccl.so.2".into());
    // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(&name) }
        .map_err(|e| anyhow::anyhow!("NCCL: cannot load {name} ({e}); install NCCL 2 (e.g. pip's nvidia-nccl) and set QSCRIPT_NCCL_LIBRARY to its libnccl.so.2"))?;
    macro_rules! sym {
        ($n:literal) => {
            // SAFETY: the symbol has the C signature of nccl.h that the field's type spells.
            *unsafe { lib.get(concat!($n, "\0").as_bytes()) }.with_context(|| format!("NCCL: {name} has no {}", $n))?
        };
    }
    Ok(Lib {
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank: sym!("ncclCommInitRank"),
        all_reduce: sym!("ncclAllReduce"),
        comm_destroy: sym!("ncclCommDestroy"),
        error_string: sym!("ncclGetErrorString"),
        _lib: lib,
    })
}

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| open().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

fn check(l: &Lib, what: &str, r: c_int) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let msg = unsafe { CStr::from_ptr((l.error_string)(r)) }.to_string_lossy();
    bail!("NCCL: {what} failed: {msg} (ncclResult {r})")
}

/// A communicator over the ranks of the run, on one GPU per rank.
pub struct Comm {
    comm: NcclComm,
    device: Device,
}

// SAFETY: the communicator is used under the Communicator's lock, one call at a time.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl Comm {
    /// Rank 0 draws the unique id and sends it over `group`; every rank joins on `device`'s GPU.
    pub fn new(group: &dyn Group, device: &Device) -> Result<Self> {
        let l = lib()?;
        let mut id = UniqueId { internal: [0; 128] };
        if group.rank() == 0 {
            // SAFETY: `id` is a valid ncclUniqueId to write.
            check(l, "ncclGetUniqueId", unsafe { (l.get_unique_id)(&mut id) })?;
        }
        let mut bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        group.broadcast(&mut bytes, 128)?;
        anyhow::ensure!(bytes.len() == 128, "NCCL: rank 0 sent a unique id of {} bytes", bytes.len());
        for (d, s) in id.internal.iter_mut().zip(&bytes) {
            *d = *s as c_char;
        }
        let Device::Cuda(dev) = device else { bail!("NCCL: not a CUDA device") };
        // ncclCommInitRank joins on the thread's current device: this rank's GPU.
        dev.cuda_stream().context().bind_to_thread().map_err(|e| anyhow::anyhow!("NCCL: cannot select the GPU: {e:?}"))?;
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; `id` is the group's id.
        check(l, "ncclCommInitRank", unsafe { (l.comm_init_rank)(&mut comm, group.world_size() as c_int, id, group.rank() as c_int) })?;
        Ok(Self { comm, device: device.clone() })
    }

    /// The sum over the ranks of a 1-d f32 tensor on this rank's GPU (a new tensor).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        anyhow::ensure!(t.device().same_device(&self.device), "NCCL: the bucket is not on the communicator's GPU");
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let dev = launch::device_of(&t)?;
        let stream = dev.cuda_stream();
        let n = t.elem_count();
        let (g, layout) = t.storage_and_layout();
        let src = launch::view::<f32>(&g, layout, "all_reduce")?;
        let out = stream.alloc_zeros::<f32>(n)?;
        let l = lib()?;
        // SAFETY: both buffers hold `n` f32 on this GPU and outlive the call's enqueueing; the
        // reduction runs on the stream every later use of `out` is ordered after.
        check(l, "ncclAllReduce", unsafe {
            (l.all_reduce)(
                launch::addr(&src, &stream) as *const c_void,
                launch::addr(&out, &stream) as *mut c_void,
                n,
                NCCL_FLOAT32,
                NCCL_SUM,
                self.comm,
                stream.cu_stream() as *mut c_void,
            )
        })?;
        drop(g);
        Ok(launch::wrap(out, &dev, n))
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Ok(l) = lib() {
            // SAFETY: the communicator was made by ncclCommInitRank and is not used again.
            unsafe { (l.comm_destroy)(self.comm) };
        }
    }
}
