//! The Rhai host: engine with limits, API registration (one file per area), error mapping to
//! `recipe.rhai:LINE:COL: message`, stdlib modules embedded in the binary, `--set` overrides
//! and the static checker behind `qscript check`.

pub mod access;
pub mod config;
pub mod data_api;
pub mod export_api;
pub mod display_api;
pub mod generate_api;
pub mod key_order;
pub mod lora_api;
pub mod model_api;
pub mod quant_api;
pub mod train_api;
pub mod util_api;

use anyhow::{bail, Context, Result};
use rhai::module_resolvers::{FileModuleResolver, ModuleResolversCollection};
use rhai::{Dynamic, Engine, EvalAltResult, Position, Scope, AST};
use crate::util::permissions::{self, Grants, Policy};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;

pub type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Convert a Rust error into a Rhai runtime error; Rhai fills in the call-site position.
pub fn rt<T>(r: anyhow::Result<T>) -> RhaiResult<T> {
    r.map_err(|e| EvalAltResult::ErrorRuntime(format!("{e:#}").into(), Position::NONE).into())
}

/// Documentation of one registered function, for `:help` and completion.
#[derive(Debug, Clone)]
pub struct FnDoc {
    pub name: String,
    pub signature: String,
    pub doc: String,
}

/// Registers functions together with their documentation, so nothing is registered undocumented.
pub struct Api<'a> {
    pub engine: &'a mut Engine,
    pub docs: &'a mut Vec<FnDoc>,
}

impl Api<'_> {
    pub fn func<A: 'static, const N: usize, const X: bool, R: rhai::Variant + Clone, const F: bool>(
        &mut self,
        name: &str,
        signature: &str,
        doc: &str,
        f: impl rhai::RhaiNativeFunc<A, N, X, R, F> + 'static,
    ) {
        self.engine.register_fn(name, f);
        self.docs.push(FnDoc { name: name.into(), signature: signature.into(), doc: doc.into() });
    }

    pub fn getter<T: rhai::Variant + Clone, R: rhai::Variant + Clone>(
        &mut self,
        name: &str,
        signature: &str,
        doc: &str,
        f: impl Fn(&mut T) -> RhaiResult<R> + 'static,
    ) {
        self.engine.register_get(name, f);
        self.docs.push(FnDoc { name: name.into(), signature: signature.into(), doc: doc.into() });
    }
}

/// Rhai modules shipped with qscript, importable by name: `import "chat" as chat;`.
pub const STDLIB: &[(&str, &str)] = &[
    ("chat", include_str!("../../stdlib/chat.rhai")),
    ("qlora", include_str!("../../stdlib/qlora.rhai")),
];

struct StdlibResolver;

impl rhai::ModuleResolver for StdlibResolver {
    fn resolve(&self, engine: &Engine, _source: Option<&str>, path: &str, pos: Position) -> RhaiResult<rhai::Shared<rhai::Module>> {
        let Some((name, src)) = STDLIB.iter().find(|(n, _)| *n == path) else {
            return Err(EvalAltResult::ErrorModuleNotFound(path.into(), pos).into());
        };
        let mut ast = engine.compile(*src).map_err(|e| EvalAltResult::ErrorInModule(path.into(), e.into(), pos))?;
        ast.set_source(format!("stdlib/{name}.rhai"));
        let m = rhai::Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| EvalAltResult::ErrorInModule(path.into(), e, pos))?;
        Ok(m.into())
    }
}

/// `import "file"`: Rhai's file resolver behind the permission checker. The module's string
/// literals join the recipe's (hub ids it names may be fetched) and its folder becomes readable.
struct CheckedFiles(FileModuleResolver);

