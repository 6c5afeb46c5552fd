//! PEFT adapter files, both directions, and merging.
//!
//! - `adapter_config.json`: peft 0.21's full `LoraConfig` field set (sorted keys, like peft's
//!   `save_pretrained`); fields qscript does not model travel in `LoraConfig::extra` and are
//!   written back unchanged.
//! - `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` `[r, in]` and
//!   `lora_B.weight` `[out, r]`, metadata `{"format": "pt"}`.
//! - `merge_and_unload`: `W += scaling · B·A`, adapters removed.

use super::llama::{Linear, Llama};
use super::layers::linear::Lora;
use super::lora::{InitLoraWeights, LoraConfig, TargetModules};
use super::names::{self, LoraHalf};
use super::save::write_safetensors;
use super::weights::WeightFiles;
use crate::util::fs::{install_dir, write, Existing};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The peft release whose adapter_config.json layout is written.
pub const PEFT_VERSION: &str = "0.21.0";

/// peft 0.21's defaults for the fields `LoraConfig` does not model (its `save_pretrained`
/// writes all of them).
fn peft_defaults() -> Map<String, Value> {
    let v = json!({
        "alora_invocation_tokens": null, "arrow_config": null, "auto_mapping": null, "bias": "none",
        "corda_config": null, "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null,
        "fan_in_fan_out": false, "kasa_config": null, "layer_replication": null, "layers_pattern": null,
        "layers_to_transform": null, "loftq_config": {}, "lora_bias": false, "lora_ga_config": null,
        "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
        "monteclora_config": null, "peft_version": PEFT_VERSION, "qalora_group_size": 16, "revision": null,
        "target_parameters": null, "trainable_token_indices": null, "use_bdlora": null, "use_dora": false,
        "use_qalora": false, "velora_config": null,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// Fields `LoraConfig` models or the writer sets; everything else goes to `extra`.
const MODELED: [&str; 12] = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights", "rank_pattern",
    "alpha_pattern", "task_type", "peft_type", "base_model_name_or_path", "inference_mode",
];

/// Fields that would change what the adapter computes when set away from their default.
const UNSUPPORTED: [(&str, &str); 14] = [
    ("use_dora", "DoRA adapters"),
    ("modules_to_save", "fully trained extra modules"),
    ("bias", "trained biases"),
    ("lora_bias", "LoRA biases"),
    ("fan_in_fan_out", "transposed (Conv1D) weights"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "replicated layers"),
    ("target_parameters", "LoRA on parameters"),
    ("use_qalora", "QALoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("kasa_config", "KaSA"),
    ("monteclora_config", "MonteCLoRA"),
];

/// Informational fields: never reported.
const SILENT: [&str; 6] = ["auto_mapping", "revision", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying"];

/// A JSON number the way Python writes it: integral values as ints (peft's `lora_alpha: 16`).
fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// "Nothing set": null, false, or an empty list/object.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `cfg` as peft 0.21 writes `adapter_config.json` (keys sorted). An empty
/// `base_model_name_or_path` is written as null (what peft writes for a model without one).
pub fn config_to_json(cfg: &LoraConfig, base_model_name_or_path: &str) -> Value {
    let mut m: BTreeMap<String, Value> = peft_defaults().into_iter().collect();
    for (k, v) in &cfg.extra {
        if !MODELED.contains(&k.as_str()) {
            m.insert(k.clone(), v.clone());
        }
    }
    let name = if base_model_name_or_path.is_empty() { Value::Null } else { base_model_name_or_path.into() };
    let target = match &cfg.target_modules {
        TargetModules::Names(n) => json!(n),
        TargetModules::Regex(r) => json!(r),
        TargetModules::AllLinear => json!("all-linear"),
        TargetModules::FamilyDefault => json!(names::LLAMA.default_target_names()),
    };
    let init = match cfg.init_lora_weights {
        InitLoraWeights::Default => json!(true),
        InitLoraWeights::Gaussian => json!("gaussian"),
        InitLoraWeights::Random => json!(false),
    };
    let rank: Map<String, Value> = cfg.rank_pattern.iter().map(|(k, &r)| (k.clone(), r.into())).collect();
    let alpha: Map<String, Value> = cfg.alpha_pattern.iter().map(|(k, &a)| (k.clone(), num(a))).collect();
    for (k, v) in [
        ("peft_type", json!("LORA")),
        ("base_model_name_or_path", name),
        ("inference_mode", json!(true)),
        ("r", json!(cfg.r)),
        ("lora_alpha", num(cfg.lora_alpha)),
        ("lora_dropout", json!(cfg.lora_dropout)),
        ("target_modules", target),
        ("use_rslora", json!(cfg.use_rslora)),
        ("init_lora_weights", init),
        ("rank_pattern", Value::Object(rank)),
        ("alpha_pattern", Value::Object(alpha)),
        ("task_type", cfg.task_type.clone().map_or(Value::Null, Value::String)),
    ] {
        m.insert(k.into(), v);
    }
    Value::Object(m.into_iter().collect())
}

/// Read a peft `adapter_config.json` value (`origin` names it in errors). Returns the config
/// and the fields set to something qscript ignores (they do not change what a loaded adapter
/// computes; the caller reports them). Fields that would change it are errors.
pub fn config_from_json(v: &Value, origin: &str) -> Result<(LoraConfig, Vec<String>)> {
    let Some(obj) = v.as_object() else { bail!("{origin}: expected a JSON object") };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") | None => {}
        Some(other) => bail!("{origin}: `peft_type: \"{other}\"` is not supported (only LORA)"),
    }
    let mut cfg = LoraConfig::default();
    if let Some(v) = get("r") {
        cfg.r = v.as_u64().filter(|&r| r > 0).with_context(|| format!("{origin}: `r` must be a positive integer, got {v}"))? as usize;
    }
    // peft's default lora_alpha is 8 (not r).
    if let Some(v) = get("lora_alpha") {
        cfg.lora_alpha = v.as_f64().with_context(|| format!("{origin}: `lora_alpha` must be a number, got {v}"))?;
    }
    if let Some(v) = get("lora_dropout") {
        cfg.lora_dropout = v.as_f64().with_context(|| format!("{origin}: `lora_dropout` must be a number, got {v}"))?;
    }
    if let Some(v) = get("use_rslora") {
        cfg.use_rslora = v.as_bool().with_context(|| format!("{origin}: `use_rslora` must be true or false, got {v}"))?;
    }
    cfg.target_modules = match get("target_modules") {
        None => TargetModules::FamilyDefault, // peft's default for the model's family
        Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .map(|x| x.as_str().map(String::from).with_context(|| format!("{origin}: `target_modules` entries must be strings, got {x}")))
                .collect::<Result<_>>()?,
        ),
        Some(other) => bail!("{origin}: `target_modules` must be a list of names or a regex string, got {other}"),
    };
    let mut ignored = Vec::new();
    cfg.init_lora_weights = match get("init_lora_weights") {
        None | Some(Value::Bool(true)) => InitLoraWeights::Default,
        Some(Value::Bool(false)) => InitLoraWeights::Random,
        Some(Value::String(s)) if s == "gaussian" => InitLoraWeights::Gaussian,
        // Initialisations that leave the base weights alone: the saved A and B say it all.
        Some(Value::String(s)) if s == "eva" || s == "orthogonal" => {
            ignored.push(format!("init_lora_weights (\"{s}\")"));
            InitLoraWeights::Default
        }
        Some(Value::String(s)) => bail!(
            "{origin}: `init_lora_weights: \"{s}\"` is not supported (it changes the base weights; convert the adapter with peft's path_initial_model_for_weight_conversion)"
        ),
        Some(other) => bail!("{origin}: `init_lora_weights` must be true, false or \"gaussian\", got {other}"),
    };
    if let Some(v) = get("rank_pattern") {
        let m = v.as_object().with_context(|| format!("{origin}: `rank_pattern` must be an object, got {v}"))?;
        for (k, r) in m {
            let r = r.as_u64().filter(|&r| r > 0).with_context(|| format!("{origin}: rank_pattern `{k}` must be a positive integer, got {r}"))?;
            cfg.rank_pattern.insert(k.clone(), r as usize);
        }
    }
    if let Some(v) = get("alpha_pattern") {
        let m = v.as_object().with_context(|| format!("{origin}: `alpha_pattern` must be an object, got {v}"))?;
        for (k, a) in m {
            let a = a.as_f64().with_context(|| format!("{origin}: alpha_pattern `{k}` must be a number, got {a}"))?;
            cfg.alpha_pattern.insert(k.clone(), a);
        }
    }
    cfg.task_type = match get("task_type") {
        None => None,
        Some(v) => Some(v.as_str().with_context(|| format!("{origin}: `task_type` must be a string, got {v}"))?.to_string()),
    };
    let defaults = peft_defaults();
    for (k, v) in obj {
        if MODELED.contains(&k.as_str()) {
            continue;
        }
        let default = defaults.get(k);
        let is_default = default == Some(v) || is_unset(v);
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(u, _)| u == k) {
            if !is_default {
                bail!("{origin}: `{k}: {v}` is not supported ({what})");
            }
        } else if !is_default && !SILENT.contains(&k.as_str()) {
            ignored.push(k.clone());
        }
        cfg.extra.insert(k.clone(), v.clone());
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    Ok((cfg, ignored))
}

/// Read `dir/adapter_config.json`, reporting ignored fields once on stderr.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    if !path.is_file() {
        bail!("{}: not found (not a PEFT adapter directory)", path.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()))?;
    let (cfg, ignored) = config_from_json(&v, &path.display().to_string())?;
    if !ignored.is_empty() {
        eprintln!("{}: ignoring fields peft uses that qscript does not: {}", path.display(), ignored.join(", "));
    }
    Ok(cfg)
}

