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
__device__ void rms_bwd(const T* x, const float* rstd, const T* w, const T* dy, T* dx, int h, float off) {
    long long row = blockIdx.x;
    const T* xr = x + row * h;
    const T* dr = dy + row * h;
    T* or_ = dx + row * h;
    float r = rstd[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) dot += ldf(dr, j) * (off + ldf(w, j)) * ldf(xr, j) * r;
    float proj = block_reduce<false>(dot) / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) stf(or_, j, (ldf(dr, j) * (off + ldf(w, j)) - ldf(xr, j) * r * proj) * r);
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, float* rstd, int h, float eps, float off) { rms_fwd(x, w, y, rstd, h, eps, off); }
extern "C" __global__ void rms_fwd_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, float* rstd, int h, float eps, float off) {
    rms_fwd(x, w, y, rstd, h, eps, off);
}
extern "C" __global__ void rms_bwd_f32(const float* x, const float* rstd, const float* w, const float* dy, float* dx, int h, float off) { rms_bwd(x, rstd, w, dy, dx, h, off); }
extern "C" __global__ void rms_bwd_bf16(const __nv_bfloat16* x, const float* rstd, const __nv_bfloat16* w, const __nv_bfloat16* dy, __nv_bfloat16* dx, int h, float off) {
    rms_bwd(x, rstd, w, dy, dx, h, off);
}
