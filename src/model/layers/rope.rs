//! Rotary position embedding (HF rotate-half layout): the frequencies with every scaling type,
//! the cos/sin tables, the rotation at per-token positions (packed rows restart positions per
//! example; inference rotates positions `start..start+t`), its backward (the inverse rotation:
//! the same op with `-sin`), heads split/merge, and decoding's one-row rotation on slices.

use crate::model::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` with `rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The scaling a config's `rope_scaling` / `rope_parameters` object asks for (`None`: default).
pub fn parse_scaling(s: &Map<String, Value>) -> Result<Option<Llama3Scaling>> {
    let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    match ty {
        "default" => Ok(None),
        "llama3" => {
            let g = |k: &str| -> Result<f64> { s.get(k).and_then(Value::as_f64).with_context(|| format!("rope scaling `llama3` needs `{k}`")) };
            Ok(Some(Llama3Scaling {
                factor: g("factor")?,
                low_freq_factor: g("low_freq_factor")?,
                high_freq_factor: g("high_freq_factor")?,
                original_max_position_embeddings: g("original_max_position_embeddings")? as usize,
            }))
        }
        other => bail!("unsupported rope scaling type `{other}` (supported: default, llama3)"),
    }
}

impl Llama3Scaling {
    /// One inverse frequency after llama3 scaling (transformers' formula): long wavelengths
    /// divided by `factor`, short ones kept, a smooth blend between.
    pub fn apply(&self, f: f64) -> f64 {
        let old = self.original_max_position_embeddings as f64;
        let low_wavelen = old / self.low_freq_factor;
        let high_wavelen = old / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / f;
        if wavelen > low_wavelen {
            f / self.factor
        } else if wavelen >= high_wavelen {
            let smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * f / self.factor + smooth * f
        } else {
            f
        }
    }
}

impl Config {
    /// Inverse frequencies of rotary embedding, with the scaling applied (as transformers does).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        // f32 like transformers' `_compute_default_rope_parameters`, so positions far out agree.
        let inv = (0..d / 2).map(|i| (1.0f32 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32)) as f64);
        match &self.rope_scaling {
            Some(s) => inv.map(|f| s.apply(f) as f32).collect(),
            None => inv.map(|f| f as f32).collect(),
        }
    }
}

/// cos/sin tables for rotary embeddings, `[max_pos, head_dim/2]` in the compute dtype.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// The tables at the positions of the tokens in flight, `[b, t, d/2]` each (what
/// [`split_heads`] rotates by).
pub struct RopeAt {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeAt {
    pub fn pair(&self) -> Option<(&Tensor, &Tensor)> {
        Some((&self.cos, &self.sin))
    }
}

impl Rope {
    pub fn new(cfg: &Config, max_pos: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv = cfg.rope_inv_freq();
        let half = inv.len();
        let mut freqs = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for f in &inv {
                freqs.push(p as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (max_pos, half), device)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> Result<usize> {
        Ok(self.cos.dim(0)?)
    }

    /// The tables at per-token `positions` `[b, t]` (u32): a training batch.
    pub fn gather(&self, positions: &Tensor) -> Result<RopeAt> {
        let (cos, sin) = gather(&self.cos, &self.sin, positions)?;
        Ok(RopeAt { cos, sin })
    }

    /// The tables at positions `start..start+t` in each of `b` rows: an inference step.
    pub fn span(&self, b: usize, start: usize, t: usize) -> Result<RopeAt> {
        let rows = |x: &Tensor| -> Result<Tensor> {
            let x = x.narrow(0, start, t)?;
            Ok(x.unsqueeze(0)?.broadcast_as((b, t, x.dim(1)?))?.contiguous()?)
        };
        Ok(RopeAt { cos: rows(&self.cos)?, sin: rows(&self.sin)? })
    }

    /// cos/sin at one position as f32 vectors (CPU f32 tables only): decoding's rotation.
    pub fn row_f32(&self, pos: usize) -> Option<RopeRow> {
        let (cos, sin) = crate::kernels::rope::row_f32(&self.cos, &self.sin, pos)?;
        Some(RopeRow { cos, sin })
    }
}

/// The tables at one position, for rotating one token's heads on plain slices (decoding).
pub struct RopeRow {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeRow {
    /// Rotates `x` `[heads·d]` in place.
    pub fn rotate(&self, x: &mut [f32], d: usize) {
        crate::kernels::rope::cpu::rope_row_inplace(x, d, &self.cos, &self.sin);
    }
}

/// cos/sin tables gathered at `positions` `[b, t]` (u32) from `[max_pos, d/2]` tables → `[b, t, d/2]`.
pub fn gather(cos: &Tensor, sin: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t) = positions.dims2()?;
    let flat = positions.flatten_all()?;
    let half = cos.dim(1)?;
    Ok((
        cos.index_select(&flat, 0)?.reshape((b, t, half))?,
        sin.index_select(&flat, 0)?.reshape((b, t, half))?,
    ))
}

/// Rotate `x` `[b, heads, t, d]`; nothing needs saving beyond the tables.
pub fn forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::kernels::rope::rotate(x, cos, sin)
}

/// The rotation is orthogonal: its transpose rotates by the opposite angle.
pub fn backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::kernels::rope::rotate_back(dy, cos, sin)
}

/// A projection's rows `[b·t, heads·d]` → `[b, heads, t, d]`, rotated when `rope` (the gathered
/// cos/sin `[b, t, d/2]`) is given.
pub fn split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    crate::kernels::rope::split_heads(x, b, t, heads, d, rope)
}

/// The transpose of [`split_heads`] (for its gradient): `[b, heads, t, d]` → `[b·t, heads·d]`,
/// rotated back when `rope` is given.
pub fn merge_heads(y: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    crate::kernels::rope::merge_heads(y, rope)
}
