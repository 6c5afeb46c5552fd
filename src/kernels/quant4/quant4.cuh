// Device code shared by quant4.cu and decode.cu: the bnb 4-bit layout (see quant4.cu), its
// bit-exact scale and rounding helpers, and the inner loop of the batch-1 4-bit GEMV.

#pragma once

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

// A 4-bit weight as the GEMV kernels read it: codes, scales, the table in global memory (each
// kernel copies it to shared memory first), log2 of the blocksize.
struct Q4 {
    const u8* packed;
    const float* lut;
    Stats st;
    int log2_bs;
};

// x in global memory (f32 or bf16, 16-byte aligned): piece k (8 values) of 32-element chunk c.
template <bool XBF16>
struct XGlobal {
    const void* p;
    DEVI void load8(int c, int k, float v[8]) const { load_x8<XBF16>(p, c * 32 + 8 * k, v); }
};

// The batch-1 GEMV's inner loop for the ROWS rows a group of LANES threads owns, cols % 32 == 0
// (16-byte aligned rows of codes): acc[i] = sum_c W_i[c] x[c], reduced over the group (every
// lane gets the sums). Lane l takes the 32-element chunks l, l + LANES, ... of all rows (one
// 16-byte code load per row per chunk, x loaded once per chunk for all rows), the next chunk's
// codes and scales prefetched while this one is summed. Per chunk the sum is
// absmax * sum(lut[code] * x). Rows 0 .. ROWS/2-1 come from weight `lo` (table `lut_lo` in
// shared memory), the others from `hi` (the same weight for a plain GEMV); row i starts at
// element base[i] of its weight. `prologue` (block-wide work x and the tables depend on, such as
// a norm into shared memory) runs once the first codes are on their way. Every lane of the block
// must call this (shuffles, and the prologue's barriers).
struct NoPrologue {
    DEVI void operator()() const {}
};

template <int LANES, bool DQ, class X, class P = NoPrologue>
DEVI void gemv4_rows(const Q4& lo, const Q4& hi, const float* lut_lo, const float* lut_hi, const i64 base[ROWS],
                     int lane, int nchunks, const X& x, float acc[ROWS], const P& prologue = P()) {
    // Codes and scales of chunk cc of every row, into wn / an.
    uint4 wn[ROWS];
    float an[ROWS];
    auto fetch = [&](int cc) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const Q4& w = i < ROWS / 2 ? lo : hi;
            const i64 e = base[i] + (i64)cc * 32;
            wn[i] = __ldg((const uint4*)(w.packed + (e >> 1)));
            an[i] = block_absmax<DQ, false>(w.st, e >> w.log2_bs);
        }
    };
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;
    int c = lane;
    if (c < nchunks) fetch(c);
    prologue();
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
            x.load8(c, k, xv);
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const float* lut = i < ROWS / 2 ? lut_lo : lut_hi;
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
}

}  // namespace
