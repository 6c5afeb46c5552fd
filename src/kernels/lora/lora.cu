// The rank-r side of a LoRA linear on CUDA: the big `x Wᵀ` / `dy W` products stay in cuBLAS,
// these three kernels do everything else of the adapter, each in one pass over the large
// operand, the dropout mask regenerated from its hash where it applies (never stored):
//
//   project:  U[i, r] = scale · Σ_k drop(X)[i, k] · W(r, k)         u = drop(x)Aᵀ, du = s·dy B
//   expand:   O[i, j] = Y[i, j] + scale · mask(i, j) · Σ_r U[i, r] · V(j, r)
//                                                        y += s·u Bᵀ, dx += mask ⊙ (du A)
//   grad:     G[s, r, k] = scale · Σ_{i ∈ split s} U[i, r] · drop(X)[i, k]
//                                                        dA = duᵀ drop(x), dBᵀ = s·uᵀ dy
//
// The candle formulation took about eight passes per adapter (a stored mask, x·mask, separate
// scales and adds). Arithmetic is f32 whatever the storage type. `R` is the compiled rank (8, 16
// or 32); a smaller actual rank `r` pads with zeros. W(q, k) is W[q·K + k] (A) or, with `wt`,
// W[k·r + q] (B read as Bᵀ); V likewise with `vt`.

#include <cuda_bf16.h>

#include "dropout.cuh"

namespace {

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

struct Mask {
    unsigned k1, k2, thr;
    float scale;
    int on;
    __device__ __forceinline__ float at(long long e) const { return on ? keep(e, k1, k2, thr, scale) : 1.0f; }
};

constexpr int KC = 256;  // k per chunk in `project`: 8 consecutive elements per lane
constexpr int PW = 16;   // warps per block in `project`, 2 rows each: 32 rows a block

// Eight consecutive elements from e as f32: one 16-byte load when `vec` (e a multiple of 8 in a
// 16-byte aligned buffer), else element by element up to `left`.
__device__ __forceinline__ void load8(const float* p, long long e, int left, bool vec, float v[8]) {
    if (vec && left >= 8) {
        float4 a = *(const float4*)(p + e), b = *(const float4*)(p + e + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; t++) v[t] = t < left ? p[e + t] : 0.0f;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, long long e, int left, bool vec, float v[8]) {
    if (vec && left >= 8) {
        uint4 q = *(const uint4*)(p + e);
        unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int t = 0; t < 4; t++) {
            v[2 * t] = __uint_as_float(w[t] << 16);
            v[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u);
        }
        return;
    }
#pragma unroll
    for (int t = 0; t < 8; t++) v[t] = t < left ? __bfloat162float(p[e + t]) : 0.0f;
}

// Eight consecutive x values from k0 of each of the RPW rows from row0 (zeros outside x).
template <typename T, int RPW>
__device__ __forceinline__ void fetch_rows(const T* __restrict__ x, int row0, int n, int K, int k0, bool vec, float (&v)[RPW][8]) {
#pragma unroll
    for (int a = 0; a < RPW; a++) {
        int row = row0 + a;
        if (row < n && k0 < K) {
            load8(x, (long long)row * K + k0, K - k0, vec, v[a]);
        } else {
#pragma unroll
            for (int t = 0; t < 8; t++) v[a][t] = 0.0f;
        }
    }
}

// Each warp owns two rows; each lane 8 consecutive k of a 256-wide chunk (one 16-byte load per
// row), W's chunk staged in shared memory and reused by the block's 32 rows.
template <typename T, int R>
__device__ void project(const T* __restrict__ x, const T* __restrict__ w, int wt, Mask m, float scale, T* __restrict__ u, int n, int K, int r, int vec) {
    constexpr int RPW = 2;
    __shared__ __align__(16) float ws[R][KC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * PW + warp) * RPW;
    float acc[RPW][R];
#pragma unroll
    for (int a = 0; a < RPW; a++)
#pragma unroll
        for (int q = 0; q < R; q++) acc[a][q] = 0.0f;
    float xv[RPW][8];
    fetch_rows<T, RPW>(x, row0, n, K, lane * 8, vec != 0, xv);
    for (int kc = 0; kc < K; kc += KC) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < R * KC; idx += blockDim.x) {
            int q = idx / KC, j = idx % KC, k = kc + j;
            ws[q][j] = (q < r && k < K) ? ld(w, wt ? (long long)k * r + q : (long long)q * K + k) : 0.0f;
        }
        __syncthreads();
        // x of this chunk was fetched during the previous one; fetch the next chunk's now, so
        // its loads are in flight while this chunk's products run.
        float xn[RPW][8];
        fetch_rows<T, RPW>(x, row0, n, K, kc + KC + lane * 8, vec != 0, xn);
        if (m.on) {
#pragma unroll
            for (int a = 0; a < RPW; a++)
#pragma unroll
                for (int t = 0; t < 8; t++) xv[a][t] *= m.at((long long)(row0 + a) * K + kc + lane * 8 + t);
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            float4 w0 = *(const float4*)&ws[q][lane * 8], w1 = *(const float4*)&ws[q][lane * 8 + 4];
            float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
            for (int a = 0; a < RPW; a++)
#pragma unroll
                for (int t = 0; t < 8; t++) acc[a][q] += xv[a][t] * wv[t];
        }
#pragma unroll
        for (int a = 0; a < RPW; a++)
#pragma unroll
            for (int t = 0; t < 8; t++) xv[a][t] = xn[a][t];
    }
