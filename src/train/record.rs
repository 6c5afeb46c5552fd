//! What a run records about how it was started, beside the hashes of `Manifest`: the command
//! line and its `--set` overrides, the device and dtypes, qscript's version and commit, and a
//! hash of the base weights. The command line reaches the trainer through [`Launch`], which
//! the CLI sets once per recipe run.

use crate::model::Model;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The git commit qscript was built from (`unknown` when built outside a git checkout).
pub const GIT_COMMIT: &str = env!("QSCRIPT_GIT_COMMIT");

/// How [`base_weights_sha256`] hashes, stated in every manifest.
pub const WEIGHTS_HASH_METHOD: &str = "sha256 over each weights file (*.safetensors, or the .gguf) in name order: its name, its size, \
     and its bytes — the whole file up to 64 MiB; above, its header (the safetensors JSON header, or the first MiB) and 16 evenly spaced 64 KiB samples";

/// Flattened into `manifest.json` (every field optional there: older manifests lack them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunRecord {
    /// The recipe's file name in output_dir (the copy of the recipe).
    pub recipe_file: Option<String>,
    /// The recipe's absolute path: a later run may replace this one (`overwrite_output_dir`)
    /// without a grant only from the same recipe.
    pub recipe_path: Option<String>,
    /// `--set NAME=VALUE` overrides of the run, in command-line order.
    pub overrides: Vec<(String, String)>,
    /// The command line that started the run.
    pub command: Vec<String>,
    pub git_commit: String,
    pub device: String,
    /// The model's weights dtype, the 4-bit compute dtype (quantized models) and the adapters'.
    pub dtype: String,
    pub bnb_4bit_compute_dtype: Option<String>,
    pub adapter_dtype: Option<String>,
    pub base_weights_sha256: Option<String>,
    pub base_weights_hash: String,
    /// With gradient checkpointing: whether the kept layer inputs waited in pinned host memory
    /// (on a GPU, unless `gradient_checkpointing_kwargs: #{offload: false}`); `None` without.
    pub checkpoint_offload: Option<bool>,
}

impl RunRecord {
    pub fn of(model: &Model) -> Self {
        let launch = launch();
        let adapter_dtype = model.llama.adapters().next().map(|(_, lo)| lo.a.dtype());
        Self {
            recipe_file: None,
            recipe_path: None,
            overrides: launch.as_ref().map(|l| l.overrides.clone()).unwrap_or_default(),
            command: launch.map(|l| l.argv).unwrap_or_default(),
            git_commit: GIT_COMMIT.to_string(),
            device: crate::device::name(&model.llama.device),
            dtype: crate::model::dtype_name(model.llama.dtype).to_string(),
            bnb_4bit_compute_dtype: model.llama.quantization.as_ref().map(|q| crate::model::dtype_name(q.compute_dtype).to_string()),
            adapter_dtype: adapter_dtype.map(|d| crate::model::dtype_name(d).to_string()),
            base_weights_sha256: base_weights_sha256(&model.source_path),
            base_weights_hash: WEIGHTS_HASH_METHOD.to_string(),
            checkpoint_offload: None,
        }
    }

    /// One line per difference that a resumed run should be told about.
    pub fn changes(&self, now: &RunRecord) -> Vec<String> {
        let mut out = Vec::new();
        if self.overrides != now.overrides {
            let show = |o: &[(String, String)]| if o.is_empty() { "none".to_string() } else { o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ") };
            out.push(format!("--set values changed (were: {}; now: {})", show(&self.overrides), show(&now.overrides)));
        }
        if self.base_weights_sha256.is_some() && self.base_weights_sha256 != now.base_weights_sha256 {
            out.push("the base weights changed".into());
        }
        for (what, a, b) in [("device", &self.device, &now.device), ("dtype", &self.dtype, &now.dtype)] {
            if !a.is_empty() && a != b {
                out.push(format!("{what} changed ({a} -> {b}; resuming stays exact only on the same device and dtypes)"));
            }
        }
        out
    }
}

/// How this process was started, as a recipe run (absent in the REPL and in-process callers).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The command line as typed.
    pub argv: Vec<String>,
    pub recipe: PathBuf,
    pub overrides: Vec<(String, String)>,
    /// `--resume`: every `train()` whose output_dir holds a checkpoint continues from its latest.
    pub resume: bool,
}

static LAUNCH: Mutex<Option<Launch>> = Mutex::new(None);

pub fn set_launch(l: Launch) {
    *LAUNCH.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
}

pub fn launch() -> Option<Launch> {
    LAUNCH.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The command that continues this run: the same command line with `--resume` added.
pub fn resume_command() -> Option<String> {
    let l = launch()?;
    let mut args = l.argv.clone();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    Some(args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "))
}

/// `a` as a POSIX shell word.
fn shell_quote(a: &str) -> String {
    if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The weights files of a model's source (a directory's `*.safetensors`, or the file itself).
fn weight_files(source: &Path) -> Vec<PathBuf> {
    if source.is_file() {
        return vec![source.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(source)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors" || x == "gguf"))
        .collect();
    v.sort();
    v
}

/// The base weights' hash by [`WEIGHTS_HASH_METHOD`]; `None` when there is no file to read.
pub fn base_weights_sha256(source: &Path) -> Option<String> {
    use sha2::Digest;
    let files = weight_files(source);
    if files.is_empty() {
        return None;
    }
    let mut h = sha2::Sha256::new();
    for f in files {
        h.update(f.file_name()?.to_string_lossy().as_bytes());
        let mut file = std::fs::File::open(&f).ok()?;
        let size = file.metadata().ok()?.len();
        h.update(size.to_le_bytes());
        hash_contents(&mut h, &mut file, size).ok()?;
    }
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_contents(h: &mut sha2::Sha256, file: &mut std::fs::File, size: u64) -> std::io::Result<()> {
    use sha2::Digest;
    const WHOLE: u64 = 64 << 20;
    const SAMPLE: u64 = 64 << 10;
    let read_at = |h: &mut sha2::Sha256, file: &mut std::fs::File, at: u64, len: u64| -> std::io::Result<()> {
        let mut buf = vec![0u8; len.min(size.saturating_sub(at)) as usize];
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut buf)?;
        h.update(&buf);
        Ok(())
    };
    if size <= WHOLE {
        return read_at(h, file, 0, size);
    }
    // A safetensors file starts with its header's length (u64 LE); a plausible one is read whole.
    let mut len8 = [0u8; 8];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut len8)?;
    let n = u64::from_le_bytes(len8);
    let header = if n > 0 && n < (100 << 20) && 8 + n <= size { 8 + n } else { 1 << 20 };
    read_at(h, file, 0, header)?;
    for i in 0..16u64 {
        read_at(h, file, header + (size - header - SAMPLE) * i / 15, SAMPLE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_hash_sees_a_changed_sample_and_ignores_nothing_small() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("model.safetensors");
        std::fs::write(&f, vec![1u8; 1000]).unwrap();
        let a = base_weights_sha256(t.path()).unwrap();
        let mut bytes = vec![1u8; 1000];
        bytes[999] = 2;
        std::fs::write(&f, &bytes).unwrap();
        assert_ne!(a, base_weights_sha256(t.path()).unwrap());
        assert!(base_weights_sha256(&t.path().join("none")).is_none());
    }

    #[test]
    fn resume_command_quotes_and_adds_resume_once() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("OUT=runs/x"), "OUT=runs/x");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
