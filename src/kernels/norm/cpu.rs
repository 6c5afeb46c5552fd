//! RMSNorm on the CPU in f32, forward and backward: one pass per row, parallel over rows
//! (replaces a chain of candle ops).

use rayon::prelude::*;

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
