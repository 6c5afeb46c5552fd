//! General helpers recipes need beside the ML API: JSON in and out, and printing of nested
//! values with a depth bound (a 10,000-deep array must be an error, not a stack overflow).

use super::{rt, Api, RhaiResult};
use rhai::{Array, Dynamic, EvalAltResult, ImmutableString, Map, NativeCallContext, Position};

/// Nesting deeper than this is refused when printing or serialising.
pub const MAX_NESTING: usize = 256;

/// An error when `v` nests arrays / maps deeper than [`MAX_NESTING`] (the walk stops there,
/// so its own recursion is bounded).
fn check_nesting(what: &str, v: &Dynamic) -> anyhow::Result<()> {
    fn too_deep(d: &Dynamic, depth: usize) -> bool {
        if depth > MAX_NESTING {
            return true;
        }
        if let Ok(a) = d.as_array_ref() {
            return a.iter().any(|x| too_deep(x, depth + 1));
        }
        if let Some(m) = d.read_lock::<Map>() {
            return m.values().any(|x| too_deep(x, depth + 1));
        }
        false
    }
    if too_deep(v, 1) {
        anyhow::bail!("{what}: the value is nested deeper than {MAX_NESTING} levels");
    }
    Ok(())
}

/// Longest string a recipe may build with `+` / `+=` (the memory limit bounds the rest).
pub const MAX_STRING: usize = 64 << 20;

fn joined(a: &str, b: &str) -> RhaiResult<ImmutableString> {
    if a.len() + b.len() > MAX_STRING {
        return Err(EvalAltResult::ErrorDataTooLarge(format!("Length of string ({} MiB)", MAX_STRING >> 20), Position::NONE).into());
    }
    Ok(format!("{a}{b}").into())
}

pub fn register(api: &mut Api) {
    // String growth, bounded in O(1) per operation (Rhai's own size check would walk every
    // array after every call; see `Host::new`). Needs the engine's fast operators off.
    api.engine.register_fn("+", |a: ImmutableString, b: ImmutableString| joined(&a, &b));
    api.engine.register_fn("+=", |a: &mut ImmutableString, b: ImmutableString| -> RhaiResult<()> {
        *a = joined(a, &b)?;
        Ok(())
    });
    api.engine.register_fn("+=", |a: &mut ImmutableString, c: char| -> RhaiResult<()> {
        *a = joined(a, c.encode_utf8(&mut [0; 4]))?;
        Ok(())
    });
    api.func("to_json", "to_json(value) -> string",
        "Serialize any value (string, number, array, map) as JSON, keys in insertion order.",
        |v: Dynamic| rt(check_nesting("to_json", &v).and_then(|_| super::key_order::to_json(&v).map(|j| j.to_string()))));
    // Rhai's own `to_json` of a map sorts its keys: these take precedence over it.
    api.func("to_json", "to_json(map) -> string", "A map as JSON, keys in the order the recipe wrote them.",
        |m: rhai::Map| { let v = Dynamic::from(m); rt(check_nesting("to_json", &v).and_then(|_| super::key_order::to_json(&v).map(|j| j.to_string()))) });
    api.func("to_json", "to_json(array) -> string", "An array as JSON, maps' keys in the order the recipe wrote them.",
        |a: rhai::Array| { let v = Dynamic::from(a); rt(check_nesting("to_json", &v).and_then(|_| super::key_order::to_json(&v).map(|j| j.to_string()))) });
    api.func("parse_json", "parse_json(text) -> value",
        "Parse JSON text (objects become maps; their key order is kept for to_json and templates).",
        |text: &str| rt(super::key_order::from_json_text(text)));
    // Printing of arrays and maps (`print`, `${...}`, `to_string`) as Rhai's own, bounded in depth.
    for name in ["print", "to_string", "debug", "to_debug"] {
        api.func(name, &format!("{name}(array) -> string"), "The array as Rhai prints it (nested at most 256 deep).",
            move |ctx: NativeCallContext, a: &mut Array| rt(show(&ctx, &Dynamic::from_array(a.clone()), 1, name)));
        api.func(name, &format!("{name}(map) -> string"), "The map as Rhai prints it (nested at most 256 deep).",
            move |ctx: NativeCallContext, m: &mut Map| rt(show(&ctx, &Dynamic::from_map(m.clone()), 1, name)));
    }
}

/// `v` as Rhai's `to_debug` writes it, refusing nesting deeper than [`MAX_NESTING`] (so the
/// recursion here is bounded too).
fn show(ctx: &NativeCallContext, v: &Dynamic, depth: usize, what: &str) -> anyhow::Result<String> {
    if depth > MAX_NESTING {
        anyhow::bail!("{what}: the value is nested deeper than {MAX_NESTING} levels");
    }
    if let Ok(a) = v.as_array_ref() {
        let items: Vec<String> = a.iter().map(|x| show(ctx, x, depth + 1, what)).collect::<anyhow::Result<_>>()?;
        return Ok(format!("[{}]", items.join(", ")));
    }
    if let Some(m) = v.read_lock::<Map>() {
        let items: Vec<String> = m.iter().map(|(k, x)| Ok(format!("{k:?}: {}", show(ctx, x, depth + 1, what)?))).collect::<anyhow::Result<_>>()?;
        return Ok(format!("#{{{}}}", items.join(", ")));
    }
    if let Ok(s) = v.as_immutable_string_ref() {
        return Ok(format!("{:?}", s.as_str()));
    }
    Ok(ctx.call_native_fn::<rhai::ImmutableString>("to_debug", (v.clone(),)).map(|s| s.to_string()).unwrap_or_else(|_| format!("{v:?}")))
}
