//! Reading safetensors checkpoints (single file or sharded via `model.safetensors.index.json`)
//! through mmap, with errors that name the file and tensor.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: BTreeMap<String, usize>,
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        _ => return None,
    })
}

impl WeightFiles {
    /// Open the weights of an HF model directory: `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open(&[single]);
        }
        if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}:{}:{}: invalid JSON: {e}", index.display(), e.line(), e.column()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing `weight_map`", index.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open(&paths);
        }
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display())
    }

    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the file is only read; a concurrent writer could change it under us, as with
            // every mmap-based loader (transformers included).
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e}); is it truncated?", path.display()))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
            drop(st);
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Path of the file holding `name` (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// Shape and dtype of a tensor without reading it.
    pub fn info(&self, name: &str) -> Result<(Vec<usize>, safetensors::Dtype)> {
        let (path, st) = self.view(name)?;
        let t = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        Ok((t.shape().to_vec(), t.dtype()))
    }

    fn view(&self, name: &str) -> Result<(&Path, SafeTensors<'_>)> {
        let &i = self.index.get(name).with_context(|| {
            let where_ = self.files.iter().map(|f| f.0.display().to_string()).collect::<Vec<_>>().join(", ");
            format!("{where_}: missing tensor `{name}`")
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok((path, st))
    }

    /// Load a tensor, checking its shape when `expected` is given, converted to `dtype`.
    pub fn load(&self, name: &str, expected: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let (path, st) = self.view(name)?;
        let view = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        if let Some(exp) = expected {
            if view.shape() != exp {
                bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", path.display(), view.shape(), exp);
            }
        }
        let src = st_dtype(view.dtype())
            .with_context(|| format!("{}: tensor `{name}` has unsupported dtype {:?}", path.display(), view.dtype()))?;
        let t = Tensor::from_raw_buffer(view.data(), src, view.shape(), &Device::Cpu)
            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        let t = if src == dtype { t } else { t.to_dtype(dtype)? };
        Ok(t.to_device(device)?)
    }
}
