//! The LM head and softmax cross-entropy on the CPU in f32: the logits of a chunk of rows at a
//! time in one reused buffer, loss and gradient in place (one pass instead of 5–8 candle ops).

use crate::kernels::matmul::{mm, rm, tr};
use crate::kernels::vecmath;
use rayon::prelude::*;

/// Softmax cross-entropy over rows of `logits` `[rows, vocab]`, in place: returns each row's
/// −log p(target) and, with a `scale`, leaves `scale · (softmax − onehot(target))` in `logits`
/// (without one the row is left as scratch). With a `softcap` the logits `z` are first capped
/// to `cap·tanh(z/cap)` (Gemma 2's final logits) and the gradient is the raw logits'.
pub fn softmax_xent_rows(logits: &mut [f32], vocab: usize, targets: &[u32], scale: Option<f32>, softcap: Option<f32>) -> Vec<f64> {
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if let Some(cap) = softcap {
                return xent_row_capped(row, t as usize, scale, cap);
            }
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

/// One row of [`softmax_xent_rows`] with soft-capped logits `c = cap·th`, `th = tanh(z/cap)`:
/// the row holds `th` between the passes, and the gradient is
/// `scale · (softmax(c) − onehot) · (1 − th²)`.
fn xent_row_capped(row: &mut [f32], t: usize, scale: Option<f32>, cap: f32) -> f64 {
    let inv_cap = 1.0 / cap;
    row.iter_mut().for_each(|x| *x = (*x * inv_cap).tanh());
    let max = cap * vecmath::max(row);
    let sum: f64 = row.iter().map(|&th| (cap * th - max).exp() as f64).sum();
    let loss = (sum.ln() + max as f64) - (cap * row[t]) as f64;
    if let Some(s) = scale {
        let inv = (1.0 / sum) as f32;
        for (j, x) in row.iter_mut().enumerate() {
            let th = *x;
            let p = (cap * th - max).exp() * inv - if j == t { 1.0 } else { 0.0 };
            *x = s * p * (1.0 - th * th);
        }
    }
    loss
}

/// The LM head and cross-entropy over the rows `rows` of `h` `[n, hidden]`, `chunk` rows at a
/// time: logits `[chunk, vocab]` = `h_rows · headᵀ` into one reused buffer, softmax-xent in
/// place (of the logits soft-capped by `softcap`), and with a `scale` the gradient `dh`
/// `[n, hidden]` (zero on rows not listed). Returns `(Σ −log p(target), dh)`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_xent(h: &[f32], head: &[f32], hidden: usize, rows: &[u32], targets: &[u32], scale: Option<f32>, softcap: Option<f32>, chunk: usize) -> (f64, Option<Vec<f32>>) {
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
        loss += softmax_xent_rows(lg, vocab, ts, scale, softcap).iter().sum::<f64>();
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
        let losses = softmax_xent_rows(&mut g, vocab, &targets, Some(0.5), None);
        let plain = softmax_xent_rows(&mut logits.clone(), vocab, &targets, None, None);
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

    /// Soft-capped logits: the loss of `cap·tanh(z/cap)` in f64, and its gradient against
    /// central differences of that loss; a cap that bends the logits (|z| up to ~6, cap 3).
    #[test]
    fn capped_xent_matches_f64_and_differences() {
        let (vocab, cap) = (11, 3.0f64);
        let logits: Vec<f32> = (0..33).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.9).collect();
        let targets = [3u32, 10, 0];
        let loss = |z: &[f64], t: usize| {
            let c: Vec<f64> = z.iter().map(|&x| cap * (x / cap).tanh()).collect();
            c.iter().map(|x| x.exp()).sum::<f64>().ln() - c[t]
        };
        let mut g = logits.clone();
        let got = softmax_xent_rows(&mut g, vocab, &targets, Some(0.5), Some(cap as f32));
        let plain = softmax_xent_rows(&mut logits.clone(), vocab, &targets, None, None);
        for r in 0..3 {
            let z: Vec<f64> = logits[r * vocab..(r + 1) * vocab].iter().map(|&x| x as f64).collect();
            let t = targets[r] as usize;
            assert!((got[r] - loss(&z, t)).abs() < 1e-5, "row {r}: {} vs {}", got[r], loss(&z, t));
            assert!((got[r] - plain[r]).abs() > 1e-2, "row {r}: the cap changed nothing");
            for j in 0..vocab {
                let (mut a, mut b) = (z.clone(), z.clone());
                a[j] += 1e-5;
                b[j] -= 1e-5;
                let want = 0.5 * (loss(&a, t) - loss(&b, t)) / 2e-5;
                assert!((g[r * vocab + j] as f64 - want).abs() < 1e-5, "row {r} col {j}: {} vs {want}", g[r * vocab + j]);
            }
        }
    }
}
