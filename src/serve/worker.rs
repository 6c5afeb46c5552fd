//! The generation worker: one thread owns the model and its adapters and runs the queued jobs
//! one at a time (a job selects its adapter set, renders nothing: it gets token ids). Text
//! pieces go back over the job's channel; when that channel is gone (the client left) the
//! generation stops at the next token.

use crate::generate::{self, FinishReason, UserOptions};
use crate::model::layers::linear::Lora;
use crate::model::names::ModuleId;
use crate::model::{adapter, LoadOptions, Model};
use anyhow::{Context, Result};
use std::path::PathBuf;
use tokio::sync::mpsc;

/// What a job sends back.
#[derive(Debug)]
pub enum Event {
    Piece(String),
    Done { finish_reason: &'static str, prompt_tokens: usize, completion_tokens: usize },
    Error(String),
}

/// The prompt of a job: a conversation for the chat template, or raw text.
pub enum Prompt {
    Chat(Vec<serde_json::Value>),
    Text(String),
}

pub struct Job {
    /// Index into [`Served::names`].
    pub model: usize,
    pub prompt: Prompt,
    pub options: UserOptions,
    pub events: mpsc::Sender<Event>,
}

/// What the worker serves, known once it has loaded: the base name first, then each adapter's.
pub struct Served {
    pub names: Vec<String>,
    pub context: usize,
}

/// Adapters as loaded, to put on the model per job.
type AdapterSet = Vec<(ModuleId, Lora)>;

/// Load `model_path` and the adapters (`NAME=DIR` or `DIR`, named by the directory), then
/// run jobs from `jobs` until it closes. `ready` gets the names or the loading error.
pub fn run(model_path: String, adapters: Vec<String>, jobs: std::sync::mpsc::Receiver<Job>, ready: std::sync::mpsc::Sender<Result<Served>>) {
    let loaded = load(&model_path, &adapters);
    let (mut model, sets, names) = match loaded {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(Served { names, context: model.config().max_position_embeddings }));
    let mut current = 0usize;
    while let Ok(job) = jobs.recv() {
        if job.model != current {
            put_adapters(&mut model, job.model.checked_sub(1).map(|i| &sets[i]));
            current = job.model;
        }
        let events = job.events.clone();
        let done = run_job(&model, job);
        let _ = match done {
            Ok(e) => events.blocking_send(e),
            Err(e) => events.blocking_send(Event::Error(format!("{e:#}"))),
        };
    }
}

fn load(model_path: &str, adapters: &[String]) -> Result<(Model, Vec<AdapterSet>, Vec<String>)> {
    let mut model = Model::load(model_path, &LoadOptions::default())?;
    let mut names = vec![model_path.trim_end_matches('/').to_string()];
    let mut sets = Vec::new();
    for spec in adapters {
        let (name, dir) = match spec.split_once('=') {
            Some((n, d)) => (n.to_string(), PathBuf::from(d)),
            None => {
                let d = PathBuf::from(spec);
                let n = d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| spec.clone());
                (n, d)
            }
        };
        anyhow::ensure!(!names.contains(&name), "--adapter {spec}: the name `{name}` is taken (use NAME=DIR)");
        adapter::load_adapter(&mut model.llama, &dir).with_context(|| format!("--adapter {spec}"))?;
        let set: AdapterSet = model.llama.linears_mut().filter_map(|(id, l)| Some((id, l.lora.take()?))).collect();
        names.push(name);
        sets.push(set);
    }
    Ok((model, sets, names))
}

fn put_adapters(model: &mut Model, set: Option<&AdapterSet>) {
    for (_, lin) in model.llama.linears_mut() {
        lin.lora = None;
    }
    for (id, l) in set.into_iter().flatten() {
        if let Some(lin) = model.llama.linear_mut(*id) {
            lin.lora = Some(l.clone());
        }
    }
}

fn run_job(model: &Model, job: Job) -> Result<Event> {
    let tok = model.tokenizer()?;
    let ids = match &job.prompt {
        Prompt::Chat(messages) => {
            let tpl = crate::data::chat_template::ChatTemplate::of_model(model)?.context("this model has no chat template: use /v1/completions")?;
            // The template writes the special tokens itself.
            tok.encode(&tpl.render(messages, true, &serde_json::Map::new())?, false)?
        }
        Prompt::Text(t) => tok.encode(t, true)?,
    };
    let opts = generate::options(model, &job.options)?;
    let events = &job.events;
    let g = generate::generate_while(model, &ids, &opts, &mut |piece| events.blocking_send(Event::Piece(piece.to_string())).is_ok())?;
    let finish_reason = match g.finish_reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    };
    Ok(Event::Done { finish_reason, prompt_tokens: g.prompt_tokens, completion_tokens: g.ids.len() })
}
