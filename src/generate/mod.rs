//! Text generation: sampling and the decode loop with a KV cache (chat templates are in
//! `data::chat_template`).

pub mod sampling;

use crate::model::Model;
use anyhow::Result;
use candle_core::Tensor;
use sampling::{Sampler, SamplingParams};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Token ids that end generation (eos / end-of-turn).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    pub fn tokens_per_sec(&self) -> f64 {
        if self.decode_secs > 0.0 { self.ids.len().saturating_sub(1) as f64 / self.decode_secs } else { 0.0 }
    }
}

/// Decodes generated ids incrementally into text that is safe to print: a piece is released
/// only once it no longer ends in an incomplete UTF-8 sequence.
struct Detokenizer {
    emitted: String,
}

impl Detokenizer {
    fn next_piece(&mut self, model: &Model, ids: &[u32]) -> Result<Option<String>> {
        let text = model.tokenizer()?.decode(ids, true)?;
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted.len()..].to_string();
        self.emitted = text;
        Ok(Some(piece))
    }
}

/// Generate from `prompt_ids`; `on_text` receives text pieces as they become final (for
/// streaming). Polls Ctrl-C between tokens.
pub fn generate(model: &Model, prompt_ids: &[u32], opts: &GenerateOptions, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    anyhow::ensure!(!prompt_ids.is_empty(), "generate: the prompt is empty (no tokens)");
    model.check_ids(prompt_ids)?;
    let max_pos = model.config().max_position_embeddings.min(crate::model::llama::ROPE_TABLE_MAX);
    anyhow::ensure!(
        prompt_ids.len() < max_pos,
        "prompt has {} tokens, the model's context is {max_pos}",
        prompt_ids.len()
    );
    let max_new = opts.max_new_tokens.min(max_pos - prompt_ids.len());
    let llama = &model.llama;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stops = sampling::StopStrings::new(&opts.stop);
    let mut cache = llama.new_cache();
    let mut all: Vec<u32> = prompt_ids.to_vec();
    let mut ids: Vec<u32> = Vec::new();
    let mut detok = Detokenizer { emitted: String::new() };
    let mut text = String::new();
    let mut finish = FinishReason::Length;

    let t0 = Instant::now();
    let mut input = Tensor::new(prompt_ids, &llama.device)?.unsqueeze(0)?;
    let mut prefill_secs = 0.0;
    for step in 0..max_new {
        crate::check_limits()?;
        let logits = llama.forward(&input, Some(&mut cache), true)?;
        let mut row = logits.flatten_all()?.to_vec1::<f32>()?;
        if step == 0 {
            prefill_secs = t0.elapsed().as_secs_f64();
        }
        let next = sampler.sample(&mut row, &all)?;
        if opts.eos_token_ids.contains(&next) {
            finish = FinishReason::Eos;
            break;
        }
        ids.push(next);
        all.push(next);
        if let Some(piece) = detok.next_piece(model, &ids)? {
            let (safe, stop_hit) = stops.push(&piece);
            if !safe.is_empty() {
                on_text(&safe);
                text.push_str(&safe);
            }
            if stop_hit {
                finish = FinishReason::Stop;
                break;
            }
        }
        input = Tensor::new(&[next], &llama.device)?.unsqueeze(0)?;
    }
    if finish != FinishReason::Stop {
        let rest = stops.finish();
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
    }
    Ok(Generation {
        text,
        ids,
        prompt_tokens: prompt_ids.len(),
        finish_reason: finish,
        prefill_secs,
        decode_secs: t0.elapsed().as_secs_f64() - prefill_secs,
    })
}
