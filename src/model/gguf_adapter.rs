//! LoRA adapters as GGUF files, both ways: the format llama.cpp's `--lora` and Ollama's
//! `ADAPTER` take (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`;
//! tensors `blk.<i>.<module>.weight.lora_a` `[r, in]` and `.lora_b` `[out, r]`, as
//! `convert_lora_to_gguf.py` writes them). llama.cpp scales every adapter by `alpha / r` with
//! one alpha for the file: a module whose scaling differs (rank or alpha patterns, rsLoRA) has
//! the ratio folded into its B. Llama's q/k rows are permuted as in the base file (B's rows).

use super::gguf::{permute_qk, unpermute_qk};
use super::gguf_write::{write_file, Metadata};
use super::layers::linear::Lora;
use super::llama::Llama;
use super::lora::{LoraConfig, TargetModules};
use super::names::{self, Family, Proj};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

const SUFFIX_A: &str = ".lora_a";
const SUFFIX_B: &str = ".lora_b";

/// The heads a `llama` file permutes the rows of this projection by.
fn permuted_heads(llama: &Llama, arch: &str, p: Proj) -> Option<usize> {
    match (arch, p) {
        ("llama", Proj::Q) => Some(llama.config.num_attention_heads),
        ("llama", Proj::K) => Some(llama.config.num_key_value_heads),
        _ => None,
    }
}

/// Write the adapters of `llama` as a GGUF LoRA file (f32), atomically.
pub fn write_adapter(llama: &Llama, name: &str, path: &Path) -> Result<()> {
    let family = llama.family();
    let arch = family.gguf_arch().with_context(|| format!("GGUF export: no llama.cpp architecture for the {} family", family.name))?;
    let adapters: Vec<_> = llama.adapters().collect();
    let Some((_, first)) = adapters.first() else {
        bail!("GGUF adapter export: the model has no LoRA adapters (attach some with get_peft_model or load_adapter)")
    };
    // One alpha for the file: the first adapter's, so a uniform adapter is written unchanged.
    let alpha = first.scaling * first.rank() as f64;
    let mut tensors = Vec::with_capacity(2 * adapters.len());
    for (id, l) in &adapters {
        let gguf = family.gguf_key(&names::weight_key(&id.path())).context("adapter module without a llama.cpp name")?;
        let f32_cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
        let fold = l.scaling / (alpha / l.rank() as f64);
        let mut b = f32_cpu(&l.b)?;
        if (fold - 1.0).abs() > 1e-12 {
            b = b.affine(fold, 0.0)?;
        }
        if let Some(h) = permuted_heads(llama, arch, id.proj) {
            b = permute_qk(&b, h)?;
        }
        for (suffix, t) in [(SUFFIX_A, f32_cpu(&l.a)?), (SUFFIX_B, b)] {
            tensors.push((format!("{gguf}{suffix}"), QTensor::quantize(&t, GgmlDType::F32)?));
        }
    }
    let mut md = Metadata::default();
    md.push("general.architecture", G::String(arch.into()));
    md.push("general.type", G::String("adapter".into()));
    md.push("general.name", G::String(name.into()));
    md.push("adapter.type", G::String("lora".into()));
    md.push("adapter.lora.alpha", G::F32(alpha as f32));
    md.push("general.quantization_version", G::U32(2));
    write_file(path, &md, &tensors, |_| Ok(()))
}

/// Read a GGUF LoRA file onto `llama` (replacing its adapters), checking first that every
/// tensor names a module of this model with the right shape. Returns the LoRA configuration
/// it amounts to (uniform alpha; ranks per module in `rank_pattern` where they differ).
pub fn read_adapter(llama: &mut Llama, path: &Path) -> Result<LoraConfig> {
    let at = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
    let (alpha, pairs) = adapter_tensors(llama, &content, &mut file).map_err(at)?;
    let mut ranks = BTreeMap::new();
    let mut loaded = Vec::new();
    let family = llama.family();
    let arch = family.gguf_arch().unwrap_or("");
    for (module, (a, mut b)) in pairs {
        let id = llama.module_at(&module).context("checked")?;
        let lin = llama.linear(id).context("checked")?;
        let r = a.dim(0)?;
        if let Some(h) = permuted_heads(llama, arch, id.proj) {
            b = unpermute_qk(&b, h).map_err(at)?;
        }
        let (dtype, dev) = (lin.compute_dtype(), lin.device().clone());
        ranks.insert(module.clone(), r);
        loaded.push((id, Lora { a: a.to_dtype(dtype)?.to_device(&dev)?, b: b.to_dtype(dtype)?.to_device(&dev)?, scaling: alpha / r as f64, dropout: 0.0 }));
    }
    for (_, lin) in llama.linears_mut() {
        lin.lora = None;
    }
    for (id, l) in loaded {
        if let Some(lin) = llama.linear_mut(id) {
            lin.lora = Some(l);
        }
    }
    Ok(config_of(family, alpha, &ranks))
}

