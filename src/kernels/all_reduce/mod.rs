//! The sum of a tensor over the ranks of a data-parallel group (the step's gradient bucket).
//! Dispatch: NCCL when the tensor is on a GPU (feature `cuda`, `nccl.rs`: one communicator per
//! group, made at the first GPU reduction with the id rank 0 shares over the group), else the
//! group's own host reduction (`train::distributed::tcp`, over its sockets).

#[cfg(feature = "cuda")]
mod nccl;

use anyhow::Result;
use candle_core::Tensor;

/// What the reduction needs of a group: its ranks, a way to send rank 0's bytes to every rank
/// (NCCL's unique id), and the host reduction.
pub trait Group {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Rank 0's `bytes` (at most `max`) into every rank's.
    fn broadcast(&self, bytes: &mut Vec<u8>, max: usize) -> Result<()>;
    /// The sum over the ranks without a GPU communicator.
    fn all_reduce_host(&self, t: &Tensor) -> Result<Tensor>;
}

/// A group's GPU communicator, made at its first GPU reduction (every rank reaches it at the
/// same step); nothing in a build without CUDA.
#[derive(Default)]
pub struct Communicator {
    #[cfg(feature = "cuda")]
    nccl: std::sync::Mutex<Option<nccl::Comm>>,
}

/// The sum of `t` over `group`'s ranks (a new tensor).
pub fn all_reduce_sum(comm: &Communicator, group: &dyn Group, t: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        let mut nccl = comm.nccl.lock().unwrap_or_else(|e| e.into_inner());
        if nccl.is_none() {
            *nccl = Some(nccl::Comm::new(group, t.device())?);
        }
        return nccl.as_ref().expect("set above").all_reduce_sum(t);
    }
    let _ = comm;
    group.all_reduce_host(t)
}
