//! Reading dataset files: JSON Lines, JSON (an array, or an object holding one), CSV / TSV, a
//! directory or glob of those. Each file's record format is detected from its first record
//! (or forced with `format`); every record is normalised once to a [`Row`]. Errors name
//! `file:LINE[:COL]` and the record; `on_error: skip` turns record errors into counted skips.

use super::dataset::{Dataset, Message, Record, Row};
use anyhow::{bail, Context, Result};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// ShareGPT: `conversations: [{from: human|user|gpt|assistant|system, value}]`.
    Conversations,
    /// OpenAI: `messages: [{role, content}]`.
    Messages,
    /// `instruction`, optional `input`, `output` (optional `system`).
    Alpaca,
    /// `prompt`, `completion` (strings or message lists).
    PromptCompletion,
    /// `text`: plain pre-training text, every token trained.
    Text,
}

impl Format {
    pub const ALL: [Format; 5] = [Format::Messages, Format::Conversations, Format::Alpaca, Format::PromptCompletion, Format::Text];
    pub const NAMES: &'static [&'static str] = &["conversations", "messages", "alpaca", "prompt_completion", "text"];

    pub fn name(self) -> &'static str {
        match self {
            Format::Conversations => "conversations",
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
            Format::PromptCompletion => "prompt_completion",
            Format::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Format::ALL.into_iter().find(|f| f.name() == s).with_context(|| {
            format!("unknown dataset format \"{s}\" (expected one of: {})", Format::NAMES.join(", "))
        })
    }

    /// The fields a record of this format must have.
    fn required(self) -> &'static [&'static str] {
        match self {
            Format::Conversations => &["conversations"],
            Format::Messages => &["messages"],
            Format::Alpaca => &["instruction", "output"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Text => &["text"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    #[default]
    Raise,
    Skip,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Force a record format (default: detect per file from its first record).
    pub format: Option<Format>,
    pub on_error: OnError,
    /// For a JSON object holding several arrays: the key to read (`"train"`).
    pub split: Option<String>,
    /// `(standard name, the dataset's name)`: `("prompt", "question")` reads `question` as
    /// `prompt` (before the format is detected).
    pub columns: Vec<(String, String)>,
}

/// Why a record (or file) was rejected; the label is what the summary line counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    InvalidJson,
    InvalidUtf8,
    Csv,
    NotAnObject,
    UnknownFormat,
    MixedFormats,
    MissingField,
    WrongType,
    UnknownRole,
    EmptyConversation,
    EmptyFile,
    /// A JSON document that is not an array of records (or an object holding one).
    FileStructure,
    /// A parquet file that cannot be read (corrupt, or a codec this build lacks).
    Parquet,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid JSON",
            Reason::InvalidUtf8 => "invalid UTF-8",
            Reason::Csv => "malformed CSV",
            Reason::NotAnObject => "not an object",
            Reason::UnknownFormat => "unknown format",
            Reason::MixedFormats => "mixed formats",
            Reason::MissingField => "missing field",
            Reason::WrongType => "wrong type",
            Reason::UnknownRole => "unknown role",
            Reason::EmptyConversation => "empty conversation",
            Reason::EmptyFile => "empty file",
            Reason::FileStructure => "unusable file",
            Reason::Parquet => "unreadable parquet",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecordError {
    pub reason: Reason,
    pub msg: String,
}

fn err(reason: Reason, msg: impl Into<String>) -> RecordError {
    RecordError { reason, msg: msg.into() }
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Files read, as named in messages.
    pub files: Vec<String>,
    /// Files in a directory or glob that were not dataset files.
    pub ignored_files: usize,
    pub records: usize,
    pub by_format: BTreeMap<Format, usize>,
    pub skipped: BTreeMap<Reason, usize>,
    /// The first few skip messages, `file:line: ...`.
    pub skip_messages: Vec<String>,
}

impl LoadReport {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    /// One line: records read, by format, skipped and why.
    pub fn summary(&self) -> String {
        let from = match self.files.as_slice() {
            [one] => one.clone(),
            many => format!("{} files", many.len()),
        };
        let formats: Vec<String> = self.by_format.iter().map(|(f, n)| format!("{} {n}", f.name())).collect();
        let mut s = format!("loaded {} records from {from} ({})", self.records, formats.join(", "));
        let skipped = self.skipped_total();
        if skipped > 0 {
            let why: Vec<String> = self.skipped.iter().map(|(r, n)| format!("{} {n}", r.label())).collect();
            s.push_str(&format!("; skipped {skipped}: {}", why.join(", ")));
            if let Some(first) = self.skip_messages.first() {
                s.push_str(&format!(" (first: {first})"));
            }
        } else {
            s.push_str("; skipped 0");
        }
        if self.ignored_files > 0 {
            s.push_str(&format!("; ignored {} non-dataset files", self.ignored_files));
        }
        s
    }
}

/// `load_dataset(path_or_glob)`: a file, a directory (recursively, every .jsonl / .json / .csv
/// / .tsv / .parquet in name order) or a glob pattern.
pub fn load_dataset(spec: &str, opts: &LoadOptions) -> Result<(Dataset, LoadReport)> {
    let (files, ignored) = expand(spec)?;
    let mut l = Loader { opts, report: LoadReport { ignored_files: ignored, ..Default::default() }, rows: Vec::new(), file_format: None };
    for f in &files {
        l.load_file(f)?;
    }
    if l.rows.is_empty() {
        let why = if l.report.skipped_total() > 0 { format!(" ({})", l.report.summary()) } else { String::new() };
        bail!("{spec}: no records{why}");
    }
    l.report.records = l.rows.len();
    Ok((Dataset::new(l.rows), l.report))
}

#[derive(Clone, Copy)]
enum FileKind {
    Jsonl,
    Json,
    Csv(u8),
    Parquet,
}

fn file_kind(p: &Path) -> Option<FileKind> {
    let ext = p.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "jsonl" | "ndjson" => FileKind::Jsonl,
        "json" => FileKind::Json,
        "csv" => FileKind::Csv(b','),
        "tsv" => FileKind::Csv(b'\t'),
        "parquet" => FileKind::Parquet,
        _ => return None,
    })
}

/// Files to read and how many others were passed over (`util::files`: permissions, regular
/// files only, no hidden entries unless named, bounded walks).
fn expand(spec: &str) -> Result<(Vec<PathBuf>, usize)> {
    let (files, ignored) = crate::util::files::list(spec, &|f| file_kind(f).is_some())?;
    let explicit = !spec.contains(['*', '?', '[']) && !Path::new(spec).is_dir();
    if explicit && files.is_empty() {
        bail!("{spec}: unsupported file type (expected .jsonl, .json, .csv, .tsv or .parquet)");
    }
    if files.is_empty() {
        bail!("{spec}: no .jsonl, .json, .csv, .tsv or .parquet files");
    }
    Ok((files, ignored))
}

struct Loader<'a> {
    opts: &'a LoadOptions,
    report: LoadReport,
    rows: Vec<Row>,
    /// The current file's record format (forced, or detected from its first record).
    file_format: Option<Format>,
}

