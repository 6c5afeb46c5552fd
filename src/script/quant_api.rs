//! `BitsAndBytesConfig(#{...})` (transformers' keys) and the 4-bit views of a model:
//! `model.is_loaded_in_4bit`, `model.get_memory_footprint()`.

use super::config;
use super::model_api::ModelHandle;
use super::{rt, Api};
use crate::model::quantized::{parse_bnb_dtype, parse_quant_storage, BnbConfig};
use crate::quant::QuantType;
use rhai::{Dynamic, Map};

/// A `BitsAndBytesConfig`; `compute_auto`: `bnb_4bit_compute_dtype` left out or "auto", so the
/// load picks it from the device (bfloat16 on a GPU, float32 on the CPU).
#[derive(Clone)]
pub struct BnbConfigHandle {
    pub cfg: BnbConfig,
    pub compute_auto: bool,
}

impl BnbConfigHandle {
    /// transformers' dict, with "auto" where the compute dtype is left to the device.
    fn to_json(&self) -> serde_json::Value {
        let mut j = self.cfg.to_transformers_json();
        if self.compute_auto {
            j["bnb_4bit_compute_dtype"] = "auto".into();
        }
        j
    }
}

/// Check a `BitsAndBytesConfig` map and build the config.
pub fn bnb_config(map: &Map) -> anyhow::Result<BnbConfigHandle> {
    let cfg = config::BNB_CONFIG.check(map).map_err(anyhow::Error::msg)?;
    if cfg.bool("load_in_8bit") == Some(true) {
        anyhow::bail!("BitsAndBytesConfig: load_in_8bit is not supported (qscript implements bitsandbytes 4-bit only); use load_in_4bit: true");
    }
    if cfg.bool("load_in_4bit") != Some(true) {
        anyhow::bail!("BitsAndBytesConfig: set `load_in_4bit: true` (the only mode qscript supports)");
    }
    let mut c = BnbConfig::default();
    if let Some(t) = cfg.str("bnb_4bit_quant_type") {
        c.quant_type = QuantType::parse(&t)?;
    }
    c.double_quant = cfg.bool("bnb_4bit_use_double_quant").unwrap_or(false);
    let compute = cfg.str("bnb_4bit_compute_dtype").filter(|d| d != "auto");
    if let Some(d) = &compute {
        c.compute_dtype = parse_bnb_dtype("bnb_4bit_compute_dtype", d)?;
    }
    if let Some(d) = cfg.str("bnb_4bit_quant_storage") {
        c.quant_storage = parse_quant_storage(&d)?;
    }
    c.skip_modules = cfg.str_list("llm_int8_skip_modules");
    Ok(BnbConfigHandle { cfg: c, compute_auto: compute.is_none() })
}

/// `load_model`'s `quantization_config` value: a BitsAndBytesConfig or its map.
pub fn from_dynamic(v: &Dynamic) -> anyhow::Result<BnbConfigHandle> {
    if let Some(h) = v.clone().try_cast::<BnbConfigHandle>() {
        return Ok(h);
    }
    if let Some(m) = v.clone().try_cast::<Map>() {
        return bnb_config(&m);
    }
    anyhow::bail!("load_model options: `quantization_config` must be a BitsAndBytesConfig(#{{...}}) or a map, got {}", v.type_name())
}

fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<BnbConfigHandle>("BitsAndBytesConfig");
    api.func("BitsAndBytesConfig",
        "BitsAndBytesConfig(#{load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, bnb_4bit_quant_storage, llm_int8_skip_modules}) -> BitsAndBytesConfig",
        "transformers' 4-bit quantization config, for load_model(id, #{ quantization_config: ... }): the decoder linears are quantized \
         to bitsandbytes NF4/FP4 while loading (embeddings, norms and lm_head stay in the compute dtype).",
        |m: Map| rt(bnb_config(&m)));
    api.func("to_dict", "bnb_config.to_dict() -> map", "The config as transformers writes it into config.json's quantization_config.",
        |c: &mut BnbConfigHandle| json_to_dynamic(&c.to_json()));
    api.func("to_string", "to_string(bnb_config) -> string", "The config, as transformers prints it.",
        |c: &mut BnbConfigHandle| format!("BitsAndBytesConfig {}", serde_json::to_string_pretty(&c.to_json()).unwrap_or_default()));
    api.func("to_debug", "to_debug(bnb_config) -> string", "The config, as transformers prints it.",
        |c: &mut BnbConfigHandle| format!("BitsAndBytesConfig {}", c.to_json()));
    api.getter("is_loaded_in_4bit", "model.is_loaded_in_4bit -> bool", "Whether the decoder linears are held in 4 bits.",
        |m: &mut ModelHandle| rt(m.get().map(|m| crate::model::quantized::is_quantized(&m.llama))));
    api.func("get_memory_footprint", "model.get_memory_footprint() -> int",
        "Bytes of all parameters and buffers, as transformers counts them (a 4-bit weight: its packed bytes).",
        |m: &mut ModelHandle| rt(m.get().map(|m| m.memory_footprint() as rhai::INT)));
}
