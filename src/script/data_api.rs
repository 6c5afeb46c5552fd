//! `load_dataset`, the `Dataset` and `TokenizedDataset` types. Converts and forwards; the work
//! happens in `crate::data`.

use super::config::{self, Cfg};
use super::model_api::ModelHandle;
use super::{rt, Api, RhaiResult};
use crate::data::tokenize::{tokenize_example, ChatTokenizer};
use crate::data::{
    load_dataset, BatchIterator, BatchOptions, Dataset, Format, LoadOptions, OnError, Row, TokenizeOptions, TokenizedDataset,
    Truncation,
};
use anyhow::{anyhow, bail, Result};
use rhai::{Array, Dynamic, FnPtr, Map, NativeCallContext, FLOAT, INT};
use std::io::IsTerminal;
use std::rc::Rc;
use std::sync::Arc;

/// A dataset shared between script variables; every operation returns a new one.
#[derive(Clone)]
pub struct DatasetHandle(pub Rc<Dataset>);

/// `dataset.tokenized(model)`: token ids + labels, ready for batching.
#[derive(Clone)]
pub struct TokenizedHandle(pub Arc<TokenizedDataset>);

fn quiet() -> bool {
    std::env::var_os("QSCRIPT_QUIET").is_some()
}

fn msg(e: String) -> anyhow::Error {
    anyhow::Error::msg(e)
}

fn handle(ds: Dataset) -> DatasetHandle {
    DatasetHandle(Rc::new(ds))
}

pub fn load(spec: &str, opts: &Map) -> Result<DatasetHandle> {
    let cfg = config::LOAD_DATASET.check(opts).map_err(msg)?;
    let lo = LoadOptions {
        format: cfg.str("format").map(|f| Format::parse(&f)).transpose()?,
        on_error: if cfg.str("on_error").as_deref() == Some("skip") { OnError::Skip } else { OnError::Raise },
        split: cfg.str("split"),
        columns: columns(cfg.get("columns"))?,
    };
    let (ds, report) = load_dataset(spec, &lo)?;
    if !quiet() {
        eprintln!("{}", report.summary());
    }
    Ok(handle(ds))
}

/// `columns: #{ prompt: "question" }`: the standard name and the dataset's, in pairs.
fn columns(v: Option<&Dynamic>) -> Result<Vec<(String, String)>> {
    let Some(m) = v.and_then(|v| v.clone().try_cast::<Map>()) else { return Ok(Vec::new()) };
    const NAMES: &[&str] = &["messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion", "text", "tools"];
    m.into_iter()
        .map(|(k, v)| {
            if !NAMES.contains(&k.as_str()) {
                let hint = crate::util::nearest(&k, NAMES.iter().copied()).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
                bail!("load_dataset columns: `{k}` is not a field qscript reads ({}){hint}", NAMES.join(", "));
            }
            let theirs = v.into_string().map_err(|t| anyhow!("load_dataset columns: `{k}` must name the dataset's field as a string, got {t}"))?;
            Ok((k.to_string(), theirs))
        })
        .collect()
}

fn row_to_dynamic(row: &Row) -> Dynamic {
    let j = row.to_json();
    // A row that goes back through `map` keeps its fields' order (tool schemas, tool calls).
    super::key_order::record_json(&j);
    rhai::serde::to_dynamic(j).unwrap_or(Dynamic::UNIT)
}

fn dynamic_to_row(v: &Dynamic) -> Result<Row> {
    let j = super::key_order::to_json(v)?;
    crate::data::load::parse_record(&j, None).map_err(|e| anyhow!(e.msg))
}

fn from_list(items: &Array) -> Result<DatasetHandle> {
    let mut rows = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        rows.push(dynamic_to_row(v).map_err(|e| anyhow!("Dataset: record {i}: {e}"))?);
    }
    Ok(handle(Dataset::new(rows)))
}

/// A Rhai index (negative counts from the end) as a position.
fn index(len: usize, i: INT) -> Result<usize> {
    let j = if i < 0 { len as INT + i } else { i };
    if j < 0 || j >= len as INT {
        bail!("index {i} is out of range for {len} records");
    }
    Ok(j as usize)
}

fn select_range(ds: &DatasetHandle, start: INT, end: INT) -> Result<DatasetHandle> {
    let n = ds.0.len() as INT;
    if start < 0 || end > n || start > end {
        bail!("select: range {start}..{end} is out of bounds for {n} records");
    }
    Ok(handle(ds.0.select(&(start as usize..end as usize).collect::<Vec<_>>())?))
}

