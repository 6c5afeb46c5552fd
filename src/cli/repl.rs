//! The interactive REPL: rustyline with history, multi-line input while brackets are open,
//! completion of registered functions and variables, `:help`, Ctrl-C to cancel a running
//! evaluation. Variables, functions and imports persist between lines.

use super::RunArgs;
use crate::script::{format_error, FnDoc, Host, Limits};
use rhai::{Dynamic, Scope, AST};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Helper, Highlighter, Hinter};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "break", "continue", "return",
    "import", "as", "true", "false", "print", "debug", "type_of", "throw", "try", "catch",
];

#[derive(Helper, Highlighter, Hinter)]
pub struct ReplHelper {
    functions: Vec<String>,
    variables: Rc<RefCell<Vec<String>>>,
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos].rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let word = &line[start..pos];
        if word.is_empty() {
            return Ok((pos, vec![]));
        }
        let after_dot = line[..start].ends_with('.');
        let vars = self.variables.borrow();
        let mut names: Vec<&str> = self.functions.iter().map(String::as_str).collect();
        if !after_dot {
            names.extend(vars.iter().map(String::as_str));
            names.extend(KEYWORDS);
        }
        names.sort_unstable();
        names.dedup();
        let pairs = names
            .into_iter()
            .filter(|n| n.starts_with(word))
            .map(|n| Pair { display: n.to_string(), replacement: n.to_string() })
            .collect();
        Ok((start, pairs))
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

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if brackets_open(ctx.input()) { ValidationResult::Incomplete } else { ValidationResult::Valid(None) })
    }
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
        Self { host: Host::new(Some(std::path::Path::new(".")), limits), scope: Scope::new(), functions: AST::empty() }
    }

    /// The command line's REPL: the permissions of a recipe living in the working directory
    /// (read it and the model caches, write output folders inside it, fetch the hub ids typed
    /// at the prompt), plus what the flags grant.
    pub fn sandboxed(limits: &Limits, grants: &crate::util::permissions::Grants) -> Self {
        let host = Host::sandboxed(std::path::Path::new("./repl"), limits, grants);
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
        let result = self.host.engine.eval_ast_with_scope::<Dynamic>(&mut self.scope, &run);
        crate::CANCEL.store(false, Ordering::SeqCst);
        let value = result.map_err(|e| format_error("repl", &e))?;
        Ok(show(&self.host, &value))
    }

    pub fn variables(&self) -> Vec<String> {
        self.scope.iter().map(|(n, _, _)| n.to_string()).collect()
    }
}

fn show(host: &Host, v: &Dynamic) -> Option<String> {
    if v.is_unit() {
        return None;
    }
    if let Ok(s) = v.clone().into_string() {
        return Some(s);
    }
    // Our own types print through their registered `to_string`.
    if let Ok(s) = host.engine.call_fn::<String>(&mut Scope::new(), &AST::empty(), "to_string", (v.clone(),)) {
        return Some(s);
    }
    Some(format!("{v:?}"))
}

pub(super) fn run(args: &RunArgs) -> anyhow::Result<()> {
    let mut session = Session::sandboxed(&args.limits(), &args.grants());
    let mut functions: Vec<String> = session.host.docs.iter().map(|d| d.name.clone()).collect();
    functions.sort();
    functions.dedup();
    let variables = Rc::new(RefCell::new(Vec::new()));
    let helper = ReplHelper { functions, variables: variables.clone() };
    let mut rl: rustyline::Editor<ReplHelper, rustyline::history::FileHistory> = rustyline::Editor::new()?;
    rl.set_helper(Some(helper));
    let history = crate::script::history_path();
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = rl.load_history(&history);
    println!("qscript {} REPL — :help for help, Ctrl-D to leave", env!("CARGO_PKG_VERSION"));
    loop {
        match rl.readline(">> ") {
            Ok(line) => {
                let input = line.trim();
                if input.is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(input);
                if let Some(cmd) = input.strip_prefix(':') {
                    let mut parts = cmd.split_whitespace();
                    match parts.next().unwrap_or("") {
                        "help" | "h" => print!("{}", help_text(&session.host.docs, parts.next())),
                        "vars" => println!("{}", session.variables().join(", ")),
                        "quit" | "q" | "exit" => break,
                        other => println!("unknown command :{other} (try :help)"),
                    }
                    continue;
                }
                match session.eval(input) {
                    Ok(Some(v)) => println!("{v}"),
                    Ok(None) => {}
                    Err(e) => eprintln!("error: {e}"),
                }
                *variables.borrow_mut() = session.variables();
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = rl.save_history(&history);
    Ok(())
}
