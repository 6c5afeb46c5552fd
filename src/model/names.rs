//! The one place that knows how modules and parameters are named: module ids (a decoder
//! layer's projection or norm), the family table (which of them a model family has), the key
//! formats both ways (HF checkpoint keys, bitsandbytes' 4-bit keys, PEFT adapter keys, the
//! optimizer state keys of a checkpoint, llama.cpp's GGUF names), and the walk over a model's
//! modules in one fixed order — the order adapters, gradients, optimizer state and checkpoints
//! use.
//!
//! Each family's modules (Phi-3's fused `qkv_proj` / `gate_up_proj`, Qwen3's and Gemma 3's
//! per-head `q_norm` / `k_norm`, Gemma 2's pre/post feed-forward norms) are [`Proj`] / [`Norm`]
//! variants with their paths here, and its [`Family`] lists them with the config mapping that
//! chooses its layer variants; callers iterate the family, they never list projections
//! themselves.

use crate::model::layers::attention::QkvProj;
use crate::model::layers::linear::Lora;
use crate::model::layers::mlp::GateUpProj;
use crate::model::llama::{Block, Linear, Llama, RmsNorm};
use candle_core::Tensor;

// ---------------------------------------------------------------- module ids

/// A linear projection of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Phi-3's fused q/k/v projection (rows: q, then k, then v).
    Qkv,
    /// Phi-3's fused gate/up projection (rows: gate, then up).
    GateUp,
}

impl Proj {
    /// Module path inside a layer, as in transformers (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
            Proj::Qkv => "self_attn.qkv_proj",
            Proj::GateUp => "mlp.gate_up_proj",
        }
    }

    /// Short name (`q_proj`, ...), what `target_modules` lists.
    pub fn name(self) -> &'static str {
        last_segment(self.path())
    }

    /// llama.cpp's name of the module inside a GGUF block (`attn_q`, ...; Phi-3's fused
    /// projections are `attn_qkv` and `ffn_up`, the latter unambiguous within a family).
    pub fn gguf(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
            Proj::Qkv => "attn_qkv",
            Proj::GateUp => "ffn_up",
        }
    }
}

/// A norm of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Norm {
    /// Before attention.
    Input,
    /// Before the MLP (Llama); on the attention output (Gemma).
    PostAttention,
    /// Gemma: before the MLP.
    PreFeedforward,
    /// Gemma: on the MLP output.
    PostFeedforward,
    /// Qwen3, Gemma 3: per-head norm of the queries (weight `[head_dim]`), before RoPE.
    QNorm,
    /// Per-head norm of the keys.
    KNorm,
}

impl Norm {
    /// Module path inside a layer, as in transformers.
    pub fn path(self) -> &'static str {
        match self {
            Norm::Input => "input_layernorm",
            Norm::PostAttention => "post_attention_layernorm",
            Norm::PreFeedforward => "pre_feedforward_layernorm",
            Norm::PostFeedforward => "post_feedforward_layernorm",
            Norm::QNorm => "self_attn.q_norm",
            Norm::KNorm => "self_attn.k_norm",
        }
    }

}

fn last_segment(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// A decoder linear: which layer, which projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModuleId {
    pub layer: usize,
    pub proj: Proj,
}

impl ModuleId {
    pub fn new(layer: usize, proj: Proj) -> Self {
        Self { layer, proj }
    }

    /// Module path in the model (`model.layers.3.mlp.up_proj`).
    pub fn path(self) -> String {
        format!("{}.{}", layer_path(self.layer), self.proj.path())
    }
}

/// A decoder layer's norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormId {
    pub layer: usize,
    pub norm: Norm,
}

impl NormId {
    /// Module path in the model (`model.layers.3.input_layernorm`).
    pub fn path(self) -> String {
        format!("{}.{}", layer_path(self.layer), self.norm.path())
    }
}

/// The modules outside the decoder layers.
pub const EMBED_TOKENS: &str = "model.embed_tokens";
pub const FINAL_NORM: &str = "model.norm";
pub const LM_HEAD: &str = "lm_head";
const LAYERS: &str = "model.layers";

/// Path of decoder layer `i` (`model.layers.3`).
pub fn layer_path(i: usize) -> String {
    format!("{LAYERS}.{i}")
}

// ---------------------------------------------------------------- families

/// What a model family's decoder layer holds, in the order its modules are walked, and the
/// config mapping that picks its layer variants (`config.rs` reads these).
#[derive(Debug, PartialEq)]
pub struct Family {
    pub name: &'static str,
    /// config.json's `model_type` values of the family.
    pub model_types: &'static [&'static str],
    /// The layer's linears, in the order adapters, gradients' optimizer state and checkpoint
    /// tensors are listed (changing it breaks older checkpoints).
    pub projs: &'static [Proj],
    pub norms: &'static [Norm],
    /// The projections peft adapts when `target_modules` is not given.
    pub default_lora_targets: &'static [Proj],
    /// Bias on q/k/v (not o) whatever config.json says (Qwen2 has no `attention_bias` key).
    pub qkv_bias: bool,
    /// Gemma's arithmetic: `(1 + w)` norms, embeddings × √hidden, `query_pre_attn_scalar`,
    /// soft-capping, GELU (tanh) by default.
    pub gemma: bool,
    /// Which layers attend through a sliding window.
    pub windows: Windows,
}

