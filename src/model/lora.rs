//! LoRA adapters with peft's semantics: which modules get one (`target_modules` as names, a
//! regex, or "all-linear"), their rank and scaling (`lora_alpha / r`, rsLoRA `/ √r`, per-module
//! `rank_pattern` / `alpha_pattern`), their initialisation, and peft's parameter counts.

use super::llama::Llama;
use super::layers::linear::Lora;
use super::names;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names; a module matches when its path ends with `.name` (peft's rule).
    Names(Vec<String>),
    /// A regex matched against the whole module path (`model.layers.0.self_attn.q_proj`).
    Regex(String),
    /// Every linear layer except the LM head.
    AllLinear,
    /// Not given: peft's default for the model's family (its `default_lora_targets`, Llama's
    /// q_proj and v_proj, Phi-3's qkv_proj), resolved by [`LoraConfig::for_family`] when the
    /// adapters are attached or loaded.
    FamilyDefault,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InitLoraWeights {
    /// peft's default: A kaiming-uniform (a = √5), B zero — the adapter starts as a no-op.
    Default,
    /// A normal with std 1/r, B zero.
    Gaussian,
    /// A and B both random (kaiming-uniform), for tests: the adapter changes outputs at once.
    Random,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    pub init_lora_weights: InitLoraWeights,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub task_type: Option<String>,
    /// Extra fields read from an adapter_config.json, written back unchanged.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LoraConfig {
    /// peft's `LoraConfig()` defaults (r 8, alpha 8, no dropout); target_modules must be given
    /// (peft infers them per architecture: the family's `default_lora_targets`, for Llama
    /// q_proj and v_proj).
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(names::LLAMA.default_target_names()),
            use_rslora: false,
            init_lora_weights: InitLoraWeights::Default,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            task_type: Some("CAUSAL_LM".into()),
            extra: serde_json::Map::new(),
        }
    }
}

/// peft's `get_pattern_key`: a pattern matches a module path when the path ends with it
/// (as a regex, after a dot or at the start).
fn pattern_matches(pattern: &str, path: &str) -> bool {
    regex::Regex::new(&format!(r"^(.*\.)?(?:{pattern})$")).is_ok_and(|re| re.is_match(path))
}

/// The largest LoRA rank accepted (`r`, `rank_pattern`): a stated bound checked before the
/// adapters' matrices are allocated.
pub const MAX_RANK: usize = 1 << 14;

impl LoraConfig {
    /// This config with [`TargetModules::FamilyDefault`] resolved to `family`'s names.
    pub fn for_family(&self, family: &names::Family) -> LoraConfig {
        let mut c = self.clone();
        if c.target_modules == TargetModules::FamilyDefault {
            c.target_modules = TargetModules::Names(family.default_target_names());
        }
        c
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoraConfig: `r` must be positive");
        }
        // Before any adapter matrix is sized from it.
        if self.r > MAX_RANK {
            bail!("LoraConfig: `r` = {} is larger than {MAX_RANK}, the largest rank qscript makes", self.r);
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("LoraConfig: `lora_dropout` must be in [0, 1), got {}", self.lora_dropout);
        }
        if let TargetModules::Regex(r) = &self.target_modules {
            regex::Regex::new(r).map_err(|e| anyhow::anyhow!("LoraConfig: `target_modules` regex: {e}"))?;
        }
        for (k, &r) in &self.rank_pattern {
            if r == 0 || r > MAX_RANK {
                bail!("LoraConfig: rank_pattern `{k}` must be between 1 and {MAX_RANK}, got {r}");
            }
        }
        Ok(())
    }

    /// Does the module at `path` (e.g. `model.layers.3.mlp.up_proj`) get an adapter?
    pub fn targets(&self, path: &str) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => !path.ends_with(names::LM_HEAD),
            TargetModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path)),
            TargetModules::Names(list) => list.iter().any(|n| names::selects(path, n)),
            // Unresolved (see `for_family`): Llama's.
            TargetModules::FamilyDefault => names::LLAMA.default_lora_targets.iter().any(|p| names::selects(path, p.name())),
        }
    }

    /// Rank and scaling of the adapter at `path`.
    pub fn rank_and_scaling(&self, path: &str) -> (usize, f64) {
        let r = self.rank_pattern.iter().find(|(p, _)| pattern_matches(p, path)).map_or(self.r, |(_, &r)| r);
        let alpha = self.alpha_pattern.iter().find(|(p, _)| pattern_matches(p, path)).map_or(self.lora_alpha, |(_, &a)| a);
        let scaling = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        (r, scaling)
    }
}

/// Attach adapters to every targeted projection (replacing any already there). Returns how
/// many were attached; none is an error naming what was asked for.
pub fn attach(model: &mut Llama, cfg: &LoraConfig, seed: u64) -> Result<usize> {
    let cfg = &cfg.for_family(model.family());
    cfg.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    for (id, lin) in model.linears_mut() {
        let path = id.path();
        if !cfg.targets(&path) {
            continue;
        }
        let (out, inp) = lin.weight_shape()?;
        let (r, scaling) = cfg.rank_and_scaling(&path);
        let dev = lin.device().clone();
        // Kaiming-uniform with a = √5 (nn.Linear's default): bound = 1/√fan_in.
        let uniform = |rng: &mut StdRng, rows: usize, cols: usize| -> Result<Tensor> {
            let bound = 1.0 / (cols as f64).sqrt();
            let v: Vec<f32> = (0..rows * cols).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
            Ok(Tensor::from_vec(v, (rows, cols), &dev)?)
        };
        let a = match cfg.init_lora_weights {
            InitLoraWeights::Gaussian => {
                let std = 1.0 / r as f64;
                let v: Vec<f32> = (0..r * inp)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                    })
                    .collect();
                Tensor::from_vec(v, (r, inp), &dev)?
            }
            _ => uniform(&mut rng, r, inp)?,
        };
        let b = match cfg.init_lora_weights {
            InitLoraWeights::Random => uniform(&mut rng, out, r)?,
            _ => Tensor::zeros((out, r), DType::F32, &dev)?,
        };
        let dtype = lin.compute_dtype();
        lin.lora = Some(Lora { a: a.to_dtype(dtype)?, b: b.to_dtype(dtype)?, scaling, dropout: cfg.lora_dropout });
        n += 1;
    }
    if n == 0 {
        bail!("LoraConfig: `target_modules` {:?} matched no module of this model (its linear layers: {})", cfg.target_modules, model.family().proj_names());
    }
    Ok(n)
}

/// peft's counts: (trainable adapter parameters, all parameters including the adapters).
pub fn parameter_counts(model: &Llama) -> (usize, usize) {
    let trainable: usize = model.adapters().map(|(_, l)| l.a.elem_count() + l.b.elem_count()).sum();
    (trainable, model.num_parameters() + trainable)
}

/// The line peft's `print_trainable_parameters()` prints.
pub fn trainable_parameters_line(model: &Llama) -> String {
    let (t, all) = parameter_counts(model);
    let group = |n: usize| {
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    format!("trainable params: {} || all params: {} || trainable%: {:.4}", group(t), group(all), 100.0 * t as f64 / all.max(1) as f64)
}