/// `model.save_pretrained(dir)` for an adapted model: `adapter_config.json` (from `cfg`, peft
/// 0.21's layout) and `adapter_model.safetensors` (the adapters in their own dtype), written
/// atomically: a new `dir` appears in one rename; in an existing one the two files are
/// replaced (each atomically) and other files are left alone. `cfg` must describe the
/// adapters (targets, ranks, scalings), else peft would load something else: error.
pub fn save_adapter(model: &Llama, cfg: &LoraConfig, base_model_name_or_path: &str, dir: &Path) -> Result<()> {
    cfg.validate()?;
    let mut tensors = Vec::new();
    for (id, l) in model.adapters() {
        let path = &id.path();
        if !cfg.targets(path) {
            bail!("save_adapter: module `{path}` has an adapter but the config's target_modules {:?} does not select it (peft would drop it)", cfg.target_modules);
        }
        let (r, scaling) = cfg.rank_and_scaling(path);
        if l.rank() != r {
            bail!("save_adapter: module `{path}` has an adapter of rank {} but the config says r = {r}", l.rank());
        }
        if (l.scaling - scaling).abs() > 1e-9 * scaling.abs().max(1.0) {
            bail!("save_adapter: module `{path}` has scaling {} but the config gives {scaling} (lora_alpha / r{})", l.scaling, if cfg.use_rslora { ", rsLoRA" } else { "" });
        }
        // A multimodal checkpoint's language model (Gemma 3): peft's names on that model.
        let file_path = if model.config.nested_text_config { names::multimodal_module_path(path, names::LANGUAGE_MODEL_LAYOUTS[0]) } else { path.clone() };
        tensors.extend(LoraHalf::BOTH.map(|half| (names::peft_key(&file_path, half), half.tensor(l).clone())));
    }
    if tensors.is_empty() {
        bail!("save_adapter: the model has no LoRA adapters (attach some with get_peft_model or load_adapter)");
    }
    let config = serde_json::to_string_pretty(&config_to_json(cfg, base_model_name_or_path))?;
    install_dir(dir, Existing::Merge, |tmp| {
        write_safetensors(&tmp.join(ADAPTER_WEIGHTS), &tensors)?;
        write(&tmp.join(ADAPTER_CONFIG), config.as_bytes())
    })
}

