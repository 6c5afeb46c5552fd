//! GGUF files (llama.cpp): metadata → HF config, tensors dequantized to f32 with llama.cpp's
//! q/k row permutation undone, tokenizer rebuilt from the vocabulary and merges.

use super::config::Config;
use super::names::{self, Family, Proj};
use super::tokenizer::{GgufVocab, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// A GGUF model read into memory under HF names (`model.layers.0.self_attn.q_proj.weight`, ...).
pub struct GgufModel {
    /// HF `config.json` equivalent (as JSON, so it can be written out verbatim).
    pub config_json: serde_json::Value,
    pub config: Config,
    /// f32 tensors on the CPU, keyed by HF names.
    pub tensors: HashMap<String, Tensor>,
    /// `None` for a file without a vocabulary (`tokenizer.ggml.model = none`).
    pub tokenizer: Option<Tokenizer>,
    /// generation_config.json equivalent (bos/eos/pad ids).
    pub generation_config: serde_json::Value,
}

/// Header of a GGUF file (metadata and tensor table, no tensor data).
fn open(path: &Path) -> Result<(Content, std::fs::File)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let bad = |e: String| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display());
    let len = file.metadata().with_context(|| format!("{}: cannot open", path.display()))?.len();
    check_header(&mut std::io::BufReader::new(&file), len).map_err(|e| bad(format!("{e:#}")))?;
    file.seek(SeekFrom::Start(0)).with_context(|| format!("{}: cannot read", path.display()))?;
    let content = Content::read(&mut file).map_err(|e| bad(ce(e)))?;
    check_tensor_infos(&content, len).map_err(|e| bad(format!("{e:#}")))?;
    Ok((content, file))
}

/// What candle's header reader does not check, checked before it runs: `general.alignment`
/// (candle divides by it; 0 crashed) must be a power of two. The walk bounds every length by
/// the bytes left in the file, so a hostile header cannot make it allocate or loop long.
fn check_header(r: &mut impl Read, file_len: u64) -> Result<()> {
    let mut h = Header { r, pos: 0, len: file_len, wide: true };
    let magic = h.u32()?;
    anyhow::ensure!(magic == 0x4655_4747 || magic == 0x4747_5546, "unknown magic 0x{magic:08x}");
    let version = h.u32()?;
    anyhow::ensure!((1..=3).contains(&version), "unsupported GGUF version {version}");
    h.wide = version > 1;
    let _tensors = h.length()?;
    let kvs = h.length()?;
    for _ in 0..kvs {
        let n = h.length()?;
        let key = h.bytes(n)?;
        let ty = h.u32()?;
        if key == b"general.alignment" && (0..=5).contains(&ty) {
            let size = [1, 1, 2, 2, 4, 4][ty as usize];
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(&h.bytes(size as u64)?);
            let signed_negative = ty % 2 == 1 && b[size - 1] & 0x80 != 0; // candle then uses its default
            let a = u64::from_le_bytes(b);
            if !signed_negative {
                anyhow::ensure!(a.is_power_of_two() && a <= 1 << 20, "`general.alignment` = {a} is not a power of two up to 1 MiB");
            }
        } else {
            h.skip_value(ty, 0)?;
        }
    }
    Ok(())
}

struct Header<'a, R> {
    r: &'a mut R,
    pos: u64,
    len: u64,
    /// GGUF v2+: lengths are u64 (v1: u32).
    wide: bool,
}

impl<R: Read> Header<'_, R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>> {
        anyhow::ensure!(n <= self.len.saturating_sub(self.pos), "truncated header: {n} bytes wanted at offset {}", self.pos);
        let mut v = Vec::new();
        (&mut *self.r).take(n).read_to_end(&mut v)?;
        anyhow::ensure!(v.len() as u64 == n, "truncated header at offset {}", self.pos);
        self.pos += n;
        Ok(v)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap_or_default()))
    }

    fn length(&mut self) -> Result<u64> {
        if self.wide {
            Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap_or_default()))
        } else {
            self.u32().map(u64::from)
        }
    }

    /// Skip a metadata value of GGUF type `ty`.
    fn skip_value(&mut self, ty: u32, depth: usize) -> Result<()> {
        anyhow::ensure!(depth <= 64, "metadata arrays nested deeper than 64");
        let fixed = |ty: u32| -> Option<u64> {
            Some(match ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                _ => return None,
            })
        };
        match ty {
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 => {
                let et = self.u32()?;
                let n = self.length()?;
                match fixed(et) {
                    Some(size) => self.skip(n.checked_mul(size).context("array size overflows")?),
                    None => {
                        // Each element takes at least one byte: `n` is bounded by the file.
                        anyhow::ensure!(n <= self.len.saturating_sub(self.pos), "array of {n} elements is longer than the file");
                        (0..n).try_for_each(|_| self.skip_value(et, depth + 1))
                    }
                }
            }
            t => match fixed(t) {
                Some(size) => self.skip(size),
                None => bail!("unknown metadata value type {t}"),
            },
        }
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        anyhow::ensure!(n <= self.len.saturating_sub(self.pos), "truncated header: {n} bytes wanted at offset {}", self.pos);
        let got = std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())?;
        anyhow::ensure!(got == n, "truncated header at offset {}", self.pos);
        self.pos += n;
        Ok(())
    }
}

