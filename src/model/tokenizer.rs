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
    /// A GGUF SentencePiece vocabulary's piece scores and token types as the file had them, so
    /// an export writes back exactly what was loaded (`None`: derived from the BPE's merges).
    pub spm_pieces: Option<SpmPieces>,
}

/// See [`Tokenizer::spm_pieces`].
#[derive(Clone, Debug)]
pub struct SpmPieces {
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
}

/// A GGUF vocabulary (the `tokenizer.*` metadata), already extracted from the file.
#[derive(Default)]
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
    /// `tokenizer.ggml.scores` (SentencePiece: the pieces' scores; empty for `gpt2`).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: prepend `▁`; llama.cpp's default true).
    pub add_space_prefix: Option<bool>,
    /// `general.name`: llama.cpp sets token attributes by it (Phi-3's chat tokens strip the
    /// whitespace after them).
    pub model_name: Option<String>,
}

const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_BYTE: i32 = 6;
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
            spm_pieces: None,
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

    /// Build from a GGUF vocabulary: `tokenizer.ggml.model` `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece BPE).
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Self> {
        if v.model == "llama" {
            return Self::from_spm_vocab(v);
        }
        if v.model != "gpt2" {
            bail!(
                "GGUF tokenizer model `{}` is not supported yet (supported: byte-level BPE `gpt2`, SentencePiece BPE `llama`)",
                v.model
            );
        }
        let pre = v.pre.as_deref().unwrap_or("default");
        let Some((pre_tokenizer, ignore_merges)) = pre_tokenizer_json(pre) else {
            bail!("GGUF tokenizer pre-tokenizer `tokenizer.ggml.pre = {pre}` is not supported yet (supported: {})", GGUF_PRES.join(", "))
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
        let added = gguf_added_tokens(v, false);
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
        let post_processor = special_tokens_processor(v, bos.as_deref(), eos.as_deref(), Some(byte_level_pp));
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
            spm_pieces: None,
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

/// llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) qscript reproduces exactly.
const GGUF_PRES: [&str; 5] = ["smollm", "gpt2", "default", "llama-bpe", "qwen2"];

/// The HF pre-tokenizer (and the BPE's `ignore_merges`) that llama.cpp's pre-tokenizer `pre`
/// stands for; `None` for a name qscript does not reproduce.
fn pre_tokenizer_json(pre: &str) -> Option<(Value, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "smollm" => (json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}), false),
        "gpt2" | "default" => (byte_level(true), false),
        "llama-bpe" | "llama3" => (json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}), true),
        // Qwen2, Qwen2.5, Qwen3: Llama-3's split with single digits.
        "qwen2" => (json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}), false),
        _ => return None,
    })
}

