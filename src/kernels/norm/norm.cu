#include <cuda_bf16.h>

#include "../elem.cuh"
#include "../reduce.cuh"

// RMSNorm over rows of h: forward y = x·rstd·w (rstd = 1/sqrt(mean(x²) + eps), f32, saved per
// row) and backward dx = rstd·(g − x̂·mean(g·x̂)), g = dy·w, x̂ = x·rstd. One block per row. The
// weight is offset + w in f32: offset 1 is Gemma's (1 + w), 0 the plain norm.

template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, float* rstd, int h, float eps, float off) {
    long long row = blockIdx.x;
    const T* xr = x + row * h;
    T* yr = y + row * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ldf(xr, j); ss += v * v; }
    float r = rsqrtf(block_reduce<false>(ss) / h + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < h; j += blockDim.x) stf(yr, j, ldf(xr, j) * r * (off + ldf(w, j)));
}

template <typename T>
__device__ void rms_bwd(const T* x, const float* rstd, const T* w, const T* dy, const T* res, T* dx, int h, float off) {
    long long row = blockIdx.x;
    const T* xr = x + row * h;
    const T* dr = dy + row * h;
    T* or_ = dx + row * h;
    float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) dot += ldf(dr, j) * (off + ldf(w, j)) * ldf(xr, j) * r;
    float proj = block_reduce<false>(dot) / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        stf(or_, j, (ldf(dr, j) * (off + ldf(w, j)) - ldf(xr, j) * r * proj) * r + (res ? ldf(res + row * h, j) : 0.0f));
}

// rms_bwd for rows of h % 8 == 0 elements in 16-byte aligned buffers, h ≤ 8·NV·blockDim: each
// thread loads its NV groups of 8 (x, dy, w) once with 16-byte loads and keeps them in
// registers across the reduction (the scalar kernel read every row twice, 2 bytes a load).
// Same arithmetic per element; the dot's partial sums group differently.
template <typename T, int NV>
__device__ void rms_bwd_vec(const T* x, const float* rstd, const T* w, const T* dy, const T* res, T* dx, int h, float off) {
    const long long base = (long long)blockIdx.x * h;
    const float r = rstd[blockIdx.x];
    float xv[NV][8], gv[NV][8];
    float dot = 0.0f;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        const int j = (threadIdx.x + v * blockDim.x) * 8;
        if (j >= h) break;
        float d[8], ww[8];
        ld8(x, base + j, xv[v]);
        ld8(dy, base + j, d);
        ld8(w, j, ww);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            gv[v][i] = d[i] * (off + ww[i]);
            dot += gv[v][i] * xv[v][i] * r;
        }
    }
    const float proj = block_reduce<false>(dot) / h;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        const int j = (threadIdx.x + v * blockDim.x) * 8;
        if (j >= h) break;
        float o[8], rr[8];
        if (res) ld8(res, base + j, rr);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = (gv[v][i] - xv[v][i] * r * proj) * r + (res ? rr[i] : 0.0f);
        st8(dx, base + j, o);
    }
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, float* rstd, int h, float eps, float off) { rms_fwd(x, w, y, rstd, h, eps, off); }
extern "C" __global__ void rms_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, float* rstd, int h, float eps, float off) {
    rms_fwd(x, w, y, rstd, h, eps, off);
}
#define RMS_BWD(NAME, T, KERNEL)                                                                                  \
    extern "C" __global__ void NAME(const T* x, const float* rstd, const T* w, const T* dy, const T* res, T* dx, int h, \
                                    float off) {                                                                  \
        KERNEL(x, rstd, w, dy, res, dx, h, off);                                                                  \
    }
RMS_BWD(rms_bwd_f32, float, rms_bwd)
RMS_BWD(rms_bwd_bf16, __nv_bfloat16, rms_bwd)
RMS_BWD(rms_bwd_f32_v1, float, (rms_bwd_vec<float, 1>))
RMS_BWD(rms_bwd_f32_v2, float, (rms_bwd_vec<float, 2>))
RMS_BWD(rms_bwd_f32_v4, float, (rms_bwd_vec<float, 4>))
RMS_BWD(rms_bwd_bf16_v1, __nv_bfloat16, (rms_bwd_vec<__nv_bfloat16, 1>))
RMS_BWD(rms_bwd_bf16_v2, __nv_bfloat16, (rms_bwd_vec<__nv_bfloat16, 2>))
RMS_BWD(rms_bwd_bf16_v4, __nv_bfloat16, (rms_bwd_vec<__nv_bfloat16, 4>))
