//! Rendering records with the chat template, tokenizing, and assistant-only label masks.
//!
//! Masking follows transformers / trl (`assistant_only_loss`): a conversation is rendered with
//! the model's template exactly as `apply_chat_template` does and tokenized without adding
//! special tokens. Each assistant turn is located structurally, never by searching for its
//! text: the conversation up to the turn is rendered with `add_generation_prompt=true` (where
//! the content starts) and up to and including the turn (where it ends); both must be string
//! prefixes of the full rendering (when the generation prompt is not, e.g. an assistant turn
//! first, two renderings of the turn with different probe contents show where content starts). Tokens are mapped to those byte ranges through the
//! tokenizer's offsets (a token straddling a boundary counts as inside, as trl's char-based
//! mask does), which also handles tokens that merge across the boundary.
//!
//! Trained per assistant turn: its content and the end-of-turn token(s) the template emits right
//! after it, up to and including the last special token of the turn (`<|im_end|>` for ChatML and
//! Qwen, `<|eot_id|>` for Llama-3, `<end_of_turn>` for Gemma, `<|end|>` for Phi-3, `</s>` for
//! Mistral). Whitespace the template writes after that token (ChatML's "\n") is not trained:
//! generation stops at the end-of-turn token, so the model never produces it (trl's
//! `{% generation %}` training templates also wrap that "\n"; the difference is one
//! never-generated token per turn).
//!
//! Some templates render a turn differently once later messages follow: Qwen3 drops the
//! reasoning (`<think>…</think>`) of assistant turns before the last user message and adds an
//! empty think block to turns after it. There the rendering through the turn is not a prefix of
//! the whole; the turn is trained as the whole conversation renders it: from where its
//! generation prompt ends to the first end-of-turn token (a stop id or the template's own
//! end-of-turn token) after that. Whatever the template wrote there (an empty think block
//! included) is what the model generates after that prompt, so it is trained.
//!
//! Text records are tokenized with special tokens (e.g. BOS) and get EOS appended when missing
//! (trl's `add_eos`); every token is trained.

use super::dataset::{Dataset, Message, Record, Row};
use super::IGNORE_INDEX;
use super::chat_template::ChatTemplate;
use crate::model::{Model, Tokenizer};
use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Keep the first `max_seq_length` tokens (trl's default, `keep_start`).
    #[default]
    Truncate,
    /// Drop examples longer than `max_seq_length`.
    Drop,
}

#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// `None`: no limit. Default 1024 (trl's `max_length`).
    pub max_seq_length: Option<usize>,
    /// Train on every token, prompts included.
    pub train_on_inputs: bool,
    pub truncation: Truncation,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self { max_seq_length: Some(1024), train_on_inputs: false, truncation: Truncation::Truncate }
    }
}

/// One tokenized record. Labels are aligned with `input_ids` (HF convention: the model shifts).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    /// Index of the record in the dataset it came from.
    pub index: usize,
    pub input_ids: Vec<u32>,
    /// Whether each token is trained (its label is its id) or ignored (-100). One byte per token
    /// instead of an i64 label keeps 100k examples small.
    pub trained: Vec<bool>,
    /// Length before truncation, when truncated.
    pub truncated_from: Option<usize>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// HF-style labels: the id where trained, -100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        self.input_ids.iter().zip(&self.trained).map(|(&id, &t)| if t { id as i64 } else { IGNORE_INDEX }).collect()
    }

    pub fn num_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// A dataset-level warning: what, how many examples, the first few example indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Lint {
    pub kind: &'static str,
    pub message: String,
    pub count: usize,
    pub examples: Vec<usize>,
}

impl Lint {
    /// A fact worth knowing that asks for no action (printed once, as a note).
    pub fn is_note(&self) -> bool {
        matches!(self.kind, "pad-is-eos" | "no-pad-token" | "template-rewrites-turns")
    }
}

