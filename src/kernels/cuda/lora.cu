// The rank-r side of a LoRA linear on CUDA: the big `x Wᵀ` / `dy W` products stay in cuBLAS,
// these three kernels do everything else of the adapter, each in one pass over the large
// operand, the dropout mask regenerated from its hash where it applies (never stored):
//
//   project:  U[i, r] = scale · Σ_k drop(X)[i, k] · W(r, k)         u = drop(x)Aᵀ, du = s·dy B
//   expand:   O[i, j] = Y[i, j] + scale · mask(i, j) · Σ_r U[i, r] · V(j, r)
//                                                        y += s·u Bᵀ, dx += mask ⊙ (du A)
//   grad:     G[s, r, k] = scale · Σ_{i ∈ split s} U[i, r] · drop(X)[i, k]
//                                                        dA = duᵀ drop(x), dBᵀ = s·uᵀ dy
//
// The candle formulation took about eight passes per adapter (a stored mask, x·mask, separate
// scales and adds). Arithmetic is f32 whatever the storage type. `R` is the compiled rank (8, 16
// or 32); a smaller actual rank `r` pads with zeros. W(q, k) is W[q·K + k] (A) or, with `wt`,
// W[k·r + q] (B read as Bᵀ); V likewise with `vt`.

#include <cuda_bf16.h>

#include "dropout.cuh"

namespace {

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

struct Mask {
    unsigned k1, k2, thr;
    float scale;
    int on;
    __device__ __forceinline__ float at(long long e) const { return on ? keep(e, k1, k2, thr, scale) : 1.0f; }
};

constexpr int KC = 256;  // k per chunk in `project`: 8 consecutive elements per lane
constexpr int PW = 16;   // warps per block in `project`, 2 rows each: 32 rows a block

// Eight consecutive elements from e as f32: one 16-byte load when `vec` (e a multiple of 8 in a
// 16-byte aligned buffer), else element by element up to `left`.
__device__ __forceinline__ void load8(const float* p, long long e, int left, bool vec, float v[8]) {
    if (vec && left >= 8) {
        float4 a = *(const float4*)(p + e), b = *(const float4*)(p + e + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; t++) v[t] = t < left ? p[e + t] : 0.0f;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, long long e, int left, bool vec, float v[8]) {
    if (vec && left >= 8) {
        uint4 q = *(const uint4*)(p + e);
        unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int t = 0; t < 4; t++) {
            v[2 * t] = __uint_as_float(w[t] << 16);
            v[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u);
        }
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; t++) v[t] = t < left ? __bfloat162float(p[e + t]) : 0.0f;
}

// Eight consecutive x values from k0 of each of the RPW rows from row0 (zeros outside x).
template <typename T, int RPW>
__device__ __forceinline__ void fetch_rows(const T* __restrict__ x, int row0, int n, int K, int k0, bool vec, float (&v)[RPW][8]) {
#pragma unroll
    for (int a = 0; a < RPW; a++) {
        int row = row0 + a;
        if (row < n && k0 < K) {
            load8(x, (long long)row * K + k0, K - k0, vec, v[a]);
        } else {
#pragma unroll
            for (int t = 0; t < 8; t++) v[a][t] = 0.0f;
        }
    }
}

// Each warp owns two rows; each lane 8 consecutive k of a 256-wide chunk (one 16-byte load per
// row), W's chunk staged in shared memory and reused by the block's 32 rows.
template <typename T, int R>
__device__ void project(const T* __restrict__ x, const T* __restrict__ w, int wt, Mask m, float scale, T* __restrict__ u, int n, int K, int r, int vec) {
    constexpr int RPW = 2;
    __shared__ __align__(16) float ws[R][KC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * PW + warp) * RPW;
    float acc[RPW][R];
#pragma unroll
    for (int a = 0; a < RPW; a++)
#pragma unroll
        for (int q = 0; q < R; q++) acc[a][q] = 0.0f;
    float xv[RPW][8];
    fetch_rows<T, RPW>(x, row0, n, K, lane * 8, vec != 0, xv);
    for (int kc = 0; kc < K; kc += KC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < R * KC; idx += blockDim.x) {
            int q = idx / KC, j = idx % KC, k = kc + j;
            ws[q][j] = (q < r && k < K) ? ld(w, wt ? (long long)k * r + q : (long long)q * K + k) : 0.0f;
        }
        __syncthreads();
        // x of this chunk was fetched during the previous one; fetch the next chunk's now, so
        // its loads are in flight while this chunk's products run.
        float xn[RPW][8];
        fetch_rows<T, RPW>(x, row0, n, K, kc + KC + lane * 8, vec != 0, xn);
        if (m.on) {
#pragma unroll
            for (int a = 0; a < RPW; a++)
#pragma unroll
                for (int t = 0; t < 8; t++) xv[a][t] *= m.at((long long)(row0 + a) * K + kc + lane * 8 + t);
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            float4 w0 = *(const float4*)&ws[q][lane * 8], w1 = *(const float4*)&ws[q][lane * 8 + 4];
            float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
            for (int a = 0; a < RPW; a++)
#pragma unroll
                for (int t = 0; t < 8; t++) acc[a][q] += xv[a][t] * wv[t];
        }
#pragma unroll
        for (int a = 0; a < RPW; a++)
#pragma unroll
            for (int t = 0; t < 8; t++) xv[a][t] = xn[a][t];
    }
#pragma unroll
    for (int a = 0; a < RPW; a++) {
        int row = row0 + a;
#pragma unroll
        for (int q = 0; q < R; q++) {
            float v = acc[a][q];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == q % 32 && q < r && row < n) st(u, (long long)row * r + q, v * scale);
        }
    }
}