/// A pre-tokenizer's JSON without what does not change the split (`trim_offsets` only moves
/// offsets), for comparing a tokenizer.json's with [`pre_tokenizer_json`]'s.
fn split_behaviour(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().filter(|(k, _)| *k != "trim_offsets").map(|(k, v)| (k.clone(), split_behaviour(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(split_behaviour).collect()),
        v => v.clone(),
    }
}

impl Tokenizer {
    /// The GGUF vocabulary llama.cpp reads for this tokenizer, padded with unused `[PAD<i>]`
    /// tokens to `vocab_size` rows; the inverse of [`Tokenizer::from_gguf_vocab`]. Byte-level
    /// BPE becomes `gpt2` (with the pre-tokenizer's name); SentencePiece-style BPE (byte
    /// fallback, `▁` for spaces) becomes `llama` with scores: those of the GGUF it was loaded
    /// from, else ranks of its merges (llama.cpp merges the best-scored piece first, as the BPE
    /// applies its merges). Other tokenizers are an error naming what is missing.
    pub fn to_gguf_vocab(&self, vocab_size: usize) -> Result<GgufVocab> {
        let text = self.inner.to_string(false).map_err(|e| anyhow::anyhow!("tokenizer: cannot serialize: {e}"))?;
        let t: Value = serde_json::from_str(&text)?;
        let model = &t["model"];
        let spm = if model["type"] == "BPE" && model["byte_fallback"] == true { Some(spm_space_prefix(&t)?) } else { None };
        if spm.is_none() && (model["type"] != "BPE" || t["decoder"]["type"] != "ByteLevel") {
            bail!("GGUF export: only BPE tokenizers are written (byte-level, llama.cpp's `gpt2`, or SentencePiece-style with byte fallback, llama.cpp's `llama`); this one is {}", model["type"]);
        }
        let pre = match spm {
            Some(_) => "default",
            None => {
                let theirs = split_behaviour(&t["pre_tokenizer"]);
                let pre = GGUF_PRES.into_iter().find(|p| pre_tokenizer_json(p).is_some_and(|(j, _)| split_behaviour(&j) == theirs));
                let Some(pre) = pre else {
                    bail!("GGUF export: the tokenizer's pre-tokenizer {} is none llama.cpp names that qscript reproduces ({})", t["pre_tokenizer"], GGUF_PRES.join(", "))
                };
                pre
            }
        };
        let n = vocab_size.max(self.vocab_size());
        let (mut tokens, mut token_types) = (vec![None; n], vec![TOKEN_UNUSED; n]);
        for (tok, id) in model["vocab"].as_object().context("tokenizer.json: `model.vocab` is not an object")? {
            let id = id.as_u64().context("tokenizer.json: a vocabulary id is not an integer")? as usize;
            anyhow::ensure!(id < n, "tokenizer.json: token {tok:?} has id {id}, beyond the model's {vocab_size} rows");
            tokens[id] = Some(tok.clone());
            token_types[id] = if spm.is_some() && is_byte_piece(tok) { TOKEN_BYTE } else { TOKEN_NORMAL };
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            let id = id as usize;
            anyhow::ensure!(id < n, "tokenizer.json: added token {:?} has id {id}, beyond the model's {vocab_size} rows", added.content);
            tokens[id] = Some(added.content.clone());
            token_types[id] = if added.special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED };
        }
        let id = |t: &Option<String>| t.as_deref().and_then(|t| self.token_to_id(t));
        if let (Some(_), Some(unk)) = (spm, id(&self.unk_token)) {
            token_types[unk as usize] = TOKEN_UNKNOWN;
        }
        let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
        let merges: Vec<String> = model["merges"]
            .as_array()
            .context("tokenizer.json: `model.merges` is not a list")?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(p) if p.len() == 2 => Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))),
                m => bail!("tokenizer.json: malformed merge {m}"),
            })
            .collect::<Result<_>>()?;
        let (add_bos, add_eos) = self.adds_bos_eos()?;
        let mut v = GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types,
            merges,
            bos_id: id(&self.bos_token),
            eos_id: id(&self.eos_token),
            unk_id: id(&self.unk_token),
            pad_id: id(&self.pad_token),
            add_bos,
            add_eos,
            chat_template: self.chat_template.clone(),
            model_max_length: self.model_max_length,
            add_space_prefix: Some(false),
            ..GgufVocab::default()
        };
        if let Some(prefix) = spm {
            v.model = "llama".into();
            v.add_space_prefix = Some(prefix);
            match &self.spm_pieces {
                // Loaded from a GGUF of this very vocabulary: write back its scores and types.
                Some(p) if p.scores.len() == n && p.token_types.len() == n && self.vocab_size() == n => {
                    v.scores = p.scores.clone();
                    v.token_types = p.token_types.clone();
                }
                _ => v.scores = spm_scores(&v.tokens, &v.token_types, &v.merges),
            }
            v.merges.clear();
        }
        Ok(v)
    }

    /// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`: Llama 2, Mistral, Gemma,
    /// Phi-3) as transformers' `LlamaConverter` builds its fast tokenizer: BPE with byte
    /// fallback over the pieces, merges from the pieces' scores ([`spm_merges`]), `▁` for
    /// spaces (prepended unless `add_space_prefix` is false), control and unknown pieces as
    /// special added tokens.
    fn from_spm_vocab(v: &GgufVocab) -> Result<Self> {
        let n = v.tokens.len();
        let ty = |i: usize| v.token_types.get(i).copied().unwrap_or(TOKEN_NORMAL);
        let mut vocab = Map::with_capacity(n);
        for (i, t) in v.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(Value::from(i as u32));
        }
        let scores: Vec<f32> = (0..n).map(|i| if ty(i) == TOKEN_NORMAL { v.scores.get(i).copied().unwrap_or(0.0) } else { 0.0 }).collect();
        let merges: Vec<Value> = spm_merges(&v.tokens, &scores).into_iter().map(|(a, b)| json!([a, b])).collect();
        let added = gguf_added_tokens(v, true);
        let tok_name = |id: Option<u32>, key: &str| -> Result<Option<String>> {
            id.map(|id| v.tokens.get(id as usize).cloned().with_context(|| format!("GGUF `tokenizer.ggml.{key}` = {id} is outside the vocabulary ({n} tokens)"))).transpose()
        };
        let (bos, eos, unk) = (tok_name(v.bos_id, "bos_token_id")?, tok_name(v.eos_id, "eos_token_id")?, tok_name(v.unk_id, "unknown_token_id")?);
        let prefix = v.add_space_prefix.unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
        let normalizer = if prefix { json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]}) } else { replace };
        let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let post_processor = special_tokens_processor(v, bos.as_deref(), eos.as_deref(), None);
        let tokenizer_json = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": null, "post_processor": post_processor,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json).map_err(|e| anyhow::anyhow!("GGUF vocabulary: cannot build tokenizer: {e}"))?;
        Ok(Tokenizer {
            inner,
            bos_token: bos,
            eos_token: eos,
            pad_token: tok_name(v.pad_id, "padding_token_id")?,
            unk_token: unk,
            chat_template: v.chat_template.clone(),
            model_max_length: v.model_max_length,
            spm_pieces: Some(SpmPieces { scores: (0..n).map(|i| v.scores.get(i).copied().unwrap_or(0.0)).collect(), token_types: (0..n).map(ty).collect() }),
        })
    }
}

