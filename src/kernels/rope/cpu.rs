//! RoPE on the CPU in f32 (HF's rotate-half layout, the arithmetic of candle's `rope` kernel):
//! one head-major row in place (decoding), and heads split and rotated in one pass (prefill).

use rayon::prelude::*;

/// Rotate one head-major row `x` `[heads·d]` in place with HF's rotate-half layout, given the
/// position's `cos`/`sin` `[d/2]`: the same arithmetic as candle's `rope` kernel.
pub fn rope_row_inplace(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    assert!(cos.len() == half && sin.len() == half && x.len().is_multiple_of(d));
    for hx in x.chunks_exact_mut(d) {
        let (x1, x2) = hx.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = a * sin[i] + b * cos[i];
        }
    }
}

/// Split heads and rotate in one pass: `x` `[b, t, heads·d]` (a projection's output) →
/// `[b, heads, t, d]`, token `(bi, i)` rotated (HF rotate-half, the arithmetic of
/// [`rope_row_inplace`] and of candle's `rope`) by its cos/sin row `bi·t + i` of per-token
/// `[b·t, d/2]` tables when `rope` is given, else only moved. Parallel over (batch, head) blocks.
pub fn split_heads_rope(x: &[f32], b: usize, t: usize, heads: usize, d: usize, rope: Option<(&[f32], &[f32])>) -> Vec<f32> {
    assert_eq!(x.len(), b * t * heads * d, "split heads: {} elements for [{b}, {t}, {heads}·{d}]", x.len());
    let half = d / 2;
    if let Some((cos, sin)) = rope {
        assert!(d.is_multiple_of(2) && cos.len() == b * t * half && sin.len() == b * t * half, "split heads: rope tables of {} for {b}×{t} tokens", cos.len());
    }
    let mut out = vec![0f32; x.len()];
    if t * d == 0 {
        return out;
    }
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
        let (bi, h) = (bh / heads, bh % heads);
        for (i, orow) in o.chunks_exact_mut(d).enumerate() {
            let src = &x[((bi * t + i) * heads + h) * d..][..d];
            match rope {
                None => orow.copy_from_slice(src),
                Some((cos, sin)) => {
                    let (c, s) = (&cos[(bi * t + i) * half..][..half], &sin[(bi * t + i) * half..][..half]);
                    let (o1, o2) = orow.split_at_mut(half);
                    let (x1, x2) = src.split_at(half);
                    for j in 0..half {
                        o1[j] = x1[j] * c[j] - x2[j] * s[j];
                        o2[j] = x1[j] * s[j] + x2[j] * c[j];
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{assert_close, pseudo};
    use candle_core::{Device, Tensor};

    #[test]
    fn split_heads_rope_matches_candle_transpose_and_rope() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = pseudo(b * t * h * d, 8);
        let cos = pseudo(b * t * d / 2, 9);
        let sin = pseudo(b * t * d / 2, 10);
        let xt = Tensor::from_vec(x.clone(), (b, t, h, d), &Device::Cpu).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        assert_close(&split_heads_rope(&x, b, t, h, d, None), &xt.flatten_all().unwrap().to_vec1::<f32>().unwrap(), 0.0);
        let c = Tensor::from_vec(cos.clone(), (b, t, d / 2), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(sin.clone(), (b, t, d / 2), &Device::Cpu).unwrap();
        let want = candle_nn::rotary_emb::rope(&xt, &c, &s).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(&split_heads_rope(&x, b, t, h, d, Some((&cos, &sin))), &want, 0.0);
    }

    #[test]
    fn rope_row_matches_candle() {
        let (h, d) = (3, 8);
        let x = pseudo(h * d, 5);
        let cos = pseudo(d / 2, 6);
        let sin = pseudo(d / 2, 7);
        let mut got = x.clone();
        rope_row_inplace(&mut got, d, &cos, &sin);
        let xt = Tensor::from_vec(x, (1, h, 1, d), &Device::Cpu).unwrap();
        let c = Tensor::from_vec(cos, (1, d / 2), &Device::Cpu).unwrap();
        let s = Tensor::from_vec(sin, (1, d / 2), &Device::Cpu).unwrap();
        let want = candle_nn::rotary_emb::rope(&xt, &c, &s).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_close(&got, &want, 0.0);
    }
}
