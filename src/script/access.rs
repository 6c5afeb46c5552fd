//! `qscript check`'s read / write / network listing: what a recipe will touch, found from its
//! literals (constants, `--set` values and concatenations of those are followed) and judged by
//! the permissions it would run under. Paths computed at run time are listed as such; the
//! checker judges them when the recipe runs.

use crate::util::permissions::Policy;
use rhai::{ASTNode, Expr, Stmt, AST};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Net,
}

/// One access a recipe makes: what, from which call and line, and the verdict.
#[derive(Debug, Clone)]
pub struct Access {
    pub kind: Kind,
    /// The path or model id; `None` when computed at run time.
    pub target: Option<String>,
    pub call: String,
    pub line: usize,
    pub verdict: String,
}

/// Calls taking a path or id, and which argument (method-call position) holds it.
fn path_arg(name: &str) -> Option<(Kind, usize)> {
    Some(match name {
        "load_dataset" | "load_model" => (Kind::Read, 0),
        "load_adapter" => (Kind::Read, 1),
        "save_pretrained" | "to_jsonl" => (Kind::Write, 1),
        _ => return None,
    })
}

/// The accesses of `ast`, judged by `policy` (which learns the recipe's output folders).
pub fn accesses(ast: &AST, policy: &Policy) -> Vec<Access> {
    let consts = string_constants(ast);
    let mut found: Vec<(Kind, Option<String>, String, usize)> = Vec::new();
    for s in ast.statements() {
        if let Stmt::Import(x, pos) = s {
            if let Expr::StringConstant(p, _) = &x.0 {
                found.push((Kind::Read, Some(p.to_string()), "import".into(), pos.line().unwrap_or(0)));
            }
        }
    }
    ast.walk(&mut |nodes: &[ASTNode]| {
        let (call, is_method) = match nodes.last() {
            Some(ASTNode::Expr(Expr::FnCall(c, _))) => (c, false),
            Some(ASTNode::Expr(Expr::MethodCall(c, _))) => (c, true),
            _ => return true,
        };
        let line = nodes.last().and_then(|n| n.position().line()).unwrap_or(0);
        let eval = |e: &Expr| eval_str(e, &consts);
        if let Some((kind, at)) = path_arg(&call.name) {
            let at = if is_method { at.saturating_sub(1) } else { at };
            let hub = |id: &str| is_hub_id(id) && !Path::new(id).exists();
            // `load_model("random:SHAPE")` reads no file: not listed.
            if let Some(arg) = call.args.get(at).filter(|a| !(call.name == "load_model" && eval(a).is_some_and(|id| id.starts_with("random:")))) {
                let kind = if call.name == "load_model" && eval(arg).is_some_and(|id| hub(&id)) { Kind::Net } else { kind };
                found.push((kind, eval(arg), call.name.to_string(), line));
            }
            // load_model's `tokenizer` option: another model's tokenizer files (or the hub).
            if let (true, Some(Expr::Map(m, _))) = (call.name == "load_model", call.args.get(at + 1)) {
                for (k, v) in m.0.iter().filter(|(k, _)| k.name == "tokenizer") {
                    let kind = if eval(v).is_some_and(|id| hub(&id)) { Kind::Net } else { Kind::Read };
                    found.push((kind, eval(v), format!("load_model {}", k.name), line));
                }
            }
        } else if call.name == "TrainingArguments" {
            if let Some(Expr::Map(m, _)) = call.args.first() {
                for (k, v) in m.0.iter() {
                    match k.name.as_str() {
                        "output_dir" => found.push((Kind::Write, eval(v), "output_dir".into(), line)),
                        "resume_from_checkpoint" if matches!(v, Expr::StringConstant(..)) => {
                            found.push((Kind::Read, eval(v), "resume_from_checkpoint".into(), line))
                        }
                        _ => {}
                    }
                }
            }
        } else if !call.namespace.is_empty() {
            // A module's function given a hub id (`qlora::load(MODEL, 16)`).
            for a in call.args.iter() {
                if let Some(id) = eval(a).filter(|s| is_hub_id(s)) {
                    let kind = if Path::new(&id).exists() { Kind::Read } else { Kind::Net };
                    found.push((kind, Some(id), format!("{}::{}", call.namespace, call.name), line));
                }
            }
        }
        true
    });
    // Output folders first: writes under them and reads of them follow.
    found.sort_by_key(|(kind, _, call, line)| (*kind != Kind::Write || call != "output_dir", *line));
    let mut out: Vec<Access> = found
        .into_iter()
        .map(|(kind, target, call, line)| {
            let verdict = judge(kind, target.as_deref(), &call, policy);
            Access { kind, target, call, line, verdict }
        })
        .collect();
    out.sort_by_key(|a| (a.kind as u8, a.line));
    out
}

