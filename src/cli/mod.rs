//! Command line: `qscript RECIPE`, `run`, `check`, `repl`, `chat`, `bench`, `quantize`.

pub mod bench;
pub mod export;
pub mod chat;
pub mod launch;
pub mod quantize;
pub mod repl;

use crate::script::{parse_set, Host, Limits};
use crate::util::permissions::Grants;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const MAIN_EXAMPLES: &str = "\
Examples:
  qscript recipes/chat.rhai                     run a recipe
  qscript recipes/chat.rhai --set MAX_NEW_TOKENS=64
                                                override a recipe's `const MAX_NEW_TOKENS = ...;`
  qscript recipes/customer_support.rhai --resume
                                                continue a run stopped by Ctrl-C from its checkpoint
  qscript recipes/customer_support.rhai --nproc-per-node 2
                                                train data-parallel on 2 GPUs (torchrun's RANK/WORLD_SIZE/... are honoured too)
  qscript recipes/customer_support.rhai --device cpu
                                                run on the CPU even in a CUDA build (cuda:N: a GPU)
  qscript check recipes/chat.rhai               validate a recipe, list what it reads and writes
  qscript recipe.rhai --allow-read=~/data       let a recipe read a folder besides its own
  qscript chat HuggingFaceTB/SmolLM2-135M-Instruct --adapter out/adapter
                                                chat with a model (and a trained adapter)
  qscript                                       open the REPL (same as `qscript repl`)

Permissions (deny by default): a recipe may read its own folder, its imports' folders and the
model caches; write only inside the output folders it declares (output_dir, save_pretrained,
to_jsonl) within the working directory; fetch from the hub only model ids written literally in
it or given with --set. --allow-read=PATH, --allow-write=PATH, --allow-net, --allow-all grant more.";

#[derive(Parser)]
#[command(name = "qscript", version, about = "Fine-tune, run, export and serve LLMs (Llama, Mistral, Qwen, Gemma, Phi) with Rhai recipes",
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
    /// Let the recipe read PATH besides its own folder (repeatable, comma-separated; no PATH: any)
    #[arg(long = "allow-read", value_name = "PATH", num_args = 0..=1, require_equals = true, value_delimiter = ',', default_missing_value = "")]
    allow_read: Vec<PathBuf>,
    /// Let the recipe write under PATH besides its output folders in the working directory (no PATH: anywhere)
    #[arg(long = "allow-write", value_name = "PATH", num_args = 0..=1, require_equals = true, value_delimiter = ',', default_missing_value = "")]
    allow_write: Vec<PathBuf>,
    /// Let the recipe fetch any model id from the hub (not only ids written literally in it)
    #[arg(long = "allow-net")]
    allow_net: bool,
    /// Lift every permission check (for your own recipes)
    #[arg(long = "allow-all", short = 'A')]
    allow_all: bool,
    /// Stop a recipe whose memory (its values, datasets, models on the CPU) passes this size: 8G, 512M, none
    #[arg(long = "max-memory", value_name = "SIZE", value_parser = crate::util::memory::parse_size)]
    max_memory: Option<usize>,
    /// Continue an interrupted run: every train() whose output_dir holds a checkpoint resumes from its latest
    #[arg(long)]
    resume: bool,
    /// Put every load_model of the run on this device: cpu, cuda, cuda:N or auto (default: what
    /// each load_model says, else auto = the GPU in a CUDA build when one is present)
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    #[command(flatten)]
    launch: launch::LaunchArgs,
}

impl RunArgs {
    pub(crate) fn grants(&self) -> Grants {
        let paths = |v: &[PathBuf]| v.iter().filter(|p| !p.as_os_str().is_empty()).map(|p| expand_tilde(p)).collect();
        Grants {
            read: paths(&self.allow_read),
            read_any: self.allow_read.iter().any(|p| p.as_os_str().is_empty()),
            write: paths(&self.allow_write),
            write_any: self.allow_write.iter().any(|p| p.as_os_str().is_empty()),
            net: self.allow_net,
            all: self.allow_all,
        }
    }

    /// The engine's limits; sets the process's memory limit (default: 3/4 of the machine's).
    pub(crate) fn limits(&self) -> Limits {
        crate::util::memory::set_limit(self.max_memory.unwrap_or_else(crate::util::memory::default_limit));
        Limits { max_operations: self.max_operations }
    }
}

