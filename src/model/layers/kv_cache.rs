//! The key/value cache of generation, one entry per layer, beside the attention that fills and
//! reads it (`layers/attention.rs`).

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Key/value cache for generation, one entry per layer.
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    /// CUDA: the fused decode path's scratch vectors (made at its first step).
    pub(crate) decode: Option<crate::kernels::decode::Scratch>,
    /// CUDA: keep to the generic path (what the fused one is tested against).
    pub(crate) unfused: bool,
}

/// One layer's cached keys and values. With batch 1 in f32 on the CPU (generation) they live
/// in preallocated buffers that decoding appends to in place, and likewise in GPU buffers when
/// CUDA decodes through the fused path (`kernels::decode::GpuKv`); otherwise they are tensors
/// `[b, kvh, s, d]` grown by concatenation.
#[derive(Default)]
pub enum LayerKv {
    #[default]
    Empty,
    Tensors(Tensor, Tensor),
    Buf(KvBuf),
    Gpu(crate::kernels::decode::GpuKv),
}

/// Keys and values as `[kvh, cap, d]` f32 buffers (per head: positions `0..len` in use).
pub struct KvBuf {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    kvh: usize,
    d: usize,
    pub(crate) len: usize,
    pub(crate) cap: usize,
}

impl KvBuf {
    pub(crate) fn new(kvh: usize, d: usize) -> Self {
        Self { k: Vec::new(), v: Vec::new(), kvh, d, len: 0, cap: 0 }
    }

    /// Append `t` positions from `k`/`v` laid out `[kvh, t, d]`.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let (kvh, d) = (self.kvh, self.d);
        assert!(k.len() == kvh * t * d && v.len() == kvh * t * d);
        if self.len + t > self.cap {
            let cap = (self.len + t).max(2 * self.cap).max(64);
            let relayout = |old: &[f32]| {
                let mut new = vec![0f32; kvh * cap * d];
                for h in 0..kvh {
                    new[h * cap * d..(h * cap + self.len) * d].copy_from_slice(&old[h * self.cap * d..(h * self.cap + self.len) * d]);
                }
                new
            };
            self.k = relayout(&self.k);
            self.v = relayout(&self.v);
            self.cap = cap;
        }
        for h in 0..kvh {
            let dst = (h * self.cap + self.len) * d..(h * self.cap + self.len + t) * d;
            self.k[dst.clone()].copy_from_slice(&k[h * t * d..(h + 1) * t * d]);
            self.v[dst].copy_from_slice(&v[h * t * d..(h + 1) * t * d]);
        }
        self.len += t;
    }

    /// All cached positions as tensors `[1, kvh, len, d]`.
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (kvh, d, len) = (self.kvh, self.d, self.len);
        let gather = |buf: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(kvh * len * d);
            for h in 0..kvh {
                out.extend_from_slice(&buf[h * self.cap * d..(h * self.cap + len) * d]);
            }
            Ok(Tensor::from_vec(out, (1, kvh, len, d), device)?)
        };
        Ok((gather(&self.k)?, gather(&self.v)?))
    }
}

/// An f32 CPU tensor's elements, contiguous (a copy).
pub(crate) fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl LayerKv {
    pub fn len(&self) -> usize {
        match self {
            LayerKv::Empty => 0,
            LayerKv::Tensors(k, _) => k.dim(2).unwrap_or(0),
            LayerKv::Buf(b) => b.len,
            LayerKv::Gpu(g) => g.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new keys and values `[b, kvh, t, d]` and returns all cached ones `[b, kvh, s, d]`.
    pub fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if let LayerKv::Buf(buf) = self {
            let t = k.dim(2)?;
            buf.append(&f32_vec(&k)?, &f32_vec(&v)?, t);
            return if buf.len == t { Ok((k, v)) } else { buf.tensors(k.device()) };
        }
        let (k, v) = match std::mem::take(self) {
            LayerKv::Tensors(pk, pv) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            LayerKv::Gpu(g) => {
                let (pk, pv) = g.tensors()?;
                (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
            }
            _ => (k, v),
        };
        *self = LayerKv::Tensors(k.clone(), v.clone());
        Ok((k, v))
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| LayerKv::Empty).collect(),
            decode: None,
            unfused: false,
        }
    }

    /// This cache never takes the fused CUDA decode path (the reference in tests).
    pub fn unfused(mut self) -> Self {
        self.unfused = true;
        self
    }

    /// Decoding steps the fused CUDA path ran as a replay of its captured graph.
    pub fn graph_replays(&self) -> u64 {
        self.decode.as_ref().map_or(0, |s| s.graph_replays())
    }

    /// Whether the fused CUDA decode path holds this cache (it has run a step).
    pub fn is_fused(&self) -> bool {
        matches!(self.layers.first(), Some(LayerKv::Gpu(_)))
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