fn select_array(ds: &DatasetHandle, idx: &Array) -> Result<DatasetHandle> {
    let mut out = Vec::with_capacity(idx.len());
    for v in idx {
        let i = v.as_int().map_err(|_| anyhow!("select: indices must be integers, got {}", v.type_name()))?;
        out.push(index(ds.0.len(), i).map_err(|e| anyhow!("select: {e}"))?);
    }
    Ok(handle(ds.0.select(&out)?))
}

fn filter(ctx: &NativeCallContext, ds: &DatasetHandle, f: &FnPtr) -> RhaiResult<DatasetHandle> {
    let mut keep = Vec::new();
    for (i, row) in ds.0.rows.iter().enumerate() {
        let r: Dynamic = f.call_within_context(ctx, (row_to_dynamic(row),))?;
        match r.as_bool() {
            Ok(true) => keep.push(row.clone()),
            Ok(false) => {}
            Err(t) => return rt(Err(anyhow!("filter: the function must return true or false, got {t} for record {i}"))),
        }
    }
    Ok(handle(Dataset { rows: keep }))
}

fn map(ctx: &NativeCallContext, ds: &DatasetHandle, f: &FnPtr) -> RhaiResult<DatasetHandle> {
    let mut rows = Vec::with_capacity(ds.0.len());
    for (i, row) in ds.0.rows.iter().enumerate() {
        let r: Dynamic = f.call_within_context(ctx, (row_to_dynamic(row),))?;
        rows.push(rt(dynamic_to_row(&r).map_err(|e| anyhow!("map: record {i}: {e}")))?);
    }
    Ok(handle(Dataset::new(rows)))
}

fn split(ds: &DatasetHandle, test: Dynamic, opts: &Map) -> Result<Map> {
    let cfg = config::TRAIN_TEST_SPLIT.check(opts).map_err(msg)?;
    let n = ds.0.len();
    let test_size = if let Ok(f) = test.as_float() {
        if !(f > 0.0 && f < 1.0) {
            bail!("train_test_split: the test fraction must be between 0 and 1, got {f}");
        }
        (f * n as f64).ceil() as usize
    } else if let Ok(k) = test.as_int() {
        if k < 1 {
            bail!("train_test_split: the test size must be at least 1, got {k}");
        }
        k as usize
    } else {
        bail!("train_test_split: expected a fraction (0.1) or a count (100), got {}", test.type_name());
    };
    let seed = cfg.int("seed").unwrap_or(42) as u64;
    let (train, test) = ds.0.train_test_split(test_size, seed, cfg.bool("shuffle").unwrap_or(true))?;
    let mut m = Map::new();
    m.insert("train".into(), Dynamic::from(handle(train)));
    m.insert("test".into(), Dynamic::from(handle(test)));
    Ok(m)
}

fn max_len(cfg: &Cfg, default: Option<usize>) -> Result<Option<usize>> {
    Ok(match cfg.usize("max_seq_length").map_err(msg)? {
        Some(0) => bail!("max_seq_length must be at least 1"),
        Some(n) => Some(n),
        None => default,
    })
}

fn tokenized(ds: &DatasetHandle, model: &ModelHandle, opts: &Map) -> Result<TokenizedHandle> {
    let cfg = config::DATA_TOKENIZE.check(opts).map_err(msg)?;
    let to = TokenizeOptions {
        max_seq_length: max_len(&cfg, TokenizeOptions::default().max_seq_length)?,
        train_on_inputs: cfg.bool("train_on_inputs").unwrap_or(false),
        truncation: if cfg.str("truncation").as_deref() == Some("drop") { Truncation::Drop } else { Truncation::Truncate },
    };
    let m = model.get()?;
    let ct = ChatTokenizer::for_model(&m)?;
    let t = crate::data::tokenize_dataset(&ds.0, &ct, &to)?;
    if !quiet() {
        eprintln!("{}", t.report.summary());
        crate::train::logging::print_lints(None, &t.report.lints);
    }
    Ok(TokenizedHandle(Arc::new(t)))
}