impl rhai::ModuleResolver for CheckedFiles {
    fn resolve(&self, engine: &Engine, source: Option<&str>, path: &str, pos: Position) -> RhaiResult<rhai::Shared<rhai::Module>> {
        let file = self.0.get_file_path(path, source.map(Path::new).and_then(Path::parent));
        // Rhai's resolver collection accepts only module errors.
        let denied = |e: anyhow::Error| -> Box<EvalAltResult> {
            let inner = EvalAltResult::ErrorRuntime(format!("{e:#}").into(), Position::NONE);
            EvalAltResult::ErrorInModule(path.into(), inner.into(), pos).into()
        };
        if let Some(policy) = permissions::current() {
            policy.check_read(&file).map_err(denied)?;
            if file.symlink_metadata().is_ok() && !file.is_file() {
                return Err(denied(anyhow::anyhow!("{}: not a regular file", file.display())));
            }
            if let Ok(ast) = engine.compile_file(file.clone()) {
                policy.add_literals(string_literals(&ast));
            }
            if let Some(dir) = file.parent() {
                policy.add_read_root(dir, "an imported module's folder");
            }
        }
        self.0.resolve(engine, source, path, pos)
    }
}

/// Every string literal of `ast` (functions included): the only model ids and revisions a
/// recipe may send to the hub without `--allow-net`. A string built at run time is never one.
pub fn string_literals(ast: &AST) -> Vec<String> {
    let mut out = Vec::new();
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        match nodes.last() {
            Some(rhai::ASTNode::Expr(rhai::Expr::StringConstant(s, _))) => out.push(s.to_string()),
            Some(rhai::ASTNode::Expr(rhai::Expr::DynamicConstant(d, _))) if d.is_string() => out.push(d.to_string()),
            _ => {}
        }
        true
    });
    out
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Script operations before a run is stopped (native calls count as one).
    pub max_operations: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_operations: 2_000_000_000 }
    }
}

pub struct Host {
    pub engine: Engine,
    pub docs: Vec<FnDoc>,
    /// The permissions recipes run under; `None` (the library used from Rust): no checks.
    pub policy: Option<Rc<Policy>>,
}

/// The folders a recipe may read without a flag besides its own: the model caches.
pub fn cache_roots() -> Vec<(PathBuf, &'static str)> {
    vec![
        (crate::model::hub::hf_cache().path().clone(), "the HF hub cache"),
        (crate::model::hub::qscript_cache_dir(), "qscript's model cache"),
    ]
}

impl Host {
    /// `base_dir`: where `import "file"` looks for non-stdlib modules (the recipe's folder).
    pub fn new(base_dir: Option<&Path>, limits: &Limits) -> Self {
        let mut engine = Engine::new();
        // Compile unoptimized (see `compile_source`); runs optimize explicitly.
        engine.set_optimization_level(rhai::OptimizationLevel::None);
        // Operators resolve through functions, so `util_api`'s bounded string `+` / `+=` apply.
        engine.set_fast_operators(false);
        let mut docs = Vec::new();
        // Rhai's array / map / string size limits are off: it checks them by walking the whole
        // value after every call that may change it, so `a.push(x)` in a loop costs O(n²)
        // and never reaches a 10M limit in practice. The memory limit (`util::memory`,
        // checked at every operation below) bounds what a recipe makes instead, native
        // objects included.
        engine
            .set_max_call_levels(64)
            .set_max_expr_depths(128, 64)
            .set_max_string_size(0)
            .set_max_array_size(0)
            .set_max_map_size(0)
            .set_max_modules(256)
            .set_max_variables(10_000)
            .set_max_functions(10_000);
        key_order::install(&mut engine);
        let max_ops = limits.max_operations;
        engine.on_progress(move |ops| {
            if crate::CANCEL.load(Ordering::Relaxed) {
                Some(Dynamic::from("interrupted (Ctrl-C)"))
            } else if let Some(msg) = crate::util::memory::over_limit() {
                Some(Dynamic::from(msg))
            } else if ops > max_ops {
                Some(Dynamic::from(format!(
                    "stopped after {max_ops} operations (a runaway loop?); raise the limit with --max-operations"
                )))
            } else {
                None
            }
        });
        let mut resolvers = ModuleResolversCollection::new();
        resolvers.push(StdlibResolver);
        let mut files = FileModuleResolver::new_with_path(base_dir.unwrap_or(Path::new(".")));
        files.enable_cache(true);
        resolvers.push(CheckedFiles(files));
        engine.set_module_resolver(resolvers);
        {
            let mut api = Api { engine: &mut engine, docs: &mut docs };
            model_api::register(&mut api);
            generate_api::register(&mut api);
            util_api::register(&mut api);
            lora_api::register(&mut api);
            quant_api::register(&mut api);
            train_api::register(&mut api);
            data_api::register(&mut api);
            export_api::register(&mut api);
            display_api::register(&mut api);
        }
        Self { engine, docs, policy: None }
    }

