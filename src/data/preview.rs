//! `dataset.preview(model, i)`: the rendered example with the trained tokens highlighted, so a
//! user sees exactly what the loss will see.

use super::tokenize::TokenizedExample;
use crate::model::Tokenizer;
use anyhow::Result;

const ON: &str = "\x1b[1;32m";
const OFF: &str = "\x1b[0m";

/// Text of the example with trained runs in green (`color`) or between `[[` and `]]`, after a
/// header line with token counts.
pub fn preview(ex: &TokenizedExample, tok: &Tokenizer, color: bool) -> Result<String> {
    let trained = ex.num_trained();
    let mut out = format!(
        "example {}: {} tokens, {} trained ({:.1}%){}; trained text {}\n",
        ex.index,
        ex.len(),
        trained,
        100.0 * trained as f64 / ex.len().max(1) as f64,
        ex.truncated_from.map(|n| format!(", truncated from {n}")).unwrap_or_default(),
        if color { format!("{ON}like this{OFF}") } else { "[[like this]]".into() },
    );
    // Decode runs of equal trained-ness (decoding token by token would split UTF-8 characters).
    let mut start = 0;
    while start < ex.len() {
        let t = ex.trained[start];
        let end = (start..ex.len()).find(|&k| ex.trained[k] != t).unwrap_or(ex.len());
        let text = tok.decode(&ex.input_ids[start..end], false)?;
        match (t, color) {
            (false, _) => out.push_str(&text),
            (true, true) => out.push_str(&format!("{ON}{text}{OFF}")),
            (true, false) => out.push_str(&format!("[[{text}]]")),
        }
        start = end;
    }
    Ok(out)
}