/// How a family's config says which layers use `sliding_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// Never (Llama).
    Never,
    /// Every layer when `sliding_window` is set, unless `layer_types` says otherwise (Mistral, Phi-3).
    AllLayers,
    /// Only with `use_sliding_window: true`; then `layer_types` (default: layers from
    /// `max_window_layers` on) (Qwen2, Qwen3).
    WhenEnabled,
    /// `layer_types`, default every `n`-th layer full and the others sliding (Gemma 2: 2,
    /// Gemma 3: `sliding_window_pattern`, default 6).
    Pattern(usize),
}

const ATTN_MLP: &[Proj] = &[Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
const PRE_NORMS: &[Norm] = &[Norm::Input, Norm::PostAttention];
const Q_V: &[Proj] = &[Proj::Q, Proj::V];

pub const LLAMA: Family = Family {
    name: "llama",
    model_types: &["llama"],
    projs: ATTN_MLP,
    norms: PRE_NORMS,
    default_lora_targets: Q_V,
    qkv_bias: false,
    gemma: false,
    windows: Windows::Never,
};

pub const MISTRAL: Family = Family { name: "mistral", model_types: &["mistral"], windows: Windows::AllLayers, ..LLAMA };

pub const QWEN2: Family = Family { name: "qwen2", model_types: &["qwen2"], qkv_bias: true, windows: Windows::WhenEnabled, ..LLAMA };

pub const QWEN3: Family = Family {
    name: "qwen3",
    model_types: &["qwen3"],
    norms: &[Norm::Input, Norm::PostAttention, Norm::QNorm, Norm::KNorm],
    windows: Windows::WhenEnabled,
    ..LLAMA
};

pub const GEMMA2: Family = Family {
    name: "gemma2",
    model_types: &["gemma2"],
    norms: &[Norm::Input, Norm::PostAttention, Norm::PreFeedforward, Norm::PostFeedforward],
    gemma: true,
    windows: Windows::Pattern(2),
    ..LLAMA
};

pub const GEMMA3: Family = Family {
    name: "gemma3",
    model_types: &["gemma3_text", "gemma3"],
    norms: &[Norm::Input, Norm::PostAttention, Norm::PreFeedforward, Norm::PostFeedforward, Norm::QNorm, Norm::KNorm],
    gemma: true,
    windows: Windows::Pattern(6),
    ..LLAMA
};

pub const PHI3: Family = Family {
    name: "phi3",
    model_types: &["phi3"],
    projs: &[Proj::Qkv, Proj::O, Proj::GateUp, Proj::Down],
    default_lora_targets: &[Proj::Qkv],
    windows: Windows::AllLayers,
    ..LLAMA
};

/// Every projection of every family, in an order each family's walk agrees with: reading a
/// checkpoint's optimizer state before the model is known parses and sorts by [`ANY`].
pub const ALL_PROJS: &[Proj] = &[Proj::Q, Proj::K, Proj::V, Proj::Qkv, Proj::O, Proj::Gate, Proj::Up, Proj::GateUp, Proj::Down];

/// Not a model family: the union of their projections, for keys read without a model.
pub const ANY: Family = Family { name: "any", model_types: &[], projs: ALL_PROJS, ..LLAMA };

/// Every supported family.
pub const FAMILIES: [&Family; 7] = [&LLAMA, &MISTRAL, &QWEN2, &QWEN3, &GEMMA2, &GEMMA3, &PHI3];

impl Family {
    /// The family of a model with this config.json.
    pub fn of(config: &crate::model::Config) -> &'static Family {
        config.family
    }

    /// The family whose `model_type` is `model_type`.
    pub fn named(model_type: &str) -> Option<&'static Family> {
        FAMILIES.into_iter().find(|f| f.model_types.contains(&model_type))
    }

    /// The supported `model_type` values, for messages.
    pub fn supported() -> String {
        FAMILIES.iter().flat_map(|f| f.model_types.iter()).copied().collect::<Vec<_>>().join(", ")
    }

    /// Whether the family's layers have `norm`.
    pub fn has_norm(&self, norm: Norm) -> bool {
        self.norms.contains(&norm)
    }

    /// Where `p` stands in [`Family::projs`] (`None`: the family has no such projection).
    pub fn position(&self, p: Proj) -> Option<usize> {
        self.projs.iter().position(|&q| q == p)
    }

    /// The projection whose short name is `name` (`q_proj`).
    pub fn proj_named(&self, name: &str) -> Option<Proj> {
        self.projs.iter().copied().find(|p| p.name() == name)
    }

    /// Every decoder linear of an `n_layers`-layer model, layer-major, in `projs` order.
    pub fn module_ids(&'static self, n_layers: usize) -> impl Iterator<Item = ModuleId> {
        (0..n_layers).flat_map(move |layer| self.projs.iter().map(move |&proj| ModuleId { layer, proj }))
    }

    /// The module id of the path `model.layers.<i>.<projection path>`, if it names one.
    pub fn parse_path(&self, path: &str) -> Option<ModuleId> {
        let rest = path.strip_prefix(LAYERS)?.strip_prefix('.')?;
        let (layer, proj_path) = rest.split_once('.')?;
        let layer = parse_index(layer)?;
        let proj = self.projs.iter().copied().find(|p| p.path() == proj_path)?;
        Some(ModuleId { layer, proj })
    }

    /// The linears' short names, for messages (`q_proj, k_proj, ...`).
    pub fn proj_names(&self) -> String {
        self.projs.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }

    /// peft's default `target_modules` for the family, as names.
    pub fn default_target_names(&self) -> Vec<String> {
        self.default_lora_targets.iter().map(|p| p.name().to_string()).collect()
    }
}

