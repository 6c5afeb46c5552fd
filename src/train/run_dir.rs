//! One output_dir, one run: a new run refuses a folder that holds another one (its checkpoints,
//! metrics, plot and adapter would sit beside the new run's and mix), unless it is told to
//! overwrite it — then the old run's files are removed first — or it resumes that run.

use super::checkpoint;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// What a run writes into output_dir besides its checkpoints (`adapter/` is where recipes save
/// the final adapter; `runs/` is TensorBoard's folder).
const RUN_FILES: &[&str] = &["manifest.json", "metrics.jsonl", "loss.png", "adapter", "runs"];
/// The files whose presence means a run was here (an `adapter/` alone may be the user's own).
const RUN_MARKERS: &[&str] = &["manifest.json", "metrics.jsonl", "loss.png"];

/// The recipe copy an earlier run left (named in its manifest).
fn recipe_copy(out: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(out.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let name = v.get("recipe_file")?.as_str()?;
    // Only a plain file name in output_dir, never a path elsewhere.
    (Path::new(name).file_name().is_some_and(|n| n == name)).then(|| out.join(name))
}

/// The entries of an earlier run in `out` (empty when there was none).
pub fn earlier_run(out: &Path) -> Vec<PathBuf> {
    let checkpoints: Vec<PathBuf> = checkpoint::list(out).into_iter().map(|(_, p)| p).collect();
    let marked = !checkpoints.is_empty() || RUN_MARKERS.iter().any(|n| out.join(n).symlink_metadata().is_ok());
    if !marked {
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
/// earlier run is an error naming the two ways out, or with `overwrite` is removed.
pub fn prepare(out: &Path, overwrite: bool, resuming: bool) -> Result<()> {
    if resuming {
        return Ok(());
    }
    let old = earlier_run(out);
    if old.is_empty() {
        return Ok(());
    }
    if !overwrite {
        bail!(
            "output_dir {} already holds a run ({}): set overwrite_output_dir: true to replace it, or resume it (resume_from_checkpoint: true, or qscript RECIPE --resume)",
            out.display(),
            names(&old)
        );
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
        prepare(out, false, false).unwrap();
        std::fs::create_dir_all(out.join("adapter")).unwrap();
        prepare(out, false, false).unwrap(); // an adapter alone is not a run
        for d in ["checkpoint-2", "checkpoint-4"] {
            std::fs::create_dir_all(out.join(d)).unwrap();
        }
        std::fs::write(out.join("loss.png"), b"png").unwrap();
        std::fs::write(out.join("manifest.json"), br#"{"recipe_file": "train.rhai"}"#).unwrap();
        std::fs::write(out.join("train.rhai"), b"// recipe").unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let e = prepare(out, false, false).unwrap_err().to_string();
        assert!(e.contains("already holds a run") && e.contains("overwrite_output_dir") && e.contains("--resume") && !e.contains('\n'), "{e}");
        prepare(out, false, true).unwrap(); // resuming
        assert!(out.join("checkpoint-2").is_dir());
        prepare(out, true, false).unwrap();
        let left: Vec<String> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, vec!["notes.txt".to_string()], "only the user's own file stays");
    }
}
