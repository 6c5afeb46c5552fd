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

// A warp dequantizes 1024 elements: part p (8 elements) of lane l is at the warp's base
// + p·256 + l·8, so each store instruction of the warp writes contiguous whole sectors (512 B
// of bf16) and each 4-byte code load reads 128 contiguous bytes. (One thread per 32 contiguous
// elements wrote half sectors: 1.8 TB/s against 2.9 on an H200.) 8 divides every blocksize,
// so a part has one scale. `vec` = 0 (codes not 4-byte or output not 16-byte aligned) or a
// part past the end takes the scalar path.
//
// The common block has a finite scale a that is 0 or normal: then lut·a is never NaN, mul.ftz
// flushes exactly the subnormal products ftz() flushes (its inputs are normal), and the cvt
// instructions round to nearest even as bits16 does for every non-NaN value: same bits, a
// quarter of the instructions (the reference arithmetic made this kernel issue-bound).
DEVI float mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// Two outputs packed as 16-bit values (lo in the low half: the lower address).
template <int OUT>
DEVI u32 pack2(float lo, float hi) {
    u32 r;
    if (OUT == 1)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

DEVI bool plain_scale(float a) { return fabsf(a) <= 3.40282347e38f && (a == 0.0f || fabsf(a) >= 1.17549435e-38f); }

template <int OUT, bool DQ>
DEVI void dequant4(const u8* __restrict__ packed, const float* __restrict__ lut_g, Stats st, int log2_bs, i64 n,
                   void* __restrict__ out, int vec) {
    __shared__ float lut[16];
    load_lut(lut, lut_g);
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 base = (t >> 5) * 1024 + (t & 31) * 8;
    u32 codes[4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
        if (vec && base + p * 256 + 8 <= n) codes[p] = __ldg((const u32*)(packed + (base + p * 256) / 2));
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const i64 e = base + p * 256;
        if (e >= n) break;
        const float a = block_absmax<DQ, true>(st, e >> log2_bs);
        if (vec && e + 8 <= n && plain_scale(a)) {
            // Byte j of hi / lo: 4 * (high / low nibble of code byte j), a table offset.
            const u32 hi = (codes[p] >> 2) & 0x3c3c3c3cu, lo = (codes[p] << 2) & 0x3c3c3c3cu;
            float v[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[2 * j] = mul_ftz(lut_at(lut, __byte_perm(hi, 0, 0x4440 + j)), a);
                v[2 * j + 1] = mul_ftz(lut_at(lut, __byte_perm(lo, 0, 0x4440 + j)), a);
            }
            if (OUT == 0) {
                float4* o = (float4*)((float*)out + e);
                o[0] = make_float4(v[0], v[1], v[2], v[3]);
                o[1] = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                *(uint4*)((u16*)out + e) =
                    make_uint4(pack2<OUT>(v[0], v[1]), pack2<OUT>(v[2], v[3]), pack2<OUT>(v[4], v[5]), pack2<OUT>(v[6], v[7]));
            }
        } else {
            const i64 end = e + 8 < n ? e + 8 : n;
            for (i64 i = e; i < end; ++i) {
                const u32 byte = packed[i >> 1];
                const u32 nib = (i & 1) ? (byte & 15u) : (byte >> 4);
                store1<OUT>(out, i, ftz(mul_cpu(lut[nib], a)));
            }
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
