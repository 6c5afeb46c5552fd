//! Batch-1 decoding on CUDA with 4-bit weights: one new token through a layer in five fused
//! launches ([`layer`]) against preallocated KV buffers ([`GpuKv`]), where the generic forward
//! runs ~30 candle ops per layer and concatenates the whole cache every step (a small model is
//! launch-bound). The model's decode step (`model::llama::decode_cuda`) asks [`applies`] and
//! [`fused_weight`] whether the fused path takes it; without the `cuda` feature it never does.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub(crate) use cuda::W4Arg;

use super::quant4::{DeviceCopy, Quant4Gpu};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Capacity (positions) of a new buffer at least.
const MIN_CAP: usize = 64;

/// One layer's keys and values in buffers `[kv_heads, cap, d]` (positions `0..len` in use) that
/// decoding appends to in place, doubled (one copy) when full.
pub struct GpuKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// `t` `[kvh, len, d]` followed by zeros up to `cap` positions, in a new tensor.
fn with_room(t: &Tensor, cap: usize) -> Result<Tensor> {
    let (kvh, len, d) = t.dims3()?;
    let zeros = Tensor::zeros((kvh, cap - len, d), t.dtype(), t.device())?;
    Ok(if len == 0 { zeros } else { Tensor::cat(&[t, &zeros], 1)? })
}

impl GpuKv {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empty buffers for `kv_heads` heads of `d`.
    pub fn new(kv_heads: usize, d: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = || Tensor::zeros((kv_heads, MIN_CAP, d), dtype, device);
        Ok(Self { k: z()?, v: z()?, len: 0 })
    }

    /// From the generic path's cache tensors `[1, kvh, s, d]` (after prefill).
    pub fn from_tensors(k: &Tensor, v: &Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        let cap = (len + 1).next_power_of_two().max(MIN_CAP);
        Ok(Self { k: with_room(&k.squeeze(0)?, cap)?, v: with_room(&v.squeeze(0)?, cap)?, len })
    }

    /// Room for position `len`.
    pub fn reserve_one(&mut self) -> Result<()> {
        let cap = self.k.dim(1)?;
        if self.len == cap {
            self.k = with_room(&self.k, 2 * cap)?;
            self.v = with_room(&self.v, 2 * cap)?;
        }
        Ok(())
    }

    /// The cached positions as the generic path keeps them, `[1, kvh, len, d]` (a copy, except
    /// with one KV head: then a view, read once before this buffer is dropped).
    pub fn tensors(&self) -> Result<(Tensor, Tensor)> {
        let take = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, 0, self.len)?.contiguous()?.unsqueeze(0)?) };
        Ok((take(&self.k)?, take(&self.v)?))
    }
}

/// Buffers of a step, allocated at the first one: the residual stream, the rotated query, the
/// attention output, the SwiGLU output, the position (u32 on the device, what the kernels read);
/// on CUDA the captured graph of the layers' launches.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Scratch {
    x: Tensor,
    q: Tensor,
    att: Tensor,
    mlp: Tensor,
    pos: Tensor,
    #[cfg(feature = "cuda")]
    replay: cuda::Replay,
}

impl Scratch {
    /// For a residual stream of `hidden`, `heads · d` query values and `intermediate` MLP values.
    pub fn new(hidden: usize, heads_d: usize, intermediate: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = |n: usize| Tensor::zeros(n, dtype, device);
        Ok(Self {
            x: Tensor::zeros((1, 1, hidden), dtype, device)?,
            q: z(heads_d)?,
            att: z(heads_d)?,
            mlp: z(intermediate)?,
            pos: Tensor::zeros(1, DType::U32, device)?,
            #[cfg(feature = "cuda")]
            replay: Default::default(),
        })
    }

    /// Steps that ran as a replay of the captured graph (0 without CUDA).
    pub fn graph_replays(&self) -> u64 {
        #[cfg(feature = "cuda")]
        return self.replay.replays;
        #[cfg(not(feature = "cuda"))]
        0
    }
}

/// The position a step writes: `at` on the host (the launchers' bounds checks) and the same
/// number in `dev` (u32 [1] on the GPU), where the kernels read it: a captured graph of the
/// step then replays unchanged at every position.
pub struct Pos<'a> {
    pub at: usize,
    pub dev: &'a Tensor,
}

/// One decoder layer as the fused kernels take it: the two RMSNorms (weight, eps) and the
/// seven projections q, k, v, o, gate, up, down.
pub struct LayerWeights<'a> {
    pub attn_norm: (&'a Tensor, f32),
    pub mlp_norm: (&'a Tensor, f32),
    pub proj: [&'a Quant4Gpu; 7],
}

/// Whether the fused path can run a model of this shape on `device` with activations in
/// `dtype`: CUDA, f32 or bf16, head size 32 to 256 (a power of two), grouped-query heads.
pub fn applies(device: &Device, dtype: DType, heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    device.is_cuda() && matches!(dtype, DType::F32 | DType::BF16) && matches!(head_dim, 32 | 64 | 128 | 256) && kv_heads > 0 && heads.is_multiple_of(kv_heads)
}

/// The device copy of a 4-bit weight if the fused kernels take it (2-D, whole 32-element chunks
/// per row, aligned codes).
pub fn fused_weight(gpu: &DeviceCopy) -> Option<&Quant4Gpu> {
    #[cfg(feature = "cuda")]
    return gpu.as_deref().filter(|g| g.fused_ok());
    #[cfg(not(feature = "cuda"))]
    gpu.as_deref()
}

/// Whether every weight of `layers` has one scales layout (it selects the kernels); false for
/// no layers.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn one_layout(layers: &[[&Quant4Gpu; 7]]) -> bool {
    #[cfg(feature = "cuda")]
    return layers.first().is_some_and(|first| layers.iter().flatten().all(|w| w.kind() == first[0].kind()));
    #[cfg(not(feature = "cuda"))]
    false
}

/// One new token at position `pos` through every layer: `emb` [1, 1, hidden] its embedding,
/// RoPE tables `cos`/`sin` [positions, d/2], `d` the head size; layer i's k and v appended to
/// `kvs[i]` (room reserved). Returns the residual stream after the last layer, [1, 1, hidden]:
/// the scratch's buffer, overwritten by the next step. Per layer five launches; on CUDA they
/// are captured as one graph at the second step with the same buffers and replayed from then
/// on (a launch costs the host more than a small model's kernel costs the GPU).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn layers(emb: &Tensor, layers: &[LayerWeights], cos: &Tensor, sin: &Tensor, pos: usize, d: usize, kvs: &mut [&mut GpuKv], s: &mut Scratch) -> Result<Tensor> {
    anyhow::ensure!(layers.len() == kvs.len(), "fused decode: {} layers, {} caches", layers.len(), kvs.len());
    #[cfg(feature = "cuda")]
    return cuda::layers(emb, layers, cos, sin, pos, d, kvs, s);
    #[cfg(not(feature = "cuda"))]
    match *layers.first().map(|l| l.proj[0]).ok_or_else(|| anyhow::anyhow!("fused decode: no layers"))? {}
}

