// Training-engine kernels on CUDA. Each has a CPU twin that tests compare it with.

#include <cuda_bf16.h>

#include "dropout.cuh"
#include "reduce.cuh"

extern "C" __global__ void dropout_mask_f32(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, float* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = keep(i, k1, k2, thr, scale);
}

extern "C" __global__ void dropout_mask_bf16(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, __nv_bfloat16* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(keep(i, k1, k2, thr, scale));
}

// ---------------------------------------------------------------------------------------------
// Attention softmax, forward and backward, one block per score row (f32 arithmetic whatever the
// storage type). Rows are [b, nh, t] over keys t; row r is batch r / (nh·t), query r mod t.
// The additive mask [b, t, t] (0 or -inf: causal, per packed example) is the one the CPU uses.
// Replaces the candle chain scale → +mask → f32 → softmax → bf16 (five passes over the largest
// tensor of the step) and, backward, dP·P → row sum → subtract → ·P (four).

__device__ __forceinline__ float ldf(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stf(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

// Rows of t keys, tq query rows per head (a query tile: the mask is [b, tq, t] for it).
template <typename T>
__device__ void softmax_fwd(const T* s, const float* mask, T* p, float scale, int t, long long rows_per_b, int tq) {
    long long row = blockIdx.x;
    long long b = row / rows_per_b;
    int i = (int)(row % tq);
    const T* sr = s + row * t;
    const float* mr = mask + (b * tq + i) * (long long)t;
    T* pr = p + row * t;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < t; j += blockDim.x) mx = fmaxf(mx, ldf(sr, j) * scale + mr[j]);
    mx = block_reduce<true>(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(ldf(sr, j) * scale + mr[j] - mx);
    float inv = 1.0f / block_reduce<false>(sum);
    for (int j = threadIdx.x; j < t; j += blockDim.x) stf(pr, j, expf(ldf(sr, j) * scale + mr[j] - mx) * inv);
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

extern "C" __global__ void attn_softmax_fwd_f32(const float* s, const float* mask, float* p, float scale, int t, long long rows_per_b, int tq) {
    softmax_fwd(s, mask, p, scale, t, rows_per_b, tq);
}
extern "C" __global__ void attn_softmax_fwd_bf16(const __nv_bfloat16* s, const float* mask, __nv_bfloat16* p, float scale, int t, long long rows_per_b, int tq) {
    softmax_fwd(s, mask, p, scale, t, rows_per_b, tq);
}
extern "C" __global__ void attn_softmax_bwd_f32(const float* p, const float* dp, float* ds, int t) { softmax_bwd(p, dp, ds, t); }
extern "C" __global__ void attn_softmax_bwd_bf16(const __nv_bfloat16* p, const __nv_bfloat16* dp, __nv_bfloat16* ds, int t) {
    softmax_bwd(p, dp, ds, t);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy of one chunk of LM-head logits [c, V] (bf16 or f32; f32 statistics, as
// transformers upcasts the logits): loss[i] = logsumexp(l_i) − l_i[t_i] and, when `g` ≠ 0, the
// gradient g·(softmax(l_i) − onehot(t_i)) in the logits' dtype. One block per row: one pass for
// an online max/sum, one for the gradient (the row is still in L2).

template <typename T>
__device__ void xent(const T* logits, const unsigned* tgt, float g, T* dl, float* loss, int V) {
    long long row = blockIdx.x;
    const T* lr = logits + row * V;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float v = ldf(lr, j);
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; } else s += expf(v - m);
    }
    float mx = block_reduce<true>(m);
    float sum = block_reduce<false>(m == -INFINITY ? 0.0f : s * expf(m - mx));
    int t = (int)tgt[row];
    if (threadIdx.x == 0) loss[row] = mx + logf(sum) - ldf(lr, t);
    if (g == 0.0f) return;
    float inv = 1.0f / sum;
    T* dr = dl + row * V;
    for (int j = threadIdx.x; j < V; j += blockDim.x) stf(dr, j, g * (expf(ldf(lr, j) - mx) * inv - (j == t ? 1.0f : 0.0f)));
}

extern "C" __global__ void xent_f32(const float* l, const unsigned* t, float g, float* dl, float* loss, int V) { xent(l, t, g, dl, loss, V); }
extern "C" __global__ void xent_bf16(const __nv_bfloat16* l, const unsigned* t, float g, __nv_bfloat16* dl, float* loss, int V) { xent(l, t, g, dl, loss, V); }

// ---------------------------------------------------------------------------------------------
// A projection's rows [b·t, h·d] to heads [b, h, t, d] (split) or back (merge), with HF's
// rotate_half RoPE when `rot` (cos/sin [b·t, d/2], per token): split rotates,
//   y_i = x_i c_i − x_{i+d/2} s_i,   y_{i+d/2} = x_{i+d/2} c_i + x_i s_i,
// merge applies the inverse (s negated), the gradient of split. One thread per pair (i, i+d/2),
// i fastest, so reads and writes are contiguous in both layouts.

template <typename T>
__device__ void heads_rope(const T* x, const T* cos, const T* sin, T* y, int t, int h, int d, int rot, int merge, long long pairs) {
    const int half = d / 2;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < pairs; idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long r = idx / half;
        int hh = (int)(r % h);
        long long bt = r / h;  // the token's row, b·t + t
        long long bb = bt / t, tt = bt % t;
        long long rows = bt * h * d + (long long)hh * d, heads = ((bb * h + hh) * t + tt) * d;
        long long src = merge ? heads : rows, dst = merge ? rows : heads;
        float a = ldf(x, src + i), c = ldf(x, src + i + half);
        float ya = a, yc = c;
        if (rot) {
            float cs = ldf(cos, bt * half + i), sn = ldf(sin, bt * half + i);
            if (merge) sn = -sn;
            ya = a * cs - c * sn;
            yc = c * cs + a * sn;
        }
        stf(y, dst + i, ya);
        stf(y, dst + i + half, yc);
    }
}

extern "C" __global__ void heads_rope_f32(const float* x, const float* cos, const float* sin, float* y, int t, int h, int d, int rot, int merge, long long pairs) {
    heads_rope(x, cos, sin, y, t, h, d, rot, merge, pairs);
}
extern "C" __global__ void heads_rope_bf16(const __nv_bfloat16* x, const __nv_bfloat16* cos, const __nv_bfloat16* sin, __nv_bfloat16* y, int t, int h, int d, int rot, int merge,
                                           long long pairs) {
    heads_rope(x, cos, sin, y, t, h, d, rot, merge, pairs);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over rows of h: forward y = x·rstd·w (rstd = 1/sqrt(mean(x²) + eps), f32, saved per
// row) and backward dx = rstd·(g − x̂·mean(g·x̂)), g = dy·w, x̂ = x·rstd. One block per row.

template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, float* rstd, int h, float eps) {
    long long row = blockIdx.x;
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ldf(xr, j); ss += v * v; }
    float r = rsqrtf(block_reduce<false>(ss) / h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < h; j += blockDim.x) stf(yr, j, ldf(xr, j) * r * ldf(w, j));
}

template <typename T>
__device__ void rms_bwd(const T* x, const float* rstd, const T* w, const T* dy, T* dx, int h) {
    long long row = blockIdx.x;
    const T* xr = x + row * h;
    const T* dr = dy + row * h;
    T* or_ = dx + row * h;
    float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) dot += ldf(dr, j) * ldf(w, j) * ldf(xr, j) * r;
    float proj = block_reduce<false>(dot) / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) stf(or_, j, (ldf(dr, j) * ldf(w, j) - ldf(xr, j) * r * proj) * r);
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, float* rstd, int h, float eps) { rms_fwd(x, w, y, rstd, h, eps); }
extern "C" __global__ void rms_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, float* rstd, int h, float eps) { rms_fwd(x, w, y, rstd, h, eps); }
extern "C" __global__ void rms_bwd_f32(const float* x, const float* rstd, const float* w, const float* dy, float* dx, int h) { rms_bwd(x, rstd, w, dy, dx, h); }
extern "C" __global__ void rms_bwd_bf16(const __nv_bfloat16* x, const float* rstd, const __nv_bfloat16* w, const __nv_bfloat16* dy, __nv_bfloat16* dx, int h) { rms_bwd(x, rstd, w, dy, dx, h); }