impl std::fmt::Display for Lint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_note() {
            return write!(f, "note: {}", self.message);
        }
        write!(f, "warning [{}]: {}", self.kind, self.message)?;
        if !self.examples.is_empty() {
            let list: Vec<String> = self.examples.iter().map(|i| i.to_string()).collect();
            let more = if self.count > self.examples.len() { ", ..." } else { "" };
            write!(f, " ({} example{}: {}{more})", self.count, if self.count == 1 { "" } else { "s" }, list.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct TokenizeReport {
    pub records: usize,
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    /// Examples with nothing to train (no assistant turn, or cut away by truncation).
    pub dropped_untrained: usize,
    pub lints: Vec<Lint>,
}

impl TokenizeReport {
    /// One line: examples, tokens, truncated, dropped and why.
    pub fn summary(&self) -> String {
        format!(
            "tokenized {} records: {} examples, {} tokens ({} trained); truncated {}, dropped {} (too long {}, nothing to train {})",
            self.records,
            self.examples,
            self.tokens,
            self.trained_tokens,
            self.truncated,
            self.dropped_too_long + self.dropped_untrained,
            self.dropped_too_long,
            self.dropped_untrained
        )
    }
}

#[derive(Debug, Clone)]
pub struct TokenizedDataset {
    pub examples: Vec<TokenizedExample>,
    /// Padding id: the tokenizer's pad token, else its EOS (a lint says so).
    pub pad_id: u32,
    pub max_seq_length: Option<usize>,
    pub report: TokenizeReport,
}

impl TokenizedDataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Bytes held by the token arrays (ids + trained flags).
    pub fn token_bytes(&self) -> usize {
        self.examples.iter().map(|e| e.input_ids.len() * 4 + e.trained.len()).sum()
    }
}

/// What tokenization needs from a model: its tokenizer, chat template and stop ids.
pub struct ChatTokenizer<'a> {
    pub tokenizer: &'a Tokenizer,
    /// Needed for conversations; text-only datasets tokenize without one.
    pub template: Option<ChatTemplate>,
    /// Token ids that end generation (EOS and generation_config's eos ids).
    pub stop_ids: Vec<u32>,
    /// The special token the template writes right after an assistant turn's content
    /// (`<|im_end|>`, `<end_of_turn>`, `<|end|>`, `</s>`, `<|eot_id|>`), if any.
    pub end_of_turn: Option<u32>,
}

impl<'a> ChatTokenizer<'a> {
    pub fn new(tokenizer: &'a Tokenizer, template: Option<ChatTemplate>, stop_ids: Vec<u32>) -> Self {
        let end_of_turn = template.as_ref().and_then(|t| end_of_turn_id(t, tokenizer));
        Self { tokenizer, template, stop_ids, end_of_turn }
    }

    /// What chat generation stops on: the stop ids plus the template's end-of-turn token (a
    /// checkpoint without generation_config.json, a GGUF or a random model still stops where
    /// its template ends a turn).
    pub fn chat_stop_ids(&self) -> Vec<u32> {
        let mut ids = self.stop_ids.clone();
        if let Some(id) = self.end_of_turn.filter(|id| !ids.contains(id)) {
            ids.push(id);
        }
        ids
    }

    /// The model's tokenizer, its chat template (with bos/eos strings) and EOS ids.
    pub fn for_model(model: &'a Model) -> Result<Self> {
        let tok = model.tokenizer()?;
        let template = match &tok.chat_template {
            Some(src) => Some(ChatTemplate::new(src, tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or(""))?),
            None => None,
        };
        Ok(Self::new(tok, template, model.eos_token_ids()))
    }

    fn id(&self, token: &Option<String>) -> Option<u32> {
        token.as_deref().and_then(|t| self.tokenizer.token_to_id(t))
    }
}

/// The special (added) tokens of a tokenizer, and its EOS.
fn special_ids(tok: &Tokenizer) -> HashSet<u32> {
    let mut ids: HashSet<u32> = tok.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
    ids.extend(tok.eos_token.as_deref().and_then(|e| tok.token_to_id(e)));
    ids
}

