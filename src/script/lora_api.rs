//! `LoraConfig(#{...})`, `get_peft_model`, `print_trainable_parameters`, `set_seed`.

use super::config::{self, Cfg};
use super::model_api::ModelHandle;
use super::{rt, Api, RhaiResult};
use crate::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
use rhai::Map;
use std::sync::atomic::{AtomicU64, Ordering};

/// The seed for adapter initialisation and (later) training defaults; `set_seed(n)` changes it.
/// 42 is transformers' TrainingArguments default.
pub static SEED: AtomicU64 = AtomicU64::new(42);

#[derive(Clone)]
pub struct LoraConfigHandle(pub LoraConfig);

fn float_map(cfg: &Cfg, key: &str) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut out = std::collections::BTreeMap::new();
    if let Some(m) = cfg.get(key).and_then(|v| v.clone().try_cast::<Map>()) {
        for (k, v) in m {
            let x = v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64));
            let x = x.ok_or_else(|| anyhow::anyhow!("LoraConfig: `{key}.{k}` must be a number"))?;
            out.insert(k.to_string(), x);
        }
    }
    Ok(out)
}

pub fn lora_config(map: &Map) -> anyhow::Result<LoraConfig> {
    let cfg = config::LORA_CONFIG.check(map).map_err(anyhow::Error::msg)?;
    // No target_modules: peft's default for the model's family, resolved when attached.
    let mut c = LoraConfig { target_modules: TargetModules::FamilyDefault, ..LoraConfig::default() };
    if let Some(r) = cfg.usize("r").map_err(anyhow::Error::msg)? {
        c.r = r;
        c.lora_alpha = r as f64; // peft: lora_alpha defaults to 8 = default r; keep alpha/r = 1 when only r is given
    }
    if let Some(a) = cfg.float("lora_alpha") {
        c.lora_alpha = a;
    }
    if let Some(p) = cfg.float("lora_dropout") {
        c.lora_dropout = p;
    }
    if let Some(v) = cfg.get("target_modules") {
        c.target_modules = if let Ok(s) = v.clone().into_string() {
            if s == "all-linear" { TargetModules::AllLinear } else { TargetModules::Regex(s) }
        } else {
            TargetModules::Names(cfg.str_list("target_modules").unwrap_or_default())
        };
    }
    match cfg.str("bias").as_deref() {
        None | Some("none") => {}
        Some(b) => anyhow::bail!("LoraConfig: bias \"{b}\" is not supported yet (only \"none\")"),
    }
    c.use_rslora = cfg.bool("use_rslora").unwrap_or(false);
    if let Some(v) = cfg.get("init_lora_weights") {
        c.init_lora_weights = match (v.as_bool().ok(), v.clone().into_string().ok().as_deref()) {
            (Some(true), _) => InitLoraWeights::Default,
            (Some(false), _) => InitLoraWeights::Random,
            (_, Some("gaussian")) => InitLoraWeights::Gaussian,
            _ => anyhow::bail!("LoraConfig: `init_lora_weights` must be true, false or \"gaussian\", got {v}"),
        };
    }
    // Whole numbers only; 1e20 must not saturate into a huge usize unseen (validate bounds it).
    c.rank_pattern = float_map(&cfg, "rank_pattern")?
        .into_iter()
        .map(|(k, v)| match v {
            v if v.fract() == 0.0 && v >= 1.0 && v <= crate::model::lora::MAX_RANK as f64 => Ok((k, v as usize)),
            v => Err(anyhow::anyhow!("LoraConfig: rank_pattern `{k}` must be a whole number between 1 and {}, got {v}", crate::model::lora::MAX_RANK)),
        })
        .collect::<anyhow::Result<_>>()?;
    c.alpha_pattern = float_map(&cfg, "alpha_pattern")?;
    if let Some(t) = cfg.str("task_type") {
        c.task_type = Some(t);
    }
    c.validate()?;
    Ok(c)
}

pub fn get_peft_model(m: &ModelHandle, cfg: &LoraConfig) -> anyhow::Result<ModelHandle> {
    let mut model = m.get_mut()?;
    let cfg = cfg.for_family(model.llama.family());
    lora::attach(&mut model.llama, &cfg, SEED.load(Ordering::Relaxed))?;
    model.lora_config = Some(cfg);
    drop(model);
    Ok(m.clone())
}

