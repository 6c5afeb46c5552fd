//! The tokenizer of a model: HF `tokenizers` plus what `tokenizer_config.json` adds (special
//! tokens, chat template). Built from `tokenizer.json` or from a GGUF vocabulary.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Jinja chat template (tokenizer_config.json `chat_template`, or `chat_template.jinja`).
    pub chat_template: Option<String>,
    /// tokenizer_config.json `model_max_length` (or the GGUF context length), when known.
    pub model_max_length: Option<usize>,
}

/// A GGUF vocabulary (the `tokenizer.*` metadata), already extracted from the file.
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (`gpt2`, `llama`, ...).
    pub model: String,
    /// `tokenizer.ggml.pre` (`smollm`, `gpt2`, `llama-bpe`, ...), if present.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    /// `"a b"` strings.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    pub model_max_length: Option<usize>,
}

const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
/// The longest text (bytes) one `encode` takes: a 60 MB string once crashed the tokenizer.
pub const MAX_ENCODE_BYTES: usize = 16 << 20;

impl Tokenizer {
    /// Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`) from an HF
    /// directory. `Ok(None)` when the directory has no tokenizer.json.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let inner: tokenizers::Tokenizer = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}:{}: invalid tokenizer: {e}", path.display(), e.line(), e.column())
        })?;
        let config = read_json_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        // Older repos keep special tokens only in special_tokens_map.json.
        let special_map = read_json_object(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let token = |key: &str| token_content(config.get(key)).or_else(|| token_content(special_map.get(key)));

        let jinja = dir.join("chat_template.jinja");
        // transformers 5 keeps the template in its own file; it wins over the config key, as there.
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?)
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => {
                    let named = |name: &str| {
                        list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    };
                    let t = named("default").or_else(|| list.first());
                    t.and_then(|t| t.get("template")).and_then(Value::as_str).map(String::from)
                }
                Some(other) => bail!(
                    "{}: `chat_template` must be a string or a list of {{name, template}}, got {other}",
                    dir.join("tokenizer_config.json").display()
                ),
            }
        };
        // transformers writes a huge float sentinel when unknown; keep only real integers.
        let model_max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&n| n < (1 << 40))
            .map(|n| n as usize);
        Ok(Some(Tokenizer {
            inner,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
            chat_template,
            model_max_length,
        }))
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (transformers-compatible).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let json = self.inner.to_string(false).map_err(|e| anyhow::anyhow!("tokenizer: cannot serialize: {e}"))?;
        crate::util::fs::write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = serde_json::to_string_pretty(&self.config_json()?)?;
        crate::util::fs::write(&dir.join("tokenizer_config.json"), config.as_bytes())?;
        // A stale chat_template.jinja would win over the config key in transformers 5.
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            match &self.chat_template {
                Some(t) => crate::util::fs::write(&jinja, t.as_bytes())?,
                None => std::fs::remove_file(&jinja).with_context(|| format!("{}: cannot remove", jinja.display()))?,
            }
        }
        Ok(())
    }

    /// The `tokenizer_config.json` that [`Tokenizer::save`] writes.
    pub fn config_json(&self) -> Result<Value> {
        let mut decoder: Vec<(u32, tokenizers::AddedToken)> =
            self.inner.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        let mut added = Map::new();
        for (id, t) in &decoder {
            added.insert(
                id.to_string(),
                json!({"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                       "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}),
            );
        }
        // Whether the post-processor adds BOS/EOS decides add_bos_token/add_eos_token, so
        // transformers' slow/fast paths agree with what `encode(.., true)` does here.
        let (add_bos, add_eos) = self.adds_bos_eos()?;
        let mut c = Map::new();
        c.insert("add_bos_token".into(), add_bos.into());
        c.insert("add_eos_token".into(), add_eos.into());
        c.insert("added_tokens_decoder".into(), Value::Object(added));
        let opt = |t: &Option<String>| t.clone().map(Value::String).unwrap_or(Value::Null);
        c.insert("bos_token".into(), opt(&self.bos_token));
        if let Some(t) = &self.chat_template {
            c.insert("chat_template".into(), t.clone().into());
        }
        c.insert("clean_up_tokenization_spaces".into(), false.into());
        c.insert("eos_token".into(), opt(&self.eos_token));
        if let Some(n) = self.model_max_length {
            c.insert("model_max_length".into(), n.into());
        }
        c.insert("pad_token".into(), opt(&self.pad_token));
        c.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        c.insert("unk_token".into(), opt(&self.unk_token));
        Ok(Value::Object(c))
    }

    fn adds_bos_eos(&self) -> Result<(bool, bool)> {
        let with = self.encode("a", true)?;
        let without = self.encode("a", false)?;
        let id = |t: &Option<String>| t.as_deref().and_then(|t| self.token_to_id(t));
        let bos = id(&self.bos_token).is_some_and(|b| with.first() == Some(&b) && without.first() != Some(&b));
        let eos = id(&self.eos_token).is_some_and(|e| with.last() == Some(&e) && without.last() != Some(&e));
        Ok((bos, eos))
    }

    /// Build from a GGUF vocabulary. Supports `tokenizer.ggml.model == "gpt2"` (byte-level BPE).
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Self> {
        if v.model != "gpt2" {
            bail!(
                "GGUF tokenizer model `{}` is not supported yet (only byte-level BPE `gpt2` is)",
                v.model
            );
        }
        let pre = v.pre.as_deref().unwrap_or("default");
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
        };
        // Each llama.cpp `pre` names a pre-tokenizer regex; only those we reproduce exactly.
        let (pre_tokenizer, ignore_merges) = match pre {
            "smollm" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "gpt2" | "default" => (byte_level(true), false),
            "llama-bpe" | "llama3" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
                true,
            ),
            // Qwen2, Qwen2.5, Qwen3: Llama-3's split with single digits.
            "qwen2" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
                false,
            ),
            other => bail!("GGUF tokenizer pre-tokenizer `tokenizer.ggml.pre = {other}` is not supported yet (supported: smollm, gpt2, llama-bpe, qwen2)"),
        };
        let n = v.tokens.len();
        let mut vocab = Map::with_capacity(n);
        for (i, t) in v.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(Value::from(i as u32));
        }
        let mut merges = Vec::with_capacity(v.merges.len());
        for m in &v.merges {
            let Some((a, b)) = m.split_once(' ') else { bail!("GGUF `tokenizer.ggml.merges`: malformed merge {m:?}") };
            merges.push(json!([a, b]));
        }
        let mut added = Vec::new();
        for (i, ty) in v.token_types.iter().enumerate() {
            if *ty == TOKEN_CONTROL || *ty == TOKEN_USER_DEFINED {
                let Some(content) = v.tokens.get(i) else { continue };
                // Like llama.cpp: control tokens are skipped when decoding without specials,
                // user-defined ones are printed.
                added.push(json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == TOKEN_CONTROL}));
            }
        }
        let tok_name = |id: Option<u32>, key: &str| -> Result<Option<String>> {
            match id {
                None => Ok(None),
                Some(id) => v.tokens.get(id as usize).cloned().map(Some).with_context(|| {
                    format!("GGUF `tokenizer.ggml.{key}` = {id} is outside the vocabulary ({n} tokens)")
                }),
            }
        };
        let bos = tok_name(v.bos_id, "bos_token_id")?;
        let eos = tok_name(v.eos_id, "eos_token_id")?;
        let byte_level_pp = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
        let post_processor = if (v.add_bos && bos.is_some()) || (v.add_eos && eos.is_some()) {
            let piece = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
            let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
            let bos = bos.as_deref().filter(|_| v.add_bos);
            let eos = eos.as_deref().filter(|_| v.add_eos);
            let mut specials = Map::new();
            for (t, id) in [(bos, v.bos_id), (eos, v.eos_id)] {
                if let (Some(t), Some(id)) = (t, id) {
                    specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
                }
            }
            // `[BOS] $A [EOS]`, and for pairs the same again with type id 1 (as Llama-3's).
            let part = |s: &str, type_id: u32| {
                let mut p: Vec<Value> = bos.iter().map(|t| piece(t, type_id)).collect();
                p.push(seq(s, type_id));
                p.extend(eos.iter().map(|t| piece(t, type_id)));
                p
            };
            let single = part("A", 0);
            let pair = [part("A", 0), part("B", 1)].concat();
            json!({"type": "Sequence", "processors": [byte_level_pp,
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}]})
        } else {
            byte_level_pp
        };
        let tokenizer_json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json)
            .map_err(|e| anyhow::anyhow!("GGUF vocabulary: cannot build tokenizer: {e}"))?;
        Ok(Tokenizer {
            inner,
            bos_token: bos,
            eos_token: eos,
            pad_token: tok_name(v.pad_id, "padding_token_id")?,
            unk_token: tok_name(v.unk_id, "unknown_token_id")?,
            chat_template: v.chat_template.clone(),
            model_max_length: v.model_max_length,
        })
    }

    /// Encode; `add_special_tokens` applies the tokenizer's post-processor (e.g. Llama-3's BOS).
    /// Special tokens written in the text (`<|im_start|>`) are parsed as special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // Checked before the tokenizer allocates per byte (offsets, pre-token splits).
        if text.len() > MAX_ENCODE_BYTES {
            anyhow::bail!(
                "tokenizer: the text is {} MiB, more than the {} MiB tokenized at once; split it",
                text.len() >> 20,
                MAX_ENCODE_BYTES >> 20
            );
        }
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Qwen2's split regex (its tokenizer.json), which llama.cpp's `qwen2` pre-tokenizer mirrors.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama-3's split regex (its tokenizer.json), which llama.cpp's `llama-bpe` pre-tokenizer mirrors.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A special-token entry: `"<s>"` or an AddedToken dict `{"content": "<s>", ...}`.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// A JSON object file; `Ok(None)` if missing, an error naming file:line:col if malformed.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => bail!("{}: expected a JSON object", path.display()),
        Err(e) => bail!("{}:{}:{}: invalid JSON: {e}", path.display(), e.line(), e.column()),
    }
}