#pragma unroll
    for (int a = 0; a < RPW; a++) {
        int row = row0 + a;
#pragma unroll
        for (int q = 0; q < R; q++) {
            float v = acc[a][q];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == q % 32 && q < r && row < n) st(u, (long long)row * r + q, v * scale);
        }
    }
}

constexpr int ER = 32;  // rows per block in `expand`, one column per thread

template <typename T, int R>
__device__ void expand(const T* __restrict__ y, const T* __restrict__ u, const T* __restrict__ v, int vt, Mask m, float scale, T* __restrict__ out, int n, int M, int r) {
    __shared__ float us[ER][R];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int row0 = blockIdx.y * ER;
    for (int idx = threadIdx.x; idx < ER * R; idx += blockDim.x) {
        int a = idx / R, q = idx % R, row = row0 + a;
        us[a][q] = (q < r && row < n) ? ld(u, (long long)row * r + q) : 0.0f;
    }
    float vj[R];
#pragma unroll
    for (int q = 0; q < R; q++) vj[q] = (q < r && j < M) ? ld(v, vt ? (long long)q * M + j : (long long)j * r + q) : 0.0f;
    __syncthreads();
    if (j >= M) return;
    // Eight rows' loads issued before their sums, so that the loads overlap.
    for (int a0 = 0; a0 < ER; a0 += 8) {
        float yv[8];
#pragma unroll
        for (int t = 0; t < 8; t++) {
            int row = row0 + a0 + t;
            yv[t] = row < n ? ld(y, (long long)row * M + j) : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < 8; t++) {
            int row = row0 + a0 + t;
            if (row >= n) break;
            float s = 0.0f;
#pragma unroll
            for (int q = 0; q < R; q++) s += us[a0 + t][q] * vj[q];
            long long e = (long long)row * M + j;
            st(out, e, yv[t] + scale * m.at(e) * s);
        }
    }
}

constexpr int GR = 32;  // rows of U staged in shared memory at a time in `grad`