// SwiGLU h = silu(g)·u and its backward dg = dh·u·σ(g)(1 + g(1 − σ(g))), du = dh·g·σ(g). Each
// thread takes 8 consecutive elements (16-byte loads of bf16 when n is a multiple of 8 and the
// buffers aligned, as the callers' fresh tensors are), so that enough bytes are in flight.
template <typename T>
__device__ __forceinline__ void swiglu_fwd1(const T* g, const T* u, T* h, long long i) {
    float gv = ldf(g, i);
    stf(h, i, gv / (1.0f + expf(-gv)) * ldf(u, i));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd1(const T* g, const T* u, const T* dh, T* dg, T* du, long long i) {
    float gv = ldf(g, i), uv = ldf(u, i), hv = ldf(dh, i);
    float s = 1.0f / (1.0f + expf(-gv));
    stf(dg, i, hv * uv * s * (1.0f + gv * (1.0f - s)));
    stf(du, i, hv * gv * s);
}

__device__ __forceinline__ void unpack8(uint4 q, float (&v)[8]) {
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int t = 0; t < 4; t++) v[2 * t] = __uint_as_float(w[t] << 16), v[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u);
}

__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
    unsigned w[4];
#pragma unroll
    for (int t = 0; t < 4; t++) {
        __nv_bfloat162 b = __floats2bfloat162_rn(v[2 * t], v[2 * t + 1]);
        w[t] = *reinterpret_cast<unsigned*>(&b);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* h, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) swiglu_fwd1(g, u, h, i);
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) swiglu_bwd1(g, u, dh, dg, du, i);
}

