//! Parking on a GPU (feature `cuda`): asynchronous copies between the device's one stream and
//! pinned host buffers, which a pool keeps across steps (pinning costs milliseconds per buffer;
//! a step parks one buffer per decoder layer).
//!
//! Ordering needs no events: every copy, kernel and free of a device goes to its one stream in
//! issue order (`device::open_cuda`; cudarc's event tracking is off). So the copy out of a
//! tensor runs before the free its last handle queues, the copy back runs before any kernel
//! that reads the new buffer, and a pooled buffer that a queued copy still reads (a restore just
//! queued) or writes (a parked tensor dropped unrestored) is only ever reused by a copy queued
//! after it. Dropping a pinned buffer is the one host-side use: the stream is synchronised first.

use crate::kernels::launch::{device_of, view, wrap};
use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, DType, Shape, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

/// Pinned buffers per device (each device has its own stream, so a buffer is only reused on
/// the stream whose queue orders its copies).
static POOL: Mutex<Option<HashMap<DeviceId, Pool>>> = Mutex::new(None);

#[derive(Default)]
struct Pool {
    free: Vec<PinnedHostSlice<u8>>,
    /// Bytes of the buffers parked tensors hold now.
    in_use: usize,
}

/// `f` on `dev`'s pool.
fn with_pool<R>(dev: &CudaDevice, f: impl FnOnce(&mut Pool) -> R) -> R {
    let mut pools = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(pools.get_or_insert_with(HashMap::new).entry(dev.id()).or_default())
}

/// Pinned bytes pooled for `dev`: the free buffers and those parked tensors hold.
pub fn pinned_bytes(dev: &CudaDevice) -> usize {
    with_pool(dev, |p| p.in_use + p.free.iter().map(|b| b.len()).sum::<usize>())
}

/// A tensor's bytes in a pinned host buffer (returned to the pool when dropped).
pub struct Host {
    buf: Option<PinnedHostSlice<u8>>,
    bytes: usize,
    dtype: DType,
    shape: Shape,
    dev: CudaDevice,
}

/// The pinned capacity for `n` bytes: rounded up (to 1/8 of the next power of two, at least
/// 64 KiB) so that batches a little longer than the last reuse the buffers.
fn capacity(n: usize) -> usize {
    let step = (n.next_power_of_two() / 8).max(64 << 10);
    n.div_ceil(step) * step
}

/// A free pinned buffer of at least `n` bytes for `dev`: the smallest that fits; else a new one.
/// When none fits, the batches grew (a step parks tensors of one size): the free buffers, all
/// too small, are unpinned, so the pool never holds more buffers than were in use at once.
fn take(dev: &CudaDevice, n: usize) -> Result<PinnedHostSlice<u8>> {
    with_pool(dev, |pool| -> Result<PinnedHostSlice<u8>> {
        let free = &mut pool.free;
        let fits = free.iter().enumerate().filter(|(_, b)| b.len() >= n).min_by_key(|(_, b)| b.len()).map(|(i, _)| i);
        let buf = match fits {
            Some(i) => free.swap_remove(i),
            None => {
                let stream = dev.cuda_stream();
                if !free.is_empty() {
                    // Their last queued copies must be done before the host memory goes back
                    // (one wait for all of them).
                    stream.synchronize()?;
                    free.clear();
                }
                // SAFETY: the buffer is written by a device copy before anything reads it. Plain
                // pinned memory (not write-combined): only DMA touches it.
                unsafe { stream.context().alloc_pinned_with_flags::<u8>(capacity(n), 0) }?
            }
        };
        pool.in_use += buf.len();
        Ok(buf)
    })
}

fn give_back(dev: &CudaDevice, buf: PinnedHostSlice<u8>) {
    with_pool(dev, |pool| {
        pool.in_use -= buf.len();
        pool.free.push(buf);
    })
}

/// `t` copied into a pinned buffer (the copy queued), or `None` for a dtype not parked (only
/// float activations are) or an empty tensor.
pub fn to_host(t: &Tensor) -> Result<Option<Host>> {
    if t.elem_count() == 0 {
        return Ok(None);
    }
    match t.dtype() {
        DType::BF16 => to_host_t::<half::bf16>(t).map(Some),
        DType::F16 => to_host_t::<half::f16>(t).map(Some),
        DType::F32 => to_host_t::<f32>(t).map(Some),
        DType::F64 => to_host_t::<f64>(t).map(Some),
        _ => Ok(None),
    }
}

fn to_host_t<T: CudaDType + DeviceRepr>(t: &Tensor) -> Result<Host> {
    let t = t.contiguous()?;
    let dev = device_of(&t)?;
    let bytes = t.elem_count() * std::mem::size_of::<T>();
    let mut buf = take(&dev, bytes)?;
    {
        let (g, l) = t.storage_and_layout();
        let src = view::<T>(&g, l, "offload")?;
        // SAFETY: the same bytes seen as u8 (any bit pattern is a valid u8).
        let src = unsafe { src.transmute::<u8>(bytes) }.context("offload: byte view")?;
        // `as_mut_slice` waits on the buffer's event, which is never recorded with event
        // tracking off; the slice is only handed to the queued copy.
        let host = &mut buf.as_mut_slice()?[..bytes];
        dev.cuda_stream().memcpy_dtoh(&src, host)?;
    }
    Ok(Host { buf: Some(buf), bytes, dtype: t.dtype(), shape: t.shape().clone(), dev })
}

impl Host {
    /// A new device tensor with the parked bytes (the copy queued); the buffer goes back to the
    /// pool at once: later copies into it are queued after this one.
    pub fn to_device(mut self) -> Result<Tensor> {
        let buf = self.buf.take().context("offload: buffer already returned")?;
        let out = match self.dtype {
            DType::BF16 => self.copy_back::<half::bf16>(&buf),
            DType::F16 => self.copy_back::<half::f16>(&buf),
            DType::F32 => self.copy_back::<f32>(&buf),
            DType::F64 => self.copy_back::<f64>(&buf),
            other => anyhow::bail!("offload: {other:?} is never parked"),
        };
        give_back(&self.dev, buf);
        out
    }

    fn copy_back<T: CudaDType + DeviceRepr>(&self, buf: &PinnedHostSlice<u8>) -> Result<Tensor> {
        let n = self.shape.elem_count();
        // SAFETY: every byte is written by the copy below before a kernel reads it.
        let mut dst = unsafe { self.dev.alloc::<T>(n)? };
        {
            // SAFETY: the same bytes seen as u8.
            let mut bytes = unsafe { dst.transmute_mut::<u8>(self.bytes) }.context("offload: byte view")?;
            self.dev.cuda_stream().memcpy_htod(&buf.as_slice()?[..self.bytes], &mut bytes)?;
        }
        Ok(wrap(dst, &self.dev, self.shape.clone()))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_back(&self.dev, buf);
        }
    }
}