/// The first special token the template writes after an assistant turn's content: render a
/// user turn and an assistant turn with probe contents and tokenize what follows the answer.
/// None when the template rejects that conversation or writes no special token there.
fn end_of_turn_id(tpl: &ChatTemplate, tok: &Tokenizer) -> Option<u32> {
    const ANSWER: &str = "\u{E001}";
    let msgs = [serde_json::json!({"role": "user", "content": "\u{E000}"}), serde_json::json!({"role": "assistant", "content": ANSWER})];
    let text = tpl.render(&msgs, false, &serde_json::Map::new()).ok()?;
    let tail = &text[text.rfind(ANSWER)? + ANSWER.len()..];
    let specials = special_ids(tok);
    let ids = tok.inner.encode(tail, false).ok()?.get_ids().to_vec();
    ids.into_iter().find(|id| specials.contains(id))
}

/// Per-example facts the lints aggregate.
#[derive(Default)]
struct Flags {
    double_bos: bool,
    /// Assistant turns the template renders differently once later messages follow.
    rewritten_turns: usize,
    /// Assistant turns with no special token after the content.
    turns_without_end: usize,
    /// The special tokens that ended assistant turns.
    end_ids: Vec<u32>,
    has_assistant: bool,
}

struct Encoded {
    ids: Vec<u32>,
    trained: Vec<bool>,
    flags: Flags,
}

/// Tokenizes and masks; shared across rayon workers.
struct Encoder<'a> {
    ct: &'a ChatTokenizer<'a>,
    /// The tokenizer without its post-processor: the same ids for `add_special_tokens=false`,
    /// and offsets never trimmed (a ByteLevel post-processor may trim whitespace from them).
    bare: tokenizers::Tokenizer,
    /// Special (added) tokens: what can end a turn.
    specials: HashSet<u32>,
    /// What ends a turn the template re-renders: stop ids, EOS, the template's end-of-turn.
    turn_ends: HashSet<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    train_on_inputs: bool,
}

impl<'a> Encoder<'a> {
    fn new(ct: &'a ChatTokenizer<'a>, train_on_inputs: bool) -> Self {
        let mut bare = ct.tokenizer.inner.clone();
        bare.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let specials = special_ids(ct.tokenizer);
        let eos_id = ct.id(&ct.tokenizer.eos_token);
        let turn_ends: HashSet<u32> = ct.chat_stop_ids().into_iter().chain(eos_id).collect();
        Self { ct, bare, specials, turn_ends, bos_id: ct.id(&ct.tokenizer.bos_token), eos_id, train_on_inputs }
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.ct.template.as_ref().ok_or_else(|| anyhow!("the model has no chat template; set one with model.set_chat_template(template)"))
    }

    fn encode(&self, row: &Row) -> Result<Encoded> {
        crate::check_limits()?; // a dataset is tokenized in one Rhai operation
        let mut e = match &row.record {
            Record::Text(t) => self.encode_text(t)?,
            Record::Messages(m) => self.encode_messages(m, row)?,
        };
        e.flags.double_bos = self.bos_id.is_some() && e.ids.len() >= 2 && e.ids[0] == e.ids[1] && Some(e.ids[0]) == self.bos_id;
        Ok(e)
    }

