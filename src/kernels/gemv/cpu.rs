//! f32 matrix-vector products `y = W x` for batch-1 decoding, where every weight byte is read
//! once per token and memory bandwidth is the limit. gemm's GEMV path reads a 49152×576 LM head
//! at ~7 GB/s; this kernel streams weights at close to the machine's DRAM speed: contiguous
//! row blocks per task (so the hardware prefetcher sees long streams), four rows per pass
//! sharing each load of `x` (AVX-512, else AVX2, else portable), one horizontal sum per row.

use rayon::prelude::*;

/// Bytes of weights per parallel task: large enough that scheduling costs nothing next to the
/// reads, small enough that two threads stay balanced on a 576×576 matrix.
const TASK_BYTES: usize = 64 * 1024;

fn rows_per_task(n: usize) -> usize {
    (TASK_BYTES / (4 * n.max(1))).max(4) & !3
}

/// `y[o] = Σ_i w[o·n + i] · x[i]` for `w` row-major `[y.len(), x.len()]`.
pub fn gemv_f32(w: &[f32], x: &[f32], y: &mut [f32]) {
    gemv_f32_multi(&mut [(w, y)], x);
}

/// Several products sharing one input (q/k/v, gate/up) in one parallel region:
/// `parts[m].1 = W_m x` for `parts[m].0` row-major `[parts[m].1.len(), x.len()]`.
pub fn gemv_f32_multi(parts: &mut [(&[f32], &mut [f32])], x: &[f32]) {
    let n = x.len();
    for (w, y) in parts.iter() {
        assert_eq!(w.len(), y.len() * n, "gemv: weight has {} elements, expected {}×{}", w.len(), y.len(), n);
    }
    let per = rows_per_task(n);
    let mut tasks: Vec<(&[f32], &mut [f32])> = Vec::new();
    for (w, y) in parts.iter_mut() {
        for (c, ys) in y.chunks_mut(per).enumerate() {
            tasks.push((&w[c * per * n..(c * per + ys.len()) * n], ys));
        }
    }
    if tasks.len() == 1 || rayon::current_num_threads() == 1 {
        for (w, y) in tasks {
            rows(w, x, y);
        }
    } else {
        tasks.into_par_iter().for_each(|(w, y)| rows(w, x, y));
    }
}

/// Read every byte of `w` once, in the same 64 KiB tasks as the GEMV (folded with XOR, so the
/// reads cannot be elided): the time this takes over all of a model's weights is the floor of
/// a batch-1 decode step, which must stream every weight byte from memory.
pub fn stream_read(w: &[u8]) -> u64 {
    w.par_chunks(TASK_BYTES).map(fold_bytes).reduce(|| 0, |a, b| a ^ b)
}

fn fold_bytes(a: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { fold_avx512(a) };
        }
    }
    a.chunks(8).fold(0, |h, c| h ^ c.iter().fold(0u64, |x, &b| x << 8 | b as u64))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fold_avx512(a: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let p = a.as_ptr();
    let (mut s0, mut s1, mut s2, mut s3) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i + 256 <= a.len() {
        s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p.add(i) as *const _));
        s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p.add(i + 64) as *const _));
        s2 = _mm512_xor_si512(s2, _mm512_loadu_si512(p.add(i + 128) as *const _));
        s3 = _mm512_xor_si512(s3, _mm512_loadu_si512(p.add(i + 192) as *const _));
        i += 256;
    }
    let s = _mm512_xor_si512(_mm512_xor_si512(s0, s1), _mm512_xor_si512(s2, s3));
    let mut lanes = [0u64; 8];
    _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, s);
    lanes.iter().fold(0, |h, &l| h ^ l) ^ a[i..].iter().fold(0u64, |h, &b| h.rotate_left(8) ^ b as u64)
}

/// `y = W x` for `W` in bf16 (row-major `[y.len(), x.len()]`), `x` and `y` in f32: each weight
/// is widened exactly to f32 (bf16 is f32's upper half), products and sums in f32. Half the
/// bytes of the f32 GEMV per token.
pub fn gemv_bf16(w: &[half::bf16], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    assert_eq!(w.len(), y.len() * n, "gemv: weight has {} elements, expected {}×{}", w.len(), y.len(), n);
    let per = (TASK_BYTES / (2 * n.max(1))).max(4) & !3;
    y.par_chunks_mut(per).enumerate().for_each(|(c, ys)| rows_bf16(&w[c * per * n..(c * per + ys.len()) * n], x, ys));
}