// One column k per thread, the rows of one split; partial sums per split (summed by the caller,
// so the result does not depend on scheduling).
template <typename T, int R>
__device__ void grad(const T* __restrict__ u, const T* __restrict__ x, Mask m, float scale, float* __restrict__ g, int n, int K, int r, int rows_per_split) {
    __shared__ float us[GR][R];
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    const int lo = s * rows_per_split, hi = min(n, lo + rows_per_split);
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; q++) acc[q] = 0.0f;
    for (int base = lo; base < hi; base += GR) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < GR * R; idx += blockDim.x) {
            int a = idx / R, q = idx % R, row = base + a;
            us[a][q] = (q < r && row < hi) ? ld(u, (long long)row * r + q) : 0.0f;
        }
        __syncthreads();
        if (k < K) {
            // Eight rows' loads issued before their products (rows past the split have zero U).
            int rows = min(GR, hi - base);
            for (int a0 = 0; a0 < rows; a0 += 8) {
                float xv[8];
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    long long e = (long long)(base + a0 + t) * K + k;
                    xv[t] = a0 + t < rows ? ld(x, e) * m.at(e) : 0.0f;
                }
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                    for (int q = 0; q < R; q++) acc[q] += us[a0 + t][q] * xv[t];
            }
        }
    }
    if (k >= K) return;
    // Unrolled with constant indices, so that acc stays in registers.
#pragma unroll
    for (int q = 0; q < R; q++)
        if (q < r) g[((long long)s * r + q) * K + k] = acc[q] * scale;
}


// ---- bf16 on tensor cores -------------------------------------------------------------------
// `project` and `grad` for bf16 with K a multiple of 8 and 16-byte aligned rows: mma.sync
// m16n8k16 (bf16 in, f32 accumulate), every operand fetched from global memory 16 bytes a lane
// (no shared-memory tile of x). The sums run over k in `project` and over rows in `grad`, so
// each lane may feed the MMA any k (or row) as long as both operands use the same one: the
// fragments below are permuted so that a lane's 16-byte load is its whole share of a fragment.
// Dropped elements are zeroed bitwise and the dropout scale applied once at the end.

struct alignas(16) Frag8 {  // eight bf16 as four b32 words (word t holds elements 2t, 2t+1)
    unsigned w[4];
};

__device__ __forceinline__ Frag8 ld8(const __nv_bfloat16* p, bool ok) {
    Frag8 f;
    if (ok) {
        uint4 q = __ldg((const uint4*)p);
        f.w[0] = q.x; f.w[1] = q.y; f.w[2] = q.z; f.w[3] = q.w;
    } else {
        f.w[0] = f.w[1] = f.w[2] = f.w[3] = 0u;
    }
    return f;
}

// Zero the dropped ones of the eight elements from flat index e.
__device__ __forceinline__ void drop8(Frag8& f, const Mask& m, long long e) {
#pragma unroll
    for (int t = 0; t < 4; t++) {
        unsigned lo = kept(e + 2 * t, m.k1, m.k2, m.thr) ? 0x0000ffffu : 0u;
        unsigned hi = kept(e + 2 * t + 1, m.k1, m.k2, m.thr) ? 0xffff0000u : 0u;
        f.w[t] &= lo | hi;
    }
}

