// Loads and stores of f32 or bf16 elements as f32, shared by the elementwise and row kernels.

#pragma once

#include <cuda_bf16.h>

__device__ __forceinline__ float ldf(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stf(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

// Eight consecutive elements from index i (a multiple of 8 in a 16-byte aligned buffer) as f32,
// and back (bf16 rounded to nearest even, as stf).
__device__ __forceinline__ void ld8(const float* p, long long i, float v[8]) {
    const float4 a = *(const float4*)(p + i), b = *(const float4*)(p + i + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void ld8(const __nv_bfloat16* p, long long i, float v[8]) {
    const uint4 u = *(const uint4*)(p + i);
    const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(h[k]);
        v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ void st8(float* p, long long i, const float v[8]) {
    *(float4*)(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4*)(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(__nv_bfloat16* p, long long i, const float v[8]) {
    uint4 u;
    __nv_bfloat162* h = (__nv_bfloat162*)&u;
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *(uint4*)(p + i) = u;
}
