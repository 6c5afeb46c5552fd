#include <cuda_bf16.h>

#include "../elem.cuh"
#include "../reduce.cuh"

// Cross-entropy of one chunk of LM-head logits [c, V] (bf16 or f32; f32 statistics, as
// transformers upcasts the logits): loss[i] = logsumexp(l_i) − l_i[t_i] and, when `g` ≠ 0, the
// gradient g·(softmax(l_i) − onehot(t_i)) in the logits' dtype. With `cap` ≠ 0 the logits are
// soft-capped first, l = cap·tanh(z/cap) (Gemma 2's final logits), and the gradient is z's:
// times 1 − tanh². One block per row: one pass for an online max/sum, one for the gradient
// (the row is still in L2).

// The (capped) logit of z, and th = tanh(z/cap) when capped.
__device__ __forceinline__ float capped(float z, float cap, float& th) {
    if (cap == 0.0f) return z;
    th = tanhf(z / cap);
    return cap * th;
}

template <typename T>
__device__ void xent(const T* logits, const unsigned* tgt, float g, T* dl, float* loss, int V, float cap) {
    long long row = blockIdx.x;
    const T* lr = logits + row * V;
    float m = -INFINITY, s = 0.0f, th = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float v = capped(ldf(lr, j), cap, th);
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; } else s += expf(v - m);
    }
    float mx = block_reduce<true>(m);
    float sum = block_reduce<false>(m == -INFINITY ? 0.0f : s * expf(m - mx));
    int t = (int)tgt[row];
    if (threadIdx.x == 0) loss[row] = mx + logf(sum) - capped(ldf(lr, t), cap, th);
    if (g == 0.0f) return;
    float inv = 1.0f / sum;
    T* dr = dl + row * V;
    if (cap == 0.0f) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) stf(dr, j, g * (expf(ldf(lr, j) - mx) * inv - (j == t ? 1.0f : 0.0f)));
        return;
    }
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float v = capped(ldf(lr, j), cap, th);
        stf(dr, j, g * (expf(v - mx) * inv - (j == t ? 1.0f : 0.0f)) * (1.0f - th * th));
    }
}

extern "C" __global__ void xent_f32(const float* l, const unsigned* t, float g, float* dl, float* loss, int V, float cap) { xent(l, t, g, dl, loss, V, cap); }
extern "C" __global__ void xent_bf16(const __nv_bfloat16* l, const unsigned* t, float g, __nv_bfloat16* dl, float* loss, int V, float cap) {
    xent(l, t, g, dl, loss, V, cap);
}
