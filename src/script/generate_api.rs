//! `model.generate(prompt, #{...})` and `model.chat(messages, #{...})`.

use super::config::{self, Cfg};
use super::model_api::{messages_from_dynamic, ModelHandle};
use super::{rt, Api};
use crate::generate::sampling::SamplingParams;
use crate::generate::{generate, GenerateOptions};
use rhai::{Dynamic, Map};
use std::cell::RefCell;
use std::io::Write;

/// The most tokens one `generate` / `chat` call produces.
pub const MAX_NEW_TOKENS: usize = 32768;
thread_local! {
    /// The last answer printed as it came (`stream: true`), so that the REPL does not print the
    /// returned value a second time.
    static STREAMED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The text of the last streamed answer since the previous call, if any.
pub fn take_streamed() -> Option<String> {
    STREAMED.with(|s| s.borrow_mut().take())
}

/// Defaults follow transformers: greedy unless `do_sample`/`temperature` (or the model's
/// generation_config.json) ask for sampling; when sampling, top_k defaults to 50.
fn options(m: &ModelHandle, cfg: &Cfg) -> anyhow::Result<GenerateOptions> {
    let model = m.get()?;
    let gc = &model.generation_config;
    let gc_f = |k: &str| gc.get(k).and_then(|v| v.as_f64());
    let gc_sample = gc.get("do_sample").and_then(|v| v.as_bool()).unwrap_or(false);
    let temperature = match (cfg.bool("do_sample"), cfg.float("temperature")) {
        (Some(false), _) => 0.0,
        (_, Some(t)) => t,
        (Some(true), None) => gc_f("temperature").unwrap_or(1.0),
        (None, None) if gc_sample => gc_f("temperature").unwrap_or(1.0),
        (None, None) => 0.0,
    };
    anyhow::ensure!(temperature >= 0.0, "`temperature` must be >= 0, got {temperature}");
    let sampling_on = temperature > 0.0;
    let top_k = match cfg.usize("top_k").map_err(anyhow::Error::msg)? {
        Some(k) => Some(k),
        None if sampling_on => Some(gc.get("top_k").and_then(|v| v.as_u64()).map_or(50, |k| k as usize)),
        None => None,
    }
    .filter(|&k| k > 0);
    let top_p = cfg.float("top_p").or_else(|| if sampling_on { gc_f("top_p") } else { None });
    if let Some(p) = top_p {
        anyhow::ensure!((0.0..=1.0).contains(&p), "`top_p` must be in [0, 1], got {p}");
    }
    let min_p = cfg.float("min_p");
    if let Some(p) = min_p {
        anyhow::ensure!((0.0..=1.0).contains(&p), "`min_p` must be in [0, 1], got {p}");
    }
    let repetition_penalty = cfg.float("repetition_penalty").or_else(|| gc_f("repetition_penalty"));
    if let Some(r) = repetition_penalty {
        anyhow::ensure!(r > 0.0, "`repetition_penalty` must be > 0, got {r}");
    }
    // Bounded: one `generate` call is one Rhai operation, whatever it asks for.
    let max_new_tokens = match cfg.usize("max_new_tokens").map_err(anyhow::Error::msg)? {
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
            min_p: min_p.filter(|&p| p > 0.0),
            repetition_penalty: repetition_penalty.filter(|&r| r != 1.0),
            seed: cfg.int("seed").unwrap_or(0) as u64,
        },
        stop: cfg.str_list("stop").unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect(),
        eos_token_ids: model.eos_token_ids(),
    })
}

/// Generates from `prompt_ids`; `on_text` gets each piece as it becomes final. A chat answer
/// also ends at the template's end-of-turn token, when generation_config does not list it (GGUF,
/// random or converted checkpoints).
fn run_with(m: &ModelHandle, prompt_ids: &[u32], cfg: &Cfg, chat: bool, on_text: &mut dyn FnMut(&str)) -> anyhow::Result<String> {
    let mut opts = options(m, cfg)?;
    let model = m.get()?;
    if chat {
        opts.eos_token_ids = crate::data::tokenize::ChatTokenizer::for_model(&model)?.chat_stop_ids();
    }
    Ok(generate(&model, prompt_ids, &opts, on_text)?.text)
}

