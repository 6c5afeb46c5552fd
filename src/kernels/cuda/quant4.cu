// bitsandbytes 4-bit (NF4 / FP4) weights on the GPU: blockwise dequantization, and a fused
// dequantize-GEMV for batch-1 decoding. build.rs compiles this file to PTX; the launches and
// their argument order live in src/kernels/cuda.rs.
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

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define DEVI __device__ __forceinline__

namespace {

// Denormals flush to zero keeping the sign, as `blockwise::ftz` (bnb's fast-math kernels).
DEVI float ftz(float x) { return fabsf(x) < 1.17549435082228750797e-38f ? copysignf(0.0f, x) : x; }

DEVI float quiet(float a) { return __uint_as_float(__float_as_uint(a) | 0x00400000u); }

// a*b and a+b with NaN results as x86 SSE gives them (the CPU reference runs there): a NaN
// operand comes back quieted, an invalid operation (0*inf, inf-inf) is the default NaN
// 0xffc00000 where CUDA would return 0x7fffffff. Only matters for corrupt or infinite scales.
DEVI float mul_cpu(float a, float b) {
    float r = __fmul_rn(a, b);
    if (r != r) r = (a != a) ? quiet(a) : (b != b) ? quiet(b) : __uint_as_float(0xffc00000u);
    return r;
}
DEVI float add_cpu(float a, float b) {
    float r = __fadd_rn(a, b);
    if (r != r) r = (a != a) ? quiet(a) : (b != b) ? quiet(b) : __uint_as_float(0xffc00000u);
    return r;
}

// f32 -> bf16 bits, round to nearest even; NaN keeps its top bits with the quiet bit set
// (`half::bf16::from_f32`).
DEVI u32 bf16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x0040u;
    return (x >> 16) + (((x & 0x8000u) != 0 && (x & 0x17fffu) != 0) ? 1u : 0u);
}

