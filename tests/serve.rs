//! `qscript serve` with a real HTTP client on 127.0.0.1: the tiny chat model (SmolLM2's
//! tokenizer and template) and a LoRA adapter served as a second model; concurrent clients,
//! streaming, malformed requests, a client that disconnects mid-stream, Ctrl-C.

mod common;

use qscript::model::lora::{self, InitLoraWeights, LoraConfig};
use qscript::model::{adapter, LoadOptions, Model};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tiny chat model and a random adapter on it, in `dir`.
fn fixtures(dir: &Path) -> (String, String) {
    let model = dir.join("tiny-chat");
    common::tiny_chat_model(&model);
    let mut m = Model::load_hf_dir("tiny", &model, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig { r: 4, lora_alpha: 32.0, init_lora_weights: InitLoraWeights::Random, ..LoraConfig::default() };
    lora::attach(&mut m.llama, &cfg, 7).unwrap();
    let a = dir.join("tuned");
    adapter::save_adapter(&m.llama, &cfg, "tiny", &a).unwrap();
    (model.display().to_string(), a.display().to_string())
}

fn start(dir: &Path) -> Server {
    let (model, adapter) = fixtures(dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qscript"))
        .args(["serve", &model, "--adapter", &format!("tuned={adapter}"), "--port", "0"])
        .env("QSCRIPT_QUIET", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("no address in {line:?}"));
    Server { child, base: format!("http://{addr}/v1") }
}

/// (status, JSON body) of a POST.
fn post(url: &str, body: &str) -> (u16, Value) {
    let r = match ureq::post(url).set("Content-Type", "application/json").send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = r.status();
    let text = r.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}

fn chat_body(model: &str, text: &str, max: usize, stream: bool) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max, "temperature": 0, "stream": stream}).to_string()
}

/// The pieces of an SSE stream, until `[DONE]`.
fn read_stream(r: ureq::Response) -> (Vec<Value>, bool) {
    let mut chunks = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return (chunks, true);
        }
        chunks.push(serde_json::from_str(data).unwrap());
    }
    (chunks, false)
}

#[test]
fn serves_openai_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(tmp.path());

    // /v1/models: the base and the adapter.
    let models: Value = serde_json::from_str(&ureq::get(&format!("{}/models", s.base)).call().unwrap().into_string().unwrap()).unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[1], "tuned");
    let base_name = ids[0].to_string();

    // 8 concurrent clients, half streaming, half on the adapter: all complete, greedy answers
    // agree per model, the adapter answers differently.
    let url = format!("{}/chat/completions", s.base);
    let t = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (url, model) = (url.clone(), if i % 2 == 0 { base_name.clone() } else { "tuned".to_string() });
            std::thread::spawn(move || {
                let stream = i % 4 >= 2;
                let body = chat_body(&model, "How do I reset my password?", 12, stream);
                if stream {
                    let r = ureq::post(&url).send_string(&body).unwrap();
                    assert_eq!(r.header("content-type"), Some("text/event-stream"));
                    let (chunks, done) = read_stream(r);
                    assert!(done, "client {i}: no [DONE]");
                    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
                    let last = chunks.last().unwrap();
                    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
                    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
                    (model, text)
                } else {
                    let (status, v) = post(&url, &body);
                    assert_eq!(status, 200, "{v}");
                    assert_eq!(v["object"], "chat.completion");
                    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
                    (model, v["choices"][0]["message"]["content"].as_str().unwrap().to_string())
                }
            })
        })
        .collect();
    let answers: Vec<(String, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("8 concurrent clients answered in {:.2?}", t.elapsed());
    for (m, a) in &answers {
        let first = &answers.iter().find(|(n, _)| n == m).unwrap().1;
        assert_eq!(a, first, "greedy answers of `{m}` differ between clients");
    }
    let of = |m: &str| answers.iter().find(|(n, _)| n == m).unwrap().1.clone();
    assert_ne!(of(&base_name), of("tuned"), "the adapter changes nothing?");

    // /v1/completions.
    let (status, v) = post(&format!("{}/completions", s.base), &json!({"prompt": "The capital of France is", "max_tokens": 5}).to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());

    // Malformed requests: 4xx with an OpenAI error object.
    for (body, status, want) in [
        ("{not json", 400, "invalid JSON body"),
        ("[1, 2]", 400, "must be a JSON object"),
        (r#"{"messages": "hi"}"#, 400, "`messages` must be a list"),
        (r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#, 400, "`temperature` must be a number"),
        (r#"{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}"#, 404, "model `nope` is not served"),
        (r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}"#, 400, "beyond the model's context"),
    ] {
        let (got, v) = post(&url, body);
        assert_eq!(got, status, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{body}: {v}"));
        assert!(msg.contains(want), "{body}: {msg}");
    }
    // An oversized body: 413. The request is one byte over the limit, so the server has read all
    // of it when it answers (a client still sending when the server closes may see a reset
    // instead of the answer: 2 MiB through ureq failed that way under load).
    let addr = s.base.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    use std::io::Write as _;
    let over = qscript::serve::MAX_BODY + 1;
    write!(conn, "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {over}\r\n\r\n").unwrap();
    conn.write_all(&vec![b' '; over]).unwrap();
    let mut status_line = String::new();
    BufReader::new(&conn).read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 413"), "oversized body: {status_line:?}");

    // A client that disconnects mid-stream: its generation stops, the next request is served
    // at once, not after the ~1000 tokens the abandoned one asked for (timed here first).
    let t = Instant::now();
    let (_, v) = post(&url, &chat_body(&base_name, "Tell me a long story.", 1000, false));
    let full = t.elapsed();
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    eprintln!("a {n}-token answer takes {full:.2?}");
    assert!(n >= 500, "the model stopped early ({n} tokens): the disconnect check would prove nothing");
    let r = ureq::post(&url).send_string(&chat_body(&base_name, "Tell me a long story.", 1000, true)).unwrap();
    let mut reader = r.into_reader();
    let mut buf = [0u8; 64];
    assert!(reader.read(&mut buf).unwrap() > 0);
    drop(reader);
    let t = Instant::now();
    let (status, v) = post(&url, &chat_body(&base_name, "Hi", 4, false));
    let after = t.elapsed();
    eprintln!("request after a mid-stream disconnect answered in {after:.2?}");
    assert_eq!(status, 200, "{v}");
    assert!(after < full / 4, "the abandoned generation held the server for {after:?} (a full one takes {full:?})");
}

/// Ctrl-C (SIGINT): the server stops accepting and exits.
#[test]
fn ctrl_c_stops_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start(tmp.path());
    let (status, _) = post(&format!("{}/chat/completions", s.base), &chat_body("tuned", "Hi", 2, false));
    assert_eq!(status, 200);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let t = Instant::now();
    loop {
        if let Some(code) = s.child.try_wait().unwrap() {
            eprintln!("server exited with {code} {:.2?} after SIGINT", t.elapsed());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "server still running 10 s after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}
