//! Batch-1 decoding on CUDA with 4-bit weights: one new token through a layer in five fused
//! launches (`kernels::decode`, replayed as one CUDA graph from the second step on) against a
//! preallocated KV cache, where the generic forward
//! runs ~30 candle ops per layer and concatenates the whole cache every step (a small model is
//! launch-bound: SmolLM2-135M reads ~130 MB of weights per token, ~40 µs on an H200).
//!
//! [`forward`] takes over `Llama::forward` for one token with a cache when every decoder linear
//! is a 4-bit weight on the GPU with compute dtype = activations dtype (f32 or bf16), no LoRA
//! adapter and no bias, in a plain Llama network (no family variant: q/k norms, soft-capping,
//! windows, Gemma's norms, GeGLU, fused projections...); otherwise (and for prefill) the
//! generic path runs. The prefill's cache
//! tensors move into the buffers at the first decoding step; the generic path reads the
//! buffers back if it runs again later.

use super::{KvCache, LayerKv, Linear, Llama, Weight};
use crate::model::names::LLAMA;
use crate::kernels::decode::{self as k, GpuKv, LayerWeights, Scratch};
use crate::kernels::quant4::Quant4Gpu;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// The 4-bit GPU weight of `l` if the fused kernels can run it with activations in `dtype`.
fn fused_weight(l: &Linear, dtype: DType) -> Option<&Quant4Gpu> {
    match &l.weight {
        Weight::Quant4 { gpu, bnb_compute_dtype, dtype: act, .. } if *bnb_compute_dtype == dtype && *act == dtype && l.lora.is_none() && l.bias.is_none() => {
            k::fused_weight(gpu)
        }
        _ => None,
    }
}

/// Every layer's seven weights (q, k, v, o, gate, up, down), if the fused path applies to the
/// model: see the module docs; one scales layout throughout (it selects the kernels).
fn fused_weights(m: &Llama) -> Option<Vec<[&Quant4Gpu; 7]>> {
    let c = &m.config;
    let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    if !c.is_plain_llama() || !k::applies(&m.device, m.dtype, h, kvh, d) {
        return None;
    }
    let layers: Vec<[&Quant4Gpu; 7]> = m
        .layers
        .iter()
        .map(|b| {
            let ws: Vec<&Quant4Gpu> = LLAMA.projs.iter().map(|&p| fused_weight(b.try_proj(p)?, m.dtype)).collect::<Option<_>>()?;
            ws.try_into().ok()
        })
        .collect::<Option<_>>()?;
    k::one_layout(&layers).then_some(layers)
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
            _ => GpuKv::new(kvh, d, m.dtype, &m.device)?,
        };
        kv.reserve_one()?;
        *slot = LayerKv::Gpu(kv);
    }
    if cache.decode.is_none() {
        cache.decode = Some(Scratch::new(c.hidden_size, h * d, c.intermediate_size, m.dtype, &m.device)?);
    }
    let Some(s) = &mut cache.decode else { unreachable!("made above") };
    let lws: Vec<LayerWeights> = m
        .layers
        .iter()
        .zip(&weights)
        .map(|(b, w)| {
            let (n1, n2) = (&b.input_layernorm, &b.post_attention_layernorm);
            LayerWeights { attn_norm: (&n1.weight, n1.eps as f32), mlp_norm: (&n2.weight, n2.eps as f32), proj: *w }
        })
        .collect();
    let mut kvs: Vec<&mut GpuKv> = cache
        .layers
        .iter_mut()
        .map(|slot| match slot {
            LayerKv::Gpu(kv) => kv,
            _ => unreachable!("converted above"),
        })
        .collect();
    let x = k::layers(&m.embed(ids)?, &lws, &m.rope.cos, &m.rope.sin, pos, d, &mut kvs, s)?;
    Ok(Some(m.logits(&x)?))
}