/// `model.save_pretrained(dir)`: the adapter (peft layout) when adapters are attached, as
/// `PeftModel.save_pretrained`; otherwise the whole model as an HF directory.
pub fn save_pretrained(m: &ModelHandle, dir: &str) -> anyhow::Result<()> {
    let model = m.get()?;
    let dir = std::path::Path::new(dir);
    crate::util::permissions::write_dir(dir)?;
    // Data-parallel: every rank holds the same weights; rank 0 writes them.
    if !crate::train::distributed::is_main_process() {
        return Ok(());
    }
    match &model.lora_config {
        Some(cfg) if lora::parameter_counts(&model.llama).0 > 0 => {
            crate::model::adapter::save_adapter(&model.llama, cfg, &model.name_or_path, dir)
        }
        _ => crate::model::save::save_model_dir(&model, dir),
    }
}

pub fn load_adapter(m: &ModelHandle, dir: &str) -> anyhow::Result<ModelHandle> {
    crate::util::permissions::read(std::path::Path::new(dir))?;
    let mut model = m.get_mut()?;
    let cfg = crate::model::adapter::load_adapter(&mut model.llama, std::path::Path::new(dir))?;
    model.lora_config = Some(cfg);
    drop(model);
    Ok(m.clone())
}

pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<LoraConfigHandle>("LoraConfig");
    api.func("LoraConfig", "LoraConfig(#{r, lora_alpha, lora_dropout, target_modules, bias, use_rslora, init_lora_weights, rank_pattern, alpha_pattern, task_type}) -> LoraConfig",
        "peft's LoraConfig. target_modules: a list of names, a regex string, or \"all-linear\".",
        |m: Map| rt(lora_config(&m).map(LoraConfigHandle)));
    api.func("to_string", "to_string(lora_config) -> string", "The configuration, as peft prints it.",
        |c: &mut LoraConfigHandle| format!("LoraConfig(r={}, lora_alpha={}, lora_dropout={}, target_modules={:?})", c.0.r, c.0.lora_alpha, c.0.lora_dropout, c.0.target_modules));
    api.func("get_peft_model", "get_peft_model(model, lora_config) -> Model",
        "Freeze the base model and attach LoRA adapters (peft's get_peft_model); returns the same model.",
        |m: ModelHandle, c: LoraConfigHandle| rt(get_peft_model(&m, &c.0)));
    api.func("print_trainable_parameters", "model.print_trainable_parameters()",
        "Print peft's line: trainable params || all params || trainable%.",
        |m: &mut ModelHandle| rt(m.get().map(|m| println!("{}", lora::trainable_parameters_line(&m.llama)))));
    api.func("set_seed", "set_seed(seed)", "Seed adapter initialisation and training randomness (transformers' set_seed).",
        |s: rhai::INT| SEED.store(s as u64, Ordering::Relaxed));
    api.func("save_pretrained", "model.save_pretrained(dir)",
        "With adapters: adapter_config.json + adapter_model.safetensors (peft's layout). Without: an HF model directory (config, safetensors, tokenizer).",
        |m: &mut ModelHandle, dir: &str| rt(save_pretrained(m, dir)));
    api.func("load_adapter", "model.load_adapter(dir) -> Model",
        "Attach a peft-written LoRA adapter (adapter_config.json + adapter_model.safetensors).",
        |m: &mut ModelHandle, dir: &str| rt(load_adapter(m, dir)));
    api.func("merge_and_unload", "model.merge_and_unload() -> Model",
        "Fold the adapters into the base weights (W += scaling·B·A) and remove them. A 4-bit base is merged on its dequantized weights: the result is a 16/32-bit model.",
        |m: &mut ModelHandle| -> RhaiResult<ModelHandle> {
            let mut model = rt(m.get_mut())?;
            rt(crate::model::adapter::merge_and_unload(&mut model.llama))?;
            model.lora_config = None;
            drop(model);
            Ok(m.clone())
        });
    // `PeftModel::from_pretrained(model, dir)`, as in peft.
    let mut peft = rhai::Module::new();
    peft.set_native_fn("from_pretrained", |m: ModelHandle, dir: &str| rt(load_adapter(&m, dir)));
    api.engine.register_static_module("PeftModel", peft.into());
    api.docs.push(super::FnDoc {
        name: "PeftModel::from_pretrained".into(),
        signature: "PeftModel::from_pretrained(model, dir) -> Model".into(),
        doc: "Load a peft adapter onto a model (same as model.load_adapter(dir)).".into(),
    });
}
