//! `model.save_gguf(path, #{...})` and `model.save_gguf_adapter(path)`: converts and forwards to
//! `crate::export`.

use super::config;
use super::model_api::ModelHandle;
use super::{rt, Api};
use crate::export::{self, GgufOptions};
use crate::model::gguf_write::Quantization;
use rhai::Map;

fn quiet() -> bool {
    std::env::var_os("QSCRIPT_QUIET").is_some()
}

pub fn save_gguf(m: &ModelHandle, path: &str, opts: &Map) -> anyhow::Result<()> {
    let cfg = config::SAVE_GGUF.check(opts).map_err(anyhow::Error::msg)?;
    let mut o = GgufOptions::default();
    if let Some(q) = cfg.str("quantization") {
        o.quantization = Quantization::parse(&q)?;
    }
    o.verify = cfg.bool("verify").unwrap_or(true);
    o.modelfile = cfg.bool("modelfile").unwrap_or(true);
    o.prompts = cfg.str_list("prompts").unwrap_or_default();
    let path = export::output_path(path)?;
    if !crate::train::distributed::is_main_process() {
        return Ok(()); // rank 0 writes
    }
    let model = m.get()?;
    let done = export::save_gguf(&model, &path, &o)?;
    if !quiet() {
        eprintln!("{}", done.describe());
    }
    Ok(())
}

pub fn save_gguf_adapter(m: &ModelHandle, path: &str, opts: &Map) -> anyhow::Result<()> {
    let cfg = config::SAVE_GGUF_ADAPTER.check(opts).map_err(anyhow::Error::msg)?;
    let path = export::output_path(path)?;
    let base = cfg.str("base_gguf").map(std::path::PathBuf::from);
    if !crate::train::distributed::is_main_process() {
        return Ok(()); // rank 0 writes
    }
    let model = m.get()?;
    let done = export::save_gguf_adapter(&model, &path, base.as_deref())?;
    if !quiet() {
        eprintln!("{}", done.describe());
    }
    Ok(())
}

pub fn register(api: &mut Api) {
    api.func("save_gguf", "model.save_gguf(path)",
        "Write the model as an f16 GGUF file for llama.cpp / Ollama (adapters merged in; the model is unchanged), verified by loading it back, with an Ollama Modelfile beside it.",
        |m: &mut ModelHandle, path: &str| rt(save_gguf(m, path, &Map::new())));
    api.func("save_gguf", "model.save_gguf(path, #{quantization, verify, prompts, modelfile})",
        "Write a GGUF file: quantization \"f32\" | \"f16\" | \"bf16\" | \"q8_0\" | \"q4_k_m\" | \"q5_k_m\" | \"q6_k\"; verify: false skips the reload check.",
        |m: &mut ModelHandle, path: &str, opts: Map| rt(save_gguf(m, path, &opts)));
    api.func("save_gguf_adapter", "model.save_gguf_adapter(path)",
        "Write the LoRA adapters alone as a GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER).",
        |m: &mut ModelHandle, path: &str| rt(save_gguf_adapter(m, path, &Map::new())));
    api.func("save_gguf_adapter", "model.save_gguf_adapter(path, #{base_gguf})",
        "Write the GGUF LoRA file; with base_gguf, an Ollama Modelfile (FROM the base, ADAPTER this) beside it.",
        |m: &mut ModelHandle, path: &str, opts: Map| rt(save_gguf_adapter(m, path, &opts)));
}
