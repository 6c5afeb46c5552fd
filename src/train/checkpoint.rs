//! Checkpoints: `output_dir/checkpoint-<step>/` holds the adapter (peft layout), the optimizer
//! state (f32 master weights and moments — the exact state resume continues from), the
//! trainer state (step, data position, log history; the scheduler and dropout RNG are pure
//! functions of the step and seed) and a manifest of what produced it. A checkpoint is written
//! into a temporary directory, fsynced and renamed: a crash never leaves one that looks valid.

use super::optim::{AdamW, ParamState};
use crate::model::names::{self, ParamId};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub qscript_version: String,
    pub recipe_sha256: Option<String>,
    pub dataset_sha256: String,
    pub base_model_config_sha256: String,
    pub base_model: String,
    pub seed: u64,
    /// How the run was started: command, `--set` values, device, dtypes, commit, weights hash.
    #[serde(flatten)]
    pub record: super::record::RunRecord,
    /// The run (a fresh training and its resumptions) that wrote it: pruning touches only the
    /// run's own checkpoints, and `resume_from_checkpoint: true` continues the latest run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// A new run's id: unique per process start and time.
pub fn new_run_id() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}-{:x}-{:x}", t.as_secs(), t.subsec_nanos(), std::process::id())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Finite losses since the last log entry, summed, and their count: a run resumed between
    /// two log entries logs the same mean as one that was not stopped.
    #[serde(default)]
    pub window_loss: f64,
    #[serde(default)]
    pub window_steps: usize,
    /// Evaluations since `metric_for_best_model` last improved (early stopping).
    #[serde(default)]
    pub early_stopping_patience_counter: usize,
    /// Written when Ctrl-C cut a step's after-step work (its evaluation, a callback): where that
    /// work stood, so the resumed run finishes it first (trainer.rs, `AfterStep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_step: Option<serde_json::Value>,
    /// Rows of one global batch (per_device_train_batch_size × WORLD_SIZE) and the WORLD_SIZE that
    /// trained: `position` counts global batches, so a resume on another number of ranks keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
}

pub const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MANIFEST_FILE: &str = "manifest.json";
const SCHEDULER_FILE: &str = "scheduler.json";

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest's fingerprint of a base model: the sha256 of its config.json as loaded.
pub fn config_sha256(config: &crate::model::Config) -> String {
    sha256_hex(serde_json::to_string(&config.raw).unwrap_or_default().as_bytes())
}

/// Read a `manifest.json` (a run's output_dir or a checkpoint holds one).
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not a qscript manifest: {e}", path.display()))
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
            let key = p.id().state_key();
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

/// `save_only_model`: the checkpoint keeps its adapter and trainer state, not the optimizer's
/// moments (a third of a LoRA checkpoint's size, twice the adapter's); it cannot be resumed.
pub fn drop_optimizer_state(dir: &Path) -> Result<()> {
    let p = dir.join(OPTIMIZER_FILE);
    std::fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))
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

/// The run id in a checkpoint's (or an output_dir's) `manifest.json`.
pub fn run_id_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).ok()?;
    serde_json::from_str::<Manifest>(&text).ok()?.run_id
}

/// The checkpoint `resume_from_checkpoint: true` continues: the newest of the run that last
/// wrote `output_dir/manifest.json`, else the highest step (a stale `checkpoint-20` of an
/// older run does not win over the latest run's own).
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let all = list(output_dir);
    let run = run_id_of(output_dir);
    let ours = all.iter().rev().find(|(_, p)| run.is_some() && run_id_of(p) == run);
    ours.or(all.last()).map(|(_, p)| p.clone())
}