fn rows_bf16(w: &[half::bf16], x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            // SAFETY: the CPU supports AVX-512F/BW/VL.
            return unsafe { rows_bf16_avx512(w, x, y) };
        }
    }
    let n = x.len();
    for (r, yv) in y.iter_mut().enumerate() {
        *yv = w[r * n..(r + 1) * n].iter().zip(x).map(|(a, b)| a.to_f32() * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rows_bf16_avx512(w: &[half::bf16], x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let m = y.len();
    assert!(w.len() >= m * n);
    // 16 bf16 → 16 f32: zero-extend to 32 bits, shift into the upper half. (A macro, so the
    // intrinsics inline into this function, which has the target features.)
    macro_rules! widen {
        ($p:expr, 0xffff) => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256($p as *const __m256i))))
        };
        ($p:expr, $mask:expr) => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16($mask, $p as *const i16))))
        };
    }
    let full = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as __mmask16;
    let xp = x.as_ptr();
    let mut r = 0;
    while r + 4 <= m {
        let p0 = w.as_ptr().add(r * n);
        let (p1, p2, p3) = (p0.add(n), p0.add(2 * n), p0.add(3 * n));
        let (mut a0, mut a1, mut a2, mut a3) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < full {
            // Pull the next four-row block in at the rate this one is consumed (without it the
            // four interleaved row streams read at ~60% of memory speed). Prefetches past the
            // end of `w` are harmless: they never fault.
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(4 * n + 4 * i) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(4 * n + 4 * i + 32) as *const i8);
            let xv = _mm512_loadu_ps(xp.add(i));
            a0 = _mm512_fmadd_ps(widen!(p0.add(i), 0xffff), xv, a0);
            a1 = _mm512_fmadd_ps(widen!(p1.add(i), 0xffff), xv, a1);
            a2 = _mm512_fmadd_ps(widen!(p2.add(i), 0xffff), xv, a2);
            a3 = _mm512_fmadd_ps(widen!(p3.add(i), 0xffff), xv, a3);
            i += 16;
        }
        if tail != 0 {
            let xv = _mm512_maskz_loadu_ps(tail, xp.add(i));
            a0 = _mm512_fmadd_ps(widen!(p0.add(i), tail), xv, a0);
            a1 = _mm512_fmadd_ps(widen!(p1.add(i), tail), xv, a1);
            a2 = _mm512_fmadd_ps(widen!(p2.add(i), tail), xv, a2);
            a3 = _mm512_fmadd_ps(widen!(p3.add(i), tail), xv, a3);
        }
        *y.get_unchecked_mut(r) = _mm512_reduce_add_ps(a0);
        *y.get_unchecked_mut(r + 1) = _mm512_reduce_add_ps(a1);
        *y.get_unchecked_mut(r + 2) = _mm512_reduce_add_ps(a2);
        *y.get_unchecked_mut(r + 3) = _mm512_reduce_add_ps(a3);
        r += 4;
    }
    while r < m {
        let p = w.as_ptr().add(r * n);
        let mut a0 = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            a0 = _mm512_fmadd_ps(widen!(p.add(i), 0xffff), _mm512_loadu_ps(xp.add(i)), a0);
            i += 16;
        }
        if tail != 0 {
            a0 = _mm512_fmadd_ps(widen!(p.add(i), tail), _mm512_maskz_loadu_ps(tail, xp.add(i)), a0);
        }
        *y.get_unchecked_mut(r) = _mm512_reduce_add_ps(a0);
        r += 1;
    }
}