/// A layer index as written in keys: decimal digits only (no sign, no spaces).
fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// peft's rule for a `target_modules` name (and transformers' for a skip-module name): `name`
/// selects the module at `path` when it is the path or its last dotted segments.
pub fn selects(path: &str, name: &str) -> bool {
    path == name || path.strip_suffix(name).is_some_and(|rest| rest.ends_with('.'))
}

// ---------------------------------------------------------------- HF checkpoint keys

/// The weight tensor of the module at `path` (`model.layers.0.mlp.up_proj.weight`).
pub fn weight_key(path: &str) -> String {
    format!("{path}.weight")
}

/// The bias tensor of the module at `path`.
pub fn bias_key(path: &str) -> String {
    format!("{path}.bias")
}

/// The tensor that marks a 4-bit weight saved by bitsandbytes, and holds its quant state
/// (`<weight key>.quant_state.bitsandbytes__nf4`).
pub fn bnb_quant_state_key(weight_key: &str, quant_type: &str) -> String {
    crate::quant::bnb_quant_state_key(weight_key, quant_type)
}

/// Whether `key` is one of bitsandbytes' quant-state tensors.
pub fn is_bnb_quant_state_key(key: &str) -> bool {
    key.contains(crate::quant::BNB_QUANT_STATE)
}

// ---------------------------------------------------------------- GGUF names (llama.cpp)

/// llama.cpp's architectures (`general.architecture`) and the family each holds. Mistral has
/// none of its own: llama.cpp's converter writes it as `llama`.
pub const GGUF_ARCHS: [(&str, &Family); 6] = [("llama", &LLAMA), ("qwen2", &QWEN2), ("qwen3", &QWEN3), ("gemma2", &GEMMA2), ("gemma3", &GEMMA3), ("phi3", &PHI3)];

impl Family {
    /// The family a llama.cpp architecture holds.
    pub fn of_gguf_arch(arch: &str) -> Option<&'static Family> {
        GGUF_ARCHS.iter().find(|(a, _)| *a == arch).map(|(_, f)| *f)
    }

    /// The llama.cpp architecture a GGUF of this family is written as (Mistral: `llama`).
    pub fn gguf_arch(&self) -> Option<&'static str> {
        if self == &MISTRAL {
            return Some("llama");
        }
        GGUF_ARCHS.iter().find(|(_, f)| *f == self).map(|(a, _)| *a)
    }

    /// llama.cpp's name of norm `n` inside a block of this family: `ffn_norm` is the norm
    /// before the MLP (Llama's post-attention norm, Gemma's pre-feed-forward one).
    pub fn gguf_norm(&self, n: Norm) -> &'static str {
        match n {
            Norm::Input => "attn_norm",
            Norm::PostAttention if self.has_norm(Norm::PreFeedforward) => "post_attention_norm",
            Norm::PostAttention | Norm::PreFeedforward => "ffn_norm",
            Norm::PostFeedforward => "post_ffw_norm",
            Norm::QNorm => "attn_q_norm",
            Norm::KNorm => "attn_k_norm",
        }
    }

    /// llama.cpp's GGUF tensor name → the HF key of this family (`blk.3.attn_q.weight` →
    /// `model.layers.3.self_attn.q_proj.weight`); `None` for a name the family has no module for.
    pub fn hf_key_from_gguf(&self, name: &str) -> Option<String> {
        let (base, kind) = name.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        let path = match base {
            "token_embd" => EMBED_TOKENS.to_string(),
            "output_norm" => FINAL_NORM.to_string(),
            "output" => LM_HEAD.to_string(),
            _ => {
                let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
                let layer = parse_index(layer)?;
                if let Some(&proj) = self.projs.iter().find(|p| p.gguf() == part) {
                    ModuleId { layer, proj }.path()
                } else {
                    let &norm = self.norms.iter().find(|&&n| self.gguf_norm(n) == part)?;
                    NormId { layer, norm }.path()
                }
            }
        };
        Some(format!("{path}.{kind}"))
    }

    /// The inverse of [`Family::hf_key_from_gguf`]: an HF key of this family → llama.cpp's
    /// tensor name (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`).
    pub fn gguf_key(&self, hf_key: &str) -> Option<String> {
        let (path, kind) = hf_key.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        let base = match path {
            EMBED_TOKENS => "token_embd".to_string(),
            FINAL_NORM => "output_norm".to_string(),
            LM_HEAD => "output".to_string(),
            _ => {
                let (layer, part) = path.strip_prefix(LAYERS)?.strip_prefix('.')?.split_once('.')?;
                let layer = parse_index(layer)?;
                match self.projs.iter().find(|p| p.path() == part) {
                    Some(p) => format!("blk.{layer}.{}", p.gguf()),
                    None => format!("blk.{layer}.{}", self.gguf_norm(*self.norms.iter().find(|n| n.path() == part)?)),
                }
            }
        };
        Some(format!("{base}.{kind}"))
    }
}