/// Every tensor's size computed without overflow and within the file, before any is read.
fn check_tensor_infos(content: &Content, file_len: u64) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        let elems = t.shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let block = t.ggml_dtype.block_size();
        let bytes = elems.filter(|e| e % block == 0).and_then(|e| (e / block).checked_mul(t.ggml_dtype.type_size()));
        match bytes {
            Some(b) if (b as u64) <= file_len.saturating_sub(content.tensor_data_offset) => {}
            _ => bail!("tensor `{name}` of shape {:?} ({:?}) does not fit in the file", t.shape.dims(), t.ggml_dtype),
        }
    }
    Ok(())
}

pub fn read_gguf(path: &Path) -> Result<GgufModel> {
    let (content, mut file) = open(path)?;
    let at = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
    let md = Meta(&content.metadata);
    let config_json = config_json(&content, &mut file).map_err(at)?;
    let config = Config::from_json(&config_json).map_err(at)?;
    let tokenizer = match has_vocab(&md).map_err(at)? {
        true => Some(Tokenizer::from_gguf_vocab(&vocab(&md, Some(config.max_position_embeddings)).map_err(at)?).map_err(at)?),
        false => None,
    };
    let tensors = hf_tensors(&content, &mut file, &config_json).map_err(at)?;
    let embed = tensors
        .get(&names::weight_key(names::EMBED_TOKENS))
        .with_context(|| format!("{}: missing tensor `token_embd.weight`", path.display()))?;
    if embed.dims() != [config.vocab_size, config.hidden_size] {
        bail!(
            "{}: `token_embd.weight` has shape {:?}, config says [{}, {}]",
            path.display(),
            embed.dims(),
            config.vocab_size,
            config.hidden_size
        );
    }
    let mut generation_config = serde_json::Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config_json.get(key) {
            generation_config.insert(key.into(), v.clone());
        }
    }
    Ok(GgufModel { config_json, config, tensors, tokenizer, generation_config: Value::Object(generation_config) })
}

/// The HF config.json equivalent and the tensors under HF names, undone from llama.cpp's
/// layout, without building the model's config or tokenizer.
pub fn read_weights(path: &Path) -> Result<(Value, HashMap<String, Tensor>)> {
    let (content, mut file) = open(path)?;
    let at = |e: anyhow::Error| anyhow::anyhow!("{}: {e:#}", path.display());
    let config_json = config_json(&content, &mut file).map_err(at)?;
    let tensors = hf_tensors(&content, &mut file, &config_json).map_err(at)?;
    Ok((config_json, tensors))
}

