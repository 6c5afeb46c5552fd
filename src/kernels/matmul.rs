//! Row-major f32 matrix products straight on the `gemm` crate (what candle's CPU matmul calls),
//! for kernels that want `dst += β·lhs·rhs` in place and transposed views without copies.

use gemm::Parallelism;
use std::marker::PhantomData;

/// A `[rows, cols]` matrix view of a slice for `gemm`: pointer, column and row strides.
#[derive(Clone, Copy)]
pub struct M<'a> {
    ptr: *const f32,
    cs: isize,
    rs: isize,
    rows: usize,
    cols: usize,
    _s: PhantomData<&'a [f32]>,
}

/// `s` as a row-major `[len/cols, cols]` matrix.
pub fn rm(s: &[f32], cols: usize) -> M<'_> {
    M { ptr: s.as_ptr(), cs: 1, rs: cols as isize, rows: s.len() / cols.max(1), cols, _s: PhantomData }
}

/// The transpose of `s` as a row-major `[len/cols, cols]` matrix: `[cols, len/cols]`.
pub fn tr(s: &[f32], cols: usize) -> M<'_> {
    M { ptr: s.as_ptr(), cs: cols as isize, rs: 1, rows: cols, cols: s.len() / cols.max(1), _s: PhantomData }
}

fn par() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 { Parallelism::Rayon(n) } else { Parallelism::None }
}

/// `dst [m, n] = (accumulate ? dst : 0) + β · lhs [m, k] · rhs [k, n]`, `dst` row-major,
/// on all of rayon's threads.
#[allow(clippy::too_many_arguments)]
pub fn mm(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: M, rhs: M, beta: f32) {
    gemm_on(par(), m, n, k, dst, accumulate, lhs, rhs, beta)
}

/// [`mm`] on the calling thread alone (inside a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn mm1(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: M, rhs: M, beta: f32) {
    gemm_on(Parallelism::None, m, n, k, dst, accumulate, lhs, rhs, beta)
}

/// `β · lhs [m, k] · rhs [k, n]` as a new row-major buffer, on all of rayon's threads, never
/// zero-filled first (gemm writes every element when it does not read the destination).
pub fn mm_new(m: usize, n: usize, k: usize, lhs: M, rhs: M, beta: f32) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    let mut v = super::uninit_vec(m * n);
    // MaybeUninit<f32> has f32's layout; gemm only writes the destination here.
    gemm_raw(par(), m, n, k, v.as_mut_ptr() as *mut f32, v.len(), false, lhs, rhs, beta);
    // SAFETY: with k > 0 and read_dst false, gemm stored all m·n elements.
    unsafe { super::assume_init(v) }
}

#[allow(clippy::too_many_arguments)]
fn gemm_on(par: Parallelism, m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: M, rhs: M, beta: f32) {
    gemm_raw(par, m, n, k, dst.as_mut_ptr(), dst.len(), accumulate, lhs, rhs, beta)
}

/// `dst` points at `dst_len` writable floats (read too when `accumulate`).
#[allow(clippy::too_many_arguments)]
fn gemm_raw(par: Parallelism, m: usize, n: usize, k: usize, dst: *mut f32, dst_len: usize, accumulate: bool, lhs: M, rhs: M, beta: f32) {
    assert!(dst_len == m * n && (lhs.rows, lhs.cols) == (m, k) && (rhs.rows, rhs.cols) == (k, n), "gemm: shapes do not match {m}×{k}·{k}×{n}");
    // SAFETY: the views cover exactly their [rows, cols] (built from live slices, checked
    // above against m, n, k); dst covers m·n floats and comes from a distinct buffer.
    unsafe {
        gemm::gemm(m, n, k, dst, 1, n as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, beta, false, false, false, par);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_the_naive_loops() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive = |i: usize, j: usize| (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
        let c = mm_new(m, n, k, rm(&a, k), rm(&b, n), 2.0);
        // Transposed views: (bᵀ aᵀ)ᵀ = a b, computed as cᵀ [n, m].
        let mut ct = vec![1f32; n * m];
        mm1(n, m, k, &mut ct, true, tr(&b, n), tr(&a, k), 1.0);
        for i in 0..m {
            for j in 0..n {
                assert_eq!(c[i * n + j], 2.0 * naive(i, j));
                assert_eq!(ct[j * m + i], 1.0 + naive(i, j), "accumulate into the destination");
            }
        }
    }
}