/// Keep the newest `limit` checkpoints of run `run_id` (and the best one, as transformers
/// does). Checkpoints of other runs are neither counted nor removed. A removed checkpoint
/// vanishes in one rename, so none is ever left half-deleted under its name.
pub fn prune(output_dir: &Path, limit: usize, keep: Option<&Path>, run_id: &str) -> Result<()> {
    let ours: Vec<(usize, PathBuf)> = list(output_dir).into_iter().filter(|(_, p)| run_id_of(p).as_deref() == Some(run_id)).collect();
    let excess = ours.len().saturating_sub(limit);
    for (_, dir) in ours.into_iter().take(excess) {
        if Some(dir.as_path()) == keep {
            continue;
        }
        crate::util::permissions::write(&dir)?;
        crate::util::fs::remove_dir(&dir).with_context(|| format!("{}: cannot remove old checkpoint", dir.display()))?;
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
    if !dir.join(OPTIMIZER_FILE).exists() && dir.join(STATE_FILE).exists() {
        bail!("{}: saved with save_only_model: true (no optimizer state), so it cannot be resumed; load its adapter instead", dir.display());
    }
    let (optimizer_step, params) = read_optimizer(&dir.join(OPTIMIZER_FILE))?;
    Ok(Loaded { dir: dir.to_path_buf(), state, manifest, optimizer_step, params })
}

/// The optimizer file: its step and every parameter's state, in the model's adapter order
/// (every family's walk order agrees with [`names::ANY`]'s).
fn read_optimizer(opt_path: &Path) -> Result<(u64, Vec<ParamState>)> {
    let bytes = std::fs::read(opt_path).with_context(|| format!("{}: missing (corrupt checkpoint?)", opt_path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint file: {e}", opt_path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", opt_path.display()))?;
    let optimizer_step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no `step` in metadata", opt_path.display()))?;
    let family = &names::ANY;
    let mut ids: Vec<(ParamId, String)> = Vec::new();
    for n in st.names().into_iter().filter(|n| n.ends_with(".master")) {
        let key = n.trim_end_matches(".master");
        let id = family.parse_state_key(key).ok_or_else(|| anyhow::anyhow!("{}: unexpected tensor `{n}`", opt_path.display()))?;
        ids.push((id, key.to_string()));
    }
    ids.sort_by_key(|(id, _)| family.param_order(*id));
    let mut params = Vec::with_capacity(ids.len());
    for (id, key) in ids {
        let get = |what: &str| read_f32_2d(&st, &format!("{key}.{what}"), opt_path);
        let (master, shape) = get("master")?;
        let (exp_avg, _) = get("exp_avg")?;
        let (exp_avg_sq, _) = get("exp_avg_sq")?;
        params.push(ParamState { exp_avg, exp_avg_sq, ..ParamState::new(id, shape, master) });
    }
    Ok((optimizer_step, params))
}

/// A 2-D f32 tensor of the optimizer file and its shape; errors name the file and the tensor.
fn read_f32_2d(st: &safetensors::SafeTensors, name: &str, opt_path: &Path) -> Result<(Vec<f32>, (usize, usize))> {
    let v = st.tensor(name).map_err(|_| anyhow::anyhow!("{}: missing tensor `{name}`", opt_path.display()))?;
    let shape = v.shape();
    anyhow::ensure!(shape.len() == 2 && v.dtype() == safetensors::Dtype::F32, "{}: tensor `{name}` must be 2-D f32", opt_path.display());
    let data: Vec<f32> = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((data, (shape[0], shape[1])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{self, InitLoraWeights, LoraConfig, TargetModules};
    use crate::model::names::{LoraHalf, ModuleId, LLAMA};
    use crate::model::{LoadOptions, Model};

    /// The optimizer state comes back exactly, in the walk order, for more than ten layers
    /// (where the file's name order and the walk order differ).
    #[test]
    fn optimizer_state_round_trips_in_walk_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft/1/base");
        let mut m = Model::load_hf_dir("tiny", &dir, &LoadOptions::default()).unwrap();
        let cfg = LoraConfig { r: 2, target_modules: TargetModules::AllLinear, init_lora_weights: InitLoraWeights::Random, ..Default::default() };
        lora::attach(&mut m.llama, &cfg, 0).unwrap();
        let mut opt = AdamW::new(&m.llama, Default::default()).unwrap();
        opt.step = 7;
        opt.params = LLAMA
            .module_ids(12)
            .flat_map(|module| LoraHalf::BOTH.map(|half| ParamId { module, half }))
            .enumerate()
            .map(|(i, id)| {
                let v = |k: f32| (0..6).map(|j| (i * 6 + j) as f32 * k).collect::<Vec<f32>>();
                ParamState { exp_avg: v(0.5), exp_avg_sq: v(0.25), ..ParamState::new(id, (2, 3), v(1.0)) }
            })
            .collect();
        let state = TrainerState { global_step: 7, max_steps: 10, ..Default::default() };
        let manifest = Manifest::default();
        let out = tempfile::tempdir().unwrap();
        let ck = Checkpoint { state: &state, optimizer: &opt, manifest: &manifest, scheduler: serde_json::json!({}) };
        let path = save(out.path(), &ck, &|_| Ok(())).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.optimizer_step, 7);
        assert_eq!(back.params.len(), opt.params.len());
        for (a, b) in back.params.iter().zip(&opt.params) {
            assert_eq!((a.id(), a.shape), (b.id(), b.shape));
            assert_eq!((&a.master, &a.exp_avg, &a.exp_avg_sq), (&b.master, &b.exp_avg, &b.exp_avg_sq), "{:?}", a.id());
        }
        assert_eq!(back.params[2].module(), ModuleId { layer: 0, proj: crate::model::names::Proj::K });
    }
}
