//! The LM head and softmax cross-entropy on the CPU in f32: the logits of a chunk of rows at a
//! time in one reused buffer, loss and gradient in place (one pass instead of 5–8 candle ops).

use crate::kernels::matmul::{mm, rm, tr};
use crate::kernels::vecmath;
use rayon::prelude::*;

/// Softmax cross-entropy over rows of `logits` `[rows, vocab]`, in place: returns each row's
/// −log p(target) and, with a `scale`, leaves `scale · (softmax − onehot(target))` in `logits`
/// (without one the row is left as scratch).
pub fn softmax_xent_rows(logits: &mut [f32], vocab: usize, targets: &[u32], scale: Option<f32>) -> Vec<f64> {
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = vecmath::max(row);
            let picked = row[t as usize] as f64;
            let sum = vecmath::exp_shift_sum_inplace(row, max);
            let loss = (sum.ln() + max as f64) - picked;
            if let Some(s) = scale {
                let inv = (1.0 / sum) as f32 * s;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                row[t as usize] -= s;
            }
            loss
        })
        .collect()
}

/// The LM head and cross-entropy over the rows `rows` of `h` `[n, hidden]`, `chunk` rows at a
/// time: logits `[chunk, vocab]` = `h_rows · headᵀ` into one reused buffer, softmax-xent in
/// place, and with a `scale` the gradient `dh` `[n, hidden]` (zero on rows not listed).
/// Returns `(Σ −log p(target), dh)`.
pub fn lm_head_xent(h: &[f32], head: &[f32], hidden: usize, rows: &[u32], targets: &[u32], scale: Option<f32>, chunk: usize) -> (f64, Option<Vec<f32>>) {
    let vocab = head.len() / hidden;
    let chunk = chunk.max(1).min(rows.len().max(1));
    let mut logits = vec![0f32; chunk * vocab];
    let mut hc = vec![0f32; chunk * hidden];
    let mut dhc = vec![0f32; chunk * hidden];
    let mut dh = scale.map(|_| vec![0f32; h.len()]);
    let mut loss = 0f64;
    for (rs, ts) in rows.chunks(chunk).zip(targets.chunks(chunk)) {
        let c = rs.len();
        for (dst, &r) in hc.chunks_mut(hidden).zip(rs) {
            dst.copy_from_slice(&h[r as usize * hidden..(r as usize + 1) * hidden]);
        }
        let lg = &mut logits[..c * vocab];
        mm(c, vocab, hidden, lg, false, rm(&hc[..c * hidden], hidden), tr(head, hidden), 1.0);
        loss += softmax_xent_rows(lg, vocab, ts, scale).iter().sum::<f64>();
        if let Some(dh) = dh.as_mut() {
            mm(c, hidden, vocab, &mut dhc[..c * hidden], false, rm(lg, vocab), rm(head, hidden), 1.0);
            for (src, &r) in dhc.chunks(hidden).zip(rs) {
                dh[r as usize * hidden..(r as usize + 1) * hidden].copy_from_slice(src);
            }
        }
    }
    (loss, dh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xent_matches_direct_formula() {
        let vocab = 7;
        let logits: Vec<f32> = (0..14).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
        let targets = [3u32, 6];
        let mut g = logits.clone();
        let losses = softmax_xent_rows(&mut g, vocab, &targets, Some(0.5));
        let plain = softmax_xent_rows(&mut logits.clone(), vocab, &targets, None);
        for r in 0..2 {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            assert!((losses[r] - (lse - row[targets[r] as usize] as f64)).abs() < 1e-6);
            assert!((plain[r] - losses[r]).abs() < 1e-6);
            for j in 0..vocab {
                let p = ((row[j] as f64) - lse).exp();
                let want = 0.5 * (p - if j == targets[r] as usize { 1.0 } else { 0.0 });
                assert!((g[r * vocab + j] as f64 - want).abs() < 1e-6);
            }
        }
    }
}
