// AdamW over all adapters at once (their f32 master weights and moments as flat vectors): one
// pass instead of a dozen candle ops. The same f32 operations in the same order as the host's
// step (optim.rs, step_host), each rounded on its own (no fused multiply-adds), so both give
// the same bits.
extern "C" __global__ void adamw_f32(const float* w, const float* m, const float* v, const float* g, float* w2, float* m2, float* v2, long long n,
                                     float decay, float one_minus_b1, float b2, float one_minus_b2, float eps, float bc2_sqrt, float step_size) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float wi = __fmul_rn(w[i], decay);
        const float mi = __fadd_rn(m[i], __fmul_rn(__fsub_rn(gi, m[i]), one_minus_b1));
        const float vi = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        w2[i] = __fsub_rn(wi, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        m2[i] = mi;
        v2[i] = vi;
    }
}
