// Causal grouped-query attention for training on tensor cores (bf16 in, f32 accumulate), in
// the manner of FlashAttention-2: scores exist only as 16×64 register tiles, never as a
// [heads, T, T] matrix. Three kernels:
//
//   flash_fwd:      O = softmax(L(QKᵀ) + mask) V per 64-query block, online softmax over
//                   64-key blocks; also LSE (log2 units, of the logits L) for backward.
//   flash_bwd_dkdv: per 64-key block of a KV head: dV = Σ Pᵀ dO, dK = s·Σ dS′ᵀ Q over every
//                   query head of its group and every query block that sees it.
//   flash_bwd_dq:   per 64-query block: dQ = s·Σ dS′ K.
//
// The logits: L = s·QKᵀ (s the caller's softmax scale), or with soft-capping (Gemma 2)
// L = cap·tanh(s·QKᵀ/cap), before the mask. Backward recomputes P from LSE, dS = P ⊙ (dP − Δ),
// dP = dO Vᵀ, Δᵢ = Σ dOᵢ·Oᵢ (flash_bwd_delta), and dS′ = dS (times 1 − tanh² when capped):
// the gradient of s·QKᵀ. dQ has its own pass instead of FA2's atomic adds, so every result is
// summed in a fixed order (deterministic). The mask: query i sees key j when j ≤ i, i − j < w
// (the sliding window; w = t for none) and both are of the same example (segment id > 0);
// padding (segment 0) sees only itself (attention.rs, build_mask). Key blocks wholly outside
// a query block's window are never visited.
// q/o/dO `[b, nh, t, D]`, k/v `[b, kvh, t, D]`, segments `[b, t]` u32, LSE and Δ `[b, nh, t]`.
//
// Each block has 4 warps of 16 rows; operands are staged in shared memory (rows padded by 16
// bytes so that ldmatrix's eight row addresses fall in distinct banks), the tiles a block loops
// over double-buffered with cp.async, and fed to mma.sync m16n8k16 through ldmatrix (.trans
// where the product needs the tile's transpose). Blocks below the diagonal whose tokens are
// all of one example and within the window skip the mask. Head size 256 (Gemma) keeps the
// 64-row blocks (≤ 200 KiB of shared memory, one block per SM) but splits what would not fit
// in registers: dQ takes its key block in halves, and dK and dV are two launches.

#include <cuda_bf16.h>

namespace {

typedef __nv_bfloat16 bf16;
constexpr int BR = 64;  // rows of a query or key block: 4 warps × 16

__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem(p)));
}

__device__ __forceinline__ void ldsm4t(unsigned (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem(p)));
}

__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// tanh from ex2: within ~1e-7 of 1 absolutely (the logits are cap·tanh, cap ≤ ~50).
__device__ __forceinline__ float tanh_ex2(float x) {
    const float e = ex2(fminf(fmaxf(x, -9.0f), 9.0f) * 2.8853900817779268f);  // e^(2x)
    return __fdividef(e - 1.0f, e + 1.0f);
}

// The logits' scales: sl2 = s·log2(e) (plain), or capl2 = cap·log2(e) and scap = s/cap
// (soft-capped); scale = s (the gradients' factor).
struct Scales {
    float sl2, scale, capl2, scap;
};

// The base-2 logit of a raw score x = q·k (masking aside); with CAP, th = tanh(s·x/cap) for the
// backward's factor 1 − th².
template <bool CAP>
__device__ __forceinline__ float logit2(float x, const Scales& c, float& th) {
    if (CAP) {
        th = tanh_ex2(x * c.scap);
        return c.capl2 * th;
    }
    return x * c.sl2;
}

template <int N>
__device__ __forceinline__ void zero(float (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.0f;
}

// acc[nt] += A[r0 .. r0+16, 0..KD) · B[n0 + 8·nt + (0..8), 0..KD)ᵀ: A and B row-major tiles of
// row stride S in shared memory (B's rows are the product's columns).
template <int NT, int KD, int S>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const bf16* A, int r0, const bf16* B, int n0) {
    const int l = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < KD; k += 32) {
        unsigned a0[4], a1[4];
        const bf16* pa = A + (r0 + (l & 7) + ((l >> 3) & 1) * 8) * S + k + (l >> 4) * 8;
        ldsm4(a0, pa);
        ldsm4(a1, pa + 16);
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            unsigned b[4];
            ldsm4(b, B + (n0 + nt * 8 + (l & 7)) * S + k + (l >> 3) * 8);
            mma(acc[nt], a0, b[0], b[1]);
            mma(acc[nt], a1, b[2], b[3]);
        }
    }
}