    fn encode_text(&self, text: &str) -> Result<Encoded> {
        let mut ids = self.ct.tokenizer.encode(text, true)?;
        if let Some(eos) = self.eos_id {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        let trained = vec![true; ids.len()];
        Ok(Encoded { ids, trained, flags: Flags { has_assistant: true, ..Default::default() } })
    }

    /// `row`'s messages `msgs` through the template (with the row's tool fields and `tools`).
    fn encode_messages(&self, msgs: &[Message], row: &Row) -> Result<Encoded> {
        let tpl = self.template()?;
        let values = row.template_messages();
        let none = row.template_vars();
        let full = tpl.render(&values, false, &none)?;
        let enc = self.bare.encode(full.as_str(), false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let mut flags = Flags::default();
        if self.train_on_inputs {
            flags.has_assistant = true;
            let trained = vec![true; ids.len()];
            return Ok(Encoded { ids, trained, flags });
        }
        let offsets = enc.get_offsets();
        let mut trained = vec![false; ids.len()];
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            flags.has_assistant = true;
            let upto = if i + 1 == msgs.len() { full.clone() } else { tpl.render(&values[..=i], false, &none)? };
            let a = content_start(tpl, &values[..i], &full, &none)?;
            // Tokens from the one overlapping byte `a` (offsets are sorted by start).
            let s = offsets.partition_point(|o| o.1 <= a);
            let span = if full.starts_with(&upto) {
                self.turn_span(&ids, offsets, s, upto.len(), &mut flags)
            } else {
                flags.rewritten_turns += 1;
                let span = self.rewritten_turn_span(&ids, s).ok_or_else(|| {
                    anyhow!(
                        "message {i} (assistant): the chat template renders this turn differently once later messages follow, \
                         and no end-of-turn token follows it in the whole conversation, so the turn cannot be located; \
                         use train_on_inputs: true"
                    )
                })?;
                Some(span)
            };
            if let Some((s, e)) = span {
                trained[s..e].iter_mut().for_each(|t| *t = true);
            }
        }
        Ok(Encoded { ids, trained, flags })
    }

    /// The trained tokens `[s, e)` of a turn whose rendering ends at byte `b` of the whole:
    /// through the last special token before `b` (the end-of-turn), else all of them.
    fn turn_span(&self, ids: &[u32], offsets: &[(usize, usize)], s: usize, b: usize, flags: &mut Flags) -> Option<(usize, usize)> {
        let e = offsets.partition_point(|o| o.0 < b);
        if s >= e {
            return None;
        }
        match (s..e).rev().find(|&k| self.specials.contains(&ids[k])) {
            Some(k) => {
                flags.end_ids.push(ids[k]);
                Some((s, k + 1))
            }
            None => {
                flags.turns_without_end += 1;
                Some((s, e))
            }
        }
    }

    /// A turn the whole conversation renders differently (Qwen3's reasoning): from its content
    /// start through the first end-of-turn token after it; None when there is none.
    fn rewritten_turn_span(&self, ids: &[u32], s: usize) -> Option<(usize, usize)> {
        let k = (s..ids.len()).find(|&k| self.turn_ends.contains(&ids[k]))?;
        Some((s, k + 1))
    }

    /// Roles the template renders nothing for: message j adds nothing to the rendering of the
    /// messages before it (render with and without each turn).
    fn dropped_roles(&self, msgs: &[Message], row: &Row) -> Vec<String> {
        let Ok(tpl) = self.template() else { return vec![] };
        let values = row.template_messages();
        let none = row.template_vars();
        let mut prev = tpl.render(&[], false, &none).ok();
        let mut out = Vec::new();
        for j in 0..msgs.len() {
            let cur = tpl.render(&values[..=j], false, &none).ok();
            if let (Some(p), Some(c)) = (&prev, &cur) {
                if p == c && !out.contains(&msgs[j].role) {
                    out.push(msgs[j].role.clone());
                }
            }
            prev = cur;
        }
        out
    }
}

/// Byte offset in `full` (the whole conversation's rendering) where assistant turn i's content
/// starts. Normally the end of the conversation before it rendered with the generation prompt
/// (transformers' definition of the prompt). When that is not a prefix (e.g. an assistant turn
/// first: SmolLM2 adds its default system prompt only inside the message loop), render the turn
/// with two probe contents: their renderings agree exactly up to where the content goes.
fn content_start(tpl: &ChatTemplate, before_msgs: &[serde_json::Value], full: &str, vars: &serde_json::Map<String, serde_json::Value>) -> Result<usize> {
    let none = vars;
    let before = tpl.render(before_msgs, true, none)?;
    if full.starts_with(&before) {
        return Ok(before.len());
    }
    let probe = |c: &str| {
        let mut v = before_msgs.to_vec();
        v.push(serde_json::json!({"role": "assistant", "content": c}));
        tpl.render(&v, false, none)
    };
    let (x, y) = (probe("\u{E000}")?, probe("\u{E001}")?);
    let Some(cp) = x.char_indices().zip(y.chars()).find(|((_, c), d)| c != d).map(|((i, _), _)| i) else {
        bail!("the chat template does not render assistant content; nothing to train");
    };
    if !full.starts_with(&x[..cp]) {
        bail!("the chat template renders the assistant turn differently from its generation prompt; cannot locate the turn (use train_on_inputs: true)");
    }
    Ok(cp)
}

/// Tokenize every record in parallel, in dataset order.
fn encode_all(ds: &Dataset, enc: &Encoder) -> Result<Vec<Encoded>> {
    let results: Vec<Result<Encoded>> = ds.rows.par_iter().with_min_len(64).map(|r| enc.encode(r)).collect();
    let mut out = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        out.push(r.map_err(|e| {
            // A template without tool support fails on a call's null content: say what it met.
            let calls = (0..ds.rows[i].turn_fields.len()).any(|j| ds.rows[i].has_tool_calls(j));
            let hint = if calls { " (this conversation has tool_calls: does the model's chat template render tool calls?)" } else { "" };
            anyhow!("example {i}: {e:#}{hint}")
        })?);
    }
    Ok(out)
}

