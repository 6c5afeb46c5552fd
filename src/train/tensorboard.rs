//! `report_to: "tensorboard"`: scalar event files as TensorFlow's summary writer writes them, so
//! TensorBoard opens them with no TensorFlow here. A file is a sequence of TFRecords
//! (`u64 length`, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each an
//! `Event` protocol buffer: the first holds `file_version`, the others a `Summary` of
//! `simple_value` scalars at a step. Tags follow transformers' TensorBoardCallback: `eval_x` →
//! `eval/x`, everything else `train/x`.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), reflected, as TFRecord frames use.
pub fn crc32c(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masked CRC: rotated and offset, so a CRC of data holding CRCs stays well mixed.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The few protobuf encodings an `Event` needs.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    /// Field header: number and wire type (0 varint, 1 fixed64, 2 bytes, 5 fixed32).
    pub fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, ((field as u64) << 3) | wire as u64);
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        key(out, field, 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    pb::key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    pb::key(&mut e, 2, 0);
    pb::varint(&mut e, step as u64);
    what(&mut e);
    e
}

/// `Summary { repeated Value value = 1 }`, `Value { tag = 1, simple_value = 2 (float) }`.
fn summary(scalars: &[(String, f32)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, v) in scalars {
        let mut val = Vec::new();
        pb::bytes(&mut val, 1, tag.as_bytes());
        pb::key(&mut val, 2, 5);
        val.extend_from_slice(&v.to_le_bytes());
        pb::bytes(&mut s, 1, &val);
    }
    s
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// transformers' `rewrite_logs`: `eval_loss` → `eval/loss`, `loss` → `train/loss`.
pub fn tag(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(k) => format!("eval/{k}"),
        None => format!("train/{key}"),
    }
}

/// An open event file; every entry is flushed so TensorBoard sees a run as it trains.
pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>` in `dir` (created), starting with its version.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the TensorBoard folder", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let file = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = Self { file, path };
        w.record(&event(t, 0, |e| pb::bytes(e, 3, b"brain.Event:2")))?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(&frame(data))?;
        self.file.flush().with_context(|| format!("{}: cannot write", self.path.display()))
    }

    pub fn scalars(&mut self, step: i64, scalars: &[(String, f32)]) -> Result<()> {
        self.record(&event(now(), step, |e| pb::bytes(e, 5, &summary(scalars))))
    }

    /// A metrics entry (`{"step": N, "loss": ..., ...}`): its numbers at its step.
    pub fn entry(&mut self, entry: &Value) -> Result<()> {
        let Some(o) = entry.as_object() else { return Ok(()) };
        let step = o.get("step").and_then(Value::as_i64).unwrap_or(0);
        let scalars: Vec<(String, f32)> =
            o.iter().filter(|(k, _)| *k != "step").filter_map(|(k, v)| Some((tag(k), v.as_f64()? as f32))).collect();
        if scalars.is_empty() {
            return Ok(());
        }
        self.scalars(step, &scalars)
    }
}