fn expand_tilde(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), dirs::home_dir()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => p.to_path_buf(),
    }
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
        /// The same permission, limit and device flags as a recipe run (`qscript repl --allow-all`)
        #[command(flatten)]
        run: RunArgs,
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

/// A recipe run (not the REPL): the first Ctrl-C wins even inside long native work.
static EXIT_ON_CANCEL: AtomicBool = AtomicBool::new(true);
/// How long the first Ctrl-C waits for the work to stop cleanly before the process exits.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn install_ctrlc() {
    // The first Ctrl-C cancels the running work; a recipe that has not stopped after the grace
    // period (a long native call) is ended then. A second Ctrl-C exits at once. Whatever a
    // kill interrupts is left as temporaries the next run removes (`util::fs`).
    let _ = ctrlc::set_handler(|| {
        if crate::CANCEL.swap(true, Ordering::SeqCst) {
            let _ = writeln!(std::io::stderr(), "\ninterrupted");
            std::process::exit(130);
        }
        if EXIT_ON_CANCEL.load(Ordering::SeqCst) {
            std::thread::spawn(|| {
                std::thread::sleep(CANCEL_GRACE);
                let _ = writeln!(std::io::stderr(), "\ninterrupted");
                std::process::exit(130);
            });
        }
    });
}

fn run_recipe(path: &Path, args: &RunArgs) -> anyhow::Result<()> {
    if args.launch.nproc_per_node.is_some() {
        // The launcher waits for its ranks, which get Ctrl-C from the terminal themselves.
        EXIT_ON_CANCEL.store(false, Ordering::SeqCst);
        return launch::run(&args.launch, &|| crate::CANCEL.load(Ordering::SeqCst));
    }
    // What the run's manifest records, and what the command that resumes it repeats.
    crate::train::record::set_launch(crate::train::record::Launch {
        argv: launch::recorded_argv(),
        recipe: path.to_path_buf(),
        overrides: args.set.clone(),
        resume: args.resume,
    });
    crate::device::set_override(args.device.as_deref())?;
    // A rank of a data-parallel run (torchrun's environment): meet the others first, then train
    // on GPU LOCAL_RANK unless --device says otherwise.
    if let Some(env) = crate::train::distributed::init_from_env()? {
        if cfg!(feature = "cuda") && args.device.is_none() {
            crate::device::set_override(Some(&format!("cuda:{}", env.local_rank)))?;
        }
    }
    Host::sandboxed(path, &args.limits(), &args.grants()).run_file(path, &args.set)
}

fn check_recipe(recipe: &Path, run: &RunArgs) -> anyhow::Result<()> {
    not_launched(run)?;
    let host = Host::sandboxed(recipe, &run.limits(), &run.grants());
    let r = host.check_file(recipe, &run.set)?;
    println!(
        "{}: ok ({} config map{} checked; constants: {})",
        recipe.display(),
        r.maps_checked,
        if r.maps_checked == 1 { "" } else { "s" },
        if r.constants.is_empty() { "none".to_string() } else { r.constants.join(", ") }
    );
    print!("{}", crate::script::access::describe(&r.accesses));
    Ok(())
}

/// `--nproc-per-node` and its companions launch a recipe run, nothing else.
fn not_launched(run: &RunArgs) -> anyhow::Result<()> {
    if run.launch.nproc_per_node.is_some() {
        anyhow::bail!("--nproc-per-node: only a recipe run is launched on several processes (qscript RECIPE --nproc-per-node N)");
    }
    Ok(())
}

/// Exit statuses besides 0, 1 (an error), 2 (usage) and 130 (Ctrl-C).
const EXIT_INTERNAL: i32 = 70; // EX_SOFTWARE: a bug
const EXIT_IO: i32 = 74; // EX_IOERR: stderr cannot be written
const EXIT_BROKEN_PIPE: i32 = 141; // 128 + SIGPIPE, as a tool killed by the signal

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) => {
            EXIT_BROKEN_PIPE
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            if crate::CANCEL.load(Ordering::Relaxed) {
                130
            } else if crate::train::distributed::PEER_LOST.load(Ordering::Relaxed) {
                crate::train::distributed::EXIT_PEER_LOST
            } else {
                1
            }
        }
    }
}

/// The recipe engine's thread: deep recursion (nested values, Rhai's evaluator) gets room.
pub const STACK_SIZE: usize = 256 << 20;

