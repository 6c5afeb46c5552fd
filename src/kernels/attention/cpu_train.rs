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

/// Returns `(o [b, nh, t, d], p [b, nh, t, t])`: `p = softmax(L + mask)`, `o = p v`, with the
/// logits `L = scale·q kᵀ`, or soft-capped `L = cap·tanh(scale·q kᵀ/cap)` (Gemma 2). The mask
/// is causal (and may hide more, e.g. a sliding window): key `j > i` is never seen by query
/// `i`, so each row's softmax runs over its prefix `0..=i` and the rest is 0; a row that sees
/// nothing is all 0. A task per KV group, or per block of a group's query rows when there are
/// fewer groups than threads (prefill: batch 1).
pub fn forward(s: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], scale: f32, softcap: Option<f32>) -> (Vec<f32>, Vec<f32>) {
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
            dead.fill(0.0);
            if let Some(cap) = softcap {
                vecmath::softcap_inplace(live, cap);
            }
            for (x, m) in live.iter_mut().zip(&mb[i * t..][..=i]) {
                *x += m;
            }
            let max = vecmath::max(live);
            if max == f32::NEG_INFINITY {
                live.fill(0.0);
                continue;
            }
            let sum = vecmath::exp_shift_sum_inplace(live, max);
            let inv = (1.0 / sum) as f32;
            live.iter_mut().for_each(|x| *x *= inv);
        }
        mm1(n, d, t, ob, false, rm(pb, t), rm(vg, d), 1.0);
    });
    (o, p)
}

