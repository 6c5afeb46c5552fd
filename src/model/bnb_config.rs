//! `BitsAndBytesConfig`: the options of a 4-bit model (transformers' class of that name) and
//! config.json's `quantization_config` both ways. A leaf module, so that loading (llama.rs) and
//! the 4-bit pipeline (quantized.rs) both use it without importing each other.

use crate::quant::{QuantType, DEFAULT_BLOCKSIZE};
use anyhow::{bail, Result};
use candle_core::DType;
use serde_json::{json, Value};

/// transformers' `BitsAndBytesConfig` for 4-bit loading (8-bit is not supported).
#[derive(Debug, Clone, PartialEq)]
pub struct BnbConfig {
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`: quantize the absmax statistics too.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: the dtype 4-bit weights are dequantized to for matmuls.
    pub compute_dtype: DType,
    /// `bnb_4bit_quant_storage`: the dtype the packed bytes are saved as (U8 by default).
    pub quant_storage: DType,
    /// `llm_int8_skip_modules`: modules kept in the compute dtype (names, paths or prefixes).
    pub skip_modules: Option<Vec<String>>,
    /// Not a transformers option (it always uses 64); `qscript quantize --blocksize`.
    pub blocksize: usize,
}

impl Default for BnbConfig {
    /// transformers' defaults: fp4, no double quant, float32 compute, uint8 storage.
    fn default() -> Self {
        Self {
            quant_type: QuantType::Fp4,
            double_quant: false,
            compute_dtype: DType::F32,
            quant_storage: DType::U8,
            skip_modules: None,
            blocksize: DEFAULT_BLOCKSIZE,
        }
    }
}

/// A dtype name as transformers writes it (`"bfloat16"`, also `torch.bfloat16`, `bf16`, ...).
pub fn parse_bnb_dtype(key: &str, s: &str) -> Result<DType> {
    let s = s.strip_prefix("torch.").unwrap_or(s);
    super::parse_dtype(s).map_err(|_| anyhow::anyhow!("`{key}`: unknown dtype \"{s}\" (expected float32, bfloat16 or float16)"))
}

/// `bnb_4bit_quant_storage`: uint8 or a float dtype the packed bytes are viewed as.
pub fn parse_quant_storage(s: &str) -> Result<DType> {
    match s.strip_prefix("torch.").unwrap_or(s) {
        "uint8" | "u8" => Ok(DType::U8),
        other => parse_bnb_dtype("bnb_4bit_quant_storage", other),
    }
}

fn storage_name(d: DType) -> &'static str {
    if d == DType::U8 {
        "uint8"
    } else {
        super::dtype_name(d)
    }
}

impl BnbConfig {
    /// Does the decoder module at `path` (e.g. `model.layers.3.mlp.up_proj`) get quantized?
    /// transformers' rule for `llm_int8_skip_modules`: a key skips a module when it is the
    /// module's name, its full path, a suffix of the path, or a prefix followed by a dot.
    pub fn quantizes(&self, path: &str) -> bool {
        let Some(skip) = &self.skip_modules else { return true };
        !skip.iter().any(|k| super::names::selects(path, k) || path.starts_with(&format!("{k}.")) || path.contains(&format!(".{k}.")))
    }

    /// Read a config.json `quantization_config` (as transformers writes it).
    pub fn from_transformers_json(v: &Value) -> Result<Self> {
        let Some(m) = v.as_object() else { bail!("`quantization_config` must be an object") };
        let get = |k: &str| m.get(k).filter(|v| !v.is_null());
        let flag = |k: &str| get(k).or_else(|| get(&format!("_{k}"))).and_then(Value::as_bool).unwrap_or(false);
        match get("quant_method").and_then(Value::as_str) {
            Some("bitsandbytes") | None => {}
            Some(other) => bail!("`quantization_config`: quant_method \"{other}\" is not supported (only bitsandbytes 4-bit)"),
        }
        if flag("load_in_8bit") {
            bail!("`quantization_config`: 8-bit bitsandbytes checkpoints (load_in_8bit) are not supported; only 4-bit");
        }
        if !flag("load_in_4bit") {
            bail!("`quantization_config`: load_in_4bit is not true; only 4-bit bitsandbytes checkpoints are supported");
        }
        let mut c = Self::default();
        if let Some(t) = get("bnb_4bit_quant_type").and_then(Value::as_str) {
            c.quant_type = QuantType::parse(t)?;
        }
        c.double_quant = get("bnb_4bit_use_double_quant").and_then(Value::as_bool).unwrap_or(false);
        if let Some(d) = get("bnb_4bit_compute_dtype").and_then(Value::as_str) {
            c.compute_dtype = parse_bnb_dtype("bnb_4bit_compute_dtype", d)?;
        }
        if let Some(d) = get("bnb_4bit_quant_storage").and_then(Value::as_str) {
            c.quant_storage = parse_quant_storage(d)?;
        }
        c.skip_modules = match get("llm_int8_skip_modules") {
            None => None,
            Some(Value::String(s)) => Some(vec![s.clone()]),
            Some(Value::Array(a)) => Some(a.iter().filter_map(|x| x.as_str().map(String::from)).collect()),
            Some(other) => bail!("`quantization_config`: llm_int8_skip_modules must be a list of names, got {other}"),
        };
        Ok(c)
    }

    /// The `quantization_config` transformers writes for a 4-bit model (same fields and order as
    /// transformers 5's `BitsAndBytesConfig.to_dict()`).
    pub fn to_transformers_json(&self) -> Value {
        json!({
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": super::dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": storage_name(self.quant_storage),
            "bnb_4bit_quant_type": self.quant_type.as_str(),
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": false,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": true,
            "load_in_8bit": false,
            "quant_method": "bitsandbytes",
        })
    }
}