impl Loader<'_> {
    /// Raise, or count a skip.
    fn fail(&mut self, loc: &str, e: RecordError) -> Result<()> {
        let msg = format!("{loc}: {}", e.msg);
        if self.opts.on_error == OnError::Raise {
            bail!(msg);
        }
        *self.report.skipped.entry(e.reason).or_default() += 1;
        if self.report.skip_messages.len() < 5 {
            self.report.skip_messages.push(msg);
        }
        Ok(())
    }

    fn load_file(&mut self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).with_context(|| format!("{name}: cannot read"))?;
        self.report.files.push(name.clone());
        self.file_format = self.opts.format;
        let before = self.rows.len() + self.report.skipped_total();
        match file_kind(path).expect("expand keeps dataset files only") {
            FileKind::Jsonl => self.jsonl(&name, &bytes)?,
            FileKind::Json => self.json(&name, &bytes)?,
            FileKind::Csv(d) => self.csv(&name, &bytes, d)?,
            FileKind::Parquet => self.parquet(&name, bytes)?,
        }
        if self.rows.len() + self.report.skipped_total() == before {
            self.fail(&name, err(Reason::EmptyFile, "empty file (no records)"))?;
        }
        Ok(())
    }

    /// Detect (first record) or check the file's format, then normalise.
    fn record(&mut self, loc: &str, mut v: Value) -> Result<()> {
        rename_columns(&mut v, &self.opts.columns);
        let fmt = match self.file_format {
            Some(f) => f,
            None => match v.as_object().and_then(detect) {
                Some(f) => {
                    self.file_format = Some(f);
                    f
                }
                None => return self.fail(loc, parse_record(&v, None).expect_err("undetectable record is an error")),
            },
        };
        let forced = self.opts.format.is_some();
        match parse_record_as(&v, fmt, forced) {
            Ok(row) => {
                *self.report.by_format.entry(fmt).or_default() += 1;
                self.rows.push(row);
                Ok(())
            }
            Err(e) => self.fail(loc, e),
        }
    }

    fn jsonl(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let mut idx = 0;
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let loc = format!("{name}:{}", n + 1);
            let rec = idx;
            idx += 1;
            let text = match std::str::from_utf8(line) {
                Ok(t) => t,
                Err(e) => {
                    self.fail(&loc, err(Reason::InvalidUtf8, format!("invalid UTF-8 at byte column {}", e.valid_up_to() + 1)))?;
                    continue;
                }
            };
            match serde_json::from_str::<Value>(text) {
                Ok(v) => self.record(&format!("{loc}: record {rec}"), v)?,
                Err(e) => self.fail(&format!("{loc}:{}", e.column()), err(Reason::InvalidJson, format!("invalid JSON: {}", json_msg(&e))))?,
            }
        }
        Ok(())
    }

    fn json(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let text = match utf8_or_locate(bytes) {
            Ok(t) => t,
            Err((line, col)) => {
                return self.fail(&format!("{name}:{line}"), err(Reason::InvalidUtf8, format!("invalid UTF-8 at byte column {col}")));
            }
        };
        if text.trim().is_empty() {
            return Ok(());
        }
        let top: &RawValue = match serde_json::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                // Many `.json` files are really JSON Lines.
                if looks_like_jsonl(text) {
                    return self.jsonl(name, bytes);
                }
                let loc = format!("{name}:{}:{}", e.line(), e.column());
                return self.fail(&loc, err(Reason::InvalidJson, format!("invalid JSON: {}", json_msg(&e))));
            }
        };
        let items: Vec<&RawValue> = match top.get().trim_start().as_bytes().first() {
            Some(b'[') => serde_json::from_str(top.get())?,
            Some(b'{') => match self.records_in_object(name, top)? {
                Some(items) => items,
                None => return Ok(()),
            },
            _ => return self.fail(name, err(Reason::FileStructure, "expected an array of records or an object holding one")),
        };
        let base = text.as_ptr() as usize;
        let (mut line, mut at) = (1, 0);
        for (i, raw) in items.into_iter().enumerate() {
            // The element's line: count newlines since the previous element.
            let off = raw.get().as_ptr() as usize - base;
            line += text.as_bytes()[at..off].iter().filter(|&&b| b == b'\n').count();
            at = off;
            let v: Value = serde_json::from_str(raw.get())?;
            self.record(&format!("{name}:{line}: record {i}"), v)?;
        }
        Ok(())
    }

    /// The records of a top-level JSON object: `split` names the array, else the single array
    /// it holds; an object that is itself a record is one record (`None`: handled here).
    fn records_in_object<'t>(&mut self, name: &str, top: &'t RawValue) -> Result<Option<Vec<&'t RawValue>>> {
        let fields: BTreeMap<String, &RawValue> = serde_json::from_str(top.get())?;
        let is_array = |r: &&RawValue| r.get().trim_start().starts_with('[');
        if let Some(key) = &self.opts.split {
            let Some(raw) = fields.get(key) else {
                let keys = fields.keys().cloned().collect::<Vec<_>>().join(", ");
                self.fail(name, err(Reason::FileStructure, format!("no key `{key}` (keys: {keys})")))?;
                return Ok(None);
            };
            if !is_array(raw) {
                self.fail(name, err(Reason::FileStructure, format!("`{key}` is not an array of records")))?;
                return Ok(None);
            }
            return Ok(Some(serde_json::from_str(raw.get())?));
        }
        let v: Value = serde_json::from_str(top.get())?;
        if v.as_object().and_then(detect).is_some() || self.file_format.is_some() && fields.values().filter(|r| is_array(r)).count() != 1 {
            self.record(&format!("{name}:1: record 0"), v)?;
            return Ok(None);
        }
        let arrays: Vec<(&String, &&RawValue)> = fields.iter().filter(|(_, r)| is_array(r)).collect();
        match arrays.as_slice() {
            [(_, raw)] => Ok(Some(serde_json::from_str(raw.get())?)),
            _ => {
                let keys = fields.keys().cloned().collect::<Vec<_>>().join(", ");
                let msg = format!("expected an array of records or an object holding one; pick the array with `split:` (keys: {keys})");
                self.fail(name, err(Reason::FileStructure, msg))?;
                Ok(None)
            }
        }
    }

    fn csv(&mut self, name: &str, bytes: &[u8], delimiter: u8) -> Result<()> {
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .quoting(delimiter == b',')
            .has_headers(true)
            .from_reader(bytes);
        let headers: Vec<String> = match rdr.byte_headers() {
            Ok(h) => {
                let mut out = Vec::new();
                for (i, f) in h.iter().enumerate() {
                    match std::str::from_utf8(f) {
                        Ok(s) => out.push(s.trim_start_matches('\u{feff}').to_string()),
                        Err(_) => return self.fail(&format!("{name}:1"), err(Reason::InvalidUtf8, format!("invalid UTF-8 in header column {}", i + 1))),
                    }
                }
                out
            }
            Err(e) => return self.fail(name, err(Reason::Csv, csv_msg(&e))),
        };
        if headers.iter().all(|h| h.is_empty()) {
            return Ok(());
        }
        for (rec, result) in rdr.byte_records().enumerate() {
            let record = match result {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    self.fail(&format!("{name}:{line}"), err(Reason::Csv, csv_msg(&e)))?;
                    continue;
                }
            };
            let loc = format!("{name}:{}", record.position().map(|p| p.line()).unwrap_or(0));
            match csv_object(&headers, &record) {
                Ok(v) => self.record(&format!("{loc}: record {rec}"), v)?,
                Err(e) => self.fail(&loc, e)?,
            }
        }
        Ok(())
    }
}

