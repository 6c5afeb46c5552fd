//! The gated MLP's gates on the CPU in f32, forward (in place, or into a new buffer) and
//! backward, parallel over chunks, AVX-512 when present: SwiGLU `silu(g)·u` and GeGLU
//! `gelu_tanh(g)·u`.

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

// ------------------------------------------------------------------------------------------
// GeGLU with the tanh GELU (Gemma's `gelu_pytorch_tanh`):
// gelu_tanh(x) = 0.5·x·(1 + tanh(z/2)) = x·σ(z) with z = 2·√(2/π)·(x + 0.044715·x³)
// (1 + tanh(y) = 2σ(2y)), so it shares SiLU's stable form; its exact derivative is
// σ(z) + x·σ(z)(1 − σ(z))·z′, z′ = 2·√(2/π)·(1 + 3·0.044715·x²).

/// `2·√(2/π)`: z's factor.
pub const GELU_K: f32 = 1.595_769_1;
/// The cubic term's coefficient of the tanh GELU.
pub const GELU_A: f32 = 0.044_715;

/// `gelu_tanh(x)` (scalar; the reference of the vector paths).
pub fn gelu_tanh(x: f32) -> f32 {
    let z = GELU_K * x * (1.0 + GELU_A * x * x);
    x / (1.0 + (-z).exp())
}

/// `(gelu_tanh(x), gelu_tanh′(x))`.
pub fn gelu_tanh_grad(x: f32) -> (f32, f32) {
    let z = GELU_K * x * (1.0 + GELU_A * x * x);
    let s = 1.0 / (1.0 + (-z).exp());
    let dz = GELU_K * (1.0 + 3.0 * GELU_A * x * x);
    (x * s, s + x * s * (1.0 - s) * dz)
}

/// `g ← gelu_tanh(g) · u`, parallel over chunks.
pub fn gelu_mul_inplace(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gelu·mul: {} gate vs {} up elements", g.len(), u.len());
    if g.len() <= TASK_ELEMS {
        return gelu_mul_serial(g, u);
    }
    g.par_chunks_mut(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)).for_each(|(g, u)| gelu_mul_serial(g, u));
}

fn gelu_mul_serial(g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F.
            return unsafe { gelu_mul_avx512(g, u) };
        }
    }
    for (gv, uv) in g.iter_mut().zip(u) {
        *gv = gelu_tanh(*gv) * uv;
    }
}

/// 16 lanes of `(σ(z), z′)` for the tanh GELU at `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gelu_sigma512(x: std::arch::x86_64::__m512) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let (one, k, a) = (_mm512_set1_ps(1.0), _mm512_set1_ps(GELU_K), _mm512_set1_ps(GELU_A));
    let x2 = _mm512_mul_ps(x, x);
    let z = _mm512_mul_ps(_mm512_mul_ps(k, x), _mm512_fmadd_ps(a, x2, one));
    let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    let dz = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_set1_ps(3.0 * GELU_A), x2, one));
    (s, dz)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_mul_avx512(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len());
    let (pg, pu) = (g.as_mut_ptr(), u.as_ptr());
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let gv = _mm512_maskz_loadu_ps(m, pg.add(i));
        let uv = _mm512_maskz_loadu_ps(m, pu.add(i));
        let (s, _) = gelu_sigma512(gv);
        _mm512_mask_storeu_ps(pg.add(i), m, _mm512_mul_ps(_mm512_mul_ps(gv, s), uv));
        i += 16;
    }
}

/// GeGLU forward `gelu_tanh(g)·u` into a new buffer.
pub fn geglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    gelu_mul_inplace(&mut out, u);
    out
}

/// GeGLU backward: `dg = dh·u·gelu_tanh′(g)`, `du = dh·gelu_tanh(g)`.
pub fn geglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    const TASK: usize = 16 * 1024;
    assert!(u.len() == g.len() && dh.len() == g.len(), "geglu backward: {} / {} / {} elements", g.len(), u.len(), dh.len());
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
                    return unsafe { geglu_bwd_avx512(g, u, dh, dg, du) };
                }
            }
            for i in 0..dg.len() {
                let (y, dy) = gelu_tanh_grad(g[i]);
                dg[i] = dh[i] * u[i] * dy;
                du[i] = dh[i] * y;
            }
        });
    (dg, du)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn geglu_bwd_avx512(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        let hv = _mm512_maskz_loadu_ps(m, dh.as_ptr().add(i));
        let (s, dz) = gelu_sigma512(gv);
        let gs = _mm512_mul_ps(gv, s);
        // gelu′ = s + gs·(1 − s)·z′
        let dgelu = _mm512_fmadd_ps(_mm512_mul_ps(gs, _mm512_sub_ps(one, s)), dz, s);
        _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(hv, uv), dgelu));
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

    /// GeGLU forward and backward (vector paths, several tasks, a tail, large |g|) against the
    /// tanh formula in f64 and its derivative by central differences of that formula.
    #[test]
    fn geglu_matches_tanh_formula() {
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        let n = 3 * TASK_ELEMS + 7;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 150.0).chain([-120.0, 95.0, 0.0, -3.0e-3]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 104729 % 997) as f32 - 498.0) / 100.0).collect();
        let dh: Vec<f32> = (0..g.len()).map(|i| ((i * 31337 % 1009) as f32 - 504.0) / 200.0).collect();
        let h = geglu_fwd(&g, &u);
        let (dg, du) = geglu_bwd(&g, &u, &dh);
        for i in 0..g.len() {
            let (x, uv, hv) = (g[i] as f64, u[i] as f64, dh[i] as f64);
            let close = |got: f32, want: f64, what: &str| {
                assert!((got as f64 - want).abs() <= 2e-6 * want.abs() + 1e-6, "{i} ({what} at g {x}, u {uv}): {got}, want {want}");
            };
            close(h[i], gelu(x) * uv, "h");
            close(du[i], hv * gelu(x), "du");
            let e = 1e-4 * x.abs().max(1.0);
            close(dg[i], hv * uv * (gelu(x + e) - gelu(x - e)) / (2.0 * e), "dg");
        }
        assert!(h[n].abs() < 1e-30, "gelu(-120) = {}", h[n]);
        assert_eq!(h[n + 1], 95.0 * u[n + 1]);
    }
}