/// Every tensor of the file dequantized to f32 under its HF name, with what llama.cpp's
/// converter did to it undone: Llama's q/k row permutation, Gemma's `1 + w` norms.
fn hf_tensors(content: &Content, file: &mut std::fs::File, config_json: &Value) -> Result<HashMap<String, Tensor>> {
    let arch = architecture(&Meta(&content.metadata))?;
    let family = Family::of_gguf_arch(arch).context("architecture() admitted it")?;
    let heads = |key: &str| config_json[key].as_u64().map(|n| n as usize).with_context(|| format!("config.json `{key}`"));
    let (n_head, n_kv_head) = (heads("num_attention_heads")?, heads("num_key_value_heads")?);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::with_capacity(names.len());
    for name in names {
        crate::check_limits()?;
        if CONSUMED_BY_CONFIG.contains(&name.as_str()) {
            continue;
        }
        let hf = family.hf_key_from_gguf(name).with_context(|| format!("unexpected tensor `{name}` for a {arch} GGUF"))?;
        let at = |e: anyhow::Error| e.context(format!("tensor `{name}`"));
        let q = content.tensor(file, name, &Device::Cpu).map_err(|e| anyhow::anyhow!("tensor `{name}`: {}", ce(e)))?;
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| anyhow::anyhow!("tensor `{name}`: cannot dequantize: {}", ce(e)))?;
        if arch == "llama" {
            // llama.cpp permutes the rows of q and k (weights and biases) for its RoPE layout.
            let proj = hf.rsplit_once('.').and_then(|(module, _)| family.parse_path(module)).map(|id| id.proj);
            if proj == Some(Proj::Q) {
                t = unpermute_qk(&t, n_head).map_err(at)?;
            } else if proj == Some(Proj::K) {
                t = unpermute_qk(&t, n_kv_head).map_err(at)?;
            }
        }
        // Gemma's RMSNorm multiplies by `1 + w`: llama.cpp's converter stores `1 + w` (its norm
        // multiplies by the weight), transformers stores `w`.
        if family.gemma && name.ends_with("norm.weight") {
            t = t.affine(1.0, -1.0).map_err(|e| at(anyhow::anyhow!("{}", ce(e))))?;
        }
        tensors.insert(hf, t);
    }
    Ok(tensors)
}

/// Tensors whose content the config takes (RoPE factors); they are no weights of the model.
const CONSUMED_BY_CONFIG: &[&str] = &["rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"];

/// Only the tokenizer of a GGUF file (reads the header, not the tensors).
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let (content, _) = open(path)?;
    let md = Meta(&content.metadata);
    let ctx = arch_key(&md, "context_length").and_then(|k| md.u64(&k)).ok().flatten().map(|n| n as usize);
    let v = vocab(&md, ctx).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
    Tokenizer::from_gguf_vocab(&v).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// `general.type` of a GGUF file (`model`, `adapter`), reading the header only.
pub fn read_general_type(path: &Path) -> Result<Option<String>> {
    let (content, _) = open(path)?;
    Meta(&content.metadata).str("general.type").map(|t| t.map(String::from)).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// Only the HF config.json equivalent of a GGUF file (reads the header, not the tensors).
pub fn read_config_json(path: &Path) -> Result<Value> {
    let (content, mut file) = open(path)?;
    config_json(&content, &mut file).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
}

/// Convert a GGUF file into an HF model directory (`model.safetensors` f32, `config.json`,
/// `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`), atomically.
pub fn convert_to_hf_dir(gguf: &Path, out: &Path) -> Result<()> {
    use crate::util::fs::{self, Existing};
    let model = read_gguf(gguf)?;
    // Left-overs of conversions that crashed (each holds a full f32 copy of a model).
    fs::remove_stale_temps(out, std::time::Duration::from_secs(6 * 3600));
    let pretty = |v: &Value| serde_json::to_string_pretty(v).map(|s| s + "\n");
    // A parallel process that converted first wins: keep theirs.
    fs::install_dir(out, Existing::Keep, |tmp| {
        let tensors: Vec<(String, Tensor)> = model.tensors.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        super::save::write_safetensors(&tmp.join("model.safetensors"), &tensors)?;
        fs::write(&tmp.join("config.json"), pretty(&model.config_json)?.as_bytes())?;
        fs::write(&tmp.join("generation_config.json"), pretty(&model.generation_config)?.as_bytes())?;
        match &model.tokenizer {
            Some(t) => t.save(tmp),
            None => Ok(()),
        }
    })?;
    anyhow::ensure!(out.join("config.json").is_file(), "{}: cannot move converted model into place: the directory exists", out.display());
    Ok(())
}

/// Undo llama.cpp's q/k row permutation (its RoPE layout → HF's rotate-half layout).
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, rest) = rows(w, n_head)?;
    let t = (|| w.reshape((n_head, out / n_head / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(w.shape()))();
    t.map_err(|e| anyhow::anyhow!("{}", ce(e)))
}

/// llama.cpp's q/k row permutation (HF → GGUF), the inverse of [`unpermute_qk`].
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, rest) = rows(w, n_head)?;
    let t = (|| w.reshape((n_head, 2, out / n_head / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(w.shape()))();
    t.map_err(|e| anyhow::anyhow!("{}", ce(e)))
}

/// candle's message without the backtrace it appends when RUST_BACKTRACE is set.
fn ce(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => ce(*inner),
        e => e.to_string().lines().next().unwrap_or("").to_string(),
    }
}