/// peft's view of what was read: the most common rank as `r`, the others in `rank_pattern`.
fn config_of(family: &Family, alpha: f64, ranks: &BTreeMap<String, usize>) -> LoraConfig {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for &r in ranks.values() {
        *count.entry(r).or_default() += 1;
    }
    let r = count.iter().max_by_key(|(r, n)| (**n, usize::MAX - **r)).map_or(8, |(r, _)| *r);
    let mut targets: Vec<String> = ranks.keys().filter_map(|m| family.parse_path(m)).map(|id| id.proj.name().to_string()).collect();
    targets.sort();
    targets.dedup();
    LoraConfig {
        r,
        lora_alpha: alpha,
        lora_dropout: 0.0,
        target_modules: TargetModules::Names(targets),
        rank_pattern: ranks.iter().filter(|(_, &k)| k != r).map(|(m, &k)| (m.clone(), k)).collect(),
        ..LoraConfig::default()
    }
}

type Pairs = BTreeMap<String, (Tensor, Tensor)>;

/// The file's alpha and its A/B pairs by module path, checked against `llama`.
fn adapter_tensors(llama: &Llama, content: &Content, file: &mut std::fs::File) -> Result<(f64, Pairs)> {
    let md = &content.metadata;
    let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    if s("general.type").as_deref() != Some("adapter") || s("adapter.type").as_deref() != Some("lora") {
        bail!("not a GGUF LoRA adapter (`general.type = adapter`, `adapter.type = lora` expected)");
    }
    let family = llama.family();
    let arch = s("general.architecture").context("missing GGUF key `general.architecture`")?;
    let ours = family.gguf_arch().unwrap_or("");
    if arch != ours {
        bail!("the adapter is for a `{arch}` model, this model is `{ours}` ({})", family.name);
    }
    let alpha = match md.get("adapter.lora.alpha") {
        Some(v) => v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|_| anyhow::anyhow!("GGUF key `adapter.lora.alpha` must be a number"))?,
        None => bail!("missing GGUF key `adapter.lora.alpha`"),
    };
    let mut halves: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let (base, half) = match (name.strip_suffix(SUFFIX_A), name.strip_suffix(SUFFIX_B)) {
            (Some(b), _) => (b, 0),
            (_, Some(b)) => (b, 1),
            _ => bail!("tensor `{name}` is not a LoRA tensor (`.lora_a` / `.lora_b`)"),
        };
        let hf = family.hf_key_from_gguf(base).with_context(|| format!("tensor `{name}`: no module of a {arch} model is called `{base}`"))?;
        let module = hf.strip_suffix(".weight").with_context(|| format!("tensor `{name}`: LoRA on a bias"))?.to_string();
        if llama.module_at(&module).is_none() {
            bail!("tensor `{name}`: this model has no module `{module}` ({} layers)", llama.layers.len());
        }
        let t = content.tensor(file, name, &Device::Cpu).and_then(|q| q.dequantize(&Device::Cpu)).map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
        halves.entry(module).or_default()[half] = Some(t);
    }
    let mut pairs = Pairs::new();
    for (module, [a, b]) in halves {
        let (Some(a), Some(b)) = (a, b) else { bail!("module `{module}` has one of lora_a / lora_b only") };
        let id = llama.module_at(&module).context("checked")?;
        let (out, inp) = llama.linear(id).context("checked")?.weight_shape()?;
        let r = a.dim(0)?;
        if a.dims() != [r, inp] || b.dims() != [out, r] {
            bail!("module `{module}`: lora_a {:?} and lora_b {:?} do not fit its [{out}, {inp}] weight (expected [r, {inp}] and [{out}, r])", a.dims(), b.dims());
        }
        pairs.insert(module, (a, b));
    }
    if pairs.is_empty() {
        bail!("no LoRA tensors");
    }
    Ok((alpha, pairs))
}
