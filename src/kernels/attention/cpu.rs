//! Attention kernels of inference on the CPU: a fused single-query attention over a key/value
//! cache (decoding), and the softmax over a row's causal prefix that the fused training forward
//! also uses. Masked probabilities are exactly 0 (as `exp(-inf)`), and are never computed.

use crate::kernels::vecmath::exp512;
use rayon::prelude::*;


/// `row[..n] = softmax(scale · row[..n])`, `row[n..] = 0`.
pub fn softmax_prefix_inplace(row: &mut [f32], n: usize, scale: f32) {
    let (live, dead) = row.split_at_mut(n.min(row.len()));
    dead.fill(0.0);
    if live.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { softmax_avx512(live, scale) };
        }
    }
    softmax_portable(live, scale)
}

fn softmax_portable(x: &mut [f32], scale: f32) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (scale * (*v - max)).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(x: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    let n = x.len();
    let p = x.as_mut_ptr();
    let full = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as __mmask16;
    let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
        i += 16;
    }
    m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, p.add(i)));
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    let sc = _mm512_set1_ps(scale);
    let mut s = _mm512_setzero_ps();
    i = 0;
    while i < full {
        let e = exp512(_mm512_mul_ps(sc, _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max)));
        _mm512_storeu_ps(p.add(i), e);
        s = _mm512_add_ps(s, e);
        i += 16;
    }
    if tail != 0 {
        let e = exp512(_mm512_mul_ps(sc, _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(i)), max)));
        _mm512_mask_storeu_ps(p.add(i), tail, e);
        s = _mm512_mask_add_ps(s, tail, s, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(s));
    i = 0;
    while i < full {
        _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        i += 16;
    }
    if tail != 0 {
        _mm512_mask_storeu_ps(p.add(i), tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(i)), inv));
    }
}

/// One query position attending to `s` cached positions (decoding). `q` `[n_heads·d]` (rotated),
/// `k`/`v` hold `n_kv_heads` blocks of `head_stride` floats, each starting with `s` rows of `d`
/// (positions 0..s); query head `h` uses key/value head `h / (n_heads / n_kv_heads)`.
/// `out` `[n_heads·d]`. Parallel over heads when the cache is long enough to pay for it.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(q: &[f32], k: &[f32], v: &[f32], head_stride: usize, s: usize, n_heads: usize, n_kv_heads: usize, d: usize, scale: f32, out: &mut [f32]) {
    decode_attention_capped(q, k, v, head_stride, s, n_heads, n_kv_heads, d, scale, None, out)
}

/// [`decode_attention`] with Gemma 2's soft-capped logits `cap·tanh(scale·q·k/cap)` when
/// `softcap` is given.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_capped(q: &[f32], k: &[f32], v: &[f32], head_stride: usize, s: usize, n_heads: usize, n_kv_heads: usize, d: usize, scale: f32, softcap: Option<f32>, out: &mut [f32]) {
    assert!(n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads) && s > 0);
    assert!(q.len() == n_heads * d && out.len() == n_heads * d);
    assert!(s * d <= head_stride && k.len() >= (n_kv_heads - 1) * head_stride + s * d && v.len() >= (n_kv_heads - 1) * head_stride + s * d);
    let rep = n_heads / n_kv_heads;
    let head = |h: usize, o: &mut [f32], scores: &mut Vec<f32>| {
        let kv = h / rep;
        let (kh, vh) = (&k[kv * head_stride..kv * head_stride + s * d], &v[kv * head_stride..kv * head_stride + s * d]);
        let qh = &q[h * d..(h + 1) * d];
        scores.clear();
        scores.extend(kh.chunks_exact(d).map(|kr| dot(qh, kr)));
        match softcap {
            Some(cap) => {
                scores.iter_mut().for_each(|x| *x *= scale);
                crate::kernels::vecmath::softcap_inplace(scores, cap);
                softmax_prefix_inplace(scores, s, 1.0);
            }
            None => softmax_prefix_inplace(scores, s, scale),
        }
        weighted_rows(scores, vh, o);
    };
    if s * n_heads * d >= 64 * 1024 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores, (h, o)| head(h, o, scores));
    } else {
        let mut scores = Vec::with_capacity(s);
        for (h, o) in out.chunks_mut(d).enumerate() {
            head(h, o, &mut scores);
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { dot_avx512(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc);
        i += 16;
    }
    if i < n {
        let m: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `out = Σ_j p[j] · v[j]` for `v` holding `p.len()` rows of `out.len()`.
fn weighted_rows(p: &[f32], v: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { weighted_rows_avx512(p, v, out) };
        }
    }
    let d = out.len();
    out.fill(0.0);
    for (pj, vr) in p.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += pj * x;
        }
    }
}