fn rows(w: &Tensor, n_head: usize) -> Result<(usize, usize)> {
    let out = w.dim(0)?;
    if n_head == 0 || out == 0 || out % (2 * n_head) != 0 {
        bail!("{out} rows cannot be split into {n_head} heads of even size");
    }
    Ok((out, w.elem_count() / out))
}

/// Typed access to GGUF metadata, with errors that name the key.
#[derive(Clone, Copy)]
struct Meta<'a>(&'a HashMap<String, GValue>);

impl<'a> Meta<'a> {
    fn u64(&self, key: &str) -> Result<Option<u64>> {
        let v = match self.0.get(key) {
            None => return Ok(None),
            Some(v) => v,
        };
        let n = match *v {
            GValue::U8(x) => Some(x as u64),
            GValue::U16(x) => Some(x as u64),
            GValue::U32(x) => Some(x as u64),
            GValue::U64(x) => Some(x),
            GValue::I8(x) => u64::try_from(x).ok(),
            GValue::I16(x) => u64::try_from(x).ok(),
            GValue::I32(x) => u64::try_from(x).ok(),
            GValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.map(Some).with_context(|| format!("GGUF key `{key}` must be a non-negative integer, got {v:?}"))
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        match self.u64(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n).map(Some).with_context(|| format!("GGUF key `{key}` = {n} is out of range")),
        }
    }

    /// f32 values go through their shortest decimal string, so 1e-5f32 becomes 1e-05, not 9.99e-06.
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(GValue::F32(x)) => Ok(Some(x.to_string().parse()?)),
            Some(GValue::F64(x)) => Ok(Some(*x)),
            Some(_) => self.u64(key).map(|n| n.map(|n| n as f64)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => bail!("GGUF key `{key}` must be a bool, got {v:?}"),
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s)),
            Some(v) => bail!("GGUF key `{key}` must be a string, got {:?}", v.value_type()),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a Vec<GValue>>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(GValue::Array(a)) => Ok(Some(a)),
            Some(v) => bail!("GGUF key `{key}` must be an array, got {:?}", v.value_type()),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array(key)? else { return Ok(None) };
        a.iter()
            .map(|v| match v {
                GValue::String(s) => Ok(s.clone()),
                v => bail!("GGUF key `{key}` must hold strings, got {:?}", v.value_type()),
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

fn arch_key(md: &Meta, key: &str) -> Result<String> {
    let arch = md.str("general.architecture")?.context("missing GGUF key `general.architecture`")?;
    Ok(format!("{arch}.{key}"))
}

/// `general.architecture`, one of [`names::GGUF_ARCHS`] (Mistral's files say `llama`).
fn architecture<'a>(md: &Meta<'a>) -> Result<&'a str> {
    let arch = md.str("general.architecture")?.context("missing GGUF key `general.architecture`")?;
    if Family::of_gguf_arch(arch).is_none() {
        let supported: Vec<&str> = names::GGUF_ARCHS.iter().map(|(a, _)| *a).collect();
        bail!("GGUF architecture `{arch}` is not supported (supported: {})", supported.join(", "));
    }
    Ok(arch)
}

/// The `{arch}.*` metadata of a file.
struct Hparams<'a> {
    md: Meta<'a>,
    arch: &'a str,
}

impl<'a> Hparams<'a> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn opt(&self, k: &str) -> Result<Option<usize>> {
        Ok(self.md.u64(&self.key(k))?.map(|n| n as usize))
    }

    fn req(&self, k: &str) -> Result<usize> {
        self.opt(k)?.with_context(|| format!("missing GGUF key `{}`", self.key(k)))
    }

    fn f64(&self, k: &str) -> Result<Option<f64>> {
        self.md.f64(&self.key(k))
    }

    fn str(&self, k: &str) -> Result<Option<&'a str>> {
        self.md.str(&self.key(k))
    }
}

