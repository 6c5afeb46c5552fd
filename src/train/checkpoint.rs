//! Checkpoints: `output_dir/checkpoint-<step>/` holds the adapter (peft layout), the optimizer
//! state (f32 master weights and moments — the exact state resume continues from), the
//! trainer state (step, data position, log history; the scheduler and dropout RNG are pure
//! functions of the step and seed) and a manifest of what produced it. A checkpoint is written
//! into a temporary directory, fsynced and renamed: a crash never leaves one that looks valid.

use super::optim::{AdamW, ParamState};
use crate::model::engine::Proj;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub qscript_version: String,
    pub recipe_sha256: Option<String>,
    pub dataset_sha256: String,
    pub base_model_config_sha256: String,
    pub base_model: String,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: usize,
    pub max_steps: usize,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// The data iterator's next batch.
    pub position: crate::data::Position,
    pub train_tokens: u64,
    pub skipped_steps: usize,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub log_history: Vec<serde_json::Value>,
}

pub const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const MANIFEST_FILE: &str = "manifest.json";
const SCHEDULER_FILE: &str = "scheduler.json";

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything a checkpoint holds, to write or after reading.
pub struct Checkpoint<'a> {
    pub state: &'a TrainerState,
    pub optimizer: &'a AdamW,
    pub manifest: &'a Manifest,
    pub scheduler: serde_json::Value,
}

/// Write `output_dir/checkpoint-<step>` atomically; `write_adapter` adds the peft files.
pub fn save(output_dir: &Path, ck: &Checkpoint, write_adapter: &dyn Fn(&Path) -> Result<()>) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", ck.state.global_step));
    // Same step saved again (e.g. final save after a step save): replaced whole.
    crate::util::fs::install_dir(&final_dir, crate::util::fs::Existing::Replace, |tmp| {
        write_adapter(tmp)?;
        // Optimizer: master weights and moments per trainable tensor, f32, exact.
        anyhow::ensure!(!ck.optimizer.host_stale(), "optimizer state is on the device: call AdamW::sync_to_host before saving");
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for p in &ck.optimizer.params {
            let key = format!("layers.{}.{}.lora_{}", p.layer, p.proj.name(), if p.is_b { "B" } else { "A" });
            for (what, v) in [("master", &p.master), ("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
                tensors.push((format!("{key}.{what}"), Tensor::from_slice(v, p.shape, &Device::Cpu)?));
            }
        }
        let meta: HashMap<String, String> = [("step".to_string(), ck.optimizer.step.to_string())].into();
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)).collect::<Vec<_>>().iter().map(|(k, t)| (k.as_str(), *t)), Some(meta))
            .map_err(|e| anyhow::anyhow!("optimizer state: {e}"))?;
        crate::util::fs::write(&tmp.join(OPTIMIZER_FILE), &bytes)?;
        crate::util::fs::write(&tmp.join(SCHEDULER_FILE), serde_json::to_string_pretty(&ck.scheduler)?.as_bytes())?;
        crate::util::fs::write(&tmp.join(MANIFEST_FILE), serde_json::to_string_pretty(ck.manifest)?.as_bytes())?;
        crate::util::fs::write(&tmp.join(STATE_FILE), serde_json::to_string_pretty(ck.state)?.as_bytes())
    })?;
    Ok(final_dir)
}

/// `checkpoint-N` directories of `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then_some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Keep the newest `limit` checkpoints (and the best one, as transformers does).
pub fn prune(output_dir: &Path, limit: usize, keep: Option<&Path>) -> Result<()> {
    let all = list(output_dir);
    let excess = all.len().saturating_sub(limit);
    for (_, dir) in all.into_iter().take(excess) {
        if Some(dir.as_path()) == keep {
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
    }
    Ok(())
}

pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub manifest: Manifest,
    pub optimizer_step: u64,
    pub params: Vec<ParamState>,
}

/// Read a checkpoint; every missing or corrupt file is an error naming it.
pub fn load(dir: &Path) -> Result<Loaded> {
    if !dir.is_dir() {
        bail!("{}: checkpoint not found", dir.display());
    }
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let p = dir.join(name);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: missing or unreadable (corrupt checkpoint?)", p.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}:{}: corrupt checkpoint file: {e}", p.display(), e.line(), e.column()))
    };
    let state: TrainerState = serde_json::from_value(read_json(STATE_FILE)?)
        .map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint file: {e}", dir.join(STATE_FILE).display()))?;
    let manifest: Manifest = serde_json::from_value(read_json(MANIFEST_FILE)?)
        .map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint file: {e}", dir.join(MANIFEST_FILE).display()))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).with_context(|| format!("{}: missing (corrupt checkpoint?)", opt_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint file: {e}", opt_path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", opt_path.display()))?;
    let optimizer_step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no `step` in metadata", opt_path.display()))?;
    let mut params: Vec<ParamState> = Vec::new();
    let mut names: Vec<&str> = st.names().into_iter().filter(|n| n.ends_with(".master")).collect();
    names.sort_by_key(|n| {
        let parts: Vec<&str> = n.split('.').collect();
        let layer: usize = parts.get(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        let proj = Proj::ALL.iter().position(|p| Some(&p.name()) == parts.get(2)).unwrap_or(0);
        (layer, proj, parts.get(3) == Some(&"lora_B"))
    });
    for n in names {
        let key = n.trim_end_matches(".master");
        let parts: Vec<&str> = key.split('.').collect();
        let bad = || anyhow::anyhow!("{}: unexpected tensor `{n}`", opt_path.display());
        let layer: usize = parts.get(1).and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let proj = *Proj::ALL.iter().find(|p| Some(&p.name()) == parts.get(2)).ok_or_else(bad)?;
        let is_b = parts.get(3) == Some(&"lora_B");
        let get = |what: &str| -> Result<(Vec<f32>, (usize, usize))> {
            let name = format!("{key}.{what}");
            let v = st.tensor(&name).map_err(|_| anyhow::anyhow!("{}: missing tensor `{name}`", opt_path.display()))?;
            let shape = v.shape();
            anyhow::ensure!(shape.len() == 2 && v.dtype() == safetensors::Dtype::F32, "{}: tensor `{name}` must be 2-D f32", opt_path.display());
            let data: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok((data, (shape[0], shape[1])))
        };
        let (master, shape) = get("master")?;
        let (exp_avg, _) = get("exp_avg")?;
        let (exp_avg_sq, _) = get("exp_avg_sq")?;
        params.push(ParamState { layer, proj, is_b, shape, master, exp_avg, exp_avg_sq });
    }
    Ok(Loaded { dir: dir.to_path_buf(), state, manifest, optimizer_step, params })
}