// d += A·B for one m16n8k16 tile; a0..a3 and b0, b1 in the PTX fragment order.
__device__ __forceinline__ void mma_bf16(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

constexpr int TPW = 16;  // warps per block in `project_tc`, splitting K between them; 16 rows a block

// U[16 rows of this block, R] = scale · Σ_k drop(X)[i, k] · W[q, k], W `[r, K]` (B transposed by
// the caller). Lane (g, t) = (lane / 4, lane % 4) loads k ∈ [32·kb + 8t, +8) of rows g and g + 8
// and of W's rows g (+ 8·nt): that is two MMAs' k-slices (words 0-1 and 2-3) of one k-block.
// Each warp takes every TPW-th k-block; the warps' sums are added in shared memory, in order.
template <int R>
__device__ void project_tc(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, Mask m, float scale,
                           __nv_bfloat16* __restrict__ u, int n, int K, int r) {
    constexpr int NT = R / 8;
    __shared__ float red[TPW][16][R + 1];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16, ra = row0 + g, rb = ra + 8;
    const int nkb = (K + 31) / 32;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    // Two k-blocks in flight: this one's operands arrive while the previous one multiplies.
    Frag8 xa, xb, wv[NT];
    auto fetch = [&](int kb, Frag8& fa, Frag8& fb, Frag8 (&fw)[NT]) {
        const int k = kb * 32 + t * 8;
        const bool in = kb < nkb && k < K;
        fa = ld8(x + (long long)ra * K + k, in && ra < n);
        fb = ld8(x + (long long)rb * K + k, in && rb < n);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) fw[nt] = ld8(w + (long long)(nt * 8 + g) * K + k, in && nt * 8 + g < r);
    };
    fetch(warp, xa, xb, wv);
    for (int kb = warp; kb < nkb; kb += TPW) {
        Frag8 na, nb, nw[NT];
        fetch(kb + TPW, na, nb, nw);
        if (m.on) {
            const int k = kb * 32 + t * 8;
            drop8(xa, m, (long long)ra * K + k);
            drop8(xb, m, (long long)rb * K + k);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            mma_bf16(acc[nt], xa.w[0], xb.w[0], xa.w[1], xb.w[1], wv[nt].w[0], wv[nt].w[1]);
            mma_bf16(acc[nt], xa.w[2], xb.w[2], xa.w[3], xb.w[3], wv[nt].w[2], wv[nt].w[3]);
        }
        xa = na;
        xb = nb;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) wv[nt] = nw[nt];
    }
    // C fragment: (row g, cols 2t, 2t+1) and (row g + 8, the same cols) of each 8-column tile.
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int q = nt * 8 + 2 * t;
        red[warp][g][q] = acc[nt][0];
        red[warp][g][q + 1] = acc[nt][1];
        red[warp][g + 8][q] = acc[nt][2];
        red[warp][g + 8][q + 1] = acc[nt][3];
    }
    __syncthreads();
    const float s = scale * (m.on ? m.scale : 1.0f);
    for (int idx = threadIdx.x; idx < 16 * R; idx += blockDim.x) {
        const int i = idx / R, q = idx % R, row = row0 + i;
        float v = 0.0f;
#pragma unroll
        for (int wi = 0; wi < TPW; wi++) v += red[wi][i][q];
        if (q < r && row < n) u[(long long)row * r + q] = __float2bfloat16_rn(v * s);
    }
}

constexpr int GTW = 4;    // warps per block in `grad_tc`, 64 columns each
constexpr int GTR = 256;  // rows of U staged in shared memory at a time
constexpr int GTD = 2;    // 16-row steps whose loads are in flight together


