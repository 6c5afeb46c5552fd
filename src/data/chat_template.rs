//! Chat templates: the Jinja template of tokenizer_config.json rendered with minijinja so the
//! output equals transformers' `apply_chat_template`.
//!
//! transformers renders with `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
//! extensions=[AssistantTracker, loopcontrols])`, its own `tojson` filter (`json.dumps` with
//! `ensure_ascii=False`), and the globals `raise_exception` / `strftime_now`. The environment
//! below mirrors that, plus the Python behaviours templates rely on (str methods, `trim` and
//! `strip` with Python's whitespace set, Python `repr` when a list / dict / float is printed).

use anyhow::{anyhow, Result};
use minijinja::value::{from_args, Kwargs, Rest, Value as JValue, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State};
use serde_json::Value;
use std::fmt::Write as _;

const NAME: &str = "chat_template";
/// Instructions one render may run (minijinja fuel).
pub const TEMPLATE_FUEL: u64 = 5_000_000;

pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compile-check the template (syntax errors are reported here, with the template line).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = environment();
        env.add_template_owned(NAME, rewrite_generation_tags(source))
            .map_err(|e| anyhow!(describe(&e, source)))?;
        Ok(Self { source: source.to_string(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), env })
    }

    /// Render `messages` (array of `{role, content, ...}` objects). `extra` holds further
    /// template variables (`tools`, `date_string`, ...), as transformers' `**kwargs`.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool, extra: &serde_json::Map<String, Value>) -> Result<String> {
        for key in ["messages", "add_generation_prompt"] {
            anyhow::ensure!(!extra.contains_key(key), "chat template: `{key}` cannot be passed as an extra variable");
        }
        // transformers always passes `tools` and `documents` (None when absent), then the
        // special tokens, then the caller's kwargs (which win).
        let mut ctx: Vec<(String, JValue)> = vec![
            ("messages".into(), JValue::from_serialize(messages)),
            ("add_generation_prompt".into(), JValue::from(add_generation_prompt)),
            ("tools".into(), JValue::from(())),
            ("documents".into(), JValue::from(())),
            ("bos_token".into(), JValue::from(self.bos_token.as_str())),
            ("eos_token".into(), JValue::from(self.eos_token.as_str())),
        ];
        for (k, v) in extra {
            ctx.retain(|(name, _)| name != k);
            ctx.push((k.clone(), JValue::from_serialize(v)));
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| anyhow!(describe(&e, &self.source)))?;
        tmpl.render(ctx.into_iter().collect::<JValue>()).map_err(|e| anyhow!(describe(&e, &self.source)))
    }
}

impl ChatTemplate {
    /// A model's chat template with its tokenizer's bos/eos strings; `None` when the model has
    /// no tokenizer or no template.
    pub fn of_model(model: &crate::model::Model) -> Result<Option<Self>> {
        let Some(tok) = &model.tokenizer else { return Ok(None) };
        let Some(src) = &tok.chat_template else { return Ok(None) };
        Self::new(src, tok.bos_token.as_deref().unwrap_or(""), tok.eos_token.as_deref().unwrap_or("")).map(Some)
    }
}

/// The error `raise_exception(msg)` throws; found again in the error chain to report `msg`.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn describe(err: &Error, source: &str) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(r) = e.downcast_ref::<Raised>() {
            return format!("chat template raised an exception: {}", r.0);
        }
        cause = e.source();
    }
    if err.kind() == ErrorKind::OutOfFuel {
        return format!("chat template stopped: more than {TEMPLATE_FUEL} instructions in one render (a runaway loop?)");
    }
    let detail = err.detail().map(str::to_string).unwrap_or_else(|| err.kind().to_string());
    let what = if err.kind() == ErrorKind::SyntaxError { "syntax error" } else { "error" };
    match err.line() {
        Some(n) => {
            let text = source.lines().nth(n.saturating_sub(1)).unwrap_or("").trim();
            format!("chat template {what} at line {n}: {detail} (`{text}`)")
        }
        None => format!("chat template {what}: {detail}"),
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // A template is code from a model's files: one render runs at most this many
    // instructions (a real chat template uses a few hundred per message), so a loop in it
    // ends with an error instead of running inside one Rhai operation.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(py_methods);
    env.set_formatter(py_formatter);
    env.add_filter("tojson", tojson);
    env.add_filter("trim", |v: JValue, chars: Option<String>| py_strip(&as_text(&v), chars.as_deref(), true, true));
    env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
        let mut s = String::new();
        write!(s, "{}", chrono::Local::now().format(&fmt))
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {fmt:?}")))?;
        Ok(s)
    });
    env
}

/// AssistantTracker's `{% generation %}` … `{% endgeneration %}` only marks assistant spans for
/// masks; rendering ignores it, so it becomes an always-true `if` (same lines, same whitespace
/// control).
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        // The closing `%}` after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 4) else { break };
        let inner = &tag[2..end - 2];
        let (l, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, r) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => write!(out, "{{%{l} if true {r}%}}").unwrap(),
            "endgeneration" => write!(out, "{{%{l} endif {r}%}}").unwrap(),
            _ => out.push_str(&tag[..end]),
        }
        rest = &tag[end..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Python compatibility

/// `str.isspace()`: Unicode White_Space plus the ASCII separators 0x1c..0x1f.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// `str.strip/lstrip/rstrip(chars)`.
fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let f = |c: char| match chars {
        Some(set) => set.contains(c),
        None => py_space(c),
    };
    let s = if left { s.trim_start_matches(f) } else { s };
    let s = if right { s.trim_end_matches(f) } else { s };
    s.to_string()
}