/// [`Family::hf_key_from_gguf`] of the Llama family.
pub fn hf_key_from_gguf(name: &str) -> Option<String> {
    LLAMA.hf_key_from_gguf(name)
}

// ---------------------------------------------------------------- PEFT adapter keys

/// The two matrices of a LoRA adapter: `A` `[r, in]`, `B` `[out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraHalf {
    A,
    B,
}

impl LoraHalf {
    /// A then B: the order their tensors are listed everywhere.
    pub const BOTH: [LoraHalf; 2] = [LoraHalf::A, LoraHalf::B];

    /// `lora_A` / `lora_B`.
    pub fn name(self) -> &'static str {
        match self {
            LoraHalf::A => "lora_A",
            LoraHalf::B => "lora_B",
        }
    }

    pub fn tensor(self, l: &Lora) -> &Tensor {
        match self {
            LoraHalf::A => &l.a,
            LoraHalf::B => &l.b,
        }
    }

    pub fn tensor_mut(self, l: &mut Lora) -> &mut Tensor {
        match self {
            LoraHalf::A => &mut l.a,
            LoraHalf::B => &mut l.b,
        }
    }
}

/// What peft's `save_pretrained` puts before a module path.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The key peft writes for one half of the adapter at module `path`
/// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn peft_key(path: &str, half: LoraHalf) -> String {
    format!("{PEFT_PREFIX}{path}.{}.weight", half.name())
}

/// The module path and half of a key peft wrote (the inverse of [`peft_key`]); `None` for
/// anything else. Only the form peft writes is read: peft itself inserts the adapter name
/// (`.default`) while loading, so a file holding `lora_A.default.weight` would not load in
/// peft either.
pub fn parse_peft_key(key: &str) -> Option<(&str, LoraHalf)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?.strip_suffix(".weight")?;
    let (path, half) = rest.rsplit_once('.')?;
    let half = LoraHalf::BOTH.into_iter().find(|h| h.name() == half)?;
    (!path.is_empty()).then_some((path, half))
}

/// Where a multimodal checkpoint (Gemma 3's `*ForConditionalGeneration`) keeps its language
/// model: `(the prefix of the text model's model.X, the prefix of its lm_head)` — transformers'
/// current layout first, then the older one. Weights and peft adapter keys alike.
pub const LANGUAGE_MODEL_LAYOUTS: [(&str, &str); 2] = [("model.language_model.", ""), ("language_model.model.", "language_model.")];

/// A multimodal checkpoint's language-model module path (in either of
/// [`LANGUAGE_MODEL_LAYOUTS`]) as the text model's (`model.X`, `lm_head`); a text path as it is.
/// `None`: a module outside the language model (the vision tower, the projector), which qscript
/// does not load.
pub fn text_module_path(path: &str) -> Option<String> {
    for (prefix, head_prefix) in LANGUAGE_MODEL_LAYOUTS {
        if let Some(rest) = path.strip_prefix(prefix) {
            return Some(format!("model.{rest}"));
        }
        if let Some(rest) = path.strip_prefix(head_prefix).filter(|_| !head_prefix.is_empty()) {
            return Some(rest.to_string());
        }
    }
    let multimodal_part = ["model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."];
    (!multimodal_part.iter().any(|p| path.starts_with(p))).then(|| path.to_string())
}

/// The path of a text model's module inside a multimodal checkpoint of `layout` (one of
/// [`LANGUAGE_MODEL_LAYOUTS`]): the inverse of [`text_module_path`].
pub fn multimodal_module_path(path: &str, (prefix, head_prefix): (&str, &str)) -> String {
    match path.strip_prefix("model.") {
        Some(rest) => format!("{prefix}{rest}"),
        None => format!("{head_prefix}{path}"),
    }
}

// ---------------------------------------------------------------- optimizer state keys

/// One trainable tensor: a half of the adapter on a decoder linear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId {
    pub module: ModuleId,
    pub half: LoraHalf,
}

impl ParamId {
    /// The prefix of its tensors in a checkpoint's optimizer file (`layers.3.up_proj.lora_B`;
    /// `.master`, `.exp_avg`, `.exp_avg_sq` follow).
    pub fn state_key(self) -> String {
        format!("layers.{}.{}.{}", self.module.layer, self.module.proj.name(), self.half.name())
    }
}

impl Family {
    /// The inverse of [`ParamId::state_key`] for this family's projections.
    pub fn parse_state_key(&self, key: &str) -> Option<ParamId> {
        let mut parts = key.split('.');
        let (Some("layers"), Some(layer), Some(proj), Some(half), None) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let module = ModuleId { layer: parse_index(layer)?, proj: self.proj_named(proj)? };
        let half = LoraHalf::BOTH.into_iter().find(|h| h.name() == half)?;
        Some(ParamId { module, half })
    }

    /// Sort key of a parameter in the walk order: layer, projection, A before B.
    pub fn param_order(&self, id: ParamId) -> (usize, usize, LoraHalf) {
        (id.module.layer, self.position(id.module.proj).unwrap_or(usize::MAX), id.half)
    }
}