/// The HF config.json equivalent of the GGUF metadata: the fields every family has, then the
/// family's own.
fn config_json(content: &Content, file: &mut std::fs::File) -> Result<Value> {
    let md = Meta(&content.metadata);
    let h = Hparams { arch: architecture(&md)?, md };
    let hidden = h.req("embedding_length")?;
    let heads = h.req("attention.head_count")?;
    if heads == 0 {
        bail!("GGUF key `{}` must be positive", h.key("attention.head_count"));
    }
    let vocab_size = match h.opt("vocab_size")? {
        Some(n) => n,
        // A file without a vocabulary: the embedding's rows.
        None => match md.array("tokenizer.ggml.tokens")? {
            Some(t) => t.len(),
            None => content.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0]).with_context(|| format!("missing GGUF keys `{}` and `tokenizer.ggml.tokens`", h.key("vocab_size")))?,
        },
    };
    let eps_key = "attention.layer_norm_rms_epsilon";
    let has = |n: &str| content.tensor_infos.contains_key(n);
    let mut c = serde_json::Map::new();
    c.insert("hidden_size".into(), hidden.into());
    c.insert("intermediate_size".into(), h.req("feed_forward_length")?.into());
    c.insert("num_hidden_layers".into(), h.req("block_count")?.into());
    c.insert("num_attention_heads".into(), heads.into());
    c.insert("num_key_value_heads".into(), h.opt("attention.head_count_kv")?.unwrap_or(heads).into());
    c.insert("vocab_size".into(), vocab_size.into());
    c.insert("max_position_embeddings".into(), h.opt("context_length")?.unwrap_or(2048).into());
    c.insert("rms_norm_eps".into(), h.f64(eps_key)?.with_context(|| format!("missing GGUF key `{}`", h.key(eps_key)))?.into());
    c.insert("tie_word_embeddings".into(), (!has("output.weight")).into());
    for (key, gkey) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")] {
        if let Some(id) = md.u32(&format!("tokenizer.ggml.{gkey}"))? {
            c.insert(key.into(), id.into());
        }
    }
    c.insert("torch_dtype".into(), "float32".into());
    match h.arch {
        "llama" => llama_config(&h, &mut c, content, file)?,
        "qwen2" | "qwen3" => qwen_config(&h, &mut c, has("blk.0.attn_q.bias"))?,
        "gemma2" | "gemma3" => gemma_config(&h, &mut c)?,
        "phi3" => phi3_config(&h, &mut c, content, file)?,
        other => unreachable!("architecture() admitted `{other}`"),
    }
    Ok(Value::Object(c))
}

type Fields = serde_json::Map<String, Value>;

fn usize_field(c: &Fields, key: &str) -> usize {
    c[key].as_u64().unwrap_or(0) as usize
}

/// `head_dim`: `{arch}.attention.key_length`, else hidden / heads (what llama.cpp assumes).
fn head_dim(h: &Hparams, c: &Fields) -> Result<usize> {
    Ok(h.opt("attention.key_length")?.unwrap_or(usize_field(c, "hidden_size") / usize_field(c, "num_attention_heads")))
}

/// RoPE on every dimension of a head, or an error naming the key.
fn full_rotary(h: &Hparams, head_dim: usize) -> Result<()> {
    match h.opt("rope.dimension_count")? {
        Some(d) if d != head_dim => bail!("partial rotary embeddings (`{}` {d} != head dim {head_dim}) are not supported", h.key("rope.dimension_count")),
        _ => Ok(()),
    }
}

/// Llama (and Mistral, which llama.cpp writes as Llama).
fn llama_config(h: &Hparams, c: &mut Fields, content: &Content, file: &mut std::fs::File) -> Result<()> {
    let rope_dims = h.opt("rope.dimension_count")?;
    let head_dim = h.opt("attention.key_length")?.or(rope_dims).unwrap_or(usize_field(c, "hidden_size") / usize_field(c, "num_attention_heads"));
    full_rotary(h, head_dim)?;
    let rope_theta = h.f64("rope.freq_base")?.unwrap_or(10000.0);
    let scaling_type = h.str("rope.scaling.type")?.unwrap_or("none");
    if scaling_type != "none" {
        bail!("RoPE scaling `llama.rope.scaling.type = {scaling_type}` is not supported");
    }
    let has = |n: &str| content.tensor_infos.contains_key(n);
    c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    c.insert("model_type".into(), "llama".into());
    c.insert("attention_bias".into(), has("blk.0.attn_q.bias").into());
    c.insert("mlp_bias".into(), has("blk.0.ffn_up.bias").into());
    c.insert("hidden_act".into(), "silu".into());
    c.insert("head_dim".into(), head_dim.into());
    c.insert("rope_theta".into(), rope_theta.into());
    if has("rope_freqs.weight") {
        c.insert("rope_scaling".into(), llama3_scaling(content, file, rope_theta, head_dim, usize_field(c, "max_position_embeddings"))?);
    }
    Ok(())
}

