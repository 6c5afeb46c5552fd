//! The tokenizer of a model: HF `tokenizers` plus what `tokenizer_config.json` adds (special
//! tokens, chat template). Built from `tokenizer.json` or from a GGUF vocabulary.

use anyhow::Result;
use std::path::Path;

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Jinja chat template (tokenizer_config.json `chat_template`, or `chat_template.jinja`).
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// Load `tokenizer.json` + `tokenizer_config.json` (+ `chat_template.jinja`) from an HF
    /// directory. `Ok(None)` when the directory has no tokenizer.json.
    pub fn from_dir(_dir: &Path) -> Result<Option<Self>> {
        todo!("helper: tokenizer loading")
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (transformers-compatible).
    pub fn save(&self, _dir: &Path) -> Result<()> {
        todo!("helper: tokenizer saving")
    }

    /// Encode; `add_special_tokens` applies the tokenizer's post-processor (e.g. Llama-3's BOS).
    /// Special tokens written in the text (`<|im_start|>`) are parsed as special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
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