/// `PeftModel.from_pretrained(model, dir)` / `model.load_adapter(dir)`: read a peft-written (or,
/// for a `.gguf` path, a llama.cpp LoRA file: `gguf_adapter::read_adapter`)
/// adapter and attach it to exactly the modules its safetensors file holds, replacing any
/// adapters the model had. Scaling is `lora_alpha / r` (`/ √r` with rsLoRA, per-module
/// `rank_pattern` / `alpha_pattern`); adapters are stored in the layers' compute dtype.
/// Everything is checked before the model is touched: target modules the model lacks, keys
/// that map to no module, missing A/B halves and shapes are one-line errors naming the file
/// and tensor.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraConfig> {
    // A GGUF LoRA file (llama.cpp's format) instead of a peft directory.
    if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
        return super::gguf_adapter::read_adapter(model, dir);
    }
    let cfg = read_config(dir)?.for_family(model.family());
    let wpath = dir.join(ADAPTER_WEIGHTS);
    if !wpath.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() { " (adapter_model.bin is a pickle; qscript reads safetensors only)" } else { "" };
        bail!("{}: not found{hint}", wpath.display());
    }
    check_targets(model, &cfg, &dir.join(ADAPTER_CONFIG))?;
    let files = WeightFiles::open(std::slice::from_ref(&wpath))?;
    let pairs = pair_keys(model, &cfg, &files, &wpath)?;
    let wfile = wpath.display();
    let mut loaded = Vec::with_capacity(pairs.len());
    for (module, [a_key, b_key]) in &pairs {
        let (Some(a_key), Some(b_key)) = (a_key, b_key) else {
            let (has, lacks) = if a_key.is_some() { (LoraHalf::A, LoraHalf::B) } else { (LoraHalf::B, LoraHalf::A) };
            bail!("{wfile}: module `{module}` has {} but no `{}`", has.name(), names::peft_key(module, lacks));
        };
        let Some((id, lin)) = model.module_at(module).and_then(|id| Some((id, model.linear(id)?))) else { continue };
        let (out, inp) = lin.weight_shape()?;
        let (r, scaling) = cfg.rank_and_scaling(module);
        for (key, want) in [(a_key, [r, inp]), (b_key, [out, r])] {
            let (shape, _) = files.info(key)?;
            if shape != want {
                bail!("{wfile}: tensor `{key}` has shape {shape:?}, expected {want:?} (module {module} is [{out}, {inp}], r = {r} from {ADAPTER_CONFIG})");
            }
        }
        let (dtype, dev) = (lin.compute_dtype(), lin.device().clone());
        let a = files.load(a_key, None, dtype, &dev)?;
        let b = files.load(b_key, None, dtype, &dev)?;
        loaded.push((id, Lora { a, b, scaling, dropout: cfg.lora_dropout }));
    }
    for (_, lin) in model.linears_mut() {
        lin.lora = None;
    }
    for (id, l) in loaded {
        if let Some(lin) = model.linear_mut(id) {
            lin.lora = Some(l);
        }
    }
    Ok(cfg)
}

