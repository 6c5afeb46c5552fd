//! The CPU f32 LoRA linear, forward and backward, straight on the `gemm` crate: the LoRA terms
//! are accumulated into the base product in place (`dst += β·lhs·rhs`), the dropout mask is
//! regenerated from its seed in the same pass that applies it, and no `[n, in]` mask, scaled
//! mask or dropped-input tensor is kept between forward and backward.

use crate::kernels::matmul::{mm, mm_new, rm, tr};
use rayon::prelude::*;

/// Inverted dropout's keep test, the same on every device: element `e` (row-major index into
/// `[n, in]`) is kept when its 16 random bits are at least `threshold` (`p · 65536`, rounded).
/// The bits are a keyed 32-bit hash of `e` (two rounds of Wellons' lowbias32, one key half
/// each), so the mask is a pure function of `(seed, e)`: independent of threads and of the
/// recomputation order (gradient checkpointing), and the loop over a row vectorizes.
#[inline(always)]
pub fn dropout_bits(seed: u64, e: usize) -> u32 {
    let h = lowbias32(lowbias32(e as u32 ^ seed as u32) ^ (seed >> 32) as u32);
    h >> 16
}

#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Threshold of [`dropout_bits`] for drop probability `p`.
pub fn dropout_threshold(p: f64) -> u32 {
    (p * 65536.0).round().clamp(0.0, 65536.0) as u32
}

/// The dropout of one forward: its seed, threshold and the kept values' scale `1/(1−p)`.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub seed: u64,
    pub threshold: u32,
    pub scale: f32,
}

impl Dropout {
    /// `out[k] = x[k]·scale` where kept, else 0, for the row starting at element `e0`.
    fn apply_row(&self, e0: usize, x: &[f32], out: &mut [f32]) {
        self.mask_row(e0, x, out, false)
    }

    /// `out[k] += x[k]·scale` where kept.
    fn add_row(&self, e0: usize, x: &[f32], out: &mut [f32]) {
        self.mask_row(e0, x, out, true)
    }

    fn mask_row(&self, e0: usize, x: &[f32], out: &mut [f32], accumulate: bool) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F.
                return unsafe { self.mask_row_avx512(e0, x, out, accumulate) };
            }
        }
        let (seed, thr, scale) = (self.seed, self.threshold, self.scale);
        for (k, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let y = if dropout_bits(seed, e0 + k) >= thr { v * scale } else { 0.0 };
            *o = if accumulate { *o + y } else { y };
        }
    }

    /// Sixteen lanes at a time: the hash in 32-bit vector arithmetic, the keep test as a lane mask.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn mask_row_avx512(&self, e0: usize, x: &[f32], out: &mut [f32], accumulate: bool) {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn lowbias(x: __m512i) -> __m512i {
            let x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
            let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb_352d));
            let x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
            let x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x846c_a68b_u32 as i32));
            _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x))
        }
        let n = x.len().min(out.len());
        let (k1, k2) = (_mm512_set1_epi32(self.seed as u32 as i32), _mm512_set1_epi32((self.seed >> 32) as u32 as i32));
        let thr = _mm512_set1_epi32(self.threshold as i32);
        let scale = _mm512_set1_ps(self.scale);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut i = 0;
        while i < n {
            let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
            let e = _mm512_add_epi32(_mm512_set1_epi32((e0 + i) as u32 as i32), lanes);
            let h = lowbias(_mm512_xor_si512(lowbias(_mm512_xor_si512(e, k1)), k2));
            let keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32::<16>(h), thr) & m;
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            let mut y = _mm512_maskz_mul_ps(keep, v, scale);
            if accumulate {
                y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, out.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, y);
            i += 16;
        }
    }
}

/// Shapes of one LoRA linear: `x [n, inp]`, `W [out, inp]`, `A [r, inp]`, `B [out, r]`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
    pub r: usize,
}

/// `drop(x)` into a new buffer (or `None` without dropout: use `x` itself).
fn dropped(d: Dims, x: &[f32], dropout: Option<&Dropout>) -> Option<Vec<f32>> {
    let dr = dropout?;
    let mut xd = vec![0f32; x.len()];
    xd.par_chunks_mut(d.inp).zip(x.par_chunks(d.inp)).enumerate().for_each(|(i, (o, xr))| dr.apply_row(i * d.inp, xr, o));
    Some(xd)
}