fn judge(kind: Kind, target: Option<&str>, call: &str, policy: &Policy) -> String {
    let Some(t) = target else { return "computed at run time: checked when it runs".into() };
    let verdict = match kind {
        Kind::Read if call == "import" && crate::script::STDLIB.iter().any(|(n, _)| *n == t) => return "built in".into(),
        Kind::Read if call == "import" => policy.check_read(&Path::new(t).with_extension("rhai")),
        Kind::Read => policy.check_read(Path::new(t)),
        Kind::Write if call == "to_jsonl" => policy.check_write(Path::new(t)).or_else(|e| {
            let dir = Path::new(t).parent().filter(|d| !d.as_os_str().is_empty()).ok_or(e)?;
            policy.declare_output(dir).map_err(|_| policy.check_write(Path::new(t)).unwrap_err())
        }),
        Kind::Write => policy.check_write(Path::new(t)).or_else(|_| policy.declare_output(Path::new(t))),
        Kind::Net => policy.check_net(t, None).map(|_| "a literal of the recipe; fetched only when not in the HF cache".into()),
    };
    match verdict {
        Ok(why) => format!("allowed ({why})"),
        Err(e) => format!("denied: {e}"),
    }
}

/// The listing `qscript check` prints after its `ok` line.
pub fn describe(accesses: &[Access]) -> String {
    let mut s = String::new();
    for (kind, title) in [(Kind::Read, "reads"), (Kind::Write, "writes"), (Kind::Net, "network")] {
        let items: Vec<&Access> = accesses.iter().filter(|a| a.kind == kind).collect();
        s.push_str(&format!("{title}:{}\n", if items.is_empty() { " none" } else { "" }));
        for a in items {
            let what = a.target.clone().unwrap_or_else(|| "(computed)".into());
            let what = if kind == Kind::Net { format!("hub model {what}") } else { what };
            s.push_str(&format!("  {what} ({}, line {}): {}\n", a.call, a.line, a.verdict));
        }
    }
    s
}

/// `owner/name` as the hub spells model ids (a path with more parts, or one that starts with
/// `.`, `/` or `~`, is not one).
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !s.ends_with(".gguf")
}

/// Top-level `const NAME = "...";` values (after `--set`).
fn string_constants(ast: &AST) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for s in ast.statements() {
        if let Stmt::Var(x, flags, _) = s {
            if flags.contains(rhai::ASTFlags::CONSTANT) {
                if let Some(v) = eval_str(&x.1, &out) {
                    out.insert(x.0.name.to_string(), v);
                }
            }
        }
    }
    out
}

/// A string expression made of literals, constants, `+` and interpolation, evaluated.
fn eval_str(e: &Expr, consts: &HashMap<String, String>) -> Option<String> {
    match e {
        Expr::StringConstant(s, _) => Some(s.to_string()),
        Expr::DynamicConstant(d, _) if d.is_string() => Some(d.to_string()),
        Expr::Variable(v, ..) if v.2.is_empty() => consts.get(v.1.as_str()).cloned(),
        Expr::FnCall(c, _) if c.name == "+" && c.args.len() == 2 => {
            Some(eval_str(&c.args[0], consts)? + eval_str(&c.args[1], consts)?.as_str())
        }
        Expr::InterpolatedString(parts, _) => parts.iter().map(|p| eval_str(p, consts)).collect(),
        _ => None,
    }
}
