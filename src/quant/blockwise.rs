//! Blockwise kernels: 4-bit (NF4/FP4) quantize and dequantize, and the 8-bit dynamic-map
//! quantize/dequantize used for double quantization. They reproduce bitsandbytes' CUDA kernels
//! (`kQuantizeBlockwise`, `kDequantizeBlockwise`) bit for bit, including what `--use_fast_math`
//! does there: denormal inputs and products flush to zero ([`ftz`]) and `1/absmax` is the GPU's
//! approximate reciprocal ([`rcp_approx`]).

use super::codebook::{dequant_table, quantize_8bit_value, quantize_fp4_value, quantize_nf4_value};
use super::rcp::rcp_approx;
use super::QuantType;
use half::{bf16, f16};
use rayon::prelude::*;

/// Flush-to-zero (keeping the sign), as the GPU does to denormal operands and results under
/// fast math.
#[inline(always)]
pub(crate) fn ftz(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// Input element types (converted to f32 exactly, as the kernel's `(float)vals[j]`).
pub trait InElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}
impl InElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl InElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl InElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

/// Output element types (f32 → dtype rounds to nearest even, as `__float2bfloat16`/`__float2half`).
pub trait OutElem: Copy + Send + Sync {
    fn from_f32(x: f32) -> Self;
}
impl OutElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}
/// Writing into uninitialised memory (every element of the output is stored).
impl OutElem for std::mem::MaybeUninit<f32> {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        std::mem::MaybeUninit::new(x)
    }
}
impl OutElem for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl OutElem for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Elements per rayon task: whole blocks, about 16 K values.
fn blocks_per_task(blocksize: usize) -> usize {
    (16 * 1024 / blocksize).max(1)
}

/// The block's absmax as the kernel reduces it: `fmaxf` over |x| from -FLT_MAX (NaN is skipped;
/// denormals count as 0); a partial block also sees its zero padding.
#[inline]
fn block_absmax<T: InElem>(xs: &[T], partial: bool) -> f32 {
    let mut m = if partial { 0.0 } else { -f32::MAX };
    for x in xs {
        m = m.max(ftz(x.to_f32()).abs());
    }
    m
}

#[inline(always)]
fn code4(qt: QuantType, x: f32, r: f32) -> u8 {
    let p = ftz(ftz(x) * r);
    match qt {
        QuantType::Nf4 => quantize_nf4_value(p),
        QuantType::Fp4 => quantize_fp4_value(p),
    }
}

/// Quantize one block into `out` (`xs.len().div_ceil(2)` bytes); returns its absmax.
fn quantize_block4<T: InElem>(qt: QuantType, xs: &[T], partial: bool, out: &mut [u8]) -> f32 {
    let absmax = block_absmax(xs, partial);
    let r = rcp_approx(absmax);
    let mut pairs = xs.chunks_exact(2);
    for (o, p) in out.iter_mut().zip(&mut pairs) {
        *o = (code4(qt, p[0].to_f32(), r) << 4) | code4(qt, p[1].to_f32(), r);
    }
    if let [x] = pairs.remainder() {
        // Odd length: the low nibble quantizes the zero padding (0 * 1/absmax, NaN when absmax is 0).
        out[out.len() - 1] = (code4(qt, x.to_f32(), r) << 4) | code4(qt, 0.0, r);
    }
    absmax
}

/// 4-bit blockwise quantization of `data`: packed codes (`(n + 1) / 2` bytes, even element in
/// the high nibble) and one absmax per block. `blocksize` must be even (callers validate).
pub fn quantize_4bit_blocks<T: InElem>(data: &[T], qt: QuantType, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let n = data.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    let bpt = blocks_per_task(blocksize);
    data.par_chunks(bpt * blocksize).zip(packed.par_chunks_mut(bpt * blocksize / 2)).zip(absmax.par_chunks_mut(bpt)).for_each(
        |((xs, out), am)| {
            for ((blk, o), a) in xs.chunks(blocksize).zip(out.chunks_mut(blocksize / 2)).zip(am.iter_mut()) {
                *a = quantize_block4(qt, blk, blk.len() < blocksize, o);
            }
        },
    );
    (packed, absmax)
}

/// 4-bit dequantization: `out[i] = round(table[code] * absmax[i / blocksize])` with the f32
/// product flushed like the GPU's. `out.len()` is the element count; `packed` holds
/// `out.len().div_ceil(2)` bytes and `absmax` one value per block (callers validate).
pub fn dequantize_4bit_blocks<O: OutElem>(packed: &[u8], absmax: &[f32], qt: QuantType, blocksize: usize, out: &mut [O]) {
    let lut = dequant_table(qt);
    let bpt = blocks_per_task(blocksize);
    out.par_chunks_mut(bpt * blocksize).zip(packed.par_chunks(bpt * blocksize / 2)).zip(absmax.par_chunks(bpt)).for_each(
        |((out, bytes), am)| {
            for ((o, b), &a) in out.chunks_mut(blocksize).zip(bytes.chunks(blocksize / 2)).zip(am) {
                // 16 products per block, then two table loads per byte.
                let t: [O; 16] = std::array::from_fn(|i| O::from_f32(ftz(lut[i] * a)));
                let mut pairs = o.chunks_exact_mut(2);
                for (pair, &byte) in (&mut pairs).zip(b) {
                    pair[0] = t[(byte >> 4) as usize];
                    pair[1] = t[(byte & 15) as usize];
                }
                if let [last] = pairs.into_remainder() {
                    *last = t[(b[b.len() - 1] >> 4) as usize];
                }
            }
        },
    );
}

/// 8-bit blockwise quantization with a sorted 256-entry map (bnb's `quantize_blockwise`, as
/// double quantization runs it on the absmax vector): per block, absmax, the GPU reciprocal,
/// then [`quantize_8bit_value`] of each scaled value.
pub fn quantize_8bit_blocks(x: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    for ((blk, out), a) in x.chunks(blocksize).zip(q.chunks_mut(blocksize)).zip(absmax.iter_mut()) {
        *a = block_absmax(blk, blk.len() < blocksize);
        let r = rcp_approx(*a);
        for (o, &v) in out.iter_mut().zip(blk) {
            *o = quantize_8bit_value(code, ftz(ftz(v) * r));
        }
    }
    (q, absmax)
}

/// 8-bit blockwise dequantization: `code[q] * absmax[i / blocksize]`, flushed like the GPU's.
pub fn dequantize_8bit_blocks(q: &[u8], absmax: &[f32], code: &[f32; 256], blocksize: usize) -> Vec<f32> {
    q.iter().enumerate().map(|(i, &c)| ftz(code[c as usize] * absmax[i / blocksize])).collect()
}
