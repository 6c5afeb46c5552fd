// The scaled LoRA dropout mask (0 or 1/(1-p)) as a tensor, for the candle reference path on CUDA;
// the LoRA kernels (lora.cu) regenerate the same bits inline. CPU twin: lora/cpu.rs.

#include <cuda_bf16.h>

#include "dropout.cuh"

extern "C" __global__ void dropout_mask_f32(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, float* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = keep(i, k1, k2, thr, scale);
}

extern "C" __global__ void dropout_mask_bf16(unsigned k1, unsigned k2, unsigned thr, float scale, long long n, __nv_bfloat16* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(keep(i, k1, k2, thr, scale));
}