// acc[dt] += P · T[k0 .. k0 + 8·NP, 0 .. 8·DT): P the 16 × 8·NP tile an mma_abt left in its
// accumulator layout (reused as the A operand, rounded to bf16), T row-major in shared memory.
template <int NP, int DT, int S>
__device__ __forceinline__ void mma_pt(float (&acc)[DT][4], const float (&p)[NP][4], const bf16* T, int k0) {
    const int l = threadIdx.x & 31;
#pragma unroll
    for (int s = 0; s < NP / 2; s++) {
        const unsigned a[4] = {pack(p[2 * s][0], p[2 * s][1]), pack(p[2 * s][2], p[2 * s][3]), pack(p[2 * s + 1][0], p[2 * s + 1][1]),
                               pack(p[2 * s + 1][2], p[2 * s + 1][3])};
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
            unsigned b[4];
            ldsm4t(b, T + (k0 + 16 * s + (l & 7) + ((l >> 3) & 1) * 8) * S + (dt + (l >> 4)) * 8);
            mma(acc[dt], a, b[0], b[1]);
            mma(acc[dt + 1], a, b[2], b[3]);
        }
    }
}

// Rows row0 .. row0+64 of a [t, D] matrix into a tile of stride S, asynchronously (cp.async:
// the next tile loads while this one is multiplied; cp_wait and a barrier make it visible).
// Zeros past t: a zero row times a zero probability must stay zero, not NaN.
template <int D, int S>
__device__ __forceinline__ void stage(bf16* dst, const bf16* src, int row0, int t) {
    constexpr int C = D / 8;
    for (int i = threadIdx.x; i < BR * C; i += blockDim.x) {
        const int r = i / C, c = i % C;
        const bool in = row0 + r < t;
        const bf16* from = src + (long long)(in ? row0 + r : 0) * D + c * 8;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem(dst + r * S + c * 8)), "l"(from), "r"(in ? 16 : 0));
    }
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Whether a query block and a key block strictly below its diagonal need no mask: all their
// tokens of one example, and its last query within the window of its first key. Every thread
// checks a token straight from global memory (no barrier needed before), the barrier combines
// them.
__device__ __forceinline__ bool unmasked(const unsigned* seg, int q0, int k0, int t, int w, bool below) {
    const unsigned s0 = seg[q0];
    const int i = threadIdx.x & (BR - 1);
    const int pos = (threadIdx.x < BR ? q0 : k0) + i;
    const bool ok = below && min(q0 + BR, t) - 1 - k0 < w && s0 != 0u && pos < t && seg[pos] == s0;
    return __syncthreads_and(ok);
}

__device__ __forceinline__ void stage_seg(unsigned* dst, const unsigned* seg, int row0, int t) {
    for (int i = threadIdx.x; i < BR; i += blockDim.x) dst[i] = row0 + i < t ? seg[row0 + i] : 0u;
}

__device__ __forceinline__ void stage_f(float* dst, const float* src, int row0, int t) {
    for (int i = threadIdx.x; i < BR; i += blockDim.x) dst[i] = row0 + i < t ? src[row0 + i] : 0.0f;
}

// Does query i see key j (build_mask's rule, within the window w)?
__device__ __forceinline__ bool sees(int i, int j, unsigned si, unsigned sj, int t, int w) {
    return j <= i && i - j < w && i < t && (j == i || (si != 0u && si == sj));
}

// The first key block a query block starting at q0 sees through a window of w.
__device__ __forceinline__ int first_key_block(int q0, int w) { return max(0, q0 - w + 1) / BR; }

