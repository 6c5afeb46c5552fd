// bitsandbytes 4-bit (NF4 / FP4) weights on the GPU: blockwise dequantization, and a fused
// dequantize-GEMV for batch-1 decoding. build.rs compiles this file to PTX; the launches and
// their argument order live in src/kernels/quant4/cuda.rs.
//
// Layout (bnb's): element e of the row-major weight is nibble e of `packed`, the even element in
// the HIGH nibble of byte e/2, and its scale is absmax[e >> log2_bs] (blocksize: a power of two
// from 32 to 4096). With double quantization the scales are u8 codes, rebuilt on the fly:
//   absmax[b] = ftz(nested_code[absmax_q[b]] * nested_absmax[b >> log2_nested]) + offset
// so device memory holds what the checkpoint holds (1 byte per block, not 4) and the GEMV reads
// 4x fewer scale bytes.
//
// The CPU twin is src/quant/blockwise.rs::dequantize_4bit_blocks (plus
// double_quant::decompress). Dequantization here is bit-identical to it: f32 products without
// FMA contraction (__fmul_rn/__fadd_rn), the same flush-to-zero, round-to-nearest-even to
// bf16/f16 written out in bits like the `half` crate, and even NaN bits as x86 produces them.
// The GEMV only needs f32 accuracy (its summation order differs from any matmul anyway).

#include "quant4.cuh"

namespace {

// ------------------------------------------------------------------------------- dequantize

// One thread per 32 elements: one 16-byte load of codes, four (bf16/f16) or eight (f32)
// 16-byte stores. 32 divides every blocksize, so the 32 elements share one scale. `vec` = 0
// (a misaligned pointer) or the last partial group takes the scalar path.
template <int OUT, bool DQ>
DEVI void dequant4(const u8* __restrict__ packed, const float* __restrict__ lut_g, Stats st, int log2_bs, i64 n,
                   void* __restrict__ out, int vec) {
    __shared__ float lut[16];
    load_lut(lut, lut_g);
    const i64 e0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 32;
    if (e0 >= n) return;
    const float a = block_absmax<DQ, true>(st, e0 >> log2_bs);
    if (vec && e0 + 32 <= n) {
        const uint4 w = __ldg((const uint4*)(packed + e0 / 2));
        const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float v[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 byte = (ws[k] >> (8 * j)) & 0xffu;
                v[2 * j] = ftz(mul_cpu(lut[byte >> 4], a));
                v[2 * j + 1] = ftz(mul_cpu(lut[byte & 15u], a));
            }
            store8<OUT>(out, e0 + 8 * k, v);
        }
    } else {
        const i64 end = e0 + 32 < n ? e0 + 32 : n;
        for (i64 e = e0; e < end; ++e) {
            const u32 byte = packed[e >> 1];
            const u32 nib = (e & 1) ? (byte & 15u) : (byte >> 4);
            store1<OUT>(out, e, ftz(mul_cpu(lut[nib], a)));
        }
    }
}

// -------------------------------------------------------------------------------------- GEMV

// y[r] = sum_i W[r, i] x[i] for cols % 32 == 0: a group of LANES threads owns ROWS
// consecutive rows (gemv4_rows). f32 accumulation; y in x's dtype.
template <int LANES, bool DQ, bool XBF16>
DEVI void gemv4(const u8* __restrict__ packed, const float* __restrict__ lut_g, Stats st, int log2_bs, int rows,
                int cols, const void* __restrict__ x, void* __restrict__ y) {
    __shared__ float lut[16];
    load_lut(lut, lut_g);
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = t % LANES;
    const int r0 = (t / LANES) * ROWS;
    // Rows past the end repeat the last row (loads stay in bounds, every lane reaches the
    // shuffles); their results are not stored.
    i64 base[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) base[i] = (i64)min(r0 + i, rows - 1) * cols;
    const Q4 w{packed, lut_g, st, log2_bs};
    float acc[ROWS];
    gemv4_rows<LANES, DQ>(w, w, lut, lut, base, lane, cols / 32, XGlobal<XBF16>{x}, acc);
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
            if (r0 + i < rows) store1<XBF16 ? 1 : 0>(y, r0 + i, acc[i]);
    }
}

