//! `model.generate(prompt, #{...})` and `model.chat(messages, #{...})`.

use super::config::{self, Cfg};
use super::model_api::{messages_from_dynamic, ModelHandle};
use super::{rt, Api};
use crate::generate::{generate, GenerateOptions, UserOptions};
use rhai::{Dynamic, Map};
use std::cell::RefCell;
use std::io::Write;

thread_local! {
    /// The last answer printed as it came (`stream: true`), so that the REPL does not print the
    /// returned value a second time.
    static STREAMED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The text of the last streamed answer since the previous call, if any.
pub fn take_streamed() -> Option<String> {
    STREAMED.with(|s| s.borrow_mut().take())
}

/// `model.generate` / `model.chat` options → [`crate::generate::options`].
fn options(m: &ModelHandle, cfg: &Cfg) -> anyhow::Result<GenerateOptions> {
    let u = UserOptions {
        do_sample: cfg.bool("do_sample"),
        temperature: cfg.float("temperature"),
        top_k: cfg.usize("top_k").map_err(anyhow::Error::msg)?,
        top_p: cfg.float("top_p"),
        min_p: cfg.float("min_p"),
        repetition_penalty: cfg.float("repetition_penalty"),
        max_new_tokens: cfg.usize("max_new_tokens").map_err(anyhow::Error::msg)?,
        seed: cfg.int("seed").map(|s| s as u64),
        stop: cfg.str_list("stop").unwrap_or_default(),
    };
    crate::generate::options(&*m.get()?, &u)
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
