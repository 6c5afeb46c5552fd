//! Tensors parked in host memory between a training forward and its backward: gradient
//! checkpointing's kept layer inputs (`model::llama`), as Unsloth's
//! `use_gradient_checkpointing="unsloth"` offloads them. Dispatch: on a GPU (feature `cuda`,
//! `cuda.rs`) a float tensor is copied into pinned host memory and its device memory is freed,
//! and [`unpark`] copies it back into a new device buffer; anywhere else (the CPU) the tensor
//! stays as it is and parking is free.

#[cfg(feature = "cuda")]
mod cuda;

use anyhow::Result;
use candle_core::Tensor;

/// A tensor kept for later: where it was, or in host memory.
pub struct Parked(Where);

enum Where {
    Here(Tensor),
    #[cfg(feature = "cuda")]
    Host(cuda::Host),
}

impl Parked {
    /// Whether the tensor's bytes are in host memory now (its device memory freed).
    pub fn on_host(&self) -> bool {
        !matches!(self.0, Where::Here(_))
    }

    /// Starts the copy back to the device now, beside the compute (a GPU's copy stream), so
    /// that [`unpark`] finds it done; nothing for a tensor that stayed where it was.
    pub fn prefetch(&mut self) -> Result<()> {
        match &mut self.0 {
            Where::Here(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Where::Host(h) => h.prefetch(),
        }
    }
}

/// Lets go of the device memory of the tensors parked last on `d` once their copies out are
/// done (the compute stream waits for them); [`park`] and [`unpark`] do this themselves, a step
/// ends with it.
pub fn settle(d: &candle_core::Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(c) = d {
        return cuda::release(c);
    }
    let _ = d;
    Ok(())
}

/// `t` kept for [`unpark`]: with `offload` and on a GPU, in pinned host memory (the copy is
/// queued on the device's copy stream, overlapping the compute; the device buffer is let go at
/// the next park, unpark or [`settle`], once the compute stream has waited for the copy);
/// otherwise `t` itself.
pub fn park(t: Tensor, offload: bool) -> Result<Parked> {
    #[cfg(feature = "cuda")]
    if offload && t.device().is_cuda() {
        return Ok(Parked(match cuda::to_host(&t)? {
            Some(h) => Where::Host(h),
            None => Where::Here(t),
        }));
    }
    let _ = offload;
    Ok(Parked(Where::Here(t)))
}

/// The parked tensor, back on its device (a new buffer when it was in host memory).
pub fn unpark(p: Parked) -> Result<Tensor> {
    match p.0 {
        Where::Here(t) => Ok(t),
        #[cfg(feature = "cuda")]
        Where::Host(h) => h.to_device(),
    }
}

/// Bytes of pinned host memory the pool holds for `d`'s parked tensors, free or in use (0 off
/// the GPU): it grows to what one step parks and is reused by the next steps.
pub fn pinned_bytes(d: &candle_core::Device) -> usize {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(c) = d {
        return cuda::pinned_bytes(c);
    }
    let _ = d;
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_tensors_stay_where_they_are() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        for offload in [false, true] {
            let mut p = park(t.clone(), offload).unwrap();
            assert!(!p.on_host());
            p.prefetch().unwrap();
            let back = unpark(p).unwrap();
            assert_eq!(back.id(), t.id(), "a CPU tensor is kept, not copied");
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
        assert_eq!(pinned_bytes(&Device::Cpu), 0);
        settle(&Device::Cpu).unwrap();
    }
}
