//! The `quant_state.bitsandbytes__{nf4|fp4}` tensor: u8 bytes of the JSON that bnb's
//! `QuantState.as_dict(packed=True)` writes with Python's `json.dumps` (", " and ": "
//! separators; keys quant_type, blocksize, dtype, shape, then nested_blocksize, nested_dtype,
//! nested_offset when double-quantized; the offset as Python's `repr` of the f32 widened to f64).

use super::{check_blocksize, dtype_name, QuantType};
use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde_json::Value;

/// The non-tensor part of a bnb quant state.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbJson {
    pub quant_type: QuantType,
    pub blocksize: usize,
    /// Original dtype ("float32" / "bfloat16" / "float16").
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` when double-quantized.
    pub nested: Option<(usize, f32)>,
}

impl BnbJson {
    /// Serialize exactly like bnb (Python `json.dumps`).
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type,
            self.blocksize,
            dtype_name(self.dtype).unwrap_or("float32"),
            shape.join(", ")
        );
        if let Some((nbs, offset)) = self.nested {
            s += &format!(
                ", \"nested_blocksize\": {nbs}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(offset as f64)
            );
        }
        s.push('}');
        s
    }
}

/// Parse the JSON of a `quant_state.bitsandbytes__*` tensor. Errors name the bad key.
pub fn from_bnb_json(json: &str) -> Result<BnbJson> {
    let v: Value = serde_json::from_str(json).map_err(|e| anyhow::anyhow!("quant state is not valid JSON ({e})"))?;
    let obj = v.as_object().context("quant state JSON is not an object")?;
    let get = |k: &str| obj.get(k).with_context(|| format!("quant state JSON lacks {k:?}"));
    let uint = |k: &str| -> Result<usize> {
        get(k)?.as_u64().map(|u| u as usize).with_context(|| format!("quant state {k:?} is not a non-negative integer"))
    };
    let quant_type = QuantType::parse(get("quant_type")?.as_str().context("quant state \"quant_type\" is not a string")?)?;
    let blocksize = uint("blocksize")?;
    check_blocksize(blocksize)?;
    let dtype = match get("dtype")?.as_str() {
        Some("float32") => DType::F32,
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        other => bail!("quant state \"dtype\" {other:?} is not float32, bfloat16 or float16"),
    };
    let shape = get("shape")?
        .as_array()
        .context("quant state \"shape\" is not a list")?
        .iter()
        .map(|d| d.as_u64().map(|u| u as usize).context("quant state \"shape\" holds a non-integer"))
        .collect::<Result<Vec<_>>>()?;
    let nested = if obj.contains_key("nested_offset") || obj.contains_key("nested_blocksize") {
        let nbs = uint("nested_blocksize")?;
        match get("nested_dtype")?.as_str() {
            Some("float32") => {}
            other => bail!("quant state \"nested_dtype\" {other:?} is not float32"),
        }
        let offset = get("nested_offset")?.as_f64().context("quant state \"nested_offset\" is not a number")?;
        Some((nbs, offset as f32))
    } else {
        None
    };
    for k in obj.keys() {
        if !["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
            .contains(&k.as_str())
        {
            bail!("quant state JSON has an unknown key {k:?}");
        }
    }
    Ok(BnbJson { quant_type, blocksize, dtype, shape, nested })
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation when the
/// decimal exponent is in [-4, 16), else `d.ddde±XX`; integral values keep ".0".
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into(); // json.dumps spelling
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "d.ddde<exp>".
    let e = format!("{:e}", x.abs());
    let (mant, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // value = 0.digits × 10^decpt
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        format!("{first}{frac}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(decpt as usize - digits.len()))
    } else {
        let (a, b) = digits.split_at(decpt as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_matches_python() {
        for (x, want) in [
            (0.0526885986328125, "0.0526885986328125"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (123.0, "123.0"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.25e22, "1.25e+22"),
            (-2.5, "-2.5"),
            (3.4028234663852886e38, "3.4028234663852886e+38"),
            (f32::from_bits(0x3f9d_70a4) as f64, "1.2300000190734863"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn json_round_trip() {
        let j = BnbJson {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: DType::BF16,
            shape: vec![64, 64],
            nested: Some((256, 0.052_688_6)),
        };
        let s = j.to_json();
        assert_eq!(
            s,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0526885986328125}"#
        );
        assert_eq!(from_bnb_json(&s).unwrap(), j);
        let p = BnbJson { nested: None, quant_type: QuantType::Fp4, shape: vec![7], ..j };
        assert_eq!(p.to_json(), r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [7]}"#);
        assert_eq!(from_bnb_json(&p.to_json()).unwrap(), p);
    }
}