// bf16, n8 = n / 8 groups of 8.
extern "C" __global__ void swiglu_fwd_bf16x8(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h, long long n8) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n8; i += (long long)gridDim.x * blockDim.x) {
        float gv[8], uv[8], hv[8];
        unpack8(__ldg((const uint4*)g + i), gv);
        unpack8(__ldg((const uint4*)u + i), uv);
#pragma unroll
        for (int t = 0; t < 8; t++) hv[t] = gv[t] / (1.0f + __expf(-gv[t])) * uv[t];
        ((uint4*)h)[i] = pack8(hv);
    }
}

extern "C" __global__ void swiglu_bwd_bf16x8(const __nv_bfloat16* g, const __nv_bfloat16* u, const __nv_bfloat16* dh, __nv_bfloat16* dg, __nv_bfloat16* du,
                                              long long n8) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n8; i += (long long)gridDim.x * blockDim.x) {
        float gv[8], uv[8], hv[8], dgv[8], duv[8];
        unpack8(__ldg((const uint4*)g + i), gv);
        unpack8(__ldg((const uint4*)u + i), uv);
        unpack8(__ldg((const uint4*)dh + i), hv);
#pragma unroll
        for (int t = 0; t < 8; t++) {
            const float s = 1.0f / (1.0f + __expf(-gv[t]));
            dgv[t] = hv[t] * uv[t] * s * (1.0f + gv[t] * (1.0f - s));
            duv[t] = hv[t] * gv[t] * s;
        }
        ((uint4*)dg)[i] = pack8(dgv);
        ((uint4*)du)[i] = pack8(duv);
    }
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* h, long long n) { swiglu_fwd(g, u, h, n); }
extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h, long long n) { swiglu_fwd(g, u, h, n); }
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* dh, float* dg, float* du, long long n) { swiglu_bwd(g, u, dh, dg, du, n); }
extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, const __nv_bfloat16* dh, __nv_bfloat16* dg, __nv_bfloat16* du, long long n) {
    swiglu_bwd(g, u, dh, dg, du, n);
}

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
