//! f32 matrix-vector product `y = W x` for batch-1 decoding. gemm's GEMV path reads a
//! 49152×576 LM head at ~7 GB/s; a row-parallel dot product streams it at memory speed.

use rayon::prelude::*;

/// Rows per parallel task: large enough that scheduling costs nothing next to the reads.
const ROWS_PER_TASK: usize = 64;

/// `y[o] = Σ_i w[o·n + i] · x[i]` for `w` row-major `[y.len(), x.len()]`.
pub fn gemv_f32(w: &[f32], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    assert_eq!(w.len(), y.len() * n, "gemv: weight has {} elements, expected {}×{}", w.len(), y.len(), n);
    y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, ys)| {
        let base = c * ROWS_PER_TASK;
        for (r, yv) in ys.iter_mut().enumerate() {
            let row = &w[(base + r) * n..(base + r + 1) * n];
            *yv = dot(row, x);
        }
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features `dot_avx2` is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

/// 32 independent partial sums so the compiler can keep several vector FMAs in flight.
#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

    #[test]
    fn matches_naive_product() {
        let (rows, n) = (131, 77); // odd sizes exercise remainders and partial tasks
        let w: Vec<f32> = (0..rows * n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        let mut y = vec![0f32; rows];
        gemv_f32(&w, &x, &mut y);
        for r in 0..rows {
            let want: f64 = (0..n).map(|i| w[r * n + i] as f64 * x[i] as f64).sum();
            assert!((y[r] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "row {r}: {} vs {want}", y[r]);
        }
    }
}