fn stats(ds: &DatasetHandle, model: &ModelHandle, opts: &Map) -> Result<Map> {
    let cfg = config::DATA_STATS.check(opts).map_err(msg)?;
    let max = max_len(&cfg, TokenizeOptions::default().max_seq_length)?;
    let m = model.get()?;
    let ct = ChatTokenizer::for_model(&m)?;
    let s = crate::data::stats(&ds.0, &ct, max, cfg.bool("train_on_inputs").unwrap_or(false))?;
    let mut out = Map::new();
    let int = |v: usize| Dynamic::from(v as INT);
    for (k, v) in [
        ("count", s.count),
        ("tokens", s.tokens),
        ("trained_tokens", s.trained_tokens),
        ("min", s.min),
        ("p50", s.p50),
        ("p90", s.p90),
        ("p95", s.p95),
        ("p99", s.p99),
        ("max", s.max),
        ("over_max_seq_length", s.over_max_seq_length),
        ("untrained", s.untrained),
    ] {
        out.insert(k.into(), int(v));
    }
    out.insert("mean".into(), Dynamic::from(s.mean as FLOAT));
    out.insert("max_seq_length".into(), s.max_seq_length.map(int).unwrap_or(Dynamic::UNIT));
    Ok(out)
}

fn preview(ds: &DatasetHandle, model: &ModelHandle, i: INT, opts: &Map) -> Result<String> {
    let cfg = config::DATA_PREVIEW.check(opts).map_err(msg)?;
    let i = index(ds.0.len(), i).map_err(|e| anyhow!("preview: {e}"))?;
    let m = model.get()?;
    let ct = ChatTokenizer::for_model(&m)?;
    let mut ex = tokenize_example(&ds.0.rows[i], &ct, cfg.bool("train_on_inputs").unwrap_or(false))
        .map_err(|e| anyhow!("example {i}: {e:#}"))?;
    ex.index = i;
    if let Some(max) = max_len(&cfg, None)?.filter(|&m| ex.len() > m) {
        ex.truncated_from = Some(ex.len());
        ex.input_ids.truncate(max);
        ex.trained.truncate(max);
    }
    let color = cfg.bool("color").unwrap_or_else(|| std::io::stdout().is_terminal());
    crate::data::preview(&ex, m.tokenizer()?, color)
}

fn ints<T: Copy + Into<i64>>(v: &[T]) -> Dynamic {
    Dynamic::from(v.iter().map(|&x| Dynamic::from(x.into() as INT)).collect::<Array>())
}

/// `#{input_ids, labels, attention_mask, position_ids, segment_ids}` as arrays of rows.
fn batch_to_map(b: &crate::data::Batch) -> Map {
    let rows = |f: &dyn Fn(usize) -> Dynamic| Dynamic::from((0..b.batch).map(f).collect::<Array>());
    let r = |i: usize| i * b.seq..(i + 1) * b.seq;
    let mut m = Map::new();
    m.insert("input_ids".into(), rows(&|i| ints(&b.input_ids[r(i)])));
    m.insert("labels".into(), rows(&|i| ints(&b.labels[r(i)])));
    m.insert("attention_mask".into(), rows(&|i| ints(&b.attention_mask[r(i)])));
    m.insert("position_ids".into(), rows(&|i| ints(&b.position_ids[r(i)])));
    m.insert("segment_ids".into(), rows(&|i| ints(&b.segment_ids[r(i)])));
    m.insert("examples".into(), rows(&|i| Dynamic::from(b.examples[i].iter().map(|&x| Dynamic::from(x as INT)).collect::<Array>())));
    m
}

fn batches(t: &TokenizedHandle, opts: &Map) -> Result<Array> {
    let cfg = config::DATA_BATCHES.check(opts).map_err(msg)?;
    let d = BatchOptions::default();
    let bo = BatchOptions {
        batch_size: cfg.usize("batch_size").map_err(msg)?.unwrap_or(d.batch_size),
        seed: cfg.int("seed").map_or(d.seed, |s| s as u64),
        shuffle: cfg.bool("shuffle").unwrap_or(d.shuffle),
        packing: cfg.bool("packing").unwrap_or(d.packing),
        max_seq_length: max_len(&cfg, None)?,
        group_by_length: cfg.bool("group_by_length").unwrap_or(d.group_by_length),
        drop_last: cfg.bool("drop_last").unwrap_or(d.drop_last),
    };
    let epoch = cfg.usize("epoch").map_err(msg)?.unwrap_or(0);
    let it = BatchIterator::new(t.0.clone(), bo)?;
    Ok(it.epoch(epoch).iter().map(|b| Dynamic::from(batch_to_map(b))).collect())
}

/// `Dataset(206 conversations; other fields: category, id)`: the size, what the records are, and
/// the source fields no format consumed (what `filter` / `map` also see).
fn describe(ds: &Dataset) -> String {
    let (conv, text) = ds.kinds();
    let what = match (conv, text) {
        (_, 0) => format!("{conv} conversations"),
        (0, _) => format!("{text} texts"),
        _ => format!("{} records: {conv} conversations, {text} texts", ds.len()),
    };
    let fields: std::collections::BTreeSet<&str> = ds.rows.iter().flat_map(|r| r.extra.keys().map(String::as_str)).collect();
    let mut names: Vec<&str> = fields.iter().copied().take(8).collect();
    if fields.len() > names.len() {
        names.push("...");
    }
    let other = if names.is_empty() { String::new() } else { format!("; other fields: {}", names.join(", ")) };
    format!("Dataset({what}{other})")
}

