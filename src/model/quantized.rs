//! 4-bit models (bitsandbytes layout): the checkpoint tensors of a 4-bit model (what
//! `save_pretrained` and `qscript quantize` write) and `qscript quantize` itself. The options
//! (`BnbConfig`, which modules get quantized) live in `bnb_config.rs`.

pub use super::bnb_config::{parse_bnb_dtype, parse_quant_storage, BnbConfig};
use super::llama::{Linear, Llama, Weight};
use super::names;
use crate::util::fs::Existing;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// The checkpoint tensors of one 4-bit weight `name` (`...q_proj.weight`) in bnb's layout, the
/// packed bytes viewed as `storage` (bnb's `quant_storage`; U8 normally).
pub fn bnb_weight_tensors(q: &crate::quant::Quantized4bit, name: &str, storage: DType) -> Result<Vec<(String, Tensor)>> {
    let mut out = q.to_bnb_tensors(name)?;
    if storage != DType::U8 {
        let size = storage.size_in_bytes();
        if !q.packed.len().is_multiple_of(size) {
            bail!("{name}: {} packed bytes cannot be stored as {storage:?}", q.packed.len());
        }
        out[0].1 = Tensor::from_raw_buffer(&q.packed, storage, &[q.packed.len() / size, 1], &Device::Cpu)?;
    }
    Ok(out)
}

/// The tensors of one linear layer under `path` (`model.layers.0.mlp.up_proj`): a dense
/// weight as is, a 4-bit weight in bnb's layout; plus the bias. (For `save_pretrained`.)
pub fn linear_tensors(lin: &Linear, path: &str, storage: DType) -> Result<Vec<(String, Tensor)>> {
    let name = names::weight_key(path);
    let mut out = match &lin.weight {
        Weight::Dense(w) => vec![(name, w.clone())],
        Weight::Quant4 { q, .. } => bnb_weight_tensors(q, &name, storage)?,
    };
    if let Some(b) = &lin.bias {
        out.push((names::bias_key(path), b.clone()));
    }
    Ok(out)
}

/// Whether any decoder linear of `model` is 4-bit.
pub fn is_quantized(model: &Llama) -> bool {
    model.linears().any(|(_, l)| l.quantized().is_some())
}

/// The 4-bit tensors of `model` (every quantized decoder linear's weight in bnb's layout, keyed
/// `model.layers.N.<proj>.weight[.absmax|.quant_map|...]`). `save_pretrained` writes these next
/// to the dense tensors (skipping those linears' dense `.weight`).
pub fn quantized_tensors(model: &Llama) -> Result<Vec<(String, Tensor)>> {
    let storage = model.quantization.as_ref().map_or(DType::U8, |c| c.quant_storage);
    let mut out = Vec::new();
    for (id, lin) in model.linears() {
        if let Some(q) = lin.quantized() {
            out.extend(bnb_weight_tensors(q, &names::weight_key(&id.path()), storage)?);
        }
    }
    Ok(out)
}

/// config.json's `quantization_config` for `model`, `None` when it has no 4-bit weight.
pub fn quantization_config_json(model: &Llama) -> Option<Value> {
    if !is_quantized(model) {
        return None;
    }
    Some(model.quantization.clone().unwrap_or_default().to_transformers_json())
}

/// Bytes held by a linear's weight: (dense bytes, 4-bit packed bytes, 4-bit statistics bytes).
pub fn weight_bytes(lin: &Linear) -> (usize, usize, usize) {
    match &lin.weight {
        Weight::Dense(w) => (w.elem_count() * w.dtype().size_in_bytes(), 0, 0),
        Weight::Quant4 { q, .. } => (0, q.packed.len(), stats_bytes(q)),
    }
}

/// Statistics of a 4-bit weight as bnb holds them: absmax (f32, or u8 codes + nested f32
/// absmax + 256-entry f32 map + offset) and the 16-entry code book.
pub fn stats_bytes(q: &crate::quant::Quantized4bit) -> usize {
    use crate::quant::Absmax;
    let absmax = match &q.state.absmax {
        Absmax::Plain(a) => 4 * a.len(),
        Absmax::Double { absmax_q, nested_absmax, .. } => absmax_q.len() + 4 * nested_absmax.len() + 4 * 256 + 4,
    };
    absmax + 4 * 16
}

