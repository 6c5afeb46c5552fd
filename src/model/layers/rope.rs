//! Rotary position embedding (HF rotate-half layout): the frequencies with every scaling type
//! (llama3, linear, longrope), the cos/sin tables — per layer type where a family rotates
//! sliding layers with another base (Gemma 3) —, the rotation at per-token positions (packed
//! rows restart positions per example; inference rotates positions `start..start+t`), its
//! backward (the inverse rotation: the same op with `-sin`), heads split/merge with partial
//! rotation (only the first `rot_dim` of each head, Phi-4-mini), and decoding's one-row rotation
//! on slices.

use crate::model::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::{Map, Value};

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` with `rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// A RoPE scaling (`rope_type` other than default): its `factor` and its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScaling {
    pub factor: f64,
    pub kind: ScalingKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ScalingKind {
    Llama3(Llama3Scaling),
    /// Positions divided by `factor` (Gemma 3 4B+'s global layers).
    Linear,
    /// Phi-3.5 / Phi-4: per-frequency divisors, `long_factor` once a sequence is longer than
    /// `original_max_position_embeddings`, else `short_factor`; cos/sin × `attention_factor`.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: usize, attention_factor: f64 },
}

impl RopeScaling {
    /// Tables that do not depend on the sequence length (all but longrope).
    pub fn is_static(&self) -> bool {
        !matches!(self.kind, ScalingKind::LongRope { .. })
    }
}

/// One layer type's RoPE: base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

/// The scaling a config's `rope_scaling` / `rope_parameters` object asks for (`None`: default).
/// `max_pos` and `original` (config.json's `original_max_position_embeddings`) give longrope's
/// default attention factor.
pub fn parse_scaling_with(s: &Map<String, Value>, max_pos: usize, original: Option<usize>) -> Result<Option<RopeScaling>> {
    let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let g = |k: &str| -> Result<f64> { s.get(k).and_then(Value::as_f64).with_context(|| format!("rope scaling `{ty}` needs `{k}`")) };
    let kind = match ty {
        "default" => return Ok(None),
        "llama3" => ScalingKind::Llama3(Llama3Scaling {
            factor: g("factor")?,
            low_freq_factor: g("low_freq_factor")?,
            high_freq_factor: g("high_freq_factor")?,
            original_max_position_embeddings: g("original_max_position_embeddings")? as usize,
        }),
        "linear" => ScalingKind::Linear,
        "longrope" | "su" => {
            let list = |k: &str| -> Result<Vec<f64>> {
                let a = s.get(k).and_then(Value::as_array).with_context(|| format!("rope scaling `longrope` needs `{k}` (a list)"))?;
                a.iter().map(|x| x.as_f64().with_context(|| format!("rope scaling `longrope`: `{k}` must hold numbers"))).collect()
            };
            let orig = s.get("original_max_position_embeddings").and_then(Value::as_u64).map(|x| x as usize).or(original)
                .context("rope scaling `longrope` needs `original_max_position_embeddings`")?;
            // transformers: the factor is max/original when the config has the original length.
            let factor = if orig > 0 { max_pos as f64 / orig as f64 } else { s.get("factor").and_then(Value::as_f64).unwrap_or(1.0) };
            let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
            };
            let kind = ScalingKind::LongRope { short_factor: list("short_factor")?, long_factor: list("long_factor")?, original_max_position_embeddings: orig, attention_factor };
            return Ok(Some(RopeScaling { factor, kind }));
        }
        other => bail!("unsupported rope scaling type `{other}` (supported: default, llama3, linear, longrope)"),
    };
    Ok(Some(RopeScaling { factor: g("factor")?, kind }))
}

/// [`parse_scaling_with`] without a context (llama3 and linear need none).
pub fn parse_scaling(s: &Map<String, Value>) -> Result<Option<RopeScaling>> {
    parse_scaling_with(s, 0, None)
}