/// The added tokens of a GGUF vocabulary as llama.cpp treats its token types: control (and, with
/// `unknown`, unknown) pieces special (skipped when decoding without specials), user-defined ones
/// printed. For a model whose `general.name` says Phi-3, llama.cpp strips the whitespace after
/// them but for `<unk>`, `<s>`, `<|endoftext|>` (as Phi-3's own tokenizer.json does).
fn gguf_added_tokens(v: &GgufVocab, unknown: bool) -> Vec<Value> {
    let name = v.model_name.as_deref().unwrap_or("").to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    let mut added = Vec::new();
    for (i, &ty) in v.token_types.iter().enumerate() {
        let Some(content) = v.tokens.get(i) else { break };
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED || (unknown && ty == TOKEN_UNKNOWN) {
            let rstrip = phi3 && !matches!(content.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
            added.push(json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                "rstrip": rstrip, "normalized": false, "special": ty != TOKEN_USER_DEFINED}));
        }
    }
    added
}

/// The post-processor that adds BOS / EOS as the file says (`[BOS] $A [EOS]`, and for pairs the
/// same again with type id 1, as Llama-3's), after `first` (byte-level's offsets) when given.
fn special_tokens_processor(v: &GgufVocab, bos: Option<&str>, eos: Option<&str>, first: Option<Value>) -> Value {
    let bos = bos.filter(|_| v.add_bos);
    let eos = eos.filter(|_| v.add_eos);
    if bos.is_none() && eos.is_none() {
        return first.unwrap_or(Value::Null);
    }
    let piece = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut specials = Map::new();
    for (t, id) in [(bos, v.bos_id), (eos, v.eos_id)] {
        if let (Some(t), Some(id)) = (t, id) {
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    let part = |s: &str, type_id: u32| {
        let mut p: Vec<Value> = bos.iter().map(|t| piece(t, type_id)).collect();
        p.push(seq(s, type_id));
        p.extend(eos.iter().map(|t| piece(t, type_id)));
        p
    };
    let pair = [part("A", 0), part("B", 1)].concat();
    let template = json!({"type": "TemplateProcessing", "single": part("A", 0), "pair": pair, "special_tokens": specials});
    match first {
        Some(f) => json!({"type": "Sequence", "processors": [f, template]}),
        None => template,
    }
}

/// Whether a tokenizer.json with byte fallback is SentencePiece-style as llama.cpp's `llama`
/// tokenizer runs it (spaces as `▁` by the normalizer or a `Metaspace` pre-tokenizer), and
/// whether it prepends `▁` (`tokenizer.ggml.add_space_prefix`); an error naming what differs.
fn spm_space_prefix(t: &Value) -> Result<bool> {
    let list = |v: &Value, key: &str| -> Vec<Value> {
        match v.get(key).and_then(Value::as_array) {
            Some(a) if v["type"] == "Sequence" => a.clone(),
            _ if v.is_null() => vec![],
            _ => vec![v.clone()],
        }
    };
    let (mut replace, mut prefix) = (false, false);
    for n in list(&t["normalizer"], "normalizers") {
        match n["type"].as_str() {
            Some("Replace") if n["pattern"]["String"] == " " && n["content"] == "▁" => replace = true,
            Some("Prepend") if n["prepend"] == "▁" => prefix = true,
            _ => bail!("GGUF export: the SentencePiece tokenizer's normalizer {n} is not one llama.cpp's `llama` vocabulary applies"),
        }
    }
    for p in list(&t["pre_tokenizer"], "pretokenizers") {
        match p["type"].as_str() {
            Some("Metaspace") if p["replacement"] == "▁" => {
                replace = true;
                prefix |= match p["prepend_scheme"].as_str() {
                    Some(s) => s != "never",
                    None => p["add_prefix_space"] != false,
                };
            }
            // Gemma's: splitting on " " after the normalizer replaced every space is no split.
            Some("Split") if replace && p["pattern"]["String"] == " " => {}
            _ => bail!("GGUF export: the SentencePiece tokenizer's pre-tokenizer {p} is not one llama.cpp's `llama` vocabulary applies"),
        }
    }
    anyhow::ensure!(replace, "GGUF export: a BPE tokenizer with byte fallback that does not write spaces as `▁` is neither llama.cpp's `gpt2` nor its `llama` vocabulary");
    Ok(prefix)
}

/// SentencePiece's byte pieces `<0x00>` .. `<0xFF>`.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Scores for a SentencePiece vocabulary known only by its merges: a piece scores minus the rank
/// of the first merge that makes it, so llama.cpp's best-score-first merging applies the merges
/// in their order and [`spm_merges`] gives the same list back. Pieces whose merges interleave
/// tied in score (transformers orders a tie by the halves' lengths across pieces: Llama's runs
/// of `▁`) and score the same again. Pieces no merge makes score below all, in id order; the
/// others 0, as llama.cpp's converter writes control pieces.
fn spm_scores(tokens: &[String], types: &[i32], merges: &[String]) -> Vec<f32> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().rev().map(|(i, t)| (t.as_str(), i)).collect();
    let mut span: Vec<Option<(usize, usize)>> = vec![None; tokens.len()];
    for (r, m) in merges.iter().enumerate() {
        if let Some(&i) = ids.get(m.replacen(' ', "", 1).as_str()) {
            span[i] = Some(span[i].map_or((r, r), |(first, _)| (first, r)));
        }
    }
    let mut by_first: Vec<(usize, usize, usize)> = span.iter().enumerate().filter_map(|(i, s)| s.map(|(a, b)| (a, b, i))).collect();
    by_first.sort_unstable();
    let mut score: Vec<Option<f32>> = vec![None; tokens.len()];
    let mut group: Option<(usize, usize)> = None;
    for (first, last, i) in by_first {
        group = match group {
            Some((start, end)) if first < end => Some((start, end.max(last))),
            _ => Some((first, last)),
        };
        score[i] = group.map(|(start, _)| -(start as f32));
    }
    let n = merges.len();
    (0..tokens.len())
        .map(|i| match (types[i], score[i]) {
            (TOKEN_NORMAL, Some(s)) => s,
            (TOKEN_NORMAL, None) => -((n + i) as f32),
            _ => 0.0,
        })
        .collect()
}

/// The BPE merges of a SentencePiece vocabulary, as transformers derives them from the pieces'
/// scores: every split of a piece into two pieces of the vocabulary is a merge (within a piece
/// ordered by the halves' ids), ranked by the piece's score, then the longer left half, then the
/// longer right half (lengths in characters), ties keeping that order.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().rev().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?, scores.get(i).copied().unwrap_or(0.0))))
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    let len = |i: usize| tokens[i].chars().count();
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(len(b.0).cmp(&len(a.0))).then(len(b.1).cmp(&len(a.1))));
    merges.into_iter().map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone())).collect()
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
