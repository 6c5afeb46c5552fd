//! The normalised dataset: every record is either a conversation or plain text, plus the
//! fields the source format did not use (kept for `filter` / `map` and written back by
//! `to_jsonl`). Rows are shared (`Arc`), so shuffling, selecting and splitting copy pointers.

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Messages(Vec<Message>),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub record: Record,
    /// Fields of the source record that the format did not consume (a `tools` list among them
    /// goes to the chat template, as trl passes a dataset's `tools` column).
    pub extra: Map<String, Value>,
    /// Per message, its fields besides role and content (OpenAI / transformers tool use:
    /// `tool_calls`, `tool_call_id`, `name`; `content: null` of a call without text). Empty when
    /// no message has any.
    pub turn_fields: Vec<Map<String, Value>>,
}

impl Row {
    pub fn messages(messages: Vec<Message>) -> Self {
        Row { record: Record::Messages(messages), extra: Map::new(), turn_fields: Vec::new() }
    }

    pub fn text(text: impl Into<String>) -> Self {
        Row { record: Record::Text(text.into()), extra: Map::new(), turn_fields: Vec::new() }
    }

    /// The normalised JSON form: `{"messages": [{role, content}...], ...extra}` or
    /// `{"text": ..., ...extra}` — what `to_jsonl` writes and Rhai sees.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        match &self.record {
            Record::Messages(_) => {
                m.insert("messages".into(), Value::Array(self.template_messages()));
            }
            Record::Text(t) => {
                m.insert("text".into(), Value::String(t.clone()));
            }
        }
        for (k, v) in &self.extra {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(m)
    }

    /// The messages as the chat template gets them: role, content and each message's own fields.
    pub fn template_messages(&self) -> Vec<Value> {
        let Record::Messages(msgs) = &self.record else { return Vec::new() };
        let mut out = Self::messages_json(msgs);
        for (m, fields) in out.iter_mut().zip(&self.turn_fields) {
            if let Value::Object(o) = m {
                o.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        out
    }

    /// The template variables of this record beside its messages: `tools`, when it has them.
    pub fn template_vars(&self) -> Map<String, Value> {
        self.extra.iter().filter(|(k, v)| *k == "tools" && v.is_array()).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Whether message `i` calls tools.
    pub fn has_tool_calls(&self, i: usize) -> bool {
        self.turn_fields.get(i).and_then(|f| f.get("tool_calls")).is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
    }

    /// Messages as the chat template expects them.
    pub fn messages_json(msgs: &[Message]) -> Vec<Value> {
        msgs.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub rows: Vec<Arc<Row>>,
}

impl Dataset {
    pub fn new(rows: Vec<Row>) -> Self {
        Dataset { rows: rows.into_iter().map(Arc::new).collect() }
    }

    /// Records from JSON objects in any supported format (auto-detected per record).
    pub fn from_values(values: &[Value]) -> Result<Self> {
        let mut rows = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let row = super::load::parse_record(v, None).map_err(|e| anyhow::anyhow!("record {i}: {}", e.msg))?;
            rows.push(row);
        }
        Ok(Dataset::new(rows))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Row> {
        self.rows.get(i).map(|r| r.as_ref())
    }

    /// A permutation from the seed (rand's StdRng: the same seed gives the same order).
    pub fn shuffle(&self, seed: u64) -> Self {
        let mut rows = self.rows.clone();
        rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        Dataset { rows }
    }

    /// The rows at `indices`, in that order (repeats allowed).
    pub fn select(&self, indices: &[usize]) -> Result<Self> {
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            match self.rows.get(i) {
                Some(r) => rows.push(r.clone()),
                None => bail!("select: index {i} is out of range for {} records", self.len()),
            }
        }
        Ok(Dataset { rows })
    }

    pub fn concat(&self, other: &Dataset) -> Self {
        Dataset { rows: self.rows.iter().chain(&other.rows).cloned().collect() }
    }

    /// `(train, test)` with `test_size` records in test (transformers' split: shuffle with the
    /// seed first, test = the first `test_size` of the permutation).
    pub fn train_test_split(&self, test_size: usize, seed: u64, shuffle: bool) -> Result<(Self, Self)> {
        let n = self.len();
        if test_size == 0 || test_size >= n {
            bail!("train_test_split: a test set of {test_size} of {n} records leaves one side empty");
        }
        let mut rows = self.rows.clone();
        if shuffle {
            rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        }
        let train = rows.split_off(test_size);
        Ok((Dataset { rows: train }, Dataset { rows }))
    }

    /// JSON Lines in the normalised form, written atomically.
    pub fn to_jsonl(&self, path: &Path) -> Result<()> {
        let mut out = Vec::new();
        for r in &self.rows {
            serde_json::to_writer(&mut out, &r.to_json())?;
            out.push(b'\n');
        }
        crate::util::fs::write(path, &out)
    }

    /// trl's `dataset_text_field`: rows that carry `field` (a string) become text records of it;
    /// `"text"` is what loading already reads. An error when no row carries the field.
    pub fn with_text_field(&self, field: &str) -> Result<Self> {
        if field == "text" {
            return Ok(self.clone());
        }
        let mut found = false;
        let rows = self
            .rows
            .iter()
            .map(|r| match r.extra.get(field) {
                Some(Value::String(t)) => {
                    found = true;
                    let mut extra = r.extra.clone();
                    extra.remove(field);
                    Arc::new(Row { record: Record::Text(t.clone()), extra, turn_fields: Vec::new() })
                }
                _ => r.clone(),
            })
            .collect();
        if !found {
            bail!("dataset_text_field \"{field}\": no record has a string field `{field}`");
        }
        Ok(Dataset { rows })
    }

    /// How many records are conversations and how many plain text.
    pub fn kinds(&self) -> (usize, usize) {
        let conv = self.rows.iter().filter(|r| matches!(r.record, Record::Messages(_))).count();
        (conv, self.len() - conv)
    }
}
