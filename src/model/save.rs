//! Writing an HF model directory (`save_pretrained` of a plain — merged or never-adapted —
//! model) that qscript and transformers load, and the safetensors writer adapter saving shares.
//!
//! Overwrite policy (`util::fs::Existing::Merge`): a new `dir` appears in one rename of a fully
//! written temp directory; an existing `dir` gets each file replaced by its own atomic rename
//! and every other file in it is left alone (a single `model.safetensors` wins over stale
//! shards in both loaders).

use super::llama::Llama;
use super::names;
use super::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

/// `v` with object keys sorted at every level (Python's `json.dumps(sort_keys=True)`).
pub(crate) fn sorted_json(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted_json(&m[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted_json).collect()),
        other => other.clone(),
    }
}

/// Bytes of `t` as safetensors stores them (little-endian, row-major).
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?, // 4-bit packed weights and their u8 statistics
        d => bail!("dtype {d:?} cannot be saved"),
    })
}

fn st_dtype(d: DType) -> Option<safetensors::Dtype> {
    Some(match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::U8 => safetensors::Dtype::U8,
        _ => return None,
    })
}

/// A tensor converted to bytes only when the writer asks (one tensor at a time in memory). The
/// writer cannot take an error, so a failure is recorded in `err` and checked afterwards.
struct Lazy<'a> {
    name: &'a str,
    t: &'a Tensor,
    err: &'a RefCell<Option<String>>,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.t.dtype()).unwrap_or(safetensors::Dtype::F32) // checked before writing
    }
    fn shape(&self) -> &[usize] {
        self.t.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match tensor_bytes(self.t) {
            Ok(b) => std::borrow::Cow::Owned(b),
            Err(e) => {
                self.err.borrow_mut().get_or_insert(format!("tensor `{}`: {e}", self.name));
                std::borrow::Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.t.elem_count() * self.t.dtype().size_in_bytes()
    }
}

/// Write `tensors` (f32 / bf16 / f16, any device) as one safetensors file with metadata
/// `{"format": "pt"}` (transformers refuses files without it); `util::fs` fsyncs it.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if st_dtype(t.dtype()).is_none() {
            bail!("{}: tensor `{name}` has dtype {:?}; only f32, bf16, f16 and u8 are saved", path.display(), t.dtype());
        }
    }
    let err = RefCell::new(None);
    let views = tensors.iter().map(|(n, t)| (n.as_str(), Lazy { name: n, t, err: &err }));
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(info), path).map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
    if let Some(e) = err.into_inner() {
        bail!("{}: {e}", path.display());
    }
    Ok(())
}

/// The tensors of `llama` under their HF names, linears as dense weights; the weights of 4-bit
/// linears are left out (`quantized::quantized_tensors` gives them in bnb's layout). Adapters
/// must have been merged or removed first.
fn hf_tensors(llama: &Llama) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![(names::weight_key(names::EMBED_TOKENS), llama.embed_tokens.clone())];
    out.extend(llama.norms().map(|(id, n)| (names::weight_key(&id.path()), n.weight.clone())));
    for (id, lin) in llama.linears() {
        let path = id.path();
        if lin.lora.is_some() {
            bail!("save_model_dir: module `{path}` still has a LoRA adapter; call merge_and_unload() first, or save the adapter with save_adapter");
        }
        if lin.quantized().is_none() {
            out.push((names::weight_key(&path), lin.dense_weight()?));
        }
        if let Some(b) = &lin.bias {
            out.push((names::bias_key(&path), b.clone()));
        }
    }
    out.push((names::weight_key(names::FINAL_NORM), llama.norm.weight.clone()));
    if let Some(head) = &llama.lm_head {
        if head.lora.is_some() {
            bail!("save_model_dir: `{}` still has a LoRA adapter; call merge_and_unload() first", names::LM_HEAD);
        }
        out.push((names::weight_key(names::LM_HEAD), head.dense_weight()?));
    }
    Ok(out)
}

/// `save_pretrained` of a plain model: an HF directory with `config.json` (the model's own
/// config; `torch_dtype`/`dtype` set to the weights' dtype, `tie_word_embeddings` to whether
/// there is no separate LM head; `quantization_config` as transformers writes it when decoder
/// linears are 4-bit — saved in bitsandbytes' layout, which transformers loads — and dropped
/// otherwise, e.g. after merging), `generation_config.json` (when the model has one), `model.safetensors`
/// (HF names; tied embeddings → no `lm_head.weight`) and the tokenizer files when the model
/// has a tokenizer. Written atomically (see the module doc for what happens in an existing
/// directory). A model that still has LoRA adapters is refused: merge them first.
pub fn save_model_dir(model: &Model, dir: &Path) -> Result<()> {
    let tensors = hf_tensors(&model.llama)?;
    let dtype = tensors[0].1.dtype();
    if let Some((name, t)) = tensors.iter().find(|(_, t)| t.dtype() != dtype) {
        bail!("save_model_dir: tensor `{name}` is {:?} but the embeddings are {dtype:?}; one dtype per checkpoint", t.dtype());
    }
    let mut tensors = tensors;
    tensors.extend(super::quantized::quantized_tensors(&model.llama)?);
    let mut config = model.llama.config.raw.clone();
    let dtype_name = super::dtype_name(dtype);
    let mut set_dtype = false;
    for key in ["torch_dtype", "dtype"] {
        if config.contains_key(key) {
            config.insert(key.into(), dtype_name.into());
            set_dtype = true;
        }
    }
    if !set_dtype {
        // The key every transformers version reads (5.x maps it to `dtype`).
        config.insert("torch_dtype".into(), dtype_name.into());
    }
    config.insert("tie_word_embeddings".into(), model.llama.lm_head.is_none().into());
    match super::quantized::quantization_config_json(&model.llama) {
        Some(q) => config.insert("quantization_config".into(), q),
        None => config.remove("quantization_config"),
    };
    let pretty = |v: &Value| -> Result<Vec<u8>> { Ok((serde_json::to_string_pretty(&sorted_json(v))? + "\n").into_bytes()) };
    let jinja_there = dir.join("chat_template.jinja").exists();
    crate::util::fs::install_dir(dir, crate::util::fs::Existing::Merge, |tmp| {
        write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        crate::util::fs::write(&tmp.join("config.json"), &pretty(&Value::Object(config))?)?;
        if model.generation_config.as_object().is_some_and(|m| !m.is_empty()) {
            crate::util::fs::write(&tmp.join("generation_config.json"), &pretty(&model.generation_config)?)?;
        }
        if let Some(tok) = &model.tokenizer {
            tok.save(tmp)?;
            // transformers 5 prefers chat_template.jinja over tokenizer_config.json: replace a
            // stale one rather than let it win.
            if let (true, Some(t)) = (jinja_there, &tok.chat_template) {
                crate::util::fs::write(&tmp.join("chat_template.jinja"), t.as_bytes())?;
            }
        }
        Ok(())
    })?;
    if let Some(tok) = &model.tokenizer {
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            std::fs::remove_file(&jinja).with_context(|| format!("{}: cannot remove stale chat template", jinja.display()))?;
        }
    }
    Ok(())
}
