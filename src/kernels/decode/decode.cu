// Batch-1 greedy decoding with 4-bit weights in a few fused kernels per layer (launches and
// argument order in src/kernels/decode/cuda.rs; the step that chains them in
// src/model/llama/decode_cuda.rs). Per layer:
//   qkv:      RMSNorm(x) -> q, k, v projections -> RoPE on q, k -> q out, k, v into the cache at pos
//   attn:     softmax(q k^T / sqrt(d)) v over the pos + 1 cached positions, grouped-query
//   residual: x += W_o attn
//   gate_up:  RMSNorm(x) -> silu(W_gate x) * (W_up x)
//   residual: x += W_down h
// The position is read from device memory (`posp`), not passed by value: a captured CUDA graph of
// the step replays unchanged at every position.
// Activations are f32 or bf16 (BF = true: raw bf16 bits, rounded to nearest even like the
// `half` crate); every sum and statistic is f32. The results are rounded to the activation dtype
// where the generic path (candle ops) rounds them, so both paths agree to rounding noise.
// The 4-bit GEMV is quant4.cuh's gemv4_rows; the norms are computed by every block into shared
// memory (one launch fewer per norm; x is a few KB).

#include "../quant4/quant4.cuh"
#include "../reduce.cuh"

namespace {

// A 4-bit weight [rows, cols] as passed from Rust (decode/cuda.rs::W4Arg, same layout).
struct W4 {
    Q4 q;
    int rows;
    int cols;
};
static_assert(sizeof(W4) == 72 && offsetof(W4, q.st.offset) == 48 && offsetof(W4, q.log2_bs) == 56 &&
                  offsetof(W4, rows) == 64,
              "W4 mirrors decode/cuda.rs::W4Arg");

template <bool BF>
DEVI float ld(const void* p, i64 i) {
    return BF ? __uint_as_float((u32)((const u16*)p)[i] << 16) : ((const float*)p)[i];
}

template <bool BF>
DEVI void st(void* p, i64 i, float v) {
    if (BF)
        ((u16*)p)[i] = (u16)bf16_bits(v);
    else
        ((float*)p)[i] = v;
}

// v rounded to the activation dtype.
template <bool BF>
DEVI float rt(float v) {
    return BF ? __uint_as_float(bf16_bits(v) << 16) : v;
}

// The normed row x̂ = rt(x · rsqrt(mean(x²) + eps) · w) (as candle's rms_norm in f32, then the
// dtype) in shared memory, f32, laid out for XShared: piece k of chunk c at (k·nchunks + c)·8,
// so the lanes of a group, reading consecutive chunks, read consecutive words.
extern __shared__ float4 xs_dyn[];  // float4: 16-byte aligned for XShared's loads

// Chunks of 8 a thread of the vectorised norm holds in registers (x read once, 16-byte loads).
constexpr int NORM_REGS = 4;

template <bool BF>
DEVI void norm_to_shared(const void* x, const void* w, int cols, float eps, float* xs) {
    const int nchunks = cols / 32;
    // bf16 rows in 16-byte pieces, at most NORM_REGS per thread: every load of x and w is issued
    // at once (one memory round trip per block, where the scalar loop below takes one per
    // iteration, twice: with 1024 blocks of 3072 inputs that was most of a 3B layer's GEMV).
    if (BF && cols % 8 == 0 && ((unsigned long long)x | (unsigned long long)w) % 16 == 0 &&
        cols / 8 <= NORM_REGS * (int)blockDim.x) {
        uint4 xv[NORM_REGS], wv[NORM_REGS];
#pragma unroll
        for (int k = 0; k < NORM_REGS; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < cols / 8) xv[k] = __ldg((const uint4*)x + c), wv[k] = __ldg((const uint4*)w + c);
        }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_REGS; ++k) {
            if (threadIdx.x + k * blockDim.x >= cols / 8) break;
            const u32 q[4] = {xv[k].x, xv[k].y, xv[k].z, xv[k].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float a = __uint_as_float(q[j] << 16), b = __uint_as_float(q[j] & 0xffff0000u);
                ss += a * a;
                ss += b * b;
            }
        }
        const float r = rsqrtf(block_reduce<false>(ss) / cols + eps);
#pragma unroll
        for (int k = 0; k < NORM_REGS; ++k) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c >= cols / 8) break;
            const u32 q[4] = {xv[k].x, xv[k].y, xv[k].z, xv[k].w}, g[4] = {wv[k].x, wv[k].y, wv[k].z, wv[k].w};
            // Elements 8c .. 8c+7: piece (c & 3) of chunk c >> 2 in XShared's layout.
            float* dst = xs + ((c & 3) * nchunks + (c >> 2)) * 8;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                dst[2 * j] = rt<BF>(__uint_as_float(q[j] << 16) * r * __uint_as_float(g[j] << 16));
                dst[2 * j + 1] = rt<BF>(__uint_as_float(q[j] & 0xffff0000u) * r * __uint_as_float(g[j] & 0xffff0000u));
            }
        }
        __syncthreads();
        return;
    }
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = ld<BF>(x, i);
        ss += v * v;
    }
    const float r = rsqrtf(block_reduce<false>(ss) / cols + eps);