    pub fn for_recipe(path: &Path, limits: &Limits) -> Self {
        Self::new(path.parent(), limits)
    }

    /// A host for a recipe run from the command line: deny by default, `grants` from the
    /// flags; the recipe's folder and the model caches are readable.
    pub fn sandboxed(recipe: &Path, limits: &Limits, grants: &Grants) -> Self {
        let dir = recipe.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut roots = vec![(dir.to_path_buf(), "the recipe's folder")];
        roots.extend(cache_roots());
        let mut host = Self::new(recipe.parent(), limits);
        host.policy = Some(Rc::new(Policy::new(grants, &roots)));
        host
    }

    /// Put this host's permissions in force on this thread while the guard lives.
    pub fn enter(&self) -> Option<permissions::Active> {
        self.policy.clone().map(permissions::activate)
    }

    /// The recipe's literals may be sent to the hub as model ids.
    pub fn allow_literals_of(&self, ast: &AST) {
        if let Some(p) = &self.policy {
            p.add_literals(string_literals(ast));
        }
    }

    /// Compile a recipe; syntax errors come back as `file:LINE:COL: message`.
    pub fn compile_file(&self, path: &Path) -> Result<AST> {
        if path.symlink_metadata().is_ok() && !path.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        let src = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read recipe", path.display()))?;
        self.compile_source(&src, &path.display().to_string())
    }

    /// Compile without optimization: constant folding would inline `const` values before
    /// `--set` can replace them, and turn literal maps into opaque constants `check` cannot see.
    pub fn compile_source(&self, src: &str, name: &str) -> Result<AST> {
        let mut ast = self
            .engine
            .compile(src)
            .map_err(|e| anyhow::anyhow!("{}: syntax error: {}", locate(name, e.position()), e.err_type()))?;
        ast.set_source(name.to_string());
        Ok(ast)
    }

    /// Optimize a compiled (and possibly overridden) AST for running.
    fn optimize(&self, ast: AST) -> AST {
        let source = ast.source().map(String::from);
        let mut ast = self.engine.optimize_ast(&Scope::new(), ast, rhai::OptimizationLevel::Simple);
        if let Some(s) = source {
            ast.set_source(s);
        }
        ast
    }

    /// Run a recipe file with `--set NAME=value` overrides of its top-level constants.
    pub fn run_file(&self, path: &Path, overrides: &[(String, String)]) -> Result<()> {
        let ast = self.compile_file(path)?;
        let ast = apply_overrides(ast, overrides).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        self.allow_literals_of(&ast);
        let _active = self.enter();
        let ast = self.optimize(ast);
        let mut scope = Scope::new();
        self.engine
            .run_ast_with_scope(&mut scope, &ast)
            .map_err(|e| anyhow::anyhow!(format_error(&path.display().to_string(), &e)))
    }

