//! Parking on a GPU (feature `cuda`): copies between device memory and pinned host buffers,
//! which a pool keeps across steps (pinning costs milliseconds per buffer; a step parks one
//! buffer per decoder layer), on a copy stream of the device's own so that they overlap the
//! compute.
//!
//! Ordering, with the compute on the device's one stream (`device::open_cuda`; cudarc's event
//! tracking is off) and the copies on the pool's copy stream, by events:
//! - out: the copy waits for the compute queued so far (the tensor is written); the tensor is
//!   held until the compute stream has waited for the copy (at the next park or unpark,
//!   [`release`]): only then can its memory, freed on the compute stream, be reused;
//! - back ([`Host::prefetch`]): the device buffer is allocated on the compute stream, the copy
//!   waits for that, and the compute stream waits for the copy before reading it;
//! - a pinned buffer is only reused by a copy queued after the copies that used it (all on the
//!   copy stream), and unpinned after both streams are synchronised.

use crate::kernels::launch::{device_of, view, wrap};
use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream, DeviceRepr, PinnedHostSlice};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, DType, Shape, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Pinned buffers per device (each device has its own stream, so a buffer is only reused on
/// the stream whose queue orders its copies).
static POOL: Mutex<Option<HashMap<DeviceId, Pool>>> = Mutex::new(None);

#[derive(Default)]
struct Pool {
    free: Vec<PinnedHostSlice<u8>>,
    /// Bytes of the buffers parked tensors hold now.
    in_use: usize,
    /// The stream the copies run on (made at the first park).
    copy: Option<Arc<CudaStream>>,
    /// Parked tensors still held on the device: each until the compute stream has waited for
    /// its copy out (the event).
    pending: Vec<(CudaEvent, Tensor)>,
}

/// An event marking the work queued on `stream` so far.
fn mark(stream: &CudaStream) -> Result<CudaEvent> {
    Ok(stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
}

/// `dev`'s copy stream.
fn copy_stream(dev: &CudaDevice) -> Result<Arc<CudaStream>> {
    with_pool(dev, |p| -> Result<Arc<CudaStream>> {
        if p.copy.is_none() {
            p.copy = Some(dev.cuda_stream().context().new_stream()?);
        }
        Ok(p.copy.clone().expect("made above"))
    })
}

/// The parked tensors whose copies out are queued: the compute stream waits for those copies,
/// then their device memory is let go (freed in the compute stream's order, after the wait).
pub fn release(dev: &CudaDevice) -> Result<()> {
    let pending = with_pool(dev, |p| std::mem::take(&mut p.pending));
    let main = dev.cuda_stream();
    for (done, t) in pending {
        main.wait(&done)?;
        drop(t);
    }
    Ok(())
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
    /// The copy back, once queued: the new device tensor and the copy's event.
    back: Option<(Tensor, CudaEvent)>,
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
                    // (one wait per stream for all of them).
                    stream.synchronize()?;
                    if let Some(c) = &pool.copy {
                        c.synchronize()?;
                    }
                    pool.free.clear();
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
    release(&dev)?;
    let bytes = t.elem_count() * std::mem::size_of::<T>();
    let mut buf = take(&dev, bytes)?;
    let copy = copy_stream(&dev)?;
    copy.wait(&mark(&dev.cuda_stream())?)?;
    {
        let (g, l) = t.storage_and_layout();
        let src = view::<T>(&g, l, "offload")?;
        // SAFETY: the same bytes seen as u8 (any bit pattern is a valid u8).
        let src = unsafe { src.transmute::<u8>(bytes) }.context("offload: byte view")?;
        // `as_mut_slice` waits on the buffer's event, which is never recorded with event
        // tracking off; the slice is only handed to the queued copy.
        let host = &mut buf.as_mut_slice()?[..bytes];
        copy.memcpy_dtoh(&src, host)?;
    }
    let done = mark(&copy)?;
    let host = Host { buf: Some(buf), bytes, dtype: t.dtype(), shape: t.shape().clone(), dev: dev.clone(), back: None };
    with_pool(&dev, |p| p.pending.push((done, t)));
    Ok(host)
}

impl Host {
    /// Queues the copy back into a new device buffer on the copy stream (once), to overlap
    /// whatever the compute stream runs until [`to_device`](Self::to_device).
    pub fn prefetch(&mut self) -> Result<()> {
        if self.back.is_some() {
            return Ok(());
        }
        let buf = self.buf.as_ref().context("offload: buffer already returned")?;
        self.back = Some(match self.dtype {
            DType::BF16 => self.copy_back::<half::bf16>(buf),
            DType::F16 => self.copy_back::<half::f16>(buf),
            DType::F32 => self.copy_back::<f32>(buf),
            DType::F64 => self.copy_back::<f64>(buf),
            other => anyhow::bail!("offload: {other:?} is never parked"),
        }?);
        Ok(())
    }

    /// The device tensor with the parked bytes (prefetched, or the copy queued now), once the
    /// compute stream has waited for the copy; the buffer goes back to the pool: later copies
    /// into it are queued after this one on the copy stream.
    pub fn to_device(mut self) -> Result<Tensor> {
        release(&self.dev)?;
        self.prefetch()?;
        let (t, done) = self.back.take().context("offload: prefetched above")?;
        self.dev.cuda_stream().wait(&done)?;
        if let Some(buf) = self.buf.take() {
            give_back(&self.dev, buf);
        }
        Ok(t)
    }

    fn copy_back<T: CudaDType + DeviceRepr>(&self, buf: &PinnedHostSlice<u8>) -> Result<(Tensor, CudaEvent)> {
        let n = self.shape.elem_count();
        // SAFETY: every byte is written by the copy below before a kernel reads it (the compute
        // stream waits for its event).
        let mut dst = unsafe { self.dev.alloc::<T>(n)? };
        let copy = copy_stream(&self.dev)?;
        // The buffer's allocation (on the compute stream) comes first.
        copy.wait(&mark(&self.dev.cuda_stream())?)?;
        {
            // SAFETY: the same bytes seen as u8.
            let mut bytes = unsafe { dst.transmute_mut::<u8>(self.bytes) }.context("offload: byte view")?;
            copy.memcpy_htod(&buf.as_slice()?[..self.bytes], &mut bytes)?;
        }
        Ok((wrap(dst, &self.dev, self.shape.clone()), mark(&copy)?))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A prefetched tensor never taken: its memory is freed on the compute stream, which must
        // not reuse it while the copy may still write it.
        if let Some((t, done)) = self.back.take() {
            let _ = self.dev.cuda_stream().wait(&done);
            drop(t);
        }
        if let Some(buf) = self.buf.take() {
            give_back(&self.dev, buf);
        }
    }
}