#pragma unroll 4
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        xs[(((i >> 3) & 3) * nchunks + (i >> 5)) * 8 + (i & 7)] = rt<BF>(ld<BF>(x, i) * r * ld<BF>(w, i));
    __syncthreads();
}

struct XShared {
    const float* p;
    int nchunks;
    DEVI void load8(int c, int k, float v[8]) const {
        const float4* q = (const float4*)(p + (k * nchunks + c) * 8);
        const float4 a = q[0], b = q[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
};

// --------------------------------------------------------------------------------- q, k, v

// One launch for the three projections of x̂ (all [*, cols]), LANES threads per group of 4 rows.
// A q/k group owns rows (j, j+1, j+d/2, j+d/2+1) of one head, the pairs RoPE rotates together
// (HF's rotate_half layout; cos/sin tables [positions, d/2]), so the rotation happens in the
// epilogue; a v group owns 4 consecutive rows. q goes to q_out [heads·d]; k and v to the
// caches [kv_heads, cap, d] at position pos.
template <int LANES, bool DQ, bool BF>
DEVI void qkv_rope(const W4& wq, const W4& wk, const W4& wv, const void* x, const void* norm_w, float eps,
                   const void* cos, const void* sin, int pos, int d, int cap, void* q_out, void* k_cache,
                   void* v_cache) {
    __shared__ float lut[48];
    float* xs = (float*)xs_dyn;
    const int cols = wq.cols;
    const int gq = wq.rows / 4, gk = wk.rows / 4, groups = gq + gk + wv.rows / 4;
    const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = t % LANES;
    // Threads past the last group redo it (every lane reaches the shuffles), storing nothing.
    const bool live = t / LANES < groups;
    const int g = min(t / LANES, groups - 1);
    const int which = g < gq ? 0 : g < gq + gk ? 1 : 2;
    const int gl = g - (which == 0 ? 0 : which == 1 ? gq : gq + gk);
    const W4 w = which == 0 ? wq : which == 1 ? wk : wv;
    const int half = d / 2;
    int row[4];
    if (which < 2) {
        const int r = (gl / (d / 4)) * d + (gl % (d / 4)) * 2;
        row[0] = r, row[1] = r + 1, row[2] = r + half, row[3] = r + half + 1;
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) row[i] = 4 * gl + i;
    }
    i64 base[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) base[i] = (i64)row[i] * cols;
    float acc[ROWS];
    const float* l = lut + 16 * which;
    gemv4_rows<LANES, DQ>(w.q, w.q, l, l, base, lane, cols / 32, XShared{xs, cols / 32}, acc, [&] {
        for (int i = threadIdx.x; i < 48; i += blockDim.x) lut[i] = (i < 16 ? wq : i < 32 ? wk : wv).q.lut[i & 15];
        norm_to_shared<BF>(x, norm_w, cols, eps, xs);  // ends with a barrier: lut is ready too
    });
    if (lane != 0 || !live) return;

    float a[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) a[i] = rt<BF>(acc[i]);  // the projection's output dtype
    if (which == 2) {
#pragma unroll
        for (int i = 0; i < ROWS; ++i) st<BF>(v_cache, ((i64)(row[i] / d) * cap + pos) * d + row[i] % d, a[i]);
        return;
    }
    const int head = row[0] / d, j = row[0] % d;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        const float c = ld<BF>(cos, (i64)pos * half + j + p), s = ld<BF>(sin, (i64)pos * half + j + p);
        const float lo = a[p] * c - a[p + 2] * s, hi = a[p + 2] * c + a[p] * s;
        if (which == 0) {
            st<BF>(q_out, (i64)head * d + j + p, lo);
            st<BF>(q_out, (i64)head * d + j + p + half, hi);
        } else {
            const i64 at = ((i64)head * cap + pos) * d;
            st<BF>(k_cache, at + j + p, lo);
            st<BF>(k_cache, at + j + p + half, hi);
        }
    }
}