template <int D, bool CAP>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                          bf16* __restrict__ o, float* __restrict__ lse, int nh, int kvh, int t, int w, Scales sc) {
    constexpr int S = D + 8, DT = D / 8;
    extern __shared__ __align__(16) unsigned char sm[];
    bf16* Qs = (bf16*)sm;
    bf16* Ks = Qs + BR * S;  // two buffers each of K and V
    bf16* Vs = Ks + 2 * BR * S;
    unsigned* sq = (unsigned*)(Vs + 2 * BR * S);
    unsigned* sk = sq + BR;  // two buffers
    const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / (nh / kvh);  // longest first
    const int l = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16, g = l >> 2, tq = l & 3;
    const long long qoff = ((long long)b * nh + h) * t, koff = ((long long)b * kvh + hk) * t;
    const unsigned* sb = seg + (long long)b * t;
    const int q0 = qb * BR, kb0 = first_key_block(q0, w);
    stage<D, S>(Qs, q + qoff * D, q0, t);
    stage<D, S>(Ks + (kb0 & 1) * BR * S, k + koff * D, kb0 * BR, t);  // key block kb in buffer kb & 1
    stage<D, S>(Vs + (kb0 & 1) * BR * S, v + koff * D, kb0 * BR, t);
    cp_commit();
    stage_seg(sq, sb, q0, t);
    stage_seg(sk + (kb0 & 1) * BR, sb, kb0 * BR, t);
    const int row[2] = {q0 + r0 + g, q0 + r0 + g + 8};
    float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.0f, 0.0f};
    float acc[DT][4];
    zero(acc);
    for (int kb = kb0; kb <= qb; kb++) {
        const int k0 = kb * BR, cur = kb & 1;
        if (kb < qb) {
            stage<D, S>(Ks + (cur ^ 1) * BR * S, k + koff * D, k0 + BR, t);
            stage<D, S>(Vs + (cur ^ 1) * BR * S, v + koff * D, k0 + BR, t);
            cp_commit();
            stage_seg(sk + (cur ^ 1) * BR, sb, k0 + BR, t);
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        const bool plain = unmasked(sb, q0, k0, t, w, kb < qb);  // also the barrier after the loads
        const bf16* K = Ks + cur * BR * S;
        const unsigned* skc = sk + cur * BR;
        float s[8][4];
        zero(s);
        mma_abt<8, D, S>(s, Qs, r0, K, 0);
        const unsigned seg_r[2] = {sq[r0 + g], sq[r0 + g + 8]};
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int jl = nt * 8 + 2 * tq + (e & 1);
                const bool ok = plain || sees(row[e >> 1], k0 + jl, seg_r[e >> 1], skc[jl], t, w);
                float th;
                s[nt][e] = ok ? logit2<CAP>(s[nt][e], sc, th) : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
        float use[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            use[r] = mn == -INFINITY ? 0.0f : mn;  // a row that sees nothing yet stays at zero
            const float corr = ex2(m[r] - use[r]);
            m[r] = mn;
            sum[r] *= corr;
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                acc[dt][2 * r] *= corr;
                acc[dt][2 * r + 1] *= corr;
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = ex2(s[nt][e] - use[e >> 1]);
                sum[e >> 1] += s[nt][e];
            }
        mma_pt<8, DT, S>(acc, s, Vs + cur * BR * S, 0);
        __syncthreads();  // this buffer is refilled next iteration
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        if (row[r] >= t) continue;
        const float inv = 1.0f / sum[r];
        bf16* orow = o + (qoff + row[r]) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) *(unsigned*)(orow + dt * 8 + 2 * tq) = pack(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
        if (tq == 0) lse[qoff + row[r]] = m[r] + __log2f(sum[r]);
    }
}

// Δᵢ = Σ_d dOᵢ·Oᵢ, one warp per row.
template <int D>
__device__ void flash_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ d_o, float* __restrict__ delta, long long rows) {
    const long long r = blockIdx.x * (long long)(blockDim.x / 32) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const int l = threadIdx.x & 31;
    float acc = 0.0f;
    for (int d = l * 2; d < D; d += 64) {
        const __nv_bfloat162 a = *(const __nv_bfloat162*)(o + r * D + d), b = *(const __nv_bfloat162*)(d_o + r * D + d);
        acc += __bfloat162float(a.x) * __bfloat162float(b.x) + __bfloat162float(a.y) * __bfloat162float(b.y);
    }
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (l == 0) delta[r] = acc;
}

// What a dK/dV block accumulates: both (D ≤ 128), or one of them (D = 256: two launches, since
// both accumulators would not fit in registers).
constexpr int DK = 1, DV = 2, DKDV = 3;