impl Loader<'_> {
    /// A parquet file (as `datasets` writes a split): each row as the JSON record it would be
    /// in a .jsonl export (nested lists and structs as arrays and objects, nulls as null), in
    /// the file's column order. Codecs: snappy (pyarrow's default), gzip, lz4, zstd, uncompressed.
    fn parquet(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        // The decoder may panic on a corrupt file: that is a bad file, not a crash.
        let decoded = std::panic::catch_unwind(|| parquet_rows(bytes))
            .unwrap_or_else(|_| Err("not a readable parquet file: corrupt (the decoder gave up)".into()));
        let rows = match decoded {
            Ok(rows) => rows,
            Err(msg) => return self.fail(name, err(Reason::Parquet, msg)),
        };
        for (i, row) in rows.into_iter().enumerate() {
            match row {
                Ok(v) => self.record(&format!("{name}: row {i}"), v)?,
                // A page that cannot be decoded ends the file: later rows are not reachable.
                Err(msg) => return self.fail(&format!("{name}: row {i}"), err(Reason::Parquet, msg)),
            }
        }
        Ok(())
    }
}

/// The rows of a parquet file as JSON, or why the file cannot be opened; a row that cannot be
/// decoded is the last entry.
fn parquet_rows(bytes: Vec<u8>) -> Result<Vec<Result<Value, String>>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(|e| parquet_msg(&e))?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(None).map_err(|e| parquet_msg(&e))? {
        match row {
            Ok(r) => out.push(Ok(r.to_json_value())),
            Err(e) => {
                out.push(Err(parquet_msg(&e)));
                break;
            }
        }
    }
    Ok(out)
}

