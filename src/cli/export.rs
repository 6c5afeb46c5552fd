//! `qscript export gguf SRC OUT.gguf [--base MODEL] [--quant q4_k_m]` and `qscript export
//! gguf-lora SRC OUT.gguf --base MODEL`. SRC is a training run's output_dir (its last
//! checkpoint), a checkpoint or peft adapter directory (with `--base`), or a model (HF
//! directory, .gguf, hub id; no `--base`). An adapter is checked against `--base` before any
//! merge: the run's manifest records the base's config hash, and every tensor's shape must fit.

use crate::export::{self, GgufOptions};
use crate::model::gguf_write::{Quantization, QUANTIZATIONS};
use crate::model::{adapter, LoadOptions, Model};
use crate::train::checkpoint;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const EXAMPLES: &str = "\
Examples:
  qscript export gguf out/run1 model-q4.gguf --base HuggingFaceTB/SmolLM2-135M-Instruct --quant q4_k_m
  qscript export gguf my-hf-model/ model-f16.gguf
  qscript export gguf-lora out/run1 adapter.gguf --base HuggingFaceTB/SmolLM2-135M-Instruct --base-gguf base.gguf

Writes OUT.gguf (verified by loading it back unless --no-verify) and OUT.Modelfile for
`ollama create NAME -f OUT.Modelfile`.";

#[derive(clap::Subcommand)]
pub enum ExportCommand {
    /// A model, or a base with a run's/adapter's LoRA merged in, as one GGUF file
    Gguf {
        /// Run output_dir, checkpoint or adapter directory (with --base), or a model
        src: String,
        out: PathBuf,
        /// The base model the adapter was trained on (hub id, HF directory or .gguf)
        #[arg(long)]
        base: Option<String>,
        /// GGUF file type: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k
        #[arg(long, default_value = "f16")]
        quant: String,
        /// Skip loading the file back and comparing it with the model
        #[arg(long)]
        no_verify: bool,
        /// Do not write OUT.Modelfile
        #[arg(long)]
        no_modelfile: bool,
        /// A prompt to verify on (repeatable; default: three questions through the chat template)
        #[arg(long = "prompt")]
        prompts: Vec<String>,
    },
    /// The LoRA adapter alone as a GGUF LoRA file (llama.cpp --lora, Ollama ADAPTER)
    GgufLora {
        /// Run output_dir, checkpoint or adapter directory
        src: String,
        out: PathBuf,
        /// The base model the adapter was trained on
        #[arg(long)]
        base: String,
        /// The base's GGUF file: OUT.Modelfile then says FROM it, ADAPTER OUT
        #[arg(long)]
        base_gguf: Option<PathBuf>,
    },
}

pub fn run(cmd: ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Gguf { src, out, base, quant, no_verify, no_modelfile, prompts } => {
            let quantization = Quantization::parse(&quant).map_err(|_| anyhow::anyhow!("--quant {quant}: unsupported quantization (supported: {QUANTIZATIONS})"))?;
            let out = export::output_path(&out.display().to_string())?;
            let model = load_source(&src, base.as_deref())?;
            let o = GgufOptions { quantization, verify: !no_verify, prompts, modelfile: !no_modelfile };
            println!("{}", export::save_gguf(&model, &out, &o)?.describe());
        }
        ExportCommand::GgufLora { src, out, base, base_gguf } => {
            let out = export::output_path(&out.display().to_string())?;
            let model = load_source(&src, Some(&base))?;
            if model.llama.adapters().next().is_none() {
                bail!("{src}: no LoRA adapter to export (a model directory? `qscript export gguf` writes models)");
            }
            println!("{}", export::save_gguf_adapter(&model, &out, base_gguf.as_deref())?.describe());
        }
    }
    Ok(())
}

/// Where SRC's adapter is, and the manifest that says which base it was trained on.
struct AdapterSrc {
    dir: PathBuf,
    manifest: Option<PathBuf>,
}

/// SRC as an adapter (a run's last checkpoint, a checkpoint, a peft directory, a GGUF LoRA
/// file), or `None` when it is a model.
fn adapter_source(src: &str) -> Result<Option<AdapterSrc>> {
    let p = Path::new(src);
    let manifest_in = |d: &Path| [d.join(checkpoint::MANIFEST_FILE), d.parent().map(|q| q.join(checkpoint::MANIFEST_FILE)).unwrap_or_default()].into_iter().find(|m| m.is_file());
    if p.is_file() && p.extension().is_some_and(|e| e == "gguf") {
        let is_lora = crate::model::gguf::read_general_type(p)?.as_deref() == Some("adapter");
        return Ok(is_lora.then(|| AdapterSrc { dir: p.to_path_buf(), manifest: None }));
    }
    if !p.is_dir() {
        return Ok(None);
    }
    if p.join(adapter::ADAPTER_CONFIG).is_file() {
        return Ok(Some(AdapterSrc { dir: p.to_path_buf(), manifest: manifest_in(p) }));
    }
    if let Some((_, last)) = checkpoint::list(p).pop() {
        let manifest = manifest_in(&last);
        return Ok(Some(AdapterSrc { dir: last, manifest }));
    }
    if p.join("config.json").is_file() {
        return Ok(None);
    }
    bail!("{src}: neither a run directory (checkpoint-*), an adapter directory ({}) nor a model directory (config.json)", adapter::ADAPTER_CONFIG)
}

/// The model to export: SRC itself, or `--base` with SRC's adapter attached after the checks.
fn load_source(src: &str, base: Option<&str>) -> Result<Model> {
    let opts = LoadOptions::default();
    let Some(a) = adapter_source(src)? else {
        if let Some(b) = base {
            bail!("{src} is a model, not an adapter or run: --base {b} does not apply");
        }
        return Model::load(src, &opts);
    };
    let base = base.with_context(|| format!("{src} holds a LoRA adapter: give the model it was trained on with --base MODEL"))?;
    let mut model = Model::load(base, &opts)?;
    if let Some(m) = &a.manifest {
        let manifest = checkpoint::read_manifest(m)?;
        let ours = checkpoint::config_sha256(model.config());
        if manifest.base_model_config_sha256 != ours {
            bail!(
                "{}: the adapter was trained on `{}` (config sha256 {}…), but --base {base} has another config ({}…): refusing a merge onto the wrong base",
                a.dir.display(), manifest.base_model, &manifest.base_model_config_sha256[..12.min(manifest.base_model_config_sha256.len())], &ours[..12]
            );
        }
    }
    let cfg = adapter::load_adapter(&mut model.llama, &a.dir).map_err(|e| anyhow::anyhow!("the adapter does not fit --base {base}: {e:#}"))?;
    model.lora_config = Some(cfg);
    Ok(model)
}
