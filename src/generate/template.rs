//! Chat templates: the Jinja template of tokenizer_config.json rendered with minijinja so the
//! output equals transformers' `apply_chat_template`.

use anyhow::Result;
use serde_json::Value;

pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// Compile-check the template (syntax errors are reported here, with the template line).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let _ = (source, bos_token, eos_token);
        todo!("helper: chat templates")
    }

    /// Render `messages` (array of `{role, content, ...}` objects). `extra` holds further
    /// template variables (`tools`, `date_string`, ...), as transformers' `**kwargs`.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool, extra: &serde_json::Map<String, Value>) -> Result<String> {
        let _ = (messages, add_generation_prompt, extra);
        todo!("helper: chat templates")
    }
}