/// transformers' `rope_parameters` of a layer with RoPE base `theta` and the file's scaling
/// (`{arch}.rope.scaling.*`).
fn rope_parameters(h: &Hparams, theta: f64) -> Result<Fields> {
    let mut p = Fields::new();
    p.insert("rope_theta".into(), theta.into());
    let factor = || h.f64("rope.scaling.factor")?.with_context(|| format!("missing GGUF key `{}`", h.key("rope.scaling.factor")));
    match h.str("rope.scaling.type")?.unwrap_or("none") {
        "none" => {
            p.insert("rope_type".into(), "default".into());
        }
        "linear" => {
            p.insert("rope_type".into(), "linear".into());
            p.insert("factor".into(), factor()?.into());
        }
        "yarn" => {
            p.insert("rope_type".into(), "yarn".into());
            p.insert("factor".into(), factor()?.into());
            p.insert("original_max_position_embeddings".into(), h.req("rope.scaling.original_context_length")?.into());
        }
        other => bail!("RoPE scaling `{} = {other}` is not supported", h.key("rope.scaling.type")),
    }
    Ok(p)
}

/// Qwen2 (bias on q/k/v, always) and Qwen3 (per-head q/k norms, `attention_bias` optional).
fn qwen_config(h: &Hparams, c: &mut Fields, qkv_bias: bool) -> Result<()> {
    let head_dim = head_dim(h, c)?;
    full_rotary(h, head_dim)?;
    let (arch, model_type) = if h.arch == "qwen2" { ("Qwen2ForCausalLM", "qwen2") } else { ("Qwen3ForCausalLM", "qwen3") };
    c.insert("architectures".into(), json!([arch]));
    c.insert("model_type".into(), model_type.into());
    if h.arch == "qwen3" {
        c.insert("attention_bias".into(), qkv_bias.into());
    }
    c.insert("hidden_act".into(), "silu".into());
    c.insert("head_dim".into(), head_dim.into());
    c.insert("rope_parameters".into(), rope_parameters(h, h.f64("rope.freq_base")?.unwrap_or(10000.0))?.into());
    c.insert("use_sliding_window".into(), false.into());
    c.insert("sliding_window".into(), Value::Null);
    Ok(())
}

/// Gemma 2 and Gemma 3 (`gemma3_text`): GeGLU, `(1 + w)` norms, sliding and global layers,
/// soft-capping. Where the file is silent, llama.cpp's defaults: Gemma 2's window 4096 and
/// soft-caps 50 / 30, the layer periods 2 and 6, Gemma 3's local RoPE base 10000.
fn gemma_config(h: &Hparams, c: &mut Fields) -> Result<()> {
    let gemma2 = h.arch == "gemma2";
    let head_dim = head_dim(h, c)?;
    full_rotary(h, head_dim)?;
    let layers = usize_field(c, "num_hidden_layers");
    // llama.cpp scales queries by 1/sqrt(head_dim), but by 1/sqrt(hidden / heads) in the 27B
    // models, which it knows by their layer count (as gemma_pytorch's configs do).
    let is_27b = layers == if gemma2 { 46 } else { 62 };
    let scalar = if is_27b { usize_field(c, "hidden_size") / usize_field(c, "num_attention_heads") } else { head_dim };
    let window = match gemma2 {
        true => h.opt("attention.sliding_window")?.unwrap_or(4096),
        false => h.req("attention.sliding_window")?,
    };
    let sliding = sliding_layers(h, layers, if gemma2 { 2 } else { 6 })?;
    let layer_types: Vec<&str> = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    let theta = h.f64("rope.freq_base")?.unwrap_or(10000.0);
    if gemma2 {
        c.insert("architectures".into(), json!(["Gemma2ForCausalLM"]));
        c.insert("model_type".into(), "gemma2".into());
        c.insert("attn_logit_softcapping".into(), h.f64("attn_logit_softcapping")?.unwrap_or(50.0).into());
        c.insert("final_logit_softcapping".into(), h.f64("final_logit_softcapping")?.unwrap_or(30.0).into());
        c.insert("rope_parameters".into(), rope_parameters(h, theta)?.into());
    } else {
        c.insert("architectures".into(), json!(["Gemma3ForCausalLM"]));
        c.insert("model_type".into(), "gemma3_text".into());
        c.insert("attn_logit_softcapping".into(), Value::Null);
        c.insert("final_logit_softcapping".into(), h.f64("final_logit_softcapping")?.into());
        // RoPE scaling applies to the global layers only; the local ones have their own base.
        let local = json!({"rope_type": "default", "rope_theta": h.f64("rope.freq_base_swa")?.unwrap_or(10000.0)});
        c.insert("rope_parameters".into(), json!({"full_attention": rope_parameters(h, theta)?, "sliding_attention": local}));
        c.insert("use_bidirectional_attention".into(), false.into());
    }
    c.insert("attention_bias".into(), false.into());
    c.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    c.insert("head_dim".into(), head_dim.into());
    c.insert("query_pre_attn_scalar".into(), scalar.into());
    c.insert("sliding_window".into(), window.into());
    c.insert("layer_types".into(), json!(layer_types));
    Ok(())
}