/// "N layers of q_proj, k_proj, ...", what error messages say the model has.
fn layers_desc(model: &Llama) -> String {
    format!("{} layers of {}", model.layers.len(), model.family().proj_names())
}

/// Every target module `cfg` names must exist in `model` (peft refuses the adapter otherwise).
fn check_targets(model: &Llama, cfg: &LoraConfig, cfg_path: &Path) -> Result<()> {
    let modules: Vec<String> = model.linears().map(|(id, _)| id.path()).collect();
    let layers_desc = layers_desc(model);
    match &cfg.target_modules {
        TargetModules::Names(list) => {
            for n in list {
                let found = n == names::LM_HEAD || modules.iter().any(|m| names::selects(m, n));
                if !found {
                    bail!("{}: target module `{n}` matches no module of this model ({layers_desc})", cfg_path.display());
                }
            }
        }
        TargetModules::Regex(r) => {
            // A multimodal model's regex names the language model's modules by their paths there.
            let targeted = |m: &String| cfg.targets(m) || names::LANGUAGE_MODEL_LAYOUTS.iter().any(|&l| cfg.targets(&names::multimodal_module_path(m, l)));
            if !modules.iter().any(targeted) {
                bail!("{}: target_modules regex `{r}` matches no module of this model ({layers_desc})", cfg_path.display());
            }
        }
        TargetModules::AllLinear | TargetModules::FamilyDefault => {}
    }
    Ok(())
}