template <int D, bool CAP, int WHAT>
__device__ void flash_bwd_dkdv(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                               const bf16* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta, bf16* __restrict__ dk,
                               bf16* __restrict__ dv, int nh, int kvh, int t, int w, Scales sc) {
    constexpr int S = D + 8, DT = D / 8;
    constexpr bool WK = WHAT & DK, WV = WHAT & DV;
    extern __shared__ __align__(16) unsigned char sm[];
    bf16* Ks = (bf16*)sm;
    bf16* Vs = Ks + BR * S;
    bf16* Qs = Vs + BR * S;      // two buffers each of Q and dO
    bf16* Os = Qs + 2 * BR * S;
    unsigned* sk = (unsigned*)(Os + 2 * BR * S);
    unsigned* sq = sk + BR;      // two buffers each of the segments, LSE and Δ of the queries
    float* ls = (float*)(sq + 2 * BR);
    float* dl = ls + 2 * BR;
    const int kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, rep = nh / kvh;
    const int l = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16, g = l >> 2, tq = l & 3;
    const long long koff = ((long long)b * kvh + hk) * t;
    const unsigned* sb = seg + (long long)b * t;
    // The query blocks that see this key block: kb up to the block of its last key's last
    // query in the window.
    const int k0 = kb * BR, nqb = (t + BR - 1) / BR, per = min(nqb - 1, (k0 + BR + w - 2) / BR) - kb + 1, steps = rep * per;
    // Step `it` is query head hk·rep + it / per, query block kb + it % per.
    auto fetch = [&](int it, int buf) {
        const long long qoff = ((long long)b * nh + hk * rep + it / per) * t;
        const int q0 = (kb + it % per) * BR;
        stage<D, S>(Qs + buf * BR * S, q + qoff * D, q0, t);
        stage<D, S>(Os + buf * BR * S, d_o + qoff * D, q0, t);
        cp_commit();
        stage_seg(sq + buf * BR, sb, q0, t);
        stage_f(ls + buf * BR, lse + qoff, q0, t);
        stage_f(dl + buf * BR, delta + qoff, q0, t);
    };
    stage<D, S>(Ks, k + koff * D, k0, t);
    if (WK) stage<D, S>(Vs, v + koff * D, k0, t);
    stage_seg(sk, sb, k0, t);
    fetch(0, 0);
    const int key[2] = {k0 + r0 + g, k0 + r0 + g + 8};
    float adk[WK ? DT : 1][4], adv[WV ? DT : 1][4];
    zero(adk);
    zero(adv);
    for (int it = 0; it < steps; it++) {
        const int cur = it & 1, q0 = (kb + it % per) * BR;
        if (it + 1 < steps) {
            fetch(it + 1, cur ^ 1);
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        const bool plain = unmasked(sb, q0, k0, t, w, q0 > k0);
        const bf16* Q = Qs + cur * BR * S;
        const bf16* O = Os + cur * BR * S;
        const unsigned* sqc = sq + cur * BR;
        const float* lsc = ls + cur * BR;
        const float* dlc = dl + cur * BR;
        const unsigned seg_k[2] = {sk[r0 + g], sk[r0 + g + 8]};
        // 32 queries at a time (registers): Pᵀ and dPᵀ are 16 keys × 32 queries.
#pragma unroll 1
        for (int c = 0; c < BR; c += 32) {
            float p[4][4], dp[4][4];
            zero(p);
            mma_abt<4, D, S>(p, Ks, r0, Q, c);
            if (WK) {
                zero(dp);
                mma_abt<4, D, S>(dp, Vs, r0, O, c);
            }
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int il = c + nt * 8 + 2 * tq + (e & 1);
                    const bool ok = plain || sees(q0 + il, key[e >> 1], sqc[il], seg_k[e >> 1], t, w);
                    float th = 0.0f;
                    const float pv = ok ? ex2(logit2<CAP>(p[nt][e], sc, th) - lsc[il]) : 0.0f;
                    p[nt][e] = pv;
                    if (WK) dp[nt][e] = CAP ? pv * (dp[nt][e] - dlc[il]) * (1.0f - th * th) : pv * (dp[nt][e] - dlc[il]);
                }
            if constexpr (WV) mma_pt<4, DT, S>(adv, p, O, c);
            if constexpr (WK) mma_pt<4, DT, S>(adk, dp, Q, c);
        }
        __syncthreads();  // this buffer is refilled next step
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (key[r] >= t) continue;
        bf16* krow = dk + (koff + key[r]) * D;
        bf16* vrow = dv + (koff + key[r]) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            if constexpr (WK) *(unsigned*)(krow + dt * 8 + 2 * tq) = pack(adk[dt][2 * r] * sc.scale, adk[dt][2 * r + 1] * sc.scale);
            if constexpr (WV) *(unsigned*)(vrow + dt * 8 + 2 * tq) = pack(adv[dt][2 * r], adv[dt][2 * r + 1]);
        }
    }
}

