//! The LM head: the final projection to f32 logits (inference, and the training forward's
//! logits), and for training that projection fused with cross-entropy, chunked: only rows with
//! a target are projected, a chunk at a time, and each chunk's gradient is formed at once — the
//! `[tokens, vocab]` probability matrix never exists in full. Loss is summed; the caller picks
//! the normalisation.

use super::linear::Linear;
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// f32 logits `[..., vocab]` of the final-normed hidden states `h` `[..., hidden]`.
pub fn logits(head: &Linear, h: &Tensor) -> Result<Tensor> {
    Ok(head.forward(h)?.to_dtype(DType::F32)?)
}

/// Rows projected per chunk (chunk × vocab f32 logits live at once: 256 × 49152 × 4 B = 48 MiB).
pub const CHUNK_ROWS: usize = 256;

/// Rows per chunk on `device`: on a GPU larger chunks keep the matmuls large and the per-chunk
/// launches and loss read-backs few (1024 × 128256 × 4 B = 0.5 GiB of logits at once).
pub fn chunk_rows(device: &candle_core::Device) -> usize {
    if device.is_cpu() { CHUNK_ROWS } else { 1024 }
}

pub struct Output {
    /// Σ over trained tokens of −log p(target).
    pub loss_sum: f64,
    pub n_tokens: usize,
    /// d(grad_scale · loss_sum)/dh `[n, hidden]` (zero rows for untrained tokens); None when
    /// only the loss was asked for.
    pub dh: Option<Tensor>,
}

/// `h` `[n, hidden]`, `head` `[vocab, hidden]`, `targets[i]` the token row `i` predicts or −100.
pub fn forward_backward(h: &Tensor, head: &Tensor, targets: &[i64], grad_scale: Option<f64>, chunk_rows: usize) -> Result<Output> {
    let (n, hidden) = h.dims2()?;
    anyhow::ensure!(targets.len() == n, "cross-entropy: {} targets for {n} rows", targets.len());
    let vocab = head.dim(0)?;
    let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] >= 0).collect();
    if let Some(bad) = rows.iter().map(|&i| targets[i as usize]).find(|&t| t as usize >= vocab) {
        anyhow::bail!("label {bad} is out of range for vocab_size {vocab}");
    }
    if let (Some(hv), Some(wv)) = (crate::kernels::f32_view(h), crate::kernels::f32_view(head)) {
        let tg: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
        let (loss_sum, dh) = crate::kernels::train_cpu::lm_head_xent(hv.slice(), wv.slice(), hidden, &rows, &tg, grad_scale.map(|s| s as f32), chunk_rows);
        let dh = dh.map(|d| Tensor::from_vec(d, (n, hidden), h.device())).transpose()?;
        return Ok(Output { loss_sum, n_tokens: rows.len(), dh });
    }
    let dev = h.device();
    let mut losses = Vec::new();
    let mut dh_rows = Vec::new();
    for chunk in rows.chunks(chunk_rows.max(1)) {
        let idx = Tensor::new(chunk, dev)?;
        let tgt: Vec<u32> = chunk.iter().map(|&i| targets[i as usize] as u32).collect();
        let tgt = Tensor::new(tgt.as_slice(), dev)?;
        let hc = h.index_select(&idx, 0)?;
        let logits = profile::time("·ce logits matmul", || hc.matmul(&head.t()?))?; // [c, vocab]
        let (loss, dlogits) = profile::time("·ce softmax+loss", || chunk_loss(&logits, &tgt, grad_scale))?;
        losses.push(loss);
        if let Some(dl) = dlogits {
            let rows = profile::time("·ce dh matmul", || dl.matmul(head))?;
            dh_rows.push((idx, rows));
        }
    }
    // One read-back for the whole batch.
    let loss_sum = match losses.is_empty() {
        true => 0.0,
        false => Tensor::cat(&losses, 0)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?,
    };
    let dh = match grad_scale {
        None => None,
        Some(_) => {
            let mut dh = Tensor::zeros((n, hidden), h.dtype(), dev)?;
            for (idx, rows) in dh_rows {
                dh = dh.index_add(&idx, &rows, 0)?;
            }
            Some(dh)
        }
    };
    Ok(Output { loss_sum, n_tokens: rows.len(), dh })
}

/// Per-row losses `[c]` (stat dtype) of logits `[c, vocab]` against `tgt` `[c]` (u32), and with
/// `grad_scale` the logits' gradient `scale · (softmax − onehot)` in the logits' dtype. One
/// kernel on CUDA; candle ops elsewhere.
fn chunk_loss(logits: &Tensor, tgt: &Tensor, grad_scale: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && matches!(logits.dtype(), DType::F32 | DType::BF16) {
        return crate::kernels::cuda_train::cross_entropy(&logits.contiguous()?, tgt, grad_scale.map(|g| g as f32));
    }
    let sd = super::stat_dtype(logits.dtype());
    let dtype = logits.dtype();
    let logits = logits.to_dtype(sd)?;
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
    Ok((loss, Some((p.scatter_add(&tgt, &minus_one, 1)? * scale)?.to_dtype(dtype)?)))
}