// G[s, q, k] = scale · Σ_{i ∈ split s} U[i, q] · drop(X)[i, k] for 64 columns per warp. As an
// MMA, M is k, N is q and the sum runs over rows i. Lane (g, t) loads 16 bytes, columns
// c = 8g .. 8g + 7 of the warp's 64, from each of rows 4t .. 4t + 3 of a 16-row step; column
// pair (c + 2j, c + 2j + 1) is then M-rows (g, g + 8) of M-tile j, and rows (4t, 4t + 1) and
// (4t + 2, 4t + 3) are its k-slices (a byte permute pairs them up). U is staged transposed so
// that a lane's B fragment is one 8-byte load.
template <int R>
__device__ void grad_tc(const __nv_bfloat16* __restrict__ u, const __nv_bfloat16* __restrict__ x, Mask m, float scale, float* __restrict__ gout,
                        int n, int K, int r, int rows_per_split) {
    constexpr int NT = R / 8;
    constexpr int US = GTR + 16;  // row stride: 8-byte loads of a half-warp hit distinct banks
    __shared__ __align__(16) __nv_bfloat16 us[R][US];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int c = (blockIdx.x * GTW + warp) * 64 + g * 8;
    const int s = blockIdx.y, lo = s * rows_per_split, hi = min(n, lo + rows_per_split);
    const bool col_in = c < K;
    float acc[4][NT][4];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[j][nt][0] = acc[j][nt][1] = acc[j][nt][2] = acc[j][nt][3] = 0.0f;
    for (int base = lo; base < hi; base += GTR) {
        const int rows = min(GTR, hi - base);
        __syncthreads();
        for (int idx = threadIdx.x; idx < GTR * R; idx += blockDim.x) {
            const int i = idx / R, q = idx % R;
            us[q][i] = (q < r && i < rows) ? u[(long long)(base + i) * r + q] : __float2bfloat16_rn(0.0f);
        }
        __syncthreads();
        auto fetch = [&](int i0, Frag8 (&f)[GTD][4]) {
#pragma unroll
            for (int d = 0; d < GTD; d++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int i = i0 + 16 * d + 4 * t + j;
                    f[d][j] = ld8(x + (long long)(base + i) * K + c, col_in && i < rows);
                }
        };
        Frag8 cur[GTD][4];
        fetch(0, cur);
        for (int i0 = 0; i0 < rows; i0 += 16 * GTD) {
            Frag8 nxt[GTD][4];
            fetch(i0 + 16 * GTD, nxt);
#pragma unroll
            for (int d = 0; d < GTD; d++) {
                const int ib = i0 + 16 * d;
                if (m.on) {
#pragma unroll
                    for (int j = 0; j < 4; j++) drop8(cur[d][j], m, (long long)(base + ib + 4 * t + j) * K + c);
                }
                unsigned b[NT][2];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const uint2 v = *(const uint2*)&us[nt * 8 + g][ib + 4 * t];
                    b[nt][0] = v.x;
                    b[nt][1] = v.y;
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const unsigned a0 = __byte_perm(cur[d][0].w[j], cur[d][1].w[j], 0x5410);
                    const unsigned a1 = __byte_perm(cur[d][0].w[j], cur[d][1].w[j], 0x7632);
                    const unsigned a2 = __byte_perm(cur[d][2].w[j], cur[d][3].w[j], 0x5410);
                    const unsigned a3 = __byte_perm(cur[d][2].w[j], cur[d][3].w[j], 0x7632);
#pragma unroll
                    for (int nt = 0; nt < NT; nt++) mma_bf16(acc[j][nt], a0, a1, a2, a3, b[nt][0], b[nt][1]);
                }
            }
#pragma unroll
            for (int d = 0; d < GTD; d++)
#pragma unroll
                for (int j = 0; j < 4; j++) cur[d][j] = nxt[d][j];
        }
    }
    if (!col_in) return;
    // acc[j][nt] = (k c+2j, q 2t), (c+2j, 2t+1), (c+2j+1, 2t), (c+2j+1, 2t+1) of tile nt: each q
    // gets the eight consecutive k from c.
    const float sc = scale * (m.on ? m.scale : 1.0f);
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int q = nt * 8 + 2 * t + h;
            if (q >= r) continue;
            float4* o = (float4*)(gout + ((long long)s * r + q) * K + c);
            o[0] = make_float4(acc[0][nt][h] * sc, acc[0][nt][2 + h] * sc, acc[1][nt][h] * sc, acc[1][nt][2 + h] * sc);
            o[1] = make_float4(acc[2][nt][h] * sc, acc[2][nt][2 + h] * sc, acc[3][nt][h] * sc, acc[3][nt][2 + h] * sc);
        }
}

constexpr int ETW = 4;   // warps per block in `expand_tc`, 64 columns each
constexpr int ETR = 64;  // rows per block in `expand_tc`

