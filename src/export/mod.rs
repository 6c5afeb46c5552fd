//! Export for deployment: a model as a GGUF file (adapters merged; f16 … q4_k_m), verified by
//! loading it back (`verify.rs`); the LoRA adapter alone as a GGUF LoRA file; the Ollama
//! `Modelfile` beside them (`modelfile.rs`). `model.save_gguf` / `save_gguf_adapter` in
//! recipes and `qscript export` call these. The file formats are `model::gguf_write` and
//! `model::gguf_adapter`.

pub mod modelfile;
pub mod verify;

use crate::data::chat_template::ChatTemplate;
use crate::model::gguf_write::{self, Quantization, Written};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use verify::Prompt;

/// `save_gguf`'s options.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub quantization: Quantization,
    /// Load the file back and compare it with the model (`verify.rs`) before it is moved in.
    pub verify: bool,
    /// Prompts to verify on (texts; rendered with the chat template when the model has one);
    /// empty: [`DEFAULT_PROMPTS`].
    pub prompts: Vec<String>,
    /// Write `OUT.Modelfile` beside the file.
    pub modelfile: bool,
}

impl Default for GgufOptions {
    fn default() -> Self {
        Self { quantization: Quantization::F16, verify: true, prompts: vec![], modelfile: true }
    }
}

/// Questions the verification asks when the recipe gives none.
pub const DEFAULT_PROMPTS: [&str; 3] = ["What is the capital of France?", "Write a short poem about the sea.", "Explain in one sentence what a neural network is."];

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub path: PathBuf,
    pub quantization: Option<Quantization>,
    pub written: Written,
    pub verified: Option<verify::Report>,
    pub modelfile: Option<PathBuf>,
}

impl Exported {
    pub fn describe(&self) -> String {
        let mb = self.written.bytes as f64 / 1e6;
        let types: Vec<String> = self.written.types.iter().map(|(t, n)| format!("{t}×{n}")).collect();
        let mut s = format!("wrote {} ({mb:.1} MB{}; tensors {})", self.path.display(), self.quantization.map_or(String::new(), |q| format!(", {}", q.name())), types.join(" "));
        if let Some(v) = &self.verified {
            s.push_str(&format!("\nverified by reloading: {}", v.describe()));
        }
        if let Some(m) = &self.modelfile {
            s.push_str(&format!("\nOllama: ollama create NAME -f {}", m.display()));
        }
        s
    }
}

/// The one place an export decides where it writes: `path` as given, checked to be a file
/// path in an existing, writable directory before any work is done. (Recipe file-access
/// permissions, issue 17, hook in here.)
pub fn output_path(path: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if path.is_empty() || p.file_name().is_none() {
        bail!("{path:?}: not a file path");
    }
    if p.is_dir() {
        bail!("{}: is a directory", p.display());
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("{}: directory {} does not exist", p.display(), parent.display());
    }
    // A probe file: permissions, read-only mounts and full quotas all show here, not after
    // minutes of quantizing.
    let probe = parent.join(format!(".{}.probe-{}", p.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| anyhow::anyhow!("{}: cannot write in {}: {e}", p.display(), parent.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(p)
}

/// `model.save_gguf(path, opts)`: the model (adapters merged in; the model itself unchanged)
/// as a GGUF file, verified against the model before it is moved to `path`, then the
/// Modelfile.
pub fn save_gguf(model: &Model, path: &Path, opts: &GgufOptions) -> Result<Exported> {
    let prompts = if opts.verify { prompts(model, &opts.prompts)? } else { vec![] };
    let mut verified = None;
    let written = gguf_write::write_model_checked(model, path, opts.quantization, |tmp| {
        if opts.verify {
            let r = verify::verify(model, tmp, opts.quantization, &prompts).map_err(|e| anyhow::anyhow!("verify: {}", format!("{e:#}").replace(&tmp.display().to_string(), &path.display().to_string())))?;
            verified = Some(r);
        }
        Ok(())
    })?;
    let modelfile = match opts.modelfile {
        true => Some(write_modelfile(model, path, path, None)?),
        false => None,
    };
    Ok(Exported { path: path.to_path_buf(), quantization: Some(opts.quantization), written, verified, modelfile })
}

/// `model.save_gguf_adapter(path)`: the LoRA adapters alone as a GGUF LoRA file. The Modelfile
/// (`FROM` the base, `ADAPTER` this file) is written when the base is a GGUF file.
pub fn save_gguf_adapter(model: &Model, path: &Path, base_gguf: Option<&Path>) -> Result<Exported> {
    crate::model::gguf_adapter::write_adapter(&model.llama, &adapter_name(model), path)?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let n = model.llama.adapters().count();
    let written = Written { bytes, types: vec![("F32".into(), 2 * n)] };
    let modelfile = match base_gguf {
        Some(base) => Some(write_modelfile(model, path, base, Some(path))?),
        None => None,
    };
    Ok(Exported { path: path.to_path_buf(), quantization: None, written, verified: None, modelfile })
}

fn adapter_name(model: &Model) -> String {
    let base = model.name_or_path.trim_end_matches('/').rsplit('/').next().unwrap_or("model").to_string();
    format!("{base}-lora")
}

fn write_modelfile(model: &Model, next_to: &Path, from: &Path, adapter: Option<&Path>) -> Result<PathBuf> {
    let at = modelfile::modelfile_path(next_to);
    crate::util::fs::write(&at, modelfile::render(model, &at, from, adapter).as_bytes())?;
    Ok(at)
}

/// The verification prompts: `texts` (else [`DEFAULT_PROMPTS`]) as user messages through the
/// chat template, or as raw text without one; a model without a tokenizer gets fixed id
/// sequences.
pub fn prompts(model: &Model, texts: &[String]) -> Result<Vec<Prompt>> {
    let texts: Vec<String> = if texts.is_empty() { DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect() } else { texts.to_vec() };
    let Some(tok) = &model.tokenizer else {
        let v = model.config().vocab_size as u64;
        return Ok((0..3u64).map(|k| Prompt { text: None, ids: (0..12u64).map(|i| ((i * 7919 + k * 104_729 + 1) % v) as u32).collect() }).collect());
    };
    let template = ChatTemplate::of_model(model)?;
    texts
        .into_iter()
        .map(|t| {
            let ids = match &template {
                Some(tpl) => {
                    let text = tpl.render(&[serde_json::json!({"role": "user", "content": t})], true, &serde_json::Map::new())?;
                    tok.encode(&text, false)?
                }
                None => tok.encode(&t, true)?,
            };
            anyhow::ensure!(!ids.is_empty(), "verify: prompt {t:?} has no tokens");
            Ok(Prompt { text: Some(t), ids })
        })
        .collect::<Result<_>>()
        .context("verify: cannot build the prompts")
}
