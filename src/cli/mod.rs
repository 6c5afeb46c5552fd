//! Command line: `qscript RECIPE`, `run`, `check`, `repl`, `chat`, `bench`, `quantize`.

pub mod bench;
pub mod export;
pub mod chat;
pub mod quantize;
pub mod repl;

use crate::script::{parse_set, Host, Limits};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

const MAIN_EXAMPLES: &str = "\
Examples:
  qscript recipes/chat.rhai                     run a recipe
  qscript recipes/chat.rhai --set MAX_NEW_TOKENS=64
                                                override a recipe's `const MAX_NEW_TOKENS = ...;`
  qscript recipes/customer_support.rhai --resume
                                                continue a run stopped by Ctrl-C from its checkpoint
  qscript recipes/customer_support.rhai --device cpu
                                                run on the CPU even in a CUDA build (cuda:N: a GPU)
  qscript check recipes/chat.rhai               validate a recipe without loading weights
  qscript chat HuggingFaceTB/SmolLM2-135M-Instruct --adapter out/adapter
                                                chat with a model (and a trained adapter)
  qscript                                       open the REPL (same as `qscript repl`)";

#[derive(Parser)]
#[command(name = "qscript", version, about = "Fine-tune and run Llama-family models with Rhai recipes",
    after_help = MAIN_EXAMPLES, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Recipe to run (same as `qscript run RECIPE`)
    recipe: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// Override a top-level `const NAME = ...;` of the recipe (repeatable)
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    set: Vec<(String, String)>,
    /// Stop a recipe after this many script operations (guards against runaway loops)
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_operations)]
    max_operations: u64,
    /// Continue an interrupted run: every train() whose output_dir holds a checkpoint resumes from its latest
    #[arg(long)]
    resume: bool,
    /// Put every load_model of the run on this device: cpu, cuda, cuda:N or auto (default: what
    /// each load_model says, else auto = the GPU in a CUDA build when one is present)
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe
    #[command(after_help = "Examples:\n  qscript run recipes/chat.rhai\n  qscript run recipes/chat.rhai --set MAX_NEW_TOKENS=32 --set TEMPERATURE=0.7\n\nA recipe reads overridable values from top-level constants:\n  const MAX_NEW_TOKENS = 128;   // --set MAX_NEW_TOKENS=64 replaces the value before the run")]
    Run {
        recipe: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compile a recipe and validate its config maps without loading weights
    #[command(after_help = "Examples:\n  qscript check recipes/chat.rhai\n  qscript check recipes/chat.rhai --set MAX_NEW_TOKENS=64")]
    Check {
        recipe: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Interactive REPL (history, completion, :help)
    #[command(after_help = "Examples:\n  qscript repl\n  >> let model = load_model(\"HuggingFaceTB/SmolLM2-135M-Instruct\");\n  >> model.chat(\"Hi!\", #{ stream: true })\n  >> :help chat")]
    Repl {
        /// Put every load_model of the session on this device: cpu, cuda, cuda:N or auto
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
    },
    /// Chat with a model in the terminal (chat template, streaming, /reset, /system)
    #[command(after_help = chat::EXAMPLES)]
    Chat(chat::ChatArgs),
    /// Benchmarks (print JSON lines)
    #[command(after_help = "Examples:\n  qscript bench generate\n  qscript bench generate --model path/to/model --new-tokens 128 --prompt-tokens 512")]
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Write a bitsandbytes 4-bit checkpoint (NF4/FP4) of a model directory or safetensors file
    #[command(after_help = quantize::EXAMPLES)]
    Quantize(quantize::QuantizeArgs),
    /// OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models)
    #[command(after_help = "Examples:\n  qscript serve HuggingFaceTB/SmolLM2-135M-Instruct\n  qscript serve my-model/ --adapter support=out/run1/checkpoint-200 --port 8080\n\n  curl http://127.0.0.1:8080/v1/chat/completions -d '{\"model\": \"support\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n\nRequests are queued and answered one at a time. Ctrl-C stops the server.")]
    Serve {
        /// Model: hub id, HF directory or .gguf
        model: String,
        /// A LoRA adapter to serve as its own model, `NAME=DIR` or `DIR` (named by the directory); repeatable
        #[arg(long = "adapter", value_name = "[NAME=]DIR")]
        adapters: Vec<String>,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Export for llama.cpp / Ollama: GGUF files (merged model or LoRA adapter) and a Modelfile
    #[command(after_help = export::EXAMPLES)]
    Export {
        #[command(subcommand)]
        what: export::ExportCommand,
    },
}

fn install_ctrlc() {
    // First Ctrl-C cancels the running work cleanly; a second one exits at once.
    let _ = ctrlc::set_handler(|| {
        if crate::CANCEL.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\ninterrupted");
            std::process::exit(130);
        }
    });
}

fn run_recipe(path: &Path, args: &RunArgs) -> anyhow::Result<()> {
    // What the run's manifest records, and what the command that resumes it repeats.
    crate::train::record::set_launch(crate::train::record::Launch {
        argv: std::env::args().collect(),
        recipe: path.to_path_buf(),
        overrides: args.set.clone(),
        resume: args.resume,
    });
    crate::device::set_override(args.device.as_deref())?;
    let host = Host::for_recipe(path, &Limits { max_operations: args.max_operations });
    host.run_file(path, &args.set)
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if crate::CANCEL.load(std::sync::atomic::Ordering::Relaxed) { 130 } else { 1 }
        }
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    install_ctrlc();
    match (cli.command, cli.recipe) {
        (Some(Command::Run { recipe, run }), _) => report(run_recipe(&recipe, &run)),
        (Some(Command::Check { recipe, run }), _) => report((|| {
            let host = Host::for_recipe(&recipe, &Limits { max_operations: run.max_operations });
            let r = host.check_file(&recipe, &run.set)?;
            println!(
                "{}: ok ({} config map{} checked; constants: {})",
                recipe.display(),
                r.maps_checked,
                if r.maps_checked == 1 { "" } else { "s" },
                if r.constants.is_empty() { "none".to_string() } else { r.constants.join(", ") }
            );
            Ok(())
        })()),
        (Some(Command::Repl { device }), _) => report(repl::run(&RunArgs { device: device.or(cli.run.device.clone()), ..cli.run.clone() })),
        (None, None) => report(repl::run(&cli.run)),
        (Some(Command::Chat(args)), _) => report(chat::run(args)),
        (Some(Command::Bench { what }), _) => report(bench::run(what)),
        (Some(Command::Quantize(args)), _) => report(quantize::run(args)),
        (Some(Command::Export { what }), _) => report(export::run(what)),
        (Some(Command::Serve { model, adapters, port, host }), _) => report(crate::serve::run(crate::serve::ServeOptions { model, adapters, host, port })),
        (None, Some(recipe)) => report(run_recipe(&recipe, &cli.run)),
    }
}