// KC: keys per inner step (64, or 32 for D = 256 to hold dQ's accumulator in registers).
template <int D, bool CAP>
__device__ void flash_bwd_dq(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v, const unsigned* __restrict__ seg,
                             const bf16* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta, bf16* __restrict__ dq,
                             int nh, int kvh, int t, int w, Scales sc) {
    constexpr int S = D + 8, DT = D / 8, KC = D > 128 ? 32 : 64, NC = KC / 8;
    extern __shared__ __align__(16) unsigned char sm[];
    bf16* Qs = (bf16*)sm;
    bf16* Os = Qs + BR * S;
    bf16* Ks = Os + BR * S;  // two buffers each of K and V
    bf16* Vs = Ks + 2 * BR * S;
    unsigned* sq = (unsigned*)(Vs + 2 * BR * S);
    unsigned* sk = sq + BR;  // two buffers
    const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / (nh / kvh);  // longest first
    const int l = threadIdx.x & 31, r0 = (threadIdx.x >> 5) * 16, g = l >> 2, tq = l & 3;
    const long long qoff = ((long long)b * nh + h) * t, koff = ((long long)b * kvh + hk) * t;
    const unsigned* sb = seg + (long long)b * t;
    const int q0 = qb * BR, kb0 = first_key_block(q0, w);
    stage<D, S>(Qs, q + qoff * D, q0, t);
    stage<D, S>(Os, d_o + qoff * D, q0, t);
    stage<D, S>(Ks + (kb0 & 1) * BR * S, k + koff * D, kb0 * BR, t);  // key block kb in buffer kb & 1
    stage<D, S>(Vs + (kb0 & 1) * BR * S, v + koff * D, kb0 * BR, t);
    cp_commit();
    stage_seg(sq, sb, q0, t);
    stage_seg(sk + (kb0 & 1) * BR, sb, kb0 * BR, t);
    const int row[2] = {q0 + r0 + g, q0 + r0 + g + 8};
    const float lr[2] = {row[0] < t ? lse[qoff + row[0]] : 0.0f, row[1] < t ? lse[qoff + row[1]] : 0.0f};
    const float dr[2] = {row[0] < t ? delta[qoff + row[0]] : 0.0f, row[1] < t ? delta[qoff + row[1]] : 0.0f};
    float acc[DT][4];
    zero(acc);
    for (int kb = kb0; kb <= qb; kb++) {
        const int k0 = kb * BR, cur = kb & 1;
        if (kb < qb) {
            stage<D, S>(Ks + (cur ^ 1) * BR * S, k + koff * D, k0 + BR, t);
            stage<D, S>(Vs + (cur ^ 1) * BR * S, v + koff * D, k0 + BR, t);
            cp_commit();
            stage_seg(sk + (cur ^ 1) * BR, sb, k0 + BR, t);
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        const bool plain = unmasked(sb, q0, k0, t, w, kb < qb);
        const bf16* K = Ks + cur * BR * S;
        const unsigned* skc = sk + cur * BR;
        const unsigned seg_r[2] = {sq[r0 + g], sq[r0 + g + 8]};
#pragma unroll 1
        for (int c = 0; c < BR; c += KC) {
            float s[NC][4], dp[NC][4];
            zero(s);
            zero(dp);
            mma_abt<NC, D, S>(s, Qs, r0, K, c);
            mma_abt<NC, D, S>(dp, Os, r0, Vs + cur * BR * S, c);
#pragma unroll
            for (int nt = 0; nt < NC; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int jl = c + nt * 8 + 2 * tq + (e & 1);
                    const bool ok = plain || sees(row[e >> 1], k0 + jl, seg_r[e >> 1], skc[jl], t, w);
                    float th = 0.0f;
                    const float pv = ok ? ex2(logit2<CAP>(s[nt][e], sc, th) - lr[e >> 1]) : 0.0f;
                    s[nt][e] = CAP ? pv * (dp[nt][e] - dr[e >> 1]) * (1.0f - th * th) : pv * (dp[nt][e] - dr[e >> 1]);
                }
            mma_pt<NC, DT, S>(acc, s, K, c);
        }
        __syncthreads();  // this buffer is refilled next iteration
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        bf16* qrow = dq + (qoff + row[r]) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) *(unsigned*)(qrow + dt * 8 + 2 * tq) = pack(acc[dt][2 * r] * sc.scale, acc[dt][2 * r + 1] * sc.scale);
    }
}

}  // namespace

