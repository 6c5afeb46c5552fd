//! `qscript serve MODEL [--adapter [NAME=]DIR]... [--port 8080]`: an OpenAI-compatible HTTP
//! server on axum + tokio. `/v1/chat/completions` (chat template; `stream: true` as server-sent
//! events), `/v1/completions` (raw text), `/v1/models` (the base and each adapter; a request's
//! `model` picks one). Requests are queued and generated one at a time by one worker thread
//! that owns the model (`worker.rs`); a full queue answers 503. Bodies are bounded (1 MiB),
//! every error is an OpenAI-style JSON object, a client that disconnects stops its
//! generation at the next token, and Ctrl-C shuts down gracefully (in-flight responses end).

mod openai;
pub mod worker;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use worker::{Event, Job, Served};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Requests waiting beyond the one being generated; more get 503.
pub const QUEUE: usize = 64;

pub struct ServeOptions {
    pub model: String,
    pub adapters: Vec<String>,
    pub host: String,
    pub port: u16,
}

struct AppState {
    served: Served,
    jobs: std::sync::mpsc::SyncSender<Job>,
}

/// Load the model, bind, print `listening on http://HOST:PORT` and serve until Ctrl-C.
pub fn run(opts: ServeOptions) -> Result<()> {
    let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (model, adapters) = (opts.model.clone(), opts.adapters.clone());
    let worker = std::thread::Builder::new().name("qscript-generate".into()).spawn(move || worker::run(model, adapters, queue, ready_tx))?;
    let served = ready.recv().context("the model worker stopped while loading")??;
    let names = served.names.clone();
    let state = Arc::new(AppState { served, jobs });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async { openai::error(StatusCode::NOT_FOUND, "no such endpoint (/v1/chat/completions, /v1/completions, /v1/models)") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await.with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr()?;
        println!("serving {} on http://{addr}/v1 (one generation at a time, queue {QUEUE})", names.join(", "));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app).with_graceful_shutdown(ctrl_c()).await.context("server error")
    })?;
    drop(rt);
    let _ = worker.join();
    eprintln!("server stopped");
    Ok(())
}

/// Resolves once Ctrl-C set the process' cancel flag (the CLI's handler; it also stops the
/// generation in progress).
async fn ctrl_c() {
    while !crate::CANCEL.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(openai::models(&s.served.names)).into_response()
}

async fn chat(State(s): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    respond(s, &body, openai::Kind::Chat).await
}

async fn completions(State(s): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    respond(s, &body, openai::Kind::Completion).await
}

async fn respond(s: Arc<AppState>, body: &[u8], kind: openai::Kind) -> Response {
    let req = match openai::parse(body, kind, &s.served) {
        Ok(r) => r,
        Err((status, msg)) => return openai::error(status, &msg),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let job = Job { model: req.model, prompt: req.prompt, options: req.options, events: tx };
    match s.jobs.try_send(job) {
        Ok(()) => {}
        Err(std::sync::mpsc::TrySendError::Full(_)) => return openai::error(StatusCode::SERVICE_UNAVAILABLE, "the server is busy (queue full); retry later"),
        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return openai::error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
    }
    let reply = openai::Reply::new(kind, s.served.names[req.model].clone());
    if req.stream {
        let stream = futures_util::stream::unfold((rx, reply, false), |(mut rx, mut reply, done)| async move {
            if done {
                return None;
            }
            let (data, last) = match rx.recv().await {
                Some(Event::Piece(p)) => (vec![reply.chunk(Some(&p), None)], false),
                Some(Event::Done { finish_reason, .. }) => (vec![reply.chunk(None, Some(finish_reason)), "[DONE]".to_string()], true),
                Some(Event::Error(e)) => (vec![openai::error_json(&e).to_string()], true),
                None => return None,
            };
            let events: Vec<Result<SseEvent, std::convert::Infallible>> = data.into_iter().map(|d| Ok(SseEvent::default().data(d))).collect();
            Some((futures_util::stream::iter(events), (rx, reply, last)))
        });
        use futures_util::StreamExt;
        return Sse::new(stream.flatten()).into_response();
    }
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Piece(p) => text.push_str(&p),
            Event::Done { finish_reason, prompt_tokens, completion_tokens } => {
                return axum::Json(reply.whole(&text, finish_reason, prompt_tokens, completion_tokens)).into_response();
            }
            Event::Error(e) => return openai::error(StatusCode::BAD_REQUEST, &e),
        }
    }
    openai::error(StatusCode::INTERNAL_SERVER_ERROR, "the generation stopped without an answer")
}