/// Which layers use the sliding window: `{arch}.attention.sliding_window_pattern` as llama.cpp
/// reads it, one flag per layer or a period `n` (layer `i` slides when `i % n < n - 1`; 0: all
/// slide), else the architecture's period.
fn sliding_layers(h: &Hparams, layers: usize, default_period: u64) -> Result<Vec<bool>> {
    let key = h.key("attention.sliding_window_pattern");
    if let Some(GValue::Array(flags)) = h.md.0.get(&key) {
        if flags.len() != layers {
            bail!("GGUF key `{key}` has {} entries for {layers} layers", flags.len());
        }
        return flags
            .iter()
            .map(|v| match *v {
                GValue::Bool(b) => Ok(b),
                GValue::U8(n) => Ok(n != 0),
                GValue::I32(n) => Ok(n != 0),
                GValue::U32(n) => Ok(n != 0),
                ref v => bail!("GGUF key `{key}` must hold bools, got {:?}", v.value_type()),
            })
            .collect();
    }
    let n = h.md.u64(&key)?.unwrap_or(default_period) as usize;
    Ok((0..layers).map(|i| n == 0 || i % n < n - 1).collect())
}

/// Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv and gate_up projections, partial rotary embeddings
/// (Phi-4-mini), long-context RoPE factors stored as tensors.
fn phi3_config(h: &Hparams, c: &mut Fields, content: &Content, file: &mut std::fs::File) -> Result<()> {
    let head_dim = usize_field(c, "hidden_size") / usize_field(c, "num_attention_heads");
    let rope_dims = h.opt("rope.dimension_count")?.unwrap_or(head_dim);
    let theta = h.f64("rope.freq_base")?.unwrap_or(10000.0);
    let original = h.opt("rope.scaling.original_context_length")?.unwrap_or(usize_field(c, "max_position_embeddings"));
    let mut factors = |name: &str| -> Result<Option<Vec<f32>>> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let t = content.tensor(file, name, &Device::Cpu).and_then(|q| q.dequantize(&Device::Cpu)).and_then(|t| t.flatten_all()?.to_vec1::<f32>());
        t.map(Some).map_err(|e| anyhow::anyhow!("tensor `{name}`: {}", ce(e)))
    };
    let mut rope = match (factors("rope_factors_long.weight")?, factors("rope_factors_short.weight")?) {
        (None, None) => rope_parameters(h, theta)?,
        (Some(long), Some(short)) => {
            let mut p = Fields::new();
            p.insert("rope_type".into(), "longrope".into());
            p.insert("rope_theta".into(), theta.into());
            p.insert("long_factor".into(), json!(long));
            p.insert("short_factor".into(), json!(short));
            p
        }
        _ => bail!("tensors `rope_factors_long.weight` and `rope_factors_short.weight` come in pairs; this file has one"),
    };
    rope.insert("partial_rotary_factor".into(), (rope_dims as f64 / head_dim as f64).into());
    c.insert("architectures".into(), json!(["Phi3ForCausalLM"]));
    c.insert("model_type".into(), "phi3".into());
    c.insert("hidden_act".into(), "silu".into());
    c.insert("original_max_position_embeddings".into(), original.into());
    c.insert("rope_parameters".into(), rope.into());
    // The converter writes 0 where config.json had none (Phi-4).
    let window = h.opt("attention.sliding_window")?.filter(|&w| w > 0);
    c.insert("sliding_window".into(), window.map_or(Value::Null, Value::from));
    Ok(())
}