// ------------------------------------------------------------------------------- attention

constexpr int ATT_WARPS = 8;  // warps per block (one block per query head)
constexpr int ATT_U = 4;      // positions a warp has in flight per step

// out[head] = softmax(q[head] · K^T / sqrt(d)) V over positions 0..len-1 of the head's KV head
// (head / rep), d = 32·E. Lane l holds elements l·E .. l·E+E-1 of the vectors. Warp w takes
// positions in runs of ATT_U (w·ATT_U + ATT_WARPS·ATT_U·n + u) with an online softmax (running
// max m, sum l, weighted sum acc, all f32); the warps' partial results merge at the end.
template <int E, bool BF>
DEVI void attention(const void* q, const void* k_cache, const void* v_cache, void* out, int cap, int len, int rep,
                    float scale) {
    constexpr int D = 32 * E;
    __shared__ float ms[ATT_WARPS], ls[ATT_WARPS], accs[ATT_WARPS * D];
    const int head = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) qv[e] = ld<BF>(q, (i64)head * D + lane * E + e) * scale;
    const i64 hb = (i64)(head / rep) * cap * D + lane * E;
    float m = -INFINITY, l = 0.0f, acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.0f;
    for (int j0 = warp * ATT_U; j0 < len; j0 += ATT_WARPS * ATT_U) {
        float kv[ATT_U][E], vv[ATT_U][E], s[ATT_U];
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            const bool in = j0 + u < len;
            const i64 at = hb + (i64)(j0 + u) * D;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                kv[u][e] = in ? ld<BF>(k_cache, at + e) : 0.0f;
                vv[u][e] = in ? ld<BF>(v_cache, at + e) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            s[u] = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) s[u] = fmaf(qv[e], kv[u][e], s[u]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
            for (int u = 0; u < ATT_U; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            if (j0 + u >= len) s[u] = -INFINITY;
            mn = fmaxf(mn, s[u]);
        }
        const float c = expf(m - mn);  // 0 on the first step (m = -inf; mn is finite: j0 < len)
        l *= c;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= c;
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            const float p = expf(s[u] - mn);
            l += p;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] = fmaf(p, vv[u][e], acc[e]);
        }
        m = mn;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) accs[warp * D + lane * E + e] = acc[e];
    if (lane == 0) ms[warp] = m, ls[warp] = l;
    __syncthreads();
    // A warp that had no position has m = -inf, l = 0, acc = 0: its weight below is 0.
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, ms[w]);
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) sum += ls[w] * expf(ms[w] - mx);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) o += accs[w * D + i] * expf(ms[w] - mx);
        st<BF>(out, (i64)head * D + i, o / sum);
    }
}

// ------------------------------------------------------------------------- output GEMVs

// x += W h (o_proj, down_proj: the residual added in the epilogue), groups of 4 rows.
template <int LANES, bool DQ, bool BF>
DEVI void residual(const W4& w, const void* h, void* x) {
    __shared__ float lut[16];
    load_lut(lut, w.q.lut);
    const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = t % LANES, r0 = (t / LANES) * ROWS;
    i64 base[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) base[i] = (i64)min(r0 + i, w.rows - 1) * w.cols;
    float acc[ROWS];
    gemv4_rows<LANES, DQ>(w.q, w.q, lut, lut, base, lane, w.cols / 32, XGlobal<BF>{h}, acc);
    if (lane != 0) return;
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
        if (r0 + i < w.rows) st<BF>(x, r0 + i, ld<BF>(x, r0 + i) + rt<BF>(acc[i]));
}

