//! OpenAI's request and response JSON: parsing a request into a job (one-line, status-bearing
//! errors), the response objects, streaming chunks and error bodies.

use super::worker::{Prompt, Served};
use crate::generate::UserOptions;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completion,
}

pub struct Request {
    pub model: usize,
    pub prompt: Prompt,
    pub options: UserOptions,
    pub stream: bool,
}

type Bad = (StatusCode, String);

fn bad(msg: impl Into<String>) -> Bad {
    (StatusCode::BAD_REQUEST, msg.into())
}

/// Parse and check a request body.
pub fn parse(body: &[u8], kind: Kind, served: &Served) -> Result<Request, Bad> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let o = v.as_object().ok_or_else(|| bad("the body must be a JSON object"))?;
    let model = match o.get("model") {
        None | Some(Value::Null) => 0,
        Some(Value::String(m)) => served.names.iter().position(|n| n == m).ok_or_else(|| (StatusCode::NOT_FOUND, format!("model `{m}` is not served (served: {})", served.names.join(", "))))?,
        Some(_) => return Err(bad("`model` must be a string")),
    };
    let prompt = match kind {
        Kind::Chat => Prompt::Chat(messages(o)?),
        Kind::Completion => match o.get("prompt") {
            Some(Value::String(p)) => Prompt::Text(p.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Prompt::Text(a[0].as_str().unwrap_or("").to_string()),
            _ => return Err(bad("`prompt` must be a string")),
        },
    };
    let f = |k: &str| -> Result<Option<f64>, Bad> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(format!("`{k}` must be a number"))),
        }
    };
    let n = |k: &str| -> Result<Option<usize>, Bad> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| bad(format!("`{k}` must be a non-negative integer"))),
        }
    };
    let max = match kind {
        Kind::Chat => n("max_completion_tokens")?.or(n("max_tokens")?),
        // OpenAI's default for completions.
        Kind::Completion => Some(n("max_tokens")?.unwrap_or(16)),
    };
    if let Some(m) = max.filter(|&m| m >= served.context) {
        return Err(bad(format!("`max_tokens` {m} is beyond the model's context of {} tokens", served.context)));
    }
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    if o.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err(bad("`n` other than 1 is not supported"));
    }
    let options = UserOptions {
        do_sample: None,
        temperature: f("temperature")?,
        top_k: n("top_k")?,
        top_p: f("top_p")?,
        min_p: f("min_p")?,
        repetition_penalty: f("repetition_penalty")?,
        max_new_tokens: max,
        seed: n("seed")?.map(|s| s as u64),
        stop,
    };
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be true or false")),
    };
    Ok(Request { model, prompt, options, stream })
}

/// `messages`: `{role, content}` objects; content a string or a list of `{type: text, text}`.
fn messages(o: &Map<String, Value>) -> Result<Vec<Value>, Bad> {
    let list = o.get("messages").and_then(Value::as_array).ok_or_else(|| bad("`messages` must be a list of {role, content}"))?;
    if list.is_empty() {
        return Err(bad("`messages` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad(format!("messages[{i}]: `role` must be a string")))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(""),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(bad(format!("messages[{i}]: `content` must be a string"))),
            };
            Ok(json!({"role": role, "content": content}))
        })
        .collect()
}

/// OpenAI's error body.
pub fn error_json(msg: &str) -> Value {
    json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}})
}

pub fn error(status: StatusCode, msg: &str) -> Response {
    let ty = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let mut body = error_json(msg);
    body["error"]["type"] = ty.into();
    (status, axum::Json(body)).into_response()
}

pub fn models(names: &[String]) -> Value {
    let data: Vec<Value> = names.iter().map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "qscript"})).collect();
    json!({"object": "list", "data": data})
}

/// One response's identity and the chunks of its stream.
pub struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    started: bool,
}

impl Reply {
    pub fn new(kind: Kind, model: String) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let id = match kind {
            Kind::Chat => format!("chatcmpl-{created}-{n}"),
            Kind::Completion => format!("cmpl-{created}-{n}"),
        };
        Self { kind, id, created, model, started: false }
    }

    /// A streaming chunk (JSON text): a piece of text, or the end with its finish reason.
    pub fn chunk(&mut self, text: Option<&str>, finish_reason: Option<&str>) -> String {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if !self.started {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish_reason})
            }
            Kind::Completion => json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish_reason}),
        };
        self.started = true;
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]}).to_string()
    }

    /// The whole (non-streaming) response.
    pub fn whole(&self, text: &str, finish_reason: &str, prompt_tokens: usize, completion_tokens: usize) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => ("chat.completion", json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason})),
            Kind::Completion => ("text_completion", json!({"index": 0, "text": text, "finish_reason": finish_reason})),
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}})
    }
}