// ---------------------------------------------------------------- walking the model

impl Block {
    /// The block's linears with their projection ids, as its fields hold them (separate or
    /// fused q/k/v and gate/up): the one map from a projection to the field holding it.
    pub fn proj_fields(&self) -> Vec<(Proj, &Linear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut out = match &a.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => vec![(Proj::Q, q_proj), (Proj::K, k_proj), (Proj::V, v_proj)],
            QkvProj::Fused { qkv_proj } => vec![(Proj::Qkv, qkv_proj)],
        };
        out.push((Proj::O, &a.o_proj));
        match &m.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => out.extend([(Proj::Gate, gate_proj), (Proj::Up, up_proj)]),
            GateUpProj::Fused { gate_up_proj } => out.push((Proj::GateUp, gate_up_proj)),
        }
        out.push((Proj::Down, &m.down_proj));
        out
    }

    /// [`Block::proj_fields`], mutable.
    pub fn proj_fields_mut(&mut self) -> Vec<(Proj, &mut Linear)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let mut out = match &mut a.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => vec![(Proj::Q, q_proj), (Proj::K, k_proj), (Proj::V, v_proj)],
            QkvProj::Fused { qkv_proj } => vec![(Proj::Qkv, qkv_proj)],
        };
        out.push((Proj::O, &mut a.o_proj));
        match &mut m.gate_up {
            GateUpProj::Split { gate_proj, up_proj } => out.extend([(Proj::Gate, gate_proj), (Proj::Up, up_proj)]),
            GateUpProj::Fused { gate_up_proj } => out.push((Proj::GateUp, gate_up_proj)),
        }
        out.push((Proj::Down, &mut m.down_proj));
        out
    }

    /// The linear of projection `p`, if the block has it.
    pub fn try_proj(&self, p: Proj) -> Option<&Linear> {
        self.proj_fields().into_iter().find(|(q, _)| *q == p).map(|(_, l)| l)
    }

    /// The linear of projection `p`. Panics when the block has none (a projection outside its
    /// family: a caller bug).
    pub fn proj(&self, p: Proj) -> &Linear {
        self.try_proj(p).unwrap_or_else(|| panic!("this decoder layer has no {}", p.name()))
    }

    pub fn proj_mut(&mut self, p: Proj) -> &mut Linear {
        let found = self.proj_fields_mut().into_iter().find(|(q, _)| *q == p);
        found.map(|(_, l)| l).unwrap_or_else(|| panic!("this decoder layer has no {}", p.name()))
    }

    /// The norm `n`, if the block has it.
    pub fn try_norm(&self, n: Norm) -> Option<&RmsNorm> {
        let a = &self.self_attn;
        match n {
            Norm::Input => Some(&self.input_layernorm),
            Norm::PostAttention => Some(&self.post_attention_layernorm),
            Norm::PreFeedforward => self.pre_feedforward_layernorm.as_ref(),
            Norm::PostFeedforward => self.post_feedforward_layernorm.as_ref(),
            Norm::QNorm => a.q_norm.as_ref(),
            Norm::KNorm => a.k_norm.as_ref(),
        }
    }

    /// The norm `n`. Panics when the block has none (a caller bug).
    pub fn norm(&self, n: Norm) -> &RmsNorm {
        self.try_norm(n).unwrap_or_else(|| panic!("this decoder layer has no {}", n.path()))
    }
}

impl Family {
    /// The linears of the decoder stack `layers`, layer-major in `projs` order.
    pub fn linears<'a>(&'static self, layers: &'a [Block]) -> impl Iterator<Item = (ModuleId, &'a Linear)> {
        layers.iter().enumerate().flat_map(move |(layer, b)| self.projs.iter().map(move |&proj| (ModuleId { layer, proj }, b.proj(proj))))
    }

    /// [`Family::linears`], mutable.
    pub fn linears_mut<'a>(&'static self, layers: &'a mut [Block]) -> impl Iterator<Item = (ModuleId, &'a mut Linear)> {
        layers.iter_mut().enumerate().flat_map(move |(layer, b)| {
            let mut fields: Vec<(Proj, Option<&mut Linear>)> = b.proj_fields_mut().into_iter().map(|(p, l)| (p, Some(l))).collect();
            self.projs.iter().filter_map(move |&proj| {
                let slot = fields.iter_mut().find(|(q, _)| *q == proj)?;
                Some((ModuleId { layer, proj }, slot.1.take()?))
            })
        })
    }

    /// The norms of the decoder stack `layers`, layer-major in `norms` order.
    pub fn norms<'a>(&'static self, layers: &'a [Block]) -> impl Iterator<Item = (NormId, &'a RmsNorm)> {
        layers.iter().enumerate().flat_map(move |(layer, b)| self.norms.iter().map(move |&norm| (NormId { layer, norm }, b.norm(norm))))
    }
}

