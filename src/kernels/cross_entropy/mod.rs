//! The LM head and softmax cross-entropy. Dispatch order: the fused CPU kernel takes the whole
//! LM head + loss for f32 ([`lm_head_xent`]); elsewhere the caller projects chunks of rows
//! (cuBLAS on a GPU) and [`xent_rows`] takes each chunk: the CUDA kernel (f32, bf16), else
//! candle's ops in the statistics dtype. All three take final-logit soft-capping (Gemma 2:
//! `z ← cap·tanh(z/cap)` before the softmax, its `1 − tanh²` chained into the gradient).

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::{f32_view, stat_dtype};
use anyhow::Result;
use candle_core::{Device, Tensor, D};

/// Rows projected per chunk on the CPU (chunk × vocab f32 logits live at once: 256 × 49152 ×
/// 4 B = 48 MiB).
pub const CHUNK_ROWS: usize = 256;

/// Bytes of a GPU chunk's logits and their gradient together (what the chunk adds to the peak).
const GPU_CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk on `device` for a head of `vocab` rows. On a GPU larger chunks keep the
/// matmuls large and the per-chunk launches and loss read-backs few; the logits and their
/// gradient (bf16: 4 B per element together) stay within 256 MiB: 512 rows of Llama 3's 128k
/// vocabulary (1024 rows were 0.5 GiB, the largest part of a checkpointed 3B step's peak), 1024
/// of SmolLM2's 49k; between 128 and 1024 rows.
pub fn chunk_rows(device: &Device, vocab: usize) -> usize {
    if device.is_cpu() { CHUNK_ROWS } else { gpu_chunk_rows(vocab) }
}

fn gpu_chunk_rows(vocab: usize) -> usize {
    let fit = GPU_CHUNK_BYTES / (4 * vocab.max(1));
    // The largest power of two that fits.
    (1usize << (usize::BITS - 1 - fit.max(1).leading_zeros())).clamp(128, 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn gpu_chunks_keep_logits_and_gradient_within_256_mib() {
        for (vocab, rows) in [(128_256, 512), (49_152, 1024), (262_144, 256), (32_000, 1024), (1 << 22, 128), (1, 1024)] {
            assert_eq!(super::gpu_chunk_rows(vocab), rows, "vocab {vocab}");
        }
        assert_eq!(super::chunk_rows(&candle_core::Device::Cpu, 128_256), super::CHUNK_ROWS);
    }
}

/// The whole LM head + loss over the `rows` of `h` `[n, hidden]` (their `targets`) with `head`
/// `[vocab, hidden]`, when a fused kernel takes them (the CPU kernel: contiguous f32), `chunk`
/// rows at a time: `(Σ −log p(target), d(grad_scale · loss)/dh [n, hidden] with grad_scale)`.
/// `softcap`: the logits are soft-capped first, `cap·tanh(z/cap)`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_xent(h: &Tensor, head: &Tensor, rows: &[u32], targets: &[u32], grad_scale: Option<f64>, chunk: usize, softcap: Option<f64>) -> Result<Option<(f64, Option<Tensor>)>> {
    let (Some(hv), Some(wv)) = (f32_view(h), f32_view(head)) else { return Ok(None) };
    let (n, hidden) = h.dims2()?;
    let (loss_sum, dh) = cpu::lm_head_xent(hv.slice(), wv.slice(), hidden, rows, targets, grad_scale.map(|s| s as f32), softcap.map(|c| c as f32), chunk);
    let dh = dh.map(|d| Tensor::from_vec(d, (n, hidden), h.device())).transpose()?;
    Ok(Some((loss_sum, dh)))
}

/// Per-row losses `[c]` (statistics dtype) of logits `[c, vocab]` against `tgt` `[c]` (u32),
/// and with `grad_scale` the logits' gradient `scale · (softmax − onehot)` in their dtype.
/// With `softcap` the loss is of `cap·tanh(logits/cap)` and the gradient is chained through it.
pub fn xent_rows(logits: &Tensor, tgt: &Tensor, grad_scale: Option<f64>, softcap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if super::cuda_float(logits) {
        return cuda::cross_entropy(&logits.contiguous()?, tgt, grad_scale.map(|g| g as f32), softcap.map(|c| c as f32));
    }
    let sd = stat_dtype(logits.dtype());
    let dtype = logits.dtype();
    let raw = logits.to_dtype(sd)?;
    // tanh(z/cap), kept for the chain rule: d cap·tanh(z/cap) / dz = 1 − tanh².
    let th = softcap.map(|c| (&raw / c)?.tanh()).transpose()?;
    let logits = match (&th, softcap) {
        (Some(th), Some(c)) => (th * c)?,
        _ => raw,
    };
    let tgt = tgt.unsqueeze(1)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = (max + sum.log()?)?;
    let loss = (lse - logits.gather(&tgt, 1)?)?.squeeze(1)?;
    let Some(scale) = grad_scale else { return Ok((loss, None)) };
    // d loss / d logits = softmax − onehot(target).
    let p = e.broadcast_div(&sum)?;
    let minus_one = Tensor::full(-1f32, (tgt.dim(0)?, 1), logits.device())?.to_dtype(sd)?;
    let mut dz = (p.scatter_add(&tgt, &minus_one, 1)? * scale)?;
    if let Some(th) = th {
        dz = (dz * (1.0 - th.sqr()?)?)?;
    }
    Ok((loss, Some(dz.to_dtype(dtype)?)))
}
