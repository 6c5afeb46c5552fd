//! The gated MLP's gates on the CPU in f32, forward (in place, or into a new buffer) and
//! backward, parallel over chunks, AVX-512 when present: SwiGLU `silu(g)·u` and GeGLU
//! `gelu_tanh(g)·u`.

use crate::kernels::vecmath::exp512;
use rayon::prelude::*;

/// Elements per parallel task of the elementwise kernels.
const TASK_ELEMS: usize = 32 * 1024;

/// One gate's kernels: the scalar `(act(x), act′(x))` (the reference, and the path without
/// AVX-512) and the AVX-512 forward `g ← act(g)·u` and backward loops.
struct Gate {
    act: fn(f32) -> (f32, f32),
    #[cfg(target_arch = "x86_64")]
    fwd512: unsafe fn(&mut [f32], &[f32]),
    #[cfg(target_arch = "x86_64")]
    bwd512: unsafe fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32]),
}

const SILU: Gate = Gate {
    act: silu_grad,
    #[cfg(target_arch = "x86_64")]
    fwd512: mul512::<false>,
    #[cfg(target_arch = "x86_64")]
    bwd512: bwd512::<false>,
};

const GELU_TANH: Gate = Gate {
    act: gelu_tanh_grad,
    #[cfg(target_arch = "x86_64")]
    fwd512: mul512::<true>,
    #[cfg(target_arch = "x86_64")]
    bwd512: bwd512::<true>,
};

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Gate {
    /// `g ← act(g) · u`, parallel over chunks.
    fn mul_inplace(&self, g: &mut [f32], u: &[f32]) {
        assert_eq!(g.len(), u.len(), "gated activation: {} gate vs {} up elements", g.len(), u.len());
        let serial = |g: &mut [f32], u: &[f32]| {
            #[cfg(target_arch = "x86_64")]
            if has_avx512() {
                // SAFETY: the CPU supports AVX-512F.
                return unsafe { (self.fwd512)(g, u) };
            }
            for (gv, uv) in g.iter_mut().zip(u) {
                *gv = (self.act)(*gv).0 * uv;
            }
        };
        if g.len() <= TASK_ELEMS {
            return serial(g, u);
        }
        g.par_chunks_mut(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)).for_each(|(g, u)| serial(g, u));
    }

    /// Backward: `dg = dh·u·act′(g)`, `du = dh·act(g)`.
    fn backward(&self, g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
        const TASK: usize = 16 * 1024;
        assert!(u.len() == g.len() && dh.len() == g.len(), "gated activation backward: {} / {} / {} elements", g.len(), u.len(), dh.len());
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(TASK)
            .zip(du.par_chunks_mut(TASK))
            .zip(g.par_chunks(TASK).zip(u.par_chunks(TASK)).zip(dh.par_chunks(TASK)))
            .for_each(|((dg, du), ((g, u), dh))| {
                #[cfg(target_arch = "x86_64")]
                if has_avx512() {
                    // SAFETY: the CPU supports AVX-512F.
                    return unsafe { (self.bwd512)(g, u, dh, dg, du) };
                }
                for i in 0..dg.len() {
                    let (y, dy) = (self.act)(g[i]);
                    dg[i] = dh[i] * u[i] * dy;
                    du[i] = dh[i] * y;
                }
            });
        (dg, du)
    }
}

/// `g ← silu(g) · u = g / (1 + e^(−g)) · u`, parallel over chunks.
pub fn silu_mul_inplace(g: &mut [f32], u: &[f32]) {
    SILU.mul_inplace(g, u)
}

/// `(silu(x), silu′(x))`, `silu′ = σ(x)·(1 + x·(1 − σ(x)))`.
pub fn silu_grad(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-x).exp());
    (x / (1.0 + (-x).exp()), s * (1.0 + x * (1.0 - s)))
}

/// SwiGLU forward `silu(g)·u` into a new buffer.
pub fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    silu_mul_inplace(&mut out, u);
    out
}