/// llama.cpp stores Llama-3.x RoPE scaling as per-frequency factors (`rope_freqs.weight`).
/// Recover transformers' `rope_scaling` from them: llama3 when they are Llama 3.1's, else the
/// divisors as they are.
fn llama3_scaling(content: &Content, file: &mut std::fs::File, theta: f64, head_dim: usize, max_pos: usize) -> Result<Value> {
    let factors = content
        .tensor(file, "rope_freqs.weight", &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| anyhow::anyhow!("tensor `rope_freqs.weight`: {}", ce(e)))?;
    let factor = factors.iter().copied().fold(1.0f32, f32::max).to_string().parse::<f64>()?;
    // Llama 3.1/3.2 values; transformers computes the same factors from them.
    let (low, high, old) = (1.0, 4.0, 8192.0);
    let s = crate::model::config::Llama3Scaling { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: old as usize };
    let expected = (0..head_dim / 2).map(|i| {
        let f = theta.powf(-((2 * i) as f64) / head_dim as f64);
        f / s.apply(f)
    });
    let same = factors.len() == head_dim / 2
        && expected.zip(&factors).all(|(e, &f)| (e - f as f64).abs() <= 1e-3 * e);
    if !same {
        // Other llama3 parameters (the file keeps only the divisors): the divisors themselves,
        // as a longrope scaling that applies them at every length without an attention factor.
        let divisors: Vec<f64> = factors.iter().map(|f| f.to_string().parse().unwrap_or(*f as f64)).collect();
        return Ok(json!({"rope_type": "longrope", "short_factor": divisors, "long_factor": divisors, "attention_factor": 1.0,
                         "original_max_position_embeddings": max_pos}));
    }
    Ok(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": old as usize}))
}

/// Whether the file has a vocabulary: llama.cpp's converter writes `tokenizer.ggml.model =
/// none` (`no_vocab`) for a model without one.
fn has_vocab(md: &Meta) -> Result<bool> {
    Ok(!matches!(md.str("tokenizer.ggml.model")?, Some("none" | "no_vocab")))
}

/// The `tokenizer.*` metadata of a GGUF file.
fn vocab(md: &Meta, model_max_length: Option<usize>) -> Result<GgufVocab> {
    let tokens = md.strings("tokenizer.ggml.tokens")?.context("missing GGUF key `tokenizer.ggml.tokens`")?;
    let token_types = match md.array("tokenizer.ggml.token_type")? {
        None => vec![],
        Some(a) => a
            .iter()
            .map(|v| match *v {
                GValue::I32(x) => Ok(x),
                GValue::U32(x) => Ok(x as i32),
                GValue::I8(x) => Ok(x as i32),
                GValue::U8(x) => Ok(x as i32),
                ref v => bail!("GGUF key `tokenizer.ggml.token_type` must hold integers, got {:?}", v.value_type()),
            })
            .collect::<Result<_>>()?,
    };
    Ok(GgufVocab {
        model: md.str("tokenizer.ggml.model")?.context("missing GGUF key `tokenizer.ggml.model`")?.to_string(),
        pre: md.str("tokenizer.ggml.pre")?.map(String::from),
        tokens,
        token_types,
        merges: md.strings("tokenizer.ggml.merges")?.unwrap_or_default(),
        bos_id: md.u32("tokenizer.ggml.bos_token_id")?,
        eos_id: md.u32("tokenizer.ggml.eos_token_id")?,
        // llama.cpp writes `unknown_token_id`; some converters `unk_token_id`.
        unk_id: match md.u32("tokenizer.ggml.unknown_token_id")? {
            Some(id) => Some(id),
            None => md.u32("tokenizer.ggml.unk_token_id")?,
        },
        pad_id: md.u32("tokenizer.ggml.padding_token_id")?,
        add_bos: md.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        add_eos: md.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        chat_template: md.str("tokenizer.chat_template")?.map(String::from),
        model_max_length,
        scores: match md.array("tokenizer.ggml.scores")? {
            None => vec![],
            Some(a) => a.iter().map(|x| x.to_f32().map_err(|_| anyhow::anyhow!("GGUF key `tokenizer.ggml.scores` must hold f32 values"))).collect::<Result<_>>()?,
        },
        add_space_prefix: md.bool("tokenizer.ggml.add_space_prefix")?,
        model_name: md.str("general.name")?.map(String::from),
    })
}
