//! SwiGLU `silu(g)·u` on the CPU in f32: forward (in place, or into a new buffer) and backward,
//! parallel over chunks, AVX-512 when present.

use crate::kernels::vecmath::exp512;
use rayon::prelude::*;

/// Elements per parallel task of the elementwise kernels.
const TASK_ELEMS: usize = 32 * 1024;

/// `g ← silu(g) · u = g / (1 + e^(−g)) · u`, parallel over chunks.
pub fn silu_mul_inplace(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu·mul: {} gate vs {} up elements", g.len(), u.len());
    if g.len() <= TASK_ELEMS {
        return silu_mul_serial(g, u);
    }
    g.par_chunks_mut(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)).for_each(|(g, u)| silu_mul_serial(g, u));
}

fn silu_mul_serial(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { silu_mul_avx512(g, u) };
        }
    }
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = *gv / (1.0 + (-*gv).exp()) * uv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_mul_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len());
    let (pg, pu) = (g.as_mut_ptr(), u.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let gv = _mm512_maskz_loadu_ps(m, pg.add(i));
        let uv = _mm512_maskz_loadu_ps(m, pu.add(i));
        let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        let y = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv);
        _mm512_mask_storeu_ps(pg.add(i), m, y);
        i += 16;
    }
}

/// SwiGLU forward `silu(g)·u` into a new buffer.
pub fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    silu_mul_inplace(&mut out, u);
    out
}

/// SwiGLU backward: `dg = dh·u·σ(g)(1 + g(1 − σ(g)))`, `du = dh·g·σ(g)`.
pub fn swiglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    const TASK: usize = 16 * 1024;
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(TASK)
        .zip(du.par_chunks_mut(TASK))
        .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)).zip(dh.par_chunks(TASK)))
        .for_each(|((dg, du), ((g, u), dh))| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F.
                    return unsafe { swiglu_bwd_avx512(g, u, dh, dg, du) };
                }
            }
            for i in 0..dg.len() {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                du[i] = dh[i] * g[i] * s;
            }
        });
    (dg, du)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_bwd_avx512(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        let hv = _mm512_maskz_loadu_ps(m, dh.as_ptr().add(i));
        let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        let gs = _mm512_mul_ps(gv, s);
        // dsilu = s·(1 + g·(1 − s)) = s + gs·(1 − s)
        let dsilu = _mm512_fmadd_ps(gs, _mm512_sub_ps(one, s), s);
        _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(hv, uv), dsilu));
        _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), m, _mm512_mul_ps(hv, gs));
        i += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_matches_reference() {
        // Long enough for several parallel tasks, with a vector tail; large |g| for the limits.
        let n = 3 * TASK_ELEMS + 7;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 40.0).chain([-120.0, 95.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 100.0).collect();
        let mut got = g.clone();
        silu_mul_inplace(&mut got, &u);
        for i in 0..g.len() {
            let (gv, uv) = (g[i] as f64, u[i] as f64);
            let want = gv / (1.0 + (-gv).exp()) * uv;
            assert!((got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30) + 1e-30, "{i}: silu({gv})·{uv} = {}, want {want}", got[i]);
        }
    }
}