/// `str(v)`.
fn as_text(v: &JValue) -> String {
    match v.as_str() {
        Some(s) => s.to_string(),
        None => py_str(v),
    }
}

/// Python methods on values (`.strip()`, `.startswith()`, `.items()`, ...): minijinja-contrib's
/// pycompat, with strip variants using Python's whitespace set.
fn py_methods(state: &State, value: &JValue, method: &str, args: &[JValue]) -> Result<JValue, Error> {
    if let (Some(s), "strip" | "lstrip" | "rstrip") = (value.as_str(), method) {
        let (chars,): (Option<String>,) = from_args(args)?;
        let (l, r) = (method != "rstrip", method != "lstrip");
        return Ok(JValue::from(py_strip(s, chars.as_deref(), l, r)));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `{{ x }}` prints `str(x)` in Python: lists and dicts as their repr, floats as repr.
fn py_formatter(out: &mut Output, state: &State, value: &JValue) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Seq | ValueKind::Map | ValueKind::Number => {
            out.write_str(&py_str(value)).map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed"))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

fn py_str(v: &JValue) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => {
            let mut s = String::new();
            py_repr(v, &mut s);
            s
        }
    }
}

fn py_repr(v: &JValue, out: &mut String) {
    match v.kind() {
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Number if !v.is_integer() => match f64::try_from(v.clone()) {
            Ok(f) => out.push_str(&py_float(f)),
            Err(_) => write!(out, "{v}").unwrap(),
        },
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out);
                out.push_str(": ");
                py_repr(&v.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => write!(out, "{v}").unwrap(),
    }
}

/// `repr(str)`: single quotes unless the text has `'` and no `"`.
fn py_repr_str(s: &str, out: &mut String) {
    let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => write!(out, "\\x{:02x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push(q);
}

/// `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f < 0.0 { "-inf".into() } else { "inf".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    if f != 0.0 && !(-4..16).contains(&exp) {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        let s = f.to_string();
        if s.contains('.') { s } else { s + ".0" }
    }
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
/// = `json.dumps` with those arguments (Python spacing `", "` / `": "`, key order kept).
fn tojson(value: JValue, args: Rest<JValue>) -> Result<String, Error> {
    type Opt = Option<JValue>;
    let (ensure_ascii, indent, separators, sort_keys, kwargs): (Opt, Opt, Opt, Opt, Kwargs) = from_args(&args)?;
    let arg = |pos: Option<JValue>, name: &str| -> Result<JValue, Error> {
        Ok(kwargs.get::<Option<JValue>>(name)?.or(pos).unwrap_or(JValue::from(())))
    };
    let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?.is_true();
    let indent = arg(indent, "indent")?;
    let separators = arg(separators, "separators")?;
    let sort_keys = arg(sort_keys, "sort_keys")?.is_true();
    kwargs.assert_all_used()?;
    let bad = |msg: String| Error::new(ErrorKind::InvalidOperation, msg);
    if value.is_undefined() {
        return Err(bad("tojson: Object of type Undefined is not JSON serializable".into()));
    }
    let indent: Option<String> = match indent.kind() {
        ValueKind::None | ValueKind::Undefined => None,
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        _ => Some(" ".repeat(indent.as_i64().ok_or_else(|| bad(format!("tojson: bad indent {indent}")))?.max(0) as usize)),
    };
    let (item_sep, key_sep) = match separators.kind() {
        ValueKind::None | ValueKind::Undefined => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
        _ => {
            let parts: Vec<String> = separators.try_iter()?.map(|v| as_text(&v)).collect();
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => (a, b),
                Err(_) => return Err(bad("tojson: separators must be an (item, key) pair".into())),
            }
        }
    };
    let json = serde_json::to_value(&value).map_err(|e| bad(format!("tojson: {e}")))?;
    let opts = JsonOpts { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    dump(&json, &opts, 0, &mut out);
    Ok(out)
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's `json.dumps` encoder over a serde_json value.
fn dump(v: &Value, o: &JsonOpts, level: usize, out: &mut String) {
    // Opening newline + indentation of the items, and the closing one.
    let open = |out: &mut String, lvl: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..lvl {
                out.push_str(ind);
            }
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => write!(out, "{i}").unwrap(),
            (_, Some(u), _) => write!(out, "{u}").unwrap(),
            (_, _, Some(f)) if f.is_nan() => out.push_str("NaN"),
            (_, _, Some(f)) if f.is_infinite() => out.push_str(if f < 0.0 { "-Infinity" } else { "Infinity" }),
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => write!(out, "{n}").unwrap(),
        },
        Value::String(s) => json_str(s, o.ensure_ascii, out),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                open(out, level + 1);
                dump(item, o, level + 1, out);
            }
            open(out, level);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                open(out, level + 1);
                json_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(val, o, level + 1, out);
            }
            open(out, level);
            out.push('}');
        }
    }
}

/// Python's JSON string escaping (lowercase `\u00xx`; with `ensure_ascii`, non-ASCII as
/// UTF-16 escapes).
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    write!(out, "\\u{unit:04x}").unwrap();
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: in `{%}` the closing `%}` overlaps the opening `{%` (a slice panic).
    #[test]
    fn overlapping_tag_delimiters_are_a_syntax_error_not_a_panic() {
        let e = ChatTemplate::new("{%} generation {{ x }}", "<s>", "</s>").err().expect("a syntax error");
        assert!(e.to_string().starts_with("chat template syntax error"), "{e}");
        assert_eq!(rewrite_generation_tags("a{% generation %}b{%- endgeneration +%}"), "a{% if true %}b{%- endif +%}");
    }
}