// Every kernel takes the window w (1 ≤ w ≤ t; t for none) and the scales (sl2, scale, capl2,
// scap: see Scales); the `_cap` kernels soft-cap the logits. Names: flash_fwd[_cap]_d<D>,
// flash_bwd_delta_d<D>, flash_bwd_dq[_cap]_d<D>, and flash_bwd_dkdv[_cap]_d<D> (D ≤ 128) or
// flash_bwd_dk[_cap]_d256 and flash_bwd_dv[_cap]_d256.
#define SCALES Scales{sl2, scale, capl2, scap}
#define FLASH_FWD(D, CAP, name)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128) name(const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, bf16* o, \
                                                           float* lse, int nh, int kvh, int t, int w, float sl2, float scale,         \
                                                           float capl2, float scap) {                                                 \
        flash_fwd<D, CAP>(q, k, v, seg, o, lse, nh, kvh, t, w, SCALES);                                                               \
    }
#define FLASH_DKDV(D, CAP, WHAT, name)                                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                                               \
        name(const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, const bf16* d_o, const float* lse, const float* delta, \
             bf16* dk, bf16* dv, int nh, int kvh, int t, int w, float sl2, float scale, float capl2, float scap) {                     \
        flash_bwd_dkdv<D, CAP, WHAT>(q, k, v, seg, d_o, lse, delta, dk, dv, nh, kvh, t, w, SCALES);                                   \
    }
#define FLASH_DQ(D, CAP, name)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                                               \
        name(const bf16* q, const bf16* k, const bf16* v, const unsigned* seg, const bf16* d_o, const float* lse, const float* delta, \
             bf16* dq, int nh, int kvh, int t, int w, float sl2, float scale, float capl2, float scap) {                              \
        flash_bwd_dq<D, CAP>(q, k, v, seg, d_o, lse, delta, dq, nh, kvh, t, w, SCALES);                                               \
    }
#define FLASH_DELTA(D)                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) flash_bwd_delta_d##D(const bf16* o, const bf16* d_o, float* delta, long long rows) { \
        flash_bwd_delta<D>(o, d_o, delta, rows);                                                                                       \
    }
#define FLASH_KERNELS(D)                                  \
    FLASH_FWD(D, false, flash_fwd_d##D)                   \
    FLASH_FWD(D, true, flash_fwd_cap_d##D)                \
    FLASH_DELTA(D)                                        \
    FLASH_DQ(D, false, flash_bwd_dq_d##D)                 \
    FLASH_DQ(D, true, flash_bwd_dq_cap_d##D)

FLASH_KERNELS(64)
FLASH_KERNELS(128)
FLASH_KERNELS(256)
FLASH_DKDV(64, false, DKDV, flash_bwd_dkdv_d64)
FLASH_DKDV(64, true, DKDV, flash_bwd_dkdv_cap_d64)
FLASH_DKDV(128, false, DKDV, flash_bwd_dkdv_d128)
FLASH_DKDV(128, true, DKDV, flash_bwd_dkdv_cap_d128)
FLASH_DKDV(256, false, DK, flash_bwd_dk_d256)
FLASH_DKDV(256, true, DK, flash_bwd_dk_cap_d256)
FLASH_DKDV(256, false, DV, flash_bwd_dv_d256)
FLASH_DKDV(256, true, DV, flash_bwd_dv_cap_d256)
