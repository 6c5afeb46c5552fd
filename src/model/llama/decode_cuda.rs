//! Batch-1 decoding on CUDA with 4-bit weights: one new token through a layer in five fused
//! launches (src/kernels/cuda_decode.rs) against a preallocated KV cache (`GpuKv` in
//! layers/kv_cache.rs), where the generic forward runs ~30 candle ops per layer and
//! concatenates the whole cache every step (a small model is launch-bound: SmolLM2-135M reads
//! ~130 MB of weights per token, ~40 µs on an H200).
//!
//! [`forward`] takes over `Llama::forward` for one token with a cache when every decoder linear
//! is a 4-bit weight on the GPU with compute dtype = activations dtype (f32 or bf16), no LoRA
//! adapter and no bias; otherwise (and for prefill) the generic path runs. The prefill's cache
//! tensors move into the buffers at the first decoding step; the generic path reads the
//! buffers back if it runs again later.

use super::{KvCache, LayerKv, Linear, Llama, Weight};
use crate::kernels::cuda::Quant4Gpu;
use crate::kernels::cuda_decode as k;
use crate::model::layers::kv_cache::{GpuKv, MIN_CAP};
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Scratch vectors of a step, allocated at the first one: the rotated query, the attention
/// output, the SwiGLU output.
pub struct Scratch {
    q: Tensor,
    att: Tensor,
    mlp: Tensor,
}

/// The 4-bit GPU weight of `l` if the fused kernels can run it with activations in `dtype`.
fn fused_weight(l: &Linear, dtype: DType) -> Option<&Quant4Gpu> {
    match &l.weight {
        Weight::Quant4 { gpu: Some(g), bnb_compute_dtype, dtype: act, .. }
            if *bnb_compute_dtype == dtype && *act == dtype && l.lora.is_none() && l.bias.is_none() && g.fused_ok() =>
        {
            Some(g)
        }
        _ => None,
    }
}

/// Every layer's seven weights (q, k, v, o, gate, up, down), if the fused path applies to the
/// model: see the module docs; one scales layout throughout (it selects the kernels).
fn fused_weights(m: &Llama) -> Option<Vec<[&Quant4Gpu; 7]>> {
    let c = &m.config;
    let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    if !m.device.is_cuda() || !matches!(m.dtype, DType::F32 | DType::BF16) || !matches!(d, 32 | 64 | 128 | 256) || kvh == 0 || h % kvh != 0 {
        return None;
    }
    let layers: Vec<[&Quant4Gpu; 7]> = m
        .layers
        .iter()
        .map(|b| {
            let (a, f) = (&b.self_attn, &b.mlp);
            let ls = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &f.gate_proj, &f.up_proj, &f.down_proj];
            let ws: Vec<&Quant4Gpu> = ls.iter().map(|l| fused_weight(l, m.dtype)).collect::<Option<_>>()?;
            ws.try_into().ok()
        })
        .collect::<Option<_>>()?;
    let kind = layers.first()?[0].kind();
    layers.iter().flatten().all(|w| w.kind() == kind).then_some(layers)
}

/// `Llama::forward` for `ids` `[1, 1]` with `cache`: f32 logits `[1, 1, vocab]` through the
/// fused kernels, or `None` when they do not apply (the caller runs the generic path).
pub(super) fn forward(m: &Llama, ids: &Tensor, cache: &mut KvCache) -> Result<Option<Tensor>> {
    if cache.unfused || ids.dims() != [1, 1] {
        return Ok(None);
    }
    let Some(weights) = fused_weights(m) else { return Ok(None) };
    let batch1 = |s: &LayerKv| match s {
        LayerKv::Empty | LayerKv::Gpu(_) => true,
        LayerKv::Tensors(k, _) => k.dim(0).is_ok_and(|b| b == 1),
        LayerKv::Buf(_) => false,
    };
    if !cache.layers.iter().all(batch1) {
        return Ok(None);
    }
    let c = &m.config;
    let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let pos = cache.len();
    for slot in cache.layers.iter_mut() {
        let mut kv = match std::mem::take(slot) {
            LayerKv::Tensors(k, v) => GpuKv::from_tensors(&k, &v)?,
            LayerKv::Gpu(kv) => kv,
            _ => {
                let z = || Tensor::zeros((kvh, MIN_CAP, d), m.dtype, &m.device);
                GpuKv { k: z()?, v: z()?, len: 0 }
            }
        };
        kv.reserve_one()?;
        *slot = LayerKv::Gpu(kv);
    }
    if cache.decode.is_none() {
        let z = |n: usize| Tensor::zeros(n, m.dtype, &m.device);
        cache.decode = Some(Scratch { q: z(h * d)?, att: z(h * d)?, mlp: z(c.intermediate_size)? });
    }
    let Some(s) = &cache.decode else { unreachable!("made above") };
    // The residual stream, updated in place: a new tensor (index_select's output).
    let x = m.embed(ids)?;
    for ((b, w), slot) in m.layers.iter().zip(&weights).zip(cache.layers.iter_mut()) {
        let LayerKv::Gpu(kv) = slot else { unreachable!("converted above") };
        let (n1, n2) = (&b.input_layernorm, &b.post_attention_layernorm);
        k::qkv_rope(&x, &n1.weight, n1.eps as f32, [w[0], w[1], w[2]], &m.rope.cos, &m.rope.sin, pos, d, &s.q, &kv.k, &kv.v)?;
        kv.len += 1;
        k::attention(&s.q, &kv.k, &kv.v, kv.len, &s.att)?;
        k::residual(w[3], &s.att, &x)?;
        k::gate_up(&x, &n2.weight, n2.eps as f32, w[4], w[5], &s.mlp)?;
        k::residual(w[6], &s.mlp, &x)?;
    }
    Ok(Some(m.logits(&x)?))
}