// ---------------------------------------------------------------- `qscript quantize`

/// A tensor ready to write: safetensors dtype, shape and little-endian bytes.
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A CPU tensor's bytes (the dtypes a 4-bit checkpoint holds: u8, f32, bf16, f16).
pub fn raw_tensor(name: &str, t: &Tensor) -> Result<RawTensor> {
    let flat = t.flatten_all()?;
    let (dtype, data): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
        DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
        DType::F32 => (safetensors::Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => (safetensors::Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::F16 => (safetensors::Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        other => bail!("tensor `{name}`: dtype {other:?} cannot be written here"),
    };
    Ok(RawTensor { dtype, shape: t.dims().to_vec(), data })
}

/// Write `tensors` as one safetensors file with `{"format": "pt"}` metadata (what transformers
/// expects); `util::fs` fsyncs it.
pub fn write_raw_safetensors(path: &std::path::Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    let info = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(info), path)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}

/// What `quantize_checkpoint` did.
#[derive(Debug, Default)]
pub struct QuantizeReport {
    /// Tensors quantized to 4 bits and tensors copied unchanged.
    pub quantized: usize,
    pub copied: usize,
    /// Bytes of tensor data read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Quantize one stored tensor; errors name the file and the tensor.
fn quantize_stored(w: &super::weights::WeightFiles, name: &str, cfg: &BnbConfig, report: &mut QuantizeReport) -> Result<Vec<(String, RawTensor)>> {
    let at = w.file_of(name).map(|p| p.display().to_string()).unwrap_or_default();
    let (shape, dtype) = w.info(name)?;
    if !matches!(dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16) {
        bail!("{at}: tensor `{name}` is {dtype:?}, not a floating tensor bitsandbytes quantizes (F32, BF16, F16)");
    }
    if shape.len() != 2 {
        bail!("{at}: tensor `{name}` has shape {shape:?}; only 2-D weights are quantized");
    }
    let t = w.load_stored(name)?;
    report.bytes_in += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let q = crate::quant::quantize_4bit_tensor(&t, cfg.quant_type, cfg.blocksize, cfg.double_quant)
        .map_err(|e| anyhow::anyhow!("{at}: tensor `{name}`: {e:#}"))?;
    drop(t);
    report.quantized += 1;
    let out = bnb_weight_tensors(&q, name, cfg.quant_storage)?
        .into_iter()
        .map(|(n, t)| Ok((n.clone(), raw_tensor(&n, &t)?)))
        .collect::<Result<Vec<_>>>()?;
    report.bytes_out += out.iter().map(|(_, t)| t.data.len() as u64).sum::<u64>();
    Ok(out)
}

fn copy_stored(w: &super::weights::WeightFiles, name: &str, report: &mut QuantizeReport) -> Result<(String, RawTensor)> {
    let (dtype, shape, data) = w.raw(name)?;
    report.copied += 1;
    report.bytes_in += data.len() as u64;
    report.bytes_out += data.len() as u64;
    Ok((name.to_string(), RawTensor { dtype, shape, data }))
}

fn has_bnb_tensors(w: &super::weights::WeightFiles) -> Option<String> {
    w.names().find(|n| names::is_bnb_quant_state_key(n)).map(String::from)
}

/// How `out` is put in place: an existing one (only with `force`) is replaced whole, so `out`
/// is never half-written.
fn existing(force: bool) -> Existing {
    if force { Existing::Replace } else { Existing::Refuse }
}

/// Weight files a model directory copy leaves behind (the quantized `model.safetensors` replaces them).
fn is_weight_file(name: &str) -> bool {
    [".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt"].iter().any(|e| name.ends_with(e))
        || name.ends_with(".index.json")
}

/// `qscript quantize`: `src` an HF model directory (its decoder linears quantized, everything
/// else copied; config.json gains `quantization_config`) or a `.safetensors` file (every 2-D
/// floating tensor quantized). `out` is written next to its final place and renamed in; an
/// existing `out` is refused unless `force`. `progress(done, total, tensor)` after each tensor.
pub fn quantize_checkpoint(src: &std::path::Path, out: &std::path::Path, cfg: &BnbConfig, force: bool, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<QuantizeReport> {
    crate::quant::check_blocksize(cfg.blocksize)?;
    if !src.exists() {
        bail!("{}: no such file or directory", src.display());
    }
    if (out.exists() || out.is_symlink()) && !force {
        bail!("{}: already exists; pass --force to overwrite it", out.display());
    }
    if src.is_dir() { quantize_dir(src, out, cfg, force, progress) } else { quantize_file(src, out, cfg, force, progress) }
}

fn quantize_file(src: &std::path::Path, out: &std::path::Path, cfg: &BnbConfig, force: bool, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<QuantizeReport> {
    let w = super::weights::WeightFiles::open(&[src.to_path_buf()])?;
    if let Some(n) = has_bnb_tensors(&w) {
        bail!("{}: already quantized (tensor `{n}`)", src.display());
    }
    let names: Vec<String> = w.names().map(String::from).collect();
    let mut report = QuantizeReport::default();
    let mut tensors = Vec::new();
    for (i, name) in names.iter().enumerate() {
        crate::check_limits()?;
        let (shape, dtype) = w.info(name)?;
        let floating = matches!(dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F64);
        if floating && shape.len() == 2 {
            if dtype == safetensors::Dtype::F64 {
                bail!("{}: tensor `{name}` is F64; bitsandbytes quantizes F32, BF16 or F16 (convert it first)", src.display());
            }
            tensors.extend(quantize_stored(&w, name, cfg, &mut report)?);
        } else {
            tensors.push(copy_stored(&w, name, &mut report)?);
        }
        progress(i + 1, names.len(), name);
    }
    crate::util::fs::install_file(out, existing(force), |tmp| write_raw_safetensors(tmp, &tensors))?;
    Ok(report)
}

fn quantize_dir(src: &std::path::Path, out: &std::path::Path, cfg: &BnbConfig, force: bool, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<QuantizeReport> {
    let cfg_path = src.join("config.json");
    if !cfg_path.is_file() {
        bail!("{}: no config.json (not an HF model directory)", src.display());
    }
    let config = super::Config::from_file(&cfg_path)?;
    if config.raw.get("quantization_config").is_some_and(|v| !v.is_null()) {
        bail!("{}: the model is already quantized (config.json has a quantization_config)", src.display());
    }
    let w = super::weights::WeightFiles::open_dir(src)?;
    if let Some(n) = has_bnb_tensors(&w) {
        bail!("{}: already quantized (tensor `{n}`)", src.display());
    }
    // The decoder linears, as transformers picks them (lm_head and embeddings stay).
    let mut targets = std::collections::BTreeSet::new();
    for id in names::Family::of(&config).module_ids(config.num_hidden_layers) {
        let path = id.path();
        let name = names::weight_key(&path);
        if !w.contains(&name) {
            bail!("{}: missing tensor `{name}`", src.display());
        }
        if cfg.quantizes(&path) {
            targets.insert(name);
        }
    }
    let names: Vec<String> = w.names().map(String::from).collect();
    let mut report = QuantizeReport::default();
    let mut tensors = Vec::new();
    for (i, name) in names.iter().enumerate() {
        crate::check_limits()?;
        if targets.contains(name) {
            tensors.extend(quantize_stored(&w, name, cfg, &mut report)?);
        } else {
            tensors.push(copy_stored(&w, name, &mut report)?);
        }
        progress(i + 1, names.len(), name);
    }
    let mut config_json = config.raw.clone();
    config_json.insert("quantization_config".into(), cfg.to_transformers_json());
    crate::util::fs::install_dir(out, existing(force), move |tmp| {
        write_raw_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        drop(tensors);
        let text = serde_json::to_string_pretty(&super::save::sorted_json(&Value::Object(config_json)))? + "\n";
        crate::util::fs::write(&tmp.join("config.json"), text.as_bytes())?;
        for entry in std::fs::read_dir(src).with_context(|| format!("{}: cannot list", src.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            // Tokenizer, generation config, chat template, README...: everything but weights.
            if name == "config.json" || is_weight_file(&name) || !entry.path().is_file() {
                continue;
            }
            std::fs::copy(entry.path(), tmp.join(&name)).with_context(|| format!("{}: cannot copy", entry.path().display()))?;
        }
        Ok(())
    })?;
    Ok(report)
}
