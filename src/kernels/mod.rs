//! The compute kernels behind the model's ops, one folder per op family: `norm` (RMSNorm),
//! `rope` (heads split/merge + rotation), `attention`, `glu` (gated activations: SwiGLU, GeGLU), `cross_entropy` (LM head +
//! loss), `lora` (the LoRA linear, dropout), `quant4` (bitsandbytes 4-bit weights), `adamw`,
//! `gemv` (batch-1 products), `decode` (fused batch-1 CUDA decoding) and `offload` (tensors parked
//! in pinned host memory between forward and backward).
//!
//! Each folder's `mod.rs` holds the op's dispatch functions: they take and return candle
//! tensors, pick the implementation in one order — the CUDA kernel (`cuda.rs` and its `.cu`
//! files, feature `cuda`), the CPU kernel (`cpu.rs`), candle's ops as the reference — and are
//! the only code outside `src/device.rs` that names the `cuda` feature. Single-output ops are
//! candle custom ops where that fits (the op picks the device's kernel). The CUDA launchers
//! share [`launch`] (PTX modules, function cache, device views, launch shapes).

pub mod adamw;
pub mod all_reduce;
pub mod attention;
pub mod cross_entropy;
pub mod decode;
pub mod gemv;
#[cfg(feature = "cuda")]
pub mod launch;
pub mod lora;
pub mod matmul;
pub mod norm;
pub mod offload;
pub mod quant4;
pub mod rope;
pub mod sum;
pub mod glu;
pub mod vecmath;

use candle_core::{DType, Storage, StorageRef, Tensor};

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

/// Precision for reductions (norm statistics, softmax, loss): f32, or f64 when the model runs
/// in f64 (the finite-difference gradient checks).
pub fn stat_dtype(d: DType) -> DType {
    if d == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Whether `t` is on a CUDA device in a dtype the CUDA kernels take (f32 or bf16).
pub fn cuda_float(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16)
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values in [-4, 4).
    pub fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut z = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 33) as f32 / (1u64 << 31) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
        }
    }
}