// f32 -> f16 bits, round to nearest even (subnormal f16 results kept); NaN as `half::f16::from_f32`.
DEVI u32 f16_bits(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return ((x >> 16) & 0x8000u) | 0x7e00u | ((x & 0x7fffffu) >> 13);
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Output element types: 0 = f32, 1 = bf16, 2 = f16.
template <int OUT>
DEVI u32 bits16(float v) {
    return OUT == 1 ? bf16_bits(v) : f16_bits(v);
}

template <int OUT>
DEVI void store1(void* out, i64 e, float v) {
    if (OUT == 0)
        ((float*)out)[e] = v;
    else
        ((u16*)out)[e] = (u16)bits16<OUT>(v);
}

// Eight consecutive outputs from element e (16-byte aligned: e is a multiple of 8 and the
// caller checked the base pointer).
template <int OUT>
DEVI void store8(void* out, i64 e, const float v[8]) {
    if (OUT == 0) {
        float4* p = (float4*)((float*)out + e);
        p[0] = make_float4(v[0], v[1], v[2], v[3]);
        p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = bits16<OUT>(v[2 * i]) | (bits16<OUT>(v[2 * i + 1]) << 16);
        *(uint4*)((u16*)out + e) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// Per-block scales. Plain: `absmax`; double quantization: the other four fields.
struct Stats {
    const float* absmax;
    const u8* absmax_q;
    const float* nested_absmax;
    const float* nested_code;
    float offset;
    int log2_nested;
};

// The f32 scale of block b. EXACT: bit for bit as `QuantState::absmax_f32` computes it (the
// dequantization); otherwise plain f32 arithmetic (the GEMV, which only needs accuracy).
template <bool DQ, bool EXACT>
DEVI float block_absmax(const Stats& s, i64 b) {
    if (!DQ) return __ldg(s.absmax + b);
    const float c = __ldg(s.nested_code + __ldg(s.absmax_q + b)), n = __ldg(s.nested_absmax + (b >> s.log2_nested));
    return EXACT ? add_cpu(ftz(mul_cpu(c, n)), s.offset) : __fadd_rn(ftz(__fmul_rn(c, n)), s.offset);
}

// The 16-entry dequantization table (`codebook::dequant_table`, uploaded with the weight) in
// shared memory: 16 words in 16 banks, so a warp's lookups never conflict.
DEVI void load_lut(float* lut, const float* lut_g) {
    if (threadIdx.x < 16) lut[threadIdx.x] = lut_g[threadIdx.x];
    __syncthreads();
}

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

// Rows per thread group: each x chunk a lane loads serves this many rows.
constexpr int ROWS = 4;

// x[i..i+8] as f32 (i a multiple of 8; x 16-byte aligned).
template <bool XBF16>
DEVI void load_x8(const void* x, int i, float v[8]) {
    if (XBF16) {
        const uint4 u = __ldg((const uint4*)((const u16*)x + i));
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            v[2 * j] = __uint_as_float(w[j] << 16);
            v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else {
        const float4* p = (const float4*)((const float*)x + i);
        const float4 a = __ldg(p), b = __ldg(p + 1);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

template <bool XBF16>
DEVI float load_x1(const void* x, int i) {
    return XBF16 ? __uint_as_float((u32)__ldg((const u16*)x + i) << 16) : __ldg((const float*)x + i);
}

// The table entry at byte offset `off` (a nibble times 4).
DEVI float lut_at(const float* lut, u32 off) { return *(const float*)((const char*)lut + off); }

// y[r] = sum_i W[r, i] x[i] for cols % 32 == 0 (16-byte aligned rows of codes). A group of
// LANES threads owns ROWS consecutive rows; lane l takes the 32-element chunks l, l + LANES, ...
// of all ROWS rows (one 16-byte code load per row per chunk, x loaded once per chunk), the next
// chunk's codes and scales prefetched while this one is summed. Per chunk the sum is
// absmax * sum(lut[code] * x), then the group reduces with shuffles. f32 accumulation; y in
// x's dtype.
template <int LANES, bool DQ, bool XBF16>
DEVI void gemv4(const u8* __restrict__ packed, const float* __restrict__ lut_g, Stats st, int log2_bs, int rows,
                int cols, const void* __restrict__ x, void* __restrict__ y) {
    __shared__ float lut[16];
    load_lut(lut, lut_g);
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = t % LANES;
    const int r0 = (t / LANES) * ROWS;
    const int nchunks = cols / 32;
    // Rows past the end repeat the last row (loads stay in bounds, every lane reaches the
    // shuffles); their results are not stored.
    i64 base[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) base[i] = (i64)min(r0 + i, rows - 1) * cols;

    // Codes and scales of chunk cc of every row, into wn / an.
    uint4 wn[ROWS];
    float an[ROWS];
    auto fetch = [&](int cc) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const i64 e = base[i] + (i64)cc * 32;
            wn[i] = __ldg((const uint4*)(packed + (e >> 1)));
            an[i] = block_absmax<DQ, false>(st, e >> log2_bs);
        }
    };
    float acc[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;
    int c = lane;
    if (c < nchunks) fetch(c);
    while (c < nchunks) {
        uint4 w[ROWS];
        float a[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) w[i] = wn[i], a[i] = an[i];
        const int cn = c + LANES;
        if (cn < nchunks) fetch(cn);
        float s[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) s[i] = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float xv[8];
            load_x8<XBF16>(x, c * 32 + 8 * k, xv);
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const u32 word = k == 0 ? w[i].x : k == 1 ? w[i].y : k == 2 ? w[i].z : w[i].w;
                // Byte j of `hi` / `lo`: 4 * (high / low nibble of byte j), a table offset.
                const u32 hi = (word >> 2) & 0x3c3c3c3cu, lo = (word << 2) & 0x3c3c3c3cu;
#pragma unroll
                for (int j = 0; j < 4; ++j) {  // byte j, zero-extended: one PRMT
                    s[i] = fmaf(lut_at(lut, __byte_perm(hi, 0, 0x4440 + j)), xv[2 * j], s[i]);
                    s[i] = fmaf(lut_at(lut, __byte_perm(lo, 0, 0x4440 + j)), xv[2 * j + 1], s[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < ROWS; ++i) acc[i] = fmaf(a[i], s[i], acc[i]);
        c = cn;
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    }
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
            if (r0 + i < rows) store1<XBF16 ? 1 : 0>(y, r0 + i, acc[i]);
    }
}

// Any shape or alignment: one warp per row, one element per lane step.
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
