//! Grouped-query attention for the training engine on the CPU, forward and backward: one
//! parallel task per (batch row, key/value head) owns that group's scores, probabilities and
//! its `dK`/`dV` (summed over the group's query heads), with single-threaded `gemm` products
//! inside. Replaces a dozen candle ops, most of them single-threaded passes, per layer.

use crate::kernels::matmul::{mm1, rm, tr};
use crate::kernels::vecmath;
use rayon::prelude::*;

/// Shapes: `q` `[b, nh, t, d]`, `k`/`v` `[b, kvh, t, d]`, scores and probabilities
/// `[b, nh, t, t]`, additive mask `[b, t, t]` (0 or −∞).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub nh: usize,
    pub kvh: usize,
    pub t: usize,
    pub d: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.nh / self.kvh
    }
}

/// Returns `(o [b, nh, t, d], p [b, nh, t, t])`: `p = softmax(scale·q kᵀ + mask)`, `o = p v`.
pub fn forward(s: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let (t, d, rep) = (s.t, s.d, s.rep());
    assert!(q.len() == s.b * s.nh * t * d && k.len() == s.b * s.kvh * t * d && v.len() == k.len() && mask.len() == s.b * t * t, "attention: shapes {s:?}");
    let mut o = vec![0f32; q.len()];
    let mut p = vec![0f32; s.b * s.nh * t * t];
    // One task per (batch row, kv head): its `rep` query heads are contiguous in q, o and p.
    o.par_chunks_mut(rep * t * d).zip(p.par_chunks_mut(rep * t * t)).enumerate().for_each(|(g, (og, pg))| {
        let (bi, kv) = (g / s.kvh, g % s.kvh);
        let kg = &k[(bi * s.kvh + kv) * t * d..][..t * d];
        let vg = &v[(bi * s.kvh + kv) * t * d..][..t * d];
        let qg = &q[g * rep * t * d..][..rep * t * d];
        let mb = &mask[bi * t * t..][..t * t];
        // Scores of all rep heads at once: [rep·t, d] · kᵀ.
        mm1(rep * t, t, d, pg, false, rm(qg, d), tr(kg, d), scale);
        for (i, row) in pg.chunks_exact_mut(t).enumerate() {
            let mrow = &mb[(i % t) * t..][..t];
            for (x, m) in row.iter_mut().zip(mrow) {
                *x += m;
            }
            let max = vecmath::max(row);
            let sum = vecmath::exp_shift_sum_inplace(row, max);
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        mm1(rep * t, d, t, og, false, rm(pg, t), rm(vg, d), 1.0);
    });
    (o, p)
}

/// Returns `(dq, dk, dv)` in the shapes of `q`, `k`, `v`, given the forward's `p` and `d_o`.
pub fn backward(s: Dims, q: &[f32], k: &[f32], v: &[f32], p: &[f32], d_o: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, rep) = (s.t, s.d, s.rep());
    assert!(d_o.len() == q.len() && p.len() == s.b * s.nh * t * t, "attention backward: shapes {s:?}");
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    dq.par_chunks_mut(rep * t * d).zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d))).enumerate().for_each_init(
        || vec![0f32; rep * t * t],
        |ds, (g, (dqg, (dkg, dvg)))| {
            let (bi, kv) = (g / s.kvh, g % s.kvh);
            let kg = &k[(bi * s.kvh + kv) * t * d..][..t * d];
            let vg = &v[(bi * s.kvh + kv) * t * d..][..t * d];
            let qg = &q[g * rep * t * d..][..rep * t * d];
            let pg = &p[g * rep * t * t..][..rep * t * t];
            let dog = &d_o[g * rep * t * d..][..rep * t * d];
            // dV = Σ_heads pᵀ dO  ([t, rep·t] · [rep·t, d]).
            mm1(t, d, rep * t, dvg, false, tr(pg, t), rm(dog, d), 1.0);
            // dP = dO vᵀ, then dS = P ⊙ (dP − Σ_j dP·P) row by row.
            mm1(rep * t, t, d, ds, false, rm(dog, d), tr(vg, d), 1.0);
            for (dsr, pr) in ds.chunks_exact_mut(t).zip(pg.chunks_exact(t)) {
                let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                for (x, &pv) in dsr.iter_mut().zip(pr) {
                    *x = pv * (*x - dot);
                }
            }
            // dQ = scale · dS k;  dK = scale · Σ_heads dSᵀ q.
            mm1(rep * t, d, t, dqg, false, rm(ds, t), rm(kg, d), scale);
            mm1(t, d, rep * t, dkg, false, tr(ds, t), rm(qg, d), scale);
        },
    );
    (dq, dk, dv)
}
