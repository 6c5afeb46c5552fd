#include <cuda_bf16.h>

#include "../elem.cuh"

// The gated MLP's gates, forward h = act(g)·u and backward (dg = dh·u·act′(g), du = dh·act(g)):
//   SwiGLU: act = silu, silu(g) = g·σ(g), silu′ = σ(g)(1 + g(1 − σ(g)));
//   GeGLU:  act = the tanh GELU, gelu(g) = 0.5·g(1 + tanh(y)) = g·σ(2y), y = √(2/π)(g + 0.044715g³),
//           so with z = 2y: gelu′ = σ(z) + g·σ(z)(1 − σ(z))·z′, z′ = 2√(2/π)(1 + 3·0.044715g²).
// Each activation gives its forward and backward once with expf (the scalar kernels) and once
// with __expf (the bf16 kernels that take 8 consecutive elements a thread: 16-byte loads when n
// is a multiple of 8 and the buffers aligned, as the callers' fresh tensors are, so that enough
// bytes are in flight).

struct Silu {
    static __device__ __forceinline__ float fwd(float g, float u) { return g / (1.0f + expf(-g)) * u; }
    static __device__ __forceinline__ float fwd_fast(float g, float u) { return g / (1.0f + __expf(-g)) * u; }
    static __device__ __forceinline__ void bwd(float g, float u, float h, float& dg, float& du) {
        float s = 1.0f / (1.0f + expf(-g));
        dg = h * u * s * (1.0f + g * (1.0f - s));
        du = h * g * s;
    }
    static __device__ __forceinline__ void bwd_fast(float g, float u, float h, float& dg, float& du) {
        const float s = 1.0f / (1.0f + __expf(-g));
        dg = h * u * s * (1.0f + g * (1.0f - s));
        du = h * g * s;
    }
};

constexpr float GELU_K = 1.5957691216057308f;  // 2·√(2/π)
constexpr float GELU_A = 0.044715f;

template <bool FAST>
__device__ __forceinline__ float gelu_sigma(float g, float& dz) {
    const float g2 = g * g, z = GELU_K * g * (1.0f + GELU_A * g2);
    dz = GELU_K * (1.0f + 3.0f * GELU_A * g2);
    return 1.0f / (1.0f + (FAST ? __expf(-z) : expf(-z)));
}

struct Gelu {
    template <bool FAST = false>
    static __device__ __forceinline__ float fwd(float g, float u) {
        float dz;
        return g * gelu_sigma<FAST>(g, dz) * u;
    }
    static __device__ __forceinline__ float fwd_fast(float g, float u) { return fwd<true>(g, u); }
    template <bool FAST = false>
    static __device__ __forceinline__ void bwd(float g, float u, float h, float& dg, float& du) {
        float dz;
        const float s = gelu_sigma<FAST>(g, dz), gs = g * s;
        dg = h * u * (s + gs * (1.0f - s) * dz);
        du = h * gs;
    }
    static __device__ __forceinline__ void bwd_fast(float g, float u, float h, float& dg, float& du) { bwd<true>(g, u, h, dg, du); }
};

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

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)

template <class A, typename T>
__device__ void glu_fwd(const T* g, const T* u, T* h, long long n) {
    GRID_STRIDE(i, n) stf(h, i, A::fwd(ldf(g, i), ldf(u, i)));
}

template <class A, typename T>
__device__ void glu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, long long n) {
    GRID_STRIDE(i, n) {
        float a, b;
        A::bwd(ldf(g, i), ldf(u, i), ldf(dh, i), a, b);
        stf(dg, i, a);
        stf(du, i, b);
    }
}

// bf16, n8 = n / 8 groups of 8.
template <class A>
__device__ void glu_fwd_x8(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* h, long long n8) {
    GRID_STRIDE(i, n8) {
        float gv[8], uv[8], hv[8];
        unpack8(__ldg((const uint4*)g + i), gv);
        unpack8(__ldg((const uint4*)u + i), uv);
#pragma unroll
        for (int t = 0; t < 8; t++) hv[t] = A::fwd_fast(gv[t], uv[t]);
        ((uint4*)h)[i] = pack8(hv);
    }
}

template <class A>
__device__ void glu_bwd_x8(const __nv_bfloat16* g, const __nv_bfloat16* u, const __nv_bfloat16* dh, __nv_bfloat16* dg, __nv_bfloat16* du, long long n8) {
    GRID_STRIDE(i, n8) {
        float gv[8], uv[8], hv[8], dgv[8], duv[8];
        unpack8(__ldg((const uint4*)g + i), gv);
        unpack8(__ldg((const uint4*)u + i), uv);
        unpack8(__ldg((const uint4*)dh + i), hv);
#pragma unroll
        for (int t = 0; t < 8; t++) A::bwd_fast(gv[t], uv[t], hv[t], dgv[t], duv[t]);
        ((uint4*)dg)[i] = pack8(dgv);
        ((uint4*)du)[i] = pack8(duv);
    }
}

typedef __nv_bfloat16 bf16;

// <name>_fwd_{f32,bf16,bf16x8} and <name>_bwd_{f32,bf16,bf16x8} for the activation A.
#define GLU_KERNELS(name, A)                                                                                                                    \
    extern "C" __global__ void name##_fwd_f32(const float* g, const float* u, float* h, long long n) { glu_fwd<A>(g, u, h, n); }                \
    extern "C" __global__ void name##_fwd_bf16(const bf16* g, const bf16* u, bf16* h, long long n) { glu_fwd<A>(g, u, h, n); }                 \
    extern "C" __global__ void name##_fwd_bf16x8(const bf16* g, const bf16* u, bf16* h, long long n8) { glu_fwd_x8<A>(g, u, h, n8); }          \
    extern "C" __global__ void name##_bwd_f32(const float* g, const float* u, const float* dh, float* dg, float* du, long long n) {             \
        glu_bwd<A>(g, u, dh, dg, du, n);                                                                                                        \
    }                                                                                                                                           \
    extern "C" __global__ void name##_bwd_bf16(const bf16* g, const bf16* u, const bf16* dh, bf16* dg, bf16* du, long long n) {                \
        glu_bwd<A>(g, u, dh, dg, du, n);                                                                                                        \
    }                                                                                                                                           \
    extern "C" __global__ void name##_bwd_bf16x8(const bf16* g, const bf16* u, const bf16* dh, bf16* dg, bf16* du, long long n8) {             \
        glu_bwd_x8<A>(g, u, dh, dg, du, n8);                                                                                                    \
    }

GLU_KERNELS(swiglu, Silu)
GLU_KERNELS(geglu, Gelu)