/// Render, tokenize and mask one record (no truncation).
pub fn tokenize_example(row: &Row, ct: &ChatTokenizer, train_on_inputs: bool) -> Result<TokenizedExample> {
    let e = Encoder::new(ct, train_on_inputs).encode(row)?;
    Ok(TokenizedExample { index: 0, input_ids: e.ids, trained: e.trained, truncated_from: None })
}

/// `SFTTrainer`'s dataset preparation: tokenize, mask, truncate or drop, lint.
pub fn tokenize_dataset(ds: &Dataset, ct: &ChatTokenizer, opts: &TokenizeOptions) -> Result<TokenizedDataset> {
    let enc = Encoder::new(ct, opts.train_on_inputs);
    let encoded = encode_all(ds, &enc)?;
    let mut report = TokenizeReport { records: ds.len(), ..Default::default() };
    let mut lints = LintSet::default();
    let mut examples = Vec::with_capacity(encoded.len());
    let mut end_ids: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, e) in encoded.into_iter().enumerate() {
        let Encoded { mut ids, mut trained, flags } = e;
        if flags.double_bos {
            lints.add("double-bos", i);
        }
        if flags.turns_without_end > 0 {
            lints.add("no-end-of-turn", i);
        }
        if flags.rewritten_turns > 0 {
            lints.add("template-rewrites-turns", i);
        }
        for id in &flags.end_ids {
            *end_ids.entry(*id).or_default() += 1;
        }
        for kind in turn_lints(&ds.rows[i]) {
            lints.add(kind, i);
        }
        let mut truncated_from = None;
        if let Some(max) = opts.max_seq_length {
            if ids.len() > max {
                match opts.truncation {
                    Truncation::Drop => {
                        report.dropped_too_long += 1;
                        continue;
                    }
                    Truncation::Truncate => {
                        if last_answer_cut(&trained, max) {
                            lints.add("answer-truncated", i);
                        }
                        truncated_from = Some(ids.len());
                        ids.truncate(max);
                        trained.truncate(max);
                        report.truncated += 1;
                    }
                }
            }
        }
        // Label 0 predicts nothing (no token before it), so it does not count.
        if !trained.iter().skip(1).any(|&t| t) {
            report.dropped_untrained += 1;
            lints.add(if flags.has_assistant { "nothing-trained" } else { "no-assistant" }, i);
            continue;
        }
        ids.shrink_to_fit();
        trained.shrink_to_fit();
        report.tokens += ids.len();
        report.trained_tokens += trained.iter().filter(|&&t| t).count();
        examples.push(TokenizedExample { index: i, input_ids: ids, trained, truncated_from });
    }
    report.examples = examples.len();
    let pad_id = pad_id(ct, &mut report.lints);
    report.lints.extend(lints.finish(ct));
    report.lints.extend(token_lints(ct, &enc, pad_id, &end_ids, opts.train_on_inputs));
    report.lints.extend(role_lints(ds, &enc));
    Ok(TokenizedDataset { examples, pad_id, max_seq_length: opts.max_seq_length, report })
}

/// [`tokenize_dataset`] with the model's tokenizer, chat template and EOS ids.
pub fn tokenize_for_model(ds: &Dataset, model: &Model, opts: &TokenizeOptions) -> Result<TokenizedDataset> {
    tokenize_dataset(ds, &ChatTokenizer::for_model(model)?, opts)
}

