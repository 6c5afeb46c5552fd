// The LoRA dropout mask as a keyed hash of the element index, shared by dropout.cu and lora.cu.
// Its CPU twin is src/kernels/lora/cpu.rs (dropout_bits): the same bits on every device, and
// the same again when a checkpointed layer is recomputed.
#pragma once

// Wellons' lowbias32, as in src/kernels/lora/cpu.rs (dropout_bits).
__device__ __forceinline__ unsigned lowbias32(unsigned x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

// Element i is kept when the top 16 bits of the keyed hash of (u32)i reach `thr` (the CPU's
// dropout_bits).
__device__ __forceinline__ bool kept(long long i, unsigned k1, unsigned k2, unsigned thr) {
    return (lowbias32(lowbias32((unsigned)i ^ k1) ^ k2) >> 16) >= thr;
}

// The inverted-dropout multiplier of element i: `scale` where kept, else 0.
__device__ __forceinline__ float keep(long long i, unsigned k1, unsigned k2, unsigned thr, float scale) {
    return kept(i, k1, k2, thr) ? scale : 0.0f;
}
