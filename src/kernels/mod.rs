//! Hand-written kernels where candle's generic path is the bottleneck. Each has a portable
//! CPU version; CUDA versions come behind the `cuda` feature.

pub mod attention;
pub mod attention_train;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
#[cfg(feature = "cuda")]
pub mod cuda_flash;
#[cfg(feature = "cuda")]
pub mod cuda_lora;
#[cfg(feature = "cuda")]
pub mod cuda_train;
pub mod gemv;
pub mod lora_cpu;
pub mod matmul;
pub mod train_cpu;
pub mod vecmath;

use candle_core::{Storage, StorageRef, Tensor};

/// A contiguous CPU f32 tensor's elements, borrowed in place (the storage's read lock is held
/// while the view lives).
pub struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl F32View<'_> {
    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(c) => &c.as_slice::<f32>().expect("checked f32 at creation")[self.start..self.end],
            _ => unreachable!("checked CPU at creation"),
        }
    }
}

/// The view of `t`, or `None` unless it is a contiguous f32 CPU tensor.
pub fn f32_view(t: &Tensor) -> Option<F32View<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*guard {
        Storage::Cpu(c) if c.as_slice::<f32>().is_ok() => {}
        _ => return None,
    }
    Some(F32View { guard, start, end })
}

/// `f` over a contiguous CPU f32 tensor's elements; `None` for other tensors.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    f32_view(t).map(|v| f(v.slice()))
}

/// A buffer of `n` uninitialised floats, for kernels that write every element (the zero-fill
/// of `vec![0.0; n]` cost ~7% of a training step).
pub fn uninit_vec(n: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation; the capacity is n.
    unsafe { v.set_len(n) };
    v
}

/// The buffer as floats.
///
/// # Safety
/// Every element must have been written.
pub unsafe fn assume_init(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f32> has f32's layout; the caller guarantees initialisation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}