fn pad_id(ct: &ChatTokenizer, lints: &mut Vec<Lint>) -> u32 {
    if let Some(id) = ct.id(&ct.tokenizer.pad_token) {
        return id;
    }
    let (id, what) = match ct.id(&ct.tokenizer.eos_token) {
        Some(id) => (id, format!("EOS `{}`", ct.tokenizer.eos_token.as_deref().unwrap_or(""))),
        None => (0, "id 0".to_string()),
    };
    lints.push(Lint {
        kind: "no-pad-token",
        message: format!("the tokenizer has no pad token, so batches are padded with {what}. Nothing to do: padding is never trained on"),
        count: 0,
        examples: vec![],
    });
    id
}

#[derive(Default)]
struct LintSet {
    by_kind: BTreeMap<&'static str, (usize, Vec<usize>)>,
}

impl LintSet {
    fn add(&mut self, kind: &'static str, example: usize) {
        let e = self.by_kind.entry(kind).or_default();
        e.0 += 1;
        if e.1.len() < 5 {
            e.1.push(example);
        }
    }

    fn finish(self, ct: &ChatTokenizer) -> Vec<Lint> {
        let bos = ct.tokenizer.bos_token.clone().unwrap_or_default();
        self.by_kind
            .into_iter()
            .map(|(kind, (count, examples))| {
                let message = match kind {
                    "double-bos" => format!("examples start with two BOS tokens `{bos}` (the template or text already has one and the tokenizer adds another)"),
                    "no-end-of-turn" => "assistant turns have no EOS / end-of-turn token after their content: the model will not learn to stop".into(),
                    "no-assistant" => "examples have no assistant turn: nothing to train, dropped".into(),
                    "nothing-trained" => "examples lost every assistant token to truncation: dropped (raise max_seq_length?)".into(),
                    "answer-truncated" => "examples longer than max_seq_length lose their whole last answer to truncation: \
                        only earlier turns are trained (raise max_seq_length, or truncation: \"drop\")".into(),
                    "empty-reply" => "assistant replies are empty: the model learns to answer with nothing".into(),
                    "turn-order" => "turns are out of order (two user or two assistant turns in a row, a system turn after the start, \
                        or a tool result without a tool call before it)".into(),
                    "duplicate-system" => "conversations have more than one system turn (most templates keep only the first, or fail)".into(),
                    "template-rewrites-turns" => "the chat template renders earlier assistant turns differently once later messages follow \
                        (Qwen3 drops the reasoning of turns before the last user message): they are trained as the whole conversation renders them"
                        .into(),
                    other => other.to_string(),
                };
                Lint { kind, message, count, examples }
            })
            .collect()
    }
}

/// Whether truncating to `max` tokens removes the last trained run (the last answer) whole
/// while an earlier one stays (when none stays, the example is dropped and said so).
fn last_answer_cut(trained: &[bool], max: usize) -> bool {
    let Some(end) = trained.iter().rposition(|&t| t) else { return false };
    let start = trained[..end].iter().rposition(|&t| !t).map_or(0, |k| k + 1);
    // Label 0 predicts nothing, so a run must start after it to count as trained.
    start >= max && trained.iter().take(max).skip(1).any(|&t| t)
}

/// Lints about one conversation's turns: empty replies, order, system turns.
fn turn_lints(row: &Row) -> Vec<&'static str> {
    let Record::Messages(msgs) = &row.record else { return vec![] };
    let mut out = Vec::new();
    let empty = |i: usize, m: &Message| m.role == "assistant" && m.content.trim().is_empty() && !row.has_tool_calls(i);
    if msgs.iter().enumerate().any(|(i, m)| empty(i, m)) {
        out.push("empty-reply");
    }
    if msgs.iter().filter(|m| m.role == "system").count() > 1 {
        out.push("duplicate-system");
    }
    let misplaced = msgs.iter().enumerate().skip(1).any(|(i, m)| {
        let prev = &msgs[i - 1];
        match m.role.as_str() {
            "system" => prev.role != "system",
            "user" => prev.role == "user",
            "assistant" => prev.role == "assistant" && !row.has_tool_calls(i - 1),
            "tool" => !(prev.role == "tool" || prev.role == "assistant" && row.has_tool_calls(i - 1)),
            _ => false,
        }
    });
    if misplaced {
        out.push("turn-order");
    }
    out
}