    /// Statically validate a recipe: syntax, overrides, and every literal config map.
    pub fn check_file(&self, path: &Path, overrides: &[(String, String)]) -> Result<CheckReport> {
        let ast = self.compile_file(path)?;
        let ast = apply_overrides(ast, overrides).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let name = path.display().to_string();
        let mut report = CheckReport::default();
        let mut errors = Vec::new();
        let mut visit = |nodes: &[rhai::ASTNode]| {
            if let Some(rhai::ASTNode::Expr(expr)) = nodes.last() {
                if let rhai::Expr::FnCall(call, _) | rhai::Expr::MethodCall(call, _) = expr {
                    if let Some(schema) = config::schema_for_call(&call.name) {
                        if let Some(rhai::Expr::Map(map, _)) = call.args.last() {
                            report.maps_checked += 1;
                            for (ident, value) in map.0.iter() {
                                if let Err(msg) = schema.check_literal(&ident.name, literal_of(value).as_ref()) {
                                    errors.push(format!("{}: {msg}", locate(&name, ident.pos)));
                                }
                                // A map value with its own schema (`gradient_checkpointing_kwargs`).
                                if let (Some(inner), rhai::Expr::Map(m, _)) = (schema.nested(&ident.name), value) {
                                    for (k, v) in m.0.iter() {
                                        if let Err(msg) = inner.check_literal(&k.name, literal_of(v).as_ref()) {
                                            errors.push(format!("{}: {}: {msg}", locate(&name, k.pos), schema.name));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            true
        };
        ast.walk(&mut visit);
        if !errors.is_empty() {
            bail!(errors.join("\n"));
        }
        report.constants = top_level_constants(&ast).into_iter().map(|(n, _)| n).collect();
        if let Some(p) = &self.policy {
            p.add_literals(string_literals(&ast));
            report.accesses = access::accesses(&ast, p);
        }
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub maps_checked: usize,
    pub constants: Vec<String>,
    /// What the recipe reads, writes and fetches, judged by the host's permissions.
    pub accesses: Vec<access::Access>,
}

fn literal_of(e: &rhai::Expr) -> Option<config::Literal> {
    use config::Literal as L;
    use rhai::Expr as E;
    Some(match e {
        E::IntegerConstant(..) => L::Int,
        E::FloatConstant(..) => L::Float,
        E::BoolConstant(..) => L::Bool,
        E::StringConstant(s, _) => L::Str(s.to_string()),
        E::Array(items, _) => L::Array(items.iter().map(|i| literal_of(i).unwrap_or(L::Unit)).collect()),
        E::Map(..) => L::Map,
        E::Unit(..) => L::Unit,
        E::DynamicConstant(d, _) => {
            if d.is_int() {
                L::Int
            } else if d.is_float() {
                L::Float
            } else if d.is_bool() {
                L::Bool
            } else if d.is_string() {
                L::Str(d.to_string())
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

fn locate(file: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        (Some(l), None) => format!("{file}:{l}"),
        _ => file.to_string(),
    }
}

/// `file:LINE:COL: message` for a runtime error. Errors inside script functions of the same
/// file point at the failing line; errors inside stdlib modules point at the recipe's call and
/// name the module line too.
pub fn format_error(file: &str, err: &EvalAltResult) -> String {
    let outer_pos = err.position();
    let mut e = err;
    let mut src: Option<String> = None;
    loop {
        match e {
            EvalAltResult::ErrorInFunctionCall(_, s, inner, _) => {
                if !s.is_empty() {
                    src = Some(s.to_string());
                }
                e = inner;
            }
            EvalAltResult::ErrorInModule(path, inner, _) => {
                src = Some(format!("module {path}"));
                e = inner;
            }
            _ => break,
        }
    }
    let msg = message_of(e);
    let inner_pos = e.position();
    match src {
        Some(s) if s != file => format!("{}: {msg} (in {})", locate(file, outer_pos), locate(&s, inner_pos)),
        _ => {
            let pos = if inner_pos.is_none() { outer_pos } else { inner_pos };
            format!("{}: {msg}", locate(file, pos))
        }
    }
}

/// The error text without Rhai's own "(line x, position y)" suffix.
fn message_of(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorRuntime(d, _) => d.to_string(),
        EvalAltResult::ErrorTerminated(d, _) => d.to_string(),
        EvalAltResult::ErrorParsing(p, _) => format!("syntax error: {p}"),
        EvalAltResult::ErrorStackOverflow(_) => "too many nested function calls (limit 64): runaway recursion?".into(),
        other => {
            let s = other.to_string();
            match s.rfind(" (line ") {
                Some(i) if s.ends_with(')') => s[..i].to_string(),
                _ => s,
            }
        }
    }
}

fn top_level_constants(ast: &AST) -> Vec<(String, Option<config::Literal>)> {
    ast.statements()
        .iter()
        .filter_map(|s| match s {
            rhai::Stmt::Var(x, flags, _) if flags.contains(rhai::ASTFlags::CONSTANT) => {
                Some((x.0.name.to_string(), literal_of(&x.1)))
            }
            _ => None,
        })
        .collect()
}

/// Replace the value of top-level `const NAME = ...;` for each `NAME=value` override. The
/// value is read as the type of the recipe's literal (int, float, bool, string); for a
/// non-literal default, as int, float or bool when it parses, else as a string.
pub fn apply_overrides(ast: AST, overrides: &[(String, String)]) -> Result<AST> {
    if overrides.is_empty() {
        return Ok(ast);
    }
    let consts = top_level_constants(&ast);
    for (k, _) in overrides {
        if !consts.iter().any(|(n, _)| n == k) {
            let names: Vec<&str> = consts.iter().map(|(n, _)| n.as_str()).collect();
            let hint = crate::util::nearest(k, names.iter().copied())
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_else(|| {
                    if names.is_empty() {
                        " (the recipe declares no top-level `const`)".to_string()
                    } else {
                        format!(" (constants: {})", names.join(", "))
                    }
                });
            bail!("--set {k}: the recipe has no top-level constant `{k}`{hint}");
        }
    }
    let mut stmts: Vec<rhai::Stmt> = ast.statements().to_vec();
    for s in stmts.iter_mut() {
        if let rhai::Stmt::Var(x, flags, _) = s {
            if !flags.contains(rhai::ASTFlags::CONSTANT) {
                continue;
            }
            if let Some((_, raw)) = overrides.iter().rev().find(|(k, _)| *k == x.0.name.as_str()) {
                let value = parse_override(&x.0.name, raw, literal_of(&x.1).as_ref())?;
                let pos = x.1.position();
                x.1 = rhai::Expr::DynamicConstant(Box::new(value), pos);
            }
        }
    }
    let mut out = AST::new(stmts, ast.shared_lib().clone());
    if let Some(s) = ast.source() {
        out.set_source(s.to_string());
    }
    Ok(out)
}

fn parse_override(name: &str, raw: &str, default: Option<&config::Literal>) -> Result<Dynamic> {
    use config::Literal as L;
    let bad = |ty: &str| anyhow::anyhow!("--set {name}={raw}: `{name}` is {ty} in the recipe");
    Ok(match default {
        Some(L::Int) => Dynamic::from(raw.parse::<rhai::INT>().map_err(|_| bad("an integer"))?),
        Some(L::Float) => Dynamic::from(raw.parse::<rhai::FLOAT>().map_err(|_| bad("a number"))?),
        Some(L::Bool) => Dynamic::from(raw.parse::<bool>().map_err(|_| bad("true or false"))?),
        Some(L::Str(_)) => Dynamic::from(raw.to_string()),
        _ => {
            if let Ok(i) = raw.parse::<rhai::INT>() {
                Dynamic::from(i)
            } else if let Ok(f) = raw.parse::<rhai::FLOAT>() {
                Dynamic::from(f)
            } else if let Ok(b) = raw.parse::<bool>() {
                Dynamic::from(b)
            } else {
                Dynamic::from(raw.to_string())
            }
        }
    })
}

/// Parse `NAME=value` from the command line.
pub fn parse_set(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected NAME=value"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: empty name"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Where the REPL keeps its history.
pub fn history_path() -> PathBuf {
    dirs::data_dir().unwrap_or_else(std::env::temp_dir).join("qscript").join("history.txt")
}