/// The RoPE of a config: full layers', sliding layers' when they differ, and the partial rotary
/// factor. transformers 5 writes `rope_parameters` (keyed by layer type for Gemma 3), older
/// configs `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`).
pub fn parse_config(raw: &Map<String, Value>, head_dim: usize, max_pos: usize) -> Result<(RopeParams, Option<RopeParams>, f64)> {
    let original = raw.get("original_max_position_embeddings").and_then(Value::as_u64).map(|x| x as usize);
    let params = raw.get("rope_parameters").and_then(Value::as_object);
    let one = |p: &Map<String, Value>, theta_default: f64| -> Result<RopeParams> {
        let theta = p.get("rope_theta").and_then(Value::as_f64).unwrap_or(theta_default);
        Ok(RopeParams { theta, scaling: parse_scaling_with(p, max_pos, original)? })
    };
    let top_theta = match raw.get("rope_theta") {
        None | Some(Value::Null) => 10000.0,
        Some(v) => v.as_f64().with_context(|| format!("field `rope_theta` must be a number, got {v}"))?,
    };
    let (full, sliding) = match params {
        Some(p) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
            let get = |k: &str| p.get(k).and_then(Value::as_object).with_context(|| format!("field `rope_parameters.{k}` must be an object"));
            (one(get("full_attention")?, top_theta)?, Some(one(get("sliding_attention")?, top_theta)?))
        }
        Some(p) => {
            let mut full = one(p, top_theta)?;
            if full.scaling.is_none() {
                if let Some(s) = raw.get("rope_scaling").and_then(Value::as_object) {
                    full.scaling = parse_scaling_with(s, max_pos, original)?;
                }
            }
            (full, None)
        }
        None => {
            let scaling = raw.get("rope_scaling").and_then(Value::as_object).map(|s| parse_scaling_with(s, max_pos, original)).transpose()?.flatten();
            (RopeParams { theta: top_theta, scaling }, None)
        }
    };
    let local = match raw.get("rope_local_base_freq").and_then(Value::as_f64) {
        Some(theta) if sliding.is_none() => Some(RopeParams { theta, scaling: None }),
        _ => sliding,
    };
    let partial = params.and_then(|p| p.get("partial_rotary_factor")).or_else(|| raw.get("partial_rotary_factor")).and_then(Value::as_f64).unwrap_or(1.0);
    let rot = (head_dim as f64 * partial) as usize;
    if !(partial > 0.0 && partial <= 1.0) || !rot.is_multiple_of(2) || rot == 0 {
        bail!("field `partial_rotary_factor` ({partial}) must give an even rotary dimension ≤ head_dim {head_dim}, got {rot}");
    }
    Ok((full, local, partial))
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
    /// Rotated dimensions per head (`head_dim · partial_rotary_factor`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// Inverse frequencies of the full-attention layers' rotary embedding, with the scaling
    /// applied (as transformers does; longrope: the short factors).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        inv_freq(&RopeParams { theta: self.rope_theta, scaling: self.rope_scaling.clone() }, self.rotary_dim(), false)
    }
}

/// Inverse frequencies for rotary dimension `d` (longrope: `long` picks its long factors).
fn inv_freq(p: &RopeParams, d: usize, long: bool) -> Vec<f32> {
    // f32 like transformers' `_compute_default_rope_parameters`, so positions far out agree.
    let base = (0..d / 2).map(|i| (p.theta as f32).powf((2 * i) as f32 / d as f32));
    let Some(s) = &p.scaling else { return base.map(|b| 1.0 / b).collect() };
    match &s.kind {
        ScalingKind::Llama3(l) => base.map(|b| l.apply((1.0 / b) as f64) as f32).collect(),
        ScalingKind::Linear => base.map(|b| 1.0 / b / s.factor as f32).collect(),
        ScalingKind::LongRope { short_factor, long_factor, .. } => {
            let ext = if long { long_factor } else { short_factor };
            base.zip(ext).map(|(b, &e)| 1.0 / (e as f32 * b)).collect()
        }
    }
}