/// Lints about which tokens end assistant turns.
fn token_lints(ct: &ChatTokenizer, enc: &Encoder, pad_id: u32, end_ids: &BTreeMap<u32, usize>, train_on_inputs: bool) -> Vec<Lint> {
    let mut out = Vec::new();
    if train_on_inputs {
        return out;
    }
    let name = |id: u32| ct.tokenizer.inner.id_to_token(id).unwrap_or_else(|| id.to_string());
    let stops: Vec<u32> = if ct.stop_ids.is_empty() { enc.eos_id.into_iter().collect() } else { ct.stop_ids.clone() };
    for (&id, &n) in end_ids {
        if !stops.contains(&id) {
            let stop_names: Vec<String> = stops.iter().map(|&s| format!("`{}`", name(s))).collect();
            out.push(Lint {
                kind: "end-not-eos",
                message: format!(
                    "{n} assistant turns end with `{}`, which does not stop generation (stop tokens: {}): the trained model may run on \
                     in engines that stop on the model's eos ids only (add it to generation_config.json's eos_token_id)",
                    name(id),
                    if stop_names.is_empty() { "none".into() } else { stop_names.join(", ") }
                ),
                count: 0,
                examples: vec![],
            });
        }
    }
    if end_ids.contains_key(&pad_id) {
        out.push(Lint {
            kind: "pad-is-eos",
            message: format!(
                "the pad token is the end-of-turn token `{}`. Nothing to do: qscript tells padding apart by position, so the model still \
                 learns to end its turns (a Python collator that masks every pad-token id would hide them)",
                name(pad_id)
            ),
            count: 0,
            examples: vec![],
        });
    }
    out
}

/// Render with and without each turn (on the first 64 conversations) to find roles the
/// template silently drops.
fn role_lints(ds: &Dataset, enc: &Encoder) -> Vec<Lint> {
    if enc.ct.template.is_none() {
        return vec![];
    }
    let mut by_role: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, row) in ds.rows.iter().enumerate().filter(|(_, r)| matches!(r.record, Record::Messages(_))).take(64) {
        if let Record::Messages(m) = &row.record {
            for role in enc.dropped_roles(m, row) {
                by_role.entry(role).or_default().push(i);
            }
        }
    }
    by_role
        .into_iter()
        .map(|(role, ex)| Lint {
            kind: "template-drops-role",
            message: format!("the chat template renders nothing for `{role}` messages: they are silently left out of training"),
            count: ex.len(),
            examples: ex.into_iter().take(5).collect(),
        })
        .collect()
}

/// `dataset.stats(model)`: lengths after rendering and tokenization (no truncation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub count: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub min: usize,
    pub mean: f64,
    pub p50: usize,
    pub p90: usize,
    pub p95: usize,
    pub p99: usize,
    pub max: usize,
    pub max_seq_length: Option<usize>,
    /// Examples longer than `max_seq_length`.
    pub over_max_seq_length: usize,
    /// Examples with nothing to train.
    pub untrained: usize,
}

pub fn stats(ds: &Dataset, ct: &ChatTokenizer, max_seq_length: Option<usize>, train_on_inputs: bool) -> Result<DataStats> {
    let enc = Encoder::new(ct, train_on_inputs);
    let encoded = encode_all(ds, &enc)?;
    let mut lens: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
    lens.sort_unstable();
    let n = lens.len();
    // Nearest-rank percentile.
    let pct = |p: f64| if n == 0 { 0 } else { lens[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1] };
    let tokens: usize = lens.iter().sum();
    Ok(DataStats {
        count: n,
        tokens,
        trained_tokens: encoded.iter().map(|e| e.trained.iter().filter(|&&t| t).count()).sum(),
        min: lens.first().copied().unwrap_or(0),
        mean: if n == 0 { 0.0 } else { tokens as f64 / n as f64 },
        p50: pct(50.0),
        p90: pct(90.0),
        p95: pct(95.0),
        p99: pct(99.0),
        max: lens.last().copied().unwrap_or(0),
        max_seq_length,
        over_max_seq_length: max_seq_length.map_or(0, |m| lens.iter().filter(|&&l| l > m).count()),
        untrained: encoded.iter().filter(|e| !e.trained.iter().skip(1).any(|&t| t)).count(),
    })
}
