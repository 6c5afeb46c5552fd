//! Maps keep the key order the recipe wrote when they go to JSON. Rhai's maps are sorted
//! (`BTreeMap`, no insertion-ordered option in Rhai 1.27), but JSON a template reads is not:
//! `tools | tojson` renders a tool schema as transformers does only in the order it was written.
//!
//! The order is taken from the source: a token hook on the engine sees every map literal
//! `#{ k1: .., k2: .. }` of every script it compiles (recipes, REPL lines, modules) and records
//! its keys in order. A map going to JSON takes the order of the literal with exactly its keys
//! (the latest compiled, when two literals have the same keys in different orders); a map with
//! keys added later takes the order of the largest literal whose keys it holds, the rest after
//! it sorted. Maps that came from JSON text (`parse_json`) record their order the same way.

use rhai::{Dynamic, Engine, Map};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// Sorted key set → the order the source wrote it in.
    static ORDERS: RefCell<HashMap<Vec<String>, Vec<String>>> = RefCell::new(HashMap::new());
}

/// Remember the order of one map's keys (two or more keys: one key has no order).
pub fn record(keys: Vec<String>) {
    if keys.len() < 2 {
        return;
    }
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != keys.len() {
        return;
    }
    ORDERS.with(|o| o.borrow_mut().insert(sorted, keys));
}

/// A map's keys in the order its source wrote them (sorted where nothing is known).
pub fn ordered_keys(map: &Map) -> Vec<String> {
    let keys: Vec<String> = map.keys().map(|k| k.to_string()).collect(); // sorted: a BTreeMap
    if keys.len() < 2 {
        return keys;
    }
    ORDERS.with(|o| {
        let o = o.borrow();
        if let Some(order) = o.get(&keys) {
            return order.clone();
        }
        // Keys added after the literal: the largest literal it contains leads.
        let best = o.iter().filter(|(set, _)| set.len() < keys.len() && set.iter().all(|k| map.contains_key(k.as_str()))).max_by_key(|(set, _)| set.len());
        match best {
            Some((_, order)) => order.iter().cloned().chain(keys.iter().filter(|k| !order.contains(k)).cloned()).collect(),
            None => keys,
        }
    })
}

/// A Rhai value as JSON, maps in their source key order (numbers, strings, arrays as serde does).
pub fn to_json(v: &Dynamic) -> anyhow::Result<Value> {
    if let Some(m) = v.read_lock::<Map>() {
        let mut out = serde_json::Map::new();
        for k in ordered_keys(&m) {
            out.insert(k.clone(), to_json(&m[k.as_str()])?);
        }
        return Ok(Value::Object(out));
    }
    if let Some(a) = v.read_lock::<rhai::Array>() {
        return a.iter().map(to_json).collect::<anyhow::Result<Vec<_>>>().map(Value::Array);
    }
    rhai::serde::from_dynamic(v).map_err(|e| anyhow::anyhow!("{e}"))
}

/// JSON text as a Rhai value, recording the key order of every object in it.
pub fn from_json_text(text: &str) -> anyhow::Result<Dynamic> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("parse_json: {e}"))?;
    record_json(&v);
    rhai::serde::to_dynamic(&v).map_err(|e| anyhow::anyhow!("parse_json: {e}"))
}

/// Record the key order of every object in a JSON value (serde_json keeps it: `preserve_order`).
pub fn record_json(v: &Value) {
    match v {
        Value::Object(o) => {
            record(o.keys().cloned().collect());
            o.values().for_each(record_json);
        }
        Value::Array(a) => a.iter().for_each(record_json),
        _ => {}
    }
}

/// What the token hook tracks: open brackets, and for a map literal the keys seen so far.
enum Open {
    Map(Vec<String>),
    Other,
}

#[derive(Default)]
struct Tracker {
    stack: Vec<Open>,
    /// The previous token's text when it could be a key (identifier or string).
    prev_key: Option<String>,
    /// Where the previous token was: a new compile starts at an earlier line.
    line: usize,
}

/// Install the hook that records map-literal key orders as the engine tokenizes a script. It
/// only observes: every token is returned unchanged.
#[allow(deprecated)] // Rhai marks on_parse_token "volatile", not deprecated.
pub fn install(engine: &mut Engine) {
    use rhai::Token;
    let tracker = RefCell::new(Tracker::default());
    engine.on_parse_token(move |token, pos, _| {
        let mut t = tracker.borrow_mut();
        let line = pos.line().unwrap_or(0);
        if line < t.line {
            *t = Tracker::default();
        }
        t.line = line;
        let key = match &token {
            Token::Identifier(s) => Some(s.to_string()),
            Token::StringConstant(s) => Some(s.to_string()),
            _ => None,
        };
        match &token {
            Token::MapStart => t.stack.push(Open::Map(Vec::new())),
            Token::LeftBrace | Token::LeftParen | Token::LeftBracket | Token::InterpolatedString(_) => t.stack.push(Open::Other),
            Token::RightBrace | Token::RightParen | Token::RightBracket => {
                if let Some(Open::Map(keys)) = t.stack.pop() {
                    record(keys);
                }
            }
            Token::Colon => {
                if let Some(k) = t.prev_key.take() {
                    if let Some(Open::Map(keys)) = t.stack.last_mut() {
                        keys.push(k);
                    }
                }
            }
            _ => {}
        }
        t.prev_key = key;
        token
    });
}
