//! `qscript chat MODEL [--adapter DIR]`: a conversation in the terminal through the model's chat
//! template, each answer streamed as it comes. `/reset`, `/system TEXT`, `/help`, `/quit`; Ctrl-C
//! stops a reply (what was said so far stays in the conversation), Ctrl-D leaves.

use crate::script::generate_api::chat_turn;
use crate::script::model_api::{self, ModelHandle};
use rhai::{Dynamic, Map};
use rustyline::error::ReadlineError;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub const EXAMPLES: &str = "Examples:
  qscript chat HuggingFaceTB/SmolLM2-135M-Instruct
  qscript chat HuggingFaceTB/SmolLM2-135M-Instruct --adapter out/support/adapter
  qscript chat out/support/adapter              the adapter's base model (adapter_config.json) with it
  qscript chat model.gguf --system \"Answer in one sentence.\" --temperature 0.7

In the chat: /system TEXT sets the system message (and starts over), /reset starts over,
/quit or Ctrl-D leaves; Ctrl-C stops the answer being written.";

const HELP: &str = "/system TEXT  set the system message and start over\n/reset        forget the conversation (the system message stays)\n/quit         leave (or Ctrl-D)\nCtrl-C stops the answer being written.";

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Hub id, HF model directory, .gguf file, or a peft adapter directory (its base model is
    /// read from adapter_config.json)
    pub model: String,
    /// A peft adapter directory to apply (e.g. a training run's `adapter/`)
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// System message at the start of the conversation
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// cpu, cuda, cuda:N or auto (default: the GPU in a CUDA build when one is present)
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Most tokens per answer
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_new_tokens: i64,
    /// Sampling temperature; 0 = greedy (default: the model's generation_config.json)
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
}

/// The model and the adapter to load: `--adapter`, or MODEL itself when it is an adapter folder.
fn model_and_adapter(args: &ChatArgs) -> anyhow::Result<(String, Option<PathBuf>)> {
    let dir = Path::new(&args.model);
    let cfg = dir.join("adapter_config.json");
    if args.adapter.is_some() || !cfg.is_file() || dir.join("config.json").is_file() {
        return Ok((args.model.clone(), args.adapter.clone()));
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.display()))?;
    let base = v.get("base_model_name_or_path").and_then(Value::as_str).filter(|s| !s.is_empty());
    let base = base.ok_or_else(|| anyhow::anyhow!("{}: no base_model_name_or_path; name the model and pass --adapter {}", cfg.display(), dir.display()))?;
    Ok((base.to_string(), Some(dir.to_path_buf())))
}

fn load(args: &ChatArgs) -> anyhow::Result<ModelHandle> {
    crate::device::set_override(args.device.as_deref())?;
    let (model, adapter) = model_and_adapter(args)?;
    let m = model_api::load(&model, &Map::new())?;
    if let Some(dir) = adapter {
        crate::script::lora_api::load_adapter(&m, &dir.display().to_string())?;
        eprintln!("adapter {} applied", dir.display());
    }
    m.chat_template()?; // no template: say so now, not after the first question
    Ok(m)
}

/// One conversation: the system message and the turns so far.
pub struct Conversation {
    pub system: Option<String>,
    pub turns: Vec<Value>,
}

impl Conversation {
    pub fn messages(&self) -> Vec<Value> {
        let system = self.system.iter().map(|s| json!({"role": "system", "content": s}));
        system.chain(self.turns.iter().cloned()).collect()
    }

    /// Handles a `/command`; false when it asks to leave.
    pub fn command(&mut self, line: &str) -> bool {
        let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match cmd {
            "/quit" | "/exit" | "/q" => return false,
            "/reset" => {
                self.turns.clear();
                println!("(conversation cleared)");
            }
            "/system" => {
                let text = rest.trim();
                self.system = (!text.is_empty()).then(|| text.to_string());
                self.turns.clear();
                println!("{}", if text.is_empty() { "(system message removed; conversation cleared)" } else { "(system message set; conversation cleared)" });
            }
            "/help" => println!("{HELP}"),
            other => println!("unknown command {other} (try /help)"),
        }
        true
    }
}

/// Streams the answer to `user`; a reply stopped by Ctrl-C keeps what was written.
fn answer(m: &ModelHandle, conv: &mut Conversation, user: &str, opts: &Map) {
    conv.turns.push(json!({"role": "user", "content": user}));
    let mut said = String::new();
    let mut out = std::io::stdout();
    let r = chat_turn(m, &conv.messages(), opts, &mut |piece: &str| {
        said.push_str(piece);
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    });
    let stopped = crate::CANCEL.swap(false, Ordering::SeqCst);
    match r {
        Ok(text) => {
            println!();
            conv.turns.push(json!({"role": "assistant", "content": text}));
        }
        Err(_) if stopped => {
            println!(" [stopped]");
            conv.turns.push(json!({"role": "assistant", "content": said}));
        }
        Err(e) => {
            println!();
            eprintln!("error: {e:#}");
            conv.turns.pop();
        }
    }
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let m = load(&args)?;
    let mut opts = Map::new();
    opts.insert("max_new_tokens".into(), Dynamic::from(args.max_new_tokens));
    if let Some(t) = args.temperature {
        opts.insert("temperature".into(), Dynamic::from(t));
    }
    let mut conv = Conversation { system: args.system.clone(), turns: Vec::new() };
    let mut rl = rustyline::DefaultEditor::new()?;
    println!("chatting with {} — /help for commands, Ctrl-D to leave", args.model);
    loop {
        match rl.readline("you> ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(line);
                if line.starts_with('/') {
                    if !conv.command(line) {
                        break;
                    }
                    continue;
                }
                answer(&m, &mut conv, line, &opts);
            }
            Err(ReadlineError::Interrupted) => println!("(Ctrl-D or /quit to leave)"),
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_edit_the_conversation() {
        let mut c = Conversation { system: None, turns: vec![json!({"role": "user", "content": "hi"})] };
        assert!(c.command("/system  Be brief. "));
        assert_eq!(c.system.as_deref(), Some("Be brief."));
        assert!(c.turns.is_empty());
        c.turns.push(json!({"role": "user", "content": "hi"}));
        assert_eq!(c.messages()[0]["role"], "system");
        assert_eq!(c.messages().len(), 2);
        assert!(c.command("/reset"));
        assert_eq!(c.messages().len(), 1, "reset keeps the system message");
        assert!(c.command("/system"));
        assert!(c.system.is_none());
        assert!(c.command("/nope"));
        assert!(!c.command("/quit"));
    }

    #[test]
    fn an_adapter_folder_names_its_base() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("adapter_config.json"), r#"{"base_model_name_or_path": "org/base", "r": 8}"#).unwrap();
        let args = |model: &str, adapter: Option<PathBuf>| ChatArgs { model: model.into(), adapter, system: None, device: None, max_new_tokens: 8, temperature: None };
        let dir = tmp.path().display().to_string();
        assert_eq!(model_and_adapter(&args(&dir, None)).unwrap(), ("org/base".to_string(), Some(tmp.path().to_path_buf())));
        assert_eq!(model_and_adapter(&args("m", None)).unwrap(), ("m".to_string(), None));
        std::fs::write(tmp.path().join("adapter_config.json"), r#"{"r": 8}"#).unwrap();
        let e = model_and_adapter(&args(&dir, None)).unwrap_err().to_string();
        assert!(e.contains("base_model_name_or_path") && e.contains("--adapter"), "{e}");
    }
}