/// A parquet error in one line; a codec this build lacks says how to convert.
fn parquet_msg(e: &parquet::errors::ParquetError) -> String {
    let s = e.to_string();
    let s = s.strip_prefix("Parquet error: ").unwrap_or(&s);
    if let Some(codec) = s.strip_prefix("Disabled feature at compile time: ") {
        format!(
            "compressed with {codec}, which qscript does not read (it reads snappy, the `datasets` / pyarrow default, gzip, lz4, zstd \
             and uncompressed); rewrite it, e.g. pyarrow.parquet.write_table(pyarrow.parquet.read_table(path), path, compression=\"snappy\")"
        )
    } else {
        format!("not a readable parquet file: {s}")
    }
}

/// `columns`: the dataset's field names renamed to the standard ones, where present.
fn rename_columns(v: &mut Value, columns: &[(String, String)]) {
    let Value::Object(o) = v else { return };
    for (std, theirs) in columns {
        if let Some(x) = o.remove(theirs) {
            o.insert(std.clone(), x);
        }
    }
}

/// A CSV row as a JSON object; `messages` / `conversations` columns hold JSON arrays.
fn csv_object(headers: &[String], record: &csv::ByteRecord) -> Result<Value, RecordError> {
    let mut o = Map::new();
    for (h, f) in headers.iter().zip(record.iter()) {
        let s = std::str::from_utf8(f).map_err(|e| err(Reason::InvalidUtf8, format!("invalid UTF-8 in column `{h}` at byte {}", e.valid_up_to() + 1)))?;
        let v = if matches!(h.as_str(), "messages" | "conversations") {
            serde_json::from_str(s).map_err(|e| err(Reason::InvalidJson, format!("column `{h}`: invalid JSON at column {}: {}", e.column(), json_msg(&e))))?
        } else {
            Value::String(s.to_string())
        };
        o.insert(h.clone(), v);
    }
    Ok(Value::Object(o))
}