// O = Y + scale · mask ⊙ (U Vᵀ) with the rank-R product on tensor cores (R = 16 or 32, rank
// padded with zeros): a warp keeps its 64 columns of V as B fragments and walks 16-row tiles.
// Each tile's product goes through shared memory so that Y and O move as 16-byte accesses of
// whole 128-byte rows (the accumulator layout would give 4-byte pieces of eight rows).
template <int R>
__device__ void expand_tc(const __nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ u, const __nv_bfloat16* __restrict__ v, int vt, Mask m,
                          float scale, __nv_bfloat16* __restrict__ out, int n, int M, int r) {
    constexpr int KS = R / 16;
    __shared__ __align__(16) float cs[ETW][16][64 + 4];
    const unsigned short* ub = (const unsigned short*)u;
    const unsigned short* vb = (const unsigned short*)v;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int j0 = (blockIdx.x * ETW + warp) * 64;
    const int lo = blockIdx.y * ETR, hi = min(n, lo + ETR);
    if (j0 >= M) return;
    auto vat = [&](int j, int q) -> unsigned { return (j < M && q < r) ? vb[vt ? (long long)q * M + j : (long long)j * r + q] : 0u; };
    auto uat = [&](int i, int q) -> unsigned { return (i < hi && q < r) ? ub[(long long)i * r + q] : 0u; };
    unsigned bv[8][KS][2];
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const int j = j0 + nt * 8 + g, q = ks * 16 + 2 * t;
            bv[nt][ks][0] = vat(j, q) | vat(j, q + 1) << 16;
            bv[nt][ks][1] = vat(j, q + 8) | vat(j, q + 9) << 16;
        }
    // In the epilogue lane (rr, cc) = (lane / 8, lane % 8) owns columns 8·cc .. 8·cc + 7 of rows
    // rr, rr + 4, rr + 8, rr + 12 of the tile.
    const int rr = lane >> 3, col = j0 + (lane & 7) * 8;
    const bool col_in = col < M;
    auto fetch = [&](int i0, uint4 (&f)[4]) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int row = i0 + rr + 4 * k;
            f[k] = (row < hi && col_in) ? __ldg((const uint4*)(y + (long long)row * M + col)) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    uint4 yv[4];
    fetch(lo, yv);
    for (int i0 = lo; i0 < hi; i0 += 16) {
        uint4 yn[4];
        fetch(i0 + 16, yn);  // the next tile's Y loads while this one multiplies and stores
        unsigned a[KS][4];
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const int q = ks * 16 + 2 * t, ra = i0 + g, rb = ra + 8;
            a[ks][0] = uat(ra, q) | uat(ra, q + 1) << 16;
            a[ks][1] = uat(rb, q) | uat(rb, q + 1) << 16;
            a[ks][2] = uat(ra, q + 8) | uat(ra, q + 9) << 16;
            a[ks][3] = uat(rb, q + 8) | uat(rb, q + 9) << 16;
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int ks = 0; ks < KS; ks++) mma_bf16(c, a[ks][0], a[ks][1], a[ks][2], a[ks][3], bv[nt][ks][0], bv[nt][ks][1]);
            *(float2*)&cs[warp][g][nt * 8 + 2 * t] = make_float2(c[0], c[1]);
            *(float2*)&cs[warp][g + 8][nt * 8 + 2 * t] = make_float2(c[2], c[3]);
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int rl = rr + 4 * k, row = i0 + rl;
            if (row >= hi || !col_in) continue;
            const float4 c0 = *(const float4*)&cs[warp][rl][(lane & 7) * 8], c1 = *(const float4*)&cs[warp][rl][(lane & 7) * 8 + 4];
            const float cv[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
            const unsigned w[4] = {yv[k].x, yv[k].y, yv[k].z, yv[k].w};
            const long long e = (long long)row * M + col;
            unsigned o[4];
#pragma unroll
            for (int p = 0; p < 4; p++) {
                const float y0 = __uint_as_float(w[p] << 16), y1 = __uint_as_float(w[p] & 0xffff0000u);
                __nv_bfloat162 b = __floats2bfloat162_rn(y0 + scale * m.at(e + 2 * p) * cv[2 * p], y1 + scale * m.at(e + 2 * p + 1) * cv[2 * p + 1]);
                o[p] = *reinterpret_cast<unsigned*>(&b);
            }
            *(uint4*)(out + e) = make_uint4(o[0], o[1], o[2], o[3]);
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < 4; k++) yv[k] = yn[k];
    }
}
}  // namespace

