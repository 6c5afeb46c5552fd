// Training-engine kernels on CUDA. Each has a CPU twin that tests compare it with.

#include <cuda_bf16.h>

// Wellons' lowbias32, as in src/kernels/lora_cpu.rs (dropout_bits).
__device__ __forceinline__ unsigned lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// The inverted-dropout multiplier of element i: `scale` where kept, else 0. Element i is kept
// when the top 16 bits of the keyed hash of (u32)i reach `thr` (the CPU's dropout_bits).
__device__ __forceinline__ float keep(long long i, unsigned k1, unsigned k2, unsigned thr, float scale) {
    unsigned h = lowbias32(lowbias32((unsigned)i ^ k1) ^ k2) >> 16;
    return h >= thr ? scale : 0.0f;
}

extern "C" __global__ void dropout_mask_f32(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, float* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = keep(i, k1, k2, thr, scale);
}

extern "C" __global__ void dropout_mask_bf16(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, __nv_bfloat16* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(keep(i, k1, k2, thr, scale));
}