/// Columns in blocks of 64 (four registers of accumulators), rows streamed through them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_rows_avx512(p: &[f32], v: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = out.len();
    assert!(v.len() >= p.len() * d);
    let mask = |c: usize| -> __mmask16 {
        if c + 16 <= d {
            0xffff
        } else if c < d {
            ((1u32 << (d - c)) - 1) as __mmask16
        } else {
            0
        }
    };
    let mut c0 = 0;
    while c0 < d {
        let m = [mask(c0), mask(c0 + 16), mask(c0 + 32), mask(c0 + 48)];
        let mut acc = [_mm512_setzero_ps(); 4];
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm512_set1_ps(pj);
            let row = v.as_ptr().add(j * d + c0);
            for k in 0..4 {
                acc[k] = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m[k], row.add(16 * k)), acc[k]);
            }
        }
        for k in 0..4 {
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(c0 + 16 * k), m[k], acc[k]);
        }
        c0 += 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_close, pseudo};

    /// Plain reference for one decode step with GQA: per head, scores over all `s` positions.
    #[allow(clippy::too_many_arguments)]
    fn decode_reference(q: &[f32], k: &[f32], v: &[f32], stride: usize, s: usize, nh: usize, kvh: usize, d: usize, scale: f32, cap: Option<f64>) -> Vec<f32> {
        let rep = nh / kvh;
        let mut out = vec![0f32; nh * d];
        for h in 0..nh {
            let g = h / rep;
            let sc: Vec<f64> = (0..s).map(|j| (0..d).map(|e| q[h * d + e] as f64 * k[g * stride + j * d + e] as f64).sum::<f64>() * scale as f64).collect();
            let sc: Vec<f64> = sc.iter().map(|&x| cap.map_or(x, |c| c * (x / c).tanh())).collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
            for e in 0..d {
                out[h * d + e] = (0..s).map(|j| (sc[j] - m).exp() / z * v[g * stride + j * d + e] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn decode_attention_matches_reference_with_gqa() {
        // Small (serial) and long (parallel over heads) caches; head stride > s·d as in a
        // preallocated cache; GQA 9/3 and plain MHA.
        for (nh, kvh, d, s, cap) in [(9, 3, 64, 5, 8), (9, 3, 64, 200, 256), (4, 4, 8, 3, 3), (6, 2, 20, 1, 4)] {
            let stride = cap * d;
            let q = pseudo(nh * d, 1);
            let k = pseudo(kvh * stride, 2);
            let v = pseudo(kvh * stride, 3);
            let scale = 1.0 / (d as f32).sqrt();
            let mut out = vec![0f32; nh * d];
            decode_attention(&q, &k, &v, stride, s, nh, kvh, d, scale, &mut out);
            assert_close(&out, &decode_reference(&q, &k, &v, stride, s, nh, kvh, d, scale, None), 2e-5);
            // Soft-capped (a cap the scores of ±4 inputs reach), and the cap matters.
            let plain = out.clone();
            decode_attention_capped(&q, &k, &v, stride, s, nh, kvh, d, scale, Some(1.5), &mut out);
            assert_close(&out, &decode_reference(&q, &k, &v, stride, s, nh, kvh, d, scale, Some(1.5)), 2e-5);
            assert!(s == 1 || plain.iter().zip(&out).any(|(a, b)| (a - b).abs() > 1e-3), "the cap changed nothing");
        }
    }
}