fn csv_msg(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => format!("found {len} fields, expected {expected_len} (as in the header)"),
        _ => e.to_string(),
    }
}

/// serde_json's message without its " at line N column M" suffix (we print our own location).
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The text, or the (line, byte column) of the first invalid UTF-8 byte.
fn utf8_or_locate(bytes: &[u8]) -> Result<&str, (usize, usize)> {
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    })
}

fn looks_like_jsonl(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    matches!(lines.next().map(serde_json::from_str::<Value>), Some(Ok(Value::Object(_)))) && lines.next().is_some()
}

/// The format a record looks like (all its required fields present).
pub fn detect(o: &Map<String, Value>) -> Option<Format> {
    Format::ALL.into_iter().find(|f| f.required().iter().all(|k| o.contains_key(*k)))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Normalise one record; `fmt: None` detects the format from the fields.
pub fn parse_record(v: &Value, fmt: Option<Format>) -> Result<Row, RecordError> {
    let o = v.as_object().ok_or_else(|| err(Reason::NotAnObject, format!("expected a JSON object, got {}", kind_of(v))))?;
    let fmt = match fmt.or_else(|| detect(o)) {
        Some(f) => f,
        None => {
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            return Err(err(
                Reason::UnknownFormat,
                format!(
                    "record has none of the fields of a known format (messages, conversations, instruction/output, prompt/completion, text); it has: {} \
                     (map other names with `columns: #{{ prompt: \"question\", completion: \"answer\" }}`)",
                    if keys.is_empty() { "no fields".into() } else { keys.join(", ") }
                ),
            ));
        }
    };
    parse_record_as(v, fmt, true)
}

/// Normalise a record of format `fmt`. `forced`: the user chose the format (affects wording).
fn parse_record_as(v: &Value, fmt: Format, forced: bool) -> Result<Row, RecordError> {
    let o = v.as_object().ok_or_else(|| err(Reason::NotAnObject, format!("expected a JSON object, got {}", kind_of(v))))?;
    if let Some(missing) = fmt.required().iter().find(|k| !o.contains_key(**k)) {
        if let Some(other) = detect(o).filter(|&g| g != fmt) {
            let msg = if forced {
                format!("record looks like `{}`, not the requested format `{}`", other.name(), fmt.name())
            } else {
                format!("record looks like `{}` but the file's first record is `{}` (mixed formats in one file; split the file or pass `format:`)", other.name(), fmt.name())
            };
            return Err(err(Reason::MixedFormats, msg));
        }
        return Err(err(Reason::MissingField, format!("missing field `{missing}` (format `{}`)", fmt.name())));
    }
    let mut used: &[&str] = fmt.required();
    let mut turn_fields = Vec::new();
    let record = match fmt {
        Format::Messages => Record::Messages(parse_messages(&o["messages"], "messages", false, &mut turn_fields)?),
        Format::Conversations => Record::Messages(parse_messages(&o["conversations"], "conversations", true, &mut turn_fields)?),
        Format::Text => Record::Text(string_field(o, "text")?),
        Format::Alpaca => {
            used = &["instruction", "input", "output", "system"];
            let mut user = string_field(o, "instruction")?;
            if let Some(input) = opt_string_field(o, "input")?.filter(|s| !s.is_empty()) {
                user = format!("{user}\n\n{input}");
            }
            let mut msgs = Vec::new();
            if let Some(sys) = opt_string_field(o, "system")?.filter(|s| !s.is_empty()) {
                msgs.push(Message { role: "system".into(), content: sys });
            }
            msgs.push(Message { role: "user".into(), content: user });
            msgs.push(Message { role: "assistant".into(), content: string_field(o, "output")? });
            Record::Messages(msgs)
        }
        Format::PromptCompletion => {
            let mut msgs = turns(&o["prompt"], "prompt", "user", &mut turn_fields)?;
            msgs.extend(turns(&o["completion"], "completion", "assistant", &mut turn_fields)?);
            Record::Messages(msgs)
        }
    };
    if turn_fields.iter().all(Map::is_empty) {
        turn_fields.clear();
    }
    let extra = o.iter().filter(|(k, _)| !used.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(Row { record, extra, turn_fields })
}

/// A prompt / completion: a string (one turn with `role`) or a list of messages.
fn turns(v: &Value, field: &str, role: &str, fields: &mut Vec<Map<String, Value>>) -> Result<Vec<Message>, RecordError> {
    match v {
        Value::String(s) => {
            fields.push(Map::new());
            Ok(vec![Message { role: role.into(), content: s.clone() }])
        }
        Value::Array(_) => parse_messages(v, field, false, fields),
        other => Err(err(Reason::WrongType, format!("`{field}` must be a string or a list of messages, got {}", kind_of(other)))),
    }
}

fn string_field(o: &Map<String, Value>, k: &str) -> Result<String, RecordError> {
    opt_string_field(o, k)?.ok_or_else(|| err(Reason::MissingField, format!("missing field `{k}`")))
}

fn opt_string_field(o: &Map<String, Value>, k: &str) -> Result<Option<String>, RecordError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(Reason::WrongType, format!("`{k}` must be a string, got {}", kind_of(other)))),
    }
}

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// The messages of a conversation; each message's other fields (tool use) go to `fields`, one
/// map per message.
fn parse_messages(v: &Value, field: &str, sharegpt: bool, fields: &mut Vec<Map<String, Value>>) -> Result<Vec<Message>, RecordError> {
    let Value::Array(items) = v else {
        return Err(err(Reason::WrongType, format!("`{field}` must be an array of messages, got {}", kind_of(v))));
    };
    if items.is_empty() {
        return Err(err(Reason::EmptyConversation, format!("`{field}` is empty")));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(err(Reason::WrongType, format!("`{field}` message {i} must be an object, got {}", kind_of(m))));
        };
        // ShareGPT uses from/value; accept role/content there too (a common variant).
        let (rk, ck) = if sharegpt && m.contains_key("from") { ("from", "value") } else { ("role", "content") };
        let role = match m.get(rk) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(err(Reason::WrongType, format!("`{field}` message {i}: `{rk}` must be a string, got {}", kind_of(other)))),
            None => return Err(err(Reason::MissingField, format!("`{field}` message {i}: missing field `{rk}`"))),
        };
        let role = match (sharegpt, role) {
            (true, "human" | "user") => "user",
            (true, "gpt" | "assistant") => "assistant",
            (_, r) if ROLES.contains(&r) => r,
            (_, r) => {
                let expected = if sharegpt { "human, user, gpt, assistant, system, tool" } else { "system, user, assistant, tool" };
                return Err(err(Reason::UnknownRole, format!("`{field}` message {i}: unknown role \"{r}\" (expected one of: {expected})")));
            }
        };
        let calls = role == "assistant" && m.get("tool_calls").is_some_and(|c| !c.is_null());
        let mut own: Map<String, Value> =
            m.iter().filter(|(k, v)| !matches!(k.as_str(), "role" | "content" | "from" | "value") && !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
        let content = match m.get(ck) {
            // A tool call without text: the template gets the null it was given.
            None | Some(Value::Null) if calls => {
                own.insert("content".into(), Value::Null);
                String::new()
            }
            Some(Value::String(s)) => s.clone(),
            // OpenAI content parts: keep the text parts.
            Some(Value::Array(parts)) if parts.iter().all(|p| p.get("text").is_some_and(Value::is_string)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect()
            }
            Some(other) => return Err(err(Reason::WrongType, format!("`{field}` message {i}: `{ck}` must be a string, got {}", kind_of(other)))),
            None => return Err(err(Reason::MissingField, format!("`{field}` message {i}: missing field `{ck}`"))),
        };
        out.push(Message { role: role.into(), content });
        fields.push(own);
    }
    Ok(out)
}