template <bool DQ, bool XBF16>
DEVI void gemv4_generic(const u8* __restrict__ packed, const float* __restrict__ lut_g, Stats st, int log2_bs, int rows,
                        int cols, const void* __restrict__ x, void* __restrict__ y) {
    __shared__ float lut[16];
    load_lut(lut, lut_g);
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp
    const i64 base = (i64)row * cols;
    float acc = 0.0f;
    for (int i = lane; i < cols; i += 32) {
        const i64 e = base + i;
        const u32 byte = packed[e >> 1];
        const u32 nib = (e & 1) ? (byte & 15u) : (byte >> 4);
        acc = fmaf(lut[nib] * block_absmax<DQ, false>(st, e >> log2_bs), load_x1<XBF16>(x, i), acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) store1<XBF16 ? 1 : 0>(y, row, acc);
}

}  // namespace

// ------------------------------------------------------------------------- entry points
// Every kernel takes the weight's statistics as (absmax, absmax_q, nested_absmax,
// nested_code, offset, log2_nested); the plain kernels read only `absmax`.

#define STATS_PARAMS                                                                                        \
    const float *absmax, const u8 *absmax_q, const float *nested_absmax, const float *nested_code, float offset, \
        int log2_nested
#define STATS Stats{absmax, absmax_q, nested_absmax, nested_code, offset, log2_nested}

#define DEQUANT(NAME, OUT, DQ)                                                                                 \
    extern "C" __global__ void NAME(const u8* packed, const float* lut, STATS_PARAMS, int log2_bs, i64 n, void* out, \
                                    int vec) {                                                                 \
        dequant4<OUT, DQ>(packed, lut, STATS, log2_bs, n, out, vec);                                           \
    }
DEQUANT(dequant4_f32_plain, 0, false)
DEQUANT(dequant4_bf16_plain, 1, false)
DEQUANT(dequant4_f16_plain, 2, false)
DEQUANT(dequant4_f32_dq, 0, true)
DEQUANT(dequant4_bf16_dq, 1, true)
DEQUANT(dequant4_f16_dq, 2, true)

#define GEMV(NAME, LANES, DQ, XBF16)                                                                          \
    extern "C" __global__ void NAME(const u8* packed, const float* lut, STATS_PARAMS, int log2_bs, int rows, int cols, \
                                    const void* x, void* y) {                                                 \
        gemv4<LANES, DQ, XBF16>(packed, lut, STATS, log2_bs, rows, cols, x, y);                               \
    }
#define GEMV_LANES(X, DQNAME, DQ, XBF16)                        \
    GEMV(gemv4_##X##_##DQNAME##_l8, 8, DQ, XBF16)               \
    GEMV(gemv4_##X##_##DQNAME##_l16, 16, DQ, XBF16)             \
    GEMV(gemv4_##X##_##DQNAME##_l32, 32, DQ, XBF16)
GEMV_LANES(f32, plain, false, false)
GEMV_LANES(f32, dq, true, false)
GEMV_LANES(bf16, plain, false, true)
GEMV_LANES(bf16, dq, true, true)

#define GEMV_GENERIC(NAME, DQ, XBF16)                                                                         \
    extern "C" __global__ void NAME(const u8* packed, const float* lut, STATS_PARAMS, int log2_bs, int rows, int cols, \
                                    const void* x, void* y) {                                                 \
        gemv4_generic<DQ, XBF16>(packed, lut, STATS, log2_bs, rows, cols, x, y);                              \
    }
GEMV_GENERIC(gemv4_generic_f32_plain, false, false)
GEMV_GENERIC(gemv4_generic_f32_dq, true, false)
GEMV_GENERIC(gemv4_generic_bf16_plain, false, true)
GEMV_GENERIC(gemv4_generic_bf16_dq, true, true)