impl Llama {
    /// The model's family.
    pub fn family(&self) -> &'static Family {
        Family::of(&self.config)
    }

    /// Every decoder linear, layer-major in the family's projection order.
    pub fn linears(&self) -> impl Iterator<Item = (ModuleId, &Linear)> {
        self.family().linears(&self.layers)
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = (ModuleId, &mut Linear)> {
        self.family().linears_mut(&mut self.layers)
    }

    /// Every LoRA adapter, in [`Llama::linears`] order: the order of the optimizer's state, of
    /// a checkpoint's tensors and of an adapter file's modules.
    pub fn adapters(&self) -> impl Iterator<Item = (ModuleId, &Lora)> {
        self.linears().filter_map(|(id, l)| Some((id, l.lora.as_ref()?)))
    }

    pub fn adapters_mut(&mut self) -> impl Iterator<Item = (ModuleId, &mut Lora)> {
        self.linears_mut().filter_map(|(id, l)| Some((id, l.lora.as_mut()?)))
    }

    /// The decoder linear `id`, if the model has it.
    pub fn linear(&self, id: ModuleId) -> Option<&Linear> {
        self.family().position(id.proj)?;
        self.layers.get(id.layer)?.try_proj(id.proj)
    }

    pub fn linear_mut(&mut self, id: ModuleId) -> Option<&mut Linear> {
        self.family().position(id.proj)?;
        let b = self.layers.get_mut(id.layer)?;
        b.proj_fields_mut().into_iter().find(|(q, _)| *q == id.proj).map(|(_, l)| l)
    }

    /// Every decoder norm, layer-major in the family's norm order.
    pub fn norms(&self) -> impl Iterator<Item = (NormId, &RmsNorm)> {
        self.family().norms(&self.layers)
    }

    /// The module id of `path` if it is one of this model's decoder linears.
    pub fn module_at(&self, path: &str) -> Option<ModuleId> {
        self.family().parse_path(path).filter(|id| id.layer < self.layers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_and_hf_keys() {
        let id = ModuleId::new(3, Proj::Up);
        assert_eq!(id.path(), "model.layers.3.mlp.up_proj");
        assert_eq!(weight_key(&id.path()), "model.layers.3.mlp.up_proj.weight");
        assert_eq!(bias_key(&ModuleId::new(0, Proj::Q).path()), "model.layers.0.self_attn.q_proj.bias");
        assert_eq!(NormId { layer: 1, norm: Norm::PostAttention }.path(), "model.layers.1.post_attention_layernorm");
        assert_eq!(bnb_quant_state_key("model.layers.0.mlp.up_proj.weight", "nf4"), "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4");
        assert!(is_bnb_quant_state_key("x.weight.quant_state.bitsandbytes__fp4"));
        assert!(!is_bnb_quant_state_key("x.weight.absmax"));
        let names: Vec<&str> = LLAMA.projs.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
        assert_eq!(LLAMA.default_target_names(), ["q_proj", "v_proj"]);
    }

    #[test]
    fn every_projection_round_trips_through_every_key_format() {
        for id in LLAMA.module_ids(12) {
            let path = id.path();
            assert_eq!(LLAMA.parse_path(&path), Some(id), "{path}");
            assert_eq!(LLAMA.proj_named(id.proj.name()), Some(id.proj));
            for half in LoraHalf::BOTH {
                let key = peft_key(&path, half);
                assert_eq!(parse_peft_key(&key), Some((path.as_str(), half)), "{key}");
                let p = ParamId { module: id, half };
                assert_eq!(LLAMA.parse_state_key(&p.state_key()), Some(p));
            }
            let gguf = format!("blk.{}.{}.weight", id.layer, id.proj.gguf());
            assert_eq!(hf_key_from_gguf(&gguf), Some(weight_key(&path)), "{gguf}");
        }
        assert_eq!(peft_key("model.layers.0.self_attn.q_proj", LoraHalf::A), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(ParamId { module: ModuleId::new(2, Proj::Down), half: LoraHalf::B }.state_key(), "layers.2.down_proj.lora_B");
    }

    #[test]
    fn multimodal_paths_map_to_the_text_models_and_back() {
        for (mm, text) in [
            ("model.language_model.layers.3.self_attn.q_proj", Some("model.layers.3.self_attn.q_proj")),
            ("language_model.model.layers.0.mlp.down_proj", Some("model.layers.0.mlp.down_proj")),
            ("language_model.lm_head", Some("lm_head")),
            ("model.layers.1.mlp.up_proj", Some("model.layers.1.mlp.up_proj")),
            ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", None),
            ("model.multi_modal_projector.mm_input_projection", None),
        ] {
            assert_eq!(text_module_path(mm).as_deref(), text, "{mm}");
        }
        let [now, older] = LANGUAGE_MODEL_LAYOUTS;
        assert_eq!(multimodal_module_path("model.layers.3.self_attn.q_proj", now), "model.language_model.layers.3.self_attn.q_proj");
        assert_eq!(multimodal_module_path("model.layers.3.self_attn.q_proj", older), "language_model.model.layers.3.self_attn.q_proj");
        assert_eq!(multimodal_module_path("lm_head", older), "language_model.lm_head");
        for layout in LANGUAGE_MODEL_LAYOUTS {
            for text in ["model.layers.3.mlp.gate_proj", "lm_head"] {
                assert_eq!(text_module_path(&multimodal_module_path(text, layout)).unwrap(), text);
            }
        }
    }

    #[test]
    fn only_the_keys_peft_writes_parse() {
        assert_eq!(parse_peft_key("base_model.model.lm_head.lora_B.weight"), Some(("lm_head", LoraHalf::B)));
        for bad in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", // in-memory name, not a file's
            "model.layers.0.self_attn.q_proj.lora_A.weight",                          // no peft prefix
            "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias",
            "base_model.model.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A",
        ] {
            assert_eq!(parse_peft_key(bad), None, "{bad}");
        }
        for bad in ["model.layers.x.mlp.up_proj", "model.layers.-1.mlp.up_proj", "model.layers.0.mlp.up", "model.layers.0", "layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj.weight"] {
            assert_eq!(LLAMA.parse_path(bad), None, "{bad}");
        }
        for bad in ["layers.0.q_proj", "layers.0.q_proj.lora_A.master", "layers.a.q_proj.lora_A", "x.0.q_proj.lora_A", "layers.0.qkv_proj.lora_A", "layers.0.q_proj.lora_C"] {
            assert_eq!(LLAMA.parse_state_key(bad), None, "{bad}");
        }
        assert_eq!(hf_key_from_gguf("blk.1.ffn_norm.weight").as_deref(), Some("model.layers.1.post_attention_layernorm.weight"));
        assert_eq!(hf_key_from_gguf("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_key_from_gguf("blk.1.attn_qkv.weight"), None);
        assert_eq!(hf_key_from_gguf("blk.1.attn_q.scale"), None);
    }

    /// Every module of every GGUF family has one llama.cpp name, unique within the family, and
    /// the name leads back to the module; `ffn_norm` and `ffn_up` mean what the family says.
    #[test]
    fn gguf_names_per_family() {
        for (arch, family) in GGUF_ARCHS {
            assert_eq!(Family::of_gguf_arch(arch).map(|f| f.name), Some(family.name));
            let mut seen = std::collections::HashSet::new();
            for p in family.projs {
                assert!(seen.insert(p.gguf()), "{arch}: {} twice", p.gguf());
                let path = ModuleId::new(2, *p).path();
                assert_eq!(family.hf_key_from_gguf(&format!("blk.2.{}.bias", p.gguf())), Some(bias_key(&path)), "{arch}");
                assert_eq!(family.gguf_key(&bias_key(&path)), Some(format!("blk.2.{}.bias", p.gguf())), "{arch}");
            }
            for &n in family.norms {
                let g = family.gguf_norm(n);
                assert!(seen.insert(g), "{arch}: {g} twice");
                let path = NormId { layer: 0, norm: n }.path();
                assert_eq!(family.hf_key_from_gguf(&format!("blk.0.{g}.weight")), Some(weight_key(&path)), "{arch}");
                assert_eq!(family.gguf_key(&weight_key(&path)), Some(format!("blk.0.{g}.weight")), "{arch}");
            }
            for (hf, g) in [(EMBED_TOKENS, "token_embd"), (FINAL_NORM, "output_norm"), (LM_HEAD, "output")] {
                assert_eq!(family.gguf_key(&weight_key(hf)), Some(format!("{g}.weight")), "{arch}");
            }
        }
        let key = |f: &Family, n: &str| f.hf_key_from_gguf(n);
        assert_eq!(key(&GEMMA2, "blk.1.ffn_norm.weight").as_deref(), Some("model.layers.1.pre_feedforward_layernorm.weight"));
        assert_eq!(key(&GEMMA3, "blk.1.post_attention_norm.weight").as_deref(), Some("model.layers.1.post_attention_layernorm.weight"));
        assert_eq!(key(&QWEN3, "blk.1.ffn_norm.weight").as_deref(), Some("model.layers.1.post_attention_layernorm.weight"));
        assert_eq!(key(&PHI3, "blk.0.ffn_up.weight").as_deref(), Some("model.layers.0.mlp.gate_up_proj.weight"));
        assert_eq!(key(&PHI3, "blk.0.attn_qkv.weight").as_deref(), Some("model.layers.0.self_attn.qkv_proj.weight"));
        assert_eq!(key(&QWEN3, "blk.0.attn_k_norm.weight").as_deref(), Some("model.layers.0.self_attn.k_norm.weight"));
        for (f, bad) in [(&PHI3, "blk.0.attn_q.weight"), (&PHI3, "blk.0.ffn_gate.weight"), (&QWEN2, "blk.0.attn_q_norm.weight"), (&LLAMA, "blk.0.post_ffw_norm.weight"), (&GEMMA2, "blk.0.attn_q_norm.weight")] {
            assert_eq!(key(f, bad), None, "{}: {bad}", f.name);
        }
        assert_eq!(Family::of_gguf_arch("mistral"), None);
        for f in FAMILIES {
            let arch = f.gguf_arch().unwrap();
            assert_eq!(Family::of_gguf_arch(arch).map(|g| g.name), Some(if f == &MISTRAL { "llama" } else { f.name }));
        }
    }

    #[test]
    fn target_names_select_by_trailing_segments() {
        let p = "model.layers.3.self_attn.q_proj";
        for yes in ["q_proj", "self_attn.q_proj", "3.self_attn.q_proj", p] {
            assert!(selects(p, yes), "{yes}");
        }
        for no in ["proj", "_proj", "k_proj", "layers.3", "model.layers.3.self_attn.q_proj.x"] {
            assert!(!selects(p, no), "{no}");
        }
    }

    /// The walk order is the order checkpoints were written in before names.rs existed (layer
    /// major; q, k, v, o, gate, up, down; A then B): a resumed run must find its state. The
    /// optimizer file's keys come back sorted by name (`layers.10` before `layers.2`);
    /// `param_order` restores the walk order.
    #[test]
    fn walk_order_is_the_checkpoint_order() {
        let ids: Vec<ModuleId> = LLAMA.module_ids(12).collect();
        let expect = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
        let want: Vec<ModuleId> = (0..12).flat_map(|l| expect.map(|p| ModuleId::new(l, p))).collect();
        assert_eq!(ids, want);
        let walk: Vec<ParamId> = ids.iter().flat_map(|&m| LoraHalf::BOTH.map(|half| ParamId { module: m, half })).collect();
        let mut keys: Vec<String> = walk.iter().map(|p| p.state_key()).collect();
        keys.sort();
        assert_eq!(keys[..3], ["layers.0.down_proj.lora_A", "layers.0.down_proj.lora_B", "layers.0.gate_proj.lora_A"]);
        let mut back: Vec<ParamId> = keys.iter().map(|k| LLAMA.parse_state_key(k).unwrap()).collect();
        back.sort_by_key(|&p| LLAMA.param_order(p));
        assert_eq!(back, walk);
        assert_eq!(walk[..3].iter().map(|p| p.state_key()).collect::<Vec<_>>(), ["layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B", "layers.0.k_proj.lora_A"]);
    }

    /// Each family's walk is a subsequence of [`ALL_PROJS`] (so sorting by [`ANY`] gives it),
    /// and its fused projections round-trip through every key format.
    #[test]
    fn every_family_walks_in_the_order_of_all_projs() {
        for f in FAMILIES {
            let pos: Vec<usize> = f.projs.iter().map(|&p| ANY.position(p).unwrap()).collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{}", f.name);
            for id in f.module_ids(3) {
                assert_eq!(f.parse_path(&id.path()), Some(id));
                let p = ParamId { module: id, half: LoraHalf::B };
                assert_eq!(ANY.parse_state_key(&p.state_key()), Some(p));
            }
        }
        assert_eq!(ModuleId::new(2, Proj::Qkv).path(), "model.layers.2.self_attn.qkv_proj");
        assert_eq!(ModuleId::new(0, Proj::GateUp).path(), "model.layers.0.mlp.gate_up_proj");
        assert_eq!(NormId { layer: 1, norm: Norm::QNorm }.path(), "model.layers.1.self_attn.q_norm");
        assert_eq!(Family::named("gemma3_text").map(|f| f.name), Some("gemma3"));
        assert_eq!(Family::named("gpt2"), None);
        assert_eq!((Proj::Qkv.gguf(), GEMMA2.gguf_norm(Norm::PreFeedforward)), ("attn_qkv", "ffn_norm"));
    }

    fn tiny() -> Llama {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
        crate::model::Model::load_hf_dir("tiny", &dir, &Default::default()).unwrap().llama
    }

    /// The model walk visits each block's fields as the ids say, in [`LLAMA`]'s order, and the
    /// mutable walk visits the same linears as the shared one.
    #[test]
    fn the_walk_matches_the_fields() {
        let mut m = tiny();
        let n = m.layers.len();
        let ids: Vec<ModuleId> = m.linears().map(|(id, _)| id).collect();
        assert_eq!(ids, LLAMA.module_ids(n).collect::<Vec<_>>());
        for (id, lin) in m.linears() {
            let b = &m.layers[id.layer];
            let (QkvProj::Split { q_proj, k_proj, v_proj }, GateUpProj::Split { gate_proj, up_proj }) = (&b.self_attn.qkv, &b.mlp.gate_up) else {
                panic!("a Llama block holds separate projections")
            };
            let field = match id.proj {
                Proj::Q => q_proj,
                Proj::K => k_proj,
                Proj::V => v_proj,
                Proj::O => &b.self_attn.o_proj,
                Proj::Gate => gate_proj,
                Proj::Up => up_proj,
                Proj::Down => &b.mlp.down_proj,
                Proj::Qkv | Proj::GateUp => unreachable!("not a Llama projection"),
            };
            assert!(std::ptr::eq(lin, field), "{id:?}");
            assert!(std::ptr::eq(m.linear(id).unwrap(), field));
            assert_eq!(m.module_at(&id.path()), Some(id));
        }
        assert_eq!(m.module_at(&ModuleId::new(n, Proj::Q).path()), None);
        assert!(m.linear(ModuleId::new(n, Proj::Q)).is_none());
        let shared: Vec<*const Linear> = m.linears().map(|(_, l)| l as *const Linear).collect();
        let mutable: Vec<*const Linear> = m.linears_mut().map(|(_, l)| &*l as *const Linear).collect();
        assert_eq!(shared, mutable);
        let norms: Vec<String> = m.norms().map(|(id, _)| id.path()).collect();
        assert_eq!(norms[..2], ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]);
        assert!(std::ptr::eq(m.norms().nth(1).unwrap().1, &m.layers[0].post_attention_layernorm));
        assert_eq!(m.adapters().count(), 0);
    }
}
