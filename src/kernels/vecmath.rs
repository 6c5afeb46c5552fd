//! Vectorized elementwise math shared by the CPU kernels: `exp` for AVX-512 lanes, row max,
//! `exp(x − shift)` with its sum, logit soft-capping.

/// `exp(x)` for 16 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6
/// polynomial, scale by 2ⁿ with `vscalefps`, which also underflows to 0 gracefully); within
/// 2 ulp of the true value for x in [-87, 88.7]; inputs are clamped to [-104, 88.72].
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.72)), _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(p, n)
}

/// `x ← cap·tanh(x/cap)`: logit soft-capping (Gemma 2's attention and final logits).
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x {
        *v = cap * (*v * inv).tanh();
    }
}

/// Largest element (−∞ for an empty row).
pub fn max(row: &[f32]) -> f32 {
    // Sixteen independent lanes, so the loop vectorizes.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    lanes.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `row[i] ← exp(row[i] − shift)`; returns Σ of the new values.
pub fn exp_shift_sum_inplace(row: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { exp_shift_sum_avx512(row, shift) };
        }
    }
    row.iter_mut().map(|v| {
        *v = (*v - shift).exp();
        *v as f64
    }).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shift_sum_avx512(row: &mut [f32], shift: f32) -> f64 {
    use std::arch::x86_64::*;
    let (n, p) = (row.len(), row.as_mut_ptr());
    let sh = _mm512_set1_ps(shift);
    // Per-lane f32 partial sums over blocks of 1024 elements, folded into f64 per block.
    let mut total = 0f64;
    let mut i = 0;
    while i < n {
        let end = (i + 1024).min(n);
        let mut acc = _mm512_setzero_ps();
        while i < end {
            let m: __mmask16 = if end - i >= 16 { 0xffff } else { ((1u32 << (end - i)) - 1) as __mmask16 };
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), sh));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
            i += 16;
        }
        total += _mm512_reduce_add_ps(acc) as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            use std::arch::x86_64::*;
            let xs: Vec<f32> = (0..8000).map(|i| -100.0 + i as f32 * 0.0125).chain([0.0, -1e-8, -87.0, -103.9, -150.0, f32::NEG_INFINITY, 1.0, 88.0]).collect();
            for c in xs.chunks(16) {
                let mut buf = [0f32; 16];
                buf[..c.len()].copy_from_slice(c);
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F is present.
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp512(_mm512_loadu_ps(buf.as_ptr()))) };
                for (&x, &g) in c.iter().zip(&got) {
                    let want = (x as f64).exp();
                    assert!((g as f64 - want).abs() <= 2.5e-7 * want + 1e-38, "exp({x}) = {g}, want {want}");
                }
            }
        }
    }
}
