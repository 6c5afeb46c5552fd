//! Fused CPU kernels for the training engine's elementwise hot spots, each replacing a chain of
//! candle ops (one pass over memory instead of 5–8, parallel over rows). The engine ops call
//! these for f32 CPU tensors and keep the candle formulation for other devices and dtypes.

use super::matmul::{mm, rm, tr};
use super::vecmath;
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

/// SwiGLU forward `silu(g)·u` into a new buffer.
pub fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    vecmath::silu_mul_inplace(&mut out, u);
    out
}

/// SwiGLU backward: `dg = dh·u·σ(g)(1 + g(1 − σ(g)))`, `du = dh·g·σ(g)`.
pub fn swiglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    const TASK: usize = 16 * 1024;
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(TASK)
        .zip(du.par_chunks_mut(TASK))
        .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)).zip(dh.par_chunks(TASK)))
        .for_each(|((dg, du), ((g, u), dh))| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F.
                    return unsafe { swiglu_bwd_avx512(g, u, dh, dg, du) };
                }
            }
            for i in 0..dg.len() {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = dh[i] * g[i] * s;
            }
        });
    (dg, du)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_bwd_avx512(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        let hv = _mm512_maskz_loadu_ps(m, dh.as_ptr().add(i));
        let s = _mm512_div_ps(one, _mm512_add_ps(one, vecmath::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        let gs = _mm512_mul_ps(gv, s);
        // dsilu = s·(1 + g·(1 − s)) = s + gs·(1 − s)
        let dsilu = _mm512_fmadd_ps(gs, _mm512_sub_ps(one, s), s);
        _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(hv, uv), dsilu));
        _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), m, _mm512_mul_ps(hv, gs));
        i += 16;
    }
}

/// RMSNorm forward over rows of `h`: `y = x · rstd · w`; returns `(y, rstd per row)`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; x.len() / h];
    y.par_chunks_mut(h).zip(rstd.par_iter_mut()).zip(x.par_chunks(h)).with_min_len(16).for_each(|((y, r), x)| {
        let ss: f32 = x.iter().map(|v| v * v).sum();
        *r = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * *r * w;
        }
    });
    (y, rstd)
}

/// RMSNorm backward: `dx = rstd · (g − x̂ · mean(g · x̂))`, `g = dy · w`, `x̂ = x · rstd`.
pub fn rms_norm_bwd(x: &[f32], rstd: &[f32], w: &[f32], dy: &[f32]) -> Vec<f32> {
    let h = w.len();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(h).zip(x.par_chunks(h).zip(dy.par_chunks(h))).zip(rstd.par_iter()).with_min_len(16).for_each(|((dx, (x, dy)), &r)| {
        let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| dy * w * x * r).sum();
        let proj = dot / h as f32;
        for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            *dx = (dy * w - x * r * proj) * r;
        }
    });
    dx
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