/// The adapter file's keys by module path: `[A key, B key]`, each key checked to name a module
/// of `model` that `cfg` targets.
fn pair_keys(model: &Llama, cfg: &LoraConfig, files: &WeightFiles, wpath: &Path) -> Result<BTreeMap<String, [Option<String>; 2]>> {
    let wfile = wpath.display();
    let layers_desc = layers_desc(model);
    let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    let mut skipped = 0;
    for key in files.names() {
        let Some((file_module, half)) = names::parse_peft_key(key) else {
            bail!("{wfile}: tensor `{key}` is not a LoRA weight qscript can load (expected {} / .lora_B.weight)", names::peft_key("<module>", LoraHalf::A));
        };
        // An adapter of a multimodal model (Gemma 3): its language model's modules by the text
        // model's names; the vision tower's and projector's are not ours to load.
        let Some(module) = names::text_module_path(file_module) else {
            skipped += 1;
            continue;
        };
        if model.module_at(&module).is_none() {
            bail!("{wfile}: tensor `{key}`: this model has no module `{module}` ({layers_desc})");
        }
        if !cfg.targets(file_module) && !cfg.targets(&module) {
            bail!("{wfile}: tensor `{key}`: module `{module}` is not selected by target_modules {:?} in {ADAPTER_CONFIG} (peft would ignore it)", cfg.target_modules);
        }
        pairs.entry(module).or_default()[half as usize] = Some(key.to_string());
    }
    if pairs.is_empty() {
        bail!("{wfile}: no LoRA tensors{}", if skipped > 0 { format!(" of the language model ({skipped} of the vision tower / projector)") } else { String::new() });
    }
    if skipped > 0 {
        eprintln!("note: {wfile}: {skipped} LoRA tensors of the vision tower / projector skipped (qscript loads the language model)");
    }
    Ok(pairs)
}

/// `model.merge_and_unload()`: fold every adapter into its weight, `W += scaling · B·A`
/// (computed in f32, stored in the weight's compute dtype), and remove the adapters. Returns
/// how many were merged. A 4-bit base is merged on its dequantized weight
/// (`Linear::dense_weight`), so the result is a plain 16/32-bit model — it is not re-quantized.
pub fn merge_and_unload(model: &mut Llama) -> Result<usize> {
    let mut n = 0;
    for (_, lin) in model.linears_mut() {
        if lin.lora.is_none() {
            continue;
        }
        let merged = merged_weight(lin)?;
        // A fresh dense layer: the weight (whatever its storage was) and no adapter.
        *lin = Linear::new(merged.to_dtype(lin.compute_dtype())?, lin.bias.take());
        n += 1;
    }
    Ok(n)
}

/// A linear's weight with its adapter folded in, `W + scaling · B·A`, computed in f32 (the
/// dense or dequantized weight when it has no adapter).
pub fn merged_weight(lin: &Linear) -> Result<Tensor> {
    let w = lin.dense_weight()?.to_dtype(DType::F32)?;
    let Some(l) = &lin.lora else { return Ok(w) };
    let ba = l.b.to_dtype(DType::F32)?.matmul(&l.a.to_dtype(DType::F32)?)?;
    Ok((w + (ba * l.scaling)?)?)
}