static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The command line, on a thread with a large stack, behind the top-level panic handler: an
/// unexpected panic becomes one line (`internal error`, exit 70); a panic from printing into a
/// closed pipe ends quietly (141, as `head` expects), and one from an unwritable stderr with 74.
pub fn main() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        let msg = match (info.payload().downcast_ref::<&str>(), info.payload().downcast_ref::<String>()) {
            (Some(s), _) => s.to_string(),
            (_, Some(s)) => s.clone(),
            _ => "panic".to_string(),
        };
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{msg}{at}"));
        }
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            let _ = writeln!(std::io::stderr(), "{}", std::backtrace::Backtrace::force_capture());
        }
    }));
    let worker = std::thread::Builder::new().name("qscript".into()).stack_size(STACK_SIZE).spawn(|| std::panic::catch_unwind(cli_main));
    match worker.map(|w| w.join()) {
        Ok(Ok(Ok(code))) => code,
        Ok(Ok(Err(_))) | Ok(Err(_)) => panicked(),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot start: {e}");
            EXIT_INTERNAL
        }
    }
}

fn panicked() -> i32 {
    let msg = LAST_PANIC.lock().ok().and_then(|mut m| m.take()).unwrap_or_else(|| "panic".into());
    if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
        return EXIT_BROKEN_PIPE;
    }
    if msg.contains("failed printing to stderr") {
        return EXIT_IO;
    }
    let msg = msg.replace('\n', " ");
    let _ = writeln!(
        std::io::stderr(),
        "error: internal error: {msg} (a bug in qscript: please report it with the command, the recipe and this line)"
    );
    EXIT_INTERNAL
}

/// `qscript -A repl` as `qscript repl -A`: with flags first, clap reads the first positional as a
/// recipe path, so a subcommand's name there (and no file of that name) moves before the flags
/// (the subcommand takes them or says it does not).
fn subcommand_first(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    // Flags whose value is the next argument (not `--flag=value`, not an optional `=VALUE`).
    let takes_next = |a: &str| {
        cmd.get_arguments().any(|arg| {
            let named = arg.get_long().is_some_and(|l| a == format!("--{l}")) || arg.get_short().is_some_and(|c| a == format!("-{c}"));
            named && arg.get_action().takes_values() && !arg.is_require_equals_set()
        })
    };
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        if a == "--" || !a.starts_with('-') {
            break;
        }
        i += if takes_next(&a) { 2 } else { 1 };
    }
    let Some(name) = args.get(i).map(|a| a.to_string_lossy().into_owned()) else { return args };
    if i > 1 && cmd.get_subcommands().any(|c| c.get_name() == name) && !Path::new(&name).exists() {
        let sub = args.remove(i);
        args.insert(1, sub);
    }
    args
}

fn cli_main() -> i32 {
    // Exercises the handler above (tests/robustness.rs): an unexpected panic, on purpose.
    if std::env::var_os("QSCRIPT_DEBUG_PANIC").is_some() {
        panic!("QSCRIPT_DEBUG_PANIC is set");
    }
    let cli = match Cli::try_parse_from(subcommand_first(std::env::args_os().collect())) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    install_ctrlc();
    match (cli.command, cli.recipe) {
        (Some(Command::Run { recipe, run }), _) => report(run_recipe(&recipe, &run)),
        (Some(Command::Check { recipe, run }), _) => report(check_recipe(&recipe, &run)),
        (Some(Command::Repl { run }), _) => {
            EXIT_ON_CANCEL.store(false, Ordering::SeqCst);
            report(not_launched(&run).and_then(|_| repl::run(&run)))
        }
        (None, None) => {
            EXIT_ON_CANCEL.store(false, Ordering::SeqCst);
            report(not_launched(&cli.run).and_then(|_| repl::run(&cli.run)))
        }
        (Some(Command::Chat(args)), _) => report(chat::run(args)),
        (Some(Command::Bench { what }), _) => report(bench::run(what)),
        (Some(Command::Quantize(args)), _) => report(quantize::run(args)),
        (Some(Command::Export { what }), _) => report(export::run(what)),
        (Some(Command::Serve { model, adapters, port, host }), _) => report(crate::serve::run(crate::serve::ServeOptions { model, adapters, host, port })),
        (None, Some(recipe)) => report(run_recipe(&recipe, &cli.run)),
    }
}