/// `y = W x` for one contiguous block of rows, on the calling thread.
pub fn rows(w: &[f32], x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(w.len(), y.len() * x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F; slices are bounds-checked by the caller's
            // length relation, which `rows_avx512` relies on.
            return unsafe { rows_avx512(w, x, y) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features `rows_avx2` is compiled for.
            return unsafe { rows_avx2(w, x, y) };
        }
    }
    rows_portable(w, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(w: &[f32], x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let m = y.len();
    assert!(w.len() >= m * n);
    let (full, rem) = (n / 16 * 16, n % 16);
    let tail: __mmask16 = ((1u32 << rem) - 1) as __mmask16;
    let xp = x.as_ptr();
    let mut r = 0;
    while r + 4 <= m {
        let p0 = w.as_ptr().add(r * n);
        let (p1, p2, p3) = (p0.add(n), p0.add(2 * n), p0.add(3 * n));
        let (mut a0, mut a1, mut a2, mut a3) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i < full {
            let xv = _mm512_loadu_ps(xp.add(i));
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p0.add(i)), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p1.add(i)), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p2.add(i)), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p3.add(i)), xv, a3);
            i += 16;
        }
        if rem != 0 {
            let xv = _mm512_maskz_loadu_ps(tail, xp.add(i));
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p0.add(i)), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p1.add(i)), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p2.add(i)), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p3.add(i)), xv, a3);
        }
        *y.get_unchecked_mut(r) = _mm512_reduce_add_ps(a0);
        *y.get_unchecked_mut(r + 1) = _mm512_reduce_add_ps(a1);
        *y.get_unchecked_mut(r + 2) = _mm512_reduce_add_ps(a2);
        *y.get_unchecked_mut(r + 3) = _mm512_reduce_add_ps(a3);
        r += 4;
    }
    while r < m {
        let p0 = w.as_ptr().add(r * n);
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= full {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p0.add(i)), _mm512_loadu_ps(xp.add(i)), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p0.add(i + 16)), _mm512_loadu_ps(xp.add(i + 16)), a1);
            i += 32;
        }
        while i < full {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p0.add(i)), _mm512_loadu_ps(xp.add(i)), a0);
            i += 16;
        }
        if rem != 0 {
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, p0.add(i)), _mm512_maskz_loadu_ps(tail, xp.add(i)), a1);
        }
        *y.get_unchecked_mut(r) = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        r += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(w: &[f32], x: &[f32], y: &mut [f32]) {
    rows_portable(w, x, y)
}

#[inline(always)]
fn rows_portable(w: &[f32], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    for (r, yv) in y.iter_mut().enumerate() {
        *yv = dot(&w[r * n..(r + 1) * n], x);
    }
}

/// 32 independent partial sums so the compiler can keep several vector FMAs in flight.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rows_n: usize, n: usize, got: &[f32], w: &[f32], x: &[f32]) {
        for r in 0..rows_n {
            let want: f64 = (0..n).map(|i| w[r * n + i] as f64 * x[i] as f64).sum();
            assert!((got[r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "row {r}: {} vs {want}", got[r]);
        }
    }

    fn data(rows: usize, n: usize, seed: usize) -> (Vec<f32>, Vec<f32>) {
        let w: Vec<f32> = (0..rows * n).map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        (w, x)
    }

    #[test]
    fn matches_naive_product() {
        // Odd sizes exercise column tails, the 1-row remainder and partial tasks; 2000 rows of
        // 77 span several tasks.
        for (rows_n, n) in [(131, 77), (2000, 77), (7, 16), (5, 1), (64, 576), (9, 1536)] {
            let (w, x) = data(rows_n, n, 0);
            let mut y = vec![0f32; rows_n];
            gemv_f32(&w, &x, &mut y);
            check(rows_n, n, &y, &w, &x);
            let mut y2 = vec![0f32; rows_n];
            rows_portable(&w, &x, &mut y2);
            check(rows_n, n, &y2, &w, &x);
        }
    }

    #[test]
    fn bf16_matches_naive_product() {
        for (rows_n, n) in [(131, 77), (9, 576), (5, 1), (64, 16)] {
            let (w, x) = data(rows_n, n, 4);
            let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let mut y = vec![0f32; rows_n];
            gemv_bf16(&wb, &x, &mut y);
            check(rows_n, n, &y, &wr, &x);
        }
    }

    #[test]
    fn stream_read_sees_every_byte() {
        let mut b: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let h = stream_read(&b);
        for i in [0, 255, 256, 65_535, 65_536, 299_999] {
            b[i] ^= 0x40;
            assert_ne!(stream_read(&b), h, "flipping byte {i} went unseen");
            b[i] ^= 0x40;
        }
    }

    #[test]
    fn multi_matches_separate_products() {
        let n = 93;
        let (w1, x) = data(130, n, 1);
        let (w2, _) = data(7, n, 2);
        let (w3, _) = data(601, n, 3);
        let (mut y1, mut y2, mut y3) = (vec![0f32; 130], vec![0f32; 7], vec![0f32; 601]);
        gemv_f32_multi(&mut [(&w1, &mut y1), (&w2, &mut y2), (&w3, &mut y3)], &x);
        check(130, n, &y1, &w1, &x);
        check(7, n, &y2, &w2, &x);
        check(601, n, &y3, &w3, &x);
    }
}