#define LORA_KERNELS(TN, T, R)                                                                                                           \
    extern "C" __global__ void __launch_bounds__(512) lora_project_##TN##_r##R(const T* x, const T* w, int wt, Mask m, float scale,      \
                                                                               T* u, int n, int K, int r, int vec) {                     \
        project<T, R>(x, w, wt, m, scale, u, n, K, r, vec);                                                                              \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) lora_expand_##TN##_r##R(const T* y, const T* u, const T* v, int vt, Mask m,        \
                                                                              float scale, T* out, int n, int M, int r) {                \
        expand<T, R>(y, u, v, vt, m, scale, out, n, M, r);                                                                               \
    }                                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) lora_grad_##TN##_r##R(const T* u, const T* x, Mask m, float scale, float* g, int n, \
                                                                            int K, int r, int rows_per_split) {                          \
        grad<T, R>(u, x, m, scale, g, n, K, r, rows_per_split);                                                                          \
    }

// B `[M, r]` as Bᵀ `[r, M]`, what `project_tc` takes for `du = s·dy B` (tiny; a kernel of its own
// because candle's strided copy uploads the layout on every call).
extern "C" __global__ void lora_transpose_bf16(const __nv_bfloat16* in, __nv_bfloat16* out, int M, int r) {
    const long long n = (long long)M * r;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long q = e / M, j = e % M;
        out[e] = in[j * r + q];
    }
}

// Sums grad's per-split partials `[splits, r, K]` in split order, into `[r, K]` or, with `tr`,
// `[K, r]` (dB is wanted as B's `[out, r]`).
extern "C" __global__ void lora_sum_splits(const float* p, float* out, int splits, int r, int K, int tr) {
    const long long rk = (long long)r * K;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < rk; e += (long long)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += p[s * rk + e];
        const long long q = e / K, k = e % K;
        out[tr ? k * r + q : e] = v;
    }
}

#define LORA_TC_KERNELS(R)                                                                                                         \
    extern "C" __global__ void __launch_bounds__(TPW * 32) lora_project_tc_r##R(const __nv_bfloat16* x, const __nv_bfloat16* w,   \
                                                                                 Mask m, float scale, __nv_bfloat16* u, int n,     \
                                                                                 int K, int r) {                                   \
        project_tc<R>(x, w, m, scale, u, n, K, r);                                                                                 \
    }                                                                                                                              \
    extern "C" __global__ void __launch_bounds__(GTW * 32) lora_grad_tc_r##R(const __nv_bfloat16* u, const __nv_bfloat16* x, Mask m, \
                                                                              float scale, float* g, int n, int K, int r,          \
                                                                              int rows_per_split) {                                \
        grad_tc<R>(u, x, m, scale, g, n, K, r, rows_per_split);                                                                    \
    }

LORA_TC_KERNELS(8)
LORA_TC_KERNELS(16)
LORA_TC_KERNELS(32)

#define LORA_EXPAND_TC(R)                                                                                                           \
    extern "C" __global__ void __launch_bounds__(ETW * 32) lora_expand_tc_r##R(const __nv_bfloat16* y, const __nv_bfloat16* u,      \
                                                                                const __nv_bfloat16* v, int vt, Mask m, float scale, \
                                                                                __nv_bfloat16* out, int n, int M, int r) {           \
        expand_tc<R>(y, u, v, vt, m, scale, out, n, M, r);                                                                          \
    }

LORA_EXPAND_TC(16)
LORA_EXPAND_TC(32)

LORA_KERNELS(f32, float, 8)
LORA_KERNELS(f32, float, 16)
LORA_KERNELS(f32, float, 32)
LORA_KERNELS(bf16, __nv_bfloat16, 8)
LORA_KERNELS(bf16, __nv_bfloat16, 16)
LORA_KERNELS(bf16, __nv_bfloat16, 32)
