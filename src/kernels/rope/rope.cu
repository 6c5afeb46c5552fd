#include <cuda_bf16.h>

#include "../elem.cuh"

// A projection's rows [b·t, h·d] to heads [b, h, t, d] (split) or back (merge), with HF's
// rotate_half RoPE when `rot` (cos/sin [b·t, d/2], per token): split rotates,
//   y_i = x_i c_i − x_{i+d/2} s_i,   y_{i+d/2} = x_{i+d/2} c_i + x_i s_i,
// merge applies the inverse (s negated), the gradient of split. One thread per pair (i, i+d/2),
// i fastest, so reads and writes are contiguous in both layouts.

template <typename T>
__device__ void heads_rope(const T* x, const T* cos, const T* sin, T* y, int t, int h, int d, int rot, int merge, long long pairs) {
    const int half = d / 2;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < pairs; idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long r = idx / half;
        int hh = (int)(r % h);
        long long bt = r / h;  // the token's row, b·t + t
        long long bb = bt / t, tt = bt % t;
        long long rows = bt * h * d + (long long)hh * d, heads = ((bb * h + hh) * t + tt) * d;
        long long src = merge ? heads : rows, dst = merge ? rows : heads;
        float a = ldf(x, src + i), c = ldf(x, src + i + half);
        float ya = a, yc = c;
        if (rot) {
            float cs = ldf(cos, bt * half + i), sn = ldf(sin, bt * half + i);
            if (merge) sn = -sn;
            ya = a * cs - c * sn;
            yc = c * cs + a * sn;
        }
        stf(y, dst + i, ya);
        stf(y, dst + i + half, yc);
    }
}

extern "C" __global__ void heads_rope_f32(const float* x, const float* cos, const float* sin, float* y, int t, int h, int d, int rot, int merge, long long pairs) {
    heads_rope(x, cos, sin, y, t, h, d, rot, merge, pairs);
}
extern "C" __global__ void heads_rope_bf16(const __nv_bfloat16* x, const __nv_bfloat16* cos, const __nv_bfloat16* sin, __nv_bfloat16* y, int t, int h, int d, int rot, int merge,
                                           long long pairs) {
    heads_rope(x, cos, sin, y, t, h, d, rot, merge, pairs);
}
