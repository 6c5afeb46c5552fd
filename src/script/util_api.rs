//! General helpers recipes need beside the ML API: JSON in and out.

use super::{rt, Api};
use rhai::Dynamic;

pub fn register(api: &mut Api) {
    api.func("to_json", "to_json(value) -> string",
        "Serialize any value (string, number, array, map) as JSON, keys in insertion order.",
        |v: Dynamic| rt(serde_json::to_string(&v).map_err(anyhow::Error::from)));
}