constexpr int ER = 32;  // rows per block in `expand`, one column per thread

template <typename T, int R>
__device__ void expand(const T* __restrict__ y, const T* __restrict__ u, const T* __restrict__ v, int vt, Mask m, float scale, T* __restrict__ out, int n, int M, int r) {
    __shared__ float us[ER][R];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int row0 = blockIdx.y * ER;
    for (int idx = threadIdx.x; idx < ER * R; idx += blockDim.x) {
        int a = idx / R, q = idx % R, row = row0 + a;
        us[a][q] = (q < r && row < n) ? ld(u, (long long)row * r + q) : 0.0f;
    }
    float vj[R];
#pragma unroll
    for (int q = 0; q < R; q++) vj[q] = (q < r && j < M) ? ld(v, vt ? (long long)q * M + j : (long long)j * r + q) : 0.0f;
    __syncthreads();
    if (j >= M) return;
    // Eight rows' loads issued before their sums, so that the loads overlap.
    for (int a0 = 0; a0 < ER; a0 += 8) {
        float yv[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            int row = row0 + a0 + t;
            yv[t] = row < n ? ld(y, (long long)row * M + j) : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
            int row = row0 + a0 + t;
            if (row >= n) break;
            float s = 0.0f;
#pragma unroll
            for (int q = 0; q < R; q++) s += us[a0 + t][q] * vj[q];
            long long e = (long long)row * M + j;
            st(out, e, yv[t] + scale * m.at(e) * s);
        }
    }
}

constexpr int GR = 32;  // rows of U staged in shared memory at a time in `grad`

// One column k per thread, the rows of one split; partial sums per split (summed by the caller,
// so the result does not depend on scheduling).
template <typename T, int R>
__device__ void grad(const T* __restrict__ u, const T* __restrict__ x, Mask m, float scale, float* __restrict__ g, int n, int K, int r, int rows_per_split) {
    __shared__ float us[GR][R];
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    const int lo = s * rows_per_split, hi = min(n, lo + rows_per_split);
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; q++) acc[q] = 0.0f;
    for (int base = lo; base < hi; base += GR) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < GR * R; idx += blockDim.x) {
            int a = idx / R, q = idx % R, row = base + a;
            us[a][q] = (q < r && row < hi) ? ld(u, (long long)row * r + q) : 0.0f;
        }
        __syncthreads();
        if (k < K) {
            // Eight rows' loads issued before their products (rows past the split have zero U).
            int rows = min(GR, hi - base);
            for (int a0 = 0; a0 < rows; a0 += 8) {
                float xv[8];
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    long long e = (long long)(base + a0 + t) * K + k;
                    xv[t] = a0 + t < rows ? ld(x, e) * m.at(e) : 0.0f;
                }
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                    for (int q = 0; q < R; q++) acc[q] += us[a0 + t][q] * xv[t];
            }
        }
    }
    if (k >= K) return;
    // Unrolled with constant indices, so that acc stays in registers.
#pragma unroll
    for (int q = 0; q < R; q++)
        if (q < r) g[((long long)s * r + q) * K + k] = acc[q] * scale;
}

}  // namespace

#define LORA_KERNELS(TN, T, R)                                                                                                           \
    extern "C" __global__ void __launch_bounds__(512) lora_project_##TN##_r##R(const T* x, const T* w, int wt, Mask m, float scale,      \
                                                                               T* u, int n, int K, int r, int vec) {                     \
        project<T, R>(x, w, wt, m, scale, u, n, K, r, vec);                                                                              \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) lora_expand_##TN##_r##R(const T* y, const T* u, const T* v, int vt, Mask m,        \
                                                                              float scale, T* out, int n, int M, int r) {                \
        expand<T, R>(y, u, v, vt, m, scale, out, n, M, r);                                                                               \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) lora_grad_##TN##_r##R(const T* u, const T* x, Mask m, float scale, float* g, int n, \
                                                                            int K, int r, int rows_per_split) {                          \
        grad<T, R>(u, x, m, scale, g, n, K, r, rows_per_split);                                                                          \
    }

LORA_KERNELS(f32, float, 8)
LORA_KERNELS(f32, float, 16)
LORA_KERNELS(f32, float, 32)
LORA_KERNELS(bf16, __nv_bfloat16, 8)
LORA_KERNELS(bf16, __nv_bfloat16, 16)
LORA_KERNELS(bf16, __nv_bfloat16, 32)