/// Returns `(dq, dk, dv)` in the shapes of `q`, `k`, `v`, given the forward's `p` and `d_o`
/// (and its `softcap`: the logits' gradient is chained through `1 − tanh²`, the scores
/// recomputed for it).
#[allow(clippy::too_many_arguments)]
pub fn backward(s: Dims, q: &[f32], k: &[f32], v: &[f32], p: &[f32], d_o: &[f32], scale: f32, softcap: Option<f32>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, d, rep) = (s.t, s.d, s.rep());
    assert!(d_o.len() == q.len() && p.len() == s.b * s.nh * t * t, "attention backward: shapes {s:?}");
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    dq.par_chunks_mut(rep * t * d).zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d))).enumerate().for_each_init(
        || (vec![0f32; rep * t * t], if softcap.is_some() { vec![0f32; rep * t * t] } else { Vec::new() }),
        |(ds, sc), (g, (dqg, (dkg, dvg)))| {
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
            if let Some(cap) = softcap {
                // d(cap·tanh(x/cap))/dx = 1 − tanh², x = scale·q kᵀ.
                mm1(rep * t, t, d, sc, false, rm(qg, d), tr(kg, d), scale);
                for (x, &z) in ds.iter_mut().zip(sc.iter()) {
                    let th = (z / cap).tanh();
                    *x *= 1.0 - th * th;
                }
            }
            // dQ = scale · dS k;  dK = scale · Σ_heads dSᵀ q.
            mm1(rep * t, d, t, dqg, false, rm(ds, t), rm(kg, d), scale);
            mm1(t, d, rep * t, dkg, false, tr(ds, t), rm(qg, d), scale);
        },
    );
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::pseudo;

    /// f64 reference: `o` and `(dq, dk, dv)` of `o = softmax(L + mask) v`, `L` the (capped)
    /// logits, by the textbook formulas; a row that sees nothing gives 0.
    #[allow(clippy::type_complexity)]
    fn reference(s: Dims, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], d_o: &[f32], scale: f64, cap: Option<f64>) -> (Vec<f64>, [Vec<f64>; 3]) {
        let (t, d, rep) = (s.t, s.d, s.rep());
        let mut o = vec![0f64; q.len()];
        let (mut dq, mut dk, mut dv) = (vec![0f64; q.len()], vec![0f64; k.len()], vec![0f64; v.len()]);
        for bi in 0..s.b {
            for h in 0..s.nh {
                let qo = (bi * s.nh + h) * t * d;
                let ko = (bi * s.kvh + h / rep) * t * d;
                for i in 0..t {
                    let raw: Vec<f64> = (0..t).map(|j| scale * (0..d).map(|x| q[qo + i * d + x] as f64 * k[ko + j * d + x] as f64).sum::<f64>()).collect();
                    let lg: Vec<f64> = raw.iter().map(|&z| cap.map_or(z, |c| c * (z / c).tanh())).collect();
                    let m: Vec<f64> = (0..t).map(|j| mask[(bi * t + i) * t + j] as f64).collect();
                    let mx = (0..t).map(|j| lg[j] + m[j]).fold(f64::NEG_INFINITY, f64::max);
                    if mx == f64::NEG_INFINITY {
                        continue;
                    }
                    let e: Vec<f64> = (0..t).map(|j| (lg[j] + m[j] - mx).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
                    let dp: Vec<f64> = (0..t).map(|j| (0..d).map(|x| d_o[qo + i * d + x] as f64 * v[ko + j * d + x] as f64).sum()).collect();
                    let dot: f64 = (0..t).map(|j| p[j] * dp[j]).sum();
                    for j in 0..t {
                        let th = cap.map_or(0.0, |c| (raw[j] / c).tanh());
                        let dl = p[j] * (dp[j] - dot) * (1.0 - th * th) * scale;
                        for x in 0..d {
                            o[qo + i * d + x] += p[j] * v[ko + j * d + x] as f64;
                            dv[ko + j * d + x] += p[j] * d_o[qo + i * d + x] as f64;
                            dq[qo + i * d + x] += dl * k[ko + j * d + x] as f64;
                            dk[ko + j * d + x] += dl * q[qo + i * d + x] as f64;
                        }
                    }
                }
            }
        }
        (o, [dq, dk, dv])
    }

    fn max_err(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / scale
    }

    /// Forward and backward against the f64 formulas: grouped-query, packed examples under a
    /// sliding window (the mask carries it), a row that sees nothing, with and without
    /// soft-capping (a cap small enough that tanh bends the logits).
    #[test]
    fn fused_attention_matches_reference() {
        let s = Dims { b: 2, nh: 4, kvh: 2, t: 37, d: 8 };
        let (t, window) = (s.t, 5);
        let mut mask = vec![f32::NEG_INFINITY; s.b * t * t];
        for bi in 0..s.b {
            for i in 0..t {
                let seg = |x: usize| if bi == 0 && x >= 20 { 2 } else { 1 };
                for j in 0..=i {
                    if i - j < window && seg(i) == seg(j) && !(bi == 1 && i == 3) {
                        mask[(bi * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let (q, k, v) = (pseudo(s.b * s.nh * t * s.d, 1), pseudo(s.b * s.kvh * t * s.d, 2), pseudo(s.b * s.kvh * t * s.d, 3));
        let d_o = pseudo(q.len(), 4);
        let scale = 0.3f32;
        for cap in [None, Some(2.5f32)] {
            let (o, p) = forward(s, &q, &k, &v, &mask, scale, cap);
            let grads = backward(s, &q, &k, &v, &p, &d_o, scale, cap);
            let (wo, wg) = reference(s, &q, &k, &v, &mask, &d_o, scale as f64, cap.map(f64::from));
            assert!(o.iter().all(|x| x.is_finite()) && p.iter().all(|x| x.is_finite()), "cap {cap:?}: non-finite output");
            assert!(max_err(&o, &wo) < 1e-5, "cap {cap:?}: o off by {:e}", max_err(&o, &wo));
            for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip([&grads.0, &grads.1, &grads.2].into_iter().zip(&wg)) {
                assert!(max_err(g, w) < 1e-5, "cap {cap:?}: {name} off by {:e}", max_err(g, w));
            }
            // The row that sees nothing: zero output and probabilities.
            let r = (s.nh + 1) * t + 3;
            assert!(p[r * t..(r + 1) * t].iter().all(|&x| x == 0.0) && o[r * s.d..(r + 1) * s.d].iter().all(|&x| x == 0.0));
        }
        // The cap changes the result (the test would catch an ignored cap).
        let (o1, _) = forward(s, &q, &k, &v, &mask, scale, None);
        let (o2, _) = forward(s, &q, &k, &v, &mask, scale, Some(2.5));
        assert!(o1.iter().zip(&o2).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) > 1e-2);
    }
}
