//! The LM head: the final projection to f32 logits (inference, and the training forward's
//! logits), and for training that projection fused with cross-entropy, chunked: only rows with
//! a target are projected, a chunk at a time, and each chunk's gradient is formed at once — the
//! `[tokens, vocab]` probability matrix never exists in full. Loss is summed; the caller picks
//! the normalisation. Gemma 2's final-logit soft-capping (`cap·tanh(z/cap)`) applies to the
//! logits and inside the loss, with its backward.

use super::linear::Linear;
use crate::profile;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// f32 logits `[..., vocab]` of the final-normed hidden states `h` `[..., hidden]`.
pub fn logits(head: &Linear, h: &Tensor) -> Result<Tensor> {
    Ok(head.forward(h)?.to_dtype(DType::F32)?)
}

/// [`logits`] soft-capped: `cap·tanh(z/cap)` (Gemma 2's `final_logit_softcapping`).
pub fn capped_logits(head: &Linear, h: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let z = logits(head, h)?;
    match softcap {
        Some(c) => Ok(((z / c)?.tanh()? * c)?),
        None => Ok(z),
    }
}

pub use crate::kernels::cross_entropy::{chunk_rows, CHUNK_ROWS};

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
    forward_backward_capped(h, head, targets, grad_scale, chunk_rows, None)
}

/// [`forward_backward`] of soft-capped logits (`softcap`: Gemma 2's final cap).
pub fn forward_backward_capped(h: &Tensor, head: &Tensor, targets: &[i64], grad_scale: Option<f64>, chunk_rows: usize, softcap: Option<f64>) -> Result<Output> {
    let (n, hidden) = h.dims2()?;
    anyhow::ensure!(targets.len() == n, "cross-entropy: {} targets for {n} rows", targets.len());
    let vocab = head.dim(0)?;
    let rows: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize] >= 0).collect();
    if let Some(bad) = rows.iter().map(|&i| targets[i as usize]).find(|&t| t as usize >= vocab) {
        anyhow::bail!("label {bad} is out of range for vocab_size {vocab}");
    }
    let tg: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    if let Some((loss_sum, dh)) = crate::kernels::cross_entropy::lm_head_xent(h, head, &rows, &tg, grad_scale, chunk_rows, softcap)? {
        return Ok(Output { loss_sum, n_tokens: rows.len(), dh });
    }
    let dev = h.device();
    let mut losses = Vec::new();
    let mut dh_rows = Vec::new();
    for (chunk, tgt) in rows.chunks(chunk_rows.max(1)).zip(tg.chunks(chunk_rows.max(1))) {
        let idx = Tensor::new(chunk, dev)?;
        let tgt = Tensor::new(tgt, dev)?;
        let hc = h.index_select(&idx, 0)?;
        let logits = profile::time("·ce logits matmul", || hc.matmul(&head.t()?))?; // [c, vocab]
        let (loss, dlogits) = profile::time("·ce softmax+loss", || crate::kernels::cross_entropy::xent_rows(&logits, &tgt, grad_scale, softcap))?;
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
