//! The AdamW update on the host, element by element in f32 (each operation rounded on its own:
//! the CUDA kernel repeats them in this order, so both give the same bits).

use super::Coeffs;

/// One step over a parameter's master weights `w` and moments `m`, `v` with gradients `g`.
pub fn update(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: &Coeffs) {
    for i in 0..g.len() {
        let w = &mut w[i];
        *w *= c.decay;
        let m = &mut m[i];
        *m += (g[i] - *m) * c.one_minus_b1; // torch: exp_avg.lerp_(grad, 1 - beta1)
        let v = &mut v[i];
        *v = *v * c.b2 + c.one_minus_b2 * g[i] * g[i];
        let denom = v.sqrt() / c.bc2_sqrt + c.eps;
        *w -= c.step_size * *m / denom;
    }
}