/// SwiGLU backward: `dg = dh·u·σ(g)(1 + g(1 − σ(g)))`, `du = dh·g·σ(g)`.
pub fn swiglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    SILU.backward(g, u, dh)
}

// ------------------------------------------------------------------------------------------
// GeGLU with the tanh GELU (Gemma's `gelu_pytorch_tanh`):
// gelu_tanh(x) = 0.5·x·(1 + tanh(z/2)) = x·σ(z) with z = 2·√(2/π)·(x + 0.044715·x³)
// (1 + tanh(y) = 2σ(2y)), so it shares SiLU's stable form; its exact derivative is
// σ(z) + x·σ(z)(1 − σ(z))·z′, z′ = 2·√(2/π)·(1 + 3·0.044715·x²).

/// `2·√(2/π)`: z's factor.
pub const GELU_K: f32 = 1.595_769;
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
    GELU_TANH.mul_inplace(g, u)
}

/// GeGLU forward `gelu_tanh(g)·u` into a new buffer.
pub fn geglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut out = g.to_vec();
    gelu_mul_inplace(&mut out, u);
    out
}

/// GeGLU backward: `dg = dh·u·gelu_tanh′(g)`, `du = dh·gelu_tanh(g)`.
pub fn geglu_bwd(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    GELU_TANH.backward(g, u, dh)
}

// ------------------------------------------------------------------------------------------
// AVX-512: both gates are `x·σ(z)` — SiLU with `z = x`, the tanh GELU with
// `z = K·x·(1 + A·x²)` — so one loop serves both; `GELU` picks z (and, for SiLU, the exact
// operation order its kernels always had).

/// 16 lanes of `(σ(z), z′)` at `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sigma512<const GELU: bool>(x: std::arch::x86_64::__m512) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    if !GELU {
        return (_mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)))), one);
    }
    let (k, a) = (_mm512_set1_ps(GELU_K), _mm512_set1_ps(GELU_A));
    let x2 = _mm512_mul_ps(x, x);
    let z = _mm512_mul_ps(_mm512_mul_ps(k, x), _mm512_fmadd_ps(a, x2, one));
    let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    let dz = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_set1_ps(3.0 * GELU_A), x2, one));
    (s, dz)
}

/// The lanes of `i..` (a partial mask at the tail).
#[cfg(target_arch = "x86_64")]
#[inline]
fn lanes(n: usize, i: usize) -> std::arch::x86_64::__mmask16 {
    if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as std::arch::x86_64::__mmask16 }
}

/// `g ← x·σ(z)·u` with `x = g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn mul512<const GELU: bool>(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len());
    let (pg, pu) = (g.as_mut_ptr(), u.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m = lanes(n, i);
        let gv = _mm512_maskz_loadu_ps(m, pg.add(i));
        let uv = _mm512_maskz_loadu_ps(m, pu.add(i));
        let y = if GELU {
            _mm512_mul_ps(gv, sigma512::<true>(gv).0)
        } else {
            _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))))
        };
        _mm512_mask_storeu_ps(pg.add(i), m, _mm512_mul_ps(y, uv));
        i += 16;
    }
}

/// `dg = dh·u·act′(g)`, `du = dh·act(g)` with `act′ = s + x·s·(1 − s)·z′`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bwd512<const GELU: bool>(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = g.len();
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let m = lanes(n, i);
        let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(m, u.as_ptr().add(i));
        let hv = _mm512_maskz_loadu_ps(m, dh.as_ptr().add(i));
        let (s, dz) = sigma512::<GELU>(gv);
        let gs = _mm512_mul_ps(gv, s);
        let dact = if GELU { _mm512_fmadd_ps(_mm512_mul_ps(gs, _mm512_sub_ps(one, s)), dz, s) } else { _mm512_fmadd_ps(gs, _mm512_sub_ps(one, s), s) };
        _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(hv, uv), dact));
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
