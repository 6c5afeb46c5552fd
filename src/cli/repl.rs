//! The interactive REPL: rustyline with history (saved after every input, capped), multi-line
//! input while brackets are open (a `.. ` prompt), completion of functions, variables and, after
//! `x.`, the methods of `x`'s type, `:help`, Ctrl-C to cancel a running evaluation. Values print
//! readably (their `to_string`). Variables, functions and imports persist between lines.

use super::RunArgs;
use crate::script::{format_error, FnDoc, Host, Limits};
use rhai::{Dynamic, Scope, AST};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::history::{FileHistory, History};
use rustyline::{Context, Helper, Highlighter, Hinter, Validator};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "break", "continue", "return",
    "import", "as", "true", "false", "print", "debug", "type_of", "throw", "try", "catch",
];

/// Entries kept in the history file (the oldest go first).
pub const HISTORY_CAP: usize = 10_000;

/// Each script type and the receiver its methods' signatures are written with (`model.chat(...)`).
const RECEIVERS: &[(&str, &str)] = &[
    ("Model", "model"),
    ("Tokenizer", "tokenizer"),
    ("Dataset", "dataset"),
    ("TokenizedDataset", "tokenized"),
    ("SFTTrainer", "trainer"),
    ("BitsAndBytesConfig", "bnb_config"),
    ("TrainingArguments", "args"),
    ("LoraConfig", "lora_config"),
];

/// Rhai's own methods of its built-in types that a recipe uses most.
const BUILTIN_METHODS: &[(&str, &[&str])] = &[
    ("string", &["contains", "ends_with", "index_of", "len", "replace", "split", "starts_with", "sub_string", "to_lower", "to_upper", "trim"]),
    ("array", &["contains", "drain", "filter", "index_of", "insert", "is_empty", "len", "map", "pop", "push", "reduce", "remove", "reverse", "sort", "split"]),
    ("map", &["contains", "get", "is_empty", "keys", "len", "remove", "values"]),
];

#[derive(Helper, Highlighter, Hinter, Validator)]
pub struct ReplHelper {
    functions: Vec<String>,
    /// Method names by receiver word of their signatures (`model` → chat, generate, ...).
    methods: BTreeMap<String, Vec<String>>,
    /// The session's variables and their type names.
    variables: Rc<RefCell<Vec<(String, String)>>>,
}

impl ReplHelper {
    pub fn new(docs: &[FnDoc], variables: Rc<RefCell<Vec<(String, String)>>>) -> Self {
        let mut functions: Vec<String> = docs.iter().map(|d| d.name.clone()).collect();
        functions.sort();
        functions.dedup();
        let mut methods: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in docs {
            if let Some((recv, _)) = d.signature.split_once('.').filter(|(r, _)| r.chars().all(|c| c.is_alphanumeric() || c == '_')) {
                methods.entry(recv.to_string()).or_default().push(d.name.clone());
            }
        }
        for m in methods.values_mut() {
            m.sort();
            m.dedup();
        }
        Self { functions, methods, variables }
    }

    /// The method names of variable `var`'s type, when its type is known.
    fn methods_of(&self, var: &str) -> Option<Vec<String>> {
        let ty = self.variables.borrow().iter().rev().find(|(n, _)| n == var).map(|(_, t)| t.clone())?;
        let own = |m: &[&str]| m.iter().map(|s| s.to_string()).collect();
        if let Some((_, recv)) = RECEIVERS.iter().find(|(t, _)| *t == ty) {
            return self.methods.get(*recv).cloned();
        }
        BUILTIN_METHODS.iter().find(|(t, _)| *t == ty).map(|(_, m)| own(m))
    }

    /// What may complete `line` up to `pos`: where the word starts, and the candidates.
    pub fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let is_ident = |c: char| c.is_alphanumeric() || c == '_';
        let start = line[..pos].rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
        let word = &line[start..pos];
        let receiver = line[..start].strip_suffix('.').map(|before| {
            let b = before.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
            &before[b..]
        });
        let mut names: Vec<String> = match receiver.and_then(|r| self.methods_of(r)) {
            Some(m) => m,
            None if word.is_empty() => return (pos, vec![]),
            None => {
                let mut all = self.functions.clone();
                if receiver.is_none() {
                    all.extend(self.variables.borrow().iter().map(|(n, _)| n.clone()));
                    all.extend(KEYWORDS.iter().map(|k| k.to_string()));
                }
                all
            }
        };
        names.retain(|n| n.starts_with(word));
        names.sort_unstable();
        names.dedup();
        (start, names)
    }
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, names) = self.candidates(line, pos);
        Ok((start, names.into_iter().map(|n| Pair { display: n.clone(), replacement: n }).collect()))
    }
}

