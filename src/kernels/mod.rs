//! Hand-written kernels where candle's generic path is the bottleneck. Each has a portable
//! CPU version; CUDA versions come behind the `cuda` feature.

pub mod attention;
pub mod attention_train;
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