/// cos/sin tables for rotary embeddings, `[max_pos, rot_dim/2]` in the compute dtype, and the
/// tables they switch to: sliding layers' (another base), longrope's long factors.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    /// The sliding layers' tables when they differ (Gemma 3's local base).
    pub sliding: Option<Box<Rope>>,
    /// Longrope: `(original_max_position_embeddings, the long factors' tables)`: a sequence
    /// longer than that rotates by the long ones (transformers' dynamic update).
    long: Option<(usize, Box<Rope>)>,
}

/// The tables at the positions of the tokens in flight, `[b, t, rot/2]` each (what
/// [`split_heads`] rotates by), and the sliding layers' when they differ.
pub struct RopeAt {
    pub cos: Tensor,
    pub sin: Tensor,
    pub sliding: Option<Box<RopeAt>>,
}

impl RopeAt {
    pub fn pair(&self) -> Option<(&Tensor, &Tensor)> {
        Some((&self.cos, &self.sin))
    }

    /// The tables of a layer: a sliding layer's when it is one and they differ.
    pub fn layer(&self, sliding: bool) -> &RopeAt {
        match (&self.sliding, sliding) {
            (Some(s), true) => s,
            _ => self,
        }
    }
}

impl Rope {
    pub fn new(cfg: &Config, max_pos: usize, dtype: DType, device: &Device) -> Result<Self> {
        let full = RopeParams { theta: cfg.rope_theta, scaling: cfg.rope_scaling.clone() };
        let mut rope = Self::tables(&full, cfg.rotary_dim(), max_pos, false, dtype, device)?;
        if let Some(local) = &cfg.sliding_rope {
            rope.sliding = Some(Box::new(Self::tables(local, cfg.rotary_dim(), max_pos, false, dtype, device)?));
        }
        Ok(rope)
    }

    /// The tables of one layer type's `p` (`long`: longrope's long factors).
    fn tables(p: &RopeParams, rot: usize, max_pos: usize, long: bool, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inv_freq(p, rot, long);
        let half = inv.len();
        let mut freqs = Vec::with_capacity(max_pos * half);
        for pos in 0..max_pos {
            for f in &inv {
                freqs.push(pos as f32 * f);
            }
        }
        let freqs = Tensor::from_vec(freqs, (max_pos, half), device)?;
        let (mut cos, mut sin) = (freqs.cos()?, freqs.sin()?);
        let mut longer = None;
        if let Some(RopeScaling { kind: ScalingKind::LongRope { attention_factor, original_max_position_embeddings, .. }, .. }) = &p.scaling {
            (cos, sin) = ((cos * *attention_factor)?, (sin * *attention_factor)?);
            if !long {
                longer = Some((*original_max_position_embeddings, Box::new(Self::tables(p, rot, max_pos, true, dtype, device)?)));
            }
        }
        Ok(Self { cos: cos.to_dtype(dtype)?, sin: sin.to_dtype(dtype)?, sliding: None, long: longer })
    }

    /// The tables for a sequence of `len` positions (longrope switches past its original length).
    fn for_len(&self, len: usize) -> &Rope {
        match &self.long {
            Some((orig, long)) if len > *orig => long,
            _ => self,
        }
    }

