#include <cuda_bf16.h>

#include "../elem.cuh"

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
