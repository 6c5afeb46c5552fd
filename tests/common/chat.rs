//! Assistant-mask helpers shared by the data and family chat tests.

use qscript::data::chat_template::ChatTemplate;
use qscript::data::tokenize::{ChatTokenizer, TokenizedExample};
use qscript::data::{Message, Row};
use qscript::model::Tokenizer;

/// The tokenizer's own chat template (if any) and its eos token as the stop id.
pub fn chat_tokenizer(tok: &Tokenizer) -> ChatTokenizer<'_> {
    let tpl = tok.chat_template.as_deref().map(|s| {
        ChatTemplate::new(s, tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or("")).unwrap()
    });
    let eos = tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)).into_iter().collect();
    ChatTokenizer::new(tok, tpl, eos)
}

pub fn msgs(turns: &[(&str, &str)]) -> Row {
    Row::messages(turns.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect())
}

/// The example as runs of (trained, decoded text).
pub fn runs(ex: &TokenizedExample, tok: &Tokenizer) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, Vec<u32>)> = Vec::new();
    for (&id, &t) in ex.input_ids.iter().zip(&ex.trained) {
        match out.last_mut() {
            Some((lt, ids)) if *lt == t => ids.push(id),
            _ => out.push((t, vec![id])),
        }
    }
    out.into_iter().map(|(t, ids)| (t, tok.decode(&ids, false).unwrap())).collect()
}

pub fn owned(v: &[(bool, &str)]) -> Vec<(bool, String)> {
    v.iter().map(|(t, s)| (*t, s.to_string())).collect()
}