// h = silu(W_gate x̂) · (W_up x̂), x̂ = RMSNorm(x): a group owns rows r, r+1 of both weights.
template <int LANES, bool DQ, bool BF>
DEVI void gate_up(const W4& wg, const W4& wu, const void* x, const void* norm_w, float eps, void* h) {
    __shared__ float lut[32];
    const int cols = wg.cols, rows = wg.rows;
    float* xs = (float*)xs_dyn;
    const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = t % LANES, r0 = (t / LANES) * 2;
    i64 base[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) base[i] = (i64)min(r0 + i % 2, rows - 1) * cols;
    float acc[ROWS];
    gemv4_rows<LANES, DQ>(wg.q, wu.q, lut, lut + 16, base, lane, cols / 32, XShared{xs, cols / 32}, acc, [&] {
        for (int i = threadIdx.x; i < 32; i += blockDim.x) lut[i] = (i < 16 ? wg : wu).q.lut[i & 15];
        norm_to_shared<BF>(x, norm_w, cols, eps, xs);  // ends with a barrier: lut is ready too
    });
    if (lane != 0) return;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        if (r0 + p >= rows) break;
        const float g = rt<BF>(acc[p]), u = rt<BF>(acc[p + 2]);
        st<BF>(h, r0 + p, rt<BF>(g / (1.0f + expf(-g))) * u);
    }
}

}  // namespace

// ------------------------------------------------------------------------- entry points
// Names: dec_<kernel>_<f32|bf16>[_<plain|dq>_l<LANES>] (scales plain f32 or double-quantized).

#define DEC_GEMVS(T, BF, DQNAME, DQ, LANES)                                                                     \
    extern "C" __global__ void dec_qkv_##T##_##DQNAME##_l##LANES(W4 wq, W4 wk, W4 wv, const void* x,            \
                                                                 const void* norm_w, float eps, const void* cos, \
                                                                 const void* sin, const u32* posp, int d,        \
                                                                 int cap, void* q_out, void* k_cache,            \
                                                                 void* v_cache) {                                \
        qkv_rope<LANES, DQ, BF>(wq, wk, wv, x, norm_w, eps, cos, sin, (int)*posp, d, cap, q_out, k_cache, v_cache); \
    }                                                                                                            \
    extern "C" __global__ void dec_residual_##T##_##DQNAME##_l##LANES(W4 w, const void* h, void* x) {           \
        residual<LANES, DQ, BF>(w, h, x);                                                                        \
    }                                                                                                            \
    extern "C" __global__ void dec_gate_up_##T##_##DQNAME##_l##LANES(W4 wg, W4 wu, const void* x,               \
                                                                     const void* norm_w, float eps, void* h) {   \
        gate_up<LANES, DQ, BF>(wg, wu, x, norm_w, eps, h);                                                       \
    }
#define DEC_LANES(T, BF, DQNAME, DQ)    \
    DEC_GEMVS(T, BF, DQNAME, DQ, 8)     \
    DEC_GEMVS(T, BF, DQNAME, DQ, 16)    \
    DEC_GEMVS(T, BF, DQNAME, DQ, 32)
DEC_LANES(f32, false, plain, false)
DEC_LANES(f32, false, dq, true)
DEC_LANES(bf16, true, plain, false)
DEC_LANES(bf16, true, dq, true)

#define DEC_ATTN(T, BF, D)                                                                                    \
    extern "C" __global__ void dec_attn_##T##_d##D(const void* q, const void* k_cache, const void* v_cache,  \
                                                   void* out, int cap, const u32* posp, int rep, float scale) { \
        attention<D / 32, BF>(q, k_cache, v_cache, out, cap, (int)*posp + 1, rep, scale);                      \
    }
DEC_ATTN(f32, false, 32)
DEC_ATTN(f32, false, 64)
DEC_ATTN(f32, false, 128)
DEC_ATTN(f32, false, 256)
DEC_ATTN(bf16, true, 32)
DEC_ATTN(bf16, true, 64)
DEC_ATTN(bf16, true, 128)
DEC_ATTN(bf16, true, 256)