    /// The tables of a layer: a sliding layer's when it is one and they differ.
    pub fn layer(&self, sliding: bool) -> &Rope {
        match (&self.sliding, sliding) {
            (Some(s), true) => s,
            _ => self,
        }
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> Result<usize> {
        Ok(self.cos.dim(0)?)
    }

    /// The tables at per-token `positions` `[b, t]` (u32): a training batch.
    pub fn gather(&self, positions: &Tensor) -> Result<RopeAt> {
        let at = match &self.long {
            Some(_) => self.for_len(positions.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize + 1),
            None => self,
        };
        let (cos, sin) = gather(&at.cos, &at.sin, positions)?;
        let sliding = self.sliding.as_ref().map(|s| s.gather(positions).map(Box::new)).transpose()?;
        Ok(RopeAt { cos, sin, sliding })
    }

    /// The tables at positions `start..start+t` in each of `b` rows: an inference step.
    pub fn span(&self, b: usize, start: usize, t: usize) -> Result<RopeAt> {
        let at = self.for_len(start + t);
        let rows = |x: &Tensor| -> Result<Tensor> {
            let x = x.narrow(0, start, t)?;
            Ok(x.unsqueeze(0)?.broadcast_as((b, t, x.dim(1)?))?.contiguous()?)
        };
        let sliding = self.sliding.as_ref().map(|s| s.span(b, start, t).map(Box::new)).transpose()?;
        Ok(RopeAt { cos: rows(&at.cos)?, sin: rows(&at.sin)?, sliding })
    }

    /// cos/sin at one position as f32 vectors (CPU f32 tables only): decoding's rotation.
    pub fn row_f32(&self, pos: usize) -> Option<RopeRow> {
        let at = self.for_len(pos + 1);
        let (cos, sin) = crate::kernels::rope::row_f32(&at.cos, &at.sin, pos)?;
        Some(RopeRow { cos, sin })
    }
}

/// The tables at one position, for rotating one token's heads on plain slices (decoding).
pub struct RopeRow {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeRow {
    /// Rotates `x` `[heads·d]` in place (the first `2·cos.len()` of each head when partial).
    pub fn rotate(&self, x: &mut [f32], d: usize) {
        let rot = 2 * self.cos.len();
        if rot == d {
            return crate::kernels::rope::cpu::rope_row_inplace(x, d, &self.cos, &self.sin);
        }
        for head in x.chunks_exact_mut(d) {
            crate::kernels::rope::cpu::rope_row_inplace(&mut head[..rot], rot, &self.cos, &self.sin);
        }
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
/// cos/sin `[b, t, rot/2]`) is given; with `rot < d` only each head's first `rot` dimensions.
pub fn split_heads(x: &Tensor, b: usize, t: usize, heads: usize, d: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    match rope {
        Some((cos, _)) if 2 * cos.dim(D::Minus1)? < d => {
            let y = crate::kernels::rope::split_heads(x, b, t, heads, d, None)?;
            partial(&y, rope, forward)
        }
        _ => crate::kernels::rope::split_heads(x, b, t, heads, d, rope),
    }
}

/// The transpose of [`split_heads`] (for its gradient): `[b, heads, t, d]` → `[b·t, heads·d]`,
/// rotated back when `rope` is given.
pub fn merge_heads(y: &Tensor, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    match rope {
        Some((cos, _)) if 2 * cos.dim(D::Minus1)? < y.dim(D::Minus1)? => crate::kernels::rope::merge_heads(&partial(y, rope, backward)?, None),
        _ => crate::kernels::rope::merge_heads(y, rope),
    }
}

/// `rotate` (forward or backward) on the first `rot` dimensions of each head of `y`
/// `[b, heads, t, d]`, the rest passed through (transformers' partial rotary).
fn partial(y: &Tensor, rope: Option<(&Tensor, &Tensor)>, rotate: fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let Some((cos, sin)) = rope else { return Ok(y.clone()) };
    let (d, rot) = (y.dim(D::Minus1)?, 2 * cos.dim(D::Minus1)?);
    let turned = rotate(&y.narrow(D::Minus1, 0, rot)?.contiguous()?, cos, sin)?;
    Ok(Tensor::cat(&[turned, y.narrow(D::Minus1, rot, d - rot)?], D::Minus1)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phi3(extra: serde_json::Value) -> Config {
        let mut v = serde_json::json!({"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 32, "max_position_embeddings": 512, "original_max_position_embeddings": 64});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        Config::from_json(&v).unwrap()
    }

    /// Partial rotary (transformers: `q_rot, q_pass = q[..., :rot], q[..., rot:]`): the first
    /// `rot` dimensions of each head rotate as a `rot`-sized head, the rest pass; merging
    /// rotates back (the split's transpose), and decoding's row rotation agrees.
    #[test]
    fn partial_rotary_rotates_the_first_dims_only() {
        let c = phi3(serde_json::json!({"partial_rotary_factor": 0.75}));
        assert_eq!(c.rotary_dim(), 12);
        let rope = Rope::new(&c, 16, DType::F32, &Device::Cpu).unwrap();
        let (b, t, h, d) = (1, 5, 4, 16);
        let x = Tensor::arange(0f32, (b * t * h * d) as f32, &Device::Cpu).unwrap().affine(0.01, -1.0).unwrap().reshape((b * t, h * d)).unwrap();
        let at = rope.span(b, 3, t).unwrap();
        let y = split_heads(&x, b, t, h, d, at.pair()).unwrap();
        let plain = split_heads(&x, b, t, h, d, None).unwrap();
        let want = candle_nn::rotary_emb::rope_slow(&plain.narrow(3, 0, 12).unwrap().contiguous().unwrap(), &at.cos.get(0).unwrap(), &at.sin.get(0).unwrap()).unwrap();
        let err = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err(&y.narrow(3, 0, 12).unwrap(), &want) < 1e-6);
        assert_eq!(err(&y.narrow(3, 12, 4).unwrap(), &plain.narrow(3, 12, 4).unwrap()), 0.0);
        assert!(err(&merge_heads(&y, at.pair()).unwrap(), &x) < 1e-6, "merge rotates back");
        let mut row = x.narrow(0, 0, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        rope.row_f32(3).unwrap().rotate(&mut row, d);
        let first = y.narrow(2, 0, 1).unwrap().flatten_all().unwrap();
        assert!(err(&Tensor::new(row, &Device::Cpu).unwrap(), &first) < 1e-6, "decode row");
        let bad = serde_json::json!({"model_type": "phi3", "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8, "partial_rotary_factor": 0.1});
        assert!(Config::from_json(&bad).unwrap_err().to_string().contains("partial_rotary_factor"));
    }

    /// longrope (Phi-3.5): short factors up to the original length, long ones past it, cos/sin
    /// × √(1 + ln(max/original) / ln(original)).
    #[test]
    fn longrope_switches_factors_past_the_original_length() {
        let short: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 * 0.1).collect();
        let long: Vec<f64> = (0..8).map(|i| 2.0 + i as f64).collect();
        let c = phi3(serde_json::json!({"num_attention_heads": 4, "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}));
        let s = c.rope_scaling.as_ref().unwrap();
        let ScalingKind::LongRope { attention_factor, .. } = s.kind else { panic!("longrope") };
        assert!((attention_factor - (1.0 + (8f64).ln() / (64f64).ln()).sqrt()).abs() < 1e-12);
        let inv = c.rope_inv_freq();
        assert!((inv[3] as f64 - 1.0 / (1.3 * 10000f64.powf(6.0 / 16.0))).abs() < 1e-7);
        let rope = Rope::new(&c, 128, DType::F32, &Device::Cpu).unwrap();
        let angle = |r: &RopeRow, i: usize| (r.sin[i] as f64).atan2(r.cos[i] as f64);
        let scale = |r: &RopeRow| ((r.cos[0] as f64).powi(2) + (r.sin[0] as f64).powi(2)).sqrt();
        let (a, b) = (rope.row_f32(10).unwrap(), rope.row_f32(100).unwrap());
        assert!((scale(&a) - attention_factor).abs() < 1e-5 && (scale(&b) - attention_factor).abs() < 1e-5);
        let f = |e: f64| 1.0 / (e * 10000f64.powf(2.0 / 16.0));
        assert!((angle(&a, 1) - 10.0 * f(1.1)).abs() < 1e-5, "short factors within the original length");
        let want = (100.0 * f(3.0) + std::f64::consts::PI).rem_euclid(2.0 * std::f64::consts::PI) - std::f64::consts::PI;
        assert!((angle(&b, 1) - want).abs() < 1e-4, "long factors past it");
    }
}
