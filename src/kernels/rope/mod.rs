//! Rotary position embedding (HF's rotate-half layout) and the split of a projection's rows
//! into heads / their merge back, fused where a kernel exists. Dispatch order: the CUDA kernel
//! (f32, bf16: split or merge with the rotation in one pass), the CPU kernel (f32: the split
//! with the rotation in one pass, and decoding's one-token rotation), candle's transpose and
//! `rope` as the reference.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;

use super::cuda_float;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Rotate `x` `[b, heads, t, d]` by the tables `cos`/`sin` (`[t, d/2]`, or per token
/// `[b, t, d/2]`): candle's kernel.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
}

/// The transpose of [`rotate`] (the rotation is orthogonal): rotate by the opposite angle.
pub fn rotate_back(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&dy.contiguous()?, cos, &sin.neg()?)?)
}

/// Rows `[b·t, h·d]` → heads `[b, h, t, d]` (or back with `merge`), rotated by the per-token
/// tables (the inverse rotation when merging) when `rotate`, as one candle op. The CUDA kernel
/// only: the CPU runs [`split_heads`]' candle ops.
#[derive(Clone, Copy, Debug)]
pub struct HeadsRope {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
    pub merge: bool,
    pub rotate: bool,
}

impl CustomOp3 for HeadsRope {
    fn name(&self) -> &'static str {
        "heads-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("heads/RoPE: no CPU kernel (split_heads runs candle's ops there)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = cuda::heads_rope(self, (x, xl), (cos, cl), (sin, sl)).map_err(super::launch::candle_err)?;
        let (b, t, h, d) = (self.b, self.t, self.h, self.d);
        Ok((y, if self.merge { Shape::from((b * t, h * d)) } else { Shape::from((b, h, t, d)) }))
    }
}

/// Whether the fused kernel takes `x` with these tables (CUDA, f32 or bf16, one dtype).
fn fused(x: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> bool {
    cuda_float(x) && rope.is_none_or(|(c, s)| c.dtype() == x.dtype() && s.dtype() == x.dtype())
}

/// [`HeadsRope`] on `x` (without tables x stands in for them: they are not read).
fn heads_rope(x: &Tensor, rope: Option<(&Tensor, &Tensor)>, op: HeadsRope) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (cos, sin) = match rope {
        Some((c, s)) => (c.contiguous()?, s.contiguous()?),
        None => (x.clone(), x.clone()),
    };
    Ok(x.apply_op3_no_bwd(&cos, &sin, &op)?)
}

/// A projection's rows `[b·t, heads·d]` (or `[b, t, heads·d]`) → `[b, heads, t, d]`, rotated
/// when `rope` (the per-token cos/sin `[b, t, d/2]`) is given.
pub fn split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    if fused(x, rope) {
        return heads_rope(x, rope, HeadsRope { b, t, h: heads, d, merge: false, rotate: rope.is_some() });
    }
    if let Some(y) = cpu_split_heads(x, b, t, heads, d, rope)? {
        return Ok(y);
    }
    let y = x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?;
    match rope {
        Some((cos, sin)) => rotate(&y, cos, sin),
        None => Ok(y),
    }
}

/// [`split_heads`] by the CPU kernel, when `x` and the tables are contiguous f32.
fn cpu_split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Option<Tensor>> {
    let Some(xv) = super::f32_view(x) else { return Ok(None) };
    let y = match rope {
        None => cpu::split_heads_rope(xv.slice(), b, t, heads, d, None),
        Some((cos, sin)) => match (super::f32_view(cos), super::f32_view(sin)) {
            (Some(c), Some(s)) => cpu::split_heads_rope(xv.slice(), b, t, heads, d, Some((c.slice(), s.slice()))),
            _ => return Ok(None),
        },
    };
    Ok(Some(Tensor::from_vec(y, (b, heads, t, d), x.device())?))
}

/// The transpose of [`split_heads`] (for its gradient): `[b, heads, t, d]` → `[b·t, heads·d]`,
/// rotated back when `rope` is given.
pub fn merge_heads(y: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, heads, t, d) = y.dims4()?;
    if fused(y, rope) {
        return heads_rope(y, rope, HeadsRope { b, t, h: heads, d, merge: true, rotate: rope.is_some() });
    }
    let y = match rope {
        Some((cos, sin)) => rotate_back(y, cos, sin)?,
        None => y.clone(),
    };
    Ok(y.transpose(1, 2)?.contiguous()?.reshape((b * t, heads * d))?)
}

/// The CPU decode step's rotation at position `pos`: the tables' (`[max_pos, d/2]`) rows as f32
/// vectors when the CPU kernel takes them (CPU f32 tables), else `None`.
pub fn row_f32(cos: &Tensor, sin: &Tensor, pos: usize) -> Option<(Vec<f32>, Vec<f32>)> {
    let row = |t: &Tensor| -> Option<Vec<f32>> {
        let half = t.dim(1).ok()?;
        super::with_f32(t, |all| all.get(pos * half..(pos + 1) * half).map(<[f32]>::to_vec)).flatten()
    };
    Some((row(cos)?, row(sin)?))
}