pub fn register(api: &mut Api) {
    api.engine.register_type_with_name::<DatasetHandle>("Dataset");
    api.engine.register_type_with_name::<TokenizedHandle>("TokenizedDataset");

    api.func("load_dataset", "load_dataset(path_or_glob) -> Dataset",
        "Load records from a .jsonl / .json / .csv / .tsv file, a directory of them, or a glob. Formats are detected per file: \
         conversations (ShareGPT from/value), messages (role/content), alpaca (instruction/input/output), prompt_completion, text.",
        |spec: &str| rt(load(spec, &Map::new())));
    api.func("load_dataset", "load_dataset(path_or_glob, #{format, on_error, split}) -> Dataset",
        "Load with options: format forces a record format; on_error \"raise\" (default) | \"skip\" (bad records are counted and reported); \
         split picks the array of a JSON object holding several.",
        |spec: &str, opts: Map| rt(load(spec, &opts)));
    api.func("Dataset", "Dataset(records) -> Dataset",
        "A dataset from an array of maps in any supported format (datasets' Dataset.from_list).",
        |items: Array| rt(from_list(&items)));

    api.func("len", "dataset.len() -> int", "Number of records.", |ds: &mut DatasetHandle| ds.0.len() as INT);
    api.engine.register_indexer_get(|ds: &mut DatasetHandle, i: INT| -> RhaiResult<Map> {
        let i = rt(index(ds.0.len(), i))?;
        Ok(row_to_dynamic(&ds.0.rows[i]).try_cast::<Map>().unwrap_or_default())
    });
    api.docs.push(super::FnDoc {
        name: "index".into(),
        signature: "dataset[index] -> map".into(),
        doc: "Record `index` (negative counts from the end) as #{messages: [#{role, content}], ...} or #{text, ...}.".into(),
    });
    api.func("shuffle", "dataset.shuffle(seed) -> Dataset", "The records in a random order fixed by the seed.",
        |ds: &mut DatasetHandle, seed: INT| handle(ds.0.shuffle(seed as u64)));
    api.func("select", "dataset.select(range) -> Dataset", "The records in a range, e.g. ds.select(0..100).",
        |ds: &mut DatasetHandle, r: std::ops::Range<INT>| rt(select_range(ds, r.start, r.end)));
    api.func("select", "dataset.select(start..=end) -> Dataset", "The records in an inclusive range.",
        |ds: &mut DatasetHandle, r: std::ops::RangeInclusive<INT>| rt(select_range(ds, *r.start(), r.end().saturating_add(1))));
    api.func("select", "dataset.select(indices) -> Dataset", "The records at these indices, in this order.",
        |ds: &mut DatasetHandle, idx: Array| rt(select_array(ds, &idx)));
    api.func("filter", "dataset.filter(|record| bool) -> Dataset", "Keep the records for which the function returns true.",
        |ctx: NativeCallContext, ds: &mut DatasetHandle, f: FnPtr| filter(&ctx, ds, &f));
    api.func("map", "dataset.map(|record| record) -> Dataset",
        "Replace each record by what the function returns (a map in any supported format).",
        |ctx: NativeCallContext, ds: &mut DatasetHandle, f: FnPtr| map(&ctx, ds, &f));
    api.func("train_test_split", "dataset.train_test_split(test_fraction_or_count) -> #{train, test}",
        "Shuffle (seed 42) and split off a test set: a fraction (0.1) or a count (100).",
        |ds: &mut DatasetHandle, test: Dynamic| rt(split(ds, test, &Map::new())));
    api.func("train_test_split", "dataset.train_test_split(test_fraction_or_count, #{seed, shuffle}) -> #{train, test}",
        "Split off a test set with a given seed (default 42), or without shuffling (shuffle: false).",
        |ds: &mut DatasetHandle, test: Dynamic, opts: Map| rt(split(ds, test, &opts)));
    api.func("concat", "dataset.concat(other) -> Dataset", "The records of both datasets, this one first.",
        |ds: &mut DatasetHandle, other: DatasetHandle| handle(ds.0.concat(&other.0)));
    api.func("to_jsonl", "dataset.to_jsonl(path)", "Write the normalised records as JSON Lines (atomically).",
        |ds: &mut DatasetHandle, path: &str| {
            let path = std::path::Path::new(path);
            rt(crate::util::permissions::write_file(path).and_then(|_| {
                if !crate::train::distributed::is_main_process() {
                    return Ok(()); // rank 0 writes
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| anyhow!("{}: cannot create directory: {e}", dir.display()))?;
                }
                ds.0.to_jsonl(path)
            }))
        });
    api.func("stats", "dataset.stats(model) -> map",
        "Token-length statistics after rendering with the model's chat template: count, tokens, trained_tokens, min, mean, \
         p50/p90/p95/p99, max, and how many exceed max_seq_length (default 1024).",
        |ds: &mut DatasetHandle, model: ModelHandle| rt(stats(ds, &model, &Map::new())));
    api.func("stats", "dataset.stats(model, #{max_seq_length, train_on_inputs}) -> map", "Token-length statistics with options.",
        |ds: &mut DatasetHandle, model: ModelHandle, opts: Map| rt(stats(ds, &model, &opts)));
    api.func("preview", "dataset.preview(model, index) -> string",
        "The example as the model sees it, trained tokens highlighted (green on a terminal, [[ ]] otherwise), with token counts.",
        |ds: &mut DatasetHandle, model: ModelHandle, i: INT| rt(preview(ds, &model, i, &Map::new())));
    api.func("preview", "dataset.preview(model, index, #{train_on_inputs, max_seq_length, color}) -> string",
        "Preview with options; color forces or disables ANSI colours.",
        |ds: &mut DatasetHandle, model: ModelHandle, i: INT, opts: Map| rt(preview(ds, &model, i, &opts)));
    api.func("tokenized", "dataset.tokenized(model) -> TokenizedDataset",
        "Render with the chat template, tokenize and mask (labels only on assistant turns), truncate to 1024 tokens; \
         prints a summary line and lints.",
        |ds: &mut DatasetHandle, model: ModelHandle| rt(tokenized(ds, &model, &Map::new())));
    api.func("tokenized", "dataset.tokenized(model, #{max_seq_length, train_on_inputs, truncation}) -> TokenizedDataset",
        "Tokenize with options: truncation \"truncate\" (default, keep the start) | \"drop\"; train_on_inputs trains every token.",
        |ds: &mut DatasetHandle, model: ModelHandle, opts: Map| rt(tokenized(ds, &model, &opts)));
    api.func("to_string", "to_string(dataset) -> string", "One line describing the dataset.", |ds: &mut DatasetHandle| describe(&ds.0));
    api.func("to_debug", "to_debug(dataset) -> string", "One line describing the dataset.", |ds: &mut DatasetHandle| describe(&ds.0));

    // TokenizedDataset.
    api.func("len", "tokenized.len() -> int", "Number of examples (after drops).", |t: &mut TokenizedHandle| t.0.len() as INT);
    api.engine.register_indexer_get(|t: &mut TokenizedHandle, i: INT| -> RhaiResult<Map> {
        let i = rt(index(t.0.len(), i))?;
        let e = &t.0.examples[i];
        let mut m = Map::new();
        m.insert("index".into(), Dynamic::from(e.index as INT));
        m.insert("input_ids".into(), ints(&e.input_ids));
        m.insert("labels".into(), ints(&e.labels()));
        Ok(m)
    });
    api.docs.push(super::FnDoc {
        name: "index".into(),
        signature: "tokenized[index] -> #{index, input_ids, labels}".into(),
        doc: "Example `index`: its record index, token ids and labels (-100 = not trained).".into(),
    });
    api.func("summary", "tokenized.summary() -> string", "The tokenization summary line (examples, tokens, truncated, dropped).",
        |t: &mut TokenizedHandle| t.0.report.summary());
    api.func("lints", "tokenized.lints() -> array of strings", "Dataset warnings: double BOS, missing end-of-turn, pad == EOS, dropped roles, ...",
        |t: &mut TokenizedHandle| t.0.report.lints.iter().map(|l| Dynamic::from(l.to_string())).collect::<Array>());
    api.func("batches", "tokenized.batches(#{batch_size}) -> array of batch maps",
        "One epoch of batches, each #{input_ids, labels, attention_mask, position_ids, segment_ids, examples} (arrays of rows).",
        |t: &mut TokenizedHandle, opts: Map| rt(batches(t, &opts)));
    api.func("to_string", "to_string(tokenized) -> string", "One line describing the tokenized dataset.",
        |t: &mut TokenizedHandle| format!("TokenizedDataset({} examples, {} tokens)", t.0.len(), t.0.report.tokens));
}