/// `stream: true` prints the pieces on stdout as they come (and remembers the answer, see
/// [`take_streamed`]).
fn run(m: &ModelHandle, prompt_ids: &[u32], cfg: &Cfg, chat: bool) -> anyhow::Result<String> {
    let stream = cfg.bool("stream").unwrap_or(false);
    let mut out = std::io::stdout();
    let mut on_text = |piece: &str| {
        if stream {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let text = run_with(m, prompt_ids, cfg, chat, &mut on_text)?;
    if stream {
        println!();
        STREAMED.with(|s| *s.borrow_mut() = Some(text.clone()));
    }
    Ok(text)
}

pub fn generate_text(m: &ModelHandle, prompt: &str, opts: &Map) -> anyhow::Result<String> {
    let cfg = config::GENERATE.check(opts).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!cfg.has("system"), "generation options: `system` applies to chat(), not generate()");
    let ids = m.get()?.tokenizer()?.encode(prompt, cfg.bool("add_special_tokens").unwrap_or(true))?;
    run(m, &ids, &cfg, false)
}

/// The conversation rendered with the chat template and its generation prompt, as token ids.
fn chat_prompt(m: &ModelHandle, cfg: &Cfg, mut msgs: Vec<serde_json::Value>) -> anyhow::Result<Vec<u32>> {
    if let Some(system) = cfg.str("system") {
        msgs.insert(0, serde_json::json!({"role": "system", "content": system}));
    }
    let text = m.render_chat(&msgs, true, &serde_json::Map::new())?;
    // The template wrote every special token itself.
    m.get()?.tokenizer()?.encode(&text, false)
}

pub fn chat(m: &ModelHandle, messages: &Dynamic, opts: &Map) -> anyhow::Result<String> {
    let cfg = config::GENERATE.check(opts).map_err(anyhow::Error::msg)?;
    let ids = chat_prompt(m, &cfg, messages_from_dynamic(messages)?)?;
    run(m, &ids, &cfg, true)
}

/// The next assistant turn of `messages` (`qscript chat`), each piece handed to `on_text`.
pub fn chat_turn(m: &ModelHandle, messages: &[serde_json::Value], opts: &Map, on_text: &mut dyn FnMut(&str)) -> anyhow::Result<String> {
    let cfg = config::GENERATE.check(opts).map_err(anyhow::Error::msg)?;
    let ids = chat_prompt(m, &cfg, messages.to_vec())?;
    run_with(m, &ids, &cfg, true, on_text)
}

pub fn register(api: &mut Api) {
    api.func("generate", "model.generate(prompt) -> string",
        "Continue raw text; returns only the new text (greedy unless the model's generation_config samples).",
        |m: &mut ModelHandle, p: &str| rt(generate_text(m, p, &Map::new())));
    api.func("generate", "model.generate(prompt, #{max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, do_sample, seed, stop, stream}) -> string",
        "Continue raw text with generation options; temperature 0 is greedy; `stream: true` prints tokens as they come.",
        |m: &mut ModelHandle, p: &str, o: Map| rt(generate_text(m, p, &o)));
    api.func("chat", "model.chat(message_or_messages) -> string",
        "Answer a user message (string) or a conversation (array of #{role, content}) using the chat template.",
        |m: &mut ModelHandle, msgs: Dynamic| rt(chat(m, &msgs, &Map::new())));
    api.func("chat", "model.chat(message_or_messages, #{system, max_new_tokens, temperature, ..., stream}) -> string",
        "Answer with generation options (see generate); `system` adds a system message.",
        |m: &mut ModelHandle, msgs: Dynamic, o: Map| rt(chat(m, &msgs, &o)));
}
