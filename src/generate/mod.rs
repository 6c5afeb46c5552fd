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

/// What a caller may set (`model.chat` options, an HTTP request); `None`: the model's
/// generation_config.json, then transformers' defaults (see [`options`]).
#[derive(Debug, Clone, Default)]
pub struct UserOptions {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// The most tokens one `generate` / `chat` call (or server request) produces.
pub const MAX_NEW_TOKENS: usize = 32768;

/// The generation options of `u` for `model`. Defaults follow transformers: greedy unless
/// `do_sample`/`temperature` (or the model's generation_config.json) ask for sampling; when
/// sampling, top_k defaults to 50; 256 new tokens.
pub fn options(model: &Model, u: &UserOptions) -> Result<GenerateOptions> {
    let gc = &model.generation_config;
    let gc_f = |k: &str| gc.get(k).and_then(|v| v.as_f64());
    let gc_sample = gc.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false);
    let temperature = match (u.do_sample, u.temperature) {
        (Some(false), _) => 0.0,
        (_, Some(t)) => t,
        (Some(true), None) => gc_f("temperature").unwrap_or(1.0),
        (None, None) if gc_sample => gc_f("temperature").unwrap_or(1.0),
        (None, None) => 0.0,
    };
    anyhow::ensure!(temperature >= 0.0, "`temperature` must be >= 0, got {temperature}");
    let sampling_on = temperature > 0.0;
    let top_k = match u.top_k {
        Some(k) => Some(k),
        None if sampling_on => Some(gc.get("top_k").and_then(|v| v.as_u64()).map_or(50, |k| k as usize)),
        None => None,
    }
    .filter(|&k| k > 0);
    let top_p = u.top_p.or_else(|| if sampling_on { gc_f("top_p") } else { None });
    if let Some(p) = top_p {
        anyhow::ensure!((0.0..=1.0).contains(&p), "`top_p` must be in [0, 1], got {p}");
    }
    if let Some(p) = u.min_p {
        anyhow::ensure!((0.0..=1.0).contains(&p), "`min_p` must be in [0, 1], got {p}");
    }
    let repetition_penalty = u.repetition_penalty.or_else(|| gc_f("repetition_penalty"));
    if let Some(r) = repetition_penalty {
        anyhow::ensure!(r > 0.0, "`repetition_penalty` must be > 0, got {r}");
    }
    // Bounded: one `generate` call is one Rhai operation (and one server request), whatever it asks for.
    let max_new_tokens = match u.max_new_tokens {
        Some(n) if n > MAX_NEW_TOKENS => anyhow::bail!("`max_new_tokens` = {n} is more than {MAX_NEW_TOKENS}, the most one call generates"),
        Some(n) => n,
        None => gc.get("max_new_tokens").and_then(|v| v.as_u64()).map_or(256, |n| (n as usize).min(MAX_NEW_TOKENS)),
    };
    Ok(GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p: top_p.filter(|&p| p < 1.0),
            min_p: u.min_p.filter(|&p| p > 0.0),
            repetition_penalty: repetition_penalty.filter(|&r| r != 1.0),
            seed: u.seed.unwrap_or(0),
        },
        stop: u.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
        eos_token_ids: model.eos_token_ids(),
    })
}

/// Generate from `prompt_ids`; `on_text` receives text pieces as they become final (for
/// streaming). Polls Ctrl-C between tokens.
pub fn generate(model: &Model, prompt_ids: &[u32], opts: &GenerateOptions, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    generate_while(model, prompt_ids, opts, &mut |piece| {
        on_text(piece);
        true
    })
}

/// [`generate`], stopping (finish reason `Length`) once `on_text` returns false: a streaming
/// client that went away.
pub fn generate_while(model: &Model, prompt_ids: &[u32], opts: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation> {
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
                text.push_str(&safe);
                if !on_text(&safe) {
                    break;
                }
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
