// Attention softmax, forward and backward, one block per score row (f32 arithmetic whatever the
// storage type); and the soft-cap's backward factor, elementwise. Rows are [b, nh, t] over keys t; row r is batch r / (nh·t), query r mod t.
// The additive mask [b, t, t] (0 or -inf: causal, per packed example) is the one the CPU uses.
// Replaces the candle chain scale → +mask → f32 → softmax → bf16 (five passes over the largest
// tensor of the step) and, backward, dP·P → row sum → subtract → ·P (four).

#include <cuda_bf16.h>

#include "../elem.cuh"
#include "../reduce.cuh"

// The logit of a score: scale·x, soft-capped to cap·tanh(scale·x/cap) unless cap is 0 (Gemma 2).
__device__ __forceinline__ float logit(float x, float scale, float cap) { return cap == 0.0f ? x * scale : cap * tanhf(x * scale / cap); }

// Rows of t keys, tq query rows per head (a query tile: the mask is [b, tq, t] for it).
template <typename T>
__device__ void softmax_fwd(const T* s, const float* mask, T* p, float scale, int t, long long rows_per_b, int tq, float cap) {
    long long row = blockIdx.x;
    long long b = row / rows_per_b;
    int i = (int)(row % tq);
    const T* sr = s + row * t;
    const float* mr = mask + (b * tq + i) * (long long)t;
    T* pr = p + row * t;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < t; j += blockDim.x) mx = fmaxf(mx, logit(ldf(sr, j), scale, cap) + mr[j]);
    mx = block_reduce<true>(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(logit(ldf(sr, j), scale, cap) + mr[j] - mx);
    float inv = 1.0f / block_reduce<false>(sum);
    for (int j = threadIdx.x; j < t; j += blockDim.x) stf(pr, j, expf(logit(ldf(sr, j), scale, cap) + mr[j] - mx) * inv);
}

// dS = P ⊙ (dP − Σ_j dP·P), row by row.
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, int t) {
    long long row = blockIdx.x;
    const T* pr = p + row * t;
    const T* dr = dp + row * t;
    T* sr = ds + row * t;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) dot += ldf(pr, j) * ldf(dr, j);
    dot = block_reduce<false>(dot);
    for (int j = threadIdx.x; j < t; j += blockDim.x) stf(sr, j, ldf(pr, j) * (ldf(dr, j) - dot));
}

// The soft-cap's part of the scores' gradient, elementwise: ds·(1 − tanh²(scale·s/cap)).
template <typename T>
__device__ void softcap_bwd(const T* ds, const T* s, T* out, float scale, float cap, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float th = tanhf(ldf(s, i) * scale / cap);
        stf(out, i, ldf(ds, i) * (1.0f - th * th));
    }
}

extern "C" __global__ void attn_softcap_bwd_f32(const float* ds, const float* s, float* out, float scale, float cap, long long n) { softcap_bwd(ds, s, out, scale, cap, n); }
extern "C" __global__ void attn_softcap_bwd_bf16(const __nv_bfloat16* ds, const __nv_bfloat16* s, __nv_bfloat16* out, float scale, float cap, long long n) {
    softcap_bwd(ds, s, out, scale, cap, n);
}

extern "C" __global__ void attn_softmax_fwd_f32(const float* s, const float* mask, float* p, float scale, int t, long long rows_per_b, int tq, float cap) {
    softmax_fwd(s, mask, p, scale, t, rows_per_b, tq, cap);
}
extern "C" __global__ void attn_softmax_fwd_bf16(const __nv_bfloat16* s, const float* mask, __nv_bfloat16* p, float scale, int t, long long rows_per_b,
                                                  int tq, float cap) {
    softmax_fwd(s, mask, p, scale, t, rows_per_b, tq, cap);
}
extern "C" __global__ void attn_softmax_bwd_f32(const float* p, const float* dp, float* ds, int t) { softmax_bwd(p, dp, ds, t); }
extern "C" __global__ void attn_softmax_bwd_bf16(const __nv_bfloat16* p, const __nv_bfloat16* dp, __nv_bfloat16* ds, int t) {
    softmax_bwd(p, dp, ds, t);
}
