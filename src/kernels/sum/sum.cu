// out = a + b (+ c): the residual stream's sums (a block's input gradient from its q/k/v or
// gate/up branches; a sub-layer's output added to the stream), one pass over all operands, 8
// elements a thread with 16-byte accesses, the sum in f32 and rounded once. The launches live
// in src/kernels/sum/cuda.rs; the CPU (and every other case) adds with candle's ops.

#include <cuda_bf16.h>
#include "../elem.cuh"

template <typename T>
__device__ void sum_x8(const T* a, const T* b, const T* c, T* out, long long n8) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (long long)gridDim.x * blockDim.x) {
        float x[8], y[8], z[8];
        ld8(a, i * 8, x);
        ld8(b, i * 8, y);
        if (c) ld8(c, i * 8, z);
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = c ? (x[k] + y[k]) + z[k] : x[k] + y[k];
        st8(out, i * 8, x);
    }
}

extern "C" __global__ void sum_f32(const float* a, const float* b, const float* c, float* out, long long n8) { sum_x8(a, b, c, out, n8); }
extern "C" __global__ void sum_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* c, __nv_bfloat16* out, long long n8) {
    sum_x8(a, b, c, out, n8);
}
