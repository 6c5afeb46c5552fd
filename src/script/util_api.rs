//! General helpers recipes need beside the ML API: JSON in and out.

use super::{rt, Api};
use rhai::Dynamic;

pub fn register(api: &mut Api) {
    api.func("to_json", "to_json(value) -> string",
        "Serialize any value (string, number, array, map) as JSON, keys in insertion order.",
        |v: Dynamic| rt(super::key_order::to_json(&v).map(|j| j.to_string())));
    // Rhai's own `to_json` of a map sorts its keys: these take precedence over it.
    api.func("to_json", "to_json(map) -> string", "A map as JSON, keys in the order the recipe wrote them.",
        |m: rhai::Map| rt(super::key_order::to_json(&Dynamic::from(m)).map(|j| j.to_string())));
    api.func("to_json", "to_json(array) -> string", "An array as JSON, maps' keys in the order the recipe wrote them.",
        |a: rhai::Array| rt(super::key_order::to_json(&Dynamic::from(a)).map(|j| j.to_string())));
    api.func("parse_json", "parse_json(text) -> value",
        "Parse JSON text (objects become maps; their key order is kept for to_json and templates).",
        |text: &str| rt(super::key_order::from_json_text(text)));
}