/// Forward: returns `y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ` `[n, out]` and `u = drop(x) Aᵀ` `[n, r]`
/// (what backward needs besides `x` and the dropout seed). `lora` = `(A, B, s)`.
pub fn forward(d: Dims, x: &[f32], w: &[f32], lora: Option<(&[f32], &[f32], f32)>, dropout: Option<&Dropout>) -> (Vec<f32>, Option<Vec<f32>>) {
    assert!(x.len() == d.n * d.inp && w.len() == d.out * d.inp, "lora linear: shapes {d:?}");
    let mut y = mm_new(d.n, d.out, d.inp, rm(x, d.inp), tr(w, d.inp), 1.0);
    let Some((a, b, s)) = lora else { return (y, None) };
    assert!(a.len() == d.r * d.inp && b.len() == d.out * d.r, "lora linear: adapter shapes {d:?}");
    let xd = dropped(d, x, dropout);
    let xd = xd.as_deref().unwrap_or(x);
    let u = mm_new(d.n, d.r, d.inp, rm(xd, d.inp), tr(a, d.inp), 1.0);
    // The scaling rides on the rank-r product, folded into the accumulate.
    mm(d.n, d.out, d.r, &mut y, true, rm(&u, d.r), tr(b, d.r), s);
    (y, Some(u))
}

/// Backward: `dx [n, inp]`, and with an adapter `(dA [r, inp], dB [out, r])`.
/// `lora` = `(A, B, s, u)` with `u` the forward's `drop(x) Aᵀ`.
#[allow(clippy::type_complexity)]
pub fn backward(d: Dims, x: &[f32], w: &[f32], lora: Option<(&[f32], &[f32], f32, &[f32])>, dropout: Option<&Dropout>, dy: &[f32]) -> (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>) {
    assert!(dy.len() == d.n * d.out && w.len() == d.out * d.inp, "lora linear backward: shapes {d:?}");
    let mut dx = mm_new(d.n, d.inp, d.out, rm(dy, d.out), rm(w, d.inp), 1.0);
    let Some((a, b, s, u)) = lora else { return (dx, None) };
    assert!(x.len() == d.n * d.inp && u.len() == d.n * d.r, "lora linear backward: saved shapes {d:?}");
    let db = mm_new(d.out, d.r, d.n, tr(dy, d.out), rm(u, d.r), s);
    let du = mm_new(d.n, d.r, d.out, rm(dy, d.out), rm(b, d.r), s);
    let xd = dropped(d, x, dropout);
    let da = mm_new(d.r, d.inp, d.n, tr(&du, d.r), rm(xd.as_deref().unwrap_or(x), d.inp), 1.0);
    match dropout {
        // dx += du A, straight into the base product.
        None => mm(d.n, d.inp, d.r, &mut dx, true, rm(&du, d.r), rm(a, d.inp), 1.0),
        // dx += (du A) ⊙ mask·scale: the rank-r product, then one masked accumulate.
        Some(dr) => {
            let t = mm_new(d.n, d.inp, d.r, rm(&du, d.r), rm(a, d.inp), 1.0);
            dx.par_chunks_mut(d.inp).zip(t.par_chunks(d.inp)).enumerate().for_each(|(i, (dxr, tr))| dr.add_row(i * d.inp, tr, dxr));
        }
    }
    (dx, Some((da, db)))
}

/// The scaled keep-mask `[n·inp]` (0 or `scale`), for tests and the non-CPU path.
pub fn scaled_mask(n_inp: usize, dropout: &Dropout) -> Vec<f32> {
    let ones = vec![1f32; n_inp];
    let mut m = vec![0f32; n_inp];
    dropout.apply_row(0, &ones, &mut m);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_application_matches_the_elementwise_definition() {
        let dr = Dropout { seed: 42, threshold: dropout_threshold(0.3), scale: 1.0 / 0.7 };
        // Rows of odd length start mid-group: every offset must agree with dropout_bits.
        let x: Vec<f32> = (0..7 * 5).map(|i| i as f32 + 1.0).collect();
        for i in 0..5 {
            let mut o = vec![0f32; 7];
            dr.apply_row(i * 7, &x[i * 7..(i + 1) * 7], &mut o);
            for k in 0..7 {
                let keep = dropout_bits(42, i * 7 + k) >= dr.threshold;
                assert_eq!(o[k], if keep { x[i * 7 + k] * dr.scale } else { 0.0 });
            }
        }
        let m = scaled_mask(100_000, &dr);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / 1e5;
        assert!((dropped - 0.3).abs() < 0.01, "drop rate {dropped}");
    }
}