/// Input is complete when every bracket opened outside strings and comments is closed.
pub fn brackets_open(src: &str) -> bool {
    let mut depth: i64 = 0;
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '`' => {
                let quote = c;
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == quote {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    depth > 0
}

/// `:help` text: everything, or the signatures and docs of one name.
pub fn help_text(docs: &[FnDoc], name: Option<&str>) -> String {
    match name {
        None => {
            let mut names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).filter(|n| !n.starts_with("to_")).collect();
            names.sort_unstable();
            names.dedup();
            format!(
                "qscript REPL. Type Rhai statements; variables persist. Commands:\n  :help NAME   signature and doc of a function\n  :vars         variables defined so far\n  :quit         leave (or Ctrl-D)\nCtrl-C cancels a running evaluation.\n\nFunctions: {}\n",
                names.join(", ")
            )
        }
        Some(n) => {
            let hits: Vec<&FnDoc> = docs.iter().filter(|d| d.name == n).collect();
            if hits.is_empty() {
                let hint = crate::util::nearest(n, docs.iter().map(|d| d.name.as_str()))
                    .map(|x| format!("; did you mean `{x}`?"))
                    .unwrap_or_default();
                format!("no function `{n}`{hint}\n")
            } else {
                hits.iter().map(|d| format!("{}\n    {}\n", d.signature, d.doc)).collect()
            }
        }
    }
}

/// One REPL session's state: the engine, the scope and the functions defined so far.
pub struct Session {
    pub host: Host,
    pub scope: Scope<'static>,
    functions: AST,
}

impl Session {
    pub fn new(limits: &Limits) -> Self {
        Self::with_host(Host::new(Some(std::path::Path::new(".")), limits))
    }

    /// The command line's REPL: the permissions of a recipe living in the working directory
    /// (read it and the model caches, write output folders inside it, fetch the hub ids typed
    /// at the prompt), plus what the flags grant.
    pub fn sandboxed(limits: &Limits, grants: &crate::util::permissions::Grants) -> Self {
        Self::with_host(Host::sandboxed(std::path::Path::new("./repl"), limits, grants))
    }

    fn with_host(host: Host) -> Self {
        // Ctrl-C pauses a training run here (trainer.resume() continues it).
        crate::script::train_api::pause_on_interrupt(true);
        Self { host, scope: Scope::new(), functions: AST::empty() }
    }

    /// Evaluate one input; returns the value to show (None for unit).
    pub fn eval(&mut self, input: &str) -> Result<Option<String>, String> {
        crate::CANCEL.store(false, Ordering::SeqCst);
        let ast = self.host.engine.compile_with_scope(&self.scope, input).map_err(|e| {
            let pos = e.position();
            format!("repl:{}:{}: syntax error: {}", pos.line().unwrap_or(0), pos.position().unwrap_or(0), e.err_type())
        })?;
        self.host.allow_literals_of(&ast);
        let _active = self.host.enter();
        // Imports made at the prompt stay available: register them as static modules.
        for stmt in ast.statements() {
            if let rhai::Stmt::Import(x, pos) = stmt {
                if let (rhai::Expr::StringConstant(path, _), alias) = (&x.0, &x.1) {
                    let resolver = self.host.engine.module_resolver();
                    let m = resolver.resolve(&self.host.engine, None, path, *pos).map_err(|e| format_error("repl", &e))?;
                    let name = if alias.name.is_empty() { path.to_string() } else { alias.name.to_string() };
                    self.host.engine.register_static_module(name, m);
                }
            }
        }
        self.functions += ast.clone_functions_only();
        let mut run = self.functions.clone();
        run += ast;
        crate::script::generate_api::take_streamed();
        let result = self.host.engine.eval_ast_with_scope::<Dynamic>(&mut self.scope, &run);
        crate::CANCEL.store(false, Ordering::SeqCst);
        let value = result.map_err(|e| format_error("repl", &e))?;
        Ok(show(&self.host, &value, crate::script::generate_api::take_streamed()))
    }

    pub fn variables(&self) -> Vec<String> {
        self.scope.iter().map(|(n, _, _)| n.to_string()).collect()
    }

    /// The variables with their script type names (`Model`, `string`, `map`, ...), for completion.
    pub fn typed_variables(&self) -> Vec<(String, String)> {
        self.scope.iter().map(|(n, _, v)| (n.to_string(), self.host.engine.map_type_name(v.type_name()).to_string())).collect()
    }
}

/// What the REPL prints for a value: strings as they are (unless the answer was just streamed),
/// other values through their `to_string` (our types' summary lines, arrays and maps as Rhai
/// writes them); nothing for unit.
pub fn show(host: &Host, v: &Dynamic, streamed: Option<String>) -> Option<String> {
    if v.is_unit() {
        return None;
    }
    if let Ok(s) = v.clone().into_string() {
        return (streamed.as_deref() != Some(s.as_str())).then_some(s);
    }
    let mut scope = Scope::new();
    scope.push("__value", v.clone());
    Some(host.engine.eval_with_scope::<String>(&mut scope, "to_string(__value)").unwrap_or_else(|_| v.to_string()))
}

/// One input: lines read until every bracket is closed (`.. ` prompts the continuation). None at
/// Ctrl-D on an empty prompt; Ctrl-C drops what was typed.
fn read_input(rl: &mut rustyline::Editor<ReplHelper, FileHistory>) -> rustyline::Result<Option<String>> {
    let mut buf = String::new();
    loop {
        match rl.readline(if buf.is_empty() { ">> " } else { ".. " }) {
            Ok(line) => {
                buf.push_str(&line);
                buf.push('\n');
                if !brackets_open(&buf) {
                    return Ok(Some(buf.trim().to_string()));
                }
            }
            Err(ReadlineError::Interrupted) => buf.clear(),
            Err(ReadlineError::Eof) if buf.is_empty() => return Ok(None),
            Err(ReadlineError::Eof) => buf.clear(),
            Err(e) => return Err(e),
        }
    }
}

/// Runs a `:command`; false when it asks to leave.
fn command(session: &Session, cmd: &str) -> bool {
    let mut parts = cmd.split_whitespace();
    match parts.next().unwrap_or("") {
        "help" | "h" => print!("{}", help_text(&session.host.docs, parts.next())),
        "vars" => println!("{}", session.variables().join(", ")),
        "quit" | "q" | "exit" => return false,
        other => println!("unknown command :{other} (try :help)"),
    }
    true
}

pub(super) fn run(args: &RunArgs) -> anyhow::Result<()> {
    crate::device::set_override(args.device.as_deref())?;
    let mut session = Session::sandboxed(&args.limits(), &args.grants());
    let variables = Rc::new(RefCell::new(Vec::new()));
    let config = rustyline::Config::builder().max_history_size(HISTORY_CAP)?.history_ignore_dups(true)?.auto_add_history(false).build();
    let mut rl: rustyline::Editor<ReplHelper, FileHistory> = rustyline::Editor::with_config(config)?;
    rl.set_helper(Some(ReplHelper::new(&session.host.docs, variables.clone())));
    let history = crate::script::history_path();
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = rl.load_history(&history);
    println!("qscript {} REPL — :help for help, Ctrl-D to leave", env!("CARGO_PKG_VERSION"));
    while let Some(input) = read_input(&mut rl)? {
        if input.is_empty() {
            continue;
        }
        // Saved now, not at exit: a crash or a killed terminal keeps what was typed.
        if rl.history_mut().add(&input).unwrap_or(false) {
            let _ = rl.history_mut().append(&history);
        }
        if let Some(cmd) = input.strip_prefix(':') {
            if !command(&session, cmd) {
                break;
            }
            continue;
        }
        match session.eval(&input) {
            Ok(Some(v)) => println!("{v}"),
            Ok(None) => {}
            Err(e) => eprintln!("error: {e}"),
        }
        *variables.borrow_mut() = session.typed_variables();
    }
    Ok(())
}
