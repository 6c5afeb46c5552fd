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

#[allow(clippy::too_many_arguments)]
fn gemm_on(par: Parallelism, m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: M, rhs: M, beta: f32) {
    assert!(dst.len() == m * n && (lhs.rows, lhs.cols) == (m, k) && (rhs.rows, rhs.cols) == (k, n), "gemm: shapes do not match {m}×{k}·{k}×{n}");
    // SAFETY: the views cover exactly their [rows, cols] (built from live slices, checked
    // above against m, n, k); dst is a distinct &mut, so it aliases neither input.
    unsafe {
        gemm::gemm(m, n, k, dst.as_mut_ptr(), 1, n as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, beta, false, false, false, par);
    }
}
