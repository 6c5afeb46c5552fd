//! One output_dir, one run: a new run refuses a folder that holds another one (its checkpoints,
//! metrics, plot and adapter would sit beside the new run's and mix), unless it is told to
//! overwrite it — then the old run's files are removed first — or it resumes that run.

use super::checkpoint;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// What a run writes into output_dir besides its checkpoints (`adapter/` is where recipes save
/// the final adapter; `runs/` is TensorBoard's folder).
const RUN_FILES: &[&str] = &["manifest.json", "metrics.jsonl", "loss.png", "adapter", "runs"];

/// Whether a run left results in `out`: a checkpoint, `loss.png`, or a metrics entry. A run
/// stopped before its first step leaves only its manifest, recipe copy and an empty
/// `metrics.jsonl`, which the next run simply rewrites; an `adapter/` alone may be the user's own.
fn holds_results(out: &Path, checkpoints: &[PathBuf]) -> bool {
    !checkpoints.is_empty()
        || out.join("loss.png").symlink_metadata().is_ok()
        || std::fs::metadata(out.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0)
}

/// A string field of the manifest an earlier run left in `out`.
fn manifest_field(out: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(out.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v.get(key)?.as_str()?.to_string())
}

/// The recipe copy an earlier run left (named in its manifest).
fn recipe_copy(out: &Path) -> Option<PathBuf> {
    let name = manifest_field(out, "recipe_file")?;
    let name = name.as_str();
    // Only a plain file name in output_dir, never a path elsewhere.
    (Path::new(name).file_name().is_some_and(|n| n == name)).then(|| out.join(name))
}

/// The entries of an earlier run in `out` (empty when there was none).
pub fn earlier_run(out: &Path) -> Vec<PathBuf> {
    let checkpoints: Vec<PathBuf> = checkpoint::list(out).into_iter().map(|(_, p)| p).collect();
    if !holds_results(out, &checkpoints) {
        return vec![];
    }
    let mut v = checkpoints;
    v.extend(RUN_FILES.iter().map(|n| out.join(n)).filter(|p| p.symlink_metadata().is_ok()));
    v.extend(recipe_copy(out).filter(|p| p.is_file()));
    v
}

fn names(entries: &[PathBuf]) -> String {
    let n: Vec<String> = entries.iter().filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned())).collect();
    if n.len() > 4 { format!("{}, … ({} entries)", n[..4].join(", "), n.len()) } else { n.join(", ") }
}

/// Before a run writes into `out`: nothing to do for a fresh folder or a resumed run; an
/// earlier run is an error naming the two ways out, or with `overwrite` is removed — when a
/// recipe (its absolute path `recipe`) asks, only a run of the same recipe, unless the user
/// granted the folder ([`permissions::replace_granted`]): a stranger's recipe must not wipe
/// another of the user's runs.
pub fn prepare(out: &Path, overwrite: bool, resuming: bool, recipe: Option<&str>) -> Result<()> {
    if resuming {
        return Ok(());
    }
    let old = earlier_run(out);
    if old.is_empty() {
        return Ok(());
    }
    if !overwrite {
        if checkpoint::list(out).is_empty() {
            bail!(
                "output_dir {} already holds a run ({}) with no checkpoint to resume: set overwrite_output_dir: true to replace it, or choose another output_dir",
                out.display(),
                names(&old)
            );
        }
        bail!(
            "output_dir {} already holds a run ({}): set overwrite_output_dir: true to replace it, or resume it (resume_from_checkpoint: true, or qscript RECIPE --resume)",
            out.display(),
            names(&old)
        );
    }
    if let Some(mine) = recipe {
        let theirs = manifest_field(out, "recipe_path");
        if theirs.as_deref() != Some(mine) && !crate::util::permissions::replace_granted(out) {
            bail!(
                "overwrite_output_dir: {} holds a run of {}, not of this recipe; a recipe replaces only its own runs: grant it with --allow-write={}, or choose another output_dir",
                out.display(),
                theirs.as_deref().unwrap_or("an unknown recipe"),
                out.display()
            );
        }
    }
    for p in &old {
        crate::util::fs::remove_entry(p)?;
    }
    eprintln!("overwrite_output_dir: removed the earlier run in {} ({})", out.display(), names(&old));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_run_is_refused_or_removed_whole() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path();
        prepare(out, false, false, None).unwrap();
        std::fs::create_dir_all(out.join("adapter")).unwrap();
        prepare(out, false, false, None).unwrap(); // an adapter alone is not a run
        std::fs::write(out.join("manifest.json"), b"{}").unwrap();
        std::fs::write(out.join("metrics.jsonl"), b"").unwrap();
        prepare(out, false, false, None).unwrap(); // nor a run stopped before its first step
        std::fs::write(out.join("metrics.jsonl"), b"{\"step\": 1}\n").unwrap();
        let e = prepare(out, false, false, None).unwrap_err().to_string();
        assert!(e.contains("no checkpoint to resume") && e.contains("overwrite_output_dir: true"), "{e}");
        for d in ["checkpoint-2", "checkpoint-4"] {
            std::fs::create_dir_all(out.join(d)).unwrap();
        }
        std::fs::write(out.join("loss.png"), b"png").unwrap();
        std::fs::write(out.join("manifest.json"), br#"{"recipe_file": "train.rhai"}"#).unwrap();
        std::fs::write(out.join("train.rhai"), b"// recipe").unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = prepare(out, false, false, None).unwrap_err().to_string();
        assert!(e.contains("already holds a run") && e.contains("overwrite_output_dir") && e.contains("--resume") && !e.contains('\n'), "{e}");
        prepare(out, false, true, None).unwrap(); // resuming
        assert!(out.join("checkpoint-2").is_dir());
        prepare(out, true, false, None).unwrap();
        let left: Vec<String> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, vec!["notes.txt".to_string()], "only the user's own file stays");
    }
}
