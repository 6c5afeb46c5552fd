//! Grouped-query attention on the CPU (training, and inference's prefill), forward and
//! backward: in backward one parallel task per (batch row, key/value head) owns that group's
//! `dK`/`dV` (summed over the group's query heads), in forward a task per block of a group's
//! query rows, with single-threaded `gemm` products inside. Replaces a dozen candle ops, most of
//! them single-threaded passes, per layer.

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

/// Query rows (of one KV group's `rep·t`) per forward task at least: over gemm's small-matrix
/// limit (64), so a block's products equal the whole group's bit for bit (gemm's blocking of
/// the summed axis depends on its length only).
const ROWS: usize = 128;

/// Returns `(o [b, nh, t, d], p [b, nh, t, t])`: `p = softmax(scale·q kᵀ + mask)`, `o = p v`.
/// The mask is causal (and may hide more): key `j > i` is never seen by query `i`, so each
/// row's softmax runs over its prefix `0..=i` and the rest is 0. A task per KV group, or per
/// block of a group's query rows when there are fewer groups than threads (prefill: batch 1).
pub fn forward(s: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let (t, d, rep) = (s.t, s.d, s.rep());
    assert!(q.len() == s.b * s.nh * t * d && k.len() == s.b * s.kvh * t * d && v.len() == k.len() && mask.len() == s.b * t * t, "attention: shapes {s:?}");
    let mut o = vec![0f32; q.len()];
    let mut p = vec![0f32; s.b * s.nh * t * t];
    // A group (batch row, kv head) has its `rep` query heads' rows contiguous in q, o and p.
    let rows = rep * t;
    let groups = s.b * s.kvh;
    let blocks = (2 * rayon::current_num_threads()).div_ceil(groups).min(rows / ROWS).max(1);
    let mut tasks = Vec::with_capacity(groups * blocks);
    let (mut o_rest, mut p_rest) = (&mut o[..], &mut p[..]);
    for g in 0..groups {
        for j in 0..blocks {
            let r0 = j * (rows / blocks);
            let n = if j + 1 == blocks { rows - r0 } else { rows / blocks };
            let (ob, orest) = std::mem::take(&mut o_rest).split_at_mut(n * d);
            let (pb, prest) = std::mem::take(&mut p_rest).split_at_mut(n * t);
            (o_rest, p_rest) = (orest, prest);
            tasks.push((g, r0, ob, pb));
        }
    }
    tasks.into_par_iter().for_each(|(g, r0, ob, pb)| {
        let (bi, kv) = (g / s.kvh, g % s.kvh);
        let kg = &k[(bi * s.kvh + kv) * t * d..][..t * d];
        let vg = &v[(bi * s.kvh + kv) * t * d..][..t * d];
        let n = ob.len() / d;
        let qb = &q[(g * rows + r0) * d..][..n * d];
        let mb = &mask[bi * t * t..][..t * t];
        // Scores of the block's rows: [n, d] · kᵀ.
        mm1(n, t, d, pb, false, rm(qb, d), tr(kg, d), scale);
        for (r, row) in pb.chunks_exact_mut(t).enumerate() {
            let i = (r0 + r) % t;
            let (live, dead) = row.split_at_mut(i + 1);
            for (x, m) in live.iter_mut().zip(&mb[i * t..][..=i]) {
                *x += m;
            }
            let max = vecmath::max(live);
            let sum = vecmath::exp_shift_sum_inplace(live, max);
            let inv = (1.0 / sum) as f32;
            live.iter_mut().for_each(|x| *x *= inv);
            dead.fill(0.0);
        }
        mm1(n, d, t, ob, false, rm(pb, t), rm(vg, d), 1.0);
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
